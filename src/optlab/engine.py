"""The compiled engine: one XLA program per training epoch, one per inference pass (JAX backend).

A whole epoch is a ``jax.lax.scan`` over the shuffled batches, each step built from Keras's own
``model.stateless_call`` and ``optimizer.stateless_apply``: the same model, loss and optimizer
arithmetic as Keras's ``fit``, without its Python and dispatch overhead on every batch, which
on a small MLP is most of the time. Batches are gathered by index inside the program, so no
shuffled copy of the data is ever made.

The engine only computes. Between epochs it writes the state back into the Keras objects; the
epoch driver (``optlab.loop``) runs the callbacks, keeps the history and checks divergence.
"""

from __future__ import annotations

from optlab.backend import require_chosen

require_chosen(__name__)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optlab.errors import OptlabError  # noqa: E402


def to_device(array: np.ndarray) -> jax.Array:
    """The array as a JAX array, sharing memory when the layout allows it.

    XLA:CPU adopts a 64-byte aligned, C-contiguous host buffer without a copy (through DLPack;
    ``optlab.artifacts.read_aligned`` reads files that way), so the data exists once in memory.
    """
    if jax.default_backend() != "cpu":
        return jax.device_put(array)  # one copy, on the accelerator beside the model state
    if isinstance(array, np.ndarray) and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        try:
            return jax.dlpack.from_dlpack(array)
        except (TypeError, ValueError, RuntimeError):  # a build that cannot adopt host memory
            pass
    return jnp.asarray(array)


class CompiledEngine:
    """Epoch-at-a-time training and whole-split inference of a compiled Keras model."""

    def __init__(self, model: keras.Model, batch_size: int, eval_rows: int) -> None:
        """``eval_rows``: examples per inference chunk (memory only; results do not depend on it)."""
        if keras.backend.backend() != "jax":
            raise OptlabError("train.loop 'compiled' needs train.backend: jax")
        self.model, self.batch_size = model, batch_size
        self.optimizer = model.optimizer
        self.optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None)

        def forward(tv, ntv, x, y):
            probs, ntv, reg = model.stateless_call(tv, ntv, x, training=True, return_losses=True)
            # Keras reports the loss including the L2 penalties; so do we, to match fit's numbers.
            loss = loss_fn(y, probs) + (sum(reg) if reg else 0.0)
            correct = jnp.sum(jnp.argmax(probs, axis=-1) == y)
            return loss, (ntv, correct)

        grad_fn = jax.value_and_grad(forward, has_aux=True)

        def step(state, x, y):
            tv, ntv, ov = state
            (loss, (ntv, correct)), grads = grad_fn(tv, ntv, x, y)
            tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
            return (tv, ntv, ov), (loss * y.shape[0], correct)

        def epoch(state, x, y, order):
            def body(state, i):
                idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
                return step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0))

            state, (losses, correct) = jax.lax.scan(body, state, jnp.arange(order.shape[0] // batch_size))
            return state, jnp.sum(losses), jnp.sum(correct)

        def infer(tv, ntv, x, y):
            # The whole split in one program, eval_rows at a time. Every chunk has the same shape
            # (the last one overlaps the one before it), so one compile serves them all and
            # nothing is padded or copied.
            n = x.shape[0]
            size = min(eval_rows, n)
            chunks = -(-n // size)
            starts = jnp.minimum(jnp.arange(chunks) * size, n - size)

            def chunk(start):
                xs = jax.lax.dynamic_slice_in_dim(x, start, size)
                ys = jax.lax.dynamic_slice_in_dim(y, start, size)
                probs, _, reg = model.stateless_call(tv, ntv, xs, training=False, return_losses=True)
                return per_example(ys, probs), probs, (sum(reg) if reg else jnp.float32(0.0))

            losses, probs, reg = jax.lax.map(chunk, starts)
            # Rows the last chunk repeats from the one before it are dropped.
            tail = n - (chunks - 1) * size
            losses = jnp.concatenate([losses[:-1].reshape(-1), losses[-1, size - tail :]])
            probs = jnp.concatenate([probs[:-1].reshape(-1, probs.shape[-1]), probs[-1, size - tail :]])
            correct = jnp.sum(jnp.argmax(probs, axis=-1) == y)
            return jnp.mean(losses) + reg[0], correct, probs

        def indexed_step(state, x, y, idx):
            return step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0))

        self._device = jax.devices()[0]
        self._epoch = jax.jit(epoch, donate_argnums=0)
        self._step = jax.jit(indexed_step, donate_argnums=0)  # one batch (the last, partial one)
        self._infer = jax.jit(infer)
        # XLA:CPU (jaxlib 0.10) leaves the gradients of a convolution inside a loop (the scan) in a
        # non-canonical layout that its generic emitter runs instead of the Eigen kernels it uses
        # elsewhere: the default CNN's epoch took 13x longer as one scan than as one compiled call
        # per batch (benchmarks/train_speed.py --model cnn). Models with convolutions take batches
        # one call at a time on a CPU; everything else, one call per epoch.
        has_conv = any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)
        self.one_call_per_epoch = not (has_conv and jax.default_backend() == "cpu")

    # Keras objects <-> the tuple of arrays the compiled functions carry.
    def _state(self):
        m, o = self.model, self.optimizer
        state = (
            [v.value for v in m.trainable_variables],
            [v.value for v in m.non_trainable_variables],
            [v.value for v in o.variables],
        )
        # Keras creates its variables uncommitted; the compiled epoch returns them committed to
        # the device. Commit them up front so epoch 2 reuses epoch 1's program instead of
        # compiling a second one (jit's cache key includes placement).
        return jax.device_put(state, self._device)

    def _store(self, state) -> None:
        tv, ntv, ov = state
        for variables, values in ((self.model.trainable_variables, tv), (self.model.non_trainable_variables, ntv),
                                  (self.optimizer.variables, ov)):  # fmt: skip
            for var, val in zip(variables, values, strict=True):
                var.assign(val)

    def train_epoch(self, x: jax.Array, y: jax.Array, order: np.ndarray) -> dict[str, float]:
        """One pass over ``x[order]`` in batches; Keras's running loss and accuracy of the epoch."""
        n, bs = len(order), self.batch_size
        n_full = (n // bs) * bs if self.one_call_per_epoch else 0
        state = self._state()
        loss_sum, correct = 0.0, 0
        if n_full:
            state, ls, c = self._epoch(state, x, y, jnp.asarray(order[:n_full]))
            loss_sum, correct = loss_sum + ls, correct + c
        for start in range(n_full, n, bs):
            state, (ls, c) = self._step(state, x, y, jnp.asarray(order[start : start + bs]))
            loss_sum, correct = loss_sum + ls, correct + c
        self._store(state)
        # Averages over the epoch, weights changing as it goes, as fit reports them.
        return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}

    def infer(self, x: jax.Array, y: jax.Array) -> tuple[dict[str, float], np.ndarray]:
        """Loss and accuracy in inference mode on the current weights, and the probabilities."""
        tv, ntv, _ = self._state()
        loss, correct, probs = self._infer(tv, ntv, x, y)
        return {"loss": float(loss), "accuracy": int(correct) / len(y)}, np.asarray(probs)

"""The compiled engine: one XLA program per training epoch, one per inference pass (JAX backend).

A whole epoch is a ``jax.lax.scan`` over the shuffled batches, each step built from Keras's own
``model.stateless_call`` and ``optimizer.stateless_apply``: the same model, loss and optimizer
arithmetic as Keras's ``fit``, without its Python and dispatch overhead on every batch, which
on a small MLP is most of the time. Batches are gathered by index inside the program, so no
shuffled copy of the data is ever made.

The engine only computes. Between epochs it writes the state back into the Keras objects; the
epoch driver (``optlab.loop``) runs the callbacks, keeps the history and checks divergence.

Given several Keras models of one architecture (``train.replicas``: the same variant with other
seeds), it trains them all in one program: every compiled function above is ``jax.vmap``-ped
over a leading replica axis of the state and of the batch order, so each replica keeps its own
weights, optimizer state, dropout stream and batch order while XLA runs them as one batched
computation. One model runs the unvectorized programs (the same numbers as before replicas).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

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


CHUNK_STEPS = 256  # at most this many steps per compiled call: progress can be shown between calls
# Diagnostics measure one step in this many (steps 0, 16, 32, ... of each compiled call), chosen
# inside the scan with a `cond`: measuring every step made the default MLP's epoch 40% slower (a
# dozen reductions over every weight, each step); one in 16 costs about 3% (benchmarks/train_speed.py).
DIAGNOSED_EVERY = 16


def chunk_plan(n_steps: int, most: int = CHUNK_STEPS) -> list[int]:
    """Split ``n_steps`` into consecutive chunks of at most ``most`` steps, all of one length when
    a divisor allows (one compiled program), else equal chunks and a shorter last one (two).

    A pure function of the step count, so a rerun, or a resumed run, steps exactly as before.
    """
    if n_steps <= most:
        return [n_steps] if n_steps else []
    fewest = -(-n_steps // most)
    for k in range(fewest, 2 * fewest + 1):
        if n_steps % k == 0:
            return [n_steps // k] * k
    return [most] * (n_steps // most) + ([n_steps % most] if n_steps % most else [])


@dataclass(frozen=True)
class LayerDiagnostics:
    """How one weight layer (dense or conv) trained during an epoch."""

    grad_norm: float  # L2 norm of the loss gradient w.r.t. the layer's weights: root mean square over measured steps
    weight_norm: float  # L2 norm of its weights at the end of the epoch
    update_ratio: (
        float  # one step's ||w_after - w_before|| (root mean square over the steps) / ||w|| at the epoch's start
    )
    dead_fraction: float | None  # units never active (ReLU output 0) on the probe batch; None: not ReLU


class CompiledEngine:
    """Epoch-at-a-time training and whole-split inference of a compiled Keras model.

    With ``diagnostics``, one step in DIAGNOSED_EVERY also measures, per weight layer, the squared
    norms of its gradient and of its update (inside the compiled program: a few percent of the
    epoch); each epoch then reports per layer the gradient norm and the update's size relative to
    the weights (root mean squares over the measured steps: an average that one exploding step
    cannot hide), the weights' norms, and the fraction of ReLU units that no image of a fixed
    probe batch activates.
    """

    def __init__(
        self,
        model: keras.Model | Sequence[keras.Model],
        batch_size: int,
        eval_rows: int,
        diagnostics: bool = False,
        average: Callable[[list, list], list] | None = None,
    ) -> None:
        """``model``: one compiled Keras model, or the replicas (a list: the results are then
        per replica, in lists). ``eval_rows``: examples per inference chunk (memory only; results
        do not depend on it). ``average``: how the weights to evaluate follow from the training
        weights and the optimizer's variables (``optlab.optim.evaluation_weights``; None: the same)."""
        if keras.backend.backend() != "jax":
            raise OptlabError("train.loop 'compiled' needs train.backend: jax")
        self.models = [model] if isinstance(model, keras.Model) else list(model)
        self.vectorized = not isinstance(model, keras.Model)
        model = self.models[0]
        self.model, self.batch_size, self.diagnostics = model, batch_size, diagnostics
        self.optimizer = model.optimizer
        for m in self.models:
            m.optimizer.build(m.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        # The weight layers, in order, and which trainable variables belong to each.
        self.weight_layers = [
            layer for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
        ]
        kinds = ["conv" if isinstance(layer, keras.layers.Conv2D) else "dense" for layer in self.weight_layers]
        # conv1, conv2, ..., dense1, dense2, ..., output: the names diagnostics are logged under.
        self.labels = [f"{kind}{kinds[: i + 1].count(kind)}" for i, kind in enumerate(kinds[:-1])] + ["output"]
        index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        groups = [[index[id(v)] for v in layer.trainable_weights] for layer in self.weight_layers]

        def norms(arrays):
            """Per weight layer: the L2 norm over all its variables."""
            squares = [jnp.sum(jnp.square(a)) for a in arrays]
            return jnp.sqrt(jnp.stack([sum(squares[i] for i in g) for g in groups]))

        def forward(tv, ntv, x, y):
            probs, ntv, reg = model.stateless_call(tv, ntv, x, training=True, return_losses=True)
            # Keras reports the loss including the L2 penalties; so do we, to match fit's numbers.
            loss = loss_fn(y, probs) + (sum(reg) if reg else 0.0)
            correct = jnp.sum(jnp.argmax(probs, axis=-1) == y)
            return loss, (ntv, correct)

        grad_fn = jax.value_and_grad(forward, has_aux=True)

        def layer_squares(arrays):
            """Per weight layer, the sum of the squares of all its variables' entries."""
            squares = [jnp.sum(jnp.square(a)) for a in arrays]
            return jnp.stack([sum(squares[i] for i in g) for g in groups])

        def step(state, x, y, measured):
            """One optimizer step; with diagnostics it also returns, per weight layer, the squared
            gradient norm and squared update norm when ``measured`` (zeros otherwise)."""
            tv, ntv, ov = state
            (loss, (ntv, correct)), grads = grad_fn(tv, ntv, x, y)
            new_tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
            squares = ()
            if diagnostics:
                zero = jnp.zeros(len(groups), jnp.float32)
                squares = jax.lax.cond(
                    measured,
                    lambda: (layer_squares(grads), layer_squares([n - o for n, o in zip(new_tv, tv, strict=True)])),
                    lambda: (zero, zero),
                )
            return (new_tv, ntv, ov), (loss * y.shape[0], correct), squares

        def chunk(state, x, y, order):
            """The steps of ``order``'s full batches, one scan; diagnostics measure one step in
            DIAGNOSED_EVERY (a measured step costs a dozen reductions over every weight)."""

            def body(carry, i):
                state, sums = carry
                idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
                measured = i % DIAGNOSED_EVERY == 0
                state, out, squares = step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), measured)
                return (state, tuple(a + b for a, b in zip(sums, squares, strict=True))), out

            zero = jnp.zeros(len(groups), jnp.float32)
            carry = (state, (zero, zero) if diagnostics else ())
            (state, squares), outs = jax.lax.scan(body, carry, jnp.arange(order.shape[0] // batch_size))
            return state, (*(jnp.sum(o) for o in outs), squares)

        def indexed_step(state, x, y, idx, measured: bool):
            state, out, squares = step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), measured)
            return state, (*out, squares)

        def infer(tv, ntv, x, y):
            # The whole split in one program, eval_rows at a time. Every chunk has the same shape
            # (the last one overlaps the one before it), so one compile serves them all and
            # nothing is padded or copied.
            n = x.shape[0]
            size = min(eval_rows, n)
            chunks = -(-n // size)
            starts = jnp.minimum(jnp.arange(chunks) * size, n - size)

            def part(start):
                xs = jax.lax.dynamic_slice_in_dim(x, start, size)
                ys = jax.lax.dynamic_slice_in_dim(y, start, size)
                probs, _, reg = model.stateless_call(tv, ntv, xs, training=False, return_losses=True)
                return per_example(ys, probs), probs, (sum(reg) if reg else jnp.float32(0.0))

            losses, probs, reg = jax.lax.map(part, starts)
            # Rows the last chunk repeats from the one before it are dropped.
            tail = n - (chunks - 1) * size
            losses = jnp.concatenate([losses[:-1].reshape(-1), losses[-1, size - tail :]])
            probs = jnp.concatenate([probs[:-1].reshape(-1, probs.shape[-1]), probs[-1, size - tail :]])
            correct = jnp.sum(jnp.argmax(probs, axis=-1) == y)
            return jnp.mean(losses) + reg[0], correct, probs

        def evaluation_weights(tv, ov):
            return average(tv, ov) if average is not None else tv

        dead = self._dead_units_function() if diagnostics else None
        if self.vectorized:  # the same functions over a leading replica axis (x, y: shared)
            chunk = jax.vmap(chunk, in_axes=(0, None, None, 0))
            indexed_step = jax.vmap(indexed_step, in_axes=(0, None, None, 0, None))
            infer = jax.vmap(infer, in_axes=(0, 0, None, None))
            evaluation_weights, norms = jax.vmap(evaluation_weights), jax.vmap(norms)
            dead = jax.vmap(dead, in_axes=(0, 0, None)) if dead else None
        self._device = jax.devices()[0]
        self._evaluation_weights = jax.jit(evaluation_weights)
        self._chunk = jax.jit(chunk, donate_argnums=0)
        self._step = jax.jit(indexed_step, donate_argnums=0)  # one batch: the last, partial one, or a conv model's
        self._infer = jax.jit(infer)
        self._norms = jax.jit(norms)
        self._dead = jax.jit(dead) if dead else None
        self.probe: jax.Array | None = None  # the images dead units are counted on (set by the driver)
        self.last_epoch: dict[str, LayerDiagnostics] = {}  # label -> the last epoch's diagnostics
        # XLA:CPU (jaxlib 0.10) leaves the gradients of a convolution inside a loop (the scan) in a
        # non-canonical layout that its generic emitter runs instead of the Eigen kernels it uses
        # elsewhere: the default CNN's epoch took 13x longer as one scan than as one compiled call
        # per batch (benchmarks/train_speed.py --model cnn). Models with convolutions take batches
        # one call at a time on a CPU; everything else, chunks of up to CHUNK_STEPS steps.
        has_conv = any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)
        self.scans = not (has_conv and jax.default_backend() == "cpu")

    def _dead_units_function(self):
        """Per weight layer followed by a ReLU, the fraction of its units (channels, for a conv)
        that are 0 for every probe image; the output layer has none. None without ReLUs."""
        model = self.model
        relus = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)
                 and getattr(layer.activation, "__name__", "") == "relu"]  # fmt: skip
        hidden = len(self.weight_layers) - 1  # every weight layer but the output is followed by an activation
        if not relus or len(relus) != hidden:
            return None  # another activation (gelu, tanh...): nothing is "dead" in the ReLU sense
        probe_model = keras.Model(model.inputs, [layer.output for layer in relus])
        tv_index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        ntv_index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        pick_tv = [tv_index[id(v)] for v in probe_model.trainable_variables]
        pick_ntv = [ntv_index[id(v)] for v in probe_model.non_trainable_variables]

        def dead(tv, ntv, x):
            outs, _ = probe_model.stateless_call([tv[i] for i in pick_tv], [ntv[i] for i in pick_ntv], x)
            outs = outs if isinstance(outs, list | tuple) else [outs]  # a one-output model gives the tensor
            return [jnp.mean(jnp.all(a <= 0, axis=tuple(range(a.ndim - 1)))) for a in outs]

        return dead

    # Keras objects <-> the tuple of arrays the compiled functions carry.
    @staticmethod
    def _values(m: keras.Model) -> tuple[list, list, list]:
        return (
            [v.value for v in m.trainable_variables],
            [v.value for v in m.non_trainable_variables],
            [v.value for v in m.optimizer.variables],
        )

    def _state(self):
        if self.vectorized:  # each array with a leading replica axis
            state = jax.tree.map(lambda *a: jnp.stack(a), *(self._values(m) for m in self.models))
        else:
            state = self._values(self.model)
        # Keras creates its variables uncommitted; the compiled epoch returns them committed to
        # the device. Commit them up front so epoch 2 reuses epoch 1's program instead of
        # compiling a second one (jit's cache key includes placement).
        return jax.device_put(state, self._device)

    def _store(self, state, replicas: Sequence[int] | None = None) -> None:
        """Write ``state`` into the Keras models (of ``replicas`` only, when given: a replica that
        stopped keeps the state it stopped with)."""
        for r in range(len(self.models)) if replicas is None else replicas:
            m = self.models[r]
            values = jax.tree.map(lambda a, r=r: a[r], state) if self.vectorized else state
            for variables, vals in zip(
                (m.trainable_variables, m.non_trainable_variables, m.optimizer.variables), values, strict=True
            ):
                for var, val in zip(variables, vals, strict=True):
                    var.assign(val)

    def train_epoch(
        self,
        x: jax.Array,
        y: jax.Array,
        order: np.ndarray,
        on_progress: Callable[[int, int], None] | None = None,
        replicas: Sequence[int] | None = None,
    ) -> dict[str, float] | list[dict[str, float]]:
        """One pass over ``x[order]`` in batches; Keras's running loss and accuracy of the epoch.

        With replicas, ``order`` holds one row per replica and the result is a list; ``replicas``
        names those whose new state is kept (the others, stopped, keep theirs).
        ``on_progress(steps done, steps in the epoch)`` is called after each compiled call.
        """
        n, bs = order.shape[-1], self.batch_size
        n_steps = -(-n // bs)
        # (first example, examples, one scan?) of each compiled call: the full batches in chunks of
        # scanned steps, then one call per remaining batch (all of them for a conv model on a CPU).
        calls, start = [], 0
        for steps in chunk_plan(n // bs) if self.scans else []:
            calls.append((start, steps * bs, True))
            start += steps * bs
        calls += [(first, min(bs, n - first), False) for first in range(start, n, bs)]
        state, totals, done = self._state(), None, 0
        start_norms = np.asarray(self._norms(state[0])) if self.diagnostics else None
        measured = 0  # steps whose gradients and updates the diagnostics measured
        for first, size, scanned in calls:
            idx = jnp.asarray(order[..., first : first + size])
            if scanned:
                state, out = self._chunk(state, x, y, idx)
                measured += -(-(size // bs) // DIAGNOSED_EVERY) if self.diagnostics else 0
            else:
                measure = bool(self.diagnostics and (first // bs) % DIAGNOSED_EVERY == 0)
                state, out = self._step(state, x, y, idx, measure)
                measured += measure
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
            done += -(-size // bs)
            if on_progress is not None:
                on_progress(done, n_steps)
        self._store(state, replicas)
        loss_sum, correct, squares = totals
        if self.diagnostics:
            grad_rms, update_rms = (np.sqrt(np.asarray(total) / max(measured, 1)) for total in squares)
            self.last_epoch = self._summarize(state, grad_rms, update_rms / np.maximum(start_norms, 1e-12))
        # Averages over the epoch, weights changing as it goes, as fit reports them.
        if not self.vectorized:
            return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}
        return [{"loss": float(s) / n, "accuracy": float(c) / n} for s, c in zip(loss_sum, correct, strict=True)]

    def batch_losses(self, x: jax.Array, y: jax.Array, batches: Iterable[np.ndarray]) -> Iterator[float]:
        """Train on each batch of indices in turn, yielding each step's mean training loss (before
        its update, as Keras reports it); the state goes back into the Keras objects when the
        caller stops (the learning-rate range test stops when the loss blows up)."""
        state = self._state()
        try:
            for idx in batches:
                state, (loss_sum, _, _) = self._step(state, x, y, jnp.asarray(idx), False)
                yield float(loss_sum) / len(idx)
        finally:
            self._store(state)

    def _summarize(self, state, grad, ratio) -> dict[str, LayerDiagnostics] | list[dict[str, LayerDiagnostics]]:
        tv, ntv, _ = state
        weight = np.asarray(self._norms(tv))
        dead = np.asarray(self._dead(tv, ntv, self.probe)) if self._dead and self.probe is not None else None

        def one(grad, weight, ratio, dead) -> dict[str, LayerDiagnostics]:
            dead = [float(d) for d in dead] if dead is not None else []
            dead += [None] * (len(self.weight_layers) - len(dead))
            rows = zip(self.labels, grad, weight, ratio, dead, strict=True)
            return {label: LayerDiagnostics(float(g), float(w), float(r), d) for label, g, w, r, d in rows}

        if not self.vectorized:
            return one(grad, weight, ratio, dead)
        # dead: (layers, replicas) from the vmapped list of per-layer fractions
        per_replica = dead.T if dead is not None else [None] * len(self.models)
        return [one(*rows) for rows in zip(grad, weight, ratio, per_replica, strict=True)]

    def infer(self, x: jax.Array, y: jax.Array, as_they_are: bool = False):
        """Loss and accuracy in inference mode, and the probabilities, on the evaluation weights of
        the current state (schedule-free AdamW's average), or on the model's weights as they are.
        With replicas, a list of (logs, probabilities), one per replica."""
        tv, ntv, ov = self._state()
        if not as_they_are:
            tv = self._evaluation_weights(tv, ov)
        loss, correct, probs = self._infer(tv, ntv, x, y)
        if not self.vectorized:
            return {"loss": float(loss), "accuracy": int(correct) / len(y)}, np.asarray(probs)
        probs = np.asarray(probs)
        return [
            ({"loss": float(lo), "accuracy": int(c) / len(y)}, p) for lo, c, p in zip(loss, correct, probs, strict=True)
        ]

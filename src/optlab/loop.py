"""The training loop: a Keras model and optimizer, stepped either by Keras's ``fit`` or by optlab's
compiled loop, with the same callbacks and the same history either way.

The compiled loop (``train.loop: compiled``, JAX backend) runs a whole epoch as one XLA
program: a ``jax.lax.scan`` over the shuffled batches, built from Keras's own
``model.stateless_call`` and ``optimizer.stateless_apply``. ``fit`` pays Python and dispatch
overhead on every batch, which on a small MLP is most of the time. Between epochs the state is
written back into the Keras objects and the Keras callbacks run on them, so early stopping,
ReduceLROnPlateau, checkpoints and the ``.keras`` file behave exactly as with ``fit``.
Per-batch callbacks are not called by the compiled loop (none of optlab's need them).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from optlab.errors import OptlabError
from optlab.models import build_model
from optlab.optim import build_optimizer, current_learning_rate, plateau_callback
from optlab.params import Params

EVAL_BATCH = 1024  # examples per inference step; memory only, results do not depend on it


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray


@dataclass
class History:
    """One entry per epoch run; ``learning_rate`` is the mean rate applied over that epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def build(params: Params, input_shape: Sequence[int], n_classes: int, n_train: int):
    """The compiled model and the number of optimizer steps per epoch (last batch partial)."""
    steps = math.ceil(n_train / params.train.batch_size)
    model = build_model(input_shape, n_classes, params.model, params.seed)
    compile_model(model, build_optimizer(params, steps, params.train.epochs))
    return model, steps


@functools.lru_cache(maxsize=8)
def _compiled_schedule(schedule: keras.optimizers.schedules.LearningRateSchedule):
    """The schedule evaluated at many steps in one compiled call (JAX backend).

    Called eagerly, a schedule compiles a fresh ``cond`` on every call: ~2 s per epoch.
    """
    import jax

    return jax.jit(jax.vmap(schedule))


def applied_learning_rate(optimizer: keras.optimizers.Optimizer, steps: int) -> float:
    """The mean learning rate applied over the last ``steps`` optimizer steps (one epoch).

    A schedule changes the rate every step (a warm-up ramps within the first epoch), so the
    epoch's mean is what the per-epoch curve shows.
    """
    lr = optimizer._learning_rate  # the schedule itself; the public property evaluates it
    if not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return current_learning_rate(optimizer)
    end = int(keras.ops.convert_to_numpy(optimizer.iterations))
    at = np.arange(max(0, end - steps), max(end, 1), dtype="float32")
    if keras.backend.backend() == "jax":
        return float(np.mean(np.asarray(_compiled_schedule(lr)(at))))
    # Other backends: the mean over up to 32 evenly spaced steps (exact for constant pieces).
    sample = np.unique(np.linspace(at[0], at[-1], num=min(len(at), 32)).round())
    return float(np.mean([float(keras.ops.convert_to_numpy(lr(float(s)))) for s in sample]))


class _LearningRateLog(keras.callbacks.Callback):
    """Adds the epoch's applied learning rate to fit's logs, before later callbacks read them."""

    def __init__(self, steps_per_epoch: int) -> None:
        super().__init__()
        self.steps = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = applied_learning_rate(self.model.optimizer, self.steps)


# --- the compiled loop ------------------------------------------------------------------------
class CompiledLoop:
    """Epoch-at-a-time training of a compiled Keras model on the JAX backend."""

    def __init__(self, model: keras.Model, batch_size: int) -> None:
        import jax
        import jax.numpy as jnp

        if keras.backend.backend() != "jax":
            raise OptlabError("train.loop 'compiled' needs train.backend: jax")
        self.model, self.bs = model, batch_size
        self.optimizer = model.optimizer
        self.optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()

        def forward(tv, ntv, x, y, training):
            probs, ntv, reg = model.stateless_call(tv, ntv, x, training=training, return_losses=True)
            data_loss = loss_fn(y, probs)  # mean over the batch
            # Keras reports loss including the L2 penalties; so do we, to match fit's numbers.
            loss = data_loss + (sum(reg) if reg else 0.0)
            correct = jnp.sum(jnp.argmax(probs, axis=-1) == y)
            return loss, (ntv, correct, probs)

        grad_fn = jax.value_and_grad(lambda tv, ntv, x, y: forward(tv, ntv, x, y, True), has_aux=True)

        def step(state, x, y):
            tv, ntv, ov = state
            (loss, (ntv, correct, _)), grads = grad_fn(tv, ntv, x, y)
            tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
            return (tv, ntv, ov), (loss * y.shape[0], correct)

        def epoch(state, x, y, order):
            # One XLA program per epoch: gather each batch by index, so no shuffled copy of
            # the data set is ever made (peak memory stays near one copy of the data).
            def body(state, i):
                idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
                return step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0))

            n_full = order.shape[0] // batch_size
            state, (losses, correct) = jax.lax.scan(body, state, jnp.arange(n_full))
            return state, jnp.sum(losses), jnp.sum(correct)

        per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None)

        def infer(tv, ntv, x, y):
            # The whole split in one program, EVAL_BATCH rows at a time. Every chunk has the same
            # shape (the last one overlaps the one before it), so one compile serves them all and
            # nothing is padded or copied.
            n = x.shape[0]
            size = min(EVAL_BATCH, n)
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

        self._jnp, self._jax, self._device = jnp, jax, jax.devices()[0]
        self._epoch = jax.jit(epoch, donate_argnums=0)
        self._step = jax.jit(step, donate_argnums=0)  # the last, partial batch
        self._infer = jax.jit(infer)

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
        return self._jax.device_put(state, self._device)

    def _store(self, state) -> None:
        tv, ntv, ov = state
        for var, val in zip(self.model.trainable_variables, tv):
            var.assign(val)
        for var, val in zip(self.model.non_trainable_variables, ntv):
            var.assign(val)
        for var, val in zip(self.optimizer.variables, ov):
            var.assign(val)

    def train_epoch(self, x, y, order: np.ndarray) -> dict[str, float]:
        jnp, n = self._jnp, len(order)
        n_full = (n // self.bs) * self.bs
        state = self._state()
        loss_sum, correct = 0.0, 0
        if n_full:
            state, ls, c = self._epoch(state, x, y, jnp.asarray(order[:n_full]))
            loss_sum, correct = loss_sum + ls, correct + c
        if n_full < n:
            idx = jnp.asarray(order[n_full:])
            state, (ls, c) = self._step(state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0))
            loss_sum, correct = loss_sum + ls, correct + c
        self._store(state)
        # Keras's running averages over the epoch (weights changing as it goes), as fit reports them.
        return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}

    def evaluate(self, x, y) -> tuple[dict[str, float], np.ndarray]:
        """Loss and accuracy in inference mode on the current weights, and the probabilities."""
        tv, ntv, _ = self._state()
        loss, correct, probs = self._infer(tv, ntv, x, y)
        return {"loss": float(loss), "accuracy": int(correct) / len(y)}, np.asarray(probs)


_last_loop: list[CompiledLoop] = []  # one slot: a second loop for the same model compiles everything again


def compiled_loop(model: keras.Model, batch_size: int) -> CompiledLoop:
    """The model's CompiledLoop, reused by fit and the evaluations after it."""
    if not (_last_loop and _last_loop[0].model is model and _last_loop[0].bs == batch_size):
        _last_loop[:] = [CompiledLoop(model, batch_size)]
    return _last_loop[0]


def _callback_list(model, callbacks, epochs, steps) -> keras.callbacks.CallbackList:
    return keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=False, model=model, epochs=epochs, steps=steps, verbose=0)


def fit(
    model: keras.Model,
    train: Split,
    val: Split,
    params: Params,
    steps_per_epoch: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    history: History | None = None,
    on_epoch: Callable[[int, dict[str, float], History], None] | None = None,
) -> History:
    """Train ``model`` up to ``params.train.epochs`` epochs (fewer if a callback stops it).

    ``history`` holds epochs already run (a resumed run continues after them). ``on_epoch(epoch,
    logs, history)`` is called once per completed epoch, after the callbacks, with the logs
    both loops produce: loss, accuracy, val_loss, val_accuracy, learning_rate.
    """
    history = history if history is not None else History()
    plateau = plateau_callback(params)
    all_callbacks = [*([plateau] if plateau else []), *callbacks]
    if params.train.loop == "compiled":
        _fit_compiled(model, train, val, params, steps_per_epoch, all_callbacks, on_epoch, history)
    else:
        all_callbacks.insert(0, _LearningRateLog(steps_per_epoch))
        _fit_keras(model, train, val, params, all_callbacks, on_epoch, history)
    return history


def evaluate(model: keras.Model, split: Split, params: Params) -> dict[str, float]:
    """Loss and accuracy of the current weights in inference mode (dropout off, BN frozen)."""
    if params.train.loop == "compiled":
        logs, _ = compiled_loop(model, params.train.batch_size).evaluate(to_device(split.x), to_device(split.y))
        return logs
    loss, accuracy = model.evaluate(split.x, split.y, batch_size=EVAL_BATCH, verbose=0)
    return {"loss": float(loss), "accuracy": float(accuracy)}


def _fit_compiled(model, train, val, params, steps, callbacks, on_epoch, history):
    import jax.numpy as jnp

    loop = compiled_loop(model, params.train.batch_size)
    x, y, xv, yv = (to_device(a) for a in (train.x, train.y, val.x, val.y))
    cbs = _callback_list(model, callbacks, params.train.epochs, steps)
    model.stop_training = False
    cbs.on_train_begin()
    for epoch in range(len(history.epochs), params.train.epochs):
        cbs.on_epoch_begin(epoch)
        start = time.perf_counter()
        logs = loop.train_epoch(x, y, epoch_order(params.seed, epoch, len(train.y)))
        val_logs, _ = loop.evaluate(xv, yv)
        logs.update({f"val_{k}": v for k, v in val_logs.items()})
        logs["learning_rate"] = applied_learning_rate(model.optimizer, steps)
        history.seconds.append(time.perf_counter() - start)
        cbs.on_epoch_end(epoch, logs)
        _check_diverged(epoch, logs, params, model.output_shape[-1])
        history.epochs.append(dict(logs))
        if on_epoch:
            on_epoch(epoch, logs, history)
        if model.stop_training:
            break
    cbs.on_train_end()


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self, params, history, on_epoch) -> None:
        super().__init__()
        self.params_, self.history, self.on_epoch = params, history, on_epoch
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.history.seconds.append(time.perf_counter() - self._start)
        _check_diverged(epoch, logs, self.params_, self.model.output_shape[-1])
        self.history.epochs.append(logs)
        if self.on_epoch:
            self.on_epoch(epoch, logs, self.history)


def _fit_keras(model, train, val, params, callbacks, on_epoch, history):
    # Shuffled by Keras from the seeded NumPy generator; the reference, slower path.
    np.random.seed(params.seed)
    model.fit(
        train.x,
        train.y,
        batch_size=params.train.batch_size,
        epochs=params.train.epochs,
        initial_epoch=len(history.epochs),
        validation_data=(val.x, val.y),
        callbacks=[*callbacks, _EpochRecorder(params, history, on_epoch)],
        verbose=0,
    )


class DivergedError(OptlabError):
    """Training produced a NaN or infinite loss."""


def _check_diverged(epoch: int, logs: dict[str, float], params: Params, n_classes: int) -> None:
    """Stop a run whose loss is NaN/infinite, or far worse than knowing nothing.

    Keras clips probabilities inside the cross-entropy, so exploding weights often show as a
    large *finite* loss (up to -ln 1e-7 = 16 per example) at chance accuracy rather than NaN.
    A uniform guess scores ln(n_classes); an epoch averaging over 3x that has diverged.
    """
    limit = 3 * math.log(n_classes)
    bad = [k for k in ("loss", "val_loss") if k in logs and not (math.isfinite(logs[k]) and logs[k] <= limit)]
    if bad:
        lr = params.optimizer_args.learning_rate
        raise DivergedError(
            f"training diverged at epoch {epoch + 1}: {', '.join(f'{k} = {logs[k]:.4g}' for k in bad)} "
            f"(a uniform guess scores {math.log(n_classes):.3g}). The likely cause is a learning rate too high "
            f"for {params.optimizer} (optim.{params.optimizer}.learning_rate = {lr}); try 10x lower, "
            f"a warm-up (schedule=warmup_cosine), or batch normalization. No model or metrics were saved."
        )


def _read_aligned(path: Path, align: int = 64) -> np.ndarray:
    """Read a ``.npy`` file into a buffer aligned to ``align`` bytes.

    XLA:CPU adopts an aligned, C-contiguous host buffer without copying it (through DLPack),
    so the training data exists once in memory; ``np.load`` gives no alignment guarantee, and
    a memory map would keep its pages resident beside the copy.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype.hasobject:
            return np.load(path, allow_pickle=False)  # unusual layouts: plain load, one extra copy
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(nbytes + align, dtype=np.uint8)
        start = (-raw.ctypes.data) % align
        array = raw[start : start + nbytes].view(dtype).reshape(shape)
        if f.readinto(memoryview(raw[start : start + nbytes])) != nbytes:
            raise OptlabError(f"{path} is truncated; run `dvc repro` to prepare the data again")
    return array


def to_device(array: np.ndarray):
    """The array as a JAX array, sharing memory when the layout allows it."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        return jax.device_put(array)  # one copy, on the accelerator beside the model state
    if isinstance(array, np.ndarray) and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        try:
            return jax.dlpack.from_dlpack(array)
        except (TypeError, ValueError, RuntimeError):  # a build that cannot adopt host memory
            pass
    return jnp.asarray(array)


def load_split(directory: str | Path, split: str) -> Split:
    d = Path(directory)
    return Split(_read_aligned(d / f"x_{split}.npy"), _read_aligned(d / f"y_{split}.npy"))

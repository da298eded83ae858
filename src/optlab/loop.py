"""Training epoch by epoch, the same way on both loops.

- ``train.loop: compiled`` (JAX): optlab's epoch driver steps ``optlab.engine``'s XLA program
  once per epoch and calls the Keras callbacks between epochs, as ``fit`` would.
- ``train.loop: keras`` (any backend): Keras's own ``fit``, fed the same batches in the same
  order through a ``keras.utils.PyDataset``.

Both share the per-epoch bookkeeping below (the applied learning rate, the epoch's time, the
history, the divergence check, the caller's hook) as two Keras callbacks placed first and last,
so early stopping, ReduceLROnPlateau, checkpoints and the ``.keras`` file behave the same on
both. The batch order is a pure function of (seed, epoch), so a resumed run of either loop
sees exactly the batches an uninterrupted one would. Per-batch callbacks are not called by
the compiled loop (none of optlab's need them).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TextIO

from optlab.backend import require_chosen

require_chosen(__name__)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optlab import models, optim  # noqa: E402
from optlab.artifacts import Split  # noqa: E402
from optlab.backend import Engine, engine_for  # noqa: E402
from optlab.errors import OptlabError  # noqa: E402
from optlab.params import Params  # noqa: E402

EVAL_ROWS = models.INFERENCE_ROWS
PROBE_IMAGES = 1024  # validation images the dead-unit diagnostic looks at, the same ones every epoch


def to_device(array: np.ndarray):
    from optlab.engine import to_device as place  # the compiled loop's only: it imports JAX

    return place(array)


@dataclass
class History:
    """One entry per epoch run; ``learning_rate`` is the mean rate applied over that epoch."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    diverged: str = ""  # why training stopped at its last epoch, when it diverged (train.on_divergence: record)
    # Per epoch, layer -> {grad_norm, weight_norm, update_ratio, dead_fraction} (compiled loop).
    diagnostics: list[dict[str, dict[str, float | None]]] = field(default_factory=list)
    stopped: bool = False  # a callback (early stopping) or divergence ended it before train.epochs

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


class DivergedError(OptlabError):
    """Training produced a NaN or infinite loss, or one far worse than chance."""


def divergence(epoch: int, logs: dict[str, float], earlier: Sequence[dict[str, float]], params: Params,
               n_classes: int) -> str:  # fmt: skip
    """Why the epoch counts as diverged, with the likely cause; empty when it did not.

    Two ways to diverge:

    - exploding: a loss NaN or infinite, or far worse than knowing nothing. Keras clips
      probabilities inside the cross-entropy, so exploding weights often show as a large
      *finite* loss (up to -ln 1e-7 = 16 per example) rather than NaN. A uniform guess scores
      ln(n_classes); an epoch averaging over 3x that has exploded.
    - collapsing: back to chance after having learned: validation accuracy below 1.5x chance and
      validation loss no better than a uniform guess, when an ``earlier`` epoch did better than
      1.5x chance (a too-high rate kills the ReLU units: Adam at 0.1 on the default MLP). A slow
      run never falls back, so it is never stopped for being slow.
    """
    uniform, chance = math.log(n_classes), 1 / n_classes
    bad = [k for k in ("loss", "val_loss") if k in logs and not (math.isfinite(logs[k]) and logs[k] <= 3 * uniform)]
    if bad:
        what = f"diverged at epoch {epoch + 1}: {', '.join(f'{k} = {logs[k]:.4g}' for k in bad)}"
    elif (
        logs["val_accuracy"] < 1.5 * chance
        and logs["val_loss"] >= uniform
        and any(e["val_accuracy"] >= 1.5 * chance for e in earlier)
    ):
        best = max(e["val_accuracy"] for e in earlier)
        what = (
            f"collapsed at epoch {epoch + 1}: val accuracy fell from {best:.3f} to {logs['val_accuracy']:.3f} "
            f"(chance is {chance:.3f}) and val loss rose to {logs['val_loss']:.4g}"
        )
    else:
        return ""
    opt = params.optimizer
    return (
        f"training {what} (a uniform guess scores {uniform:.3g}). The likely cause is a learning rate too high "
        f"for {opt.name} (optimizer.learning_rate = {opt.learning_rate}); try 10x lower, "
        f"a warm-up (schedule=warmup_cosine), or batch normalization."
    )


OnEpoch = Callable[[int, dict[str, float], History], None]


def resolve_engine(params: Params) -> Engine:
    """The backend and loop ``params`` choose (``optlab.backend.engine_for``), which must be the
    backend Keras runs: the stage configured it from the same params."""
    chosen, running = engine_for(params), keras.backend.backend()
    if chosen.backend != running:
        why = f" ({chosen.rule})" if chosen.rule else ""
        raise OptlabError(
            f"params.yaml chooses the {chosen.backend} backend{why}, but Keras runs on {running}: call "
            "optlab.backend.configure(engine_for(params).backend) before importing Keras, or set train.backend"
        )
    return chosen


class Progress(keras.callbacks.Callback):
    """What the terminal shows while training: one line per epoch as it ends, and inside an epoch
    that takes more than a few seconds a bar at each quarter, flushed at once (DVC passes the
    stage's output through as it comes, and `dvc queue logs` keeps it)."""

    SLOW = 2.0  # seconds into the epoch before its first quarter mark: shorter epochs get no bar

    def __init__(self, epochs: int, stream: TextIO | None = None, prefix: str = "", suffix: str = "") -> None:
        """``prefix``/``suffix``: what each line starts and ends with (replica r of several trained
        one after another; the replicas' mean)."""
        super().__init__()
        self.epochs, self.stream = epochs, stream or sys.stdout
        self.prefix, self.suffix = prefix, suffix
        self.started, self.next_mark, self.width = 0.0, 0.25, len(str(epochs))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.started, self.next_mark = epoch, time.perf_counter(), 0.25

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done(batch + 1, self.params["steps"])

    def steps_done(self, done: int, total: int) -> None:
        if done >= total or done / total < self.next_mark:
            return
        elapsed = time.perf_counter() - self.started
        if elapsed >= self.SLOW * self.next_mark / 0.25:
            bar = "#" * round(20 * done / total)
            self._print(
                f"  epoch {self.epoch + 1:>{self.width}}/{self.epochs} [{bar:<20}] {done / total:4.0%} of {total:,} "
                f"steps, {elapsed:.1f} s"
            )
        while done / total >= self.next_mark:
            self.next_mark += 0.25

    def on_epoch_end(self, epoch, logs=None):
        lr = logs.get("learning_rate", math.nan)
        self._print(
            f"epoch {epoch + 1:>{self.width}}/{self.epochs}: loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.4f}; "
            f"val loss {logs['val_loss']:.4f}, val accuracy {logs['val_accuracy']:.4f}; lr {lr:.3g}; "
            f"{time.perf_counter() - self.started:.2f} s"
        )

    def _print(self, line: str) -> None:
        print(f"{self.prefix}{line}{self.suffix}", file=self.stream, flush=True)


class _EpochStart(keras.callbacks.Callback):
    """First in the list: starts the epoch's clock, and adds the applied learning rate to the
    logs before any other callback reads them (or ReduceLROnPlateau changes the rate)."""

    def __init__(self, rate: optim.AppliedRate, steps_per_epoch: int) -> None:
        super().__init__()
        self.rate, self.steps = rate, steps_per_epoch
        self.started, self.seconds = 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = self.rate.mean_over_last(self.steps)
        self.seconds = time.perf_counter() - self.started


class _EpochEnd(keras.callbacks.Callback):
    """Last in the list, after every callback acted on the epoch: checks divergence, records
    the epoch, and calls the caller's hook (the resume backup saves the state the next epoch
    starts from). A diverged epoch either stops the run with an error (train.on_divergence:
    fail) or is recorded and ends training after it (record)."""

    def __init__(
        self,
        start: _EpochStart,
        history: History,
        experiment: Params,
        on_epoch: OnEpoch | None,
        diagnostics: Callable[[], dict | None] | None = None,
    ) -> None:
        super().__init__()
        self.start, self.history, self.on_epoch, self.diagnostics = start, history, on_epoch, diagnostics
        self.experiment = experiment  # not `params`: Keras gives each callback a `params` dict of its own

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in logs.items()}
        why = divergence(epoch, logs, self.history.epochs, self.experiment, self.model.output_shape[-1])
        if why and self.experiment.train.on_divergence == "fail":
            raise DivergedError(f"{why} No model or metrics were saved (train.on_divergence: fail).")
        self.history.seconds.append(self.start.seconds)
        self.history.epochs.append(logs)
        found = self.diagnostics() if self.diagnostics is not None else None
        if found:
            self.history.diagnostics.append({k: asdict(v) for k, v in found.items()})
        if why:
            self.history.diverged = why
            self.model.stop_training = True
        self.history.stopped = bool(self.model.stop_training)
        if self.on_epoch:
            self.on_epoch(epoch, logs, self.history)


class KeepBest(keras.callbacks.Callback):
    """``train.keep_best``: after each epoch, a copy of the model's evaluation weights (what it is
    saved with; schedule-free AdamW's average) when ``monitor`` is the best so far. Kept in the
    resume backup, so a resumed run keeps the same best epoch as an uninterrupted one."""

    def __init__(self, monitor: str, weights: Callable[[], list[np.ndarray]]) -> None:
        super().__init__()
        self.monitor, self.weights = monitor, weights
        self.lower = optim.mode(monitor) == "min"
        self.best_value: float | None = None
        self.best: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.monitor, math.nan))
        if math.isfinite(value) and (
            self.best_value is None or (value < self.best_value if self.lower else value > self.best_value)
        ):
            self.best_value, self.best = value, self.weights()


class _EvaluationWeights(keras.callbacks.Callback):
    """The keras loop's validation on the evaluation weights (schedule-free AdamW's average x):
    swapped in when ``fit`` starts validating, the training weights back when it ends."""

    def __init__(self, loop: Loop) -> None:
        super().__init__()
        self.loop, self.training = loop, None

    def on_test_begin(self, logs=None):
        self.training = [v.value for v in self.model.trainable_variables]
        for var, value in zip(self.model.trainable_variables, self.loop.evaluation_weights(), strict=True):
            var.assign(value)

    def on_test_end(self, logs=None):
        for var, value in zip(self.model.trainable_variables, self.training, strict=True):
            var.assign(value)


class _Batches(keras.utils.PyDataset):
    """The keras loop's input: the batches of :func:`epoch_order`, epoch after epoch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch = first_epoch
        self.order = epoch_order(seed, first_epoch, len(y))

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]

    def on_epoch_begin(self):
        self.order = epoch_order(self.seed, self.epoch, len(self.y))

    def on_epoch_end(self):
        self.epoch += 1


def _tf_batches(train: Split, batch_size: int, seed: int, first_epoch: int, epochs: int):
    """The keras loop's input on TensorFlow: the same batches as :class:`_Batches`, gathered by
    index inside a ``tf.data`` pipeline instead of a Python generator. On the default CNN this
    runs each epoch about 5% faster than ``fit`` on arrays, and without a Python call per batch
    it does not stall when another thread holds the GIL."""
    import tensorflow as tf

    x, y = tf.constant(train.x), tf.constant(train.y)
    orders = tf.constant(np.stack([epoch_order(seed, e, len(train.y)) for e in range(first_epoch, epochs)]))
    per_epoch = tf.data.Dataset.range(epochs - first_epoch).flat_map(
        lambda e: tf.data.Dataset.from_tensor_slices(tf.gather(orders, e)).batch(batch_size)
    )
    return per_epoch.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx))).prefetch(2)


class Loop:
    """A compiled Keras model, its optimizer's learning rate, and the engine that steps it."""

    def __init__(
        self,
        model: keras.Model,
        params: Params,
        steps_per_epoch: int,
        rate: optim.AppliedRate,
        choice: Engine,
        engine: bool = True,
    ) -> None:
        """``engine``: build the compiled engine for this model (the replicas of a vectorized run
        share one instead)."""
        self.model, self.params, self.steps_per_epoch, self.rate = model, params, steps_per_epoch, rate
        self.choice = choice  # backend, loop and the rule that chose them (run.json records it)
        # Schedule-free AdamW's weights to evaluate and save; None: the training weights themselves.
        self.average = optim.evaluation_weights(model)
        self.finished = False  # finish() put the evaluation weights in the model
        self.engine = None
        if choice.loop == "compiled" and engine:
            from optlab.engine import CompiledEngine

            self.engine = CompiledEngine(
                model, params.train.batch_size, EVAL_ROWS, params.train.diagnostics, self.average
            )

    @classmethod
    def build(
        cls, params: Params, input_shape: Sequence[int], n_classes: int, n_train: int, engine: bool = True
    ) -> Loop:
        """The model and optimizer ``params`` describe, ready to train on ``n_train`` examples, on
        the backend Keras runs (``optlab.backend.configure`` chose it)."""
        steps = math.ceil(n_train / params.train.batch_size)  # the last batch may be partial
        rate = optim.build_schedule(params, steps)
        optimizer = optim.build_optimizer(params, rate, steps)
        model = models.build_model(params.model, input_shape, n_classes, params.seed)
        models.compile_model(model, optimizer)
        return cls(model, params, steps, optim.AppliedRate(optimizer, rate), resolve_engine(params), engine)

    def fit(
        self,
        train: Split,
        val: Split,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        history: History | None = None,
        on_epoch: OnEpoch | None = None,
        progress: Progress | None = None,
    ) -> History:
        """Train up to ``train.epochs`` epochs (fewer if a callback stops it, or it diverges).

        ``history`` holds epochs already run (a resumed run continues after them). ``on_epoch(
        epoch, logs, history)`` is called once per completed epoch, after the callbacks, with the
        logs both loops produce: loss, accuracy, val_loss, val_accuracy, learning_rate.
        ``progress`` prints as training goes (the train stage passes one; silent without).
        """
        history = history if history is not None else History()
        start = _EpochStart(self.rate, self.steps_per_epoch)
        found = (lambda: self.engine.last_epoch) if self.engine is not None and self.engine.diagnostics else None
        end = _EpochEnd(start, history, self.params, on_epoch, found)
        plateau = optim.plateau_callback(self.params)
        swap = [_EvaluationWeights(self)] if self.average and self.engine is None else []
        everything = [
            *swap, start, *([plateau] if plateau else []), *callbacks, *([progress] if progress else []), end
        ]  # fmt: skip
        if self.engine is not None:
            self.engine.probe = to_device(val.x[:PROBE_IMAGES])
        first, epochs = len(history.epochs), self.params.train.epochs
        if self.engine is None:
            bs, seed = self.params.train.batch_size, self.params.seed
            if keras.backend.backend() == "tensorflow":
                # TensorFlow's op determinism (optlab.backend.configure) wants a seed for any op
                # that draws from its global generator; optlab's own draws are all seeded already.
                keras.utils.set_random_seed(seed)
                batches = _tf_batches(train, bs, seed, first, epochs)
            else:
                batches = _Batches(train.x, train.y, bs, seed, first)
            self.model.fit(
                batches, epochs=epochs, initial_epoch=first, steps_per_epoch=self.steps_per_epoch, shuffle=False,
                validation_data=(val.x, val.y), validation_batch_size=EVAL_ROWS, callbacks=everything, verbose=0,
            )  # fmt: skip
        else:
            self._fit_compiled(train, val, everything, first)
        return history

    def _fit_compiled(self, train: Split, val: Split, callbacks: list, first: int) -> None:
        x, y, xv, yv = (to_device(a) for a in (train.x, train.y, val.x, val.y))
        epochs = self.params.train.epochs
        cbs = keras.callbacks.CallbackList(
            callbacks, model=self.model, epochs=epochs, steps=self.steps_per_epoch, verbose=0
        )
        self.model.stop_training = False
        cbs.on_train_begin()
        for epoch in range(first, epochs):
            cbs.on_epoch_begin(epoch)
            order = epoch_order(self.params.seed, epoch, len(train.y))
            # Between compiled calls (chunks of an epoch), as fit does between batches.
            logs = self.engine.train_epoch(x, y, order, on_progress=lambda done, _: cbs.on_train_batch_end(done - 1))
            val_logs, _ = self.engine.infer(xv, yv)
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
            cbs.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
        cbs.on_train_end()

    def evaluation_weights(self) -> list[np.ndarray]:
        """The trainable weights the model is evaluated and saved with, as arrays (the training
        weights, or schedule-free AdamW's average of them)."""
        values = [keras.ops.convert_to_numpy(v.value) for v in self.model.trainable_variables]
        if self.average is None or self.finished:
            return values
        return self.average(values, [keras.ops.convert_to_numpy(v.value) for v in self.model.optimizer.variables])

    def all_evaluation_weights(self) -> list[np.ndarray]:
        """Every weight of the model (``model.weights`` order) as it would be saved now."""
        trainable = dict(zip(map(id, self.model.trainable_variables), self.evaluation_weights(), strict=True))
        return [trainable.get(id(v), keras.ops.convert_to_numpy(v.value)) for v in self.model.weights]

    def finish(self, keep_best: KeepBest | None = None) -> None:
        """After training: put the weights to save in the model (keep_best's best epoch, or the
        evaluation weights of the last); the optimizer's state no longer matches them."""
        weights = keep_best.best if keep_best is not None and keep_best.best is not None else None
        weights = weights if weights is not None else self.all_evaluation_weights()
        for var, value in zip(self.model.weights, weights, strict=True):
            var.assign(value)
        self.finished = True

    def measure(self, split: Split) -> dict[str, float]:
        """Loss and accuracy of the weights to save, in inference mode (dropout off, BN frozen)."""
        if self.engine is None:
            loss, accuracy = self.model.evaluate(split.x, split.y, batch_size=EVAL_ROWS, verbose=0)
            return {"loss": float(loss), "accuracy": float(accuracy)}
        logs, _ = self.engine.infer(to_device(split.x), to_device(split.y), as_they_are=self.finished)
        return logs


# --- replicas: one variant, several seeds, trained together --------------------------------
def replica_params(params: Params, r: int) -> Params:
    """Replica r of ``params`` is the run with ``seed + r``: its own initial weights, dropout stream
    and batch order, and exactly the experiment a separate run with that seed would be."""
    return params.model_copy(update={"seed": params.seed + r})


class Replicas:
    """``train.replicas`` runs of one variant, replica r with seed ``seed + r`` (:func:`replica_params`).

    On the compiled loop they train as one program (optlab.engine vectorizes every function over
    the replicas), each with its own callbacks: early stopping, keep-best, ReduceLROnPlateau and
    the divergence check act per replica as in a single run; a replica that stops keeps its state
    while the others go on. On the keras loop, Keras's ``fit`` trains them one after another.
    One replica is exactly the single run it always was.
    """

    def __init__(self, loops: list[Loop]) -> None:
        self.loops = loops
        self.engine = None
        lead = loops[0]
        if lead.choice.loop == "compiled" and len(loops) > 1:
            from optlab.engine import CompiledEngine

            p = lead.params.train
            self.engine = CompiledEngine(
                [lp.model for lp in loops], p.batch_size, EVAL_ROWS, p.diagnostics, lead.average
            )

    @classmethod
    def build(cls, params: Params, input_shape: Sequence[int], n_classes: int, n_train: int) -> Replicas:
        vectorized = params.train.replicas > 1
        loops = [
            Loop.build(replica_params(params, r), input_shape, n_classes, n_train, engine=not vectorized)
            for r in range(params.train.replicas)
        ]
        return cls(loops)

    @property
    def models(self) -> list[keras.Model]:
        return [lp.model for lp in self.loops]

    def fit(
        self,
        train: Split,
        val: Split,
        callbacks: Sequence[Sequence[keras.callbacks.Callback]],
        histories: Sequence[History] | None = None,
        on_epoch: Callable[[int, int, dict, History], None] | None = None,
        progress: Callable[[int], Progress] | None = None,
        after_epoch: Callable[[int], None] | None = None,
    ) -> list[History]:
        """Train every replica (``callbacks[r]`` are replica r's own) up to ``train.epochs`` epochs.
        ``histories`` continue resumed runs; ``on_epoch(r, epoch, logs, history)`` follows each
        replica's every epoch, and ``after_epoch(epoch)`` each epoch once every model and history
        agree on it (the moment to save a resume backup); ``progress(r)`` makes what prints replica
        r's lines (several replicas in one program: one, ``progress(-1)``, prints their mean)."""
        histories = list(histories) if histories is not None else [History() for _ in self.loops]

        def hook(r):
            def both(epoch, logs, history):
                if on_epoch is not None:
                    on_epoch(r, epoch, logs, history)
                if after_epoch is not None:  # only replica r moved: everything agrees
                    after_epoch(epoch)

            return both

        if self.engine is None:  # one replica, or the keras loop: each trains as a single run
            for r, (lp, cbs, history) in enumerate(zip(self.loops, callbacks, histories, strict=True)):
                if not (history.stopped or len(history.epochs) >= lp.params.train.epochs):
                    lp.fit(train, val, cbs, history, hook(r), progress(r) if progress else None)
            return histories
        self._fit_vectorized(
            train, val, callbacks, histories, on_epoch, after_epoch, progress(-1) if progress else None
        )
        return histories

    def _fit_vectorized(self, train, val, callbacks, histories, on_epoch, after_epoch, progress) -> None:
        engine, loops = self.engine, self.loops
        x, y, xv, yv = (to_device(a) for a in (train.x, train.y, val.x, val.y))
        engine.probe = to_device(val.x[:PROBE_IMAGES])
        epochs, steps = loops[0].params.train.epochs, loops[0].steps_per_epoch
        diagnosed: dict[int, dict] = {}
        lists = []
        for r, (lp, cbs, history) in enumerate(zip(loops, callbacks, histories, strict=True)):
            start = _EpochStart(lp.rate, steps)
            found = (lambda r=r: diagnosed.get(r)) if engine.diagnostics else None
            end = _EpochEnd(start, history, lp.params, None, found)
            plateau = optim.plateau_callback(lp.params)
            lists.append(
                keras.callbacks.CallbackList(
                    [start, *([plateau] if plateau else []), *cbs, end], model=lp.model, epochs=epochs, steps=steps
                )
            )
            lp.model.stop_training = False
            lists[-1].on_train_begin()
        first = min((len(h.epochs) for h in histories if not h.stopped), default=epochs)
        for epoch in range(first, epochs):
            active = [r for r, h in enumerate(histories) if not h.stopped]
            if not active:
                break
            for r in active:
                lists[r].on_epoch_begin(epoch)
            if progress is not None:
                progress.on_epoch_begin(epoch)
            orders = np.stack([epoch_order(lp.params.seed, epoch, len(train.y)) for lp in loops])
            tick = (lambda done, total: progress.steps_done(done, total)) if progress is not None else None
            logs = engine.train_epoch(x, y, orders, on_progress=tick, replicas=active)
            vals = engine.infer(xv, yv)
            if engine.diagnostics:
                diagnosed.update(enumerate(engine.last_epoch))
            for r in active:
                logs[r].update({f"val_{k}": v for k, v in vals[r][0].items()})
                lists[r].on_epoch_end(epoch, logs[r])
            # Every active replica's model and history now hold this epoch: the hooks see them agree.
            for r in active:
                if on_epoch is not None:
                    on_epoch(r, epoch, histories[r].epochs[-1], histories[r])
            if after_epoch is not None:
                after_epoch(epoch)
            if progress is not None:  # the epoch as each replica recorded it (learning rate included)
                done = [histories[r].epochs[-1] for r in active]
                progress.on_epoch_end(epoch, {k: float(np.mean([d[k] for d in done])) for k in done[0]})
        for cbs in lists:
            cbs.on_train_end()

    def finish(self, keep_bests: Sequence[KeepBest | None]) -> None:
        for lp, keep in zip(self.loops, keep_bests, strict=True):
            lp.finish(keep)

    def measure(self, split: Split) -> list[dict[str, float]]:
        """Each replica's loss and accuracy on the weights to save, in inference mode."""
        if self.engine is None:
            return [lp.measure(split) for lp in self.loops]
        finished = all(lp.finished for lp in self.loops)
        return [logs for logs, _ in self.engine.infer(to_device(split.x), to_device(split.y), as_they_are=finished)]

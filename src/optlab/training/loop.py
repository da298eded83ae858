"""The one epoch driver (:func:`fit`), for both loops and any number of members.

A run trains ``train.replicas`` *members*: the variant with seeds seed, seed + 1, ... (one
member is one ordinary run). Each epoch, :func:`fit` asks a trainer to train the active members
for one epoch and to validate them, then, per member and in this order, adds the learning rate
the optimizer applied, runs the member's Keras callbacks (early stopping, ReduceLROnPlateau,
keep-best, TensorBoard), checks divergence and records the epoch in its :class:`History`. Two
trainers step an epoch:

- :class:`CompiledTrainer` (``train.loop: compiled``, JAX): every member in one XLA program per
  epoch (``optlab.training.engine``);
- :class:`KerasTrainer` (``train.loop: keras``, any backend): Keras's own ``fit``, one epoch at a
  time per member, fed the same batches in the same order.

The batch order is a pure function of (seed, epoch), so a resumed run of either loop sees
exactly the batches an uninterrupted one would. Per-batch callbacks are not called by the
compiled loop (none of optlab's need them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from optlab.core.errors import OptlabError
from optlab.core.params import Params
from optlab.data.files import Split
from optlab.training import models, optimizers, schedules
from optlab.training.backend import Engine, engine_for, keras
from optlab.training.callbacks import KeepBest, Progress

EVAL_ROWS = models.INFERENCE_ROWS
PROBE_IMAGES = 1024  # validation images the dead-unit diagnostic looks at, the same ones every epoch


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


def resolve_engine(params: Params) -> Engine:
    """The backend and loop ``params`` choose (``optlab.training.backend.engine_for``), which must
    be the backend Keras runs: the stage configured it from the same params."""
    chosen, running = engine_for(params), keras.backend.backend()
    if chosen.backend != running:
        why = f" ({chosen.rule})" if chosen.rule else ""
        raise OptlabError(
            f"params.yaml chooses the {chosen.backend} backend{why}, but Keras runs on {running}: call "
            "optlab.training.backend.configure(engine_for(params).backend) before importing Keras, or set train.backend"
        )
    return chosen


# --- a member: one model of the run -----------------------------------------------------------
def member_params(params: Params, m: int) -> Params:
    """Member m of a run: the group's rate m // R (``optimizer.learning_rate``: one rate or a list of
    them) with the seed ``seed + m % R`` (R = ``train.replicas``): its own initial weights, dropout
    stream and batch order, exactly the experiment a separate run with that rate and seed would be."""
    rates, replicas = params.optimizer.rates, params.train.replicas
    optimizer = params.optimizer.model_copy(update={"learning_rate": rates[m // replicas]})
    return params.model_copy(update={"seed": params.seed + m % replicas, "optimizer": optimizer})


def member_count(params: Params) -> int:
    return len(params.optimizer.rates) * params.train.replicas


def replica_params(params: Params, r: int) -> Params:
    """Replica r of a one-rate run: the run with ``seed + r``."""
    return member_params(params, r)


@dataclass(eq=False)
class Member:
    """One model of a run, compiled with its optimizer, and what it has trained so far."""

    params: Params
    model: keras.Model
    rate: schedules.AppliedRate
    history: History = field(default_factory=History)
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)
    keep_best: KeepBest | None = None
    finished: bool = False  # finish() put the weights to save in the model

    @classmethod
    def build(cls, params: Params, input_shape: Sequence[int], n_classes: int, steps_per_epoch: int,
              rate: schedules.Rate | None = None, peaked: bool = False) -> Member:  # fmt: skip
        """The model and optimizer ``params`` describe (the learning rate ``rate``, or the one
        ``params.schedule`` makes), on the backend Keras runs: for training and the range test.
        ``peaked``: a member of a group of rates, whose schedule's peak must be an optimizer
        variable, so that one compiled program steps members of different rates."""
        rate = schedules.build(params, steps_per_epoch) if rate is None else rate
        if peaked and isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = schedules.Peaked(rate)  # its peak a variable of the optimizer: one per member
        optimizer = optimizers.build(params, rate, steps_per_epoch)
        if isinstance(rate, schedules.Peaked):
            rate.attach(optimizer)
        model = models.build_model(params.model, input_shape, n_classes, params.seed)
        models.compile_model(model, optimizer)
        return cls(params, model, schedules.AppliedRate(optimizer, rate))

    @property
    def average(self) -> Callable | None:
        """Schedule-free AdamW's evaluation weights from (trainable, optimizer) arrays; else None."""
        return optimizers.evaluation_weights(self.model)

    def evaluation_weights(self) -> list[np.ndarray]:
        """The trainable weights the model is evaluated and saved with (the training weights, or
        schedule-free AdamW's average of them)."""
        values = [keras.ops.convert_to_numpy(v.value) for v in self.model.trainable_variables]
        average = self.average
        if average is None or self.finished:
            return values
        return average(values, [keras.ops.convert_to_numpy(v.value) for v in self.model.optimizer.variables])

    def all_evaluation_weights(self) -> list[np.ndarray]:
        """Every weight of the model (``model.weights`` order) as it would be saved now."""
        trainable = dict(zip(map(id, self.model.trainable_variables), self.evaluation_weights(), strict=True))
        return [trainable.get(id(v), keras.ops.convert_to_numpy(v.value)) for v in self.model.weights]

    def finish(self) -> None:
        """After training: put the weights to save in the model (keep_best's best epoch, or the
        evaluation weights of the last); the optimizer's state no longer matches them."""
        kept = self.keep_best.best if self.keep_best is not None else None
        for var, value in zip(self.model.weights, kept if kept is not None else self.all_evaluation_weights(),
                              strict=True):  # fmt: skip
            var.assign(value)
        self.finished = True


# --- the trainers: one epoch of the active members ----------------------------------------------
class CompiledTrainer:
    """Every member in one compiled program per epoch (``optlab.training.engine.Engine``)."""

    def __init__(self, members: Sequence[Member], train: Split, val: Split, diagnostics: bool) -> None:
        from optlab.training import engine

        self.members = list(members)
        self.engine = engine.Engine([m.model for m in members], members[0].params.train.batch_size, EVAL_ROWS,
                                    diagnostics, members[0].average)  # fmt: skip
        self.x, self.y, self.xv, self.yv = (engine.to_device(a) for a in (train.x, train.y, val.x, val.y))
        self.engine.probe = engine.to_device(val.x[:PROBE_IMAGES])
        self.to_device, self.n = engine.to_device, len(train.y)
        self.steps_per_epoch = math.ceil(self.n / members[0].params.train.batch_size)  # the last may be partial

    def train_epoch(self, epoch: int, active: Sequence[int], tick: Callable[[int, int], None] | None):
        seeds = {m.params.seed for m in self.members}
        if len(seeds) == 1:  # a group of rates on one seed: one batch order for all
            orders = epoch_order(seeds.pop(), epoch, self.n)
        else:
            orders = np.stack([epoch_order(m.params.seed, epoch, self.n) for m in self.members])
        logs = self.engine.train_epoch(self.x, self.y, orders, on_progress=tick, members=active)
        return [logs[r] for r in active]

    def validate(self, active: Sequence[int]) -> list[dict[str, float]]:
        found = self.engine.infer(self.xv, self.yv)
        return [found[r][0] for r in active]

    def diagnosed(self, active: Sequence[int]) -> list[dict | None]:
        """Per active member, the epoch's diagnostics: layer -> its LayerDiagnostics as a dict, and
        the whole model's series (sharpness, noise scale, ...: optlab.training.hessian) as floats
        at the top level, when measured this epoch."""
        last = self.engine.last_epoch if self.engine.diagnostics else []
        if not last:
            return [None] * len(active)
        from optlab.training.hessian import Settings

        first = self.members[active[0]]  # the active members are all at one epoch
        rates = [m.rate.mean_over_last(self.steps_per_epoch) for m in self.members]  # the epoch's, as fit logs
        whole = self.engine.curvature(self.x, self.y, Settings.of(first.params.train), len(first.history.epochs),
                                      rates)  # fmt: skip
        return [{**{k: asdict(v) for k, v in last[r].items()}, **(whole[r] if whole else {})} for r in active]

    def measure(self, split: Split) -> list[dict[str, float]]:
        finished = all(m.finished for m in self.members)
        x, y = self.to_device(split.x), self.to_device(split.y)
        return [logs for logs, _ in self.engine.infer(x, y, as_they_are=finished)]


class KerasTrainer:
    """Keras's own ``fit``: one epoch at a time, member after member, on the batches of
    :func:`epoch_order` (a ``tf.data`` pipeline gathering them by index on TensorFlow)."""

    def __init__(self, members: Sequence[Member], train: Split, val: Split) -> None:
        self.members, self.train, self.val = list(members), train, val
        self._tensors = None  # the training data as TensorFlow tensors, once (tensorflow backend)
        self.steps_per_epoch = math.ceil(len(train.y) / members[0].params.train.batch_size)
        for m in members:  # its variables now, outside any compiled function (Keras builds them lazily)
            m.model.optimizer.build(m.model.trainable_variables)
        if keras.backend.backend() == "tensorflow":
            # TensorFlow's op determinism (optlab.training.backend.configure) wants a seed for any op
            # that draws from its global generator; optlab's own draws are all seeded already.
            keras.utils.set_random_seed(members[0].params.seed)

    def _batches(self, m: Member, epoch: int):
        bs, order = m.params.train.batch_size, epoch_order(m.params.seed, epoch, len(self.train.y))
        if keras.backend.backend() != "tensorflow":
            return _Batches(self.train.x, self.train.y, bs, order)
        import tensorflow as tf  # gathered by index inside tf.data: no Python call per batch, no stall on the GIL

        if self._tensors is None:  # the data once, as TensorFlow tensors
            self._tensors = tf.constant(self.train.x), tf.constant(self.train.y)
        x, y = self._tensors
        batches = tf.data.Dataset.from_tensor_slices(order).batch(bs)
        return batches.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx))).prefetch(2)

    def train_epoch(self, epoch: int, active: Sequence[int], tick: Callable[[int, int], None] | None):
        steps, found = self.steps_per_epoch, []
        for i, r in enumerate(active):
            ticks = [_Ticks(tick, i * steps, len(active) * steps)] if tick else []
            history = self.members[r].model.fit(self._batches(self.members[r], epoch), epochs=1, shuffle=False,
                                                steps_per_epoch=steps, callbacks=ticks, verbose=0)  # fmt: skip
            found.append({k: float(v[-1]) for k, v in history.history.items()})
        return found

    def _evaluate(self, m: Member, split: Split, swap: bool) -> dict[str, float]:
        training = [keras.ops.convert_to_numpy(v.value) for v in m.model.trainable_variables]  # a copy: on
        # TensorFlow, a variable's value is the variable itself
        if swap and m.average is not None:  # validate schedule-free AdamW at its average x
            for var, value in zip(m.model.trainable_variables, m.evaluation_weights(), strict=True):
                var.assign(value)
        try:
            logs = m.model.evaluate(split.x, split.y, batch_size=EVAL_ROWS, verbose=0, return_dict=True)
        finally:
            if swap and m.average is not None:
                for var, value in zip(m.model.trainable_variables, training, strict=True):
                    var.assign(value)
        return {k: float(v) for k, v in logs.items()}

    def validate(self, active: Sequence[int]) -> list[dict[str, float]]:
        return [self._evaluate(self.members[r], self.val, swap=True) for r in active]

    def diagnosed(self, active: Sequence[int]) -> list[None]:
        return [None] * len(active)

    def measure(self, split: Split) -> list[dict[str, float]]:
        return [self._evaluate(m, split, swap=not m.finished) for m in self.members]


def trainer_for(members: Sequence[Member], train: Split, val: Split) -> CompiledTrainer | KerasTrainer:
    """The trainer of the loop the members' params choose (``train.loop``, resolved for the backend
    Keras runs: :func:`resolve_engine`)."""
    params = members[0].params
    if resolve_engine(params).loop == "compiled":
        return CompiledTrainer(members, train, val, params.train.diagnostics)
    return KerasTrainer(members, train, val)


class _Batches(keras.utils.PyDataset):
    """One epoch's batches, in ``order``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, order: np.ndarray) -> None:
        super().__init__()
        self.x, self.y, self.batch_size, self.order = x, y, batch_size, order

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, i: int):
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


class _Ticks(keras.callbacks.Callback):
    """Keras's batches, counted into the epoch's progress (``offset``: steps of the members before)."""

    def __init__(self, tick: Callable[[int, int], None], offset: int, total: int) -> None:
        super().__init__()
        self.tick, self.offset, self.total = tick, offset, total

    def on_train_batch_end(self, batch, logs=None):
        self.tick(self.offset + batch + 1, self.total)


# --- the driver ----------------------------------------------------------------------------
def fit(members: Sequence[Member], trainer: CompiledTrainer | KerasTrainer, progress: Progress | None = None,
        after_epoch: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Train every member up to ``train.epochs`` epochs (a member stops early when a callback stops
    it or it diverges; one resumed from a backup continues after the epochs its history holds).
    ``after_epoch(epoch)`` runs once every member's model and history hold the epoch (the moment
    to log it and save a resume backup); ``progress`` prints as training goes."""
    epochs, steps = members[0].params.train.epochs, trainer.steps_per_epoch
    lists = [keras.callbacks.CallbackList(m.callbacks, model=m.model, epochs=epochs, steps=steps) for m in members]
    for m, callbacks in zip(members, lists, strict=True):
        m.model.stop_training = m.history.stopped
        callbacks.on_train_begin()
    first = min((len(m.history.epochs) for m in members if not m.history.stopped), default=epochs)
    for epoch in range(first, epochs):
        active = [r for r, m in enumerate(members) if not m.history.stopped]
        if not active:
            break
        for r in active:
            lists[r].on_epoch_begin(epoch)
        if progress is not None:
            progress.on_epoch_begin(epoch)
        started = time.perf_counter()
        trained = trainer.train_epoch(epoch, active, progress.steps_done if progress is not None else None)
        validated = trainer.validate(active)
        seconds = time.perf_counter() - started
        for r, logs, val, diagnosed in zip(active, trained, validated, trainer.diagnosed(active), strict=True):
            m = members[r]
            # The rate applied over the epoch, before a callback (ReduceLROnPlateau) changes it.
            logs = {"loss": logs["loss"], **{k: logs[k] for k in models.EPOCH_METRICS},
                    **{f"val_{k}": val[k] for k in ("loss", *models.EPOCH_METRICS)},
                    "learning_rate": m.rate.mean_over_last(steps)}  # fmt: skip
            lists[r].on_epoch_end(epoch, logs)
            _record(m, epoch, logs, seconds, diagnosed)
        if after_epoch is not None:
            after_epoch(epoch)
        if progress is not None:  # the epoch as each member recorded it
            done = [members[r].history.epochs[-1] for r in active]
            progress.on_epoch_end(epoch, {k: float(np.mean([d[k] for d in done])) for k in done[0]})
    for callbacks in lists:
        callbacks.on_train_end()


def _record(m: Member, epoch: int, logs: dict[str, float], seconds: float, diagnosed: dict | None) -> None:
    """Check the epoch for divergence, after every callback acted on it, and record it. A diverged
    epoch either stops the run with an error (train.on_divergence: fail) or is recorded and ends
    the member's training after it (record)."""
    logs = {k: float(v) for k, v in logs.items()}
    why = divergence(epoch, logs, m.history.epochs, m.params, m.model.output_shape[-1])
    if why and m.params.train.on_divergence == "fail":
        raise DivergedError(f"{why} No model or metrics were saved (train.on_divergence: fail).")
    m.history.seconds.append(seconds)
    m.history.epochs.append(logs)
    if diagnosed:
        m.history.diagnostics.append(diagnosed)
    if why:
        m.history.diverged = why
        m.model.stop_training = True
    m.history.stopped = bool(m.model.stop_training)

"""Learning-rate schedules, chosen by name: ``SCHEDULES[params.schedule.name]``.

Each turns the optimizer's ``learning_rate`` and the ``schedule`` knobs (in epochs, what people
reason in; converted to steps here) into a float or a ``keras.optimizers.schedules`` object that
the optimizer steps once per batch. The caller keeps the schedule to log the rate the optimizer
really applied (:class:`AppliedRate`). Adding a schedule: a function here, its line in
:data:`SCHEDULES`, and its file in ``conf/schedule/`` (docs/extending.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from optlab.core.params import Params
from optlab.training.backend import keras

schedules = keras.optimizers.schedules

Rate = float | schedules.LearningRateSchedule


def _constant(lr: float, args, steps_per_epoch: int, epochs: int) -> float:
    return lr


def _plateau(lr: float, args, steps_per_epoch: int, epochs: int) -> float:
    # The rate itself stays a plain variable: keras.callbacks.ReduceLROnPlateau cuts it.
    return lr


def _step(lr: float, args, steps_per_epoch: int, epochs: int) -> schedules.LearningRateSchedule:
    every = args.every_epochs * steps_per_epoch  # steps between drops
    n_drops = max(1, epochs // args.every_epochs)
    # PiecewiseConstantDecay keeps values[i] while step <= boundaries[i]: the last step of a
    # block is every*k - 1, so the drop lands on the first step of the next epoch block.
    boundaries = [every * k - 1 for k in range(1, n_drops + 1)]
    values = [lr * args.factor**k for k in range(n_drops + 1)]
    return schedules.PiecewiseConstantDecay(boundaries, values)


def _exponential(lr: float, args, steps_per_epoch: int, epochs: int) -> schedules.LearningRateSchedule:
    return schedules.ExponentialDecay(lr, decay_steps=steps_per_epoch, decay_rate=args.rate_per_epoch)


def _cosine(lr: float, args, steps_per_epoch: int, epochs: int) -> schedules.LearningRateSchedule:
    return schedules.CosineDecay(lr, decay_steps=steps_per_epoch * epochs, alpha=args.alpha)


def _warmup_cosine(lr: float, args, steps_per_epoch: int, epochs: int) -> schedules.LearningRateSchedule:
    # 1) linear warm-up from ~0 to lr over warmup_epochs, 2) cosine decay over the rest.
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    decay = max(1, steps_per_epoch * epochs - warmup)
    return schedules.CosineDecay(
        lr / warmup, decay_steps=decay, alpha=args.alpha, warmup_target=lr, warmup_steps=warmup
    )


# --- the schedules a 2026 study compares: one Keras schedule class, a formula per name -----------
@keras.saving.register_keras_serializable(package="optlab")
class Shaped(schedules.LearningRateSchedule):
    """``peak`` x the shape ``kind`` of the step, after an optional linear warm-up of ``warmup``
    steps (from peak / warmup at step 0 to peak), over ``total`` steps. Written with keras.ops, so
    it runs inside the compiled epoch and in Keras's ``fit`` alike; its formulas are tested value by
    value (tests/test_train.py)."""

    def __init__(self, kind: str, peak: float, total: int, warmup: int = 0, **knobs) -> None:
        self.kind, self.peak, self.total, self.warmup, self.knobs = kind, float(peak), int(total), int(warmup), knobs

    def __call__(self, step):
        ops = keras.ops
        s = ops.cast(step, "float32")
        after = ops.maximum(s - self.warmup, 0.0)  # steps since the warm-up ended
        span = float(max(self.total - self.warmup, 1))  # the steps the shape spans
        value = SHAPES[self.kind](ops, after, span, self.warmup, **self.knobs)
        if self.warmup > 0:
            value = ops.where(s < self.warmup, (s + 1.0) / self.warmup, value)
        return self.peak * value

    def get_config(self) -> dict:
        return {"kind": self.kind, "peak": self.peak, "total": self.total, "warmup": self.warmup, **self.knobs}


def _linear(ops, t, span, warmup):
    """Linear decay to zero at the end of training."""
    return ops.maximum(1.0 - t / span, 0.0)


def _wsd(ops, t, span, warmup, decay_fraction, cooldown):
    """Warmup-stable-decay (Hägele et al. 2024): the peak rate, then a cooldown to zero over the
    last ``decay_fraction`` of the steps after the warm-up: linear, cosine or 1 - sqrt."""
    decay = max(decay_fraction * span, 1.0)
    x = ops.clip((t - (span - decay)) / decay, 0.0, 1.0)  # 0 until the cooldown starts, 1 at the end
    falls = {"linear": 1.0 - x, "cosine": 0.5 * (1.0 + ops.cos(math.pi * x)), "sqrt": 1.0 - ops.sqrt(x)}
    return falls[cooldown]


def _one_cycle(ops, t, span, warmup, warmup_fraction, start_factor, end_factor):
    """One-cycle (Smith & Topin 2019, PyTorch's OneCycleLR with cosine annealing): from
    start_factor x peak up to the peak over warmup_fraction of the steps, then down to
    end_factor x peak, both halves as half cosines."""
    rise = max(warmup_fraction * span, 1.0)
    up = ops.clip(t / rise, 0.0, 1.0)
    down = ops.clip((t - rise) / max(span - rise, 1.0), 0.0, 1.0)
    rising = start_factor + (1.0 - start_factor) * 0.5 * (1.0 - ops.cos(math.pi * up))
    falling = end_factor + (1.0 - end_factor) * 0.5 * (1.0 + ops.cos(math.pi * down))
    return ops.where(t < rise, rising, falling)


def _inverse_sqrt(ops, t, span, warmup):
    """Warm-up, then the peak x sqrt(warmup / step) (Vaswani et al. 2017)."""
    w = float(max(warmup, 1))
    return ops.sqrt(w / (t + w))


def _cyclical(ops, t, span, warmup, half_cycle_steps, low_factor):
    """Triangular cyclical rates (Smith 2017): from low_factor x peak up to the peak and back every
    2 x half_cycle_steps steps, starting low."""
    x = ops.abs(t / half_cycle_steps - 2.0 * ops.floor(1.0 + t / (2.0 * half_cycle_steps)) + 1.0)
    return low_factor + (1.0 - low_factor) * ops.maximum(1.0 - x, 0.0)


SHAPES: dict[str, Callable] = {
    "linear_decay": _linear, "wsd": _wsd, "one_cycle": _one_cycle, "inverse_sqrt": _inverse_sqrt, "cyclical": _cyclical,
}  # fmt: skip


def _shaped(kind: str) -> Callable[..., Rate]:
    def build(lr: float, args, steps_per_epoch: int, epochs: int) -> Shaped:
        knobs = args.model_dump(exclude={"name", "warmup_epochs"})
        for key in [k for k in knobs if k.endswith("_epochs")]:  # in epochs; the formula counts steps
            knobs[f"{key[: -len('_epochs')]}_steps"] = knobs.pop(key) * steps_per_epoch
        warmup = round(getattr(args, "warmup_epochs", 0.0) * steps_per_epoch)
        return Shaped(kind, lr, steps_per_epoch * epochs, warmup, **knobs)

    return build


SCHEDULES: dict[str, Callable[..., Rate]] = {
    "constant": _constant,
    "step": _step,
    "exponential": _exponential,
    "cosine": _cosine,
    "warmup_cosine": _warmup_cosine,
    "plateau": _plateau,
    **{name: _shaped(name) for name in SHAPES},
}


@keras.saving.register_keras_serializable(package="optlab")
class Peaked(schedules.LearningRateSchedule):
    """A schedule whose peak rate is a variable of the optimizer (:meth:`attach`): ``schedule(step) x
    peak / schedule's own peak``. Keras's schedules hold their rates as Python numbers, which one
    compiled program for several members (a group of rates) would share; the optimizer's variables
    are each member's own. For one member the factor is exactly 1."""

    def __init__(self, schedule: schedules.LearningRateSchedule, peak: float | None = None) -> None:
        self.schedule, self.peak = schedule, float(peak if peak is not None else _peak_of(schedule))
        self.variable = None

    def attach(self, optimizer: keras.optimizers.Optimizer) -> None:
        self.variable = optimizer.add_variable(shape=(), initializer=keras.initializers.Constant(self.peak),
                                               dtype="float32", name="peak_learning_rate")  # fmt: skip

    def __call__(self, step):
        scale = 1.0 if self.variable is None else self.variable.value / self.peak
        return self.schedule(step) * scale

    def get_config(self) -> dict:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "peak": self.peak}

    @classmethod
    def from_config(cls, config: dict) -> Peaked:
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["peak"])


def _peak_of(schedule: schedules.LearningRateSchedule) -> float:
    """The rate a schedule of optlab's was built from (its ``peak``, or Keras's initial/target rate)."""
    for attr in ("peak", "warmup_target", "initial_learning_rate"):
        value = getattr(schedule, attr, None)
        if isinstance(value, int | float) and value:
            return float(value)
    if isinstance(schedule, schedules.PiecewiseConstantDecay):
        return float(schedule.values[0])
    raise TypeError(f"no peak rate known for {type(schedule).__name__}")


def build(params: Params, steps_per_epoch: int) -> Rate:
    """The learning rate ``params.schedule`` makes of the optimizer's ``learning_rate``."""
    lr = params.optimizer.learning_rate
    return SCHEDULES[params.schedule.name](lr, params.schedule, steps_per_epoch, params.train.epochs)


class AppliedRate:
    """The mean learning rate an optimizer applied over its last steps (one epoch's).

    A schedule changes the rate every step (a warm-up ramps within the first epoch), so the
    epoch's mean is what the per-epoch curve shows. A plain rate (constant, or cut by
    ReduceLROnPlateau between epochs) is read from the optimizer.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, rate: Rate) -> None:
        self.optimizer, self.schedule = optimizer, rate
        self._many = None
        if isinstance(rate, schedules.LearningRateSchedule) and keras.backend.backend() == "jax":
            import jax

            # Called eagerly, a schedule compiles a fresh `cond` on every call: ~2 s per epoch.
            self._many = jax.jit(jax.vmap(rate))

    def mean_over_last(self, steps: int) -> float:
        if not isinstance(self.schedule, schedules.LearningRateSchedule):
            return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        end = int(keras.ops.convert_to_numpy(self.optimizer.iterations))
        at = np.arange(max(0, end - steps), max(end, 1), dtype="float32")
        if self._many is not None:
            return float(np.mean(np.asarray(self._many(at))))
        # Other backends: the mean over up to 32 evenly spaced steps (exact for constant pieces).
        sample = np.unique(np.linspace(at[0], at[-1], num=min(len(at), 32)).round())
        return float(np.mean([float(keras.ops.convert_to_numpy(self.schedule(float(s)))) for s in sample]))

"""Optimizers and learning-rate schedules, chosen by name.

``build_optimizer`` turns params into a Keras optimizer whose ``learning_rate`` is either a
float or a ``keras.optimizers.schedules`` object stepped once per batch. Schedules are
written in epochs in params.yaml (what people reason in) and converted to steps here.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras.optimizers import schedules

from optlab.params import Params

OPTIMIZERS: dict[str, type[keras.optimizers.Optimizer]] = {
    "adam": keras.optimizers.Adam,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adamw": keras.optimizers.AdamW,
    "nadam": keras.optimizers.Nadam,
}


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


SCHEDULES: dict[str, Callable[..., float | schedules.LearningRateSchedule]] = {
    "constant": _constant,
    "step": _step,
    "exponential": _exponential,
    "cosine": _cosine,
    "warmup_cosine": _warmup_cosine,
    "plateau": _plateau,
}


def build_optimizer(params: Params, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    """The optimizer named by ``params.optimizer`` with its knobs, driven by ``params.schedule``."""
    knobs = params.optimizer_args.model_dump()
    lr = knobs.pop("learning_rate")
    learning_rate = SCHEDULES[params.schedule](lr, params.schedule_args, steps_per_epoch, epochs)
    return OPTIMIZERS[params.optimizer](learning_rate=learning_rate, **knobs)


def mode(monitor: str) -> str:
    """Whether a monitored metric improves by going down (losses) or up (accuracies)."""
    return "min" if monitor.endswith("loss") else "max"


def plateau_callback(params: Params) -> keras.callbacks.Callback | None:
    if params.schedule != "plateau":
        return None
    a = params.sched.plateau
    return keras.callbacks.ReduceLROnPlateau(
        monitor=a.monitor, mode=mode(a.monitor), factor=a.factor, patience=a.patience, min_lr=a.min_lr, verbose=0
    )


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step (schedules evaluated, not returned)."""
    lr = optimizer.learning_rate  # Keras evaluates a schedule at `iterations` here
    return float(keras.ops.convert_to_numpy(lr))

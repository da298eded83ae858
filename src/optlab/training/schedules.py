"""Learning-rate schedules, chosen by name: ``SCHEDULES[params.schedule.name]``.

Each turns the optimizer's ``learning_rate`` and the ``schedule`` knobs (in epochs, what people
reason in; converted to steps here) into a float or a ``keras.optimizers.schedules`` object that
the optimizer steps once per batch. The caller keeps the schedule to log the rate the optimizer
really applied (:class:`AppliedRate`). Adding a schedule: a function here, its line in
:data:`SCHEDULES`, and its file in ``conf/schedule/`` (docs/extending.md).
"""

from __future__ import annotations

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


SCHEDULES: dict[str, Callable[..., Rate]] = {
    "constant": _constant,
    "step": _step,
    "exponential": _exponential,
    "cosine": _cosine,
    "warmup_cosine": _warmup_cosine,
    "plateau": _plateau,
}


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

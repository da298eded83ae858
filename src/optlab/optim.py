"""Optimizers and learning-rate schedules, chosen by name.

``build_schedule`` turns the ``schedule`` params into a float or a
``keras.optimizers.schedules`` object stepped once per batch (params.yaml speaks in epochs, what
people reason in; it is converted to steps here), and ``build_optimizer`` gives the Keras
optimizer named by ``optimizer`` that rate. The caller keeps the schedule to log the rate the
optimizer really applied (:class:`AppliedRate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from optlab.backend import require_chosen

require_chosen(__name__)
import keras  # noqa: E402  (after the backend check)
import numpy as np  # noqa: E402
from keras.optimizers import schedules  # noqa: E402

from optlab.models import OUTPUT_LAYER  # noqa: E402
from optlab.params import Params  # noqa: E402

# Every Keras 3.15 optimizer that fits an image classifier. Left out: Ftrl (for sparse linear
# models) and LossScaleOptimizer (a mixed-precision wrapper, not an optimizer of its own).
OPTIMIZERS: dict[str, type[keras.optimizers.Optimizer]] = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "nadam": keras.optimizers.Nadam,
    "adamax": keras.optimizers.Adamax,
    "adagrad": keras.optimizers.Adagrad,
    "adadelta": keras.optimizers.Adadelta,
    "rmsprop": keras.optimizers.RMSprop,
    "sgd": keras.optimizers.SGD,
    "lion": keras.optimizers.Lion,
    "lamb": keras.optimizers.Lamb,
    "adafactor": keras.optimizers.Adafactor,
    "muon": keras.optimizers.Muon,
    "schedule_free_adamw": keras.optimizers.ScheduleFreeAdamW,
}

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


def build_schedule(params: Params, steps_per_epoch: int) -> Rate:
    """The learning rate ``params.schedule`` makes of the optimizer's ``learning_rate``."""
    lr = params.optimizer.learning_rate
    return SCHEDULES[params.schedule.name](lr, params.schedule, steps_per_epoch, params.train.epochs)


def build_optimizer(params: Params, learning_rate: Rate, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer ``params.optimizer`` names, with its knobs, ``learning_rate`` and the
    gradient clipping of ``train.clip_*``."""
    knobs = params.optimizer.model_dump(exclude={"name", "learning_rate"})
    if knobs.get("weight_decay") == 0:
        knobs["weight_decay"] = None  # the same update, without Keras's decay step
    if params.optimizer.name == "muon":
        # Keras's docs: the output layer should be stepped by AdamW, not Muon.
        knobs["exclude_layers"] = [OUTPUT_LAYER]
    if params.optimizer.name == "schedule_free_adamw":
        knobs["warmup_steps"] = round(knobs.pop("warmup_epochs") * steps_per_epoch)
    clip = params.train
    return OPTIMIZERS[params.optimizer.name](
        learning_rate=learning_rate,
        global_clipnorm=clip.clip_global_norm or None,
        clipvalue=clip.clip_value or None,
        **knobs,
    )


def evaluation_weights(model: keras.Model) -> Callable[[Sequence, Sequence], list] | None:
    """How to get the weights ``model`` is evaluated, early-stopped and saved at from the weights it
    trains at and its optimizer's variables (arrays, in ``model.trainable_variables`` and
    ``optimizer.variables`` order), or None where the two are the same: every optimizer but
    schedule-free AdamW. That one trains at y = (1 - beta_1) z + beta_1 x and evaluates at the
    average x = (y - (1 - beta_1) z) / beta_1 (Defazio et al. 2024; Keras's ScheduleFreeAdamW
    recovers x the same way in its update step, and leaves the swap to the user)."""
    optimizer = model.optimizer
    if not isinstance(optimizer, keras.optimizers.ScheduleFreeAdamW):
        return None
    optimizer.build(model.trainable_variables)  # creates z (a no-op when built)
    index = {id(v): i for i, v in enumerate(optimizer.variables)}
    # Private Keras attribute, checked against Keras 3.15: ScheduleFreeAdamW keeps z, where its
    # gradient steps land, in `_momentums`, one per trainable variable in order (built by build()).
    # tests/test_optimizers.py::test_schedule_free_keeps_z_where_optlab_reads_it fails if that changes.
    slots = [index[id(z)] for z in optimizer._momentums]
    beta = float(optimizer.beta_1)

    def average(trainable: Sequence, optimizer_values: Sequence) -> list:
        return [(y - (1 - beta) * optimizer_values[i]) / beta for y, i in zip(trainable, slots, strict=True)]

    return average


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


def mode(monitor: str) -> str:
    """Whether a monitored metric improves by going down (losses) or up (accuracies)."""
    return "min" if monitor.endswith("loss") else "max"


def plateau_callback(params: Params) -> keras.callbacks.Callback | None:
    if params.schedule.name != "plateau":
        return None
    a = params.schedule
    return keras.callbacks.ReduceLROnPlateau(
        monitor=a.monitor, mode=mode(a.monitor), factor=a.factor, patience=a.patience, min_lr=a.min_lr, verbose=0
    )

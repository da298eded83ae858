"""Optimizers, chosen by name: the Keras optimizer of each file of ``conf/optimizer/``.

A name is Keras's optimizer class of that name (lowercased, without underscores:
``schedule_free_adamw`` is ``keras.optimizers.ScheduleFreeAdamW``), unless :data:`OWN` holds a
class of optlab's own under it, so adding a Keras optimizer is one conf file. Its knobs are the
class's keyword arguments; a knob in epochs (``warmup_epochs``) becomes the steps Keras counts
(``warmup_steps``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from optlab.core.errors import OptlabError
from optlab.core.params import Params
from optlab.training.backend import keras
from optlab.training.models import OUTPUT_LAYER

# Optimizers of optlab's own, by name (none yet: every conf/optimizer/ file is a Keras optimizer).
OWN: dict[str, type[keras.optimizers.Optimizer]] = {}
# What optlab adds to an optimizer's knobs. Keras's docs: Muon's output layer is stepped by its
# AdamW, not by Muon.
ADDED: dict[str, dict] = {"muon": {"exclude_layers": [OUTPUT_LAYER]}}


def optimizer_class(name: str) -> type[keras.optimizers.Optimizer]:
    """The optimizer class a conf/optimizer/ file's ``name`` means."""
    if name in OWN:
        return OWN[name]
    wanted = name.replace("_", "")
    for cls in vars(keras.optimizers).values():
        if isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer) and cls.__name__.lower() == wanted:
            return cls
    raise OptlabError(
        f"optimizer.name {name!r} is neither a Keras optimizer (keras.optimizers.<Class>, named in lower case "
        "without underscores) nor one of optlab's own (OWN in optlab/training/optimizers.py)"
    )


def build(params: Params, learning_rate, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer ``params.optimizer`` names, with its knobs, ``learning_rate`` (a float or a
    schedule) and the gradient clipping of ``train.clip_*``."""
    name = params.optimizer.name
    cls = optimizer_class(name)
    accepted = inspect.signature(cls).parameters
    knobs = params.optimizer.model_dump(exclude={"name", "learning_rate"})
    for key in [k for k in knobs if k.endswith("_epochs") and f"{k[: -len('_epochs')]}_steps" in accepted]:
        knobs[f"{key[: -len('_epochs')]}_steps"] = round(knobs.pop(key) * steps_per_epoch)
    if knobs.get("weight_decay") == 0:
        knobs["weight_decay"] = None  # the same update, without Keras's decay step
    knobs |= ADDED.get(name, {})
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())  # a class of one's own
    unknown = [] if takes_any else sorted(k for k in knobs if k not in accepted)
    if unknown:
        raise OptlabError(
            f"optimizer {name}: {', '.join(unknown)} is not a knob of {cls.__name__}; its knobs are "
            f"{', '.join(k for k in accepted if k not in ('self', 'kwargs', 'name'))}"
        )
    clip = params.train
    try:
        return cls(learning_rate=learning_rate, global_clipnorm=clip.clip_global_norm or None,
                   clipvalue=clip.clip_value or None, **knobs)  # fmt: skip
    except TypeError as exc:  # a knob the class (or the Keras base it passes **kwargs to) refuses
        raise OptlabError(f"optimizer {name}: {cls.__name__} refuses its knobs from conf/optimizer/{name}.yaml: "
                          f"{exc}") from None  # fmt: skip


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

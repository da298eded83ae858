"""Load and validate ``params.yaml`` into typed sections.

This is the one module that knows the file's layout. Every stage calls :func:`load_params`
first, so a typo or an out-of-range value stops the pipeline before any data is downloaded or
any model is built, with a message that names the key and says what to write instead.

``params.yaml`` is the experiment, and the only place its values live: the schema here has
types and ranges but no defaults, so a file that lacks a key is refused by name instead of
silently running another experiment (a test keeps it that way).

No Keras import here: the registries' *names* are listed below and a test checks that they
match the dicts in ``models.py`` and ``optim.py``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "digits")
MODEL_NAMES = ("mlp", "cnn")
OPTIMIZER_NAMES = ("adam", "sgd", "rmsprop", "adamw", "nadam")
SCHEDULE_NAMES = ("constant", "step", "exponential", "cosine", "warmup_cosine", "plateau")


class ParamsError(ValueError):
    """params.yaml is wrong; the message lists every problem and how to fix it."""


class Section(BaseModel):
    # extra="forbid" turns a typo'd key into an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


# --- prepare -------------------------------------------------------------------------------
class PrepareParams(Section):
    scale: Literal["minus_one_one", "zero_one", "standardize"]
    flatten: bool
    val_fraction: Annotated[float, Field(gt=0, lt=1)]
    seed: Annotated[int, Field(ge=0)]  # the train/validation split's seed, apart from `seed`


# --- model ---------------------------------------------------------------------------------
class ModelParams(Section):
    name: str
    hidden: Annotated[list[Annotated[int, Field(ge=32, le=2048)]], Field(min_length=1, max_length=5)]
    activation: Literal["relu", "gelu", "tanh", "elu", "selu"]
    batch_norm: bool  # placed before the activation (report 004's best placement)
    dropout: Fraction  # after every hidden layer
    l2: Annotated[float, Field(ge=0)]  # kernel penalty per weight
    initializer: Literal["he_normal", "glorot_uniform"]
    conv_filters: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(min_length=1, max_length=5)]
    augment: bool  # random shifts (and flips for colour images); cnn only, training only

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _choice(v, MODEL_NAMES, "model.name")


# --- optimizers: one block of knobs per name; `optimizer` picks the block --------------------
class AdamParams(Section):
    learning_rate: PositiveFloat
    beta_1: Fraction
    beta_2: Fraction


class SGDParams(Section):
    learning_rate: PositiveFloat
    momentum: Fraction
    nesterov: bool


class RMSpropParams(Section):
    learning_rate: PositiveFloat
    rho: Fraction
    momentum: Fraction


class AdamWParams(Section):
    learning_rate: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0)]
    beta_1: Fraction
    beta_2: Fraction


class NadamParams(Section):
    learning_rate: PositiveFloat
    beta_1: Fraction
    beta_2: Fraction


class OptimParams(Section):
    adam: AdamParams
    sgd: SGDParams
    rmsprop: RMSpropParams
    adamw: AdamWParams
    nadam: NadamParams


# --- schedules: one block per name; `schedule` picks the block ------------------------------
class StepParams(Section):
    every_epochs: Annotated[int, Field(ge=1)]
    factor: Annotated[float, Field(gt=0, lt=1)]  # multiply the rate by this every `every_epochs`


class ExponentialParams(Section):
    rate_per_epoch: Annotated[float, Field(gt=0, lt=1)]  # smooth decay, per epoch


class CosineParams(Section):
    alpha: Fraction  # final rate as a fraction of the initial one


class WarmupCosineParams(Section):
    warmup_epochs: Annotated[float, Field(gt=0)]  # linear ramp from ~0 to the optimizer's rate
    alpha: Fraction


class PlateauParams(Section):
    monitor: Literal["val_loss", "val_accuracy"]
    factor: Annotated[float, Field(gt=0, lt=1)]
    patience: Annotated[int, Field(ge=0)]  # epochs without improvement before a cut
    min_lr: Annotated[float, Field(ge=0)]


class SchedParams(Section):
    step: StepParams
    exponential: ExponentialParams
    cosine: CosineParams
    warmup_cosine: WarmupCosineParams
    plateau: PlateauParams


# --- train ---------------------------------------------------------------------------------
class EarlyStoppingParams(Section):
    enabled: bool
    monitor: Literal["val_accuracy", "val_loss"]
    patience: Annotated[int, Field(ge=1)]
    restore_best_weights: bool


class KeepBestParams(Section):
    # "The last epoch is not always the best" (report 004): save the best epoch's weights as the model.
    enabled: bool
    monitor: Literal["val_accuracy", "val_loss"]


class TrainParams(Section):
    epochs: Annotated[int, Field(ge=1, le=10_000)]
    batch_size: Annotated[int, Field(ge=1, le=65_536)]
    # auto: the fastest on this machine, by a rule optlab.backend.choose_backend documents and
    # run.json records; results differ slightly between backends.
    backend: Literal["auto", "jax", "tensorflow"]
    loop: Literal["auto", "compiled", "keras"]  # compiled: one XLA program per epoch (jax only)
    early_stopping: EarlyStoppingParams
    keep_best: KeepBestParams
    tensorboard: bool
    # A diverged run (loss NaN, infinite or far worse than chance) is a result (record: its
    # curves and last finite model are kept, the metrics say so, the stage exits 0) or an error.
    on_divergence: Literal["record", "fail"]
    # Per-layer gradient norms, update/weight ratios and dead ReLU units each epoch (compiled loop).
    diagnostics: bool

    @model_validator(mode="after")
    def _loop_needs_jax(self) -> TrainParams:
        if self.loop == "compiled" and self.backend == "tensorflow":
            raise ValueError(
                "train.loop 'compiled' runs on the jax backend only; "
                "write train.loop: keras to train with TensorFlow, or train.backend: jax"
            )
        return self


class EvaluateParams(Section):
    top_k: Annotated[int, Field(ge=1)]


class PlotParams(Section):
    confused_images: Annotated[int, Field(ge=1, le=100)]  # test images in the confusion grid


class Params(Section):
    dataset: str
    seed: Annotated[int, Field(ge=0)]  # weights, dropout masks and batch order
    optimizer: str
    schedule: str
    prepare: PrepareParams
    model: ModelParams
    optim: OptimParams
    sched: SchedParams
    train: TrainParams
    evaluate: EvaluateParams
    plot: PlotParams

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _choice(v, DATASET_NAMES, "dataset")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return _choice(v, OPTIMIZER_NAMES, "optimizer")

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        return _choice(v, SCHEDULE_NAMES, "schedule")

    # The chosen block of knobs, so callers never index by name themselves.
    @property
    def optimizer_args(self) -> BaseModel:
        return getattr(self.optim, self.optimizer)

    @property
    def schedule_args(self) -> BaseModel | None:
        return getattr(self.sched, self.schedule, None)


def _choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ValueError(f"unknown {key} '{value}'; choose one of: {', '.join(choices)}.{suggestion}")
    return value


def _keys_of(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model class that holds the field at ``loc`` (for listing valid keys)."""
    cls: type[BaseModel] = Params
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return cls


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _keys_of(_section_at(loc))
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        suggestion = f" Did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?" if hint else ""
        return f"{key}: unknown key.{suggestion} Valid keys here: {', '.join(valid)}."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    shown = "" if kind == "missing" or isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise :class:`ParamsError` listing every problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys to values at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ParamsError(f"{source} has {exc.error_count()} problem(s):\n{lines}") from None


def set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the parsed params with ``{"train.epochs": 5, ...}`` applied, as ``-S`` does."""
    import copy

    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def read_raw(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """The validated params of ``path``, with optional dotted ``overrides`` (for benchmarks and
    tools that run a variant of the repository's experiment)."""
    raw = read_raw(path)
    if overrides and isinstance(raw, dict):
        raw = set_dotted(raw, overrides)
    return validate_params(raw, str(path))

"""Load and validate ``params.yaml`` into typed sections.

This is the one module that knows the file's layout. Every stage calls :func:`load_params`
first, so a typo or an out-of-range value stops the pipeline before any data is downloaded or
any model is built, with a message that names the key and says what to write instead.

``params.yaml`` is the experiment that runs. ``dvc exp run`` composes it from ``conf/`` (DVC's
Hydra composition: ``conf/config.yaml`` plus the chosen file of each group, ``conf/optimizer/``
and ``conf/schedule/``), so it holds the knobs of the chosen optimizer and schedule only.

Every value lives in exactly one place (a test keeps it so):

- the knobs a study varies (the optimizer and its rate, the schedule, the architecture and its
  regularization, epochs, batch size, seeds) are in ``conf/``, so they are in ``params.yaml`` and
  are the columns of ``dvc exp show``. The schema gives them no default: a file that lacks one is
  refused by name instead of silently running another experiment;
- the knobs of *how* a run goes (data scaling and split, initializer, early stopping, clipping,
  backend, diagnostics, what is plotted) and Keras's own defaults of an optimizer have their
  default here, in the schema, and are not in ``conf/``. ``dvc exp run -S +train.keep_best=true``
  sets one (Hydra's ``+`` adds a key): it is then in that experiment's ``params.yaml``, DVC tracks
  it, and ``dvc exp show`` has its column. ``optlab params --all`` lists them with their defaults.

No Keras import here: the registries' *names* are listed below and a test checks that they
match the dicts in ``models.py`` and ``optim.py``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "digits")
# Each model and whether it takes flat pixel vectors (the prepare stage lays the images out for
# model.name: no separate knob to forget).
FLAT_INPUT = {"mlp": True, "cnn": False}
MODEL_NAMES = tuple(FLAT_INPUT)


class ParamsError(ValueError):
    """params.yaml is wrong; the message lists every problem and how to fix it."""


class Section(BaseModel):
    # extra="forbid" turns a typo'd key into an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


# --- prepare -------------------------------------------------------------------------------
class PrepareParams(Section):
    # per channel, with the training split's statistics
    scale: Literal["minus_one_one", "zero_one", "standardize"] = "minus_one_one"
    # a stratified slice of the training set; the test set is never used to choose
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    seed: Annotated[int, Field(ge=0)] = 0  # the train/validation split's seed, apart from `seed`


# --- model ---------------------------------------------------------------------------------
class ModelParams(Section):
    name: str
    hidden: Annotated[list[Annotated[int, Field(ge=32, le=2048)]], Field(min_length=1, max_length=5)]
    activation: Literal["relu", "gelu", "tanh", "elu", "selu"]
    batch_norm: bool  # placed before the activation (report 004's best placement)
    dropout: Fraction  # after every hidden layer
    l2: Annotated[float, Field(ge=0)]  # kernel penalty per weight
    initializer: Literal["he_normal", "glorot_uniform"] = "glorot_uniform"
    # cnn only: one conv block (conv, conv, max-pool) per entry
    conv_filters: Annotated[list[Annotated[int, Field(ge=1, le=1024)]], Field(min_length=1, max_length=5)] = [32, 64]
    augment: bool = False  # random shifts (and flips for colour images); cnn only, training only

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _choice(v, MODEL_NAMES, "model.name")


# --- optimizers and schedules: Hydra config groups ------------------------------------------
# `dvc exp run -S optimizer=rmsprop` selects conf/optimizer/rmsprop.yaml, so params.yaml holds the
# knobs of the chosen optimizer (and schedule) only, with its `name`; the schema of each is a
# member of a union told apart by `name`.
class Choice(Section):
    name: str


class Optimizer(Choice):
    learning_rate: PositiveFloat


class AdamParams(Optimizer):
    name: Literal["adam"]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.999


class SGDParams(Optimizer):
    name: Literal["sgd"]
    momentum: Fraction
    nesterov: bool


class RMSpropParams(Optimizer):
    name: Literal["rmsprop"]
    rho: Fraction
    momentum: Fraction


class AdamWParams(Optimizer):
    name: Literal["adamw"]
    weight_decay: Annotated[float, Field(ge=0)]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.999


class NadamParams(Optimizer):
    name: Literal["nadam"]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.999


class AdamaxParams(Optimizer):
    name: Literal["adamax"]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.999


class AdagradParams(Optimizer):
    name: Literal["adagrad"]
    initial_accumulator_value: Annotated[float, Field(ge=0)]


class AdadeltaParams(Optimizer):
    name: Literal["adadelta"]
    rho: Fraction


class LionParams(Optimizer):
    name: Literal["lion"]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.99
    weight_decay: Annotated[float, Field(ge=0)]


class LambParams(Optimizer):
    name: Literal["lamb"]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.999


class AdafactorParams(Optimizer):
    name: Literal["adafactor"]
    beta_2_decay: Annotated[float, Field(lt=0)]  # the second-moment decay is 1 - step^beta_2_decay
    epsilon_1: Annotated[float, Field(gt=0)]  # the floor added to squared gradients
    clip_threshold: Annotated[float, Field(gt=0)]
    relative_step: bool


class MuonParams(Optimizer):
    name: Literal["muon"]
    momentum: Fraction
    nesterov: bool
    ns_steps: Annotated[int, Field(ge=1, le=20)]
    weight_decay: Annotated[float, Field(ge=0)]
    adam_beta_1: Fraction  # the AdamW that steps what is not a 2-D hidden weight matrix
    adam_beta_2: Fraction
    adam_weight_decay: Annotated[float, Field(ge=0)]


class ScheduleFreeAdamWParams(Optimizer):
    name: Literal["schedule_free_adamw"]
    beta_1: Fraction = 0.9  # Keras\'s defaults
    beta_2: Fraction = 0.999
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_epochs: Annotated[float, Field(ge=0)]  # its own linear warm-up, in epochs (Keras: warmup_steps)


AnyOptimizer = Annotated[
    AdamParams | AdamWParams | NadamParams | AdamaxParams | AdagradParams | AdadeltaParams | RMSpropParams
    | SGDParams | LionParams | LambParams | AdafactorParams | MuonParams | ScheduleFreeAdamWParams,
    Field(discriminator="name"),
]  # fmt: skip


class ConstantParams(Choice):
    name: Literal["constant"]


class StepParams(Choice):
    name: Literal["step"]
    every_epochs: Annotated[int, Field(ge=1)]
    factor: Annotated[float, Field(gt=0, lt=1)]  # multiply the rate by this every `every_epochs`


class ExponentialParams(Choice):
    name: Literal["exponential"]
    rate_per_epoch: Annotated[float, Field(gt=0, lt=1)]  # smooth decay, per epoch


class CosineParams(Choice):
    name: Literal["cosine"]
    alpha: Fraction = 0.0  # final rate as a fraction of the initial one (Keras\'s CosineDecay default)


class WarmupCosineParams(Choice):
    name: Literal["warmup_cosine"]
    warmup_epochs: Annotated[float, Field(gt=0)]  # linear ramp from ~0 to the optimizer's rate
    alpha: Fraction = 0.0


class PlateauParams(Choice):
    name: Literal["plateau"]
    monitor: Literal["val_loss", "val_accuracy"]
    factor: Annotated[float, Field(gt=0, lt=1)]
    patience: Annotated[int, Field(ge=0)]  # epochs without improvement before a cut
    min_lr: Annotated[float, Field(ge=0)]


AnySchedule = Annotated[
    ConstantParams | StepParams | ExponentialParams | CosineParams | WarmupCosineParams | PlateauParams,
    Field(discriminator="name"),
]


def _members(union: Any) -> dict[str, type[Choice]]:
    """name -> schema, for each member of a union told apart by ``name``."""
    members = get_args(get_args(union)[0])
    return {get_args(m.model_fields["name"].annotation)[0]: m for m in members}


# group -> (name -> schema): what `-S <group>=<name>` selects (a file conf/<group>/<name>.yaml).
GROUPS: dict[str, dict[str, type[Choice]]] = {"optimizer": _members(AnyOptimizer), "schedule": _members(AnySchedule)}
OPTIMIZER_NAMES = tuple(GROUPS["optimizer"])
SCHEDULE_NAMES = tuple(GROUPS["schedule"])


# --- train ---------------------------------------------------------------------------------
class TrainParams(Section):
    epochs: Annotated[int, Field(ge=1, le=10_000)]
    batch_size: Annotated[int, Field(ge=1, le=65_536)]
    # Runs of this variant trained together, replica r with seed `seed + r`: the metrics are their
    # means, with the spread over seeds beside them (one vectorized program on the compiled loop).
    replicas: Annotated[int, Field(ge=1, le=64)]
    # auto: the fastest on this machine, by a rule optlab.backend.choose_engine documents and
    # run.json records; results differ slightly between backends.
    backend: Literal["auto", "jax", "tensorflow"] = "auto"
    loop: Literal["auto", "compiled", "keras"] = "auto"  # compiled: one XLA program per epoch (jax only)
    # Keras's EarlyStopping: stop after this many epochs without a better `monitor` (0: off).
    early_stopping: Annotated[int, Field(ge=0)] = 0
    # "The last epoch is not always the best" (report 004): save the best epoch's weights by
    # `monitor` as the model, not the last ones (what EarlyStopping's restore_best_weights and
    # ModelCheckpoint(save_best_only) do between them).
    keep_best: bool = False
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"  # what early stopping, keep_best and best_epoch watch
    tensorboard: bool = False  # also write TensorBoard logs to logs/ (not tracked by DVC)
    # A diverged run (loss NaN, infinite or far worse than chance) is a result (record: its
    # curves and last finite model are kept, the metrics say so, the stage exits 0) or an error.
    on_divergence: Literal["record", "fail"] = "record"
    # Per-layer gradient norms, update/weight ratios and dead ReLU units each epoch (compiled loop).
    diagnostics: bool = True
    # Gradient clipping, whatever the optimizer (0: off): Keras's global_clipnorm (the L2 norm of
    # all gradients together) and clipvalue (each gradient entry into [-v, v]), applied inside
    # the optimizer's step, so both loops clip alike.
    clip_global_norm: Annotated[float, Field(ge=0)] = 0.0
    clip_value: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _loop_needs_jax(self) -> TrainParams:
        if self.loop == "compiled" and self.backend == "tensorflow":
            raise ValueError(
                "train.loop 'compiled' runs on the jax backend only; "
                "write train.loop: keras to train with TensorFlow, or train.backend: jax"
            )
        return self


class EvaluateParams(Section):
    top_k: Annotated[int, Field(ge=1)] = 3


class PlotParams(Section):
    confused_images: Annotated[int, Field(ge=1, le=100)] = 16  # test images in the confusion grid


class Params(Section):
    optimizer: AnyOptimizer
    schedule: AnySchedule
    dataset: str
    seed: Annotated[int, Field(ge=0)]  # weights, dropout masks and batch order
    prepare: PrepareParams = PrepareParams()
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams = EvaluateParams()
    plot: PlotParams = PlotParams()

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _choice(v, DATASET_NAMES, "dataset")

    @property
    def flat_input(self) -> bool:
        """Whether the model takes flat pixel vectors (the MLP) or images (the CNN): how the prepare
        stage lays the data out."""
        return FLAT_INPUT[self.model.name]

    @model_validator(mode="after")
    def _schedule_free_has_no_schedule(self) -> Params:
        if self.optimizer.name == "schedule_free_adamw" and self.schedule.name != "constant":
            raise ValueError(
                f"schedule: optimizer schedule_free_adamw replaces the learning-rate schedule (its averaged "
                f"weights do what a decay would: Defazio et al. 2024), so it takes schedule=constant, not "
                f"{self.schedule.name}; warm it up with -S optimizer.warmup_epochs=<epochs>"
            )
        return self


def defaulted_knobs(flat: dict[str, Any]) -> dict[str, Any]:
    """The knobs ``flat`` (a params.yaml flattened to dotted keys) does not set, with the value the
    schema gives them: every knob with a default, of the top-level sections and of the chosen
    optimizer and schedule. ``params.yaml`` plus these is the whole experiment."""
    found: dict[str, Any] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif not field.is_required():
                found[f"{prefix}{name}"] = field.get_default(call_default_factory=True)

    walk(Params, "")
    for group, members in GROUPS.items():
        chosen = flat.get(f"{group}.name")
        if isinstance(chosen, str) and chosen in members:
            walk(members[chosen], f"{group}.")
    return {k: v for k, v in found.items() if k not in flat}


def _choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ValueError(f"unknown {key} '{value}'; choose one of: {', '.join(choices)}.{suggestion}")
    return value


def _keys_of(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel], tuple[Any, ...]]:
    """The pydantic model class that holds the field at ``loc`` (for listing valid keys), and
    ``loc`` as the user writes it (pydantic puts a union member's tag in it: optimizer.adam.x)."""
    if len(loc) >= 2 and loc[0] in GROUPS and loc[1] in GROUPS[loc[0]]:
        return GROUPS[loc[0]][loc[1]], (loc[0], *loc[2:])
    cls: type[BaseModel] = Params
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return cls, loc


def _describe(err: dict[str, Any]) -> str:
    cls, loc = _section_at(tuple(err["loc"]))
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        group, given = loc[0], (err.get("input") or {}).get("name")
        names = tuple(GROUPS[group])
        try:
            problem = "no name" if given is None else _choice(given, names, group)
        except ValueError as exc:
            problem = str(exc)
        return f"{group}.name: {problem} (choose with -S {group}=<name>, which brings its knobs from conf/{group}/)"
    if kind == "extra_forbidden":
        valid = _keys_of(cls)
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        suggestion = f" Did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?" if hint else ""
        other = ""
        if loc[0] in GROUPS and len(loc) == 2:
            owners = [n for n, m in GROUPS[loc[0]].items() if str(loc[-1]) in m.model_fields]
            if owners:
                other = (
                    f" ({loc[-1]} is a knob of {', '.join(owners)}: switch with -S {loc[0]}=<name>, not by "
                    f"editing {loc[0]}.name, so the new {loc[0]}'s knobs come with it)"
                )
        return f"{key}: unknown key.{suggestion} Valid keys here: {', '.join(valid)}.{other}"
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
    """The validated params of ``path``, with optional dotted ``overrides`` of its values (a group
    such as ``optimizer`` is switched by :func:`load_variant`, as ``dvc exp run -S`` does)."""
    raw = read_raw(path)
    if overrides and isinstance(raw, dict):
        raw = set_dotted(raw, overrides)
    return validate_params(raw, str(path))


# --- composing params.yaml from conf/ (what `dvc exp run` does first) ------------------------
def compose(repo: str | Path = ".", output: str | Path | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """Write ``params.yaml`` (or ``output``) from ``conf/`` with DVC's own Hydra composition and
    the repository's ``hydra`` settings, exactly as ``dvc exp run`` does before it runs; for
    ``dvc repro`` after ``conf/`` was edited (``optlab params``), and for the test that the
    committed ``params.yaml`` is ``conf/`` composed."""
    from dvc.repo import Repo
    from dvc.utils.hydra import compose_and_dump

    repo = Path(repo).resolve()
    with Repo(str(repo)) as dvc_repo:
        hydra = dvc_repo.config.get("hydra", {})
    if not hydra.get("enabled"):
        raise ParamsError(f"{repo}: DVC's Hydra composition is not enabled (dvc config hydra.enabled true)")
    out = Path(output) if output is not None else repo / "params.yaml"
    config_dir = str(repo / hydra.get("config_dir", "conf"))
    try:
        compose_and_dump(out, config_dir, None, hydra.get("config_name", "config"), str(repo), list(overrides))
    except Exception as exc:  # Hydra's own errors name the file or override that is wrong
        raise ParamsError(f"cannot compose {config_dir}: {exc}") from None
    return out


def load_variant(repo: str | Path, overrides: tuple[str, ...] | list[str]) -> Params:
    """The validated params of ``dvc exp run -S o1 -S o2 ...`` in ``repo`` (Hydra override syntax:
    ``optimizer=sgd``, ``optimizer.learning_rate=0.1``), without running anything: for benchmarks
    and tools that run a variant of the repository's experiment."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = compose(repo, Path(tmp) / "params.yaml", tuple(overrides))
        return load_params(path)

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
  backend, diagnostics, what is plotted) and the library's own defaults of an optimizer or a
  schedule have their default here and are not in ``conf/``. ``dvc exp run -S
  +train.keep_best=true`` sets one (Hydra's ``+`` adds a key): it is then in that experiment's
  ``params.yaml``, DVC tracks it, and ``dvc exp show`` has its column. ``optlab params --all``
  lists them with their defaults.

The options of the two groups are the files of ``conf/optimizer/`` and ``conf/schedule/``, as
for Hydra: a file's keys are that option's knobs (required), :data:`DEFAULTED` adds the ones it
leaves at the library's default, and :data:`KNOBS` gives each knob name its type and range,
whatever the option. Adding an optimizer is one conf file. No Keras import here.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from optlab.core.errors import OptlabError

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "digits")
# Each model and whether it takes flat pixel vectors (the prepare stage lays the images out for
# model.name: no separate knob to forget).
FLAT_INPUT = {"mlp": True, "cnn": False}
MODEL_NAMES = tuple(FLAT_INPUT)
GROUP_NAMES = ("optimizer", "schedule")  # Hydra config groups: -S optimizer=sgd picks conf/optimizer/sgd.yaml
CONF = "conf"  # beside params.yaml (DVC runs every stage from the repository's root)


class ParamsError(OptlabError):
    """params.yaml is wrong; the message lists every problem and how to fix it."""


def improves(metric: str) -> str:
    """Whether a metric gets better by going down (``"min"``: losses, the generalization gap) or up
    (``"max"``: accuracies, F1): the one place that decides, for early stopping, keep-best,
    ReduceLROnPlateau, the comparison and the gate."""
    return "min" if metric.endswith(("loss", "gap")) else "max"


class Section(BaseModel):
    # extra="forbid" turns a typo'd key into an error instead of a silently ignored setting;
    # allow_inf_nan=False refuses .nan and .inf wherever a float goes (a NaN passes no range check
    # pydantic would skip, and an infinite rate or decay trains nothing).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_a_boolean(value: Any) -> Any:
    # YAML reads yes/no/on/off/true/false as booleans, and pydantic would take one as 1 or 0:
    # `epochs: yes` is a mistake, not one epoch.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# The types every knob is made of. A number is never a boolean; a boolean is true or false only
# (not 1, 0 or the string "yes"); a number written as text (`1e-3`, which YAML 1.1 reads as a
# string) is read as the number.
Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
Bool = StrictBool
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegative = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]
OpenFraction = Annotated[Float, Field(gt=0, lt=1)]
Monitor = Literal["val_accuracy", "val_loss"]
# Every count has an upper bound too: run.json and the resume backup's key hold the params as
# JSON, which takes no integer of more than 4300 digits, and Keras takes no step count beyond 64 bits.
MAX_EPOCHS = 10_000
Epochs = Annotated[Int, Field(ge=0, le=MAX_EPOCHS)]
# Each random layer's seed is seed * 1000 + its index, a 32-bit number in Keras (replica r's seed
# is seed + r, r < 64): 4,000,000 leaves room for both.
SEED_MAX = 4_000_000


# --- the knobs of optimizers and schedules, by name ----------------------------------------
# Each knob name's type and range, whatever the option that has it (a knob not listed takes the
# type of its value in the conf file).
MAX_MEMBERS = 64  # models one run trains side by side: rates x replicas
# One rate, or several: a group, one member per rate (x train.replicas), trained as one program.
Rates = Annotated[list[PositiveFloat], Field(min_length=1, max_length=MAX_MEMBERS)]
KNOBS: dict[str, Any] = {
    "learning_rate": PositiveFloat | Rates,
    "beta_1": Fraction,
    "beta_2": Fraction,
    "momentum": Fraction,
    "rho": Fraction,
    "nesterov": Bool,
    "weight_decay": NonNegative,
    "initial_accumulator_value": NonNegative,
    "beta_2_decay": Annotated[Float, Field(lt=0)],  # Adafactor: the second-moment decay is 1 - step^beta_2_decay
    "epsilon_1": PositiveFloat,  # Adafactor: the floor added to squared gradients
    "clip_threshold": PositiveFloat,
    "relative_step": Bool,
    "ns_steps": Annotated[Int, Field(ge=1, le=20)],  # Muon's Newton-Schulz iterations
    "adam_beta_1": Fraction,  # Muon: the AdamW that steps what is not a 2-D hidden weight matrix
    "adam_beta_2": Fraction,
    "adam_weight_decay": NonNegative,
    # schedules, in epochs (what people reason in; the schedule converts them to steps)
    "warmup_epochs": Annotated[Float, Field(ge=0, le=MAX_EPOCHS)],
    "every_epochs": Annotated[Int, Field(ge=1, le=MAX_EPOCHS)],
    "factor": OpenFraction,  # multiply the rate by this
    "rate_per_epoch": OpenFraction,
    "alpha": Fraction,  # the final rate as a fraction of the peak
    "monitor": Monitor,
    "patience": Epochs,  # epochs without improvement before a cut
    "min_lr": NonNegative,
    "decay_fraction": Annotated[Float, Field(gt=0, le=1)],  # wsd: the share of the steps its cooldown takes
    "cooldown": Literal["linear", "cosine", "sqrt"],  # wsd: the cooldown's shape
    "warmup_fraction": OpenFraction,  # one_cycle: the share of the steps it rises over
    "start_factor": Annotated[Float, Field(gt=0, le=1)],  # one_cycle: where it starts, x the rate
    "end_factor": Fraction,  # one_cycle: where it ends, x the rate
    "half_cycle_epochs": Annotated[Float, Field(gt=0, le=MAX_EPOCHS)],  # cyclical: from the low rate to the peak
    "low_factor": Fraction,  # cyclical: the low rate, x the peak
}
# The knobs a conf/<group>/<name>.yaml leaves at the library's default (Keras's), each default
# written once: set one for a run with -S +optimizer.beta_2=0.99.
ADAM_BETAS = {"beta_1": 0.9, "beta_2": 0.999}
DEFAULTED: dict[str, dict[str, dict[str, Any]]] = {
    "optimizer": {
        **dict.fromkeys(("adam", "adamw", "nadam", "adamax", "lamb", "schedule_free_adamw"), ADAM_BETAS),
        "lion": {"beta_1": 0.9, "beta_2": 0.99},
    },
    "schedule": {
        **dict.fromkeys(("cosine", "warmup_cosine"), {"alpha": 0.0}),  # CosineDecay's default
        # A linear warm-up can precede any of these (none by default): -S +schedule.warmup_epochs=1.
        **dict.fromkeys(("linear_decay", "one_cycle", "cyclical"), {"warmup_epochs": 0.0}),
    },
}


class Choice(Section):
    """An option of a group: ``name`` and the knobs its conf file gives."""

    name: str


class Optimizer(Choice):
    learning_rate: PositiveFloat | Rates

    @property
    def rates(self) -> list[float]:
        """The learning rates of the run's members: one, or a group's."""
        return list(self.learning_rate) if isinstance(self.learning_rate, list) else [self.learning_rate]


def _knob_type(key: str, value: Any) -> Any:
    if key in KNOBS:
        return KNOBS[key]
    return {bool: Bool, int: Int, float: Float}.get(type(value), list if isinstance(value, list) else type(value))


def _option_model(group: str, name: str, knobs: dict[str, Any]) -> type[Choice]:
    """The schema of one option: its conf file's knobs (required) and the defaulted ones."""
    fields: dict[str, Any] = {"name": (Literal[name], ...)}
    fields |= {k: (_knob_type(k, v), ...) for k, v in knobs.items() if k != "name"}
    fields |= {k: (_knob_type(k, v), v) for k, v in DEFAULTED[group].get(name, {}).items()}
    base = Optimizer if group == "optimizer" else Choice
    return create_model(f"{group}.{name}", __base__=base, **fields)


def _option_knobs(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: not a readable YAML file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("name") != path.stem:
        raise ParamsError(f"{path}: a conf group file must be a mapping with name: {path.stem}")
    return {k: v for k, v in raw.items() if k != "defaults"}  # Hydra's own list: not a knob


# --- the other sections ------------------------------------------------------------------------
class PrepareParams(Section):
    # per channel, with the training split's statistics
    scale: Literal["minus_one_one", "zero_one", "standardize"] = "minus_one_one"
    # a stratified slice of the training set; the test set is never used to choose
    val_fraction: OpenFraction = 0.1
    # the train/validation split's seed, apart from `seed` (scikit-learn takes 32 bits)
    seed: Annotated[Int, Field(ge=0, le=2**32 - 1)] = 0


class ModelParams(Section):
    name: str
    hidden: Annotated[list[Annotated[Int, Field(ge=32, le=2048)]], Field(min_length=1, max_length=5)]
    activation: Literal["relu", "gelu", "tanh", "elu", "selu"]
    batch_norm: Bool  # placed before the activation (report 004's best placement)
    dropout: Fraction  # after every hidden layer
    l2: NonNegative  # kernel penalty per weight
    initializer: Literal["he_normal", "glorot_uniform"] = "glorot_uniform"
    # cnn only: one conv block (conv, conv, max-pool) per entry
    conv_filters: Annotated[list[Annotated[Int, Field(ge=1, le=1024)]], Field(min_length=1, max_length=5)] = [32, 64]
    augment: Bool = False  # random shifts (and flips for colour images); cnn only, training only

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return _choice(v, MODEL_NAMES, "model.name")


class TrainParams(Section):
    epochs: Annotated[Int, Field(ge=1, le=MAX_EPOCHS)]
    batch_size: Annotated[Int, Field(ge=1, le=65_536)]
    # Runs of this variant trained together, replica r with seed `seed + r`: the metrics are their
    # means, with the spread over seeds beside them (one vectorized program on the compiled loop).
    replicas: Annotated[Int, Field(ge=1, le=64)]
    # auto: the fastest on this machine, by a rule optlab.training.backend.choose_engine documents
    # and run.json records; results differ slightly between backends.
    backend: Literal["auto", "jax", "tensorflow"] = "auto"
    loop: Literal["auto", "compiled", "keras"] = "auto"  # compiled: one XLA program per epoch (jax only)
    # Keras's EarlyStopping: stop after this many epochs without a better `monitor` (0: off).
    early_stopping: Epochs = 0
    # "The last epoch is not always the best" (report 004): save the best epoch's weights by
    # `monitor` as the model, not the last ones (what EarlyStopping's restore_best_weights and
    # ModelCheckpoint(save_best_only) do between them).
    keep_best: Bool = False
    monitor: Monitor = "val_accuracy"  # what early stopping, keep_best and best_epoch watch
    tensorboard: Bool = False  # also write TensorBoard logs to logs/ (not tracked by DVC)
    # A diverged run (loss NaN, infinite or far worse than chance) is a result (record: its
    # curves and last finite model are kept, the metrics say so, the stage exits 0) or an error.
    on_divergence: Literal["record", "fail"] = "record"
    # Per-layer gradient norms, update/weight ratios and dead ReLU units each epoch (compiled loop),
    # and with it the sharpness and the gradient noise scale below (optlab.training.hessian).
    diagnostics: Bool = True
    # Training images (the first of the split) whose loss's top Hessian eigenvalue is measured after
    # an epoch, against the optimizer's stability threshold (0: off). At 256 it, Adam's preconditioned
    # one and the noise scale below add 6% to the default MLP's epoch (benchmarks/diagnostics_speed.py,
    # docs/diagnostics.md); the cost grows with the images, the noise of the estimate shrinks.
    sharpness_images: Annotated[Int, Field(ge=0, le=65_536)] = 256
    # Training images whose per-example gradients give the gradient noise scale B_simple, the
    # critical batch size (0: off; a variance needs 2 at least). Noisy once B_simple nears it.
    noise_scale_images: Annotated[Int, Field(ge=0, le=65_536)] = 256
    curvature_every: Annotated[Int, Field(ge=1, le=MAX_EPOCHS)] = 1  # epochs between those two measurements
    # Keep replica 0's weights after every epoch (and before the first) in <logs>/trajectory.npz, outside
    # DVC's outputs, for `optlab landscape` to project the path on the loss surface (4 bytes x weights x epochs).
    trajectory: Bool = False
    # Gradient clipping, whatever the optimizer (0: off): Keras's global_clipnorm (the L2 norm of
    # all gradients together) and clipvalue (each gradient entry into [-v, v]), applied inside
    # the optimizer's step, so both loops clip alike.
    clip_global_norm: NonNegative = 0.0
    clip_value: NonNegative = 0.0

    @field_validator("noise_scale_images")
    @classmethod
    def _a_variance_needs_two(cls, v: int) -> int:
        if v == 1:
            raise ValueError("one image has no gradient variance: write 0 (off) or 2 or more")
        return v

    @model_validator(mode="after")
    def _loop_needs_jax(self) -> TrainParams:
        if self.loop == "compiled" and self.backend == "tensorflow":
            raise ValueError(
                "train.loop 'compiled' runs on the jax backend only; "
                "write train.loop: keras to train with TensorFlow, or train.backend: jax"
            )
        return self


class EvaluateParams(Section):
    top_k: Annotated[Int, Field(ge=1, le=100)] = 3  # (cifar100 has the most classes)


class PlotParams(Section):
    confused_images: Annotated[Int, Field(ge=1, le=100)] = 16  # test images in the confusion grid


class Params(Section):
    """The whole experiment. The ``optimizer`` and ``schedule`` fields are the conf options' schemas
    (:func:`schema` builds the class with them)."""

    optimizer: Optimizer
    schedule: Choice
    dataset: str
    seed: Annotated[Int, Field(ge=0, le=SEED_MAX)]  # weights, dropout masks and batch order
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
    def _members_fit(self) -> Params:
        rates = self.optimizer.rates
        if len(set(rates)) != len(rates):
            raise ValueError(f"optimizer.learning_rate: the group {rates} repeats a rate; list each once")
        if len(rates) * self.train.replicas > MAX_MEMBERS:
            raise ValueError(
                f"train.replicas: {len(rates)} rates x {self.train.replicas} replicas is "
                f"{len(rates) * self.train.replicas} members, more than the {MAX_MEMBERS} one run trains; run fewer, "
                "or several experiments"
            )
        return self

    @model_validator(mode="after")
    def _schedule_free_has_no_schedule(self) -> Params:
        if self.optimizer.name == "schedule_free_adamw" and self.schedule.name != "constant":
            raise ValueError(
                f"schedule: optimizer schedule_free_adamw replaces the learning-rate schedule (its averaged "
                f"weights do what a decay would: Defazio et al. 2024), so it takes the constant schedule its conf "
                f"file chooses, not {self.schedule.name}; leave -S schedule=... out, and warm it up with "
                f"-S optimizer.warmup_epochs=<epochs>"
            )
        return self


@dataclass(frozen=True)
class Schema:
    """The params schema of one ``conf/`` directory: the Params class, and each group's options."""

    params: type[Params]
    groups: dict[str, dict[str, type[Choice]]]  # group -> name -> the option's schema

    def names(self, group: str) -> tuple[str, ...]:
        return tuple(self.groups[group])


@functools.cache
def _schema_at(conf: Path) -> Schema:
    groups = {}
    for group in GROUP_NAMES:
        files = sorted((conf / group).glob("*.yaml"))
        if not files:
            raise ParamsError(f"{conf / group}: no option files; optlab's experiment lives in {CONF}/")
        groups[group] = {f.stem: _option_model(group, f.stem, _option_knobs(f)) for f in files}

    def union(members: dict[str, type[Choice]]) -> Any:
        if len(members) == 1:
            return next(iter(members.values()))
        return Annotated[Union[tuple(members.values())], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple)

    params = create_model(
        "Params",
        __base__=Params,
        optimizer=(union(groups["optimizer"]), ...),
        schedule=(union(groups["schedule"]), ...),
    )
    return Schema(params, groups)


def find_conf(near: str | Path | None = None) -> Path:
    """The ``conf/`` directory beside ``near`` (a params file), else in the current directory."""
    for base in ([Path(near).parent] if near is not None else []) + [Path.cwd()]:
        if (base / CONF / "optimizer").is_dir():
            return (base / CONF).resolve()
    raise ParamsError(
        f"no {CONF}/ directory beside {near or 'params.yaml'} or in {Path.cwd()}: optlab's experiment "
        "(conf/config.yaml and the optimizer/ and schedule/ groups) lives there; run from the repository's root"
    )


def schema(conf: str | Path | None = None) -> Schema:
    """The schema of ``conf`` (default: :func:`find_conf`)."""
    return _schema_at(Path(conf).resolve() if conf is not None else find_conf())


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
    for group in GROUP_NAMES:
        chosen = flat.get(f"{group}.name")
        found |= (
            {f"{group}.{k}": v for k, v in DEFAULTED[group].get(chosen, {}).items()} if isinstance(chosen, str) else {}
        )
    return {k: v for k, v in found.items() if k not in flat}


def _shown(value: Any, limit: int = 80) -> str:
    """``value`` as an error message shows it: its repr (so text is quoted and a newline is an
    escape, never a second line), cut to ``limit`` characters."""
    if isinstance(value, int) and value.bit_length() > 256:  # repr fails past 4300 digits
        return f"an integer of {math.floor(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # a huge integer inside, or nesting Python cannot print
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _key_part(part: Any) -> str:
    """One part of a dotted key, as written (quoted if it holds spaces, quotes or line breaks)."""
    if isinstance(part, str) and re.fullmatch(r"[^\s'\"]{1,60}", part) and part.isprintable():
        return part
    return _shown(part, 40)


def _choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) and len(value) < 100 else []
        suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ValueError(f"unknown {key} {_shown(value)}; choose one of: {', '.join(choices)}.{suggestion}")
    return value


def _section_at(s: Schema, loc: tuple[Any, ...]) -> tuple[type[BaseModel], tuple[Any, ...]]:
    """The pydantic model class that holds the field at ``loc`` (for listing valid keys), and
    ``loc`` as the user writes it (pydantic puts a union member's tag in it: optimizer.adam.x)."""
    if len(loc) >= 2 and loc[0] in s.groups and loc[1] in s.groups[loc[0]]:
        return s.groups[loc[0]][loc[1]], (loc[0], *loc[2:])
    if len(loc) >= 1 and loc[0] in s.groups and len(s.groups[loc[0]]) == 1:
        return next(iter(s.groups[loc[0]].values())), loc
    cls: type[BaseModel] = s.params
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return cls, loc


def _describe(s: Schema, err: dict[str, Any]) -> str:
    cls, loc = _section_at(s, tuple(err["loc"]))
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not loc:  # a check across sections: its message starts with the key it is about
        return msg
    key = ".".join(_key_part(p) for p in loc)
    kind, got = err["type"], err.get("input")
    # The option's name: the union's tag (several options), or the one option's Literal name; not
    # another Literal knob of the option (a plateau schedule's monitor).
    tag = kind in ("union_tag_invalid", "union_tag_not_found") and len(loc) == 1
    if loc[0] in s.groups and (tag or (kind == "literal_error" and loc[1:] == ("name",))):
        group = loc[0]
        given = got if kind == "literal_error" else got.get("name") if isinstance(got, dict) else got
        try:
            problem = "no name" if given is None else _choice(given, s.names(group), group)
        except ValueError as exc:
            problem = str(exc)
        return f"{group}.name: {problem} (choose with -S {group}=<name>, which brings its knobs from conf/{group}/)"
    if kind == "extra_forbidden":
        valid = list(cls.model_fields)
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        suggestion = f" Did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?" if hint else ""
        other = ""
        if loc[0] in s.groups and len(loc) == 2:
            owners = [n for n, m in s.groups[loc[0]].items() if str(loc[-1]) in m.model_fields]
            if owners:
                other = (
                    f" ({loc[-1]} is a knob of {', '.join(owners)}: switch with -S {loc[0]}=<name>, not by "
                    f"editing {loc[0]}.name, so the new {loc[0]}'s knobs come with it)"
                )
        return f"{key}: unknown key.{suggestion} Valid keys here: {', '.join(valid)}.{other}"
    if len(loc) == 1 and loc[0] in s.groups and not isinstance(got, dict):
        return (
            f"{key}: the chosen option's knobs, a mapping with name: <option> (got {_shown(got)}); choose with "
            f"-S {key}=<name>, or run `optlab params` to write params.yaml from conf/"
        )
    shown = "" if kind == "missing" or isinstance(got, dict) else f" (got {_shown(got)})"
    return f"{key}: {msg}{shown}"


MAX_LISTED = 20  # problems listed one by one; the rest are counted


UNIONS = ("learning_rate",)  # the keys whose type is a union (a rate, or a group of rates)


def _tags(loc: tuple) -> list[int]:
    """The positions in an error's location of pydantic's names of union members (``float``,
    ``list[...]``): the part right after a key of UNIONS, which is not a key the user wrote."""
    return [i for i in range(1, len(loc)) if loc[i - 1] in UNIONS and isinstance(loc[i], str)]


def _one_per_union(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors with union members' names taken out of their locations, keeping, where every
    member of a union refused a value, the errors of the member of the value's kind: a list's
    (a group of rates), or a single value's."""
    listed_at = {}  # the key of a union -> whether the value there is a list
    for err in errors:
        tags = _tags(err["loc"])
        if tags and not err["loc"][tags[0]].startswith("list["):
            listed_at[tuple(err["loc"][: tags[0]])] = isinstance(err.get("input"), list)
    found = []
    for err in errors:
        tags = _tags(err["loc"])
        if tags:
            key, listed = tuple(err["loc"][: tags[0]]), err["loc"][tags[0]].startswith("list[")
            if key in listed_at and listed != listed_at[key]:
                continue  # the other member's complaint
        found.append({**err, "loc": tuple(p for i, p in enumerate(err["loc"]) if i not in tags)})
    return found


def validate_params(raw: Any, source: str = "params.yaml", conf: str | Path | None = None) -> Params:
    """Validate a parsed params mapping against the schema of ``conf`` (default: the ``conf/``
    beside ``source``, else in the current directory); raise :class:`ParamsError` listing every
    problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys to values at the top level, got {type(raw).__name__}")
    s = schema(conf if conf is not None else find_conf(source))
    try:
        return s.params.model_validate(raw)
    except ValidationError as exc:
        errors = _one_per_union(exc.errors())
        lines = [f"  - {_describe(s, e)}" for e in errors[:MAX_LISTED]]
        if len(errors) > MAX_LISTED:
            lines.append(f"  - ... and {len(errors) - MAX_LISTED} more")
        raise ParamsError(f"{source} has {len(errors)} problem(s):\n" + "\n".join(lines)) from None


def set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the parsed params with ``{"train.epochs": 5, ...}`` applied, as ``-S`` does."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a scalar it reads as an integer or a date but cannot build
    (an integer of more than Python's 4300 digits, 2024-13-01) stays the text it is: the schema
    then refuses it by its key, instead of the whole file failing to load."""


def _text_if_unbuildable(tag: str) -> None:
    build = yaml.SafeLoader.yaml_constructors[tag]

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return build(loader, node)
        except ValueError:
            return loader.construct_scalar(node)

    _Loader.add_constructor(tag, construct)


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"):
    _text_if_unbuildable(_tag)


def read_raw(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The parsed file (None, an empty file, as {}); any mapping or not, for validate_params to judge."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; run from the repository root or pass --params PATH")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        byte = f"byte {exc.start} is {exc.object[exc.start]:#04x}"
        raise ParamsError(f"{path}: not UTF-8 text ({byte}); save it as UTF-8") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # SafeLoader, with the fallback above
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ParamsError(f"{path}: not valid params: nested deeper than Python can read") from None
    return {} if raw is None else raw


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
    # DVC internal, checked against DVC 3.67: dvc.utils.hydra.compose_and_dump(output, config_dir,
    # config_module, config_name, plugins_path, overrides) is what `dvc exp run` calls.
    # tests/test_params.py::test_params_yaml_is_conf_composed fails if it changes.
    from dvc.repo import Repo
    from dvc.utils.hydra import compose_and_dump

    repo = Path(repo).resolve()
    with Repo(str(repo)) as dvc_repo:
        hydra = dvc_repo.config.get("hydra", {})
    if not hydra.get("enabled"):
        raise ParamsError(f"{repo}: DVC's Hydra composition is not enabled (dvc config hydra.enabled true)")
    out = Path(output) if output is not None else repo / "params.yaml"
    config_dir = str(repo / hydra.get("config_dir", CONF))
    try:
        compose_and_dump(out, config_dir, None, hydra.get("config_name", "config"), str(repo), list(overrides))
    except Exception as exc:  # Hydra's own errors name the file or override that is wrong
        given = "".join(f" -S {_shown(o, 120)}" for o in overrides[:20])
        raise ParamsError(f"cannot compose {config_dir}{' with' + given if given else ''}: {exc}") from None
    return out


def load_variant(repo: str | Path, overrides: tuple[str, ...] | list[str]) -> Params:
    """The validated params of ``dvc exp run -S o1 -S o2 ...`` in ``repo`` (Hydra override syntax:
    ``optimizer=sgd``, ``optimizer.learning_rate=0.1``), without running anything: for benchmarks
    and tools that run a variant of the repository's experiment."""
    with tempfile.TemporaryDirectory() as tmp:
        path = compose(repo, Path(tmp) / "params.yaml", tuple(overrides))
        return validate_params(read_raw(path), str(path), conf=Path(repo) / CONF)

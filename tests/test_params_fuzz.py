"""Bad input, fuzzed: every key of the params schema (the sections, dataset and seed, and every
knob of every option of the optimizer and schedule groups) given values nobody typed on purpose:
wrong types, out of range, NaN and infinities, unknown keys and options, empty and huge lists,
non-ASCII text, huge integers, None. Through both ways in:

- ``-S`` overrides, composed by DVC's own Hydra composition as ``dvc exp run -S`` does
  (:func:`optlab.core.params.load_variant`);
- a hand-edited ``params.yaml``, read by :func:`optlab.core.params.load_params` in this process
  (most examples) and by the stage scripts as dvc.yaml runs them (a few per stage).

Every invalid case ends in a ParamsError that names the key, one problem per line (a stage: exit
2, exactly one ``error:`` line, no traceback, nothing written); every valid boundary value is
accepted as it is. Each test prints a ``[record]`` line with the number of cases it ran.

What each key takes is read from the schema (type, range, choices, list lengths), so a new key
or option is fuzzed without a line here.
"""

from __future__ import annotations

import math
import re
import sys
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from conftest import REPO, repo_params, run_stage, stage_args, write_params
from optlab.core.params import (
    DATASET_NAMES,
    GROUP_NAMES,
    MODEL_NAMES,
    ParamsError,
    load_params,
    load_variant,
    schema,
    set_dotted,
    validate_params,
)

SCHEMA = schema(REPO / "conf")
STAGES = ("download", "prepare", "train", "evaluate", "plot")
SETTINGS = {"database": None, "deadline": None, "print_blob": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture]}  # fmt: skip
# The str fields a validator checks against a list (the others are Literals).
CHOICES = {"dataset": DATASET_NAMES, "model.name": MODEL_NAMES}


# --- what each key takes, read from the schema ---------------------------------------------
@dataclass(frozen=True)
class Spec:
    kind: Literal["bool", "int", "float", "choice", "list", "either"]
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # gt rather than ge
    hi_open: bool = False
    choices: tuple = ()
    item: Spec | None = None
    min_len: int = 0
    max_len: int | None = None
    members: tuple[Spec, ...] = ()  # either: a number, or a list of them (a group of learning rates)
    unique: bool = False  # a list whose items must differ (a group's rates)


@dataclass(frozen=True)
class Key:
    dotted: str  # as a user writes it: train.epochs, optimizer.momentum
    spec: Spec
    base: dict = field(default_factory=dict)  # the option the knob belongs to: {"optimizer": "sgd"}

    def params(self) -> dict:
        return repo_params(**self.base)


def spec_of(key: str, info: FieldInfo) -> Spec:
    ann, meta = info.annotation, info.metadata
    bounds: dict[str, Any] = {}
    for m in meta:
        if isinstance(m, at.Ge | at.Gt):
            bounds |= {"lo": m.ge if isinstance(m, at.Ge) else m.gt, "lo_open": isinstance(m, at.Gt)}
        elif isinstance(m, at.Le | at.Lt):
            bounds |= {"hi": m.le if isinstance(m, at.Le) else m.lt, "hi_open": isinstance(m, at.Lt)}
        elif isinstance(m, at.MinLen):
            bounds["min_len"] = m.min_length
        elif isinstance(m, at.MaxLen):
            bounds["max_len"] = m.max_length
    if typing.get_origin(ann) is Literal:
        return Spec("choice", choices=typing.get_args(ann))
    if ann is str:
        return Spec("choice", choices=CHOICES[key])
    if ann is bool:
        return Spec("bool")
    if ann in (int, float):
        return Spec(ann.__name__, **bounds)
    if typing.get_origin(ann) is list:
        item = spec_of(key, FieldInfo.from_annotation(typing.get_args(ann)[0]))
        return Spec("list", item=item, unique=key.endswith("learning_rate"), **bounds)
    if typing.get_origin(ann) in (typing.Union, __import__("types").UnionType):
        return Spec("either", members=tuple(spec_of(key, FieldInfo.from_annotation(a)) for a in typing.get_args(ann)))
    raise AssertionError(f"{key}: a type this test does not know how to fuzz: {ann}")


def schema_keys() -> list[Key]:
    """Every leaf key: of the sections, and every knob (name included) of every group option."""
    keys = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if not prefix and name in GROUP_NAMES:
                continue
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}{name}.")
            else:
                keys.append(Key(f"{prefix}{name}", spec_of(f"{prefix}{name}", info)))

    walk(SCHEMA.params, "")
    for group, options in SCHEMA.groups.items():
        for option, model in options.items():
            for name, info in model.model_fields.items():
                keys.append(Key(f"{group}.{name}", spec_of(f"{group}.{name}", info), {group: option}))
    return keys


KEYS = schema_keys()
NAMES = tuple(f"{group}.name" for group in GROUP_NAMES)  # choosing another option is no bad value
# The keys of each kind: examples draw a kind first, so the two lists get their share beside 67 floats.
BY_KIND = {kind: [k for k in KEYS if k.spec.kind == kind and k.dotted not in NAMES]
           for kind in ("bool", "int", "float", "choice", "list", "either")}  # fmt: skip


def sections(raw: dict) -> list[str]:
    """The mappings of ``raw`` a key can be added to: the top level, each section, each group."""
    return ["", *(k for k, v in raw.items() if isinstance(v, dict))]


def valid_keys(where: str, raw: dict) -> set[str]:
    """The keys the schema takes in the mapping ``where`` of ``raw`` (the chosen option's, in a group)."""
    if not where:
        return set(SCHEMA.params.model_fields)
    if where in GROUP_NAMES:
        return set(SCHEMA.groups[where][raw[where]["name"]].model_fields)
    return set(SCHEMA.params.model_fields[where].annotation.model_fields)


# --- values ------------------------------------------------------------------------------
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE_INTS = st.integers(20, 5000).flatmap(lambda d: st.sampled_from([10**d, -(10**d), 10**d - 1]))
# Any text, non-ASCII included; not the line breaks PyYAML writes as they are and reads back as a space.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x85\u2028\u2029"), max_size=30)
# Never a number, even to a lax parser: letters (any script), punctuation, spaces, line breaks.
WORDS = st.text(st.characters(categories=["L", "P", "Zs", "Cc", "So"]), min_size=1, max_size=30)
SCALARS = st.none() | st.booleans() | st.integers() | FLOATS | TEXT
NESTED = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6)  # fmt: skip
CONTAINERS = st.lists(NESTED, max_size=4) | st.dictionaries(TEXT, NESTED, max_size=3)


def valid(spec: Spec) -> st.SearchStrategy:
    """Values the key takes, its boundaries most of all."""
    if spec.kind == "either":
        return st.one_of([valid(m) for m in spec.members])
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "choice":
        return st.sampled_from(spec.choices)
    if spec.kind == "list":
        sizes = [spec.min_len, spec.max_len, *range(spec.min_len, spec.max_len + 1)]
        return st.sampled_from(sizes).flatmap(
            lambda n: st.lists(valid(spec.item), min_size=n, max_size=n, unique=spec.unique)
        )
    lo = spec.lo if spec.lo is not None else -1e300
    hi = spec.hi if spec.hi is not None else 1e300
    if spec.kind == "int":
        return st.sampled_from([int(lo), int(hi)]) | st.integers(int(lo), int(hi))
    edges = [
        math.nextafter(lo, math.inf) if spec.lo_open else lo,
        math.nextafter(hi, -math.inf) if spec.hi_open else hi,
    ]
    inside = st.floats(lo, hi, exclude_min=spec.lo_open, exclude_max=spec.hi_open, allow_nan=False)
    return st.sampled_from(edges) | inside


def invalid(spec: Spec) -> st.SearchStrategy:
    """Values the key must refuse (none of them a value a lax reading would accept)."""
    if spec.kind == "either":  # what every member refuses: a bad number that is no list, or a bad list
        return st.one_of([invalid(m).filter(lambda v, m=m: isinstance(v, list) == (m.kind == "list"))
                          for m in spec.members])  # fmt: skip
    wrong: list[st.SearchStrategy] = [st.none(), CONTAINERS]
    if spec.kind == "bool":
        wrong += [st.integers(), FLOATS, NOT_FINITE, TEXT, st.sampled_from(["true", "yes", "on", "1"])]
    elif spec.kind == "choice":
        wrong += [TEXT.filter(lambda s: s not in spec.choices), st.integers(), FLOATS, st.booleans()]
    elif spec.kind == "list":
        wrong = [st.none(), st.integers(), TEXT, st.dictionaries(TEXT, NESTED, max_size=3)]
        item = valid(spec.item)
        if spec.min_len > 0:
            wrong.append(st.just([]))
        if spec.max_len is not None:
            wrong += [st.lists(item, min_size=spec.max_len + 1, max_size=spec.max_len + 10),
                      item.map(lambda v: [v] * 20_000)]  # fmt: skip
        one_bad = st.tuples(st.lists(item, min_size=1, max_size=spec.max_len or 5), invalid(spec.item), st.integers(0))
        wrong.append(one_bad.map(lambda t: [*t[0][: t[2] % len(t[0])], t[1], *t[0][t[2] % len(t[0]) + 1 :]]))
    else:  # a number
        wrong += [st.booleans(), NOT_FINITE, WORDS, st.sampled_from(["nan", "inf", "-inf", ".nan"])]
        out: list[st.SearchStrategy] = []
        if spec.lo is not None:  # below the range, or at its open end
            out.append(
                st.floats(max_value=spec.lo, exclude_max=not spec.lo_open, allow_nan=False, allow_infinity=False)
            )
        if spec.hi is not None:
            out.append(
                st.floats(min_value=spec.hi, exclude_min=not spec.hi_open, allow_nan=False, allow_infinity=False)
            )
        if spec.kind == "int":
            ints = (
                [st.integers(max_value=math.ceil(spec.lo) - (0 if spec.lo_open else 1))] if spec.lo is not None else []
            )
            ints += (
                [st.integers(min_value=math.floor(spec.hi) + (0 if spec.hi_open else 1))] if spec.hi is not None else []
            )
            wrong += [*ints, HUGE_INTS, FLOATS.filter(lambda x: not x.is_integer()),
                      *(o.filter(lambda x: x.is_integer()) for o in out)]  # fmt: skip
        else:
            wrong += [*out, st.integers(400, 5000).map(lambda d: 10**d)]  # past any float
    return st.one_of(wrong)


@dataclass(frozen=True)
class Case:
    """One invalid params mapping and the key its error must name."""

    raw: Any
    key: str  # as the message writes it
    what: str  # the kind of mistake, for the record


def _set(raw: dict, dotted: str, value: Any) -> dict:
    return set_dotted(raw, {dotted: value})


@st.composite
def invalid_cases(draw) -> Case:
    kind = draw(st.sampled_from(["value", "value", "value", "unknown key", "unknown option", "group", "cross"]))
    if kind == "value":
        key = draw(st.sampled_from(BY_KIND[draw(st.sampled_from(list(BY_KIND)))]))
        return Case(_set(key.params(), key.dotted, draw(invalid(key.spec))), key.dotted, f"{key.spec.kind} value")
    if kind == "unknown option":
        group = draw(st.sampled_from(GROUP_NAMES))
        name = draw(TEXT.filter(lambda s: s not in SCHEMA.names(group)) | st.integers() | st.none())
        return Case(_set(repo_params(), f"{group}.name", name), f"{group}.name", kind)
    if kind == "group":  # the group itself not a mapping (`optimizer: adam`, as in conf/config.yaml)
        group = draw(st.sampled_from(GROUP_NAMES))
        return Case(_set(repo_params(), group, draw(SCALARS | st.lists(SCALARS, max_size=3))), group, kind)
    if kind == "cross":  # values fine alone, refused together
        if draw(st.booleans()):
            raw = repo_params(**{"train.backend": "tensorflow", "train.loop": "compiled"})
            return Case(raw, "train", kind)  # "train: train.loop 'compiled' runs on the jax backend only"
        named = draw(st.sampled_from([n for n in SCHEMA.names("schedule") if n != "constant"]))
        raw = repo_params(optimizer="schedule_free_adamw", schedule=named)
        return Case(raw, "schedule", kind)
    base = draw(st.sampled_from([{}, *({g: n} for g in GROUP_NAMES for n in SCHEMA.names(g))]))
    raw = repo_params(**base)
    where = draw(st.sampled_from(sections(raw)))
    node = raw[where] if where else raw
    new = draw((TEXT | st.integers() | st.none()).filter(lambda k: k not in valid_keys(where, raw)))
    many = draw(st.sampled_from([1, 1, 1, 1000]))  # one typo, or a pasted block of a thousand
    node[new] = draw(NESTED)
    for i in range(many - 1):
        node[f"{new}_{i}"] = i
    return Case(raw, f"{where}.{_written(new)}" if where else _written(new), f"{kind} x{many}")


def _written(key: Any) -> str:
    """How a message writes a key part: plain, or its repr (cut) when it has spaces, quotes or breaks."""
    if isinstance(key, str) and re.fullmatch(r"[^\s'\"]{1,60}", key) and key.isprintable():
        return key
    return repr(key)[:20]


def assert_names_the_key(message: str, key: str, source: str = "") -> None:
    """A problem list names ``key`` at the start of a problem, one problem a line (no value spills
    onto another); any other message (a file that is not params, Hydra's) names it somewhere."""
    lines = message.splitlines()
    assert len(message) < 20_000, f"{len(message)} characters"  # a huge value is shown cut short
    if lines[0].endswith("problem(s):"):
        assert lines[0].startswith(source) and all(line.startswith("  - ") for line in lines[1:]), message
        assert any(line.startswith(f"  - {key}") for line in lines[1:]), (key, message)
    else:
        assert key in message, (key, message)


# --- 1. in this process: load_params on a hand-edited file, validate_params on the mapping ---
def test_bad_params_are_refused_by_key_in_process(tmp_path):
    path = write_params(tmp_path / "params.yaml", repo_params())
    ran: Counter = Counter()

    @settings(max_examples=600, **SETTINGS)
    @given(case=invalid_cases(), through_file=st.booleans())
    def check(case: Case, through_file: bool) -> None:
        ran[case.what] += 1
        with pytest.raises(ParamsError) as err:
            if through_file:
                _write_yaml(path, case.raw)
                load_params(path)
            else:
                validate_params(case.raw, str(path))
        assert_names_the_key(str(err.value), case.key, str(path))

    check()
    total = sum(ran.values())
    assert total >= 600 and len(ran) >= 8, ran
    print(f"[record] test_params_fuzz in-process: {total} invalid cases refused by key ({dict(ran)})")


def test_valid_boundary_values_are_accepted_as_they_are(tmp_path):
    path = write_params(tmp_path / "params.yaml", repo_params())
    ran: Counter = Counter()

    @settings(max_examples=300, **SETTINGS)
    @given(kind=st.sampled_from(list(BY_KIND)), data=st.data())
    def check(kind: str, data) -> None:
        key = data.draw(st.sampled_from(BY_KIND[kind]))
        value = data.draw(valid(key.spec))
        ran[key.spec.kind] += 1
        _write_yaml(path, _set(key.params(), key.dotted, value))
        p = load_params(path)
        got = p
        for part in key.dotted.split("."):
            got = getattr(got, part)
        assert got == value, (key.dotted, value, got)

    check()
    total = sum(ran.values())
    assert total >= 250, ran
    print(f"[record] test_params_fuzz boundaries: {total} valid boundary values accepted ({dict(ran)})")


def _write_yaml(path: Path, raw: Any) -> None:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # the test writes integers of 5000 digits (the loader must cope)
    try:
        path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    finally:
        sys.set_int_max_str_digits(limit)


# Files that are not params at all: each names the file.
BROKEN_FILES = {
    "not UTF-8": b"dataset: fashion_mnist\nseed: \xff\xfe0\n",
    "UTF-16": "dataset: mnist\n".encode("utf-16"),
    "a list": b"- optimizer\n- schedule\n",
    "a scalar": b"42\n",
    "an empty list": b"[]\n",
    "not YAML": b"model: [unclosed\n",
    "a tab": b"model:\n\thidden: [32]\n",
    "a Python tag": b"dataset: !!python/object/apply:os.system ['echo hi']\n",
    "nested too deep": b"model:\n  hidden: " + b"[" * 5000 + b"]" * 5000 + b"\n",
}
NAMED_KEYS_IN_FILES = {  # YAML that loads, with a value that must be refused by key
    b"seed: " + b"7" * 5000 + b"\n": "seed",  # past Python's int digits: the loader keeps the text
    b"seed: 2024-13-01\n": "seed",  # a date YAML cannot build
    b"seed: 2024-01-01\n": "seed",  # a date it can
    b"model: {hidden: .nan}\n": "model.hidden",
    b"train: {epochs: yes}\n": "train.epochs",  # YAML 1.1's boolean
    b"dataset: fa\xc5\x9bhion_mnist\n": "dataset",
    b"dataset: |\n  a\n  error: b\n": "dataset",  # a line break in a value: still one error line
}


BASE = yaml.safe_dump(repo_params(), sort_keys=False).encode()  # a line after it sets its key again


def test_files_that_are_not_params_are_refused_by_name(tmp_path):
    (tmp_path / "conf").symlink_to(REPO / "conf", target_is_directory=True)
    path = tmp_path / "params.yaml"
    for what, content in BROKEN_FILES.items():
        path.write_bytes(content)
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert str(path) in str(err.value), (what, str(err.value))
    for content, key in NAMED_KEYS_IN_FILES.items():
        path.write_bytes(BASE + content)
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert_names_the_key(str(err.value), key, str(path))
    path.write_bytes(b"")
    with pytest.raises(ParamsError, match="optimizer: Field required"):
        load_params(path)  # an empty file: every required key named
    print(f"[record] test_params_fuzz files: {len(BROKEN_FILES) + len(NAMED_KEYS_IN_FILES) + 1} broken files refused")


# --- 2. through the stage scripts, as dvc.yaml runs them ------------------------------------
def _assert_stage_refused(proc, key: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    message = proc.stderr[proc.stderr.index("error: ") + len("error: ") :]
    assert_names_the_key(message.rstrip("\n"), key, "params.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf", "params.yaml"], "nothing else was written"


@pytest.mark.slow  # a stage process per drawn case: `make test`, not test-fast
def test_every_stage_refuses_bad_params_in_one_line_before_writing(tmp_path):
    ran: Counter = Counter()
    (tmp_path / "conf").symlink_to(REPO / "conf", target_is_directory=True)
    path = tmp_path / "params.yaml"
    # The files that are not params, and the huge integer YAML cannot build, each through a stage.
    fixed = [(content, path.name) for content in BROKEN_FILES.values()]
    fixed += [(BASE + content, key) for content, key in NAMED_KEYS_IN_FILES.items() if key == "seed"]
    for i, (content, key) in enumerate(fixed):
        path.write_bytes(content)
        name = STAGES[i % len(STAGES)]
        _assert_stage_refused(run_stage(name, *stage_args(name), cwd=tmp_path), key, tmp_path)
        ran[name] += 1

    @settings(max_examples=10, **SETTINGS)
    @given(case=invalid_cases(), name=st.sampled_from(STAGES))
    def check(case: Case, name: str) -> None:
        _write_yaml(path, case.raw)
        _assert_stage_refused(run_stage(name, *stage_args(name), cwd=tmp_path), case.key, tmp_path)
        ran[name] += 1

    check()
    assert sum(ran.values()) >= len(fixed) + 10 and set(ran) == set(STAGES), ran
    print(f"[record] test_params_fuzz stages: {sum(ran.values())} stage runs refused bad params ({dict(ran)})")


# --- 3. -S overrides, composed as dvc exp run -S does -----------------------------------------
def hydra(value: Any) -> str:
    """``value`` in Hydra's override grammar, as a user types it after ``-S key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan" if math.isnan(value) else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(hydra(v) for v in value) + "]"
    return "{" + ",".join(f"{k}:{hydra(v)}" for k, v in value.items()) + "}"


# What -S can carry: no huge ints or lists (a command line), text without what Hydra interpolates.
S_TEXT = st.text(st.characters(categories=["L", "Nd", "Zs"], include_characters="._-"), max_size=20)
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)


def s_value(spec: Spec) -> st.SearchStrategy:
    wrong = invalid(spec).filter(_fits_a_command_line)
    return wrong | (S_TEXT.filter(lambda s: s not in spec.choices) if spec.kind == "choice" else st.nothing())


def _fits_a_command_line(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() < 1000
    if isinstance(value, str):
        return bool(re.fullmatch(r"[\w .\-]*", value))
    if isinstance(value, list):
        return len(value) <= 50 and all(_fits_a_command_line(v) for v in value)
    if isinstance(value, dict):
        return all(
            isinstance(k, str) and re.fullmatch(r"[a-z]\w*", k) and _fits_a_command_line(v) for k, v in value.items()
        )
    return True


@st.composite
def s_overrides(draw) -> tuple[list[str], str, str]:
    """(the -S overrides, the key the error must name, the kind of mistake)."""
    kind = draw(st.sampled_from(["value", "value", "value", "unknown key", "unknown option", "forced key"]))
    if kind == "value":
        key = draw(st.sampled_from(BY_KIND[draw(st.sampled_from(list(BY_KIND)))]))
        chosen = [f"{g}={n}" for g, n in key.base.items()]
        return [*chosen, f"++{key.dotted}={hydra(draw(s_value(key.spec)))}"], key.dotted, f"{key.spec.kind} value"
    if kind == "unknown option":
        group = draw(st.sampled_from(GROUP_NAMES))
        return [f"{group}={draw(IDENT.filter(lambda s: s not in SCHEMA.names(group)))}"], group, kind
    where = draw(st.sampled_from(["model", "train", "prepare", "evaluate", "plot", "optimizer", "schedule"]))
    valid_here = set(SCHEMA.params.model_fields[where].annotation.model_fields) if where not in GROUP_NAMES else set()
    valid_here |= {"name", "learning_rate", "warmup_epochs", "alpha", "beta_1", "beta_2"}
    new = draw(IDENT.filter(lambda s: s not in valid_here))
    plus = "++" if kind == "forced key" else ""  # without it Hydra refuses the key; with it, optlab does
    return [f"{plus}{where}.{new}={hydra(draw(SCALARS.filter(_fits_a_command_line)))}"], f"{where}.{new}", kind


def test_bad_s_overrides_are_refused_by_key_as_dvc_exp_run_composes_them():
    ran: Counter = Counter()

    @settings(max_examples=40, **SETTINGS)
    @given(case=s_overrides())
    def check(case: tuple[list[str], str, str]) -> None:
        overrides, key, what = case
        ran[what] += 1
        with pytest.raises(ParamsError) as err:
            load_variant(REPO, overrides)
        assert_names_the_key(str(err.value), key)

    check()
    # Valid boundaries through -S too: composed, validated and kept as typed.
    edges = ["++train.epochs=10000", "++seed=4000000", "++prepare.val_fraction=0.999999", "++model.l2=0.0",
             "model.hidden=[32,2048,32,2048,32]", "++train.clip_global_norm=1e300"]  # fmt: skip
    p = load_variant(REPO, edges)
    assert (p.train.epochs, p.seed, p.model.hidden, p.train.clip_global_norm) == (
        10000,
        4_000_000,
        [32, 2048] * 2 + [32],
        1e300,
    )
    total = sum(ran.values())
    assert total >= 40, ran
    print(f"[record] test_params_fuzz -S: {total} invalid overrides refused by key ({dict(ran)}), 1 valid set accepted")

"""Committed runs and the variants they form, read from DVC and git.

A *run* is one committed result: a commit or a DVC experiment, with its params, test metrics,
per-epoch validation curve, data hash and code hash, read from its git revision at the paths
``dvc.yaml`` gives (:mod:`optlab.pipeline`). Runs that differ only by ``seed`` (same params,
data and code) form one *variant*: a :class:`Group`.

``params.yaml`` holds the knobs of the chosen optimizer and schedule only (``conf/`` composes
them in). A knob a run's ``params.yaml`` leaves out takes the schema's default, so setting it to
its default changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optlab.core.errors import OptlabError
from optlab.core.params import GROUP_NAMES, defaulted_knobs
from optlab.evaluation.metrics import Summary, describe
from optlab.study import blobio
from optlab.study.pipeline import Pipeline
from optlab.training import record

PARAMS_FILE = "params.yaml"
SEED_KEY = "seed"
# How many seeds one experiment trained (replica r: seed + r): a run's replicas are runs of their
# own, so the count never tells two variants apart.
REPLICAS_KEY = "train.replicas"
RATE_KEY = "optimizer.learning_rate"  # a list: a group of rates, one member each (a trial each)
NOT_A_VARIANT = (SEED_KEY, REPLICAS_KEY)
METRICS = {"accuracy": "test accuracy", "loss": "test loss", "f1_macro": "macro F1"}  # the report's columns
CHOICES = GROUP_NAMES  # Hydra config groups of conf/: optimizer=adam selects conf/optimizer/adam.yaml
# A different dataset, epoch budget or data split asks another question: never pooled or tested.
CONTEXT_KEYS = ("dataset", "train.epochs")
CONTEXT_PREFIXES = ("prepare.",)


@dataclass(frozen=True)
class Run:
    """One committed result: a commit or an experiment, read from its git revision."""

    rev: str
    name: str
    params: dict[str, Any]  # params.yaml flattened to dotted keys, with the schema's defaults filled in
    metrics: dict[str, float]  # every number in the evaluate stage's test metrics
    trainable_params: float | None = None
    seconds_per_epoch: float | None = None
    data_hash: str | None = None  # the prepared data's hash in dvc.lock
    code_hash: str = ""  # the source files the stages depend on, so code changes never pool
    val_curve: tuple[float, ...] = ()
    diverged: bool = False  # training diverged or collapsed (train.on_divergence: record)
    # The knobs of each chosen group option as conf/ set them at this revision
    # ({"optimizer.momentum": 0.9, ...}), so a label can name only the knobs a run changed.
    choice_defaults: dict[str, Any] = field(default_factory=dict)
    replica: int | None = None  # which replica of its experiment (its seed is the replica's)

    @property
    def seed(self) -> Any:
        return self.params.get(SEED_KEY)


@dataclass
class Group:
    """Runs that differ only by seed: one variant."""

    runs: list[Run]
    label: str = ""
    # Runs that repeat a seed already in ``runs`` (e.g. HEAD and the experiment it was committed
    # from): the same seed is not an independent sample, so it is counted once.
    repeats: list[Run] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.runs[0].params.items() if k not in NOT_A_VARIANT}

    def by_seed(self, metric: str) -> dict[Any, float]:
        return {r.seed: r.metrics[metric] for r in self.runs if metric in r.metrics}

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def summary(self, metric: str) -> Summary:
        return describe(self.values(metric))

    @property
    def diverged(self) -> int:
        """How many of the variant's runs diverged."""
        return sum(r.diverged for r in self.runs)

    def context(self) -> dict[str, Any]:
        ctx = {k: v for k, v in self.params.items() if k in CONTEXT_KEYS or k.startswith(CONTEXT_PREFIXES)}
        ctx["data hash"] = self.runs[0].data_hash
        return ctx


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def with_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with every knob it leaves to the schema's default (``-S +train.keep_best=false``
    and leaving it out are one variant). The defaults are today's: a run whose code had others
    differs in its code hash anyway, so it is never pooled."""
    return {**flat, **defaulted_knobs(flat)}


def other_layout(params: dict[str, Any]) -> str | None:
    """How ``params`` (a params.yaml flattened) departs from today's layout, or None: today each
    config group is a mapping that names its option (``optimizer: {name: adam, ...}``). Older
    commits wrote ``optimizer: adam`` and every option's knobs under ``optim.<name>.*``; read
    against today's schema, each of those knobs would be a difference and name the variant."""
    for group in CHOICES:
        if not isinstance(params.get(f"{group}.name"), str):
            return f"`{group}: {params[group]}`" if group in params else f"no `{group}`"
    return None


def choice(params: dict[str, Any], group: str) -> Any:
    """The option of ``group`` a run chose (``optimizer.name``)."""
    return params.get(f"{group}.name")


def _group_key(run: Run) -> str:
    params = {k: v for k, v in run.params.items() if k not in NOT_A_VARIANT}
    return json.dumps([params, run.data_hash, run.code_hash], sort_keys=True, default=str)


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Group runs whose params (all but ``seed``), data and code are the same, in first-seen order."""
    groups: dict[str, Group] = {}
    for run in runs:
        group = groups.setdefault(_group_key(run), Group([]))
        same_seed = any(r.seed == run.seed for r in group.runs)
        (group.repeats if same_seed else group.runs).append(run)
    return list(groups.values())


# --- reading runs from DVC and git -----------------------------------------------------------
# How long dvc exp show is tried again while a queue worker starts or ends an experiment (a worker
# removes a task's files before Celery marks it done: seconds on a loaded machine).
SHOW_PATIENCE_S = 30.0


def exp_show(repo: Path, all_commits: bool = False) -> list[dict[str, Any]]:
    """The same records as ``dvc exp show --json`` (queued, failed and workspace rows hidden)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    blobio.install()
    deadline = time.monotonic() + SHOW_PATIENCE_S
    while True:
        try:
            with Repo(str(repo)) as dvc_repo:
                _skip_unreadable_active(dvc_repo.experiments.celery_queue)
                states = dvc_repo.experiments.show(
                    all_commits=all_commits, hide_queued=True, hide_failed=True, hide_workspace=True
                )
                return [state.dumpd() for state in states]
        except (DvcException, FileNotFoundError) as exc:
            # DVC 3.66 reads each active queued experiment's files under .dvc/tmp/exps (its .run info,
            # its temporary copy of the repository), which a worker creates and removes as it starts
            # and ends one: while a sweep runs (or its workers finish after a Ctrl-C), a read can miss
            # them. Tried again for SHOW_PATIENCE_S, then reported.
            transient = isinstance(exc, FileNotFoundError) or f"{Path('.dvc', 'tmp', 'exps')}" in str(exc)
            if not transient or time.monotonic() > deadline:
                raise OptlabError(f"cannot read experiments in {repo}: {exc}") from exc
            time.sleep(1.0)


def _skip_unreadable_active(celery_queue) -> None:
    """Leave out of ``show`` the queue tasks DVC counts as running whose ``.run`` file is gone: a
    worker killed (a Ctrl-C) after its executor ended but before Celery stored the result leaves
    one, active for ever, on which DVC's show fails every time. It holds no finished experiment.
    DVC internals, checked against dvc 3.67.1: ``collect_active_data`` loads the info file of each
    entry of ``self.iter_active()`` (tests/test_sweep.py::test_the_dvc_queue_internals_the_sweep_relies_on)."""
    active = celery_queue.iter_active
    celery_queue.iter_active = lambda: (
        e for e in active() if Path(celery_queue.get_infofile_path(e.stash_rev)).is_file()
    )


def iter_states(records: Iterable[dict[str, Any]], finished: bool = False) -> Iterable[dict[str, Any]]:
    """Every commit and experiment state in ``dvc exp show --json`` records (DVC 3 layout:
    baselines, each with ``experiments``: ranges of ``revs``, and the range's ``executor`` while
    a queue runs it). ``finished``: not the experiments still running (their metrics so far)."""
    for baseline in records:
        yield baseline
        for exp_range in baseline.get("experiments") or []:
            state = (exp_range.get("executor") or {}).get("state", "success")
            if not finished or state == "success":
                yield from exp_range.get("revs") or []


class UnusableRun(ValueError):
    """A run without what a comparison needs; the message says what is missing."""


def run_from_state(state: dict[str, Any], pipeline: Pipeline, curve: Sequence[float] = (),
                   seconds_per_epoch: float | None = None) -> Run:  # fmt: skip
    """Build a :class:`Run` from one ``dvc exp show --json`` state."""
    data = state.get("data") or {}
    if state.get("error"):
        raise UnusableRun(state["error"].get("msg", "DVC could not read it"))
    params = (data.get("params") or {}).get(PARAMS_FILE, {}).get("data")
    if not params:
        raise UnusableRun(f"no {PARAMS_FILE}")
    test_file = pipeline.test_metrics
    test = (data.get("metrics") or {}).get(test_file, {}).get("data") or {}
    metrics = {m: float(v) for m, v in flatten(test).items() if _is_number(v)}
    if "accuracy" not in metrics:
        raise UnusableRun(f"no accuracy in {test_file}")
    summary_file = f"{pipeline.live_dir}/{record.SUMMARY}"
    summary = (data.get("metrics") or {}).get(summary_file, {}).get("data") or {}
    deps = data.get("deps") or {}
    produced = set(data.get("outs") or {}) | set(data.get("metrics") or {})
    data_dep = pipeline.prepared_data
    # Code is what no stage produces; a dep at or under an output (plot reads the history
    # inside train's dvclive directory) is a result, and differs on every run.
    code = sorted((p, d.get("hash")) for p, d in deps.items() if not _under_any(p, produced) and p != data_dep)
    return Run(
        rev=state["rev"],
        name=state.get("name") or state["rev"][:7],
        params=with_defaults(flatten(params)),
        metrics=metrics,
        trainable_params=_number_or_none(summary.get("trainable_params")),
        seconds_per_epoch=seconds_per_epoch,
        data_hash=(deps.get(data_dep) or {}).get("hash"),
        code_hash=json.dumps(code),
        val_curve=tuple(curve),
        diverged=(summary.get("diverged") or 0) >= 1,
    )


def _under_any(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_or_none(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def read_at(repo: Path, rev: str, path: str | Path) -> str | None:
    """A git-tracked file's text as committed in ``rev`` (None if it is not there)."""
    shown = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=repo, capture_output=True, text=True, check=False)
    return shown.stdout if shown.returncode == 0 else None


def read_curve(repo: Path, rev: str, pipeline: Pipeline) -> list[float]:
    """The per-epoch validation accuracy that dvclive wrote, as committed in ``rev``."""
    return _series_at(repo, rev, record.history_file(pipeline.live_dir, "val_accuracy"))


def _series_at(repo: Path, rev: str, path: str | Path) -> list[float]:
    """A dvclive series committed at ``path`` in ``rev``, in step order (empty if it is not there)."""
    text = read_at(repo, rev, path)
    return [] if text is None else record.read_series(io.StringIO(text)).astype(float).tolist()


def replica_runs(run: Run, repo: Path, pipeline: Pipeline) -> list[Run]:
    """An experiment that trained several replicas, as one run per replica (its seed, its test
    metrics from the evaluate stage's per-replica table, its own validation curve); the run
    itself when it trained one."""
    import pandas as pd

    if int(run.params.get(REPLICAS_KEY) or 1) < 2 and not isinstance(run.params.get(RATE_KEY), list):
        return [run]
    try:
        table_path = pipeline.option("evaluate", "--replicas")
    except OptlabError:
        return [run]
    text = read_at(repo, run.rev, table_path)
    if text is None:
        return [run]
    table = pd.read_csv(io.StringIO(text))
    runs = []
    for row in table.to_dict("records"):
        r = int(row["replica"])
        metrics = {k: float(v) for k, v in row.items()
                   if k not in ("replica", "seed", "learning_rate", "diverged") and _is_number(v)}  # fmt: skip
        live = Path(pipeline.live_dir) / record.HISTORY_DIR / record.REPLICA_HISTORY / f"r{r}"
        curve = _series_at(repo, run.rev, live / f"{record.history_name('val_accuracy')}.tsv")
        params = {**run.params, SEED_KEY: int(row["seed"])}
        if "learning_rate" in row and _is_number(row["learning_rate"]):  # a member of a group of rates
            params[RATE_KEY] = float(row["learning_rate"])
        runs.append(replace(run, params=params, metrics=metrics, val_curve=tuple(curve), replica=r,
                            diverged=bool(row.get("diverged", 0))))  # fmt: skip
    return runs


def read_seconds_per_epoch(repo: Path, rev: str, pipeline: Pipeline) -> float | None:
    """The steady-state training time per epoch recorded in the run's ``run.json``."""
    text = read_at(repo, rev, f"{pipeline.live_dir}/{record.RUN_INFO}")
    try:
        return _number_or_none(json.loads(text)["timings"]["seconds_per_epoch"]) if text else None
    except (ValueError, KeyError, TypeError):
        return None


def read_choice_defaults(repo: Path, rev: str, params: dict[str, Any], conf_dir: str = "conf") -> dict[str, Any]:
    """The knobs each chosen group option has unless a run sets them (flattened:
    optimizer.momentum): the ones its conf/ file gave at ``rev``, and the schema's defaults of
    the others (adam's betas)."""
    import yaml

    defaults: dict[str, Any] = {}
    for group in CHOICES:
        name = params.get(f"{group}.name")
        schema_defaults = defaulted_knobs({f"{group}.name": name})
        defaults.update({k: v for k, v in schema_defaults.items() if k.startswith(f"{group}.")})
        text = read_at(repo, rev, f"{conf_dir}/{group}/{name}.yaml") if isinstance(name, str) else None
        if text:
            with contextlib.suppress(yaml.YAMLError, AttributeError):
                knobs = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "defaults"}  # Hydra's list
                defaults.update({f"{group}.{k}": v for k, v in knobs.items()})
    return defaults


def load_runs(repo: Path, all_commits: bool = False) -> tuple[list[Run], list[str]]:
    """Every committed run with test metrics in today's params layout, a note for each run that
    was skipped, and one for those left out for another layout (older commits')."""
    pipeline = Pipeline.load(repo)
    runs: list[Run] = []
    notes: list[str] = []
    other: list[tuple[str, str]] = []  # (run name, how its params differ) of another layout
    seen: set[str] = set()
    for state in iter_states(exp_show(repo, all_commits)):
        rev = state.get("rev", "")
        if rev in seen or rev == "workspace":
            continue
        seen.add(rev)
        name = state.get("name") or rev[:7]
        try:
            found = run_from_state(state, pipeline)
            layout = other_layout(found.params)
            if layout:
                other.append((name, layout))
                continue
            found = replace(
                found,
                val_curve=tuple(read_curve(repo, rev, pipeline)),
                seconds_per_epoch=read_seconds_per_epoch(repo, rev, pipeline),
                choice_defaults=read_choice_defaults(repo, rev, found.params),
            )
            runs += replica_runs(found, repo, pipeline)
        except UnusableRun as exc:
            notes.append(f"`{name}` skipped: {exc}")
    if other:
        (first, how), n = other[0], len(other)
        wanted = " and ".join(f"`{g}.name`" for g in CHOICES)
        counted = f"{n} experiments left out: their" if n > 1 else "1 experiment left out: its"
        notes.append(
            f"{counted} params have another layout than this commit's (e.g. `{first}` has {how} where this "
            f"commit's params.yaml has {wanted})."
        )
    return runs, notes


def resolve_rev(repo: Path, rev: str) -> str | None:
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return out.stdout.strip() or None


def find_baseline(groups: list[Group], repo: Path, baseline: str | None) -> Group:
    """The group holding ``baseline`` (an experiment name, a commit or a branch); HEAD's by default."""
    wanted = baseline or "HEAD"
    sha = resolve_rev(repo, wanted)
    for group in groups:
        for run in group.runs + group.repeats:
            if run.name == wanted or run.rev == sha or (len(wanted) >= 7 and run.rev.startswith(wanted)):
                return group
    names = ", ".join(sorted({r.name for g in groups for r in g.runs}))
    if baseline is None:
        raise OptlabError(
            f"HEAD has no committed test metrics: commit a `dvc repro` result, or pass --baseline with one of: {names}"
        )
    raise OptlabError(f"no run with test metrics matches --baseline {baseline!r}; runs: {names}")

"""The train stage's work: load prepared data, build, fit, log with dvclive, save.

Outputs appear only when training succeeded: dvclive writes into a temporary directory that
replaces the live directory at the end, and the model is renamed into place last. A run that
is killed leaves a per-epoch backup outside DVC's outputs, and the next run with the same
params and data resumes from its last completed epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

from optlab.backend import require_chosen

require_chosen(__name__)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optlab import artifacts  # noqa: E402
from optlab.backend import Engine  # noqa: E402
from optlab.errors import OptlabError  # noqa: E402
from optlab.loop import History, KeepBest, Loop, Progress, Replicas  # noqa: E402
from optlab.models import trainable_params  # noqa: E402
from optlab.optim import mode  # noqa: E402
from optlab.outputs import atomic_dir, atomic_file, remove_outputs, temporaries  # noqa: E402
from optlab.params import Params  # noqa: E402


def run_info(params: Params, engine: Engine, fingerprint: dict[str, str]) -> dict:
    """What produced this model: enough to re-create it or explain why it differs."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("keras", "jax", "jaxlib", "tensorflow", "numpy", "dvc", "dvclive", "optlab"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {
        "params": params.model_dump(),
        "backend": engine.backend,
        "loop": engine.loop,
        "engine_rule": engine.rule,
        "threads": os.environ.get("OPTLAB_THREADS", "0"),
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "data_sha256": fingerprint,
    }


# --- resuming --------------------------------------------------------------------------------
def backup_key(params: Params, fingerprint: dict[str, str]) -> str:
    """Resume only into a run with the same training params and the same data."""
    train_params = params.model_dump(exclude={"evaluate", "plot", "prepare", "dataset"})
    blob = json.dumps({"params": train_params, "data": fingerprint, "backend": keras.backend.backend()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Backup:
    """The state after the last completed epoch, and the history up to it, in one file.

    Every variable is saved: weights, batch-norm statistics, the dropout layers' RNG state
    (which ``get_weights()`` and ``.keras`` files leave out) and the optimizer's moments, step
    count and current rate, and keep_best's best weights so far, so a resumed run follows exactly
    the path of an uninterrupted one. One file, because replacing a file is atomic: a kill at any
    moment leaves either the previous epoch's backup or this one, never neither.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / f"{key}.npz"
        self.root = root

    @staticmethod
    def _variables(model: keras.Model) -> list:
        model.optimizer.build(model.trainable_variables)
        return [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]

    def save(self, models, histories, keep_bests=None) -> None:
        """``models``, ``histories``, ``keep_bests``: the replicas' (lists), or one run's."""
        models, histories, keep_bests = _listed(models, histories, keep_bests)
        values, states = {}, []
        for r, (model, history, keep) in enumerate(zip(models, histories, keep_bests, strict=True)):
            values |= {f"r{r}v{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(self._variables(model))}
            best = keep.best if keep is not None and keep.best is not None else []
            values |= {f"r{r}b{i}": w for i, w in enumerate(best)}
            states.append({
                "epochs": history.epochs, "seconds": history.seconds, "diagnostics": history.diagnostics,
                "stopped": history.stopped, "best_value": keep.best_value if keep is not None else None,
            })  # fmt: skip
        with atomic_file(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, history=np.array(json.dumps(states)), **values)

    def load(self, models, keep_bests=None, only: int | None = None):
        """Restore the replicas' state (``only``: replica ``only``'s, into the one model given) and
        return their histories; None when there is no backup, or one of another architecture."""
        single = isinstance(models, keras.Model)
        models, _, keep_bests = _listed(models, None, keep_bests)
        remove_outputs(*temporaries(self.path))  # a save cut short by a kill; the last whole one stays
        if not self.path.is_file():
            return None
        with np.load(self.path) as saved:
            states = json.loads(str(saved["history"]))
            replicas = range(len(states)) if only is None else [only]
            if not isinstance(states, list) or (only is None and len(states) != len(models)):
                return None  # another layout or number of replicas under the same key: start afresh
            histories = []
            for model, keep, r in zip(models, keep_bests, replicas, strict=True):
                variables = self._variables(model)
                n_v = sum(f.startswith(f"r{r}v") for f in saved.files)
                n_b = sum(f.startswith(f"r{r}b") for f in saved.files)
                if n_v != len(variables) or n_b not in (0, len(model.weights)):
                    return None  # another architecture under the same key
                for i, var in enumerate(variables):
                    var.assign(saved[f"r{r}v{i}"])
                state = states[r]
                if keep is not None and n_b:
                    keep.best_value, keep.best = state["best_value"], [saved[f"r{r}b{i}"] for i in range(n_b)]
                histories.append(History(state["epochs"], state["seconds"], diagnostics=state["diagnostics"],
                                         stopped=state["stopped"]))  # fmt: skip
        return histories[0] if single else histories

    def clear(self) -> None:
        remove_outputs(self.path)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def _listed(models, histories, keep_bests) -> tuple[list, list, list]:
    """One run's model, history and keep-best as the one-replica lists Backup stores."""
    if isinstance(models, keras.Model):
        models = [models]
        histories = None if histories is None else [histories]
        keep_bests = None if keep_bests is None else [keep_bests]
    return list(models), list(histories or [None] * len(models)), list(keep_bests or [None] * len(models))


# --- the stage ------------------------------------------------------------------------------
def _callbacks(
    params: Params, loop: Loop, logs_dir: Path, tensorboard: bool = True
) -> tuple[list[keras.callbacks.Callback], KeepBest | None]:
    callbacks: list[keras.callbacks.Callback] = []
    t = params.train
    if t.early_stopping:
        # keep_best restores the best epoch's weights whether or not training stops early.
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=t.monitor, mode=mode(t.monitor), patience=t.early_stopping)
        )
    keep_best = KeepBest(t.monitor, loop.all_evaluation_weights) if t.keep_best else None
    callbacks += [keep_best] if keep_best else []
    if t.tensorboard and tensorboard:
        # TensorBoard logs sit outside DVC's outputs; compare runs with `tensorboard --logdir logs`.
        name = os.environ.get("DVC_EXP_NAME") or f"{params.optimizer.name}-{params.schedule.name}-seed{params.seed}"
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(logs_dir / name)))
    return callbacks, keep_best


def best_epoch(history: History, params: Params) -> int:
    """1-based epoch with the best ``train.monitor`` (a diverged epoch's NaN never wins)."""
    monitor = params.train.monitor
    values = np.array(history.column(monitor), dtype=float)
    if np.isnan(values).all():
        return len(values)
    return int(np.nanargmin(values) if monitor.endswith("loss") else np.nanargmax(values)) + 1


def _finite(model: keras.Model) -> bool:
    return all(np.isfinite(keras.ops.convert_to_numpy(v.value)).all() for v in model.trainable_variables)


def _keep_last_finite_weights(loop: Loop, backup: Backup, r: int, meta: artifacts.PreparedMeta, n_train: int) -> str:
    """After replica ``r`` diverged, its model's weights are its own if finite, else the last
    epoch's (from the resume backup), else the initial ones. Says which."""
    if _finite(loop.model):
        return "the diverged epoch's own weights (finite)"
    restored = backup.load([loop.model], only=r)
    if restored is not None:
        return f"the weights after epoch {len(restored[0].epochs)}, the last finite one"
    fresh = Loop.build(loop.params, meta.input_shape, len(meta.classes), n_train, engine=False)  # same seed
    loop.model.set_weights(fresh.model.get_weights())
    loop.finished = True  # the optimizer's state is the diverged one: these weights are saved as they are
    return "the initial weights (the first epoch already diverged)"


def diagnostics_summary(history: History) -> dict[str, float]:
    """The two diagnostics `dvc exp show` gets as columns (the per-layer curves are plots): the
    largest update/weight ratio of the first epoch, and the largest dead ReLU fraction at the end."""
    if not history.diagnostics:
        return {}
    first, last = history.diagnostics[0], history.diagnostics[-1]
    dead = [d["dead_fraction"] for d in last.values() if d["dead_fraction"] is not None]
    summary = {"first_epoch_update_ratio": max(d["update_ratio"] for d in first.values())}
    if dead:
        summary["dead_unit_fraction"] = max(dead)
    return summary


def _mean(values: list[float]) -> float | int:
    """The replicas' mean; an integer when they all agree on one (epochs run, best epoch)."""
    if all(v == values[0] for v in values) and float(values[0]).is_integer():
        return int(values[0])
    return float(np.mean(values))


def run(
    params: Params,
    data_dir: str | Path,
    model_path: str | Path,
    live_dir: str | Path,
    backup_dir: str | Path,
    logs_dir: str | Path,
    replicas_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train as ``params`` says (``train.replicas`` runs, replica r with seed ``seed + r``); write
    replica 0's model to ``model_path``, every replica's to ``replicas_dir`` (``<r>.keras``), and
    the dvclive directory. Returns the summary.

    ``backup_dir`` holds the per-epoch resume state, ``logs_dir`` the TensorBoard logs (both
    outside DVC's outputs); ``progress`` prints a line per epoch as it ends."""
    model_path, live_dir = Path(model_path), Path(live_dir)
    replicas_dir = Path(replicas_dir) if replicas_dir is not None else None
    meta = artifacts.prepared_meta(data_dir)
    if meta.dataset != params.dataset:
        raise OptlabError(
            f"the prepared data is {meta.dataset!r} but params.yaml says dataset: {params.dataset}; "
            f"run `dvc repro` so download and prepare run again for {params.dataset}"
        )
    # Stale outputs go first: a failure below must not leave an old model beside new metrics.
    remove_outputs(model_path, live_dir, *([replicas_dir] if replicas_dir else []))

    data = artifacts.load_prepared(data_dir, ("train", "val"))
    train_split, val_split = data.splits["train"], data.splits["val"]
    group = Replicas.build(params, meta.input_shape, len(meta.classes), len(train_split.y))
    loops, n = group.loops, len(group.loops)
    lead = loops[0]
    fingerprint = artifacts.fingerprint(data_dir)
    backup = Backup(Path(backup_dir), backup_key(params, fingerprint))
    made = [_callbacks(lp.params, lp, Path(logs_dir), tensorboard=r == 0) for r, lp in enumerate(loops)]
    callbacks, keep_bests = [c for c, _ in made], [k for _, k in made]
    resumed = backup.load(group.models, keep_bests)
    histories = resumed if resumed is not None else [History() for _ in loops]
    # Counted now: fit() appends this run's epochs to the very History objects it resumes.
    epochs_before = [len(h.epochs) for h in histories]
    if resumed is not None:
        print(f"resuming from the backup of epoch {max(epochs_before)} in {backup.path}", flush=True)
    if params.train.diagnostics and lead.choice.loop != "compiled":
        print(
            f"note: no backprop diagnostics on train.loop {lead.choice.loop} (they are computed inside the compiled "
            "epoch); train with -S +train.backend=jax -S +train.loop=compiled to get them",
            flush=True,
        )
    info = {**run_info(params, lead.choice, fingerprint), "replica_seeds": [lp.params.seed for lp in loops]}
    log = artifacts.TrainLog(live_dir, info, replicas=n)
    try:
        # A resumed run's live directory starts again from the backup's epochs.
        for r, h in enumerate(histories):
            for i, logs in enumerate(h.epochs):
                log.log_replica(r, i + 1, logs, h.diagnostics[i] if i < len(h.diagnostics) else None)
        log.log_means(histories)

        def on_epoch(r: int, epoch: int, logs: dict, history: History) -> None:
            log.log_replica(r, epoch + 1, logs, history.diagnostics[-1] if history.diagnostics else None)

        def after_epoch(epoch: int) -> None:
            if not any(h.diverged for h in histories):  # a resume never starts from a diverged state
                backup.save(group.models, histories, keep_bests)
            log.log_means(histories)

        def shown(r: int) -> Progress | None:
            if not progress:
                return None
            if r < 0:
                return Progress(params.train.epochs, suffix=f" (mean of {n} replicas)")
            return Progress(params.train.epochs, prefix=f"replica {r}: " if n > 1 else "")

        group.fit(train_split, val_split, callbacks, histories, on_epoch, shown, after_epoch)
        log.log_means(histories, final=True)
        kept = [
            _keep_last_finite_weights(lp, backup, r, meta, len(train_split.y)) if h.diverged else ""
            for r, (lp, h) in enumerate(zip(loops, histories, strict=True))
        ]
        # The weights to save: keep_best's best epoch, or the last one's evaluation weights.
        group.finish(keep_bests)

        # Report 003's warning: the running accuracy above averages over changing weights and
        # dropout. Measure the final weights in inference mode too.
        inference = {name: group.measure(split) for name, split in (("train", train_split), ("val", val_split))}
        # Let go of the data before writing the outputs, so the end of the run does not add to
        # the peak set while training.
        del data, train_split, val_split
        each = []
        for r, (lp, h) in enumerate(zip(loops, histories, strict=True)):
            each.append({
                "replica": r, "seed": lp.params.seed, "epochs_run": len(h.epochs), "best_epoch": best_epoch(h, params),
                "train_accuracy": inference["train"][r]["accuracy"], "val_accuracy": inference["val"][r]["accuracy"],
                "diverged": int(bool(h.diverged)), **({"diverged_epoch": len(h.epochs)} if h.diverged else {}),
                **diagnostics_summary(h),
            })  # fmt: skip
        summary = {
            "trainable_params": trainable_params(lead.model),
            # Measured on the models saved, in inference mode (report 003's warning): the running
            # averages Keras logs per epoch are curves in the history, not these. With replicas,
            # each figure is their mean (replicas.json has each replica's).
            # (Training accuracy is in replicas.json: the test metrics' generalization gap holds it.)
            **{k: _mean([e[k] for e in each]) for k in ("epochs_run", "best_epoch", "val_accuracy")},
            "diverged": sum(e["diverged"] for e in each),  # how many replicas diverged
            **({"diverged_epoch": min(e["diverged_epoch"] for e in each if e["diverged"])} if any(kept) else {}),
            **{
                k: float(np.mean([e[k] for e in each if k in e]))
                for k in ("first_epoch_update_ratio", "dead_unit_fraction")
                if any(k in e for e in each)
            },
        }
        # Timings differ on every run: kept with the run's provenance, not among its metrics, so
        # an identical rerun changes no metric and reruns nothing downstream.
        seconds = histories[0].seconds if group.engine is not None else [t for h in histories for t in h.seconds]
        run_seconds = seconds[epochs_before[0] :] if group.engine is not None else seconds
        timings = {
            "train_seconds": round(float(sum(seconds)), 3),
            # Steady state: the first epoch of a process includes compiling the XLA program.
            # (A run resumed after its last epoch trained none here: fall back to the backup's times.)
            "seconds_per_epoch": round(float(np.median(run_seconds[1:] or run_seconds or seconds)), 4),
            "first_epoch_seconds": round(float(run_seconds[0]), 3) if run_seconds else 0.0,
        }
        why = {str(r): h.diverged for r, h in enumerate(histories) if h.diverged}
        log.finish(summary, {**info, "timings": timings, **({"diverged": why} if why else {})}, each)
        if replicas_dir is not None:
            with atomic_dir(replicas_dir) as tmp:
                for r, lp in enumerate(loops):
                    artifacts.save_model(lp.model, tmp / f"{r}.keras")
        artifacts.save_model(lead.model, model_path)  # last: its presence means the run completed
    except BaseException:
        log.abandon()  # nothing half-written: a failed run records nothing
        raise
    backup.clear()
    for r, (h, what) in enumerate(zip(histories, kept, strict=True)):
        if h.diverged:
            who = f"replica {r} (seed {loops[r].params.seed}): " if n > 1 else ""
            print(
                f"warning: {who}{h.diverged}\nRecorded as a result (train.on_divergence: record): the curves up to "
                f"epoch {len(h.epochs)} are in {live_dir}, the model holds {what}; set "
                "train.on_divergence: fail to stop the pipeline instead.",
                file=sys.stderr,
                flush=True,
            )
    return {**summary, **timings}

"""The train stage's work: load prepared data, build the members, fit, log with dvclive, save.

Outputs appear only when training succeeded: dvclive writes into a temporary directory that
replaces the live directory at the end, and the model is renamed into place last. A run that
is killed leaves a per-epoch backup outside DVC's outputs, and the next run with the same
params and data resumes from its last completed epoch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from optlab.core.errors import OptlabError
from optlab.core.outputs import atomic_dir, remove_outputs
from optlab.core.params import Params, improves
from optlab.data import files
from optlab.training import callbacks, record
from optlab.training.backend import keras
from optlab.training.backup import Backup, key
from optlab.training.loop import History, Member, fit, member_count, member_params, resolve_engine, trainer_for
from optlab.training.models import trainable_params


def best_epoch(history: History, monitor: str) -> int:
    """1-based epoch with the best ``monitor`` (a diverged epoch's NaN never wins)."""
    values = np.array(history.column(monitor), dtype=float)
    if np.isnan(values).all():
        return len(values)
    return int(np.nanargmin(values) if improves(monitor) == "min" else np.nanargmax(values)) + 1


def _keep_last_finite_weights(m: Member, backup: Backup, r: int, meta: files.PreparedMeta, steps: int) -> str:
    """After replica ``r`` diverged, its model's weights are its own if finite, else the last
    epoch's (from the resume backup), else the initial ones. Says which."""
    if all(np.isfinite(keras.ops.convert_to_numpy(v.value)).all() for v in m.model.trainable_variables):
        return "the diverged epoch's own weights (finite)"
    restored = backup.restore([m], only=r)
    if restored is not None:
        return f"the weights after epoch {len(restored[0].epochs)}, the last finite one"
    fresh = Member.build(m.params, meta.input_shape, len(meta.classes), steps)  # the same seed: the same start
    m.model.set_weights(fresh.model.get_weights())
    m.finished = True  # the optimizer's state is the diverged one: these weights are saved as they are
    return "the initial weights (the first epoch already diverged)"


def diagnostics_summary(history: History) -> dict[str, float]:
    """The two diagnostics `dvc exp show` gets as columns (the per-layer curves are plots): the
    largest update/weight ratio of the first epoch, and the largest dead ReLU fraction at the end."""
    if not history.diagnostics:
        return {}
    # Per layer (the whole model's series beside them, floats, are curves only).
    first, last = (
        [d for d in e.values() if isinstance(d, dict)] for e in (history.diagnostics[0], history.diagnostics[-1])
    )
    dead = [d["dead_fraction"] for d in last if d["dead_fraction"] is not None]
    summary = {"first_epoch_update_ratio": max(d["update_ratio"] for d in first)}
    if dead:
        summary["dead_unit_fraction"] = max(dead)
    return summary


def _mean(values: list[float]) -> float | int:
    """The replicas' mean; an integer when they all agree on one (epochs run, best epoch)."""
    if all(v == values[0] for v in values) and float(values[0]).is_integer():
        return int(values[0])
    return float(np.mean(values))


def summarize(members: list[Member], inference: dict[str, list[dict]], kept: list[str]) -> tuple[dict, list[dict]]:
    """The run's summary (the DVC metrics of the train stage: the replicas' means) and each
    replica's own figures (replicas.json)."""
    each, grouped = [], len({m.params.optimizer.learning_rate for m in members}) > 1
    for r, m in enumerate(members):
        h = m.history
        # a member of a group of rates: its own rate, which tells it apart (optlab compare's variant)
        group = {"learning_rate": m.params.optimizer.learning_rate} if grouped else {}
        each.append({
            "replica": r, "seed": m.params.seed, **group, "epochs_run": len(h.epochs),
            "best_epoch": best_epoch(h, m.params.train.monitor),
            "train_accuracy": inference["train"][r]["accuracy"], "val_accuracy": inference["val"][r]["accuracy"],
            "diverged": int(bool(h.diverged)), **({"diverged_epoch": len(h.epochs)} if h.diverged else {}),
            **diagnostics_summary(h),
        })  # fmt: skip
    summary = {
        "trainable_params": trainable_params(members[0].model),
        # Measured on the models saved, in inference mode (report 003's warning): the running
        # averages Keras logs per epoch are curves in the history, not these. With replicas, each
        # figure is their mean (replicas.json has each replica's; training accuracy is there and in
        # the test metrics' generalization gap).
        **{k: _mean([e[k] for e in each]) for k in ("epochs_run", "best_epoch", "val_accuracy")},
        "diverged": sum(e["diverged"] for e in each),  # how many replicas diverged
        **({"diverged_epoch": min(e["diverged_epoch"] for e in each if e["diverged"])} if any(kept) else {}),
        **{k: float(np.mean([e[k] for e in each if k in e])) for k in ("first_epoch_update_ratio", "dead_unit_fraction")
           if any(k in e for e in each)},
    }  # fmt: skip
    return summary, each


def timings(members: list[Member], epochs_before: list[int]) -> dict[str, float]:
    """Timings differ on every run: kept with the run's provenance (run.json), not among its
    metrics, so an identical rerun changes no metric and reruns nothing downstream. The members
    train together: the longest-running one's epochs are the run's."""
    r = max(range(len(members)), key=lambda r: len(members[r].history.seconds))
    seconds = members[r].history.seconds
    here = seconds[epochs_before[r] :]  # this process's epochs (a resumed run trained the others before)
    return {
        "train_seconds": round(float(sum(seconds)), 3),
        # Steady state: the first epoch of a process includes compiling the XLA program (a run
        # resumed after its last epoch trained none here: fall back to the backup's times).
        "seconds_per_epoch": round(float(np.median(here[1:] or here or seconds)), 4),
        "first_epoch_seconds": round(float(here[0]), 3) if here else 0.0,
    }


def build_members(params: Params, meta: files.PreparedMeta, steps: int, logs_dir: Path) -> list[Member]:
    """The run's members (``optimizer.learning_rate``'s rates x ``train.replicas`` seeds), each
    with its callbacks."""
    members, group = [], len(params.optimizer.rates) > 1
    for r in range(member_count(params)):
        m = Member.build(member_params(params, r), meta.input_shape, len(meta.classes), steps, peaked=group)
        m.callbacks, m.keep_best = callbacks.build(m.params, m.all_evaluation_weights, logs_dir if r == 0 else None)
        members.append(m)
    return members


def resume(members: list[Member], backup: Backup) -> list[int]:
    """Restore the members from the resume backup, if there is one for this run; the epochs each had."""
    restored = backup.restore(members)
    for m, history in zip(members, restored or [], strict=False):
        m.history = history
    epochs = [len(m.history.epochs) for m in members]
    if restored is not None:
        print(f"resuming from the backup of epoch {max(epochs)} in {backup.path}", flush=True)
    return epochs


def save_models(members: list[Member], model_path: Path, replicas_dir: str | Path | None) -> None:
    """Every replica's model into ``replicas_dir``, then replica 0's as ``model_path``: last, so its
    presence means the run completed."""
    if replicas_dir is not None:
        with atomic_dir(replicas_dir) as tmp:
            for r, m in enumerate(members):
                record.save_model(m.model, tmp / f"{r}.keras")
    record.save_model(members[0].model, model_path)


def run(params: Params, data_dir: str | Path, model_path: str | Path, live_dir: str | Path, backup_dir: str | Path,
        logs_dir: str | Path, replicas_dir: str | Path | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Train as ``params`` says (``train.replicas`` runs, replica r with seed ``seed + r``); write
    replica 0's model to ``model_path``, every replica's to ``replicas_dir`` (``<r>.keras``), and
    the dvclive directory. Returns the summary. ``backup_dir`` holds the per-epoch resume state,
    ``logs_dir`` the TensorBoard logs and the trajectory (train.trajectory; both outside DVC's
    outputs); ``progress`` prints a line per epoch as it ends."""
    model_path, live_dir = Path(model_path), Path(live_dir)
    meta = files.prepared_meta(data_dir)
    if meta.dataset != params.dataset:
        raise OptlabError(
            f"the prepared data is {meta.dataset!r} but params.yaml says dataset: {params.dataset}; "
            f"run `dvc repro` so download and prepare run again for {params.dataset}"
        )
    # Stale outputs go first: a failure below must not leave an old model beside new metrics.
    remove_outputs(model_path, live_dir, *([replicas_dir] if replicas_dir else []))
    data = files.load_prepared(data_dir, ("train", "val"))
    train, val = data.splits["train"], data.splits["val"]
    choice, steps = resolve_engine(params), math.ceil(len(train.y) / params.train.batch_size)
    members = build_members(params, meta, steps, Path(logs_dir))
    fingerprint = files.fingerprint(data_dir)
    backup = Backup(Path(backup_dir), key(params, fingerprint))
    epochs_before = resume(members, backup)
    if params.train.diagnostics and choice.loop != "compiled":
        print(f"note: no backprop diagnostics on train.loop {choice.loop} (they are computed inside the compiled "
              "epoch); train with -S +train.backend=jax -S +train.loop=compiled to get them", flush=True)  # fmt: skip
    info = {**record.run_info(params, choice, fingerprint), "replica_seeds": [m.params.seed for m in members]}
    log = record.TrainLog(live_dir, info, replicas=len(members))
    try:
        log.replay([m.history for m in members])  # a resumed run's live directory starts from the backup's epochs
        trainer, trajectory = trainer_for(members, train, val), Trajectory(members[0], logs_dir)
        shown = callbacks.Progress(params.train.epochs, suffix=_mean_of(params, len(members)))
        fit(members, trainer, shown if progress else None, _after_epoch(log, backup, members, trajectory))
        log.log_means([m.history for m in members], final=True)
        kept = [_keep_last_finite_weights(m, backup, r, meta, steps) if m.history.diverged else ""
                for r, m in enumerate(members)]  # fmt: skip
        for m in members:  # the weights to save: keep_best's best epoch, or the last one's evaluation weights
            m.finish()
        # Report 003's warning: the running accuracy averages over changing weights and dropout.
        # Measure the final weights in inference mode too.
        inference = {"train": trainer.measure(train), "val": trainer.measure(val)}
        del data, train, val, trainer  # the data goes before the outputs are written: no higher peak
        summary, each = summarize(members, inference, kept)
        spent = timings(members, epochs_before)
        why = {str(r): m.history.diverged for r, m in enumerate(members) if m.history.diverged}
        log.finish(summary, {**info, "timings": spent, **({"diverged": why} if why else {})}, each)
        save_models(members, model_path, replicas_dir)
        trajectory.save()
    except BaseException:
        log.abandon()  # nothing half-written: a failed run records nothing
        raise
    backup.clear()
    _warn_diverged(members, kept, live_dir)
    return {**summary, **spent}


class Trajectory:
    """With train.trajectory, replica 0's evaluation weights before its first epoch here and after
    each epoch it runs, saved when the run completes (record.save_trajectory) for `optlab landscape`'s
    PCA plane; a stale one goes when a run starts. A resumed run's starts where it resumed."""

    def __init__(self, member: Member, logs_dir: str | Path) -> None:
        self.member, self.logs_dir, self.on = member, Path(logs_dir), member.params.train.trajectory
        self.epochs: list[int] = []
        self.weights: list[np.ndarray] = []
        remove_outputs(self.logs_dir / record.TRAJECTORY)
        self.add()

    def add(self) -> None:
        ran = len(self.member.history.epochs)
        if self.on and (not self.epochs or self.epochs[-1] < ran):  # a stopped replica 0 adds nothing
            self.epochs.append(ran)
            self.weights.append(np.concatenate([w.ravel() for w in self.member.evaluation_weights()]))

    def save(self) -> None:
        if self.on:
            record.save_trajectory(self.logs_dir, self.epochs, self.weights, self.member.params)


def _after_epoch(log: record.TrainLog, backup: Backup, members: list[Member], trajectory: Trajectory):
    """What runs once every member holds an epoch: its rows in the log, the trajectory, the backup."""

    def after_epoch(epoch: int) -> None:
        log.log_members(epoch, [m.history for m in members])
        trajectory.add()
        if not any(m.history.diverged for m in members):  # a resume never starts from a diverged state
            backup.save(members)

    return after_epoch


def _mean_of(params: Params, n: int) -> str:
    rates = len(params.optimizer.rates)
    if n == 1:
        return ""
    return f" (mean of {n} replicas)" if rates == 1 else f" (mean of {n} members: {rates} rates x {n // rates} seeds)"


def _warn_diverged(members: list[Member], kept: list[str], live_dir: Path) -> None:
    for r, (m, what) in enumerate(zip(members, kept, strict=True)):
        if m.history.diverged:
            lr = m.params.optimizer.learning_rate
            who = f"replica {r} (seed {m.params.seed}, learning rate {lr}): " if len(members) > 1 else ""
            print(f"warning: {who}{m.history.diverged}\nRecorded as a result (train.on_divergence: record): the "
                  f"curves up to epoch {len(m.history.epochs)} are in {live_dir}, the model holds {what}; set "
                  "train.on_divergence: fail to stop the pipeline instead.", file=sys.stderr, flush=True)  # fmt: skip

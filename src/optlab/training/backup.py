"""The resume backup: the state after the last completed epoch, outside DVC's outputs.

A run that is killed leaves it, and the next run with the same training params, data and backend
(:func:`key`) resumes from its last completed epoch and ends exactly as an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optlab.core.outputs import atomic_file, remove_outputs, temporaries
from optlab.core.params import Params
from optlab.training.backend import keras
from optlab.training.loop import History, Member


def key(params: Params, fingerprint: dict[str, str]) -> str:
    """Resume only into a run with the same training params and the same data."""
    train_params = params.model_dump(exclude={"evaluate", "plot", "prepare", "dataset"})
    blob = json.dumps({"params": train_params, "data": fingerprint, "backend": keras.backend.backend()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _variables(model: keras.Model) -> list:
    model.optimizer.build(model.trainable_variables)
    return [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]


class Backup:
    """Every member's variables and history in one file.

    Every variable is saved: weights, batch-norm statistics, the dropout layers' RNG state
    (which ``get_weights()`` and ``.keras`` files leave out) and the optimizer's moments, step
    count and current rate, and keep_best's best weights so far, so a resumed run follows exactly
    the path of an uninterrupted one. One file, because replacing a file is atomic: a kill (or a
    full disk) at any moment leaves either the previous epoch's backup or this one, never neither.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.path = Path(root), Path(root) / f"{key}.npz"

    def save(self, members: Sequence[Member]) -> None:
        values, states = {}, []
        for r, m in enumerate(members):
            values |= {f"r{r}v{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(_variables(m.model))}
            keep = m.keep_best
            values |= {f"r{r}b{i}": w for i, w in enumerate(keep.best if keep is not None and keep.best else [])}
            h = m.history
            states.append({"epochs": h.epochs, "seconds": h.seconds, "diagnostics": h.diagnostics, "stopped": h.stopped,
                           "best_value": keep.best_value if keep is not None else None})  # fmt: skip
        with atomic_file(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, history=np.array(json.dumps(states)), **values)

    def restore(self, members: Sequence[Member], only: int | None = None) -> list[History] | None:
        """Restore the members' variables (and keep-best's best so far) and return their histories
        (``only``: replica ``only``'s variables, into the one member given); None when there is no
        backup, or one of another architecture."""
        remove_outputs(*temporaries(self.path))  # a save cut short by a kill; the last whole one stays
        if not self.path.is_file():
            return None
        with np.load(self.path) as saved:
            states = json.loads(str(saved["history"]))
            replicas = range(len(states)) if only is None else [only]
            if not isinstance(states, list) or (only is None and len(states) != len(members)):
                return None  # another layout or number of replicas under the same key: start afresh
            histories = []
            for m, r in zip(members, replicas, strict=True):
                variables = _variables(m.model)
                n_v = sum(f.startswith(f"r{r}v") for f in saved.files)
                n_b = sum(f.startswith(f"r{r}b") for f in saved.files)
                if n_v != len(variables) or n_b not in (0, len(m.model.weights)):
                    return None  # another architecture under the same key
                for i, var in enumerate(variables):
                    var.assign(saved[f"r{r}v{i}"])
                state = states[r]
                if m.keep_best is not None and n_b and only is None:
                    m.keep_best.best_value = state["best_value"]
                    m.keep_best.best = [saved[f"r{r}b{i}"] for i in range(n_b)]
                histories.append(History(state["epochs"], state["seconds"], diagnostics=state["diagnostics"],
                                         stopped=state["stopped"]))  # fmt: skip
        return histories

    def clear(self) -> None:
        remove_outputs(self.path)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

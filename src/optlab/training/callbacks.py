"""The Keras callbacks a run uses, built in one place (:func:`build`), and what the terminal shows
while training (:class:`Progress`).

The epoch driver (``optlab.training.loop.fit``) calls them between epochs on both loops, as
Keras's ``fit`` would: early stopping, ReduceLROnPlateau, keep-best and TensorBoard act alike
whether the epoch was one compiled program or Keras's own.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

from optlab.core.params import Params, improves
from optlab.training.backend import keras


class KeepBest(keras.callbacks.Callback):
    """``train.keep_best``: after each epoch, a copy of the model's evaluation weights (what it is
    saved with; schedule-free AdamW's average) when ``monitor`` is the best so far. Kept in the
    resume backup, so a resumed run keeps the same best epoch as an uninterrupted one."""

    def __init__(self, monitor: str, weights: Callable[[], list[np.ndarray]]) -> None:
        super().__init__()
        self.monitor, self.weights = monitor, weights
        self.lower = improves(monitor) == "min"
        self.best_value: float | None = None
        self.best: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.monitor, math.nan))
        if math.isfinite(value) and (
            self.best_value is None or (value < self.best_value if self.lower else value > self.best_value)
        ):
            self.best_value, self.best = value, self.weights()


def build(params: Params, weights: Callable[[], list[np.ndarray]], logs_dir: Path | None = None
          ) -> tuple[list[keras.callbacks.Callback], KeepBest | None]:  # fmt: skip
    """One run's callbacks, in the order they act on an epoch's logs, and its keep-best (or None).
    ``weights`` gives the evaluation weights keep-best copies; ``logs_dir``: where TensorBoard
    writes, when ``train.tensorboard`` (None: no TensorBoard, e.g. for replicas after the first)."""
    t, s = params.train, params.schedule
    callbacks: list[keras.callbacks.Callback] = []
    if s.name == "plateau":  # the rate stays a plain variable: Keras's callback cuts it
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=s.monitor, mode=improves(s.monitor), factor=s.factor, patience=s.patience, min_lr=s.min_lr,
        ))  # fmt: skip
    if t.early_stopping:  # keep_best restores the best epoch whether or not training stops early
        callbacks.append(keras.callbacks.EarlyStopping(monitor=t.monitor, mode=improves(t.monitor),
                                                       patience=t.early_stopping))  # fmt: skip
    keep_best = KeepBest(t.monitor, weights) if t.keep_best else None
    callbacks += [keep_best] if keep_best else []
    if t.tensorboard and logs_dir is not None:
        # Outside DVC's outputs; compare runs with `tensorboard --logdir logs`.
        name = os.environ.get("DVC_EXP_NAME") or f"{params.optimizer.name}-{params.schedule.name}-seed{params.seed}"
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(logs_dir / name)))
    return callbacks, keep_best


class Progress:
    """What the terminal shows while training: one line per epoch as it ends, and inside an epoch
    that takes more than a few seconds a bar at each quarter, flushed at once (DVC passes the
    stage's output through as it comes, and `dvc queue logs` keeps it)."""

    SLOW = 2.0  # seconds into the epoch before its first quarter mark: shorter epochs get no bar

    def __init__(self, epochs: int, stream: TextIO | None = None, suffix: str = "") -> None:
        """``suffix``: what each epoch's line ends with (several members: that it is their mean)."""
        self.epochs, self.stream, self.suffix = epochs, stream or sys.stdout, suffix
        self.epoch, self.started, self.next_mark, self.width = 0, 0.0, 0.25, len(str(epochs))

    def on_epoch_begin(self, epoch: int) -> None:
        self.epoch, self.started, self.next_mark = epoch, time.perf_counter(), 0.25

    def steps_done(self, done: int, total: int) -> None:
        if done >= total or done / total < self.next_mark:
            return
        elapsed = time.perf_counter() - self.started
        if elapsed >= self.SLOW * self.next_mark / 0.25:
            bar = "#" * round(20 * done / total)
            self._print(f"  epoch {self.epoch + 1:>{self.width}}/{self.epochs} [{bar:<20}] {done / total:4.0%} of "
                        f"{total:,} steps, {elapsed:.1f} s")  # fmt: skip
        while done / total >= self.next_mark:
            self.next_mark += 0.25

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        train = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "learning_rate" and not k.startswith("val_"))
        val = ", ".join(f"val {k[4:]} {v:.4f}" for k, v in logs.items() if k.startswith("val_"))
        lr = logs.get("learning_rate", math.nan)
        self._print(f"epoch {epoch + 1:>{self.width}}/{self.epochs}: {train}; {val}; lr {lr:.3g}; "
                    f"{time.perf_counter() - self.started:.2f} s{self.suffix}")  # fmt: skip

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

"""``optlab lr-find``: the learning-rate range test (Smith 2015; the "LR finder" of fastai and
PyTorch Lightning) for the experiment in params.yaml.

The experiment's model, optimizer (with its knobs and gradient clipping), batch size, seed and
training data, trained for up to ``steps`` batches while the learning rate grows exponentially
from ``start`` to ``end``; it stops once the smoothed loss passes ``diverge`` times its minimum,
or rises back above where it started. Two suggestions are read off the smoothed loss against the rate:

- ``min_over_10``: a tenth of the rate at the lowest loss (fastai's classic rule of thumb: the
  minimum is already too fast to train at for long);
- ``steepest``: the rate where the loss falls fastest per decade of rate, before the minimum.

The suggestion printed as a command is ``min_over_10``, the steadier of the two (the steepest
point moves with the noise of a few batches). It is a command, not a DVC stage: it answers
"which rate should I try?" before an experiment, takes seconds rather than being cached, and as a
stage it would rerun on every change of optimizer, model or batch size, adding about a quarter to
an ordinary ``dvc exp run`` of the default MLP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optlab.core.errors import OptlabError
from optlab.core.outputs import atomic_file, write_json
from optlab.core.params import Params
from optlab.data import files
from optlab.evaluation import figures
from optlab.training.backend import keras
from optlab.training.loop import Member, epoch_order

# Rates in the optimizer's own units, one per step, over at most STEPS batches: 25 steps a decade.
# The suggestions depend on that pace (a slower sweep finds the blow-up at lower rates): on the
# default MLP, 300 steps suggested 4-7e-3 for SGD with momentum against 1.1-1.6e-2 at 200.
START, END, STEPS = 1e-7, 10.0, 200
DIVERGE = 4.0  # stop once the smoothed loss passes this many times its minimum
SMOOTHING = 0.93  # exponential moving average of the loss, bias-corrected: about the last 14 steps,
# half a decade of rates (fastai's 0.98 lags the blow-up by two decades at this pace)
SKIP_START = 10  # steps whose smoothed loss is still mostly the first batches' (not read)


@dataclass
class RangeTest:
    """The rates tried, the loss at each, and what they suggest."""

    optimizer: str
    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each step's mean training loss
    smoothed: list[float] = field(default_factory=list)
    stopped: str = ""  # why it ended before ``steps``, if it did
    conclusive: bool = True  # False when the loss never blew up: no rate was found too high
    suggestions: dict[str, float] = field(default_factory=dict)

    @property
    def suggested(self) -> float:
        return self.suggestions["min_over_10"]

    def command(self) -> str:
        return f"dvc exp run -S optimizer={self.optimizer} -S optimizer.learning_rate={self.suggested:.2g}"

    def as_json(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "suggestions": self.suggestions,
            "suggested": self.suggested,
            "command": self.command(),
            "stopped": self.stopped,
            "conclusive": self.conclusive,
            "curve": [
                {"learning_rate": r, "loss": loss, "smoothed_loss": s}
                for r, loss, s in zip(self.rates, self.losses, self.smoothed, strict=True)
            ],
        }


def suggest(rates: list[float], smoothed: list[float]) -> dict[str, float]:
    """``min_over_10`` and ``steepest`` (see the module's docstring) from a smoothed curve."""
    rates_a, loss = np.asarray(rates, float), np.asarray(smoothed, float)
    if len(loss) <= SKIP_START + 2:
        raise OptlabError(
            f"the range test stopped after {len(loss)} steps, too few to read: the loss blew up at once "
            f"(from a rate of {rates[0]:.2g}); try a lower start (--start)"
        )
    lowest = SKIP_START + int(np.nanargmin(loss[SKIP_START:]))
    # d loss / d log10(rate) on the descent: from where the loss has fallen a tenth of the way from
    # its flat start to its minimum (before that, the noise of single batches makes slopes of its
    # own) down to the minimum; its most negative point.
    flat, low = float(np.max(loss[SKIP_START : lowest + 1])), float(loss[lowest])
    falling = np.flatnonzero(loss[SKIP_START : lowest + 1] < flat - 0.1 * (flat - low))
    top = max(SKIP_START, SKIP_START + int(falling[0]) - 1) if len(falling) else lowest
    slope = np.gradient(loss[top : lowest + 1], np.log10(rates_a[top : lowest + 1])) if lowest - top > 1 else []
    steepest = top + int(np.argmin(slope)) if len(slope) else lowest
    return {"min_over_10": float(rates_a[lowest] / 10), "steepest": float(rates_a[steepest])}


def _batches(params: Params, n: int) -> Iterator[np.ndarray]:
    """The experiment's batches in its own order (epoch after epoch if one is not enough)."""
    bs, epoch = params.train.batch_size, 0
    while True:
        order = epoch_order(params.seed, epoch, n)
        for i in range(n // bs):
            yield order[i * bs : (i + 1) * bs]
        epoch += 1


def run(params: Params, data_dir: str | Path, start: float = START, end: float = END, steps: int = STEPS,
        diverge: float = DIVERGE) -> RangeTest:  # fmt: skip
    """The range test of ``params``'s experiment on the prepared data in ``data_dir``."""
    if not 0 < start < end:
        raise OptlabError(f"the range test needs 0 < --start < --end, got {start} and {end}")
    if steps < 2 * SKIP_START:
        raise OptlabError(f"--steps must be at least {2 * SKIP_START}, got {steps}")
    if keras.backend.backend() != "jax":
        raise OptlabError("the range test runs on the compiled loop: configure the jax backend first")
    from optlab.training import engine

    meta = files.prepared_meta(data_dir)
    train = files.load_prepared(data_dir, ("train",)).splits["train"]
    if len(train.y) < params.train.batch_size:
        raise OptlabError(f"{len(train.y)} training images are fewer than one batch of {params.train.batch_size}")
    # start * (end / start) ** (step / (steps - 1)): exponential growth, one rate per step.
    rate = keras.optimizers.schedules.ExponentialDecay(start, decay_steps=steps - 1, decay_rate=end / start)
    if params.optimizer.name == "schedule_free_adamw":
        params = params.model_copy(update={"optimizer": params.optimizer.model_copy(update={"warmup_epochs": 0.0})})
    member = Member.build(params, meta.input_shape, len(meta.classes), steps_per_epoch=1, rate=rate)
    compiled = engine.Engine([member.model], params.train.batch_size, eval_rows=1024)
    batches = _batches(params, len(train.y))
    losses = compiled.batch_losses(engine.to_device(train.x), engine.to_device(train.y),
                                   (next(batches) for _ in range(steps)))  # fmt: skip
    result = _follow(RangeTest(params.optimizer.name), losses, start, end, steps, diverge)
    result.suggestions = suggest(result.rates, result.smoothed)
    if not result.stopped:
        result.stopped = (
            f"the loss never rose up to {result.rates[-1]:.3g}: nothing was found to stay below, so the "
            "suggestions are not meaningful (Adafactor caps its own steps at 1/sqrt(step) of the weights' RMS)"
            if result.optimizer == "adafactor"
            else f"the loss never rose up to {result.rates[-1]:.3g}: try a higher --end"
        )
        result.conclusive = False
    return result


def _follow(result: RangeTest, losses, start: float, end: float, steps: int, diverge: float) -> RangeTest:
    """Record each step's rate and loss until the smoothed loss blows up (or the steps run out)."""
    average, best, first = 0.0, math.inf, math.inf
    for i, loss in enumerate(losses):
        result.rates.append(float(start * (end / start) ** (i / (steps - 1))))
        result.losses.append(loss)
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        result.smoothed.append(smoothed)
        if not math.isfinite(smoothed):
            result.stopped = f"the loss is no longer finite at a rate of {result.rates[-1]:.3g}"
            result.rates, result.losses, result.smoothed = result.rates[:-1], result.losses[:-1], result.smoothed[:-1]
            break
        if i == SKIP_START:
            first = smoothed
        best = min(best, smoothed) if i >= SKIP_START else best
        if i >= SKIP_START and smoothed > diverge * best:
            result.stopped = f"the smoothed loss passed {diverge:g}x its minimum at a rate of {result.rates[-1]:.3g}"
            break
        # A model that unlearned (dead ReLUs: a constant guess scores about ln(classes), which can
        # be under 4x the minimum) is as far as the test can go.
        if i > SKIP_START and best < 0.8 * first and smoothed > first:
            result.stopped = f"the smoothed loss rose back above its start at a rate of {result.rates[-1]:.3g}"
            break
    return result


# --- the figure ------------------------------------------------------------------------------
def draw(
    rates: Sequence[float], smoothed: Sequence[float], suggestions: Mapping[str, float], optimizer: str, path: Path
) -> None:
    """The smoothed training loss against the learning rate (log axis), the suggestions marked."""
    fig = figures.figure(7, 4.2)
    ax = fig.subplots()
    ax.plot(rates, smoothed, color=figures.TRAIN_COLOR, label="training loss (smoothed)")
    styles = {"min_over_10": ("tab:green", "a tenth of the minimum's rate"), "steepest": ("tab:red", "steepest fall")}
    for name, rate in suggestions.items():
        color, what = styles.get(name, ("0.4", name))
        ax.axvline(rate, color=color, linestyle="--", linewidth=1, label=f"{what}: {rate:.2g}")
    ax.set_xscale("log")
    low, high = np.nanmin(smoothed), np.nanmax(smoothed)
    ax.set_ylim(low - 0.05 * (high - low), min(high, 4 * low) + 0.05 * (high - low))
    ax.set_xlabel("learning rate (grown exponentially, one step each)")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_title(f"Learning-rate range test: {optimizer}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    figures.save(fig, path)


def save(result: RangeTest, out: str | Path) -> tuple[Path, Path]:
    """``<out>.json`` (the curve and the suggestions) and ``<out>.png`` (the figure)."""
    out = Path(out)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    with atomic_file(png_path) as tmp:  # creates the directory; a failure leaves no half-drawn figure
        draw(result.rates, result.smoothed, result.suggestions, result.optimizer, tmp)
    write_json(json_path, result.as_json())
    return json_path, png_path

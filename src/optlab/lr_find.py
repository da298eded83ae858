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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optlab.backend import require_chosen

require_chosen(__name__)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optlab import artifacts, models, optim  # noqa: E402
from optlab.errors import OptlabError  # noqa: E402
from optlab.loop import epoch_order, to_device  # noqa: E402
from optlab.params import Params  # noqa: E402

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


def run(
    params: Params,
    data_dir: str | Path,
    start: float = START,
    end: float = END,
    steps: int = STEPS,
    diverge: float = DIVERGE,
) -> RangeTest:
    """The range test of ``params``'s experiment on the prepared data in ``data_dir``."""
    if not 0 < start < end:
        raise OptlabError(f"the range test needs 0 < --start < --end, got {start} and {end}")
    if steps < 2 * SKIP_START:
        raise OptlabError(f"--steps must be at least {2 * SKIP_START}, got {steps}")
    if keras.backend.backend() != "jax":
        raise OptlabError("the range test runs on the compiled loop: configure the jax backend first")
    from optlab.engine import CompiledEngine

    meta = artifacts.prepared_meta(data_dir)
    train = artifacts.load_prepared(data_dir, ("train",)).splits["train"]
    if len(train.y) < params.train.batch_size:
        raise OptlabError(f"{len(train.y)} training images are fewer than one batch of {params.train.batch_size}")
    # start * (end / start) ** (step / (steps - 1)): exponential growth, one rate per step.
    rate = keras.optimizers.schedules.ExponentialDecay(start, decay_steps=steps - 1, decay_rate=end / start)
    if params.optimizer.name == "schedule_free_adamw":
        params = params.model_copy(update={"optimizer": params.optimizer.model_copy(update={"warmup_epochs": 0.0})})
    optimizer = optim.build_optimizer(params, rate, steps_per_epoch=1)
    model = models.build_model(params.model, meta.input_shape, len(meta.classes), params.seed)
    models.compile_model(model, optimizer)
    engine = CompiledEngine(model, params.train.batch_size, models.INFERENCE_ROWS)
    x, y = to_device(train.x), to_device(train.y)

    result = RangeTest(params.optimizer.name)
    average, best, first = 0.0, math.inf, math.inf
    batches = _batches(params, len(train.y))
    for i, loss in enumerate(engine.batch_losses(x, y, (next(batches) for _ in range(steps)))):
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


def save(result: RangeTest, out: str | Path) -> tuple[Path, Path]:
    """``<out>.json`` (the curve and the suggestions) and ``<out>.png`` (the figure)."""
    from optlab import plotting
    from optlab.outputs import atomic_file, write_json

    out = Path(out)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    with atomic_file(png_path) as tmp:  # creates the directory; a failure leaves no half-drawn figure
        plotting.lr_range_test(result.rates, result.smoothed, result.suggestions, result.optimizer, tmp)
    write_json(json_path, result.as_json())
    return json_path, png_path

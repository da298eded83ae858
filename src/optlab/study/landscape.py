"""``optlab landscape``: the loss along a line and on a plane through weight space, for a trained
experiment (the workspace's, or one named with ``--exp``) on its prepared data.

- **The line from the initial to the final weights** (Goodfellow et al. 2015, "Qualitatively
  characterizing neural network optimization problems"): training and validation loss and accuracy
  at (1 - α) w0 + α w1 for α from -0.25 to 1.25; w0 rebuilt from the seed (``Member.build``
  builds exactly the weights the train stage started from), w1 the saved model.
- **The line between two experiments' final weights** (``--against``: an SGD and an Adam solution,
  say): a barrier between them means two minima, a flat line one connected valley.
- **A plane** around the final weights w1 + a δ + b η (Li et al. 2018, "Visualizing the loss
  landscape of neural nets"): δ, η random Gaussian directions, *filter-normalized* (each filter,
  the weights into one unit or one output channel, rescaled to the norm of the model's filter),
  zero for biases and batch-norm scales and offsets, batch-norm statistics kept at the model's
  (their ``--xignore biasbn``, evaluated in inference mode), a, b in [-1, 1].
- **The training trajectory** (train.trajectory): random directions in a space of 10^5 weights
  are nearly orthogonal to the path (Li et al., section 7), so the path is drawn on the plane of
  its own two principal components around w1 (PCA of the per-epoch weights minus w1), with the
  loss contours of that plane.

Along the lines the batch-norm statistics are interpolated with the weights, so both ends are the
two models exactly. Losses are in inference mode with the L2 penalties, as Keras evaluates them.
Writes reports/landscape/ (PNGs and landscape.json). It is a command rather than a DVC stage: it
answers a question about one or two finished runs, and as a stage it would rerun after every
training run for a figure most runs never need.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from optlab.core.errors import OptlabError
from optlab.core.outputs import write_json
from optlab.core.params import Params, validate_params
from optlab.data import files
from optlab.training import engine, models, record
from optlab.training.backend import keras
from optlab.training.loop import Member, member_params

ALPHAS = np.arange(-5, 26) / 20  # -0.25 ... 1.25 in steps of 0.05: both ends exact, a margin past them
POINTS, SPAN = 25, 1.0  # the plane: points per side, over [-SPAN, SPAN] in units of filter-normalized steps
TRAIN_IMAGES = 10_000  # training images each point is evaluated on (the first of the split)
MARGIN = 0.25  # the trajectory's plane: beyond the path's extent on each side, as a fraction of it
AT_ONCE = 25  # weight points evaluated by one compiled call (vmapped)


@dataclass(frozen=True)
class Solution:
    """A trained model and the params that trained it."""

    name: str  # "workspace", or the experiment or revision it was read from
    params: Params
    model: keras.Model


@dataclass(frozen=True)
class Point:
    """Every weight of a model: the trainable ones flat, the non-trainable ones as arrays."""

    flat: np.ndarray
    rest: list[np.ndarray]

    @classmethod
    def of(cls, model: keras.Model) -> Point:
        flat = np.concatenate([np.ravel(keras.ops.convert_to_numpy(v.value)) for v in model.trainable_variables])
        return cls(
            flat.astype(np.float32), [keras.ops.convert_to_numpy(v.value) for v in model.non_trainable_variables]
        )

    def toward(self, other: Point, alpha: float) -> Point:
        """(1 - α) self + α other; the non-float variables (a dropout seed) are ``other``'s."""
        rest = [(1 - alpha) * a + alpha * b if np.issubdtype(a.dtype, np.floating) else b
                for a, b in zip(self.rest, other.rest, strict=True)]  # fmt: skip
        return Point((1 - alpha) * self.flat + alpha * other.flat, [np.asarray(r, a.dtype) for r, a in
                                                                    zip(rest, self.rest, strict=True)])  # fmt: skip


class Evaluator:
    """Inference-mode loss (with the L2 penalties) and accuracy of one split at many weight points of
    one architecture: ``engine.predict``, vmapped over AT_ONCE points per compiled call."""

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
        shapes = [tuple(v.shape) for v in model.trainable_variables]
        sizes = [int(np.prod(s)) for s in shapes]
        p = engine.Program(model, None, (), 0, models.INFERENCE_ROWS, False)
        at = list(models.EPOCH_METRICS).index("accuracy")

        def one(flat, rest, x, y):
            tv = [part.reshape(s) for part, s in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), shapes, strict=True)]
            loss, sums, _ = engine.predict(p, tv, rest, x, y)
            return loss, sums[at] / y.shape[0]

        self.x, self.y = engine.to_device(np.ascontiguousarray(x)), engine.to_device(np.ascontiguousarray(y))
        self._many = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))

    def __call__(self, points: list[Point]) -> tuple[np.ndarray, np.ndarray]:
        losses, accuracies = [], []
        for i in range(0, len(points), AT_ONCE):
            chunk = points[i : i + AT_ONCE]
            chunk = chunk + [chunk[-1]] * (AT_ONCE - len(chunk))  # one shape: one compiled program
            rest = [np.stack(parts) for parts in zip(*(p.rest for p in chunk), strict=True)]
            loss, accuracy = self._many(np.stack([p.flat for p in chunk]), rest, self.x, self.y)
            losses.append(np.asarray(loss))
            accuracies.append(np.asarray(accuracy))
        n = len(points)
        return np.concatenate(losses)[:n].astype(float), np.concatenate(accuracies)[:n].astype(float)


# --- directions ------------------------------------------------------------------------------------
def filter_normalized(model: keras.Model, rng: np.random.Generator) -> np.ndarray:
    """A random Gaussian direction (flat, as Point.flat) with each filter rescaled to the norm of the
    model's: a Dense kernel's columns (the weights into one unit), a Conv2D kernel's output
    channels; 0 for every variable of one dimension (biases, batch-norm scales and offsets)."""
    parts = []
    for v in model.trainable_variables:
        w = keras.ops.convert_to_numpy(v.value).astype(np.float64)
        d = rng.standard_normal(w.shape)
        if w.ndim <= 1:
            d = np.zeros_like(w)
        else:
            axes = tuple(range(w.ndim - 1))  # Keras keeps the output units (filters) on the last axis
            d *= np.linalg.norm(w, axis=axes, keepdims=True) / (np.linalg.norm(d, axis=axes, keepdims=True) + 1e-10)
        parts.append(d.ravel())
    return np.concatenate(parts).astype(np.float32)


def principal_plane(weights: np.ndarray, center: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The two principal directions (unit rows) of the path ``weights`` (one row per epoch) about
    ``center``, the path's coordinates on them, and the share of its variance each explains."""
    deltas = weights.astype(np.float64) - center
    _, values, vt = np.linalg.svd(deltas, full_matrices=False)
    directions = vt[:2]
    shares = (values[:2] ** 2 / max(float(np.sum(values**2)), 1e-30)).tolist()
    return directions.astype(np.float32), deltas @ directions.T, shares


def grid(evaluate: Evaluator, center: Point, d1: np.ndarray, d2: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Loss and accuracy at center + a_i d1 + b_j d2, as (len(b), len(a)) arrays (rows: b)."""
    points = [Point(center.flat + ai * d1 + bj * d2, center.rest) for bj in b for ai in a]
    loss, accuracy = evaluate(points)
    return loss.reshape(len(b), len(a)), accuracy.reshape(len(b), len(a))


def line(train: Evaluator, val: Evaluator, start: Point, end: Point, alphas: np.ndarray = ALPHAS) -> dict:
    """Training and validation loss and accuracy along (1 - α) start + α end."""
    points = [start.toward(end, float(a)) for a in alphas]
    (train_loss, train_acc), (val_loss, val_acc) = train(points), val(points)
    return {"alpha": alphas.tolist(), "train_loss": train_loss.tolist(), "train_accuracy": train_acc.tolist(),
            "val_loss": val_loss.tolist(), "val_accuracy": val_acc.tolist()}  # fmt: skip


# --- the solutions: trained models and where they started ---------------------------------------
def load_solution(repo: Path, rev: str | None, model_path: str, meta: files.PreparedMeta) -> Solution:
    """The model and params of the workspace (``rev`` None) or of an experiment or git revision, its
    model read from DVC's cache at that revision (``dvc.api.open``, no checkout)."""
    import yaml

    if rev is None:
        raw, name = yaml.safe_load((repo / "params.yaml").read_text()), "workspace"
        return Solution(
            name, validate_params(raw, "params.yaml", repo / "conf"), record.load_model(repo / model_path, meta)
        )
    import dvc.api
    from dvc.scm import SCM, RevError, resolve_rev

    try:
        sha = resolve_rev(SCM(str(repo)), rev)
    except RevError:
        raise OptlabError(f"no experiment, branch or commit named {rev!r} here (dvc exp show lists them)") from None
    try:
        raw = yaml.safe_load(dvc.api.read("params.yaml", repo=str(repo), rev=sha))
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "model.keras"
            local.write_bytes(dvc.api.read(model_path, repo=str(repo), rev=sha, mode="rb"))
            model = record.load_model(local, meta)
    except (OSError, ValueError) as exc:  # not in the cache: pulled from nowhere, or never committed
        raise OptlabError(
            f"{rev}: cannot read {model_path} at {sha[:7]} ({exc}); `dvc exp pull` or `dvc pull` it"
        ) from None
    return Solution(rev, validate_params(raw, f"params.yaml at {rev}", repo / "conf"), model)


def initial_point(solution: Solution, meta: files.PreparedMeta) -> Point:
    """The weights ``solution`` started from: its model built again from its seed (replica 0's)."""
    params = member_params(solution.params, 0)
    built = Member.build(params, meta.input_shape, len(meta.classes), steps_per_epoch=1).model
    _same_architecture(built, solution)
    return Point.of(built)


def _same_architecture(model: keras.Model, solution: Solution) -> None:
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    theirs = [tuple(v.shape) for v in solution.model.trainable_variables]
    if shapes != theirs:
        raise OptlabError(f"{solution.name}'s model has weights of shapes {theirs}, not {shapes}: one line or "
                          "plane needs one architecture (the same model.* params)")  # fmt: skip


def _as_json(params: Params) -> dict:
    return json.loads(json.dumps(params.model_dump(), sort_keys=True))


def trajectory_of(solution: Solution, logs_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, weights) of the trajectory the train stage kept for this very run, if it kept one."""
    found = record.read_trajectory(logs_dir)
    if found is None:
        return None
    epochs, weights, params = found
    if params not in (_as_json(solution.params), _as_json(member_params(solution.params, 0))):
        return None  # another run's
    return (epochs, weights) if weights.shape[1] == Point.of(solution.model).flat.shape[0] else None


# --- the command ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Where:
    """What the command reads, as dvc.yaml names it (optlab.study.pipeline), and where it writes."""

    repo: Path
    data: Path  # the prepared data
    model: str  # the trained model, relative to the repository (the train stage's --model)
    logs: Path  # the train stage's logs directory (its trajectory)
    out: Path


def run(where: Where, exp: str | None = None, against: str | None = None, points: int = POINTS,
        span: float = SPAN, train_images: int = TRAIN_IMAGES, seed: int = 0) -> dict:  # fmt: skip
    """Every line and plane the options ask for, drawn and written to ``where.out``; the values."""
    meta = files.prepared_meta(where.data)
    data = files.load_prepared(where.data, ("train", "val"))
    train, val = data.splits["train"], data.splits["val"]
    final = load_solution(where.repo, exp, where.model, meta)
    n = min(train_images, len(train.y))
    evaluate = Evaluator(final.model, train.x[:n], train.y[:n]), Evaluator(final.model, val.x, val.y)
    end, seconds, found = Point.of(final.model), {}, {"train_images": n, "solution": final.name}
    started = time.perf_counter()
    found["line"] = {"from": "initial weights", "to": final.name, **line(*evaluate, initial_point(final, meta), end)}
    if against is not None:
        other = load_solution(where.repo, against, where.model, meta)
        _same_architecture(final.model, other)
        found["between"] = {"from": other.name, "to": final.name, **line(*evaluate, Point.of(other.model), end)}
    seconds["lines"] = time.perf_counter() - started
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    d1, d2 = filter_normalized(final.model, rng), filter_normalized(final.model, rng)
    coords = np.linspace(-span, span, points)
    loss, accuracy = grid(evaluate[0], end, d1, d2, coords, coords)
    found["plane"] = {"a": coords.tolist(), "b": coords.tolist(), "train_loss": loss.tolist(),
                      "train_accuracy": accuracy.tolist(), "seed": seed}  # fmt: skip
    seconds["plane"] = time.perf_counter() - started
    path = trajectory_of(final, where.logs)
    if path is not None:
        started = time.perf_counter()
        found["trajectory"] = _trajectory_plane(evaluate[0], end, *path, points)
        seconds["trajectory_plane"] = time.perf_counter() - started
    found["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    found["figures"] = draw(found, where.out)
    write_json(where.out / "landscape.json", found)
    return found


def _trajectory_plane(evaluate: Evaluator, end: Point, epochs: np.ndarray, weights: np.ndarray, points: int) -> dict:
    directions, path, shares = principal_plane(weights, end.flat)
    low, high = path.min(axis=0), path.max(axis=0)
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    pad = MARGIN * np.maximum(high - low, 1e-6)
    a, b = (
        np.linspace(low[0] - pad[0], high[0] + pad[0], points),
        np.linspace(low[1] - pad[1], high[1] + pad[1], points),
    )
    loss, accuracy = grid(evaluate, end, directions[0], directions[1], a, b)
    return {"a": a.tolist(), "b": b.tolist(), "train_loss": loss.tolist(), "train_accuracy": accuracy.tolist(),
            "epochs": epochs.tolist(), "path": path.tolist(), "explained": shares}  # fmt: skip


def summary(found: dict) -> str:
    """A few lines on what the landscape shows, for the terminal."""
    lines = []
    for key in ("line", "between"):
        if key in found:
            v = found[key]
            inside = [loss for a, loss in zip(v["alpha"], v["train_loss"], strict=True) if 0 <= a <= 1]
            lines.append(f"{v['from']} -> {v['to']}: training loss {inside[0]:.4g} -> {inside[-1]:.4g}, highest "
                         f"between them {max(inside):.4g}")  # fmt: skip
    plane = np.asarray(found["plane"]["train_loss"])
    lines.append(
        f"plane ({plane.shape[1]} x {plane.shape[0]} points): training loss {plane.min():.4g} to {plane.max():.4g}"
    )
    if "trajectory" in found:
        shares = found["trajectory"]["explained"]
        lines.append(
            f"trajectory plane: its 2 principal directions explain {shares[0]:.0%} and {shares[1]:.0%} of the path"
        )
    else:
        lines.append("no trajectory of this run in its logs (train with -S +train.trajectory=true to draw it)")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in found["seconds"].items()))
    return "\n".join(lines)


# --- the figures --------------------------------------------------------------------------------------
def draw(found: dict, out: Path) -> list[str]:
    """The PNGs of ``found`` (what :func:`run` measured) in ``out``; their names."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = {"line.png": functools.partial(_line, found["line"])}
    if "between" in found:
        drawn["between.png"] = functools.partial(_line, found["between"])
    drawn["plane.png"] = functools.partial(_plane, found["plane"], "filter-normalized random direction")
    if "trajectory" in found:
        drawn["trajectory.png"] = functools.partial(_plane, found["trajectory"], "principal direction of the path")
    for name, fn in drawn.items():
        fn(out / name, found["train_images"])
    return list(drawn)


def _line(values: dict, path: Path, train_images: int) -> None:
    from optlab.evaluation import figures

    fig = figures.figure(11, 4.2)
    axes = fig.subplots(1, 2)
    alpha = np.asarray(values["alpha"])
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss (nats)"), (axes[1], "accuracy", "accuracy")):
        ax.plot(alpha, values[f"train_{key}"], color=figures.TRAIN_COLOR, label=f"training ({train_images:,} images)")
        ax.plot(alpha, values[f"val_{key}"], color=figures.VAL_COLOR, label="validation")
        for x in (0, 1):
            ax.axvline(x, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"α: 0 = {values['from']}, 1 = {values['to']}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if max(values["train_loss"]) / max(min(values["train_loss"]), 1e-12) > 20:
        axes[0].set_yscale("log")
    inside = [v for a, v in zip(alpha, values["train_loss"], strict=True) if 0 <= a <= 1]
    barrier = max(inside) - max(inside[0], inside[-1])
    top = f"highest inside {max(inside):.3g}, {max(barrier, 0):.3g} above the higher end"
    axes[0].set_title(f"Loss along the line: {top}", fontsize=10)
    axes[1].set_title("Accuracy along the line", fontsize=10)
    axes[1].legend(fontsize=9, frameon=False)
    fig.suptitle(f"(1 - α) · {values['from']} + α · {values['to']} (Goodfellow et al. 2015), inference mode")
    figures.save(fig, path)


def _plane(values: dict, direction: str, path: Path, train_images: int) -> None:
    from matplotlib.colors import LogNorm

    from optlab.evaluation import figures

    fig = figures.figure(7.5, 6.2)
    ax = fig.subplots()
    a, b, loss = np.asarray(values["a"]), np.asarray(values["b"]), np.asarray(values["train_loss"])
    levels = np.geomspace(max(loss.min(), 1e-4), max(loss.max(), 2e-4), 16)  # log-spaced: the valley floor resolved
    filled = ax.contourf(a, b, np.maximum(loss, levels[0]), levels=levels, norm=LogNorm(), cmap="viridis")
    ax.contour(a, b, loss, levels=levels, colors="white", linewidths=0.3, alpha=0.5)
    fig.colorbar(filled, ax=ax, ticks=levels[::3], format="%.3g",
                 label=f"training loss (nats, {train_images:,} images; log colour scale)")  # fmt: skip
    ax.plot(
        [0],
        [0],
        "*",
        color="red",
        ms=12,
        label=f"the final weights (loss {loss[np.abs(b).argmin(), np.abs(a).argmin()]:.3g})",
    )
    shares = values.get("explained")
    if "path" in values:
        xy = np.asarray(values["path"])
        ax.plot(xy[:, 0], xy[:, 1], "o-", color="white", ms=3, lw=1, label="the training path, one dot per epoch")
        ax.annotate(
            f"epoch {values['epochs'][0]}", xy[0], color="white", fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    names = [
        f"{direction} {i + 1}" + (f" ({shares[i]:.0%} of the path's variance)" if shares else "") for i in range(2)
    ]
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(fontsize=8, loc="upper right")
    what = "PCA of the per-epoch weights" if shares else "Li et al. 2018; biases and batch-norm held"
    ax.set_title(f"Training loss on a plane through the final weights ({what})", fontsize=10)
    figures.save(fig, path)

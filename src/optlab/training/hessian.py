"""Why a run trains as it does: the curvature of its training loss and the noise of its gradients,
measured by the compiled engine at the end of an epoch, per member (``jax.vmap`` over the member
axis, as every function of ``optlab.training.engine``).

- **sharpness**: the top eigenvalue of the Hessian of the training loss at the current weights, on
  the first ``train.sharpness_images`` training images, by Lanczos iteration on Hessian-vector
  products (forward-over-reverse: ``jax.linearize`` of ``jax.grad``, so each product costs one
  tangent pass, the primal pass being shared). Gradient descent at rate η is stable on a
  quadratic only while it is below 2/η (Cohen et al. 2021, "Gradient descent on neural networks
  typically occurs at the edge of stability"); with momentum β, (2 + 2β)/η, Nesterov's
  (2 + 2β)/((1 + 2β)η) (their appendix).
- **preconditioned sharpness** (adaptive optimizers): the top eigenvalue of P^-1/2 H P^-1/2, P the
  diagonal the optimizer divides its step by, read from its variables (Cohen et al. 2022,
  "Adaptive gradient methods at the edge of stability"), against the threshold of the step's
  momentum form: (2 + 2β1)/((1 - β1)η) for Adam, 38/η at β1 = 0.9.
- **gradient noise scale** B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An empirical model of
  large-batch training"), from the per-example gradients (``jax.vmap`` of ``jax.grad``) of the
  first ``train.noise_scale_images`` training images, with the unbiased estimators of their
  appendix A.1. It estimates the critical batch size: past it, a larger batch buys little speed.

All of them take the loss in inference mode (dropout off, batch-norm at its moving statistics, the
L2 penalties included), as PyHessian does (``model.eval()`` before its power iteration): the loss
must be one deterministic function of the weights for its Hessian to have eigenvalues at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from optlab.training import preconditioning
from optlab.training.backend import keras

# Lanczos iterations (one Hessian-vector product each) from a fixed random start. The top Ritz value
# rises to the top eigenvalue from below; it stops once an iteration moves it by under LANCZOS_TOL.
# The top eigenvalue of a cross-entropy Hessian is an outlier, well apart from the rest: on the
# default MLP on Fashion-MNIST 6 iterations agreed with 40 to 3 digits at every epoch of SGD and Adam
# runs (tests/test_diagnostics.py checks 1% against the exact Hessian of a small model).
LANCZOS_STEPS, LANCZOS_TOL = 20, 1e-3
# Per-example gradients computed at once (each squared and summed where it is made, never stored):
# 8 ran 1.8x faster than 128 on the default MLP (8 of its gradients, 3.5 MB, stay in cache).
PER_EXAMPLE_CHUNK = 8
LOSS = keras.losses.SparseCategoricalCrossentropy()
SERIES = ("sharpness", "stability_threshold", "preconditioned_sharpness", "preconditioned_threshold",
          "noise_scale", "gradient_noise", "gradient_signal")  # fmt: skip


# --- the mathematics, on flat vectors ------------------------------------------------------------
def lanczos_top(matvec: Callable[[jax.Array], jax.Array], start: jax.Array, steps: int = LANCZOS_STEPS,
                tol: float = LANCZOS_TOL) -> jax.Array:  # fmt: skip
    """The largest eigenvalue of the symmetric operator ``matvec``: the top Ritz value of Lanczos
    iterations from ``start`` (with full reorthogonalization: in float32 the plain three-term
    recurrence loses orthogonality and repeats the top eigenvalue as ghosts), stopped once it moves
    by less than ``tol`` (relative) in an iteration, or after ``steps``."""
    basis = jnp.zeros((steps + 1, start.shape[0]), start.dtype).at[0].set(start / jnp.linalg.norm(start))
    zeros = jnp.zeros(steps, start.dtype)

    def top(alphas, betas):  # of the tridiagonal so far (the rows not reached are 0: eigenvalues 0)
        return jnp.linalg.eigvalsh(jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1))[-1]

    def step(carry):
        j, basis, alphas, betas, _, ritz = carry
        w = matvec(basis[j])
        alphas = alphas.at[j].set(jnp.vdot(basis[j], w))
        for _ in range(2):  # twice is enough (Kahan and Parlett's rule for Gram-Schmidt)
            w = w - basis.T @ (basis @ w)  # rows past j are zero: only the vectors so far count
        beta = jnp.linalg.norm(w)
        nxt = jnp.where(beta > 0, w / jnp.where(beta > 0, beta, 1.0), 0.0)  # 0: an invariant subspace, done
        betas = betas.at[j].set(beta)
        return j + 1, basis.at[j + 1].set(nxt), alphas, betas, ritz, top(alphas, betas.at[j].set(0.0))

    def going(carry):
        j, _, _, _, before, ritz = carry
        return (j < steps) & ((j < 3) | (jnp.abs(ritz - before) > tol * jnp.abs(ritz)))

    inf = jnp.array(jnp.inf, start.dtype)
    return jax.lax.while_loop(going, step, (0, basis, zeros, zeros, -inf, inf))[-1]


def noise_components(square_norms: Callable[[jax.Array], jax.Array], mean_square_norm: jax.Array, n: int,
                     chunk: int) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """tr(Σ) and |G|², unbiased, from the per-example gradients g_i of ``n`` examples: with m the
    mean of |g_i|² (``square_norms(first)``: their sum over the ``chunk`` examples from ``first``)
    and ḡ their mean (``mean_square_norm``: |ḡ|²), tr(Σ) = n/(n-1) (m - |ḡ|²) and
    |G|² = (n|ḡ|² - m)/(n-1) (McCandlish et al. 2018, appendix A.1, with B_small = 1, B_big = n)."""
    mean_square = jnp.sum(jax.lax.map(square_norms, jnp.arange(0, n, chunk))) / n
    return n / (n - 1) * (mean_square - mean_square_norm), (n * mean_square_norm - mean_square) / (n - 1)


def chunk_size(n: int) -> int:
    """The largest divisor of ``n`` up to PER_EXAMPLE_CHUNK (the chunks must all be one size)."""
    return next(k for k in range(min(n, PER_EXAMPLE_CHUNK), 0, -1) if n % k == 0)


# --- one member's measurements -------------------------------------------------------------------
def _square_norm(arrays) -> jax.Array:
    return sum(jnp.sum(jnp.square(a)) for a in arrays)


def inference_loss(model: keras.Model, tv, ntv, x, y):
    """The mean training loss of ``x`` in inference mode, with the L2 penalties."""
    probs, _, reg = model.stateless_call(tv, ntv, x, training=False, return_losses=True)
    return LOSS(y, probs) + (sum(reg) if reg else 0.0)


def _start(fixed: jax.Array, grad: jax.Array) -> jax.Array:
    """Lanczos's first vector: a fixed random one plus the gradient, both of unit length. The
    gradient lies mostly in the top eigenvectors' span (Gur-Ari et al. 2018), and it cut the
    iterations by a fifth on the default MLP; the random part reaches whatever it misses."""
    norm = jnp.linalg.norm(grad)
    return fixed / jnp.linalg.norm(fixed) + jnp.where(norm > 0, grad / jnp.where(norm > 0, norm, 1.0), 0.0)


def measure(model: keras.Model, scale: Callable | None, sharp: int, noise: int, chunk: int, tv, ntv, ov, x, y):
    """One member's sharpness (and preconditioned sharpness, with ``scale``: P from its state) on
    the first ``sharp`` examples of (x, y), and the noise components on the first ``noise``."""
    flat, unravel = ravel_pytree(tv)
    found = {}
    if sharp:
        xs, ys = x[:sharp], y[:sharp]
        # The primal pass (forward and backward) once; each product is a tangent pass of it.
        grad, hvp = jax.linearize(jax.grad(lambda w: inference_loss(model, unravel(w), ntv, xs, ys)), flat)
        fixed = jax.random.normal(jax.random.key(0), flat.shape, flat.dtype)  # the same every epoch
        found["sharpness"] = lanczos_top(hvp, _start(fixed, grad), LANCZOS_STEPS)
        if scale is not None:  # the eigenvalues of P^-1 H are those of the symmetric P^-1/2 H P^-1/2
            s = jax.lax.rsqrt(ravel_pytree(scale(tv, ov))[0])
            top = lanczos_top(lambda v: s * hvp(s * v), _start(fixed, s * grad), LANCZOS_STEPS)
            found["preconditioned_sharpness"] = top
    if noise:
        loss = jax.grad(lambda t, xs, ys: inference_loss(model, t, ntv, xs, ys))

        def square_norms(first):  # each example's gradient, squared and summed on the spot: fused, never stored
            xs, ys = (jax.lax.dynamic_slice_in_dim(a, first, chunk) for a in (x, y))
            return jnp.sum(jax.vmap(lambda xi, yi: _square_norm(loss(tv, xi[None], yi[None])))(xs, ys))

        # ḡ, the mean of the per-example gradients, is the gradient of their mean loss
        mean = _square_norm(loss(tv, x[:noise], y[:noise]))
        found["gradient_noise"], found["gradient_signal"] = noise_components(square_norms, mean, noise, chunk)
    return found


@dataclass(frozen=True)
class Settings:
    """What to measure (train.sharpness_images, train.noise_scale_images, train.curvature_every)."""

    sharpness_images: int
    noise_scale_images: int
    every: int  # epochs

    @classmethod
    def of(cls, train) -> Settings:
        return cls(train.sharpness_images, train.noise_scale_images, train.curvature_every)


class Curvature:
    """The end-of-epoch measurements of every member, one compiled program vmapped over the member
    axis of the engine's state (the training data shared)."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, settings: Settings,
                 n_train: int) -> None:  # fmt: skip
        self.settings = settings
        self.sharp = min(settings.sharpness_images, n_train)
        self.noise = min(settings.noise_scale_images, n_train) if settings.noise_scale_images > 1 else 0
        self.pre = preconditioning.preconditioner(optimizer) if self.sharp else None
        self.factor = preconditioning.gradient_descent_factor(optimizer)
        chunk = chunk_size(self.noise) if self.noise else 0
        fn = functools.partial(measure, model, self.pre.scale if self.pre else None, self.sharp, self.noise, chunk)
        self._measure = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None, None)))

    @property
    def active(self) -> bool:
        return bool(self.sharp or self.noise)

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 0) is measured: every ``every``-th, and the first."""
        return self.active and (epoch == 0 or (epoch + 1) % self.settings.every == 0)

    def __call__(self, state, x: jax.Array, y: jax.Array, rates: Sequence[float]) -> list[dict[str, float | None]]:
        """Per member: the series of SERIES it measured, thresholds at its epoch's mean rate ``rates[r]``."""
        tv, ntv, ov = state
        found = {k: np.asarray(v, dtype=float) for k, v in self._measure(tv, ntv, ov, x, y).items()}
        rows = []
        for r, rate in enumerate(rates):
            row: dict[str, float | None] = {k: float(v[r]) for k, v in found.items()}
            if "sharpness" in row:
                row["stability_threshold"] = self.factor / rate
            if "preconditioned_sharpness" in row:
                row["preconditioned_threshold"] = self.pre.factor / rate
            if "gradient_signal" in row:  # |G|² estimated at or below 0: noise swamps the signal, B undefined
                signal = row["gradient_signal"]
                row["noise_scale"] = row["gradient_noise"] / signal if signal > 0 else None
            rows.append({k: row[k] for k in SERIES if k in row})
        return rows

"""How an optimizer scales its step, read from its Keras variables: the stability threshold of the
step's momentum form, and the diagonal preconditioner of an adaptive optimizer (what
``optlab.training.hessian`` measures the sharpness against).

On a quadratic of curvature λ an update w -= η P^-1 d is stable while λ(P^-1 H) stays below c/η,
c set by how d follows the gradient (Cohen et al. 2021 and 2022):

- d the gradient (gradient descent, RMSprop, Adagrad): c = 2;
- heavy-ball momentum β (Keras's SGD, RMSprop with momentum): c = 2 + 2β; Nesterov's: (2 + 2β)/(1 + 2β);
- an exponential moving average m of the gradients with β1 (Adam, Adamax, LAMB): c = (2 + 2β1)/(1 - β1),
  38 at β1 = 0.9; Nadam's Nesterov form of it, β1 m + (1 - β1) g: c = (2 + 2β1)/((1 + 2β1)(1 - β1)).

P is Cohen et al. 2022's: for Adam, P_t = (1 - β1^t) diag(sqrt(v_t / (1 - β2^t)) + ε), t the steps
taken, so that the step is η P_t^-1 m_t; with ε where Keras's Adam puts it (added to sqrt(v_t)
before the bias correction: ε / sqrt(1 - β2^t) in the paper's terms), so P is exactly the matrix
Keras's step divides by. Weight decay (AdamW's decoupled decay, any optimizer's weight_decay) and
gradient clipping are left out, as in the paper. Optimizers with no fixed diagonal preconditioner
(SGD, Lion's sign, Muon's orthogonalization, Adafactor's RMS-clipped factored step, Adadelta,
schedule-free AdamW's interpolation, FTRL) get none.

Private Keras attributes, checked against Keras 3.15.1: the optimizers keep their slots in
``_momentums`` and ``_velocities`` (Adam, AdamW, Nadam, LAMB; ``_velocity_hats`` with amsgrad), ``_m``
and ``_u`` (Adamax), ``_velocities`` and ``_average_gradients`` (RMSprop), ``_accumulators``
(Adagrad), one per trainable variable in order. tests/test_diagnostics.py::
test_the_preconditioner_is_what_the_keras_step_divides_by fails if any of that changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp

from optlab.training.backend import keras


@dataclass(frozen=True)
class Preconditioner:
    """An adaptive optimizer's P, as a function of one member's (trainable, optimizer) arrays."""

    scale: Callable[[Sequence, Sequence], list]  # -> P per trainable variable, its shape
    factor: float  # the stability threshold of the preconditioned sharpness is factor / η


def ema_factor(beta_1: float) -> float:
    """c of an exponential moving average of the gradients: (2 + 2β1)/(1 - β1)."""
    return (2 + 2 * beta_1) / (1 - beta_1)


def gradient_descent_factor(optimizer: keras.optimizers.Optimizer) -> float:
    """c in the threshold c/η of the sharpness itself: SGD's, with its momentum; 2 (gradient
    descent's) for any other optimizer, a reference line rather than its own threshold."""
    beta = float(getattr(optimizer, "momentum", 0.0) or 0.0) if isinstance(optimizer, keras.optimizers.SGD) else 0.0
    if getattr(optimizer, "nesterov", False) and beta:
        return (2 + 2 * beta) / (1 + 2 * beta)
    return 2 + 2 * beta


def _slots(optimizer, name: str) -> list[int]:
    """Where each variable of the optimizer's attribute ``name`` is in ``optimizer.variables``."""
    at = {id(v): i for i, v in enumerate(optimizer.variables)}
    found = getattr(optimizer, name)
    return [at[id(v)] for v in (found if isinstance(found, list | tuple) else [found])]


def _floats(optimizer, *names: str) -> list[float]:
    return [float(getattr(optimizer, n)) for n in names]


def _adam_like(optimizer, momentum: str, second: str, lamb: bool = False) -> Callable:
    """P = (1 - β1^t) (sqrt(v / (1 - β2^t)) + ε / sqrt(1 - β2^t)), Adam's (with LAMB's trust ratio
    ||w|| / ||m̂ / (sqrt(v̂) + ε)|| per variable dividing it)."""
    beta_1, beta_2, eps = _floats(optimizer, "beta_1", "beta_2", "epsilon")
    ms, vs, step = _slots(optimizer, momentum), _slots(optimizer, second), _slots(optimizer, "iterations")[0]

    def scale(tv, ov):
        t = ov[step].astype(jnp.float32)
        bc1, bc2 = 1 - beta_1**t, 1 - beta_2**t
        if not lamb:  # Keras's Adam: alpha = lr sqrt(bc2) / bc1 times m / (sqrt(v) + eps)
            return [bc1 * (jnp.sqrt(ov[i] / bc2) + eps / jnp.sqrt(bc2)) for i in vs]
        found = []
        for w, i, j in zip(tv, ms, vs, strict=True):  # Keras's LAMB: eps added after the bias correction
            root = jnp.sqrt(ov[j] / bc2) + eps
            w_norm, u_norm = jnp.linalg.norm(w), jnp.linalg.norm(ov[i] / bc1 / root)
            ratio = jnp.where((w_norm > 0) & (u_norm > 0), w_norm / jnp.where(u_norm > 0, u_norm, 1.0), 1.0)
            found.append(bc1 * root / ratio)
        return found

    return scale


def _nadam(optimizer) -> Callable:
    """Keras's Nadam steps lr m̂ / (sqrt(v / (1 - β2^t)) + ε), m̂ its Nesterov average: P is that divisor."""
    beta_2, eps = _floats(optimizer, "beta_2", "epsilon")
    vs, step = _slots(optimizer, "_velocities"), _slots(optimizer, "iterations")[0]

    def scale(tv, ov):
        bc2 = 1 - beta_2 ** ov[step].astype(jnp.float32)
        return [jnp.sqrt(ov[i] / bc2) + eps for i in vs]

    return scale


def _adamax(optimizer) -> Callable:
    """Keras's Adamax steps lr m / ((1 - β1^t)(u + ε)), u the decaying infinity norm."""
    beta_1, eps = _floats(optimizer, "beta_1", "epsilon")
    us, step = _slots(optimizer, "_u"), _slots(optimizer, "iterations")[0]

    def scale(tv, ov):
        bc1 = 1 - beta_1 ** ov[step].astype(jnp.float32)
        return [bc1 * (ov[i] + eps) for i in us]

    return scale


def _root_of_average(optimizer, name: str, centered: str | None = None) -> Callable:
    """RMSprop's sqrt(v + ε) (centered: sqrt(v - ḡ² + ε)), Adagrad's sqrt(Σg² + ε)."""
    (eps,) = _floats(optimizer, "epsilon")
    vs = _slots(optimizer, name)
    means = _slots(optimizer, centered) if centered else [None] * len(vs)

    def scale(tv, ov):
        return [jnp.sqrt(ov[i] - (0.0 if j is None else jnp.square(ov[j])) + eps)
                for i, j in zip(vs, means, strict=True)]  # fmt: skip

    return scale


def preconditioner(optimizer: keras.optimizers.Optimizer) -> Preconditioner | None:
    """The diagonal preconditioner of ``optimizer`` (built), or None when it has none."""
    o = optimizer
    if isinstance(o, keras.optimizers.Adam):  # AdamW too (a subclass)
        return Preconditioner(_adam_like(o, "_momentums", "_velocity_hats" if o.amsgrad else "_velocities"),
                              ema_factor(float(o.beta_1)))  # fmt: skip
    if isinstance(o, keras.optimizers.Lamb):
        return Preconditioner(_adam_like(o, "_momentums", "_velocities", lamb=True), ema_factor(float(o.beta_1)))
    if isinstance(o, keras.optimizers.Nadam):
        beta = float(o.beta_1)
        return Preconditioner(_nadam(o), (2 + 2 * beta) / ((1 + 2 * beta) * (1 - beta)))
    if isinstance(o, keras.optimizers.Adamax):
        return Preconditioner(_adamax(o), ema_factor(float(o.beta_1)))
    if isinstance(o, keras.optimizers.RMSprop):
        centered = "_average_gradients" if o.centered else None
        return Preconditioner(_root_of_average(o, "_velocities", centered), 2 + 2 * float(o.momentum))
    if isinstance(o, keras.optimizers.Adagrad):
        return Preconditioner(_root_of_average(o, "_accumulators"), 2.0)
    return None

"""The compiled engine: a Keras model and its optimizer as pure functions of their state, compiled by
XLA on the JAX backend, in the shape of keras-io's guide "Writing a training loop from scratch in JAX".

The state is Keras's own three lists of arrays, ``(trainable, non_trainable, optimizer)``
variables, each array with a leading *member* axis. The members are models of one architecture
trained side by side (the replicas of a variant, with seeds seed, seed + 1, ...), each with its
own weights, optimizer state, dropout stream and batch order; one model is one member. The
functions below are written for one member, over the state of one member:

- :func:`loss_and_updates`: the loss (with the L2 penalties, as Keras reports it) and the
  non-trainable variables after a forward pass in training mode (``model.stateless_call``);
- :func:`train_step`: one optimizer step (``optimizer.stateless_apply``), and what the epoch
  sums: the loss and the per-epoch metrics (:data:`optlab.training.models.EPOCH_METRICS`);
- :func:`train_steps`: a ``lax.scan`` of train steps over a run of batches, gathered by index
  inside the program, so no shuffled copy of the data is ever made;
- :func:`predict`: a whole split in inference mode, in chunks of one shape.

:class:`Engine` compiles them over the member axis (:func:`over_members`): one path for one model and
for many. What is vectorized, diagnosed or compiled is a transformation of these functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from optlab.core.errors import OptlabError
from optlab.training import hessian
from optlab.training.backend import keras
from optlab.training.models import EPOCH_METRICS

CHUNK_STEPS = 256  # at most this many steps per compiled call: progress can be shown between calls
# Diagnostics measure one step in this many (steps 0, 16, 32, ... of each compiled call), chosen in the
# scan with a `cond`: every step made the default MLP's epoch 40% slower; one in 16 costs about 3%.
DIAGNOSED_EVERY = 16
LOSS = keras.losses.SparseCategoricalCrossentropy()
PER_EXAMPLE_LOSS = keras.losses.SparseCategoricalCrossentropy(reduction=None)


def to_device(array: np.ndarray) -> jax.Array:
    """The array as a JAX array, sharing memory when the layout allows it.

    XLA:CPU adopts a 64-byte aligned, C-contiguous host buffer without a copy (through DLPack;
    ``optlab.data.files.read_aligned`` reads files that way), so the data exists once in memory.
    """
    if jax.default_backend() != "cpu":
        return jax.device_put(array)  # one copy, on the accelerator beside the model state
    if isinstance(array, np.ndarray) and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        try:
            return jax.dlpack.from_dlpack(array)
        except (TypeError, ValueError, RuntimeError):  # a build that cannot adopt host memory
            pass
    return jnp.asarray(array)


def chunk_plan(n_steps: int, most: int = CHUNK_STEPS) -> list[int]:
    """Split ``n_steps`` into consecutive chunks of at most ``most`` steps, all of one length when
    a divisor allows (one compiled program), else equal chunks and a shorter last one (two).

    A pure function of the step count, so a rerun, or a resumed run, steps exactly as before.
    """
    if n_steps <= most:
        return [n_steps] if n_steps else []
    fewest = -(-n_steps // most)
    for k in range(fewest, 2 * fewest + 1):
        if n_steps % k == 0:
            return [n_steps // k] * k
    return [most] * (n_steps // most) + ([n_steps % most] if n_steps % most else [])


@dataclass(frozen=True)
class LayerDiagnostics:
    """How one weight layer (dense or conv) trained during an epoch."""

    grad_norm: float  # L2 norm of the loss gradient w.r.t. the layer's weights: RMS over the measured steps
    weight_norm: float  # L2 norm of its weights at the end of the epoch
    update_ratio: float  # one step's ||w_after - w_before|| (RMS over the measured steps) / ||w|| at the start
    dead_fraction: float | None  # units never active (ReLU output 0) on the probe batch; None: not ReLU


@dataclass(frozen=True, eq=False)
class Program:
    """What the pure functions close over: one member's Keras model and optimizer (every member
    shares their structure; only the state differs), and the settings of the epoch."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    groups: tuple[tuple[int, ...], ...]  # per weight layer, the indices of its trainable variables
    batch_size: int
    eval_rows: int  # examples per inference chunk: memory only, the results do not depend on it
    diagnostics: bool
    # The weights to evaluate from the training weights and the optimizer's variables (schedule-free
    # AdamW's average, optlab.training.optimizers.evaluation_weights); None: the training weights.
    average: Callable[[list, list], list] | None = None


# --- the pure functions, for one member -------------------------------------------------------
def layer_squares(p: Program, arrays: Sequence[jax.Array]) -> jax.Array:
    """Per weight layer, the sum of the squares of all its variables' entries."""
    squares = [jnp.sum(jnp.square(a)) for a in arrays]
    return jnp.stack([sum(squares[i] for i in g) for g in p.groups])


def loss_and_updates(tv, p: Program, ntv, x, y):
    """The training loss of one batch (with the L2 penalties, as Keras's fit reports it), and the
    non-trainable variables and probabilities after the forward pass."""
    probs, ntv, reg = p.model.stateless_call(tv, ntv, x, training=True, return_losses=True)
    return LOSS(y, probs) + (sum(reg) if reg else 0.0), (ntv, probs)


def train_step(p: Program, state, x, y, measured):
    """One optimizer step. Returns the new state, the batch's sums (loss x examples, then each
    per-epoch metric's sum) and, with diagnostics, per weight layer the squared gradient norm and
    squared update norm when ``measured`` (zeros otherwise)."""
    tv, ntv, ov = state
    (loss, (ntv, probs)), grads = jax.value_and_grad(loss_and_updates, has_aux=True)(tv, p, ntv, x, y)
    new_tv, ov = p.optimizer.stateless_apply(ov, grads, tv)
    sums = (loss * y.shape[0], *(jnp.sum(fn(y, probs)) for fn in EPOCH_METRICS.values()))
    squares = ()
    if p.diagnostics:
        zero = jnp.zeros(len(p.groups), jnp.float32)
        squares = jax.lax.cond(
            measured,
            lambda: (layer_squares(p, grads), layer_squares(p, [n - o for n, o in zip(new_tv, tv, strict=True)])),
            lambda: (zero, zero),
        )
    return (new_tv, ntv, ov), sums, squares


def train_steps(p: Program, state, x, y, order):
    """The steps of ``order``'s full batches, one scan (diagnostics measure one step in
    DIAGNOSED_EVERY); the sums over them, as :func:`train_step`'s."""

    def body(carry, i):
        state, squares = carry
        idx = jax.lax.dynamic_slice_in_dim(order, i * p.batch_size, p.batch_size)
        state, sums, measured = train_step(p, state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0),
                                           i % DIAGNOSED_EVERY == 0)  # fmt: skip
        return (state, tuple(a + b for a, b in zip(squares, measured, strict=True))), sums

    zero = jnp.zeros(len(p.groups), jnp.float32)
    carry = (state, (zero, zero) if p.diagnostics else ())
    (state, squares), sums = jax.lax.scan(body, carry, jnp.arange(order.shape[0] // p.batch_size))
    return state, tuple(jnp.sum(s) for s in sums), squares


def train_batch(p: Program, state, x, y, idx, measured):
    """One step on the batch ``idx`` (the last, partial batch; or every batch of a conv model)."""
    return train_step(p, state, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), measured)


def evaluation_weights(p: Program, tv, ov):
    return p.average(tv, ov) if p.average is not None else tv


def predict(p: Program, tv, ntv, x, y):
    """The mean loss (with the L2 penalties), each per-epoch metric's sum and the probabilities of
    the whole split, in inference mode (dropout off, batch-norm statistics frozen). Every chunk
    has one shape (the last overlaps the one before it), so one compile serves them all."""
    n = x.shape[0]
    size = min(p.eval_rows, n)
    chunks = -(-n // size)
    starts = jnp.minimum(jnp.arange(chunks) * size, n - size)

    def part(start):
        xs, ys = jax.lax.dynamic_slice_in_dim(x, start, size), jax.lax.dynamic_slice_in_dim(y, start, size)
        probs, _, reg = p.model.stateless_call(tv, ntv, xs, training=False, return_losses=True)
        return PER_EXAMPLE_LOSS(ys, probs), probs, (sum(reg) if reg else jnp.float32(0.0))

    losses, probs, reg = jax.lax.map(part, starts)
    tail = n - (chunks - 1) * size  # rows the last chunk repeats from the one before it are dropped
    losses = jnp.concatenate([losses[:-1].reshape(-1), losses[-1, size - tail :]])
    probs = jnp.concatenate([probs[:-1].reshape(-1, probs.shape[-1]), probs[-1, size - tail :]])
    return jnp.mean(losses) + reg[0], tuple(jnp.sum(fn(y, probs)) for fn in EPOCH_METRICS.values()), probs


def layer_norms(p: Program, tv):
    return jnp.sqrt(layer_squares(p, tv))


def dead_units(model: keras.Model, weight_layers: int) -> Callable | None:
    """Per weight layer followed by a ReLU, the fraction of its units (channels, for a conv) that
    are 0 for every probe image; None when the model has other activations."""
    relus = [layer for layer in model.layers if isinstance(layer, keras.layers.Activation)
             and getattr(layer.activation, "__name__", "") == "relu"]  # fmt: skip
    if not relus or len(relus) != weight_layers - 1:  # every weight layer but the output has one
        return None
    probe = keras.Model(model.inputs, [layer.output for layer in relus])
    tv_at = {id(v): i for i, v in enumerate(model.trainable_variables)}
    ntv_at = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    pick_tv = [tv_at[id(v)] for v in probe.trainable_variables]
    pick_ntv = [ntv_at[id(v)] for v in probe.non_trainable_variables]

    def dead(tv, ntv, x):
        outs, _ = probe.stateless_call([tv[i] for i in pick_tv], [ntv[i] for i in pick_ntv], x)
        outs = outs if isinstance(outs, list | tuple) else [outs]  # a one-output model gives the tensor
        return jnp.stack([jnp.mean(jnp.all(a <= 0, axis=tuple(range(a.ndim - 1)))) for a in outs])

    return dead


# --- the engine: those functions compiled over the member axis ---------------------------------
def over_members(f: Callable, n: int, in_axes) -> Callable:
    """``f``, written for one member, over a leading member axis of the arguments ``in_axes`` marks
    (0: has it; None: shared) and of every output: ``jax.vmap`` for several members; for one, ``f``
    itself on the member's slice. XLA:CPU ran the vmapped program of a single member up to 2.5x
    slower (a batch axis of 1 on every matmul of a 1024-wide MLP at batch 8), and the plain one
    gives the same numbers as a model trained alone."""
    if n > 1:
        return jax.vmap(f, in_axes=in_axes)

    def one(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        sliced = [jax.tree.map(lambda a: a[0], x) if axis == 0 else x for x, axis in zip(args, axes, strict=True)]
        return jax.tree.map(lambda a: a[None], f(*sliced))

    return one


def weight_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Dense | keras.layers.Conv2D)]


def layer_labels(model: keras.Model) -> list[str]:
    """conv1, conv2, ..., dense1, dense2, ..., output: the names diagnostics are logged under."""
    kinds = ["conv" if isinstance(layer, keras.layers.Conv2D) else "dense" for layer in weight_layers(model)]
    return [f"{kind}{kinds[: i + 1].count(kind)}" for i, kind in enumerate(kinds[:-1])] + ["output"]


class Engine:
    """Epoch-at-a-time training and whole-split inference of the members (Keras models of one
    architecture, compiled with their optimizers), as one compiled program.

    With ``diagnostics``, one step in DIAGNOSED_EVERY also measures, per weight layer, the squared
    norms of its gradient and of its update (a few percent of the epoch); each epoch then reports
    per layer the gradient norm and the update's size relative to the weights (root mean squares
    over the measured steps: an average that one exploding step cannot hide), the weights' norms,
    and the fraction of ReLU units that no image of a fixed probe batch activates.
    """

    def __init__(self, models: Sequence[keras.Model], batch_size: int, eval_rows: int, diagnostics: bool = False,
                 average: Callable[[list, list], list] | None = None) -> None:  # fmt: skip
        if keras.backend.backend() != "jax":
            raise OptlabError("train.loop 'compiled' needs train.backend: jax")
        self.models = list(models)
        model = self.models[0]
        for m in self.models:
            m.optimizer.build(m.trainable_variables)
        at = {id(v): i for i, v in enumerate(model.trainable_variables)}
        layers = weight_layers(model)
        groups = tuple(tuple(at[id(v)] for v in layer.trainable_weights) for layer in layers)
        p = Program(model, model.optimizer, groups, batch_size, eval_rows, diagnostics, average)
        self.program, self.labels, self.diagnostics = p, layer_labels(model), diagnostics
        n = len(self.models)
        member = functools.partial(over_members, n=n, in_axes=0)  # the state has the member axis; the data not
        # Each member its own batch order (axis 0 of the indices), or all of them one (members that
        # share a seed: the same batches).
        self._steps = {shared: jax.jit(over_members(functools.partial(train_steps, p), n,
                                                    (0, None, None, None if shared else 0)), donate_argnums=0)
                       for shared in (False, True)}  # fmt: skip
        self._batch = {shared: jax.jit(over_members(functools.partial(train_batch, p), n,
                                                    (0, None, None, None if shared else 0, None)), donate_argnums=0)
                       for shared in (False, True)}  # fmt: skip
        self._predict = jax.jit(over_members(functools.partial(predict, p), n, (0, 0, None, None)))
        self._evaluation_weights = jax.jit(member(functools.partial(evaluation_weights, p)))
        self._norms = jax.jit(member(functools.partial(layer_norms, p)))
        dead = dead_units(model, len(layers)) if diagnostics else None
        self._dead = jax.jit(over_members(dead, n, (0, 0, None))) if dead else None
        self._device = jax.devices()[0]
        self.probe: jax.Array | None = None  # the images dead units are counted on (set by the trainer)
        self.last_epoch: list[dict[str, LayerDiagnostics]] = []  # per member, the last epoch's diagnostics
        self._curvature: hessian.Curvature | None = None  # built on the first call of curvature()
        # XLA:CPU (jaxlib 0.10) leaves the gradients of a convolution inside a loop (the scan) in a
        # non-canonical layout that its generic emitter runs instead of the Eigen kernels it uses
        # elsewhere: the default CNN's epoch took 13x longer as one scan than as one compiled call
        # per batch (benchmarks/train_speed.py --model cnn). Models with convolutions take batches
        # one call at a time on a CPU; everything else, chunks of up to CHUNK_STEPS steps.
        has_conv = any(isinstance(layer, keras.layers.Conv2D) for layer in layers)
        self.scans = not (has_conv and jax.default_backend() == "cpu")

    # Keras objects <-> the state the compiled functions carry.
    def state(self):
        """Every member's variables, stacked on a leading member axis, committed to the device (Keras
        creates them uncommitted; the compiled epoch returns them committed, and jit's cache key
        includes placement: epoch 2 would otherwise compile a second program)."""
        values = [
            ([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables],
             [v.value for v in m.optimizer.variables])
            for m in self.models
        ]  # fmt: skip
        return jax.device_put(jax.tree.map(lambda *a: jnp.stack(a), *values), self._device)

    def store(self, state, members: Iterable[int] | None = None) -> None:
        """Write ``state`` into the Keras models (of ``members`` only, when given: a member that
        stopped keeps the state it stopped with)."""
        for r in range(len(self.models)) if members is None else members:
            m = self.models[r]
            values = jax.tree.map(lambda a, r=r: a[r], state)
            for variables, vals in zip(
                (m.trainable_variables, m.non_trainable_variables, m.optimizer.variables), values, strict=True
            ):
                for var, val in zip(variables, vals, strict=True):
                    var.assign(val)

    def calls(self, n: int) -> list[tuple[int, int, bool]]:
        """(first example, examples, scanned?) of each compiled call of an epoch over ``n`` examples:
        the full batches in chunks of scanned steps, then one call per remaining batch (all of them
        for a conv model on a CPU). A pure function of ``n``: a resumed run steps as before."""
        bs, calls, start = self.program.batch_size, [], 0
        for steps in chunk_plan(n // bs) if self.scans else []:
            calls.append((start, steps * bs, True))
            start += steps * bs
        return calls + [(first, min(bs, n - first), False) for first in range(start, n, bs)]

    def train_epoch(self, x: jax.Array, y: jax.Array, orders: np.ndarray, on_progress: Callable[[int, int], None]
                    | None = None, members: Sequence[int] | None = None) -> list[dict[str, float]]:  # fmt: skip
        """One pass over ``x[orders[r]]`` in batches for each member r (``orders``: one row each, or
        one row all members share); Keras's running loss and metrics of the epoch, per member.
        ``members`` names those whose new state is kept (the others, stopped, keep theirs).
        ``on_progress(steps done, steps in the epoch)`` is called after each compiled call."""
        n, bs, shared = orders.shape[-1], self.program.batch_size, orders.ndim == 1
        steps, batch = self._steps[shared], self._batch[shared]
        state, totals, done = self.state(), None, 0
        start_norms = np.asarray(self._norms(state[0])) if self.diagnostics else None
        measured = 0  # steps whose gradients and updates the diagnostics measured
        for first, size, scanned in self.calls(n):
            idx = jnp.asarray(orders[..., first : first + size])
            if scanned:
                state, sums, squares = steps(state, x, y, idx)
                measured += -(-(size // bs) // DIAGNOSED_EVERY) if self.diagnostics else 0
            else:
                measure = bool(self.diagnostics and (first // bs) % DIAGNOSED_EVERY == 0)
                state, sums, squares = batch(state, x, y, idx, measure)
                measured += measure
            totals = (sums, squares) if totals is None else jax.tree.map(jnp.add, totals, (sums, squares))
            done += -(-size // bs)
            if on_progress is not None:
                on_progress(done, -(-n // bs))
        self.store(state, members)
        sums, squares = (jax.tree.map(np.asarray, t) for t in totals)
        if self.diagnostics:
            grad, update = (np.sqrt(total / max(measured, 1)) for total in squares)
            self.last_epoch = self._summarize(state, grad, update / np.maximum(start_norms, 1e-12))
        # Averages over the epoch, weights changing as it goes, as fit reports them.
        names = ("loss", *EPOCH_METRICS)
        return [{k: float(s[r]) / n for k, s in zip(names, sums, strict=True)} for r in range(len(self.models))]

    def batch_losses(self, x: jax.Array, y: jax.Array, batches: Iterable[np.ndarray]) -> Iterator[float]:
        """Train the one member on each batch of indices in turn, yielding each step's mean training
        loss (before its update, as Keras reports it); the state goes back into the Keras objects
        when the caller stops (the learning-rate range test stops when the loss blows up)."""
        state = self.state()
        try:
            for idx in batches:
                state, (loss_sum, *_), _ = self._batch[True](state, x, y, jnp.asarray(idx), False)
                yield float(loss_sum[0]) / len(idx)
        finally:
            self.store(state)

    def curvature(self, x: jax.Array, y: jax.Array, settings: hessian.Settings, epoch: int,
                  rates: Sequence[float]) -> list[dict[str, float | None]] | None:  # fmt: skip
        """Per member, the sharpness and noise scale of its weights (optlab.training.hessian), thresholds
        at its epoch's mean rate ``rates[r]``; None when ``settings`` skip ``epoch`` (from 0)."""
        if self._curvature is None:
            self._curvature = hessian.Curvature(self.program.model, self.program.optimizer, settings, len(y))
        return self._curvature(self.state(), x, y, rates) if self._curvature.due(epoch) else None

    def _summarize(self, state, grad, ratio) -> list[dict[str, LayerDiagnostics]]:
        tv, ntv, _ = state
        weight = np.asarray(self._norms(tv))
        dead = np.asarray(self._dead(tv, ntv, self.probe)) if self._dead and self.probe is not None else None
        found = []
        for r in range(len(self.models)):
            fractions = [float(d) for d in dead[r]] if dead is not None else []
            fractions += [None] * (len(self.labels) - len(fractions))
            rows = zip(self.labels, grad[r], weight[r], ratio[r], fractions, strict=True)
            found.append({label: LayerDiagnostics(float(g), float(w), float(q), d) for label, g, w, q, d in rows})
        return found

    def infer(self, x: jax.Array, y: jax.Array, as_they_are: bool = False) -> list[tuple[dict[str, float], np.ndarray]]:
        """Per member, the loss and per-epoch metrics in inference mode, and the probabilities, on
        the evaluation weights of the current state (schedule-free AdamW's average), or on the
        models' weights as they are."""
        tv, ntv, ov = self.state()
        if not as_they_are:
            tv = self._evaluation_weights(tv, ov)
        loss, sums, probs = jax.tree.map(np.asarray, self._predict(tv, ntv, x, y))
        found = []
        for r in range(len(self.models)):
            logs = {
                "loss": float(loss[r]),
                **{k: float(s[r]) / len(y) for k, s in zip(EPOCH_METRICS, sums, strict=True)},
            }
            found.append((logs, probs[r]))
        return found

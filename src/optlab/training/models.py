"""Model builders, chosen by name: ``MODELS[params.model.name](...)``.

Each builder returns an *uncompiled* ``keras.Model`` that ends in a softmax. Every random
layer gets an explicit seed derived from the run's seed, so weights and dropout masks are
reproducible without global seeding (``keras.utils.set_random_seed`` imports TensorFlow,
about 9 s per process, even on the JAX backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from optlab.core.errors import OptlabError
from optlab.core.params import ModelParams
from optlab.training.backend import keras

layers = keras.layers

INFERENCE_ROWS = 1024  # examples per inference batch: memory only, the results do not depend on it
OUTPUT_LAYER = "output"  # the softmax layer's name (Muon leaves it to AdamW by this name)
INITIALIZERS = {"he_normal": keras.initializers.HeNormal, "glorot_uniform": keras.initializers.GlorotUniform}
# What every epoch measures beside the loss, on the training batches (Keras's running mean over the
# epoch) and on the validation split: name -> a per-example function of (integer labels,
# probabilities) in keras.ops, so both loops compute it alike (the compiled engine sums it, Keras's
# fit wraps it in a MeanMetricWrapper). Adding one here logs it as train/<name> and val/<name>.
EPOCH_METRICS: dict[str, Callable] = {"accuracy": keras.metrics.sparse_categorical_accuracy}


class _Seeds:
    """Hands out a distinct, deterministic seed to each random layer in build order."""

    def __init__(self, seed: int) -> None:
        self._next = seed * 1000

    def __call__(self) -> int:
        self._next += 1
        return self._next


def _kernel(p: ModelParams, seeds: _Seeds) -> dict:
    """The weight settings dense and conv layers share."""
    return {
        # A bias is redundant right before batch normalization, which re-centres anyway.
        "use_bias": not p.batch_norm,
        "kernel_initializer": INITIALIZERS[p.initializer](seed=seeds()),
        "kernel_regularizer": keras.regularizers.L2(p.l2) if p.l2 else None,
    }


def _normalize_activate(x, p: ModelParams):
    if p.batch_norm:
        x = layers.BatchNormalization()(x)
    return layers.Activation(p.activation)(x)


def _dense_block(x, units: int, p: ModelParams, seeds: _Seeds):
    x = _normalize_activate(layers.Dense(units, **_kernel(p, seeds))(x), p)
    if p.dropout:
        x = layers.Dropout(p.dropout, seed=seeds())(x)
    return x


def _head(x, n_classes: int, p: ModelParams, seeds: _Seeds):
    for units in p.hidden:
        x = _dense_block(x, units, p, seeds)
    return layers.Dense(
        n_classes,
        activation="softmax",
        name=OUTPUT_LAYER,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seeds()),
        kernel_regularizer=keras.regularizers.L2(p.l2) if p.l2 else None,
    )(x)


def build_mlp(input_shape: Sequence[int], n_classes: int, p: ModelParams, seed: int) -> keras.Model:
    """Dense layers on flattened pixels: the source reports' model (e.g. 128-64 relu)."""
    seeds = _Seeds(seed)
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Flatten()(inputs) if len(input_shape) > 1 else inputs
    return keras.Model(inputs, _head(x, n_classes, p, seeds), name="mlp")


def build_cnn(input_shape: Sequence[int], n_classes: int, p: ModelParams, seed: int) -> keras.Model:
    """A compact conv net, the next step every source report names: per entry of
    ``conv_filters`` a block conv-conv-maxpool, then the dense head of ``hidden``."""
    if len(input_shape) != 3:
        raise OptlabError(
            f"model.name 'cnn' needs images shaped (height, width, channels), but the prepared data "
            f"is flat {tuple(input_shape)}, prepared for the mlp; run the prepare stage again for the cnn "
            f"(`dvc repro` or `dvc exp run -S model.name=cnn` does: prepare reads model.name)"
        )
    height, width, channels = input_shape
    if min(height, width) < 2 ** len(p.conv_filters):
        raise OptlabError(
            f"{len(p.conv_filters)} conv blocks halve {height}x{width} images below 1 pixel; "
            f"use at most {max(1, min(height, width).bit_length() - 1)} entries in model.conv_filters"
        )
    seeds = _Seeds(seed)
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = inputs
    if p.augment:
        # Shifts of up to 10% help every image set; horizontal flips only suit colour photos
        # (CIFAR), not digits, whose mirror images are other glyphs.
        x = layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seeds())(x)
        if channels == 3:
            x = layers.RandomFlip("horizontal", seed=seeds())(x)
    for filters in p.conv_filters:
        for _ in range(2):
            x = _normalize_activate(layers.Conv2D(filters, 3, padding="same", **_kernel(p, seeds))(x), p)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _head(x, n_classes, p, seeds), name="cnn")


MODELS: dict[str, Callable[..., keras.Model]] = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(p: ModelParams, input_shape: Sequence[int], n_classes: int, seed: int) -> keras.Model:
    """The uncompiled model ``p.name`` names (params validation has checked the name)."""
    return MODELS[p.name](input_shape, n_classes, p, seed)


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """What every optlab model is trained on: cross-entropy over integer labels; and what each
    epoch measures (:data:`EPOCH_METRICS`)."""
    metrics = [keras.metrics.MeanMetricWrapper(fn, name=name) for name, fn in EPOCH_METRICS.items()]
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=metrics)


def trainable_params(model: keras.Model) -> int:
    return sum(math.prod(v.shape) for v in model.trainable_variables)

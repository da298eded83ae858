"""Seeds inside one experiment: train.replicas runs of a variant trained as one vectorized program,
each the same as a separate run with its seed (within a measured tolerance), with callbacks and
divergence per replica, and the paired comparison and power statement. (The stages' outputs,
means, spread and every replica kept, are checked through `dvc exp run` in test_pipeline.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import fit_members, repo_params
from optlab.core.params import validate_params
from optlab.study import compare, stats
from optlab.study.experiments import Group, Run
from optlab.training.callbacks import KeepBest
from optlab.training.loop import Member, replica_params

# float32 arithmetic differs between a vmapped (batched) matmul and a plain one in the last bits;
# measured on digits over 4 epochs: at most 2e-6 apart in any weight. The bound leaves 25x room.
TOLERANCE = 5e-5


def small(**overrides):
    base = {"dataset": "digits", "train.epochs": 4, "train.batch_size": 32, "model.hidden": [64],
            "train.backend": "jax", "train.loop": "compiled", "model.dropout": 0.2}  # fmt: skip
    return validate_params(repo_params(**{**base, **overrides}))


def member(p, n_train: int) -> Member:
    """A member with early stopping and keep-best on the validation loss."""
    import keras

    m = Member.build(p, (64,), 10, -(-n_train // p.train.batch_size))
    m.keep_best = KeepBest("val_loss", m.all_evaluation_weights)
    m.callbacks = [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0),
                   keras.callbacks.EarlyStopping(monitor="val_loss", patience=1), m.keep_best]  # fmt: skip
    return m


def test_replica_r_is_the_run_with_seed_plus_r(digits):
    # With early stopping, keep-best and ReduceLROnPlateau acting per replica, as in a single run.
    p = small(**{"train.replicas": 3, "optimizer.learning_rate": 0.01, "train.epochs": 8, "schedule": "constant"})
    train, val = digits
    group = fit_members(p, train, val, [member(replica_params(p, r), len(train.y)) for r in range(3)])
    for m in group:
        m.finish()
    histories = [m.history for m in group]
    assert len({len(h.epochs) for h in histories}) > 1 or all(h.stopped for h in histories), "no replica stopped early"
    worst = 0.0
    for r, m in enumerate(group):
        (alone,) = fit_members(p, train, val, [member(replica_params(p, r), len(train.y))])
        assert alone.params.seed == p.seed + r
        alone.finish()
        assert len(alone.history.epochs) == len(m.history.epochs), r  # the same epoch stopped it
        for a, b in zip(alone.history.epochs, m.history.epochs, strict=True):
            assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-6)  # the same plateau cuts
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        for a, b in zip(alone.model.get_weights(), m.model.get_weights(), strict=True):
            worst = max(worst, float(np.abs(a - b).max()))
    print(f"\n[record] replicas against separate runs: largest weight difference {worst:.2e}")
    assert worst < TOLERANCE


def test_a_diverged_replica_is_reported_and_the_others_train_on(digits):
    p = small(**{"train.replicas": 2, "train.epochs": 3})
    train, val = digits
    group = [Member.build(replica_params(p, r), (64,), 10, -(-len(train.y) // 32)) for r in range(2)]
    kernel = group[1].model.trainable_variables[0]
    kernel.assign(kernel.numpy() * 1e6)  # replica 1 starts from absurd weights: it blows up at once
    fit_members(p, train, val, group)
    histories = [m.history for m in group]
    assert histories[1].diverged and len(histories[1].epochs) == 1 and histories[1].stopped
    assert not histories[0].diverged and len(histories[0].epochs) == 3
    assert histories[0].epochs[-1]["val_accuracy"] > 0.8


def test_the_same_seeds_are_compared_pairwise_and_the_seeds_needed_are_stated():
    def group(accuracies, seeds=(0, 1, 2), **params):
        return Group([Run(f"r{s}", f"r{s}", {"seed": s, "optimizer": "adam", **params}, {"accuracy": a})
                      for s, a in zip(seeds, accuracies, strict=True)])  # fmt: skip

    # A shared luck per seed (0.01, -0.01, 0.0) and a small true difference of 0.002.
    base = group([0.90, 0.88, 0.89])
    close = group([0.9021, 0.8819, 0.8922], optimizer="sgd")
    d = compare.difference(close, base, "accuracy")
    assert d.test == "paired" and d.tested and d.p_value < 0.05  # the pairs see through the shared luck
    welch = stats.welch(close.values("accuracy"), base.values("accuracy"))
    assert welch.p_value > 0.5  # the seeds' spread hides it from an unpaired test
    other_seeds = group([0.9021, 0.8819, 0.8922], seeds=(3, 4, 5), optimizer="sgd")
    assert compare.difference(other_seeds, base, "accuracy").test == "Welch"

    noisy = group([0.905, 0.875, 0.893], optimizer="rmsprop")
    cmp = compare.build_comparison([base, close, noisy], base)
    needed = cmp.needed[id(noisy)]
    assert needed is not None and needed > 3  # within noise: more seeds would be needed to tell
    report = compare.render_markdown(cmp, {}, [], "test")
    assert "seeds to detect it" in report and f"≈ {needed}" in report and "| paired |" in report


def test_seeds_needed_by_hand():
    # Two-sample: sd 0.01, difference 0.01 (one sd): the textbook answer is 17 per group.
    assert stats.seeds_needed(0.01, 0.01, is_paired=False) == 17
    # Paired: the differences' sd 0.01, difference 0.01: 10 pairs.
    assert stats.seeds_needed(0.01, 0.01, is_paired=True) == 10
    assert stats.seeds_needed(0.0, 0.01, is_paired=False) is None
    assert math.isfinite(stats.paired({0: 1.0, 1: 2.0, 2: 3.5}, {0: 0.9, 1: 1.8, 2: 3.1}).p_value)


def test_replicas_are_one_experiment_param_that_never_splits_a_variant():
    from optlab.study.experiments import group_runs

    one = Run("a", "a", {"seed": 0, "train.replicas": 3, "optimizer": "adam"}, {"accuracy": 0.9})
    two = Run("b", "b", {"seed": 3, "train.replicas": 1, "optimizer": "adam"}, {"accuracy": 0.9})
    assert len(group_runs([one, two])) == 1

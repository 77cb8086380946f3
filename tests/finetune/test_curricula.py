"""Curricula: shapes, ranges, per-kind structure, determinism per (seed, run)."""

import numpy as np
import pytest

from finetune.curricula import KINDS, make_curriculum


def _make(kind, run=0, seed=0, **kw):
    args = dict(n_train=10, steps=7, batch_size=3, seed=seed, run_index=run, subset_size=4)
    args.update(kw)
    if kind != "subset":
        args["subset_size"] = None
    return make_curriculum(kind, **args)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_range_determinism(kind):
    c = _make(kind)
    assert c.shape == (7, 3) and c.dtype == np.int32
    assert c.min() >= 0 and c.max() < 10
    np.testing.assert_array_equal(c, _make(kind))
    assert not np.array_equal(c, _make(kind, run=1))
    assert not np.array_equal(c, _make(kind, seed=1))


def test_epochs_are_shuffled_passes():
    c = make_curriculum("epochs", n_train=10, steps=10, batch_size=3, seed=0, run_index=0)
    flat = c.reshape(-1)
    for p in range(3):  # three full passes, each a permutation
        assert sorted(flat[10 * p : 10 * (p + 1)]) == list(range(10))
    passes = [tuple(flat[10 * p : 10 * (p + 1)]) for p in range(3)]
    assert len(set(passes)) == 3  # a new order each pass


def test_subset_uses_only_its_subset_evenly():
    c = make_curriculum(
        "subset", n_train=50, steps=12, batch_size=2, seed=3, run_index=5, subset_size=6
    )
    values, counts = np.unique(c, return_counts=True)
    assert len(values) == 6
    assert counts.tolist() == [4] * 6  # 24 slots = 4 passes over 6 examples


def test_uniform_is_roughly_uniform():
    c = make_curriculum("uniform", n_train=5, steps=2000, batch_size=5, seed=0, run_index=0)
    counts = np.bincount(c.reshape(-1), minlength=5)
    # 10000 draws: each count ~ Binomial(10000, 0.2), sd 40; 6 sd bound.
    assert np.abs(counts - 2000).max() < 240


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown curriculum kind"):
        make_curriculum("sorted", n_train=5, steps=2, batch_size=2, seed=0, run_index=0)
    with pytest.raises(ValueError, match="subset_size"):
        make_curriculum(
            "subset", n_train=5, steps=2, batch_size=2, seed=0, run_index=0, subset_size=9
        )
    with pytest.raises(ValueError, match="exceeds the pool"):
        make_curriculum("epochs", n_train=2, steps=2, batch_size=3, seed=0, run_index=0)

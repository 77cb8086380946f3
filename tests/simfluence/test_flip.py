"""The flip search (`counterfactual.flip_search`) against brute force on a small simulator."""

import numpy as np
import pytest

from simfluence import counterfactual as cf
from simfluence.simulators import Simulator

N_TRAIN, N_TEST, BATCH, STEPS = 40, 3, 4, 12


def _rollout(A, B, cur, l0):
    """Plain float64 loop of Simfluence-Linear: L_t = sum_{i in c_t} (A_i L_{t-1} + B_i)."""
    loss = np.asarray(l0, np.float64).copy()
    for batch in cur:
        loss = A[:, batch].sum(1) * loss + B[:, batch].sum(1)
    return loss


def _brute_force(A, B, cur, l0, observed, test, seed_rng, ks):
    """Every k tried with its own ranking by one rollout per removed example (neutral slots)."""
    base = _rollout(A, B, cur, l0)[test]
    present = np.unique(cur)
    infl = {}
    for i in present:  # removal influence: slots of i made neutral (A = 1/b, B = 0)
        A2, B2 = A.copy(), B.copy()
        A2[:, i], B2[:, i] = 1.0 / BATCH, 0.0
        infl[int(i)] = _rollout(A2, B2, cur, l0)[test] - base
    correct = observed > 0
    # Most supportive of the current sign first; ties by pool position (a stable sort).
    ranked = sorted(present.tolist(), key=lambda i: (infl[i] * (1 if correct else -1), i))
    last = None
    for k in ks:
        if k > present.size:
            break
        removed = sorted(ranked[:k])
        new = cf.remove_examples(cur, removed, N_TRAIN, seed_rng())
        predicted = observed + _rollout(A, B, new, l0)[test] - base
        last = (k, removed, new, (predicted > 0) != correct, predicted)
        if last[3]:
            return last
    return last


@pytest.mark.parametrize("seed", range(6))
def test_flip_search_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    # A near 1/b with a spread, B of either sign: some examples push the margin up, some down.
    A = (1.0 / BATCH + rng.normal(0, 0.01, (N_TEST, N_TRAIN))).astype(np.float32)
    B = rng.normal(0, 0.005, (N_TEST, N_TRAIN)).astype(np.float32)
    sim = Simulator(A, B, "linear", 0.1, 0.1, 1.0 / BATCH, batch=BATCH)
    cur = rng.integers(0, N_TRAIN, (STEPS, BATCH)).astype(np.int32)
    l0 = rng.normal(0, 0.1, N_TEST).astype(np.float32)
    test = int(rng.integers(N_TEST))
    # Right (> 0) and wrong targets, ever further from 0: k = 1, 1, 1, 4, 8, then no flip.
    observed = float((-1) ** seed * (0.004, 0.01, 0.02, 0.04, 0.08, 0.3)[seed])

    def make_rng():
        return np.random.default_rng([seed, 7])

    got = cf.flip_search(sim, cur, l0, observed, test, N_TRAIN, make_rng)
    k, removed, new, flipped, predicted = _brute_force(
        A.astype(np.float64), B.astype(np.float64), cur, l0, observed, test, make_rng, cf.FLIP_KS
    )
    assert (got["k"], got["removed"], got["predicted_flip"]) == (k, removed, flipped)
    np.testing.assert_array_equal(got["curriculum"], new)
    np.testing.assert_allclose(got["predicted_margin"], predicted, rtol=0, atol=1e-6)
    assert got["ks_tried"] == [x for x in cf.FLIP_KS if x <= k]
    assert got["base_margin"] == observed


def test_flip_search_covers_both_signs_and_a_miss():
    """One simulator, three targets: a right one, a wrong one (both flipped at some k) and one
    no removal can flip (all k tried, predicted_flip False)."""
    rng = np.random.default_rng(11)
    A = np.full((N_TEST, N_TRAIN), 1.0 / BATCH, np.float32)
    B = rng.normal(0, 0.01, (N_TEST, N_TRAIN)).astype(np.float32)
    sim = Simulator(A, B, "linear", 0.1, 0.1, 1.0 / BATCH, batch=BATCH)
    cur = rng.integers(0, N_TRAIN, (STEPS, BATCH)).astype(np.int32)
    l0 = np.zeros(N_TEST, np.float32)
    make = lambda: np.random.default_rng(0)  # noqa: E731
    right = cf.flip_search(sim, cur, l0, 0.01, 0, N_TRAIN, make)
    wrong = cf.flip_search(sim, cur, l0, -0.01, 1, N_TRAIN, make)
    far = cf.flip_search(sim, cur, l0, 1e3, 2, N_TRAIN, make)
    assert right["predicted_flip"] and right["predicted_margin"] <= 0
    assert wrong["predicted_flip"] and wrong["predicted_margin"] > 0
    distinct = np.unique(cur).size
    assert not far["predicted_flip"] and far["k"] == max(k for k in cf.FLIP_KS if k <= distinct)


def _run(index, final_margins):
    """A 1-step run of 2 test examples whose final margins are given (gold choice 0)."""
    from pathlib import Path

    from simfluence.runlog import Run

    cl = np.zeros((2, 2, 2), np.float32)
    cl[:, :, 0] = 0.5
    cl[1, :, 1] = 0.5 + np.asarray(final_margins, np.float32)
    cl[0, :, 1] = 0.6
    return Run(
        index=index,
        path=Path(f"run_{index:03d}"),
        curriculum=np.zeros((1, 1), np.int32),
        losses=cl[:, :, 0],
        lr=None,
        meta={},
        choice_losses=cl,
        gold=np.zeros(2, np.int64),
    )


def test_flip_rates_count_sign_changes_of_the_trained_margins():
    # Base runs 7 and 8: target 0 right in run 7 (margin +0.25), target 1 wrong in run 8 (-0.25).
    base = {7: _run(7, [0.25, 0.0]), 8: _run(8, [0.0, -0.25])}
    flip = {"predicted_flip": True, "predicted_margin": -0.1}
    props = [
        {"id": 0, "kind": "flip", "test": 0, "base_run": 7, "k": 2, "flip": flip},
        {"id": 1, "kind": "flip-random", "test": 0, "base_run": 7, "k": 2},
        {"id": 2, "kind": "flip", "test": 1, "base_run": 8, "k": 4, "flip": flip},
        {"id": 3, "kind": "flip-random", "test": 1, "base_run": 8, "k": 4},
        {"id": 4, "kind": "remove-top", "test": 1, "base_run": 8, "k": 4},
    ]
    # Trained: flip 0 flips (+0.25 -> -0.125), its control does not; flip 2 does not (-0.25 ->
    # -0.125), its control does (-> +0.375). Proposal 4 is not a flip kind: left out.
    cf_runs = [_run(9, m) for m in ([-0.125, 0], [0.125, 0], [0, -0.125], [0, 0.375], [0, 1])]
    out = cf._flip_summary(props, cf_runs, base)
    assert out["n_targets"] == 2 and out["n_predicted"] == 2 and len(out["rows"]) == 4
    s = out["summary"]
    assert s["flip"]["predicted_flip"] == {"flipped": 1, "n": 2, "rate": 0.5}
    assert s["flip"]["base_correct"] == {"flipped": 1, "n": 1, "rate": 1.0}
    assert s["flip"]["base_wrong"] == {"flipped": 0, "n": 1, "rate": 0.0}
    assert s["flip-random"]["base_correct"]["flipped"] == 0
    assert s["flip-random"]["base_wrong"]["flipped"] == 1
    assert s["flip"]["not_predicted"]["n"] == 0
    row = out["rows"][0]
    assert row["base_margin"] == 0.25 and row["actual_margin"] == -0.125 and row["actual_flip"]

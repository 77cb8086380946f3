"""Projected against exact TracIn-CP dot products on the checkpoints of an experiment.

For every checkpoint of the chosen runs (the run's last step excluded, as ``finetune tracin``
does; identical checkpoints once), computes the exact dot products [n_test, n_train] with
``finetune.tracin.compute_dots`` and the projected ones at each ``--proj-dims`` value, and prints
per projection size: the relative error ||projected - exact||_F / ||exact||_F over all
checkpoints, the mean over test examples of the Spearman correlation between a test example's
projected and exact row (the ranking of training examples that attribution uses), and the time.
Where a run's ``tracin.npz`` holds exact dots, it also prints the largest difference between
them and the recomputed exact dots (the streamed exact mode against the stored results).
Reads the experiment only; writes nothing.

Command (the README's table; the demo experiment of ``make demo``, 2-core CPU)::

    python scripts/tracin_projection_error.py runs/demo/output --runs 0-1 \
        --proj-dims 256,1024,4096 --seeds 0-2

References:
    Pruthi et al. 2020, TracIn, https://arxiv.org/abs/2002.08484 (random projections, Sec. 3.2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp", type=Path, help="experiment folder with checkpoints")
    parser.add_argument("--runs", type=_ints, default=[0], help="runs, e.g. 0-2 (default 0)")
    parser.add_argument("--proj-dims", type=_ints, default=[256, 1024, 4096])
    parser.add_argument(
        "--seeds", type=_ints, default=[0], help="projection seeds, e.g. 0-2 (mean and range)"
    )
    parser.add_argument("--chunk-size", type=int, default=32)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from scipy.stats import spearmanr

    from finetune import tracin
    from finetune.experiment import checkpoint_steps, load_experiment
    from finetune.model import combine, partition
    from simfluence import runlog

    exp = load_experiment(args.exp)
    target, frozen = partition(exp.params, exp.mask)
    pool, test = tracin._same_widths(dict(exp.pool_batch), dict(exp.test_batch))
    print(
        f"{args.exp}: {tracin.count_params(target):,} trainable parameters, "
        f"n_test {test['inputs'].shape[0]}, n_train {pool['inputs'].shape[0]}; "
        f"{jax.devices()[0].device_kind}"
    )
    states, seen = [], set()
    for r in args.runs:
        run_dir = runlog.run_dir(args.exp, r)
        last = int(np.load(run_dir / "curriculum.npy", mmap_mode="r").shape[0])
        stored = runlog.read_tracin(run_dir)
        for step in checkpoint_steps(run_dir):
            if step == last:
                continue
            trainable = tracin._restore(run_dir, step, target)
            digest = tracin._digest(trainable)
            if digest in seen:
                continue
            seen.add(digest)
            ref = None
            if stored is not None and stored["mode"] == "exact" and step in stored["steps"]:
                ref = stored["dots"][list(stored["steps"]).index(step)]
            states.append((f"{run_dir.name} step {step}", trainable, ref))

    def dots(trainable, **kw):
        out = tracin.compute_dots(
            exp.per_example_loss,
            trainable,
            frozen,
            pool,
            test,
            chunk_size=args.chunk_size,
            combine=combine,
            **kw,
        )
        return np.asarray(out, np.float64)

    start = time.perf_counter()
    exact = [dots(t) for _, t, _ in states]
    t_exact = time.perf_counter() - start
    print(f"{len(states)} distinct checkpoints; exact mode (streamed): {t_exact:.1f} s")
    for (name, _, ref), e in zip(states, exact, strict=True):
        if ref is not None:
            diff = np.abs(e - ref).max() / np.abs(ref).max()
            print(f"  {name}: max |exact - stored tracin.npz| / max |stored| = {diff:.1e}")
    print()
    seeds = ", ".join(map(str, args.seeds))
    print(f"mean over projection seeds {seeds} (min-max in brackets)")
    print("| d | relative error ‖P − E‖/‖E‖ | mean Spearman ρ of a test row | time per seed (s) |")
    print("|---|---|---|---|")
    for d in args.proj_dims:
        errs, rhos = [], []
        start = time.perf_counter()
        for seed in args.seeds:
            proj = [dots(t, mode="projected", proj_dim=d, seed=seed) for _, t, _ in states]
            num = sum(float(np.sum((p - e) ** 2)) for p, e in zip(proj, exact, strict=True))
            den = sum(float(np.sum(e**2)) for e in exact)
            errs.append(np.sqrt(num / den))
            pairs = [(p[j], e[j]) for p, e in zip(proj, exact, strict=True) for j in range(len(e))]
            rhos.append(np.mean([spearmanr(a, b)[0] for a, b in pairs]))
        seconds = (time.perf_counter() - start) / len(args.seeds)
        print(
            f"| {d} | {np.mean(errs):.3f} [{min(errs):.3f}-{max(errs):.3f}] | "
            f"{np.mean(rhos):.3f} [{min(rhos):.3f}-{max(rhos):.3f}] | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()

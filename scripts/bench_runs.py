"""Benchmark of the run generator: steps/s of R runs trained together, with and without logging.

Times the exact jitted programs of ``finetune run`` (``finetune.steps.make_programs``: vmapped
group step; length-bucketed batches and tracked set from ``finetune.data``) on synthetic token
data with RTE-like input lengths (no ``datasets`` needed, so it runs on an accelerator image
without it), and prints:

- first-step time per batch length (compilation included where an earlier variant has not
  compiled the program already) and steady-state time per group step for: all runs together
  with the per-step test-loss logging, all runs together without it, one run alone with and
  without it;
- the BASELINE measured in the same process: every input padded to --max-input-length (no
  length bucketing), all runs together, with logging; and the speed-up over it;
- the extrapolated wall time of --target-steps steps of all runs, and peak memory.

Target (issue 4): T5-base IA3, 32 runs, batch 8, 100 tracked examples logged every step, 1000
steps in under 7 minutes on one H200::

    python scripts/bench_runs.py --synthetic --model-size t5-base --method ia3 --runs 32 \\
        --batch 8 --n-test 100 --steps 20 --dtype bfloat16

Other sizes: ``--model-size demo`` (the CPU demo), ``tiny``, ``t0-3b`` (T0-3B IA3 target: under
90 minutes for 1000 steps of 32 runs).

CPU: the size flags left unset take small values (``CPU_SIZES``: 4 runs, 4 steps, 20 tracked,
200 pool examples, variants together,nolog,baseline), and it says so; GPU: ``GPU_SIZES``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_args import fill_unset, positive_int  # noqa: E402
from _t5_points import t5_kwargs  # noqa: E402  (scripts/: sizes shared with bench_model.py)

# Defaults of the size flags the user leaves unset, per backend.
GPU_SIZES = dict(
    runs=32, steps=20, n_test=100, n_train=1000, variants="together,nolog,single,baseline,vmapped"
)
CPU_SIZES = dict(runs=4, steps=4, n_test=20, n_train=200, variants="together,nolog,baseline")


def backend_sizes(args: argparse.Namespace, on_cpu: bool) -> list[str]:
    """Fill the unset (None) size flags with GPU_SIZES or CPU_SIZES.

    Returns:
        the flags filled with their CPU value, as ``"--runs 4"`` (empty on GPU or when every
        size flag was given).
    """
    defaults = {name: (GPU_SIZES[name], CPU_SIZES[name]) for name in GPU_SIZES}
    return [f"--{flag} {value}" for flag, value in fill_unset(args, defaults, not on_cpu)]


SIZES = {
    # T5Config kwargs. t5-base: T5 v1.1 LM-adapted base; t0-3b: T0 3B (T5 v1.1 XL LM-adapted).
    "tiny": dict(
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=1,
        num_decoder_layers=1,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
    ),
    "demo": dict(
        d_model=32,
        d_ff=128,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
    ),  # runs/demo
    "t5-base": t5_kwargs("base", 0.0),
    "t0-3b": t5_kwargs("t0-3b", 0.0),
}


def _lengths(rng, n, max_len):
    """RTE-like prompted input lengths (median ~79, 90th percentile ~167 T5 tokens)."""
    x = rng.lognormal(mean=4.4, sigma=0.5, size=n).astype(int) + 20
    return x.clip(8, max_len)


def _synthetic(rng, n, max_len, t_len, vocab):
    import numpy as np

    lengths = _lengths(rng, n, max_len)
    inputs = np.zeros((n, max_len), np.int32)
    for i, n_i in enumerate(lengths):
        inputs[i, : n_i - 1] = rng.integers(3, vocab, n_i - 1)
        inputs[i, n_i - 1] = 1  # EOS
    choices = np.zeros((n, 2, t_len), np.int32)
    choices[:, :, 0] = rng.integers(3, vocab, (n, 2))
    choices[:, :, 1] = 1
    labels = rng.integers(0, 2, n).astype(np.int32)
    targets = choices[np.arange(n), labels]
    return inputs, targets, choices, labels, lengths.astype(np.int32)


VOCAB = 32128  # T5's embedding rows (synthetic token ids stay below 32000)


def synthetic_experiment(*, n_train, n_test, max_len, t_len, runs, steps, batch, seed=0):
    """The synthetic pool, tracked set and uniform curricula of this benchmark.

    Returns:
        (pool, test, curricula): pool and test as `_synthetic`'s tuples; curricula int
        [runs, steps + 1, batch] pool positions.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = _synthetic(rng, n_train, max_len, t_len, 32000)
    test = _synthetic(rng, n_test, max_len, t_len, 32000)
    curricula = rng.integers(0, n_train, (runs, steps + 1, batch))
    return pool, test, curricula


def init_model(cfg_kw: dict, *, method: str, dtype: str, layers: str, attention: str):
    """The benchmark's random-init T5 (seed 0) from T5Config kwargs; dtype names the compute."""
    import jax.numpy as jnp
    import transformers

    from finetune import hf

    return hf.init_random(
        transformers.T5Config(**cfg_kw),
        ia3=method == "ia3",
        seed=0,
        dtype=jnp.dtype(dtype),
        scan_layers=layers == "scan",
        attention=attention,
    )


def experiment_config(cfg_kw: dict, *, name: str, runs: int, batch: int, **fields):
    """The ExperimentConfig whose programs the benchmark times (R = runs trained together).

    ``fields``: method, optimizer, n_train, n_test, steps, dtype, length_multiple,
    tracked_buckets, layers ("scan" or "unroll"), attention and optionally freeze_embeddings.
    """
    from finetune.config import ExperimentConfig

    layers = fields.pop("layers")
    return ExperimentConfig(
        name=name,
        task="rte",
        random_init=cfg_kw,
        learning_rate=3e-3 if fields["method"] == "ia3" else 1e-4,
        num_runs=runs,
        runs_together=runs,
        batch_size=batch,
        scan_layers=layers == "scan",
        **fields,
    )


def _peak_memory() -> str:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if stats and "peak_bytes_in_use" in stats:
        return f"device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB, host {host:.2f} GiB"
    return f"process peak RSS {host:.2f} GiB (ru_maxrss)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic token data (required for now; no datasets import)",
    )
    p.add_argument("--model-size", choices=sorted(SIZES), default="demo")
    p.add_argument("--method", choices=("full", "ia3"), default="ia3")
    p.add_argument("--freeze-embeddings", action="store_true")
    p.add_argument(
        "--runs", type=positive_int, default=None, help="runs trained together (R); GPU 32, CPU 4"
    )
    p.add_argument(
        "--num-runs",
        type=positive_int,
        default=None,
        help="runs of the experiment, trained --runs at a time (default: --runs)",
    )
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--n-test", type=positive_int, default=None, help="GPU 100, CPU 20")
    p.add_argument("--n-train", type=positive_int, default=None, help="GPU 1000, CPU 200")
    p.add_argument("--max-input-length", type=positive_int, default=256)
    p.add_argument(
        "--target-length", type=positive_int, default=2, help="target tokens, EOS included (>= 2)"
    )
    p.add_argument("--length-multiple", type=positive_int, default=16)
    p.add_argument(
        "--tracked-buckets",
        type=positive_int,
        default=4,
        help="most padded lengths in the tracked set (ExperimentConfig.tracked_buckets)",
    )
    p.add_argument(
        "--attention",
        choices=("einsum", "xla", "cudnn"),
        default="einsum",
        help="attention implementation (ExperimentConfig.attention): training and logging",
    )
    p.add_argument(
        "--layers",
        choices=("scan", "unroll"),
        default="scan",
        help="lax.scan over blocks (ExperimentConfig.scan_layers) or unrolled",
    )
    p.add_argument(
        "--train-groups",
        type=positive_int,
        default=None,
        help="IA3: train the runs' examples in this many length groups "
        "(ExperimentConfig.train_length_groups), and also time the vmapped-runs layout",
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="timed steps per variant; GPU 20, CPU 4"
    )
    p.add_argument(
        "--target-steps", type=positive_int, default=1000, help="steps to extrapolate to"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    p.add_argument(
        "--variants",
        default=None,
        help="(GPU default: all five; CPU: together,nolog,baseline) "
        "comma list of: together (all runs, logging), nolog (all runs, no "
        "logging), single (one run alone, with and without logging), baseline "
        "(all runs padded to the maximum, logging), vmapped (with --train-groups: the "
        "vmapped-runs layout too, for comparison)",
    )
    args = p.parse_args(argv)
    if args.target_length < 2:
        p.error(f"--target-length {args.target_length}: pass >= 2 (one token plus EOS)")
    if not args.synthetic:
        p.error("only --synthetic is implemented (real data: time `finetune run` itself)")
    import jax

    cpu_small = backend_sizes(args, jax.default_backend() == "cpu")
    if args.num_runs is None:
        args.num_runs = args.runs
    if args.runs < 1 or args.num_runs < args.runs:
        p.error(f"--runs {args.runs} --num-runs {args.num_runs}: need 1 <= runs <= num-runs")
    variants = set(args.variants.split(","))
    unknown = variants - {"together", "nolog", "single", "baseline", "vmapped"}
    if unknown or "together" not in variants:
        p.error(f"--variants {args.variants!r}: must include 'together'; unknown {sorted(unknown)}")
    if args.train_groups is not None and args.method != "ia3":
        p.error("--train-groups needs --method ia3")

    import numpy as np
    from flax import nnx

    from finetune.data import (
        flat_group_lengths,
        gather_batch,
        gather_flat,
        make_tracked_set,
        put_batch,
        put_groups,
    )
    from finetune.distributed import make_mesh, place
    from finetune.experiment import make_mask
    from finetune.model import make_per_example_loss, make_score_choices, partition
    from finetune.steps import broadcast_runs, make_programs
    from finetune.trainer import optimizer_for_config

    print(
        f"jax {jax.__version__}, devices: {jax.devices()}; {args.layers} layers, "
        f"{args.attention} attention, {args.tracked_buckets} tracked buckets",
        flush=True,
    )
    if cpu_small:
        gpu = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in GPU_SIZES.items())
        print(
            f"CPU: small sizes ({' '.join(cpu_small)}; pass them to change; GPU defaults {gpu})",
            flush=True,
        )
    cfg_kw = dict(SIZES[args.model_size], vocab_size=VOCAB, dropout_rate=0.0)

    def init(attention):
        return init_model(
            cfg_kw, method=args.method, dtype=args.dtype, layers=args.layers, attention=attention
        )

    t0 = time.perf_counter()
    model = init(args.attention)
    graphdef, params = nnx.split(model)
    del model
    config = experiment_config(
        cfg_kw,
        name="bench",
        runs=args.runs,
        batch=args.batch,
        method=args.method,
        freeze_embeddings=args.freeze_embeddings,
        optimizer=args.optimizer,
        n_train=args.n_train,
        n_test=args.n_test,
        steps=max(args.steps, 2),
        dtype=args.dtype,
        length_multiple=args.length_multiple,
        tracked_buckets=args.tracked_buckets,
        layers=args.layers,
        attention=args.attention,
    )
    mask = make_mask(config, params)
    trainable, frozen = partition(params, mask)
    n_tr = sum(x.size for x in jax.tree.leaves(trainable))
    n_all = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model {args.model_size} ({n_all / 1e6:.1f}M params, {n_tr / 1e6:.3f}M trainable, "
        f"{args.method}, compute {args.dtype}); built in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    L = args.max_input_length
    pool, test, curricula = synthetic_experiment(
        n_train=args.n_train,
        n_test=args.n_test,
        max_len=L,
        t_len=args.target_length,
        runs=args.runs,
        steps=args.steps,
        batch=args.batch,
    )
    print(
        f"synthetic inputs: mean length {pool[4].mean():.1f}, max {pool[4].max()} (padded max "
        f"{L}); tracked set {args.n_test}, batch {args.batch}, runs {args.runs}",
        flush=True,
    )
    mesh = make_mesh()
    n_dev = len(mesh.devices.flat)
    optimizer = optimizer_for_config(config)
    progs = make_programs(
        make_per_example_loss(graphdef),
        make_score_choices(graphdef),
        optimizer,
        mesh,
        broadcast_tracked=args.attention != "einsum",
    )
    frozen_d = place(frozen, mesh)
    if args.attention != "einsum":
        # The fused attention must log the losses the default path logs: compare once, at the
        # initial state of two runs, before any timing.
        ref_def = nnx.split(nnx.eval_shape(lambda: init("einsum")))[0]  # same params
        ref = make_programs(
            make_per_example_loss(ref_def), make_score_choices(ref_def), optimizer, mesh
        )
        tracked = make_tracked_set(
            *test,
            multiple=args.length_multiple,
            n_devices=n_dev,
            mesh=mesh,
            max_buckets=args.tracked_buckets,
        )
        # Two runs with different IA3 vectors: a mix-up of the run axis would show.
        tr2 = jax.tree.map(
            lambda x: x * np.array([1.0, 1.1], x.dtype).reshape((2,) + (1,) * (x.ndim - 1)),
            broadcast_runs(trainable, 2),
        )
        tr2 = place(tr2, mesh)
        got = np.asarray(progs["test_losses"](tr2, frozen_d, tracked.buckets))
        want = np.asarray(ref["test_losses"](tr2, frozen_d, tracked.buckets))
        print(
            f"{args.attention} attention vs einsum, logged losses at the start: max |diff| "
            f"{np.abs(got - want).max():.2e} (mean loss {want.mean():.3f})",
            flush=True,
        )
    opt0 = optimizer.init(trainable)

    def measure(name, runs, log, multiple, max_buckets, groups=None):
        tracked = make_tracked_set(
            test[0],
            test[1],
            test[2],
            test[3],
            test[4],
            multiple=multiple,
            n_devices=n_dev,
            mesh=mesh,
            max_buckets=max_buckets,
        )
        lens = [int(b["inputs"].shape[-1]) for b in tracked.buckets]
        tokens = sum(int(np.prod(b["inputs"].shape)) for b in tracked.buckets)
        tr = place(broadcast_runs(trainable, runs), mesh)
        op = place(broadcast_runs(opt0, runs), mesh)
        batches = []
        if groups:  # IA3: the runs' examples in length groups of fixed padded length
            group_lengths = flat_group_lengths(
                pool[4], curricula[:runs], groups, multiple, pool[0].shape[1]
            )
            for t in range(args.steps + 1):
                gs = gather_flat(pool[0], pool[1], pool[4], curricula[:runs, t], group_lengths)
                batches.append(put_groups(gs, mesh))

            def shape_of(b):
                return tuple(int(g["inputs"].shape[-1]) for g in b)

            def train_tokens(b):
                return sum(int(np.prod(g["inputs"].shape)) for g in b)

            def step(tr, op, b):
                if log:
                    return progs["step_flat"](tr, op, frozen_d, b, tracked.buckets)
                tr, op, loss = progs["advance_flat"](tr, op, frozen_d, b)
                return tr, op, loss, loss
        else:
            for t in range(args.steps + 1):
                b = gather_batch(pool[0], pool[1], pool[4], curricula[:runs, t], multiple)
                batches.append(put_batch(b, mesh))

            def shape_of(b):
                return int(b["inputs"].shape[-1])

            def train_tokens(b):
                return int(np.prod(b["inputs"].shape))

            def step(tr, op, b):
                fn = progs["step"] if log else progs["step_nolog"]
                return fn(tr, op, frozen_d, b, tracked.buckets)

        real = int(pool[4][curricula[:runs, 1:]].sum()) / args.steps
        padded = sum(train_tokens(b) for b in batches[1:]) / args.steps
        print(
            f"[{name}, R={runs}, log={log}] tracked buckets {lens} ({tokens} padded tokens, "
            f"{int(test[4].sum())} real); training inputs per step {padded:.0f} padded tokens, "
            f"{real:.0f} real; compiling...",
            flush=True,
        )
        shapes = sorted({shape_of(b) for b in batches})
        # Compile every shape first (the real loop compiles each once, then reuses it).
        start = time.perf_counter()
        seen = set()
        for b in batches:
            if shape_of(b) in seen:
                continue
            seen.add(shape_of(b))
            t_shape = time.perf_counter()
            tr, op, loss, te = step(tr, op, b)
            jax.block_until_ready((tr, loss, te))
            print(
                f"  batch length {shape_of(b)}: first step (compile + run) "
                f"{time.perf_counter() - t_shape:.1f} s",
                flush=True,
            )
        compile_s = time.perf_counter() - start
        per_step = float("inf")
        for _ in range(2):  # best of two passes: the first may still pay one-off costs
            start = time.perf_counter()
            for b in batches[1:]:
                tr, op, loss, te = step(tr, op, b)
            jax.block_until_ready((tr, loss, te))
            per_step = min(per_step, (time.perf_counter() - start) / args.steps)
        total_runs = args.num_runs
        groups = -(-total_runs // runs)  # groups of `runs` trained one after another
        total = per_step * args.target_steps * groups
        print(
            f"{name:<44} R={runs:<3} log={'yes' if log else 'no ':<3} "
            f"first steps {compile_s:6.1f} s ({len(shapes)} shapes) | "
            f"{per_step * 1e3:8.1f} ms/step "
            f"| {runs / per_step:8.1f} run-steps/s | {args.target_steps} steps x {total_runs} "
            f"runs: {total / 60:6.1f} min",
            flush=True,
        )
        return per_step * groups

    results = {}
    layout = f"{args.train_groups} length groups" if args.train_groups else "bucketed"
    results["together"] = measure(
        f"all runs together, {layout}",
        args.runs,
        True,
        args.length_multiple,
        args.tracked_buckets,
        args.train_groups,
    )
    if "nolog" in variants:
        results["together_nolog"] = measure(
            f"all runs together, {layout}",
            args.runs,
            False,
            args.length_multiple,
            args.tracked_buckets,
            args.train_groups,
        )
    if args.train_groups and "vmapped" in variants:
        runs_layout = measure(
            "all runs together, vmapped runs, bucketed",
            args.runs,
            True,
            args.length_multiple,
            args.tracked_buckets,
        )
        print(
            f"speed-up of {args.train_groups} length groups over the vmapped-runs layout "
            f"(with logging): {runs_layout / results['together']:.2f}x"
        )
    if "single" in variants:
        for log in (True, False):
            measure(
                "one run alone (x runs), bucketed",
                1,
                log,
                args.length_multiple,
                args.tracked_buckets,
            )
    if "baseline" in variants:
        results["baseline"] = measure(
            "BASELINE: all together, padded to max", args.runs, True, L, 1
        )
        print(
            f"speed-up of bucketing over the padded baseline (with logging): "
            f"{results['baseline'] / results['together']:.2f}x"
        )
    total = results["together"] * args.target_steps  # results[...]: all num_runs runs
    print(
        f"EXTRAPOLATION: {args.target_steps} steps x {args.num_runs} runs ({args.runs} at a time) "
        f"with per-step logging of {args.n_test} tracked examples: {total / 60:.1f} min"
    )
    limits = {"t5-base": 7, "t0-3b": 90}  # issue 4, minutes on one H200
    if args.method == "ia3" and args.model_size in limits:
        limit = limits[args.model_size]
        verdict = "meets" if total < limit * 60 else "misses"
        print(
            f"{verdict} the issue-4 target ({args.model_size} IA3, 32 runs, 1000 steps < {limit} "
            "min on one H200) if this device is an H200 and --num-runs 32 --batch 8 --n-test 100"
        )
    if "together_nolog" in results:
        print(
            f"logging share: {1 - results['together_nolog'] / results['together']:.0%} of "
            "the step time"
        )
    print(_peak_memory())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())

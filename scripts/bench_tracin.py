"""Benchmark TracIn-CP gradient dot products (finetune.tracin.compute_dots) on a T5.

Random weights and synthetic tokens (no ``datasets``): per-example gradients per second and the
time of one checkpoint (n_train x n_test dot products), for IA3 and for full tuning, plus the
total for ``--checkpoints`` checkpoints (first-call compilation included). With
``--torch-examples N`` it first runs the PyTorch per-example loop of
``scripts/bench_tracin_torch.py`` (captum TracInCP style, IA3-equivalent trainable vectors) in a
subprocess on the same dimensions, and prints the throughput ratio. Unset, --torch-examples is
32 on CPU (the baseline and ratio are printed by default there) and 0 on GPU.

Goal (issue 5, one H200): IA3 TracIn-CP for n_train=1000, n_test=100 at 10 checkpoints of T5-base
in < 2 minutes, and >= 10x the throughput of the PyTorch loop.

GPU commands (each prints the device; figures also go to the --json file):
    # A. The goal: IA3, t5-base, 1000 x 100, 10 checkpoints, plus the PyTorch loop on 200
    #    examples (expected ~1.5-2 minutes on one H100/H200, compilation included).
    python scripts/bench_tracin.py --preset t5-base --input-len 256 --target-len 4 \
        --n-train 1000 --n-test 100 --checkpoints 10 --chunk-size 64 --torch-examples 200 \
        --full-n-train 0 --json $OUT/bench_tracin_ia3.json
    # B. Optional: full tuning of t5-base, projected (d=1024), 24 x 8, 2 checkpoints
    #    (expected ~1-2 minutes; the Gaussian blocks are regenerated per chunk: RNG-bound).
    python scripts/bench_tracin.py --preset t5-base --input-len 256 --target-len 4 \
        --n-train 0 --full-mode projected --proj-dim 1024 --full-n-train 24 --full-n-test 8 \
        --full-chunk-size 8 --full-checkpoints 2 --json $OUT/bench_tracin_full.json

CPU runs (this 2-core box):
    python scripts/bench_tracin.py --preset demo --input-len 96 --target-len 8 \
        --n-train 100 --n-test 50 --checkpoints 3 --freeze-embeddings \
        --full-n-train 100 --full-n-test 50 --full-checkpoints 3 --torch-examples 50
    python scripts/bench_tracin.py --preset t5-base --n-train 16 --n-test 4 --checkpoints 2 \
        --chunk-size 4 --torch-examples 8 --full-n-train 4 --full-n-test 1 \
        --full-chunk-size 2 --full-mode exact --full-checkpoints 2

References:
    Pruthi et al. 2020, TracIn, https://arxiv.org/abs/2002.08484.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from _bench_args import nonneg_int, positive_int  # noqa: E402
from bench_tracin_torch import add_size_flags, config_kwargs, synthetic_tokens  # noqa: E402

CPU_TORCH_EXAMPLES = 32  # --torch-examples when unset on CPU (GPU: 0, no baseline)


def default_torch_examples(given: int | None, backend: str) -> int:
    """--torch-examples: as given, else CPU_TORCH_EXAMPLES on CPU and 0 (skip) elsewhere."""
    if given is not None:
        return given
    return CPU_TORCH_EXAMPLES if backend == "cpu" else 0


def _run_torch(args: argparse.Namespace) -> dict | None:
    """The PyTorch baseline in a subprocess (before JAX claims the GPU memory)."""
    cmd = [
        sys.executable,
        str(HERE / "bench_tracin_torch.py"),
        "--preset",
        args.preset,
        "--method",
        "ia3",
        "--n-examples",
        str(args.torch_examples),
        "--n-train",
        str(args.n_train),
        "--n-test",
        str(args.n_test),
        "--checkpoints",
        str(args.checkpoints),
        "--input-len",
        str(args.input_len),
        "--target-len",
        str(args.target_len),
        "--seed",
        str(args.seed),
    ]
    for name in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size"):
        if getattr(args, name) is not None:
            cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"torch baseline failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return None
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        if line.startswith("[torch"):
            print(line)
    return json.loads(lines[-1])


def _peak_bytes(jax) -> tuple[str, float]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device peak", stats["peak_bytes_in_use"] / 2**30
    return "process peak RSS so far", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _bench(
    args, jax, jnp, graphdef, params, method, mode, n_train, n_test, proj_dim, checkpoints, chunk
) -> dict:
    from finetune.model import combine, make_per_example_loss, partition, trainable_mask
    from finetune.tracin import compute_dots, count_params

    mask = trainable_mask(params, method)
    if method == "full" and args.freeze_embeddings:  # as runs/demo: the vocabulary stays fixed
        mask = jax.tree_util.tree_map_with_path(
            lambda path, m: m and "shared" not in jax.tree_util.keystr(path), mask
        )
    trainable, frozen = partition(params, mask)
    loss = make_per_example_loss(graphdef)
    vocab = config_kwargs(args)["vocab_size"]
    inp, tgt = synthetic_tokens(
        n_train + n_test, args.input_len, args.target_len, vocab, args.seed + 1
    )
    pool = {"inputs": jnp.asarray(inp[:n_train]), "targets": jnp.asarray(tgt[:n_train])}
    test = {"inputs": jnp.asarray(inp[n_train:]), "targets": jnp.asarray(tgt[n_train:])}
    n_params = count_params(trainable)
    if mode == "auto":
        mode = "exact" if 4 * n_params * (n_test + chunk) < 16 * 2**30 else "projected"
    kw = dict(mode=mode, proj_dim=proj_dim, seed=0, chunk_size=chunk, combine=combine)

    start = time.perf_counter()
    times = []
    for k in range(checkpoints):
        # A different "checkpoint" each time (same shapes: no recompilation).
        moved = jax.tree.map(lambda x, k=k: x * (1.0 + 0.01 * k), trainable)
        jax.block_until_ready(moved)
        t0 = time.perf_counter()
        dots = compute_dots(loss, moved, frozen, pool, test, **kw)
        dots = jax.block_until_ready(dots)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    per_s = (n_train + n_test) / steady
    where, peak = _peak_bytes(jax)
    finite = bool(jnp.isfinite(dots).all())
    res = {
        "method": method,
        "mode": mode,
        "proj_dim": proj_dim if mode == "projected" else 0,
        "n_params_trainable": n_params,
        "n_train": n_train,
        "n_test": n_test,
        "first_call_s": times[0],
        "steady_s_per_checkpoint": steady,
        "grads_per_s": per_s,
        "total_s": total,
        "checkpoints": checkpoints,
        "peak_gib": peak,
        "peak_kind": where,
        "finite": finite,
    }
    print(
        f"[jax {jax.devices()[0].device_kind}] {args.preset} {method} ({mode}"
        f"{f', d={proj_dim}' if mode == 'projected' else ''}): {n_params} trainable params, "
        f"n_train={n_train} n_test={n_test}: first call (compile+run) {times[0]:.2f} s, "
        f"{steady:.3f} s per checkpoint, {per_s:.3g} per-example grads/s; "
        f"{checkpoints} checkpoints in {total:.1f} s; {where} {peak:.2f} GiB; "
        f"finite={finite}"
    )
    return res


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_flags(parser)
    parser.add_argument(
        "--n-train", type=nonneg_int, default=1000, help="pool size (IA3 run; 0 skips it)"
    )
    parser.add_argument(
        "--n-test", type=positive_int, default=100, help="tracked test set (IA3 run)"
    )
    parser.add_argument("--checkpoints", type=positive_int, default=10, help="checkpoints to time")
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=32,
        help="examples per vmapped per-example-gradient chunk",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the T5 (parameters stay float32)",
    )
    parser.add_argument(
        "--full-n-train",
        type=nonneg_int,
        default=32,
        help="pool size for the full-tuning run (0 skips it)",
    )
    parser.add_argument("--full-n-test", type=positive_int, default=4, help="test set, full tuning")
    parser.add_argument(
        "--full-mode",
        choices=("auto", "exact", "projected"),
        default="auto",
        help="full tuning: exact, projected, or auto (exact if the test gradients fit in 4 GiB)",
    )
    parser.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="full tuning without the shared vocabulary embedding (runs/demo)",
    )
    parser.add_argument(
        "--full-checkpoints",
        type=positive_int,
        default=2,
        help="checkpoints timed for the full-tuning run",
    )
    parser.add_argument(
        "--full-chunk-size",
        type=positive_int,
        default=None,
        help="chunk size for the full-tuning run (default: --chunk-size)",
    )
    parser.add_argument("--proj-dim", type=positive_int, default=1024, help="projection dimension")
    parser.add_argument(
        "--torch-examples",
        type=nonneg_int,
        default=None,
        help="also time the PyTorch per-example loop on this many examples "
        f"(IA3-equivalent; 0 skips; default {CPU_TORCH_EXAMPLES} on CPU, 0 on GPU)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: folder {args.json.parent} does not exist; create it")

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.torch_examples is None:  # the backend decides (no preallocation: torch runs next)
        import jax

        args.torch_examples = default_torch_examples(None, jax.default_backend())
        if args.torch_examples:
            print(
                f"CPU: torch baseline on --torch-examples {args.torch_examples} (default on "
                "CPU; GPU default 0: pass --torch-examples N there)"
            )
    torch_res = _run_torch(args) if args.torch_examples > 0 else None

    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from finetune.network import T5

    print(f"jax {jax.__version__} on {jax.devices()[0]} ({jax.default_backend()})")
    config = transformers.T5Config(**config_kwargs(args))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    results = {
        "preset": args.preset,
        "config": config_kwargs(args),
        "dtype": args.dtype,
        "input_len": args.input_len,
        "target_len": args.target_len,
    }
    graphdef, params = nnx.split(T5(config, ia3=True, dtype=dtype, rngs=nnx.Rngs(args.seed)))
    if args.n_train > 0:
        results["ia3"] = _bench(
            args, jax, jnp, graphdef, params, "ia3", "exact", args.n_train, args.n_test,
            args.proj_dim, args.checkpoints, args.chunk_size,
        )  # fmt: skip
    if args.full_n_train > 0:
        results["full"] = _bench(
            args, jax, jnp, graphdef, params, "full", args.full_mode, args.full_n_train,
            args.full_n_test, args.proj_dim, args.full_checkpoints,
            args.full_chunk_size or args.chunk_size,
        )  # fmt: skip
    if torch_res is not None and "ia3" in results:
        ratio = results["ia3"]["grads_per_s"] / torch_res["grads_per_s"]
        results["torch"] = torch_res
        results["ia3_speedup_vs_torch_loop"] = ratio
        print(
            f"IA3 per-example grads/s: jax {results['ia3']['grads_per_s']:.3g} vs torch loop "
            f"{torch_res['grads_per_s']:.3g} ({torch_res['device']}, torch {torch_res['torch']}): "
            f"{ratio:.1f}x "
            f"(goal >= 10x)"
        )
    if "ia3" in results:
        ia3 = results["ia3"]
        print(
            f"IA3 TracIn-CP, {ia3['checkpoints']} checkpoints, n_train={ia3['n_train']}, "
            f"n_test={ia3['n_test']}: {ia3['total_s']:.1f} s including compilation "
            f"(goal < 120 s for 10 checkpoints of t5-base, 1000 x 100, on one H200)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

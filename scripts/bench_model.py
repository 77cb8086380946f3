"""Train-step speed of the Flax T5 (finetune.network) at T5/T0 sizes; prints a table.

One train step = forward + backward + optimizer (AdamW) on synthetic tokens, bf16 compute,
random weights (no checkpoint, no `datasets`). Sizes are T5 v1.1 (gated-gelu) dimensions; T0-3B
= t5-v1_1-xl. The PyTorch baseline is scripts/bench_model_torch.py (same points, same printout);
run both in one device call and compare examples/s.

GPU (exact command, ~2-3 min for both scripts on one H100/H200; compile dominates)::

    python scripts/bench_model.py && python scripts/bench_model_torch.py

CPU: defaults to the small size at batch 8 only (and says so).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _t5_points import add_point_args, select_points, t5_config  # noqa: E402
from flax import nnx  # noqa: E402

from finetune.model import make_per_example_loss, partition, trainable_mask  # noqa: E402
from finetune.network import ATTENTION_IMPLS, T5  # noqa: E402
from finetune.steps import make_optimizer, make_train_step  # noqa: E402

PEAK_BF16 = 989e12  # dense bf16 FLOP/s of one H100 SXM / H200 (no sparsity)


def _stack_params(params, name: str) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jax.tree_util.keystr(path).startswith(f"['{name}']"):
            total += int(np.prod(leaf.shape))
    return total


def step_flops(params, batch: int, l_in: int, l_tgt: int) -> float:
    """6 x params x tokens per stack: encoder params x encoder tokens, decoder (+ output
    layer) params x decoder tokens. Embedding lookups are not matmuls and are not counted."""
    enc = _stack_params(params, "encoder")
    dec = _stack_params(params, "decoder") + _stack_params(params, "lm_head")
    return 6.0 * (enc * batch * l_in + dec * batch * l_tgt)


def build(config, *, ia3: bool, param_dtype, scan: bool, attention: str = "einsum", seed=0):
    """graphdef and params, initialised by one jitted function (rbg keys: cheap to compile)."""

    def make(key):
        return T5(
            config,
            ia3=ia3,
            dtype=jnp.bfloat16,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(key),
            scan_layers=scan,
            attention=attention,
        )

    key = jax.random.key(seed, impl="rbg")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(key)))
    params = jax.jit(lambda k: nnx.split(make(k))[1])(key)
    return graphdef, params


def synthetic_batch(batch: int, l_in: int, l_tgt: int, seed: int):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, 32000, size=(batch, l_in)).astype(np.int32)
    targets = rng.integers(2, 32000, size=(batch, l_tgt)).astype(np.int32)
    inputs[:, -1] = 1
    targets[:, -1] = 1
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


def peak_memory_gb() -> tuple[float, str]:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device peak_bytes_in_use (process so far)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host ru_maxrss"


def _phase(name: str) -> None:
    """Progress marker on stderr: a point that stalls is attributed to its phase."""
    print(f"[phase {name} at {time.perf_counter() - _T0:.1f} s]", file=sys.stderr, flush=True)


_T0 = time.perf_counter()


def run_point(size, batch, method, layers, args):
    config = t5_config(size, args.dropout)
    param_dtype = jnp.dtype(args.param_dtype)
    _phase(f"build {size} b{batch} {method} {layers}")
    graphdef, params = build(
        config,
        ia3=method == "ia3",
        param_dtype=param_dtype,
        scan=layers == "scan",
        attention=args.attention,
    )
    jax.block_until_ready(params)
    flops = step_flops(params, batch, args.input_len, args.target_len)
    trainable, frozen = partition(params, trainable_mask(params, method))
    del params
    optimizer = make_optimizer("adamw", 1e-4)
    opt_state = optimizer.init(trainable)
    step = jax.jit(
        make_train_step(make_per_example_loss(graphdef), optimizer), donate_argnums=(0, 1)
    )
    batches = [synthetic_batch(batch, args.input_len, args.target_len, s) for s in range(2)]
    base_key = jax.random.key(0, impl="rbg")
    rng0 = jax.random.fold_in(base_key, 0) if args.dropout > 0 else None
    _phase("lower + compile")
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batches[0], rng0).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    step_gb = float("nan")
    if mem is not None:
        step_gb = (
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        ) / 2**30

    def run(i):
        nonlocal trainable, opt_state
        rng = jax.random.fold_in(base_key, i) if args.dropout > 0 else None
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen, batches[i % 2], rng)
        return loss

    _phase("warm-up steps")
    for i in range(args.warmup):
        loss = run(i)
    loss.block_until_ready()
    _phase("timed steps")
    t0 = time.perf_counter()
    for i in range(args.iters):
        loss = run(args.warmup + i)
    loss.block_until_ready()
    ms = (time.perf_counter() - t0) / args.iters * 1e3
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"{size} b{batch} {method}: non-finite loss {float(loss)}")
    peak, _ = peak_memory_gb()
    return ms, compile_s, step_gb, peak, flops


def main(argv=None):
    on_gpu = jax.default_backend() != "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_args(p)
    p.add_argument(
        "--layers",
        default="scan",
        help="comma list of scan (lax.scan over blocks: compile time independent of depth) "
        "and unroll",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_IMPLS,
        default="einsum",
        help="attention implementation (finetune.network.T5); the fused ones apply only where "
        "no attention dropout is needed, so train with --dropout 0 to time them",
    )
    p.add_argument(
        "--point-timeout",
        type=float,
        default=0,
        help="run each point in its own process killed after this many seconds (0: in this "
        "process); a killed point prints TIMEOUT with the phase it was in, and the rest go on",
    )
    p.add_argument(
        "--param-dtype",
        default="bfloat16",
        help="parameter/optimizer-state dtype (bfloat16 like the torch baseline)",
    )
    args = p.parse_args(argv)
    points, methods = select_points(p, args, on_gpu)
    layer_modes = args.layers.split(",")
    for mode in layer_modes:
        if mode not in ("scan", "unroll"):
            p.error(f"--layers: unknown mode {mode!r}; choose scan and/or unroll")
    dev = jax.devices()[0]
    print(
        f"device: {dev.platform} {dev.device_kind} x{jax.device_count()} | jax {jax.__version__}"
        f" | flax T5 ({args.layers} layers, {args.attention} attention), bf16 compute,"
        f" params {args.param_dtype}, AdamW,"
        f" dropout {args.dropout}"
        f" | input {args.input_len} target {args.target_len}"
        f" | {args.warmup} warm-up + {args.iters} timed steps"
    )
    if not on_gpu and not args.sizes:
        print(
            "CPU backend: running the small size at batch 8 only (pass --sizes/--batches "
            "for more; GPU runs all sizes at batch 8 and 32)"
        )
    print(
        f"{'size':>6} {'batch':>5} {'method':>6} {'layers':>6} {'ms/step':>9} {'ex/s':>8} "
        f"{'compile s':>9} "
        f"{'step GB':>8} {'peak GB':>8} {'%bf16 peak':>10}"
    )
    for size, batch in points:
        for method in methods:
            for layers in layer_modes:
                head = f"{size:>6} {batch:>5} {method:>6} {layers:>6}"
                if args.point_timeout > 0:
                    print(_in_subprocess(size, batch, method, layers, args, argv), flush=True)
                    continue
                try:
                    ms, cs, sgb, peak, flops = run_point(size, batch, method, layers, args)
                except Exception as err:  # OOM at the largest points: report, go on
                    msg = str(err).splitlines()[0][:80]
                    print(f"{head}  FAILED: {type(err).__name__}: {msg}", flush=True)
                    continue
                mfu = flops / (ms / 1e3) / PEAK_BF16 * 100
                print(
                    f"{head} {ms:9.2f} {batch / ms * 1e3:8.1f} "
                    f"{cs:9.1f} {sgb:8.2f} {peak:8.2f} {mfu:9.1f}%",
                    flush=True,
                )
    _, what = peak_memory_gb()
    print(
        f"peak GB: {what}; step GB: XLA memory_analysis of the compiled step "
        "(arguments + outputs + temporaries - donated aliases)"
    )
    print(
        f"%bf16 peak: 6 x params x tokens per stack (encoder params x {args.input_len} tokens, "
        f"decoder + lm_head params x {args.target_len} tokens, per example) / step time / "
        f"{PEAK_BF16:.0f} FLOP/s (H100 SXM / H200 dense bf16; meaningful only on those GPUs; "
        "IA3 skips weight gradients so its true FLOPs are lower)"
    )


def _in_subprocess(size, batch, method, layers, args, argv) -> str:
    """One point in a child process under a time limit; returns its table row (or why not).

    The child is this script restricted to the point, without --point-timeout; its stderr phase
    markers say where a killed point was (build, compile, warm-up or timing). Peak memory is
    then per point, not per process so far.
    """
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    drop = {"--sizes", "--batches", "--methods", "--layers", "--points", "--point-timeout"}
    child, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop:
            skip = "=" not in a
            continue
        child.append(a)
    child += ["--sizes", size, "--batches", str(batch), "--methods", method, "--layers", layers]
    cmd = [sys.executable, str(Path(__file__).resolve()), *child]
    head = f"{size:>6} {batch:>5} {method:>6} {layers:>6}"
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.point_timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        phases = [
            x for x in (err.stderr or b"").decode(errors="replace").splitlines() if "[phase" in x
        ]
        where = phases[-1] if phases else "before the first phase"
        return f"{head}  TIMEOUT after {args.point_timeout:.0f} s, last {where}"
    rows = [x for x in out.stdout.splitlines() if x.startswith(head)]
    if out.returncode != 0 or not rows:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:100]
        return f"{head}  FAILED (exit {out.returncode}): {tail}"
    return rows[-1]


if __name__ == "__main__":
    main()

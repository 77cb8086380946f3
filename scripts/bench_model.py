"""Train-step speed of the Flax T5 (finetune.network) at T5/T0 sizes; prints a table.

One train step = forward + backward + optimizer (AdamW) on synthetic tokens, bf16 compute,
random weights (no checkpoint, no `datasets`). Sizes are T5 v1.1 (gated-gelu) dimensions; T0-3B
= t5-v1_1-xl. The PyTorch baseline is scripts/bench_model_torch.py (same points, same printout);
run both in one device call and compare examples/s.

GPU (exact command, ~2-3 min for both scripts on one H100/H200; compile dominates)::

    python scripts/bench_model.py && python scripts/bench_model_torch.py
    python scripts/bench_model.py --baseline   # the same in one call, with a ratio column

``--baseline`` (default on CPU, off on GPU) first runs bench_model_torch.py in a subprocess on
the same points and flags and adds its examples/s and the ratio to every row.

CPU: defaults to the small size at batch 8 only, float32 compute and parameters on both sides,
input 64, 1 warm-up + 3 timed steps (and says so; bf16 is emulated on CPU).
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
from _t5_points import (  # noqa: E402
    add_point_args,
    apply_backend_defaults,
    select_points,
    t5_config,
)
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


def build(
    config,
    *,
    ia3: bool,
    param_dtype,
    scan: bool,
    attention: str = "einsum",
    seed=0,
    dtype=jnp.bfloat16,
):
    """graphdef and params, initialised by one jitted function (rbg keys: cheap to compile).

    ``dtype``: the compute dtype (bf16 unless the CPU default or --dtype says otherwise)."""

    def make(key):
        return T5(
            config,
            ia3=ia3,
            dtype=dtype,
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
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "process peak RSS so far (ru_maxrss; not per point)",
    )


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
        dtype=jnp.dtype(args.dtype),
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
    jax.block_until_ready(trainable)
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
        choices=("bfloat16", "float32"),
        default=None,
        help="parameter/optimizer-state dtype (default: --dtype, like the torch baseline)",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="first run bench_model_torch.py on the same points and flags (subprocess) and "
        "print its ex/s and the ratio per row (default: on on CPU, off on GPU)",
    )
    args = p.parse_args(argv)
    cpu_small = apply_backend_defaults(args, on_gpu)
    if args.param_dtype is None:
        args.param_dtype = args.dtype
    if args.baseline is None:
        args.baseline = not on_gpu
    points, methods = select_points(p, args, on_gpu)
    layer_modes = args.layers.split(",")
    for mode in layer_modes:
        if mode not in ("scan", "unroll"):
            p.error(f"--layers: unknown mode {mode!r}; choose scan and/or unroll")
    torch_rows = _run_torch(args, argv) if args.baseline else None
    dev = jax.devices()[0]
    compute = "bf16" if args.dtype == "bfloat16" else args.dtype
    print(
        f"device: {dev.platform} {dev.device_kind} x{jax.device_count()} | jax {jax.__version__}"
        f" | flax T5 ({args.layers} layers, {args.attention} attention), {compute} compute,"
        f" params {args.param_dtype}, AdamW,"
        f" dropout {args.dropout}"
        f" | input {args.input_len} target {args.target_len}"
        f" | {args.warmup} warm-up + {args.iters} timed steps"
    )
    if not on_gpu:
        print(
            f"CPU: small sizes (points {', '.join(f'{s}/{b}' for s, b in points)}"
            f"{'; ' + ', '.join(cpu_small) if cpu_small else ''}; pass --sizes/--batches/"
            "--input-len/--iters/--dtype for more); GPU defaults: every size at batch 8 and 32, "
            "bf16, input 256, 3 warm-up + 10 timed steps; %bf16 peak is n/a on CPU"
        )
    header = (
        f"{'size':>6} {'batch':>5} {'method':>6} {'layers':>6} {'ms/step':>9} {'ex/s':>8} "
        f"{'compile s':>9} "
        f"{'step GB':>8} {'peak GB':>8} {'%bf16 peak':>10}"
    )
    if torch_rows is not None:
        header += f" {'torch ex/s':>10} {'jax/torch':>9}"
    print(header)
    failed = 0
    for size, batch in points:
        for method in methods:
            for layers in layer_modes:
                head = f"{size:>6} {batch:>5} {method:>6} {layers:>6}"
                if args.point_timeout > 0:
                    row = _in_subprocess(size, batch, method, layers, args, argv)
                else:
                    try:
                        ms, cs, sgb, peak, flops = run_point(size, batch, method, layers, args)
                    except Exception as err:  # OOM at the largest points: report, go on
                        msg = (str(err).splitlines() or [""])[0][:80]
                        row = f"{head}  FAILED: {type(err).__name__}: {msg}"
                    else:
                        mfu = flops / (ms / 1e3) / PEAK_BF16 * 100
                        mfu_txt = f"{mfu:9.1f}%" if on_gpu else f"{'n/a':>10}"
                        row = (
                            f"{head} {ms:9.2f} {batch / ms * 1e3:8.1f} "
                            f"{cs:9.1f} {sgb:8.2f} {peak:8.2f} {mfu_txt}"
                        )
                if "FAILED" in row or "TIMEOUT" in row:
                    failed += 1
                elif torch_rows is not None:
                    row += _ratio_cols(row, torch_rows.get((size, batch, method)))
                print(row, flush=True)
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
    if torch_rows is not None:
        print(
            "BASELINE: torch ex/s from scripts/bench_model_torch.py (transformers eager, "
            f"{args.dtype}) on the same points and flags, run first in a subprocess; "
            "jax/torch = ex/s ratio (> 1: the Flax T5 is faster)"
        )
    if failed:
        print(f"{failed} point(s) FAILED or TIMEOUT", file=sys.stderr)
        return 1
    return 0


def parse_torch_rows(stdout: str) -> dict[tuple[str, int, str], float | None]:
    """{(size, batch, method): ex/s, or None for a FAILED row} from bench_model_torch's table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[1].isdigit() or parts[2] not in ("full", "ia3"):
            continue
        key = (parts[0], int(parts[1]), parts[2])
        try:
            rows[key] = float(parts[4])
        except (IndexError, ValueError):
            rows[key] = None
    return rows


def _ratio_cols(row: str, torch_exs: float | None) -> str:
    """The ' torch ex/s  jax/torch' columns of one Flax row (its ex/s is the 6th field)."""
    if not torch_exs:
        return f" {'n/a':>10} {'n/a':>9}"
    return f" {torch_exs:10.1f} {float(row.split()[5]) / torch_exs:8.2f}x"


def _argv_without(argv, valued: set[str]) -> list[str]:
    """This call's arguments minus the flags in ``valued`` (with their values, given as
    ``--flag v`` or ``--flag=v``) and minus ``--baseline`` / ``--no-baseline``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in valued:
            skip = "=" not in a
        elif name not in ("--baseline", "--no-baseline"):
            kept.append(a)
    return kept


def _run_torch(args, argv) -> dict:
    """bench_model_torch.py on the same points and flags (a subprocess); its rows by point."""
    import subprocess

    own = {"--layers", "--attention", "--point-timeout", "--param-dtype"}  # jax-only flags
    child = _argv_without(argv, own)
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_model_torch.py"), *child]
    print(f"BASELINE (torch, subprocess): {' '.join(cmd[1:])}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        print(f"  | {line}")
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:100]
        print(f"  | torch baseline exit {out.returncode}: {tail}")
    return parse_torch_rows(out.stdout)


def _in_subprocess(size, batch, method, layers, args, argv) -> str:
    """One point in a child process under a time limit; returns its table row (or why not).

    The child is this script restricted to the point, without --point-timeout; its stderr phase
    markers say where a killed point was (build, compile, warm-up or timing). Peak memory is
    then per point, not per process so far.
    """
    import subprocess

    drop = {"--sizes", "--batches", "--methods", "--layers", "--points", "--point-timeout"}
    child = _argv_without(argv, drop)
    child += ["--sizes", size, "--batches", str(batch), "--methods", method, "--layers", layers]
    child.append("--no-baseline")
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
    raise SystemExit(main())

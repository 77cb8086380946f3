"""Kernel counts and a rough H200 time model of the T5 train step, compiled without a GPU.

The train step of scripts/bench_model.py (same sizes, AdamW, bf16 compute and params, built by
``bench_model.build`` under ``jax.eval_shape``: no weight is materialised) is compiled
ahead of time for one compile-only NVIDIA H200 (sm_90) through the jax CUDA plugin, on a CPU-only
machine. The optimized GPU HLO then gives: kernels launched per step (while bodies times their
trip count), the GEMM FLOPs and dtypes, the custom calls (cuDNN fused attention, cuBLAS) and a
roofline time per kernel, max(bytes / bandwidth, GEMM FLOP / peak) + launch overhead.

``--program runs`` compiles the run generator's two programs instead (``finetune.steps.
make_programs``: the group step of R runs, vmapped or in IA3 length groups, and the tracked-set
logging) on scripts/bench_runs.py's synthetic RTE-like shapes, reports each, and extrapolates the
wall time of ``--steps`` steps of ``--num-runs`` runs.

Setup (once, in bash; a separate venv of about 2.4 GB; `make aot-report` does it in .venv-aot)::

    python3 -m venv .venv-aot
    .venv-aot/bin/pip install -r <(sed '/^# >>> no-deps/,$d' scripts/aot_gpu_requirements.txt)
    .venv-aot/bin/pip install --no-deps \
        -r <(sed -n '/^# >>> no-deps/,$p' scripts/aot_gpu_requirements.txt)

Run (T5 v1.1 small, batch 32: about 30 s on 2 cores; large unrolled: about 100 s)::

    make aot-report AOT_ARGS="--size small --batch 32 --layers unroll"
    JAX_PLATFORMS=cpu .venv-aot/bin/python scripts/aot_gpu_report.py --size large --batch 32 \
        --layers unroll --attention cudnn --dropout 0 --json /tmp/large.json

Caveats:
    * No autotuning without a device: GEMMs become Triton fusions with default, untuned tiles.
      On a real H200 the autotuner may pick other tiles or cuBLAS; the number of GEMMs and their
      dtypes should hold, the kernel choice may not.
    * The time is a rough roofline model, not a measurement: every byte of a kernel's operands
      and result moves once (a dynamic-update-slice moves its update only, a dynamic-slice its
      result, a stacked [layers, ...] loop operand one layer), caches and overlap are ignored,
      and cuDNN attention custom calls count bytes only (no FLOPs).
    * The target config names cuDNN 9.8 (``--cudnn-version``) and CUDA runtime 12.8; pass the
      real machine's cuDNN version, as cuDNN-attention support depends on it. Hopper-only
      cuDNN-attention options may be rejected because JAX's default backend here is the CPU.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parent
_REQUIREMENTS = "scripts/aot_gpu_requirements.txt"
_H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: %(major)d minor: %(minor)d }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""

# ---------------------------------------------------------------- pure part: HLO text -> cost
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-$]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-$]+)\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f64": 8}
_BYTES |= {"s64": 8, "u64": 8}  # every other dtype (f32, s32, u32, ...) counts 4 bytes
# Ops that launch no kernel of their own (a while's body is walked instead).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "call"}
_FREE |= {"conditional", "after-all", "while"}
_DOT_K = r"lhs_contracting_dims=\{([0-9,]*)\}"
_CUBLAS_K = r'"lhs_contracting_dimensions":\[([^\]]*)\]'


@dataclass(frozen=True)
class Instr:
    """One HLO instruction: result name, result type text, opcode, operand names, full line."""

    name: str
    type: str
    op: str
    operands: tuple[str, ...]
    line: str


@dataclass
class Cost:
    """Per-step totals of the time model; ``categories`` maps a kernel name to [n, s, B, FLOP]."""

    kernels: int = 0
    seconds: float = 0.0
    bytes: float = 0.0
    flops: float = 0.0
    categories: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0, 0, 0]))
    custom_calls: collections.Counter = field(default_factory=collections.Counter)
    gemm_dtypes: collections.Counter = field(default_factory=collections.Counter)


def _split_type(rest: str) -> tuple[str, str]:
    """``'TYPE opcode(...)...'`` -> (TYPE, remainder); TYPE may be a parenthesised tuple."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :]
    head, _, tail = rest.partition(" ")
    return head, " " + tail


def parse_hlo(text: str) -> tuple[str | None, dict[str, list[Instr]]]:
    """Parse optimized HLO text (``compiled.as_text()``) into computations.

    Returns:
        The entry computation's name and {computation name: its instructions, in order}.
    """
    comps: dict[str, list[Instr]] = {}
    entry = cur = None
    for line in text.splitlines():
        m = _COMP_RE.match(line)
        if m and "=" not in line.split("(")[0]:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.strip() == "}":
            cur = None
        elif cur is not None and (mi := _INSTR_RE.match(line)):
            typ, rem = _split_type(mi.group(2))
            mo = _OPCODE_RE.search(" " + rem.lstrip())
            op, operands = (mo.group(1), []) if mo else ("?", [])
            if mo:  # operands: the parenthesised group right after the opcode
                start = rem.find(op + "(") + len(op) + 1
                depth, j = 1, start
                while j < len(rem) and depth:
                    depth += (rem[j] == "(") - (rem[j] == ")")
                    j += 1
                operands = re.findall(r"%([\w.\-$]+)", rem[start : j - 1])
            comps[cur].append(Instr(mi.group(1), typ, op, tuple(operands), line))
    return entry, comps


def _nbytes(type_str: str) -> int:
    """Bytes of every array in a type string (tuples summed)."""
    total = 0
    for dtype, dims in _ARRAY_RE.findall(type_str):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def _dims(type_str: str) -> list[int]:
    m = re.search(r"\[([0-9,]*)\]", type_str)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _dtype(type_str: str) -> str:
    m = _ARRAY_RE.search(type_str)
    return m.group(1) if m else "?"


def _gemm(ins: Instr, types: dict[str, str], contracting_re: str) -> tuple[int, str]:
    """(2 x output elements x contracted elements, ``'lhs x rhs -> out'`` dtypes) of a GEMM.

    The contracted dims of the lhs are the digits in group 1 of ``contracting_re``.
    """
    out = 1
    for d in _dims(ins.type):  # a tuple result (cuBLAS: result, workspace): the first array
        out *= d
    lhs = _dims(types.get(ins.operands[0], "")) if ins.operands else []
    k = 1
    if m := re.search(contracting_re, ins.line):
        for i in re.findall(r"\d+", m.group(1)):
            k *= lhs[int(i)]
    ins_t = "x".join(_dtype(types.get(o, "")) for o in ins.operands[:2])
    return 2 * out * k, f"{ins_t}->{_dtype(ins.type)}"


def model_cost(
    text: str, *, bandwidth: float = 4.0e12, peak: float = 700e12, launch_us: float = 3.0
) -> Cost:
    """Rough per-step time of an optimized GPU HLO module: a roofline per launched kernel.

    Every kernel of the entry and of while bodies (times the loop's known trip count, nested
    loops multiplied; loop conditions are not counted) costs max(bytes / bandwidth, GEMM FLOP /
    peak) + launch_us. Bytes are the result plus the operands, except: a dynamic-update-slice
    moves its update (in place: 2 x the operands but the largest), a dynamic-slice 2 x its
    result, and a fusion in a loop body reads an operand whose leading dim equals the trip
    count one slice per iteration.

    Args:
        text: the HLO text of ``compiled.as_text()``.
        bandwidth: memory bandwidth, B/s.
        peak: GEMM rate, FLOP/s.
        launch_us: overhead per kernel launch, microseconds.

    Returns:
        A ``Cost`` with totals per step, per-name categories, custom-call targets and GEMM
        dtypes (``lhs x rhs -> out`` of every dot, weighted by launches).
    """
    entry, comps = parse_hlo(text)
    types = {i.name: i.type for instrs in comps.values() for i in instrs}
    cost = Cost()

    def gemms(comp: str, seen: tuple[str, ...] = ()) -> list[tuple[int, str]]:
        found = []
        for ins in comps.get(comp, []):
            if ins.op == "dot":
                found.append(_gemm(ins, types, _DOT_K))
            for sub in re.findall(r"calls=%?([\w.\-$]+)", ins.line):
                if sub not in seen:
                    found += gemms(sub, (*seen, sub))
        return found

    def walk(comp: str, mult: int, trip: int) -> None:
        for ins in comps[comp]:
            if ins.op == "while":
                body = re.search(r"body=%?([\w.\-$]+)", ins.line).group(1)
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
                n = int(n.group(1)) if n else 1
                walk(body, mult * n, n)
            elif ins.op == "call":  # e.g. a command buffer: its kernels run once per call
                walk(re.search(r"to_apply=%?([\w.\-$]+)", ins.line).group(1), mult, trip)
            if ins.op in _FREE:
                continue
            ops_b = []
            for o in ins.operands:
                b = _nbytes(types.get(o, ""))
                d = _dims(types.get(o, ""))
                if trip > 1 and d and d[0] == trip and ins.op == "fusion":
                    b //= trip  # a stacked [layers, ...] buffer, read one layer per iteration
                ops_b.append(b)
            b = _nbytes(ins.type) + sum(ops_b)
            if "dynamic_update_slice" in ins.name or ins.op == "dynamic-update-slice":
                b = 2 * (sum(ops_b) - max(ops_b))  # in place: only the update moves
            elif "dynamic_slice" in ins.name or ins.op == "dynamic-slice":
                b = 2 * _nbytes(ins.type)
            found = [g for sub in re.findall(r"calls=%?([\w.\-$]+)", ins.line) for g in gemms(sub)]
            if ins.op == "dot":
                found.append(_gemm(ins, types, _DOT_K))
            if ins.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', ins.line)
                target = target.group(1) if target else "?"
                cost.custom_calls[target] += mult
                if "cublas" in target:  # a cuBLAS GEMM: its dims live in the backend config
                    found.append(_gemm(ins, types, _CUBLAS_K))
            f = sum(g[0] for g in found)
            for _, dt in found:
                cost.gemm_dtypes[dt] += mult
            t = max(b / bandwidth, f / peak) + launch_us * 1e-6
            name = ("GEMM:" if f else "") + re.sub(r"(_\d+)+$|\.\d+$", "", ins.name)
            cat = cost.categories[name]
            for k, v in enumerate((1, t, b, f)):
                cat[k] += mult * v
            cost.kernels += mult
            cost.seconds += mult * t
            cost.bytes += mult * b
            cost.flops += mult * f

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
    walk(entry, 1, 0)
    return cost


# ---------------------------------------------------------------- jax part: deviceless compile
def _missing_wheels() -> list[str]:
    """Import names of the analysis-venv packages that this interpreter lacks."""

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    return [n for n in ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc") if not importable(n)]


def _compiler_options(args: argparse.Namespace) -> dict:
    # Without a device the autotuner cannot run; level 0 says so instead of silently skipping.
    options = {"xla_gpu_autotune_level": 0}
    if args.cublas:  # untuned Triton tiles can fail to compile ("Couldn't find output tile sizes")
        options["xla_gpu_enable_triton_gemm"] = False
    return options


def _h200(args: argparse.Namespace):
    """A compile-only topology of one H200 with the target's cuDNN version."""
    from jax.experimental import topologies

    major, minor = (int(x) for x in args.cudnn_version.split("."))
    return topologies.get_topology_desc(
        platform="cuda",
        target_config=_H200_TARGET_CONFIG % {"major": major, "minor": minor},
        topology="1x1x1",
    )


def _compile(args: argparse.Namespace):
    """Build bench_model's train step abstractly and compile it for one H200.

    Returns:
        (compiled executable, 6 x params x tokens FLOPs of bench_model.step_flops, device kind)
    """
    import jax
    import jax.numpy as jnp
    from _t5_points import t5_config
    from bench_model import build, step_flops

    from finetune.model import make_per_example_loss, partition, trainable_mask
    from finetune.steps import make_optimizer, make_train_step

    device = _h200(args).devices[0]
    graphdef = []  # filled inside eval_shape: a GraphDef is not an array output

    def params_only():
        g, params = build(
            t5_config(args.size, args.dropout),
            ia3=args.method == "ia3",
            param_dtype=jnp.bfloat16,
            scan=args.layers == "scan",
            attention=args.attention,
        )
        graphdef.append(g)
        return params

    params = jax.eval_shape(params_only)  # shapes only: no weight is materialised
    flops = step_flops(params, args.batch, args.input_len, args.target_len)
    trainable, frozen = partition(params, trainable_mask(params, args.method))
    optimizer = make_optimizer("adamw", 1e-4)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    batch = {
        "inputs": jax.ShapeDtypeStruct((args.batch, args.input_len), jnp.int32),
        "targets": jax.ShapeDtypeStruct((args.batch, args.target_len), jnp.int32),
    }
    rng = None
    if args.dropout > 0:
        rng = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(0, impl="rbg"), 0))
    sharding = jax.sharding.SingleDeviceSharding(device)
    on_h200 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        (trainable, opt_state, frozen, batch, rng),
    )
    step = jax.jit(
        make_train_step(make_per_example_loss(graphdef[0]), optimizer), donate_argnums=(0, 1)
    )
    compiled = step.lower(*on_h200).compile(_compiler_options(args))
    return compiled, flops, device.device_kind


def _compile_runs(args: argparse.Namespace):
    """Build the run generator's two programs (``finetune.steps.make_programs``) abstractly.

    The shapes are those of scripts/bench_runs.py's synthetic RTE-like data (same lengths, same
    seed): R runs' IA3 or full trainable state, the frozen weights in float32 (as ``finetune
    run`` stores them), bf16 compute, the step's training batch (vmapped runs padded to one
    length, or ``--train-groups`` length groups) and the tracked set in ``--tracked-buckets``
    buckets.

    Returns:
        ([(program name, compiled executable)], device kind, a one-line description)
    """
    import jax
    from _t5_points import t5_kwargs
    from bench_runs import VOCAB, experiment_config, init_model, synthetic_experiment
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from finetune.data import flat_group_lengths, gather_batch, gather_flat, make_tracked_set
    from finetune.distributed import make_mesh
    from finetune.experiment import make_mask
    from finetune.model import make_per_example_loss, make_score_choices, partition
    from finetune.steps import make_programs
    from finetune.trainer import optimizer_for_config

    device = _h200(args).devices[0]
    cfg_kw = dict(t5_kwargs(args.size, 0.0), vocab_size=VOCAB)
    setup = dict(method=args.method, layers=args.layers, attention=args.attention)
    graphdef = []

    def params_only():
        g, params = nnx.split(init_model(cfg_kw, dtype="bfloat16", **setup))
        graphdef.append(g)
        return params

    params = jax.eval_shape(params_only)
    config = experiment_config(
        cfg_kw,
        name="aot",
        runs=args.runs,
        batch=args.batch,
        optimizer=args.optimizer,
        n_train=1000,
        n_test=args.n_test,
        steps=1000,
        dtype="bfloat16",
        length_multiple=16,
        tracked_buckets=args.tracked_buckets,
        **setup,
    )
    trainable, frozen = partition(params, make_mask(config, params))
    optimizer = optimizer_for_config(config)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    # bench_runs.py's synthetic data and curricula at its defaults (1000 examples, 20 steps).
    pool, test, curricula = synthetic_experiment(
        n_train=1000,
        n_test=args.n_test,
        max_len=args.input_len,
        t_len=args.target_len,
        runs=args.runs,
        steps=20,
        batch=args.batch,
    )
    tracked = make_tracked_set(*test, multiple=16, n_devices=1, max_buckets=args.tracked_buckets)
    mesh = make_mesh([device])
    progs = make_programs(
        make_per_example_loss(graphdef[0]),
        make_score_choices(graphdef[0]),
        optimizer,
        mesh,
        broadcast_tracked=args.attention != "einsum",
    )

    def on_h200(tree, runs=None):
        def one(x):
            shape = x.shape if runs is None else (runs, *x.shape)
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(mesh, P()))

        return jax.tree.map(one, tree)

    tr, op, fr = on_h200(trainable, args.runs), on_h200(opt_state, args.runs), on_h200(frozen)
    buckets = on_h200(tracked.buckets)
    if args.train_groups:
        lengths = flat_group_lengths(pool[4], curricula, args.train_groups, 16, args.input_len)
        groups = on_h200(gather_flat(pool[0], pool[1], pool[4], curricula[:, 1], lengths))
        train = ("advance_flat", progs["advance_flat"], (tr, op, fr, groups))
        layout = f"{args.train_groups} length groups {list(lengths)}"
    else:  # the longest step of bench_runs' 20: its batch length is the most any step pays
        widest = max(range(1, 21), key=lambda t: int(pool[4][curricula[:, t]].max()))
        batch = on_h200(gather_batch(pool[0], pool[1], pool[4], curricula[:, widest], 16))
        train = ("advance", progs["advance"], (tr, op, fr, batch))
        layout = f"vmapped runs padded to {batch['inputs'].shape[-1]}"
    programs = [train, ("test_losses", progs["test_losses"], (tr, fr, buckets))]
    lens = [b["inputs"].shape[-1] for b in tracked.buckets]
    rows = [b["inputs"].shape[0] for b in tracked.buckets]
    what = (
        f"{args.runs} runs x batch {args.batch} ({layout}), {args.n_test} tracked in buckets "
        f"{lens} of {rows} rows, {args.optimizer}"
    )
    out = []
    for name, fn, fn_args in programs:
        out.append((name, fn.lower(*fn_args).compile(_compiler_options(args))))
    return out, device.device_kind, what


def main(argv: list[str] | None = None) -> int:
    """Compile one point, print the report; 2 for bad flags or a missing analysis venv."""
    # Before jax is imported: only the CPU backend initialises (the CUDA plugin serves the
    # topology), and the plugin must not insist on CUDA libraries a compile does not need.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    sys.path[:0] = [str(_SCRIPTS), str(_SCRIPTS.parent)]
    from _t5_points import METHODS, SIZES

    from finetune.network import ATTENTION_IMPLS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--program",
        choices=("train", "runs"),
        default="train",
        help="train: bench_model.py's train step; runs: the run generator's group step and "
        "tracked-set logging (bench_runs.py's shapes)",
    )
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--batch", type=int, default=None, help="default: 32 (train), 8 (runs)")
    p.add_argument("--method", choices=METHODS, default=None, help="default: full / ia3 (runs)")
    p.add_argument("--layers", choices=("scan", "unroll"), default="scan")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="einsum")
    p.add_argument("--dropout", type=float, default=0.1, help="train only; runs use none")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=None, help="default: 8 (train), 2 (runs)")
    runs = p.add_argument_group("runs", "with --program runs")
    runs.add_argument("--runs", type=int, default=32, help="runs trained together (R)")
    runs.add_argument(
        "--num-runs", type=int, default=None, help="runs of the experiment (default: --runs)"
    )
    runs.add_argument("--n-test", type=int, default=100, help="tracked examples logged per step")
    runs.add_argument("--tracked-buckets", type=int, default=4)
    runs.add_argument("--train-groups", type=int, default=None, help="IA3: length groups")
    runs.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    runs.add_argument("--steps", type=int, default=1000, help="steps to extrapolate to")
    p.add_argument("--bandwidth", type=float, default=4.0e12, help="B/s (H200 HBM: 4.8e12)")
    p.add_argument("--peak", type=float, default=700e12, help="GEMM FLOP/s (realistic bf16)")
    p.add_argument("--launch-us", type=float, default=3.0, help="overhead per kernel launch")
    p.add_argument("--cudnn-version", default="9.8", help="cuDNN major.minor of the target")
    p.add_argument(
        "--cublas",
        action="store_true",
        help="GEMMs as cuBLAS calls, not Triton fusions (for shapes whose untuned Triton tiling "
        "fails to compile without a device)",
    )
    p.add_argument("--top", type=int, default=15, help="kernel categories to list")
    p.add_argument("--save-hlo", default=None, help="write the optimized GPU HLO text here")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    on_runs = args.program == "runs"
    for flag, train_default, runs_default in (
        ("batch", 32, 8),
        ("method", "full", "ia3"),
        ("target_len", 8, 2),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, runs_default if on_runs else train_default)
    if args.num_runs is None:
        args.num_runs = args.runs
    if on_runs:
        args.dropout = 0.0
    if args.train_groups is not None and (args.method != "ia3" or not on_runs):
        p.error("--train-groups needs --program runs and --method ia3")
    for flag in ("batch", "input_len", "target_len", "top", "runs", "num_runs", "n_test", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if not re.fullmatch(r"\d+\.\d+", args.cudnn_version):
        p.error(f"--cudnn-version {args.cudnn_version!r}: expected major.minor such as 9.8")
    if missing := _missing_wheels():
        print(
            f"aot_gpu_report: {', '.join(missing)} not importable by {sys.executable}; install "
            f"{_REQUIREMENTS} into a separate venv (`make aot-report` creates .venv-aot)",
            file=sys.stderr,
        )
        return 2
    import jax
    from bench_model import PEAK_BF16

    from simfluence.runlog import atomic_write_json, atomic_write_text

    t0 = time.perf_counter()
    if on_runs:
        compiled, device_kind, what = _compile_runs(args)
    else:
        one, flops_6nd, device_kind = _compile(args)
        compiled = [("train_step", one)]
    compile_s = time.perf_counter() - t0
    a = args
    head = f"{a.size} {a.method} {a.layers} layers, {a.attention} attention, input {a.input_len}"
    if on_runs:
        head += f" target {a.target_len} | {what}"
    else:
        head += f" target {a.target_len}, b{a.batch}, dropout {a.dropout} | bf16, AdamW"
    print(
        f"device: {device_kind} (deviceless AOT, sm_90, cuDNN {a.cudnn_version}, no autotuning) "
        f"| jax {jax.__version__} | {head} | compile {compile_s:.0f} s"
    )
    r = {
        "device": device_kind,
        "jax": jax.__version__,
        "point": {k: v for k, v in vars(args).items() if k not in ("save_hlo", "json", "top")},
        "compile_s": compile_s,
        "programs": {},
    }
    texts = []
    for name, c in compiled:
        text = c.as_text()
        texts.append(f"// program {name}\n{text}")
        cost = model_cost(text, bandwidth=a.bandwidth, peak=a.peak, launch_us=a.launch_us)
        r["programs"][name] = _report(name, c, cost, a)
    total = sum(p["modeled_ms"] for p in r["programs"].values())
    r["modeled_ms"] = total
    print(
        f"modeled time per step {total:.2f} ms (rough roofline: {a.bandwidth / 1e12:g} TB/s, "
        f"{a.peak / 1e12:g} TFLOP/s GEMM, {a.launch_us:g} us/launch; not a measurement)"
    )
    if on_runs:
        groups = -(-a.num_runs // a.runs)
        r["modeled_min"] = total * a.steps * groups / 6e4
        print(
            f"modeled {a.steps} steps x {a.num_runs} runs ({groups} group(s) of {a.runs} "
            f"together): {r['modeled_min']:.1f} min (the model ran optimistic where a GPU "
            "measured it; host time not counted)"
        )
    else:
        r["flops_6nd"] = flops_6nd
        r["modeled_pct_bf16_peak"] = flops_6nd / total * 1e3 / PEAK_BF16 * 100
        print(
            f"6 x params x tokens {flops_6nd / 1e12:.3f} TFLOP | modeled %bf16 peak "
            f"{r['modeled_pct_bf16_peak']:.1f}% (bench_model's figure at the modeled time, of "
            f"{PEAK_BF16 / 1e12:g} TFLOP/s)"
        )
    if args.save_hlo:
        atomic_write_text(args.save_hlo, "\n".join(texts))
    if args.json:
        atomic_write_json(args.json, r)
    return 0


def _report(name: str, compiled, cost: Cost, args: argparse.Namespace) -> dict:
    """Print one compiled program's figures; return them as a dict."""
    m = compiled.memory_analysis()
    step = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    top = sorted(cost.categories.items(), key=lambda kv: -kv[1][1])[: args.top]
    r = {
        "kernels": cost.kernels,
        "modeled_ms": cost.seconds * 1e3,
        "bytes": cost.bytes,
        "step_gib": (step - m.alias_size_in_bytes) / 2**30,
        "gemm_flops": cost.flops,
        "gemm_dtypes": dict(cost.gemm_dtypes.most_common()),
        "custom_calls": dict(sorted(cost.custom_calls.items())),
        "categories": {k: dict(zip(("n", "s", "bytes", "flops"), v, strict=True)) for k, v in top},
    }
    print(
        f"[{name}] kernels {cost.kernels} (while bodies x trip count) | modeled "
        f"{r['modeled_ms']:.2f} ms | bytes {cost.bytes / 1e9:.2f} GB | GEMM "
        f"{cost.flops / 1e12:.3f} TFLOP | memory {r['step_gib']:.2f} GiB (memory_analysis)"
    )
    print(f"  GEMM dtypes: {_counts(r['gemm_dtypes'])}")
    print(f"  {'kernel category':<46} {'n':>7} {'ms':>8} {'GB':>8} {'TFLOP':>7}")
    for cat, (n, t, b, f) in top:
        print(f"  {cat[:46]:<46} {n:>7} {t * 1e3:8.3f} {b / 1e9:8.3f} {f / 1e12:7.3f}")
    print(f"  custom calls: {_counts(r['custom_calls'])}")
    return r


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"


if __name__ == "__main__":
    sys.exit(main())

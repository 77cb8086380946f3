"""Sizes, points and flags shared by bench_model.py (Flax) and bench_model_torch.py (PyTorch).

One definition, so the Flax benchmark and its PyTorch baseline always measure the same
dimensions and points. Imports transformers only (no jax, no torch).
"""

from __future__ import annotations

import argparse

import transformers
from _bench_args import fill_unset, nonneg_int, positive_int, positive_int_list, rate

# The PyTorch reference points (H200): small/32, base/8, base/32, large/32, T0-3B/8.
REFERENCE_POINTS = [("small", 32), ("base", 8), ("base", 32), ("large", 32), ("t0-3b", 8)]
# name: (d_model, d_ff, layers (each stack), heads); d_kv 64, vocab 32128, gated-gelu (v1.1).
SIZES = {
    "small": (512, 1024, 6, 8),
    "base": (768, 2048, 12, 12),
    "large": (1024, 2816, 24, 16),
    "t0-3b": (2048, 5120, 24, 32),
}
METHODS = ("full", "ia3")


def t5_kwargs(size: str, dropout: float) -> dict:
    """``transformers.T5Config`` keyword arguments of one T5 v1.1 (gated-gelu, untied) size."""
    d, ff, n, h = SIZES[size]
    return dict(
        vocab_size=32128,
        d_model=d,
        d_ff=ff,
        num_layers=n,
        num_decoder_layers=n,
        num_heads=h,
        d_kv=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=dropout,
        decoder_start_token_id=0,
    )


def t5_config(size: str, dropout: float) -> transformers.T5Config:
    """T5 v1.1 (gated-gelu, untied) config of one benchmark size."""
    return transformers.T5Config(**t5_kwargs(size, dropout))


# Defaults of the size flags left unset: (GPU, CPU). CPU: shorter inputs, fewer steps, float32
# (bf16 matmuls are emulated on CPU: an eager torch bf16 step of t5-small takes ~30 s there).
POINT_DEFAULTS = {
    "input_len": (256, 64),
    "warmup": (3, 1),
    "iters": (10, 3),
    "dtype": ("bfloat16", "float32"),
}


def add_point_args(p: argparse.ArgumentParser) -> None:
    """The flags both benchmarks take: which points, input/target lengths, steps, dropout."""
    p.add_argument("--sizes", default=None, help=f"comma list of {list(SIZES)}")
    p.add_argument("--batches", type=positive_int_list, default=None, help="comma list, e.g. 8,32")
    p.add_argument(
        "--points",
        choices=("grid", "reference"),
        default="grid",
        help="grid: every size x batch; reference: only the issue's 5 reference points",
    )
    p.add_argument("--methods", default="full,ia3", help="comma list of full,ia3")
    p.add_argument("--input-len", type=positive_int, default=None, help="GPU 256, CPU 64")
    p.add_argument("--target-len", type=positive_int, default=8)
    p.add_argument("--warmup", type=nonneg_int, default=None, help="GPU 3, CPU 1")
    p.add_argument("--iters", type=positive_int, default=None, help="GPU 10, CPU 3")
    p.add_argument("--dropout", type=rate, default=0.1, help="dropout rate (train mode)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="compute dtype (torch: parameters too); GPU bfloat16, CPU float32",
    )


def apply_backend_defaults(args: argparse.Namespace, on_gpu: bool) -> list[str]:
    """Fill the unset flags of POINT_DEFAULTS for the backend; returns the CPU ones filled.

    Returns:
        ``["input-len 64", ...]``: the flags set to their CPU value (empty on GPU), for the
        "CPU: small sizes" line.
    """
    return [f"{flag} {value}" for flag, value in fill_unset(args, POINT_DEFAULTS, on_gpu)]


def select_points(
    p: argparse.ArgumentParser, args: argparse.Namespace, on_gpu: bool
) -> tuple[list[tuple[str, int]], list[str]]:
    """(size, batch) points and methods from the flags; CPU defaults to small at batch 8.

    Raises:
        SystemExit: (through ``p.error``) an unknown size or method.
    """
    sizes = args.sizes.split(",") if args.sizes else (list(SIZES) if on_gpu else ["small"])
    batches = args.batches if args.batches else ([8, 32] if on_gpu else [8])
    methods = args.methods.split(",")
    for s in sizes:
        if s not in SIZES:
            p.error(f"--sizes: unknown size {s!r}; choose from {list(SIZES)}")
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose full or ia3")
    if args.points == "reference":
        points = [(s, b) for s, b in REFERENCE_POINTS if s in sizes]
    else:
        points = [(s, b) for s in sizes for b in batches]
    if not points:
        p.error(
            f"--points reference: none of the reference points {REFERENCE_POINTS} has a "
            f"size in --sizes {','.join(sizes)}"
        )
    return points, methods

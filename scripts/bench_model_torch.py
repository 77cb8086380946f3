"""PyTorch baseline for scripts/bench_model.py: transformers T5 in eager bf16 with AdamW.

Same points and printout as the Flax benchmark: ``transformers.T5ForConditionalGeneration``
(gated-gelu v1.1 dimensions, random weights, parameters in bfloat16), ``torch.optim.AdamW``,
train mode (dropout), synthetic tokens, input 256, target 8. Run it in the same device call as
bench_model.py and compare examples/s (``bench_model.py --baseline`` runs this script for its
points and prints the ratio).

GPU::

    python scripts/bench_model_torch.py

CPU: the small size at batch 8 only, float32, input 64, 1 warm-up + 3 timed steps (and says so;
bf16 is emulated on CPU).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch
import transformers
from _t5_points import add_point_args, apply_backend_defaults, select_points, t5_config


def synthetic_batch(batch, l_in, l_tgt, seed, device):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, 32000, size=(batch, l_in))
    targets = rng.integers(2, 32000, size=(batch, l_tgt))
    inputs[:, -1] = 1
    targets[:, -1] = 1
    return (torch.tensor(inputs, device=device), torch.tensor(targets, device=device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_point(size, batch, method, args, device):
    config = t5_config(size, args.dropout)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.T5ForConditionalGeneration(config)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype).train()
    if method == "ia3":
        # T-Few IA3 on HF T5 (as PEFT does it): a ones vector after k, v and wi_1; only those
        # train. Gated FF: scaling wi_1's output == scaling the inner activation.
        for p in model.parameters():
            p.requires_grad_(False)
        vectors = []

        def hook(vec):
            return lambda mod, inp, out: out * vec

        for name, mod in model.named_modules():
            if name.endswith((".k", ".v", ".wi_1")) and isinstance(mod, torch.nn.Linear):
                vec = torch.nn.Parameter(torch.ones(mod.out_features, device=device, dtype=dtype))
                mod.register_forward_hook(hook(vec))
                vectors.append(vec)
        params = vectors
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batches = [synthetic_batch(batch, args.input_len, args.target_len, s, device) for s in range(2)]

    def step(i):
        inputs, targets = batches[i % 2]
        out = model(input_ids=inputs, attention_mask=(inputs != 0).long(), labels=targets)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup):
        loss = step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.iters):
        loss = step(args.warmup + i)
    sync(device)
    ms = (time.perf_counter() - t0) / args.iters * 1e3
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return ms, peak


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_args(p)
    args = p.parse_args(argv)
    cpu_small = apply_backend_defaults(args, on_gpu)
    points, methods = select_points(p, args, on_gpu)
    name = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    print(
        f"device: {device.type} {name} | torch {torch.__version__} | transformers "
        f"{transformers.__version__} eager, params {args.dtype}, AdamW, dropout {args.dropout}"
        f" | input {args.input_len} target {args.target_len}"
        f" | {args.warmup} warm-up + {args.iters} timed steps"
    )
    if not on_gpu:
        print(
            f"CPU: small sizes (points {', '.join(f'{s}/{b}' for s, b in points)}"
            f"{'; ' + ', '.join(cpu_small) if cpu_small else ''}); GPU defaults: every size at "
            "batch 8 and 32, bfloat16, input 256, 3 warm-up + 10 timed steps"
        )
    failed = 0
    print(f"{'size':>6} {'batch':>5} {'method':>6} {'ms/step':>9} {'ex/s':>8} {'peak GB':>8}")
    for size, batch in points:
        for method in methods:
            try:
                ms, peak = run_point(size, batch, method, args, device)
                if on_gpu:
                    torch.cuda.empty_cache()  # the point's model and optimizer are freed
            except Exception as err:  # OOM at the largest points: report, go on
                msg = (str(err).splitlines() or [""])[0][:80]
                print(f"{size:>6} {batch:>5} {method:>6}  FAILED: {type(err).__name__}: {msg}")
                failed += 1
                if on_gpu:
                    torch.cuda.empty_cache()
                continue
            print(
                f"{size:>6} {batch:>5} {method:>6} {ms:9.2f} {batch / ms * 1e3:8.1f} {peak:8.2f}",
                flush=True,
            )
    if on_gpu:
        print("peak GB: torch.cuda.max_memory_allocated per point")
    else:
        print("peak GB: process peak RSS so far (ru_maxrss), not per point")
    if failed:
        print(f"{failed} point(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Baseline for scripts/bench_tracin.py: TracIn-CP per-example gradients in PyTorch, one at a time.

The approach of captum's ``TracInCP`` without batched Jacobians: for every example, a forward
pass on a batch of one, ``loss.backward()``, the trainable gradients flattened into one vector,
then the dot products of the test vectors with the training vectors. Model: Hugging Face's
``T5ForConditionalGeneration`` with random weights and synthetic tokens (no ``datasets``).

Trainable parameters (``--method``):
- ``ia3`` (default): IA3-equivalent. A ones-initialised scaling vector multiplies the output of
  every attention ``k`` and ``v`` projection and of the feed-forward ``wi_1`` (``wi`` for a
  non-gated feed-forward), via forward hooks; only these vectors require grad, as in T-Few
  (Liu et al. 2022, arXiv 2205.05638) and as ``finetune``'s IA3 mask.
- ``full``: every parameter requires grad.

Loss: token cross-entropy averaged over the non-padding target tokens (labels -100 at padding),
the project's per-example loss convention.

It times ``--n-examples`` per-example gradients (after ``--warmup`` untimed ones) and the final
dot products, and extrapolates to ``--n-train + --n-test`` examples at ``--checkpoints``
checkpoints. The last stdout line is JSON (parsed by bench_tracin.py).

Usage (GPU; ~30-60 s for t5-base with 200 examples):
    python scripts/bench_tracin_torch.py --preset t5-base --n-examples 200

References:
    Pruthi et al. 2020, TracIn, https://arxiv.org/abs/2002.08484;
    captum.influence.TracInCP, https://captum.ai/api/influence.html.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from _bench_args import nonneg_int, positive_int
from _t5_points import t5_kwargs  # scripts/: the sizes bench_model.py and bench_runs.py use

PRESETS = {
    # The shape of /work/shared/models/tiny-random-t5 (relu FFN, tied embedding).
    "tiny": dict(
        vocab_size=1302,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_heads=4,
        feed_forward_proj="relu",
        relative_attention_num_buckets=8,
    ),
    # runs/demo/config.py: relu FFN, tied embedding, the real T5 vocabulary (random init).
    "demo": dict(
        vocab_size=32128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        relative_attention_num_buckets=32,
    ),
    # T5 v1.1 / LM-adapted base (the T0 family at base size): gated-gelu, untied lm_head.
    "t5-base": t5_kwargs("base", 0.0),
}


def add_size_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared with bench_tracin.py (model dimensions and token lengths)."""
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model dimensions (random weights)",
    )
    for name in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size"):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=positive_int,
            default=None,
            help=f"override the preset's {name}",
        )
    parser.add_argument("--input-len", type=positive_int, default=128, help="input tokens (padded)")
    parser.add_argument("--target-len", type=positive_int, default=4, help="target tokens (padded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and tokens")


def config_kwargs(args: argparse.Namespace) -> dict:
    kw = dict(PRESETS[args.preset])
    for name in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    kw["num_decoder_layers"] = kw["num_layers"]
    kw.update(dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return kw


def synthetic_tokens(n: int, input_len: int, target_len: int, vocab: int, seed: int):
    """int32 inputs [n, input_len], targets [n, target_len]: random ids, random lengths, EOS=1."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab, size=(n, input_len), dtype=np.int32)
    targets = rng.integers(2, vocab, size=(n, target_len), dtype=np.int32)
    in_lens = rng.integers(max(1, input_len // 2), input_len + 1, size=n)
    tgt_lens = rng.integers(1, target_len + 1, size=n)  # EOS included
    for i in range(n):
        inputs[i, in_lens[i] - 1] = 1
        inputs[i, in_lens[i] :] = 0
        targets[i, tgt_lens[i] - 1] = 1
        targets[i, tgt_lens[i] :] = 0
    return inputs, targets


def _add_ia3(model, torch):
    """Attach ones-initialised IA3 vectors to k, v and wi_1 (wi) outputs; return them."""
    vectors = []
    gated = model.config.is_gated_act
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        is_kv = leaf in ("k", "v") and parent in ("SelfAttention", "EncDecAttention")
        is_ff = parent == "DenseReluDense" and leaf == ("wi_1" if gated else "wi")
        if not (is_kv or is_ff):
            continue
        vec = torch.nn.Parameter(torch.ones(module.out_features, device=module.weight.device))
        module.register_parameter("ia3_scale", vec)
        module.register_forward_hook(lambda m, inp, out: out * m.ia3_scale)
        vectors.append(vec)
    return vectors


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_flags(parser)
    parser.add_argument(
        "--method",
        choices=("ia3", "full"),
        default="ia3",
        help="trainable parameters: IA3-equivalent vectors or everything",
    )
    parser.add_argument(
        "--n-examples",
        type=positive_int,
        default=32,
        help="per-example gradients timed (after --warmup untimed ones)",
    )
    parser.add_argument("--warmup", type=nonneg_int, default=3, help="untimed warm-up examples")
    parser.add_argument(
        "--n-train", type=nonneg_int, default=1000, help="pool size to extrapolate to"
    )
    parser.add_argument(
        "--n-test", type=positive_int, default=100, help="test set to extrapolate to"
    )
    parser.add_argument(
        "--checkpoints", type=positive_int, default=10, help="checkpoints to extrapolate to"
    )
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="keep float32 matmuls exact on GPU (default: TF32 on, as JAX's "
        "default precision on GPU)",
    )
    args = parser.parse_args(argv)

    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    torch.manual_seed(args.seed)
    config = transformers.T5Config(**config_kwargs(args))
    model = transformers.T5ForConditionalGeneration(config).to(device).eval()
    if args.method == "ia3":
        for p in model.parameters():
            p.requires_grad_(False)
        params = _add_ia3(model, torch)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    n = args.n_examples + args.warmup
    inputs, targets = synthetic_tokens(
        n, args.input_len, args.target_len, config.vocab_size, args.seed + 1
    )
    inputs_t = torch.as_tensor(inputs, dtype=torch.long, device=device)
    labels_t = torch.as_tensor(targets, dtype=torch.long, device=device)
    labels_t = labels_t.masked_fill(labels_t == 0, -100)

    def grad_vector(i: int):
        model.zero_grad(set_to_none=True)
        ids = inputs_t[i : i + 1]
        out = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels_t[i : i + 1])
        out.loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    for i in range(args.warmup):
        grad_vector(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    keep = args.method == "ia3" or n_params * args.n_examples * 4 < 2**31
    grads = []
    for i in range(args.warmup, n):
        g = grad_vector(i)
        grads.append(g if keep else g.norm())
    if keep:
        g = torch.stack(grads)  # [n_examples, P]
        n_test = max(1, args.n_examples // 10)
        dots = g[:n_test] @ g[n_test:].T  # the TracIn dot products of this sample
        dots.sum().item()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    per_s = args.n_examples / elapsed
    per_ckpt = (args.n_train + args.n_test) / per_s
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    # CPU: ru_maxrss (KiB on Linux) is the peak resident set of this whole process so far.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "backend": "torch",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "method": args.method,
        "n_params_trainable": int(n_params),
        "input_len": args.input_len,
        "target_len": args.target_len,
        "n_examples_timed": args.n_examples,
        "seconds": elapsed,
        "grads_per_s": per_s,
        "extrapolated_s_per_checkpoint": per_ckpt,
        "extrapolated_s_total": per_ckpt * args.checkpoints,
        "peak_gpu_bytes": peak,
        "peak_rss_bytes": rss,
    }
    mem = (
        f"device peak {peak / 2**30:.2f} GiB (max_memory_allocated)"
        if peak is not None
        else f"process peak RSS {rss / 2**30:.2f} GiB (ru_maxrss)"
    )
    print(
        f"[torch {torch.__version__} {result['device']}] {args.preset} {args.method}: "
        f"{n_params} trainable params, "
        f"{per_s:.3g} per-example grads/s; extrapolated {per_ckpt:.1f} s per checkpoint, "
        f"{per_ckpt * args.checkpoints:.1f} s for {args.checkpoints} checkpoints "
        f"(n_train={args.n_train}, n_test={args.n_test}); {mem}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

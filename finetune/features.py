"""Example features from an experiment's starting model, for featurized Simfluence.

Two kinds, computed once per experiment and cached in ``EXP/features/<kind>.npz`` (written
through `simfluence.runlog.write_features`):

- ``hidden``: the encoder's hidden states, mean-pooled over the whole example: the input's
  tokens followed by the answer's (padding left out), f32 [n, d_model].
- ``tracin``: the projected per-example gradient of the loss at the starting model (the step-0
  checkpoint of every run), f32 [n, proj_dim]: `finetune.tracin.projected_gradients`, the rows
  whose dot products are TracIn-CP's projected-mode dots at step 0.

Each file records a hash of the starting model's parameters (after the warm-up) and a hash of
the examples (dataset ids and tokens) and the settings; a file whose hashes or settings differ
from the experiment's is recomputed, so a new warm-up or another pool never reuses stale
features. Features of training-split examples outside the pool (the warm-up examples, which
no run's curriculum contains) are computed too with ``n_outside``.

References:
    Pruthi et al. 2020, TracIn. https://arxiv.org/abs/2002.08484
    Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from simfluence import runlog

__all__ = ["FEATURE_KINDS", "compute_features", "hidden_features", "join_example"]

FEATURE_KINDS = runlog.FEATURE_KINDS
DEFAULT_PROJ_DIM = 512
_CHUNK = 32
_LOG = logging.getLogger(__name__)


def join_example(
    inputs: Int[np.ndarray, "n L_in"], targets: Int[np.ndarray, "n L_tgt"]
) -> Int[np.ndarray, "n L"]:
    """Each row's input tokens then its answer tokens (pad 0 dropped), right-padded with 0.

    Args:
        inputs: int32 [n, L_in], pad id 0.
        targets: int32 [n, L_tgt], pad id 0.

    Returns:
        int32 [n, L_in + L_tgt].
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    n = inputs.shape[0]
    out = np.zeros((n, inputs.shape[1] + targets.shape[1]), np.int32)
    for k in range(n):  # host-side token bookkeeping, once per experiment
        toks = np.concatenate([inputs[k][inputs[k] != 0], targets[k][targets[k] != 0]])
        out[k, : toks.size] = toks
    return out


@lru_cache(maxsize=4)
def _encode_mean_fn(graphdef):
    from flax import nnx

    @jax.jit
    def encode_mean(params, ids):  # ids [c, L] -> [c, d_model]
        model = nnx.merge(graphdef, params)
        h = model.encode(ids).astype(jnp.float32)  # [c, L, d_model]
        mask = (ids != 0).astype(jnp.float32)[..., None]  # [c, L, 1]
        return (h * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)

    return encode_mean


def hidden_features(
    graphdef, params, ids: Int[np.ndarray, "n L"], chunk: int = _CHUNK
) -> Float[Array, "n d_model"]:
    """Mean over the non-pad positions of the encoder's final hidden states.

    Args:
        graphdef: the T5's nnx graph definition; params: its full parameters.
        ids: int32 [n, L] token ids (pad 0), e.g. `join_example` of inputs and answers.
        chunk: examples per jitted call (the last chunk is padded, so one shape compiles).

    Returns:
        f32 [n, d_model].
    """
    fn = _encode_mean_fn(graphdef)
    n = ids.shape[0]
    c = min(chunk, n)
    out = []
    for s in range(0, n, c):
        part = ids[s : s + c]
        pad = c - part.shape[0]
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
        out.append(np.asarray(fn(params, jnp.asarray(part)))[: c - pad])
    return np.concatenate(out)


def _model_sha256(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _ids_sha256(info: dict, batches: dict) -> str:
    h = hashlib.sha256()
    ids = {k: info.get(k) for k in ("pool_ids", "test_ids", "warmup_ids")}
    h.update(json.dumps(ids, sort_keys=True).encode())
    for name in sorted(batches):
        for key in ("inputs", "targets"):
            a = np.ascontiguousarray(np.asarray(batches[name][key]))
            h.update(f"{name}{key}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def compute_features(
    exp_dir: str | Path,
    kind: str,
    *,
    proj_dim: int = DEFAULT_PROJ_DIM,
    seed: int = 0,
    n_outside: int = 0,
    chunk_size: int = _CHUNK,
    progress: bool = False,
    _exp=None,
) -> tuple[Path, bool]:
    """Computes (or reuses) ``EXP/features/<kind>.npz`` from the experiment's starting model.

    Args:
        exp_dir: experiment folder prepared by ``finetune run`` (its warm-up done, if any).
        kind: "hidden" or "tracin".
        proj_dim: projection dimension of the tracin kind (capped at the number of trainable
            parameters).
        seed: projection seed of the tracin kind.
        n_outside: also the first n_outside training-split examples outside the pool (the
            experiment's warm-up examples, in data.npz); 0 for none.
        chunk_size: examples per jitted chunk.
        progress: print a line on stderr when computing.

    Returns:
        (path, reused): reused is True when the cached file matched the starting model, the
        examples and the settings.

    Raises:
        ValueError: an unknown kind, n_outside larger than the stored outside examples, a
            missing warm-up (see `finetune.experiment`).
    """
    from finetune.experiment import load_experiment
    from finetune.model import partition
    from finetune.tracin import count_params, projected_gradients

    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; use one of {', '.join(FEATURE_KINDS)}")
    if isinstance(n_outside, bool) or not isinstance(n_outside, int) or n_outside < 0:
        raise ValueError(f"n_outside={n_outside!r} must be an int >= 0")
    exp_dir = Path(exp_dir)
    exp = _exp if _exp is not None else load_experiment(exp_dir)
    outside_inputs = exp.data.get("warmup_inputs")
    have = 0 if outside_inputs is None else int(outside_inputs.shape[0])
    if n_outside > have:
        raise ValueError(
            f"--outside {n_outside}: {exp_dir / 'data.npz'} holds {have} training examples outside "
            f"the pool (the warm-up set); use --outside <= {have}"
        )
    batches = {"pool": exp.pool_batch, "test": exp.test_batch}
    if n_outside:
        batches["outside"] = {
            "inputs": exp.data["warmup_inputs"][:n_outside],
            "targets": exp.data["warmup_targets"][:n_outside],
        }
    trainable, frozen = partition(exp.params, exp.mask)
    settings = {"kind": kind, "n_outside": n_outside}
    if kind == "tracin":
        settings.update(proj_dim=min(int(proj_dim), count_params(trainable)), seed=int(seed))
    model_hash = _model_sha256(exp.params)
    ids_hash = _ids_sha256(exp.info, batches)
    cached = _read_cached(exp_dir, kind)
    if (
        cached is not None
        and cached["model_sha256"] == model_hash
        and cached["ids_sha256"] == ids_hash
        and cached["settings"] == settings
    ):
        return runlog.features_path(exp_dir, kind), True
    if progress:
        why = "not cached" if cached is None else "the starting model, examples or settings changed"
        print(f"features {kind}: computing ({why})", file=sys.stderr)
    # One batch of every example (token arrays padded to common widths with the pad id 0, which
    # the loss and the pooling mask), so each kind compiles one program.
    names = list(batches)
    sizes = [int(batches[n]["inputs"].shape[0]) for n in names]
    if kind == "hidden":
        joined = [join_example(batches[n]["inputs"], batches[n]["targets"]) for n in names]
        width = max(j.shape[1] for j in joined)
        ids = np.concatenate([np.pad(j, ((0, 0), (0, width - j.shape[1]))) for j in joined])
        rows = np.asarray(hidden_features(exp.graphdef, exp.params, ids, chunk_size))
    else:
        both = {}
        for key in ("inputs", "targets"):
            width = max(int(batches[n][key].shape[1]) for n in names)
            both[key] = jnp.asarray(
                np.concatenate(
                    [
                        np.pad(batches[n][key], ((0, 0), (0, width - batches[n][key].shape[1])))
                        for n in names
                    ]
                )
            )
        rows = np.asarray(
            projected_gradients(
                exp.per_example_loss,
                trainable,
                frozen,
                both,
                proj_dim=settings["proj_dim"],
                seed=settings["seed"],
                chunk_size=chunk_size,
            )
        )
    ends = np.cumsum(sizes)
    feats = {n: rows[e - k : e] for n, k, e in zip(names, sizes, ends, strict=True)}
    d = feats["pool"].shape[1]
    outside_ids = [str(x) for x in exp.info.get("warmup_ids", [])[:n_outside]]
    path = runlog.write_features(
        exp_dir,
        kind,
        pool=feats["pool"],
        test=feats["test"],
        outside=feats.get("outside", np.zeros((0, d), np.float32)),
        outside_ids=outside_ids,
        model_sha256=model_hash,
        ids_sha256=ids_hash,
        settings=settings,
    )
    return path, False


def _read_cached(exp_dir: Path, kind: str) -> dict | None:
    try:
        return runlog.read_features(exp_dir, kind)
    except runlog.RunLogError as e:  # damaged or of another experiment: recompute it
        _LOG.warning("%s; recomputing it", e)
        return None

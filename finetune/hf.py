"""Hugging Face T5 checkpoints <-> ``finetune.network.T5``.

Reads a local directory (``config.json`` plus ``model.safetensors``, ``pytorch_model.bin`` or their
sharded ``*.index.json`` forms) or a hub name (``huggingface_hub.snapshot_download``; fails fast
when offline). safetensors files are read without torch; ``pytorch_model.bin`` needs torch.
Every parameter of the Flax model is filled from the checkpoint: a missing or mis-shaped tensor
raises an error naming it (nothing is ever randomly initialised while loading), and so does a
tensor the config does not account for (nothing is silently dropped either).

HF stores ``nn.Linear`` weights as [out, in]; the Flax model stores [in, ...out] kernels and fuses
self-attention q/k/v into ``qkv`` [d, 3, heads, d_kv], cross-attention k/v into ``kv`` and the
gated feed-forward's wi_0/wi_1 into ``wi`` [d, 2, d_ff]. ``save_pretrained_safetensors`` writes
the HF names back (folding IA3 vectors into the k, v and wo weights, which is exact), so the
result loads in both ``load_pretrained`` and ``transformers.T5ForConditionalGeneration``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune.network import T5, is_tied

__all__ = ["load_pretrained", "save_pretrained_safetensors", "init_random", "load_config"]

_SAFE = "model.safetensors"
_BIN = "pytorch_model.bin"
# Tensors HF checkpoints may carry that the model does not use (tied copies of `shared`, and a
# cross-attention bias that HF itself ignores).
_IGNORED = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as a T5."""


def init_random(
    config,
    *,
    ia3: bool = False,
    seed: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scan_layers: bool = False,
    attention: str = "einsum",
) -> T5:
    """A randomly initialised T5 (HF's init distributions) from a ``T5Config``.

    Args:
        config: ``transformers.T5Config``.
        ia3: add IA3 vectors (ones).
        seed: PRNG seed of the initialisation.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        scan_layers: ``lax.scan`` over each stack's blocks (faster compiles of deep models).
        attention: "einsum", "xla" or "cudnn" (see ``finetune.network.T5``).

    Returns:
        ``finetune.network.T5``.
    """
    return T5(
        config,
        ia3=ia3,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=nnx.Rngs(seed),
        scan_layers=scan_layers,
        attention=attention,
    )


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint, downloading a hub name when a network exists."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; pass the checkpoint directory holding config.json and the "
                "weights"
            )
        return path
    name = str(path_or_name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"checkpoint directory {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model"])
        if not any(Path(local).glob("*.safetensors")):
            local = snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.model"])
    except Exception as err:  # offline, unknown repo, no network
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(err).__name__}: {err}); pass a local checkpoint directory, or unset "
            "HF_HUB_OFFLINE on a machine with network access"
        ) from err
    return Path(local)


def load_config(directory: str | os.PathLike):
    """The ``T5Config`` of a checkpoint directory.

    Args:
        directory: a local checkpoint directory holding config.json.

    Returns:
        The ``transformers.T5Config`` read from config.json.

    Raises:
        CheckpointError: no config.json, unreadable JSON, or a model_type other than 't5'.
    """
    import transformers

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path} not found; a T5 checkpoint directory needs config.json (write one with "
            "transformers.T5Config.save_pretrained)"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{cfg_path} holds a JSON {type(raw).__name__}, not an object of T5Config fields; "
            "replace it with the checkpoint's config.json (transformers.T5Config.save_pretrained)"
        )
    if raw.get("model_type") != "t5":
        raise CheckpointError(
            f"{cfg_path} has model_type={raw.get('model_type')!r}, not 't5'; only T5-family "
            "checkpoints (T5, T5 v1.1 / LM-adapted, T0) are supported"
        )
    try:
        return transformers.T5Config.from_pretrained(str(directory))
    except Exception as err:  # a field transformers rejects
        raise CheckpointError(
            f"{cfg_path} is not a valid T5Config ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); fix or replace it"
        ) from err


def _unreadable(f: Path, err: Exception) -> CheckpointError:
    """The error for a weights file that cannot be read (truncated, corrupt, wrong format)."""
    first = str(err).splitlines()[0] if str(err) else ""
    return CheckpointError(
        f"{f}: cannot read the weights ({type(err).__name__}: {first}); the file is truncated "
        "or corrupt: re-download or re-convert the checkpoint"
    )


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as err:  # SafetensorError, OSError, ...: one line naming the file
            raise _unreadable(f, err) from err
    return out


def _read_bin(files: list[Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"install torch to read {files[0]}, or convert it once to model.safetensors "
            "(finetune.hf.save_pretrained_safetensors on a machine with torch)"
        ) from err
    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, unpickling error, ...: one line naming the file
            raise _unreadable(f, err) from err
        if not isinstance(state, dict) or not all(
            isinstance(t, torch.Tensor) for t in state.values()
        ):
            raise CheckpointError(
                f"{f} holds a {type(state).__name__}, not a state dict of tensors by name; "
                "save model.state_dict(), or re-download the checkpoint"
            )
        for name, t in state.items():
            t = t.detach()
            out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return out


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory by HF name (safetensors preferred)."""
    for weights, reader in ((_SAFE, _read_safetensors), (_BIN, _read_bin)):
        single = directory / weights
        index = directory / f"{weights}.index.json"
        if single.is_file():
            return reader([single])
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index: {err}") from err
            files = sorted({directory / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shards listed in {index} are missing: {missing}")
            return reader(files)
    raise CheckpointError(
        f"no weights in {directory}: expected {_SAFE}, {_BIN} or a sharded "
        f"{_SAFE}.index.json / {_BIN}.index.json"
    )


def _layer_hint(tensors: dict[str, np.ndarray], config) -> str:
    """Where the block counts of the weights and of config.json differ, for an error message."""
    parts = []
    for prefix, field in (("encoder", "num_layers"), ("decoder", "num_decoder_layers")):
        blocks = {
            int(name.split(".")[2])
            for name in tensors
            if name.startswith(f"{prefix}.block.") and name.split(".")[2].isdigit()
        }
        declared = getattr(config, field)
        if blocks and max(blocks) + 1 != declared:
            parts.append(
                f"the weights hold {max(blocks) + 1} {prefix} blocks, config.json says "
                f"{field}={declared}"
            )
    return f" ({'; '.join(parts)})" if parts else ""


def _layer_names(config, decoder: bool) -> dict[str, int]:
    """Index of each sub-layer inside an HF block (layer.N)."""
    return {"self": 0, "cross": 1, "ff": 2} if decoder else {"self": 0, "ff": 1}


def _hf_map(model: T5, config) -> list[tuple[str, tuple, Callable, Callable]]:
    """(hf_name, hf_shape, to_flax(np) -> array, from_flax() -> np) for every HF tensor.

    ``to_flax`` writes the converted tensor into the model; ``from_flax`` reads it back in HF
    layout. Fused kernels have one entry per HF tensor (each writes its slice).
    """
    d, h, k, ff = config.d_model, config.num_heads, config.d_kv, config.d_ff
    inner = h * k
    entries: list[tuple[str, tuple, Callable, Callable]] = []

    def plain(name, var, shape, fwd, bwd):
        entries.append((name, shape, lambda x: var.set_value(fwd(x)), lambda: bwd(var[...])))

    def sliced(name, var, shape, index, fwd, bwd):
        # var is a fused kernel; `index` selects this tensor's slice along axis 1.
        def put(x):
            cur = var.get_value()
            if isinstance(cur, jax.ShapeDtypeStruct):
                cur = np.zeros(cur.shape, cur.dtype)
            cur = np.array(cur)
            cur[:, index] = fwd(x)
            var.set_value(cur)

        entries.append((name, shape, put, lambda: bwd(np.asarray(var[...])[:, index])))

    ident = lambda x: x  # noqa: E731
    plain("shared.weight", model.shared, (config.vocab_size, d), ident, ident)
    for prefix, stack, decoder in (
        ("encoder", model.encoder, False),
        ("decoder", model.decoder, True),
    ):
        idx = _layer_names(config, decoder)
        plain(
            f"{prefix}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            stack.relative_attention_bias,
            (config.relative_attention_num_buckets, h),
            ident,
            ident,
        )
        for i, blk in enumerate(stack.blocks):
            base = f"{prefix}.block.{i}.layer"
            sa = f"{base}.{idx['self']}.SelfAttention"
            # HF [inner, d] -> [d, h, k]: x.T.reshape; back: reshape(d, inner).T
            for j, n in enumerate("qkv"):
                sliced(
                    f"{sa}.{n}.weight",
                    blk.self_attn.qkv,
                    (inner, d),
                    j,
                    lambda x: x.T.reshape(d, h, k),
                    lambda y: y.reshape(d, inner).T,
                )
            plain(
                f"{sa}.o.weight",
                blk.self_attn.o,
                (d, inner),
                lambda x: x.T.reshape(h, k, d),
                lambda y: np.asarray(y).reshape(inner, d).T,
            )
            plain(
                f"{base}.{idx['self']}.layer_norm.weight", blk.self_norm.scale, (d,), ident, ident
            )
            if decoder:
                ca = f"{base}.{idx['cross']}.EncDecAttention"
                plain(
                    f"{ca}.q.weight",
                    blk.cross_attn.q,
                    (inner, d),
                    lambda x: x.T.reshape(d, h, k),
                    lambda y: np.asarray(y).reshape(d, inner).T,
                )
                for j, n in enumerate("kv"):
                    sliced(
                        f"{ca}.{n}.weight",
                        blk.cross_attn.kv,
                        (inner, d),
                        j,
                        lambda x: x.T.reshape(d, h, k),
                        lambda y: y.reshape(d, inner).T,
                    )
                plain(
                    f"{ca}.o.weight",
                    blk.cross_attn.o,
                    (d, inner),
                    lambda x: x.T.reshape(h, k, d),
                    lambda y: np.asarray(y).reshape(inner, d).T,
                )
                plain(
                    f"{base}.{idx['cross']}.layer_norm.weight",
                    blk.cross_norm.scale,
                    (d,),
                    ident,
                    ident,
                )
            dr = f"{base}.{idx['ff']}.DenseReluDense"
            if config.is_gated_act:
                for j in range(2):
                    sliced(
                        f"{dr}.wi_{j}.weight", blk.ff.wi, (ff, d), j, lambda x: x.T, lambda y: y.T
                    )
            else:
                plain(
                    f"{dr}.wi.weight", blk.ff.wi, (ff, d), lambda x: x.T, lambda y: np.asarray(y).T
                )
            plain(f"{dr}.wo.weight", blk.ff.wo, (d, ff), lambda x: x.T, lambda y: np.asarray(y).T)
            plain(f"{base}.{idx['ff']}.layer_norm.weight", blk.ff_norm.scale, (d,), ident, ident)
        plain(f"{prefix}.final_layer_norm.weight", stack.final_norm.scale, (d,), ident, ident)
    if not model.tied:
        plain(
            "lm_head.weight",
            model.lm_head,
            (config.vocab_size, d),
            lambda x: x.T,
            lambda y: np.asarray(y).T,
        )
    return entries


def _ia3_vars(model: T5) -> list[nnx.Variable]:
    out = []
    for stack in (model.encoder, model.decoder):
        for blk in stack.blocks:
            for mod in (blk.self_attn, getattr(blk, "cross_attn", None), blk.ff):
                if mod is None:
                    continue
                for n in ("ia3_k", "ia3_v", "ia3_ff"):
                    if hasattr(mod, n):
                        out.append(getattr(mod, n))
    return out


def load_pretrained(
    path_or_name: str | os.PathLike,
    *,
    ia3: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scan_layers: bool = False,
    attention: str = "einsum",
) -> tuple[T5, Any]:
    """Load a Hugging Face T5 / T5 v1.1 / T0 checkpoint into ``finetune.network.T5``.

    Args:
        path_or_name: a local checkpoint directory or a hub name (e.g. ``bigscience/T0_3B``).
        ia3: add IA3 vectors initialised to ones (the loaded model is then unchanged).
        dtype: compute dtype (float32 or bfloat16).
        param_dtype: dtype the parameters are stored in.
        scan_layers: ``lax.scan`` over each stack's blocks (faster compiles of deep models).
        attention: "einsum", "xla" or "cudnn" (see ``finetune.network.T5``).

    Returns:
        ``(model, config)``.

    Raises:
        CheckpointError: no config.json, not a T5 config, no weights, an unreadable (truncated)
            weights file, a missing or mis-shaped tensor, a tensor the config does not account
            for (all named), or a pytorch_model.bin without torch installed.
    """
    directory = _resolve(path_or_name)
    config = load_config(directory)
    tensors = _read_weights(directory)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    model = nnx.eval_shape(
        lambda: T5(
            config,
            ia3=ia3,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            scan_layers=scan_layers,
            attention=attention,
        )
    )
    entries = _hf_map(model, config)
    if not is_tied(config) and "lm_head.weight" not in tensors and "shared.weight" in tensors:
        # What transformers does for an untied config without lm_head: tie it to `shared`.
        warnings.warn(
            f"{directory}: config is untied but lm_head.weight is absent; using shared.weight "
            "as the output layer (as transformers does)",
            stacklevel=2,
        )
        tensors["lm_head.weight"] = tensors["shared.weight"]
    if (
        is_tied(config)
        and "lm_head.weight" in tensors
        and "shared.weight" in tensors
        and not np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])
    ):
        raise CheckpointError(
            f"{directory}: config.json ties the output layer to shared.weight (original T5), but "
            "the checkpoint has a different lm_head.weight; set tie_word_embeddings=false in "
            "config.json if this is a v1.1 / T0-style untied checkpoint"
        )
    missing = [name for name, _, _, _ in entries if name not in tensors]
    wrong = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} != expected {shape}"
        for name, shape, _, _ in entries
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if wrong:
            parts.append(f"mis-shaped tensors {wrong[:8]}" + (" ..." if len(wrong) > 8 else ""))
        raise CheckpointError(
            f"{directory} does not fit its config.json ({len(missing)} missing, {len(wrong)} "
            f"mis-shaped): {'; '.join(parts)}; the weights and config.json must come from the "
            "same checkpoint"
        )
    # Tied checkpoints may carry lm_head.weight as a copy of shared.weight.
    known = {name for name, _, _, _ in entries} | set(_IGNORED) | {"lm_head.weight"}
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        # Loading anyway would silently drop weights (e.g. a config.json with fewer layers than
        # the checkpoint gives a truncated model that still trains); only the names in _IGNORED
        # are known to be harmless.
        raise CheckpointError(
            f"{directory} does not fit its config.json: {len(unexpected)} tensor(s) the config "
            f"does not account for {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
            f"{_layer_hint(tensors, config)}; the weights and config.json must come from the "
            "same checkpoint"
        )
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    for name, _, put, _ in entries:
        put(np.asarray(tensors[name], dtype=np.float32).astype(np_dtype))
    for var in _ia3_vars(model):
        var.set_value(np.ones(var.get_value().shape, np_dtype))
    # Every leaf must now be a real array: never a silently random or abstract parameter.
    _, state = nnx.split(model)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise CheckpointError(f"parameter {jax.tree_util.keystr(path)} was not loaded")
    state = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), state)
    nnx.update(model, state)
    return model, config


def _ia3_folded(model: T5, config) -> dict[str, np.ndarray]:
    """HF tensors of ``model`` with IA3 vectors folded into k, v and wo (exact)."""
    tensors = {name: np.asarray(get(), np.float32) for name, _, _, get in _hf_map(model, config)}
    if not model.ia3:
        return tensors
    d, h, k, inner = config.d_model, config.num_heads, config.d_kv, config.num_heads * config.d_kv
    idx = {False: _layer_names(config, False), True: _layer_names(config, True)}
    for prefix, stack, decoder in (
        ("encoder", model.encoder, False),
        ("decoder", model.decoder, True),
    ):
        for i, blk in enumerate(stack.blocks):
            base = f"{prefix}.block.{i}.layer"
            atts = [(f"{base}.{idx[decoder]['self']}.SelfAttention", blk.self_attn)]
            if decoder:
                atts.append((f"{base}.{idx[decoder]['cross']}.EncDecAttention", blk.cross_attn))
            for name, att in atts:
                # HF k.weight [inner, d]: l_k * (W x) == (diag(l_k) W) x.
                lk = np.asarray(att.ia3_k[...], np.float32).reshape(inner, 1)
                lv = np.asarray(att.ia3_v[...], np.float32).reshape(inner, 1)
                tensors[f"{name}.k.weight"] = tensors[f"{name}.k.weight"] * lk
                tensors[f"{name}.v.weight"] = tensors[f"{name}.v.weight"] * lv
            # wo(l_ff * a) == (wo diag(l_ff)) a; HF wo.weight [d, d_ff].
            lff = np.asarray(blk.ff.ia3_ff[...], np.float32).reshape(1, config.d_ff)
            wo = f"{base}.{idx[decoder]['ff']}.DenseReluDense.wo.weight"
            tensors[wo] = tensors[wo] * lff
    del d, h, k
    return tensors


def save_pretrained_safetensors(model: T5, config, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF names, float32) into ``directory``.

    IA3 vectors are folded into the k, v and wo weights (an exact rewrite), so the result is a
    plain T5 checkpoint that ``load_pretrained`` and ``transformers`` both load. Files are written
    under temporary names and renamed, so a crash never leaves a complete-looking checkpoint.

    Args:
        model: ``finetune.network.T5``.
        config: its ``T5Config``.
        directory: output directory (created if needed).

    Returns:
        The directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _ia3_folded(model, config)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    cfg = config.to_dict()
    tied = is_tied(config)
    cfg["tie_word_embeddings"] = tied
    if "scale_decoder_outputs" in cfg or hasattr(config, "scale_decoder_outputs"):
        cfg["scale_decoder_outputs"] = tied
    cfg["model_type"] = "t5"
    cfg.setdefault("architectures", ["T5ForConditionalGeneration"])
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "float32"
    fd, tmp_w = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=directory)
    os.close(fd)
    fd, tmp_c = tempfile.mkstemp(prefix=".config.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp_w, metadata={"format": "pt"})
        Path(tmp_c).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_w, directory / _SAFE)
        os.replace(tmp_c, directory / "config.json")
    finally:
        for tmp in (tmp_w, tmp_c):
            if os.path.exists(tmp):
                os.remove(tmp)
    return directory

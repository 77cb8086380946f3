"""Loading and saving Hugging Face T5 checkpoints (finetune.hf)."""

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finetune.hf import (  # noqa: E402
    CheckpointError,
    init_random,
    load_pretrained,
    save_pretrained_safetensors,
)

TOL = 1e-4


def _logits(model, inputs, targets):
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, i, t: nnx.merge(graphdef, p)(i, t))
    return np.asarray(run(params, jnp.asarray(inputs), jnp.asarray(targets)))


def _torch_logits(model, inputs, targets):
    ti = torch.tensor(inputs, dtype=torch.long)
    with torch.no_grad():
        out = model(
            input_ids=ti,
            attention_mask=(ti != 0).long(),
            labels=torch.tensor(targets, dtype=torch.long),
        )
    return out.logits.float().numpy()


def _batch(vocab):
    rng = np.random.default_rng(1)
    inputs = rng.integers(2, vocab, size=(2, 9)).astype(np.int32)
    inputs[1, 5:] = 0
    targets = rng.integers(2, vocab, size=(2, 4)).astype(np.int32)
    targets[:, -1] = 1
    targets[0, 2:] = [1, 0]
    return inputs, targets


def _small_config(**kw):
    base = dict(
        vocab_size=100,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=1,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    base.update(kw)
    return transformers.T5Config(**base)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An IA3 model with random vectors saved by us: (model, config, directory)."""
    config = _small_config()
    model = init_random(config, ia3=True, seed=4)
    _, state = nnx.split(model)
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
            if "ia3_" in jax.tree_util.keystr(path)
            else x
        ),
        state,
    )
    nnx.update(model, state)
    path = tmp_path_factory.mktemp("ours")
    save_pretrained_safetensors(model, config, path)
    return model, config, path


def test_tiny_random_t5_bin_matches_torch(tiny_t5_dir):
    assert not (tiny_t5_dir / "model.safetensors").exists()  # exercises the .bin path
    model, config = load_pretrained(tiny_t5_dir)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    inputs, targets = _batch(config.vocab_size)
    np.testing.assert_allclose(
        _logits(model, inputs, targets), _torch_logits(ref, inputs, targets), atol=TOL, rtol=TOL
    )


def test_saved_checkpoint_loads_in_transformers_and_ours(saved):
    model, config, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    inputs, targets = _batch(config.vocab_size)
    ours = _logits(model, inputs, targets)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    np.testing.assert_allclose(_torch_logits(ref, inputs, targets), ours, atol=TOL, rtol=TOL)
    again, _ = load_pretrained(path)
    np.testing.assert_allclose(_logits(again, inputs, targets), ours, atol=TOL, rtol=TOL)


def test_round_trip_without_ia3_is_exact(tmp_path):
    config = _small_config(feed_forward_proj="relu", tie_word_embeddings=True)
    model = init_random(config, seed=5)
    save_pretrained_safetensors(model, config, tmp_path)
    again, cfg = load_pretrained(tmp_path)
    a, b = nnx.state(model), nnx.state(again)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _split_into_shards(src, dst, fmt):
    """Write src's tensors as two shards plus an HF index in dst."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    weight_map = {}
    for i, part in enumerate(halves):
        if fmt == "safetensors":
            fname = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({k: tensors[k] for k in part}, str(dst / fname), metadata={"format": "pt"})
            index = "model.safetensors.index.json"
        else:
            fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: torch.from_numpy(tensors[k].copy()) for k in part}, dst / fname)
            index = "pytorch_model.bin.index.json"
        weight_map.update({k: fname for k in part})
    (dst / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints(saved, tmp_path, fmt):
    _, config, path = saved
    sharded = _split_into_shards(path, tmp_path / fmt, fmt)
    a, _ = load_pretrained(path)
    b, _ = load_pretrained(sharded)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_misshaped_tensors_are_named(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, path = saved
    d = _copy(path, tmp_path / "bad")
    tensors = load_file(str(d / "model.safetensors"))
    name = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    del tensors[name]
    tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((16, 23), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(d)
    assert name in str(err.value)
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in str(err.value)
    assert "(16, 23)" in str(err.value)


def test_missing_lm_head_of_untied_model_is_named_unless_shared_exists(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, path = saved
    d = _copy(path, tmp_path / "nolm")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["shared.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shared.weight"):
        load_pretrained(d)


def test_bad_directories(tmp_path, saved):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path)  # empty directory
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="bert"):
        load_pretrained(tmp_path)
    nowt = tmp_path / "noweights"
    nowt.mkdir()
    shutil.copy(path / "config.json", nowt / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        load_pretrained(nowt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "absent")


def test_hub_name_offline_fails_fast():
    with pytest.raises(CheckpointError, match="hub"):
        load_pretrained("google/t5-nonexistent-model-xyz")


def test_bin_without_torch_says_install_torch(tiny_t5_dir, monkeypatch):
    from finetune.hf import _read_weights

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match="install torch to read .*pytorch_model.bin"):
        _read_weights(tiny_t5_dir)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_files_are_named(saved, tmp_path):
    """Truncated weights and a config.json that is not an object: one CheckpointError naming
    the file (they used to escape as SafetensorError, OSError and AttributeError)."""
    from safetensors.numpy import load_file

    _, _, path = saved
    d = _copy(path, tmp_path / "safe")
    _truncate(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the weights"):
        load_pretrained(d)
    b = tmp_path / "bin"
    b.mkdir()
    shutil.copy(path / "config.json", b / "config.json")
    tensors = load_file(str(path / "model.safetensors"))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, b / "pytorch_model.bin")
    load_pretrained(b)  # intact: loads
    _truncate(b / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read the weights"):
        load_pretrained(b)
    (b / "config.json").write_text(json.dumps([{"model_type": "t5"}]))
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list"):
        load_pretrained(b)


def test_tensors_the_config_does_not_use_are_refused(saved, tmp_path):
    """A config.json with fewer layers than the weights used to load a truncated model (with a
    warning only); only the known-harmless extra names are still accepted."""
    from safetensors.numpy import load_file, save_file

    _, config, path = saved
    d = _copy(path, tmp_path / "fewer")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_decoder_layers"] == 2
    cfg["num_decoder_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(d)
    msg = str(err.value)
    assert "decoder.block.1.layer.0.SelfAttention.q.weight" in msg, msg
    assert "the weights hold 2 decoder blocks, config.json says num_decoder_layers=1" in msg
    # Tied copies of `shared` and the cross-attention bias HF ignores stay harmless.
    ok = _copy(path, tmp_path / "extras")
    tensors = load_file(str(ok / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    bias = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    tensors[bias] = np.zeros((config.relative_attention_num_buckets, config.num_heads), np.float32)
    save_file(tensors, str(ok / "model.safetensors"))
    load_pretrained(ok)

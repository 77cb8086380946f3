"""Model functions: IA3, trainable masks, per-example losses, choice scores, per-example grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finetune.hf import init_random, load_pretrained  # noqa: E402
from finetune.model import (  # noqa: E402
    combine,
    make_per_example_loss,
    make_score_choices,
    partition,
    per_example_grads,
    trainable_mask,
)

from ._tiny import SMALL_T5  # noqa: E402

TOL = 1e-4


def _config(**kw):
    return transformers.T5Config(**{**SMALL_T5, **kw})


def _batch(vocab=64, b=3):
    rng = np.random.default_rng(2)
    inputs = rng.integers(2, vocab, size=(b, 7)).astype(np.int32)
    inputs[0, 4:] = 0
    targets = rng.integers(2, vocab, size=(b, 4)).astype(np.int32)
    targets[:, -1] = 1
    targets[1, 1:] = [1, 0, 0]
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


_CACHE = {}


def _jit(kind, graphdef):
    """One jitted function per (kind, graphdef), shared by the tests (compiles are slow)."""
    key = (kind, graphdef)
    if key not in _CACHE:
        if kind == "logits":
            fn = lambda p, b: nnx.merge(graphdef, p)(b["inputs"], b["targets"])  # noqa: E731
        elif kind == "loss":
            fn = make_per_example_loss(graphdef)
        else:
            fn = make_score_choices(graphdef)
        _CACHE[key] = jax.jit(fn)
    return _CACHE[key]


def _random_ia3(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.asarray(rng.uniform(0.3, 2.0, x.shape), x.dtype)
            if "ia3_" in jax.tree_util.keystr(p)
            else x
        ),
        params,
    )


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF torch T5 (relu, tied) and the same weights loaded with IA3 vectors."""
    cfg = _config(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=1)
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(path)
    base, _ = load_pretrained(path)
    ia3, _ = load_pretrained(path, ia3=True)
    return ref, base, ia3


@pytest.fixture(scope="module")
def gated():
    model = init_random(_config(), ia3=True, seed=1)
    graphdef, params = nnx.split(model)
    return graphdef, _random_ia3(params, seed=1)


def test_ia3_ones_equals_base_exactly(hf_pair):
    _, base, ia3 = hf_pair
    batch = _batch()
    gb, pb = nnx.split(base)
    gi, pi = nnx.split(ia3)
    lb = _jit("logits", gb)(pb, batch)
    li = _jit("logits", gi)(pi, batch)
    np.testing.assert_array_equal(np.asarray(lb), np.asarray(li))


def test_ia3_random_equals_hand_scaled_torch_model(hf_pair):
    """IA3 vectors == HF model whose k/v rows and FF wo columns are scaled by them (T-Few)."""
    ref, _, ia3 = hf_pair
    graphdef, params = nnx.split(ia3)
    params = _random_ia3(params, seed=7)
    m = nnx.merge(graphdef, params)
    scaled = transformers.T5ForConditionalGeneration(ref.config).eval()
    scaled.load_state_dict(ref.state_dict())
    with torch.no_grad():
        stacks = (("encoder", m.encoder, scaled.encoder), ("decoder", m.decoder, scaled.decoder))
        for _, ours, theirs in stacks:
            for blk, hf_blk in zip(ours.blocks, theirs.block, strict=True):
                atts = [(blk.self_attn, hf_blk.layer[0].SelfAttention)]
                if hasattr(blk, "cross_attn"):
                    atts.append((blk.cross_attn, hf_blk.layer[1].EncDecAttention))
                for att, hf_att in atts:
                    lk = torch.tensor(np.asarray(att.ia3_k[...]).reshape(-1))  # [h*d_kv]
                    lv = torch.tensor(np.asarray(att.ia3_v[...]).reshape(-1))
                    hf_att.k.weight.mul_(lk[:, None])  # k = W_k x, [inner, d]: scale outputs
                    hf_att.v.weight.mul_(lv[:, None])
                lff = torch.tensor(np.asarray(blk.ff.ia3_ff[...]))  # [d_ff]
                hf_blk.layer[-1].DenseReluDense.wo.weight.mul_(lff[None, :])  # input cols of wo
    batch = _batch()
    ti = torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long)
    with torch.no_grad():
        want = scaled(
            input_ids=ti,
            attention_mask=(ti != 0).long(),
            labels=torch.tensor(np.asarray(batch["targets"]), dtype=torch.long),
        ).logits.numpy()
    got = _jit("logits", graphdef)(params, batch)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=TOL)
    with torch.no_grad():  # and the vectors matter: the unscaled model differs
        plain = ref(
            input_ids=ti,
            attention_mask=(ti != 0).long(),
            labels=torch.tensor(np.asarray(batch["targets"]), dtype=torch.long),
        ).logits.numpy()
    assert not np.allclose(np.asarray(got), plain, atol=1e-3)


def test_trainable_mask(gated):
    _, params = gated
    cfg = _config()
    n_ia3_expected = cfg.num_layers * 3 + cfg.num_decoder_layers * 5  # (k, v, ff) / (2k, 2v, ff)
    ia3 = trainable_mask(params, "ia3")
    full = trainable_mask(params, "full")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    ia3_leaves = jax.tree.leaves(ia3)
    assert sum(ia3_leaves) == n_ia3_expected
    for path, m_ia3, m_full in zip(paths, ia3_leaves, jax.tree.leaves(full), strict=True):
        assert m_ia3 == ("ia3_" in path), path
        assert m_full == (not m_ia3), path
    with pytest.raises(ValueError, match="ia3=True"):
        trainable_mask(nnx.split(init_random(_config(), seed=0))[1], "ia3")
    with pytest.raises(ValueError, match="lora"):
        trainable_mask(params, "lora")


def test_partition_combine_round_trip(gated):
    _, params = gated
    for method in ("ia3", "full"):
        tr, fr = partition(params, trainable_mask(params, method))
        assert len(jax.tree.leaves(tr)) + len(jax.tree.leaves(fr)) == len(jax.tree.leaves(params))
        back = combine(tr, fr)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
            assert a is b


def test_per_example_loss_is_masked_token_mean(hf_pair):
    graphdef, params = nnx.split(hf_pair[2])
    params = _random_ia3(params, seed=7)
    batch = _batch()
    losses = _jit("loss", graphdef)(params, batch)
    logits = np.asarray(_jit("logits", graphdef)(params, batch), np.float64)
    tg = np.asarray(batch["targets"])
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = []
    for i in range(tg.shape[0]):
        toks = [(j, t) for j, t in enumerate(tg[i]) if t != 0]
        want.append(-np.mean([logp[i, j, t] for j, t in toks]))
    np.testing.assert_allclose(np.asarray(losses), want, atol=1e-5, rtol=1e-5)
    assert losses.shape == (3,) and losses.dtype == jnp.float32


def test_score_choices_equals_losses_of_each_pair(hf_pair):
    graphdef, params = nnx.split(hf_pair[2])
    params = _random_ia3(params, seed=7)
    batch = _batch()
    rng = np.random.default_rng(5)
    choices = rng.integers(2, 64, size=(3, 3, 4)).astype(np.int32)  # [b, C, L_tgt]
    choices[:, :, -1] = 1
    choices[0, 1, 2:] = [1, 0]
    choices[:, 2] = 0  # an empty (padding) choice slot
    scores = np.asarray(_jit("score", graphdef)(params, batch["inputs"], choices))
    for c in range(2):
        want = _jit("loss", graphdef)(
            params, {"inputs": batch["inputs"], "targets": jnp.asarray(choices[:, c])}
        )
        np.testing.assert_allclose(scores[:, c], np.asarray(want), atol=1e-5, rtol=1e-5)
    assert np.all(np.isposinf(scores[:, 2]))


def test_per_example_grads_equal_single_example_loop(gated):
    graphdef, params = gated
    batch = _batch()
    loss_fn = make_per_example_loss(graphdef)
    # Everything trainable (IA3 vectors and base weights) covers both methods in one compile.
    everything = jax.tree.map(lambda _: True, params)
    tr, fr = partition(params, everything)
    got = jax.jit(lambda t, f, b: per_example_grads(loss_fn, t, f, b))(tr, fr, batch)

    @jax.jit
    def one_grad(t, b):
        return jax.grad(lambda t_: loss_fn(combine(t_, fr), b)[0])(t)

    for i in range(3):
        ex = {k: v[i : i + 1] for k, v in batch.items()}
        want = one_grad(tr, ex)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g[i]), np.asarray(w), atol=1e-6, rtol=1e-5)
    assert all(g.shape[0] == 3 for g in jax.tree.leaves(got))


def test_per_example_grads_take_a_custom_combine():
    """Plain dict parameters joined by a caller's ``combine`` (as TracIn passes one)."""

    def loss(params, batch):  # batch {"x": [b, 3], "y": [b]} -> [b]
        return (jnp.tanh(batch["x"] @ params["w"]) * params["s"] - batch["y"]) ** 2

    def join(trainable, frozen):
        return {**frozen, **trainable}

    rng = np.random.default_rng(0)
    tr = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    fr = {"s": jnp.float32(1.7)}
    batch = {"x": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "y": jnp.arange(4.0)}
    got = per_example_grads(loss, tr, fr, batch, combine=join)
    for i in range(4):
        ex = {k: v[i : i + 1] for k, v in batch.items()}
        want = jax.grad(lambda t, ex=ex: loss(join(t, fr), ex)[0])(tr)
        np.testing.assert_allclose(got["w"][i], want["w"], atol=1e-6, rtol=1e-5)
    assert set(got) == {"w"} and got["w"].shape == (4, 3)


@pytest.mark.parametrize("method", ["ia3", "full"])
def test_per_example_grads_cover_exactly_the_trainable_part(gated, method):
    graphdef, params = gated
    loss_fn = make_per_example_loss(graphdef)
    tr, fr = partition(params, trainable_mask(params, method))
    shapes = jax.eval_shape(lambda t, f, b: per_example_grads(loss_fn, t, f, b), tr, fr, _batch())
    assert jax.tree.structure(shapes) == jax.tree.structure(tr)
    for g, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(tr), strict=True):
        assert g.shape == (3, *t.shape) and g.dtype == t.dtype

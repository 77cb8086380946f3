"""Parity of finetune.network.T5 with Hugging Face's PyTorch T5 (the reference), float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finetune.hf import load_pretrained  # noqa: E402
from finetune.model import token_losses  # noqa: E402
from finetune.network import _relative_buckets  # noqa: E402

TOL = 1e-4  # fixed up front: float32 end to end


def _config(ff: str, tied: bool, **kw):
    base = dict(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=ff,
        tie_word_embeddings=tied,
        dropout_rate=0.1,
        decoder_start_token_id=0,
    )
    base.update(kw)
    return transformers.T5Config(**base)


def _torch_model(config, seed):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    tied = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
    if not tied:
        # transformers 5.2x ties lm_head to `shared` whatever the config says; untie it the way an
        # untied (v1.1) checkpoint is stored, with its own random output matrix.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
        model.config.tie_word_embeddings = False
    with torch.no_grad():  # layer norms away from 1 so their weights matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 120, size=(3, 11)).astype(np.int32)
    inputs[0, 7:] = 0  # padded inputs
    inputs[1, 3:] = 0
    inputs[:, -1][inputs[:, -1] != 0] = 1
    inputs[0, 6], inputs[1, 2] = 1, 1
    targets = rng.integers(2, 120, size=(3, 6)).astype(np.int32)
    targets[0, 4:] = 0
    targets[0, 3] = 1
    targets[1, 1:] = 0
    targets[1, 0] = 1
    targets[2, 5] = 1
    return inputs, targets


def _torch_reference(model, inputs, targets):
    ti, tt = torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ti, attention_mask=(ti != 0).long(), labels=tt)
    logits = out.logits.float().numpy()
    enc = out.encoder_last_hidden_state.float().numpy()
    # Per-example loss from the torch logits: mean token CE over non-pad targets.
    logp = torch.log_softmax(out.logits.double(), -1).numpy()
    nll = -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]
    mask = targets != 0
    losses = (nll * mask).sum(-1) / mask.sum(-1)
    return enc, logits, losses


# Original T5 (relu, tied + scaled), v1.1/T0 (gated-gelu, untied) and the mixed gated+tied case.
CASES = [("relu", True), ("gated-gelu", False), ("gated-gelu", True)]


@pytest.fixture(
    scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]
)
def pair(request, tmp_path_factory):
    ff, tied = request.param
    config = _config(ff, tied)
    ref = _torch_model(config, seed=CASES.index(request.param))
    path = tmp_path_factory.mktemp(f"hf-{ff}-{tied}")
    ref.save_pretrained(path)  # safetensors
    assert (path / "model.safetensors").is_file()
    model, cfg = load_pretrained(path)
    return ref, model, cfg


def _jitted(model):
    """Encoder output, logits and per-example losses from one jitted forward (eager is slow)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, inputs, targets):
        m = nnx.merge(graphdef, params)
        encoded = m.encode(inputs)
        logits = m.decode(encoded, inputs, targets)
        return encoded, logits, token_losses(logits, targets)

    return lambda i, t: [np.asarray(x) for x in run(params, jnp.asarray(i), jnp.asarray(t))]


def _assert_matches_torch(ref, model):
    """Encoder output, logits and per-example losses equal PyTorch's at TOL."""
    inputs, targets = _batch()
    for got, want in zip(
        _jitted(model)(inputs, targets), _torch_reference(ref, inputs, targets), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_encoder_logits_losses_match_torch(pair):
    ref, model, _ = pair
    _assert_matches_torch(ref, model)


def test_relative_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
            ref = T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md
            ).numpy()
            got = _relative_buckets(
                300, 300, bidirectional=bidirectional, num_buckets=nb, max_distance=md
            )
            np.testing.assert_array_equal(got, ref)


def test_dropout_changes_output_and_is_deterministic_per_key():
    from finetune.hf import init_random

    model = init_random(_config("gated-gelu", False, num_layers=1, num_decoder_layers=1), seed=0)
    graphdef, params = nnx.split(model)
    inputs, targets = _batch()

    @jax.jit
    def run(params, rng):
        return nnx.merge(graphdef, params)(inputs, targets, deterministic=False, dropout_rng=rng)

    a, b, c = (
        run(params, jax.random.key(1)),
        run(params, jax.random.key(1)),
        run(params, jax.random.key(2)),
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="dropout_rng"):
        model(inputs, targets, deterministic=False)


def test_dropout_masks_have_the_rate_and_are_independent():
    """The counter-based masks: drop fraction = rate, mean kept, and independent across call
    sites, keys and positions (tolerances fixed from the binomial spread at n = 2^20)."""
    from finetune.network import _Keys

    n, rate = 1 << 20, 0.1
    x = jnp.ones((16, 256, 256), jnp.float32)  # n elements

    @jax.jit
    def masks(key):
        keys = _Keys(key)
        return jnp.stack([keys.dropout(x, rate) != 0 for _ in range(2)])  # two call sites

    a = np.asarray(masks(jax.random.key(0))).reshape(2, n)
    b = np.asarray(masks(jax.random.key(1))).reshape(2, n)
    sd = np.sqrt(rate * (1 - rate) / n)  # ~2.9e-4
    for m in (a[0], a[1], b[0]):
        assert abs((1 - m.mean()) - rate) < 6 * sd
    # independent masks: P(both dropped) = rate^2 within 6 sd of its own binomial spread
    sd2 = np.sqrt(rate**2 * (1 - rate**2) / n)
    for u, v in ((a[0], a[1]), (a[0], b[0]), (a[0][:-1], a[0][1:]), (a[0][:-256], a[0][256:])):
        assert abs(np.mean(~u & ~v) - rate**2) < 6 * sd2
    kept = np.asarray(_Keys(jax.random.key(3)).dropout(x, rate))
    assert abs(kept.mean() - 1.0) < 6 * np.sqrt(rate / (1 - rate) / n)
    np.testing.assert_array_equal(np.unique(kept), np.float32([0.0, 1 / (1 - 6554 / 65536)]))


def test_bf16_compute_close_to_torch_f32(tmp_path):
    ref = _torch_model(_config("gated-gelu", False, num_layers=1, num_decoder_layers=1), seed=9)
    path = tmp_path / "hf"
    ref.save_pretrained(path)
    inputs, targets = _batch()
    _, want, _ = _torch_reference(ref, inputs, targets)
    bf, _ = load_pretrained(path, dtype=jnp.bfloat16)
    got = _jitted(bf)(inputs, targets)[1]
    assert got.dtype == np.float32
    # bf16 keeps ~3 significant digits; these logits are O(1).
    assert np.max(np.abs(got - want)) < 0.05 * max(1.0, np.max(np.abs(want)))
    assert np.max(np.abs(got - want)) > 0  # it really ran in bf16


def test_scan_layers_equals_unrolled():
    from finetune.hf import init_random

    cfg = _config("gated-gelu", False, num_layers=2, num_decoder_layers=2)
    unrolled = init_random(cfg, ia3=True, seed=2)
    scanned = init_random(cfg, ia3=True, seed=0, scan_layers=True)
    nnx.update(scanned, nnx.state(unrolled))
    inputs, targets = _batch()
    a = _jitted(unrolled)(inputs, targets)[1]
    b = _jitted(scanned)(inputs, targets)[1]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _with_attention(model, cfg, attention, **kw):
    """The same weights in a T5 whose attention runs through jax.nn.dot_product_attention."""
    from finetune.hf import init_random

    other = init_random(cfg, ia3=model.ia3, seed=1, attention=attention, **kw)
    nnx.update(other, nnx.state(model))
    return other


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_fused_attention_path_matches_torch(pair, scan):
    """attention="xla" (jax.nn.dot_product_attention: position bias, causal flag and key
    lengths instead of additive masks) against the PyTorch reference, same tolerance."""
    ref, model, cfg = pair
    _assert_matches_torch(ref, _with_attention(model, cfg, "xla", scan_layers=scan))


def test_fused_attention_gradients_and_dropout_fallback():
    """Gradients through the fused path equal the einsum path's; with attention dropout in
    training the model keeps the einsum path (bitwise the same as attention="einsum")."""
    from finetune.hf import init_random
    from finetune.model import make_per_example_loss

    inputs, targets = _batch()
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    for rate in (0.0, 0.1):
        cfg = _config("gated-gelu", False, dropout_rate=rate)
        models = [init_random(cfg, ia3=True, seed=3, attention=a) for a in ("einsum", "xla")]
        nnx.update(models[1], nnx.state(models[0]))
        key = jax.random.key(0)

        def grads(model, rate=rate, key=key):
            graphdef, params = nnx.split(model)
            loss = make_per_example_loss(graphdef)
            rng = key if rate > 0 else None
            return jax.jit(jax.grad(lambda p: loss(p, batch, rng).sum()))(params)

        a, b = (jax.tree.leaves(grads(m)) for m in models)
        for x, y in zip(a, b, strict=True):
            if rate > 0:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            else:
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_unknown_attention_is_refused():
    from finetune.hf import init_random

    with pytest.raises(ValueError, match="attention='flash'; choose one of"):
        init_random(_config("relu", True), attention="flash")


def _set_cross_mode(model, mode):
    for block in model.decoder.blocks:
        block.cross_attn.cross_mode = mode
    return model


def test_projected_cross_attention_matches_torch(pair):
    """Cross-attention with the key/value projections moved to the query side (what "auto"
    picks for short targets over long inputs) against the PyTorch reference."""
    ref, model, cfg = pair
    _assert_matches_torch(ref, _set_cross_mode(_with_attention(model, cfg, "einsum"), "always"))


def test_projected_cross_attention_gradients_and_dropout():
    """Same gradients (IA3 and full) and the same dropout masks as the usual form."""
    from finetune.hf import init_random
    from finetune.model import make_per_example_loss

    inputs, targets = _batch()
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}
    cfg = _config("gated-gelu", False, dropout_rate=0.1)
    models = [init_random(cfg, ia3=True, seed=4) for _ in range(2)]
    nnx.update(models[1], nnx.state(models[0]))
    _set_cross_mode(models[0], "never")
    _set_cross_mode(models[1], "always")
    key = jax.random.key(1)

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = make_per_example_loss(graphdef)
        return jax.jit(jax.value_and_grad(lambda p: loss(p, batch, key).sum()))(params)

    (la, ga), (lb, gb) = (grads(m) for m in models)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_auto_cross_mode_picks_the_cheaper_form():
    from finetune.hf import init_random

    model = init_random(_config("relu", True, d_model=64, d_kv=16, num_heads=4))
    attn = model.decoder.blocks[0].cross_attn
    assert attn._project_queries(2, 128)  # 2 targets over 128 inputs: projected
    assert not attn._project_queries(32, 16)  # more queries than memory rows: usual

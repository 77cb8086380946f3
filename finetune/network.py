"""T5 / T0 encoder-decoder in Flax NNX, numerically equal to Hugging Face's PyTorch T5.

Layer 1 of ``finetune`` (a pure network; see its package docstring). Built from a
``transformers.T5Config``:

- relative position buckets (bidirectional in the encoder, causal in the decoder); one bias
  table per stack, owned by the stack (HF stores it in block 0 and shares it with every block);
- RMS layer norm without bias or mean subtraction, computed in float32;
- ``relu`` (original T5) or gated ``gelu_new`` (T5 v1.1, LM-adapted, T0) feed-forwards;
- a tied output embedding scaled by ``d_model ** -0.5`` (original T5) or an untied ``lm_head``
  (v1.1); no ``1/sqrt(d_kv)`` scaling of ``q.k`` (T5 folds it into the initialisation);
- dropout at HF's sites, driven by an explicit ``dropout_rng`` (no stateful rng in the module);
- IA3 vectors (Liu et al. 2022) multiplying the keys and values of every attention and the inner
  activation of every feed-forward, initialised to ones, present only when ``ia3=True``.

Parameters are stored in ``param_dtype``; matmuls run in ``dtype`` (e.g. bfloat16) with float32
accumulation of attention scores and logits. Self-attention uses one fused ``qkv`` kernel and
cross-attention one fused ``kv`` kernel; the gated feed-forward one fused ``wi`` kernel
(``finetune.hf`` maps them to and from HF's separate q/k/v, wi_0/wi_1 matrices).

References:
    Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", https://arxiv.org/abs/1910.10683.
    Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    In-Context Learning" (IA3, T-Few), https://arxiv.org/abs/2205.05638.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

__all__ = ["T5", "IA3Param", "is_tied", "shift_right"]

_NEG_INF = float(np.finfo(np.float32).min)  # additive mask value, as HF uses for float32


class IA3Param(nnx.Param):
    """An IA3 scaling vector (a ``Param`` subclass, so filters can select IA3 by type)."""


def is_tied(config: Any) -> bool:
    """Whether the output layer reuses ``shared`` (scaled by ``d_model**-0.5``), as original T5.

    transformers >= 5.2x always sets ``tie_word_embeddings=True`` and keeps the checkpoint's
    intent in ``scale_decoder_outputs``; older versions use ``tie_word_embeddings`` directly.
    Real checkpoints are either tied+scaled (T5) or untied+unscaled (v1.1, T0).

    Args:
        config: a ``transformers.T5Config``.

    Returns:
        True for a tied and scaled output layer (no ``lm_head``), False for a separate one.
    """
    scale = getattr(config, "scale_decoder_outputs", None)
    if scale is not None:
        return bool(scale)
    return bool(getattr(config, "tie_word_embeddings", True))


def shift_right(targets: Int[Array, "b L_tgt"], start_id: int = 0) -> Int[Array, "b L_tgt"]:
    """Decoder inputs: targets shifted right by one with ``start_id`` first.

    Args:
        targets: int32 [batch, L_tgt].
        start_id: the decoder start token (T5: the pad id 0).

    Returns:
        int32 [batch, L_tgt].
    """
    start = jnp.full((targets.shape[0], 1), start_id, dtype=targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def _relative_buckets(
    q_len: int, k_len: int, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Relative position bucket of each (query, key) pair, exactly as HF/Mesh TF compute it.

    Computed with numpy at trace time (the lengths are static), in float32 like torch.

    Returns:
        int32 [q_len, k_len] in [0, num_buckets).
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # [q, k] memory - query
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(rel.dtype) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = np.maximum(rel, 1).astype(np.float32)
    large = max_exact + (
        np.log(safe / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    ).astype(rel.dtype)
    large = np.minimum(large, num_buckets - 1)
    buckets += np.where(is_small, rel, large)
    return buckets.astype(np.int32)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


class _AttnInputs(NamedTuple):
    """What one attention needs besides q/k/v, in both forms (built once per stack call).

    ``terms`` are float32 additive terms for the einsum path; ``position``, ``kv_lengths`` and
    ``causal`` are the same information for ``jax.nn.dot_product_attention`` (right padding).
    """

    terms: tuple  # each broadcastable to [b, h, q, k], float32
    position: jax.Array | None  # [1, h, q, k] float32 relative position bias, or None
    kv_lengths: jax.Array | None  # int32 [b] non-padding keys (right-padded), or None
    causal: bool  # decoder self-attention


def _cudnn_supports(n_q: int, n_k: int, head_dim: int, bias) -> bool:
    """Whether cuDNN's fused attention takes these shapes (else the model uses XLA's).

    jax's bf16/fp16 cuDNN path needs a head dim that is a multiple of 8 and at most 128 (256 on
    Hopper; 128 keeps older GPUs too), and, when a bias is trained through, even query and key
    lengths. Whether a gradient will be taken is unknown while tracing the forward, so a
    biased attention with an odd length always falls back.
    """
    if head_dim % 8 or head_dim > 128:
        return False
    return bias is None or (n_q % 2 == 0 and n_k % 2 == 0)


class _Keys:
    """Hands out a fresh dropout key per call site (in trace order); None when deterministic."""

    def __init__(self, rng: jax.Array | None):
        self._rng = rng
        self._count = 0

    @property
    def deterministic(self) -> bool:
        return self._rng is None

    def fold(self, index) -> _Keys:
        """Keys for one scanned layer (``index`` may be traced); independent of other sites."""
        if self._rng is None:
            return _Keys(None)
        return _Keys(jax.random.fold_in(self._rng, jnp.uint32(1 << 20) + index))

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        if self._rng is None or rate == 0.0:
            return x
        # Counter-based bits: a hash of (key, call site, element index), computed elementwise
        # from an iota, so XLA fuses it into the op that consumes the mask. No random-number
        # kernel and no bits written to memory (a jax.random draw per site was 2-3 extra
        # kernels and 2 bytes per element written and read again), and cheap to compile.
        # Keep when the top 16 bits >= rate * 2^16; rescale by the exact keep probability so
        # the expectation is unchanged.
        data = jax.random.key_data(self._rng).ravel().astype(jnp.uint32)  # [2] or [4]
        site = jnp.uint32(self._count)
        self._count += 1
        seed0 = _mix32(data[0] ^ _mix32(site * jnp.uint32(0x9E3779B9) + data[-1]))
        seed1 = _mix32(data[1] + site)
        index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
        bits = _mix32(_mix32(index * jnp.uint32(0x9E3779B1) + seed0) ^ seed1) >> 16
        threshold = min(int(round(rate * 65536)), 65535)
        keep_prob = 1.0 - threshold / 65536
        return jnp.where(bits >= threshold, x / keep_prob, 0).astype(x.dtype)


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _activation(name: str):
    """The feed-forward nonlinearity named by ``config.dense_act_fn`` (HF's ACT2FN names)."""
    table = {
        "relu": jax.nn.relu,
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(
            f"T5Config.dense_act_fn={name!r} is not supported; use one of {sorted(table)} "
            "(feed_forward_proj 'relu' or 'gated-gelu')"
        )
    return table[name]


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    """N(0, std^2) initial values, drawn from the next ``rngs.params()`` key.

    With a concrete key the draw is done by numpy (seeded by the key's bits): eager jax.random
    compiles one kernel per parameter shape, which made tiny CPU inits take many seconds.
    Under tracing (jit/eval_shape) it falls back to ``jax.random.normal``.
    """
    key = rngs.params()
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(values * np.float32(std), dtype=dtype)


class _RMSNorm(nnx.Module):
    """T5 layer norm: x / rms(x) * scale, no mean subtraction, no bias, computed in float32."""

    def __init__(self, d_model: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((d_model,), param_dtype))  # [d_model]
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # [b, l, d]
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # [b, l, 1]
        y = x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


class _Attention(nnx.Module):
    """Multi-head attention without q.k scaling; fused qkv (self) or q + fused kv (cross)."""

    def __init__(
        self,
        config,
        *,
        cross: bool,
        ia3: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        attention: str = "einsum",
    ):
        d, h, k = config.d_model, config.num_heads, config.d_kv
        f = config.initializer_factor
        self.cross = cross
        self.attention = attention
        # Cross-attention with few queries (short targets, long inputs): "auto" moves the key
        # and value projections to the query side when that costs fewer FLOPs (see __call__);
        # "always" / "never" force one form (tests compare them).
        self.cross_mode = "auto"
        self.dtype = dtype
        self.dropout_rate = float(config.dropout_rate)
        # HF init: q ~ N(0, (d*d_kv)^-1/2), k, v ~ N(0, d^-1/2), o ~ N(0, (h*d_kv)^-1/2).
        if cross:
            self.q = nnx.Param(_normal(rngs, (d, h, k), f * (d * k) ** -0.5, param_dtype))
            self.kv = nnx.Param(_normal(rngs, (d, 2, h, k), f * d**-0.5, param_dtype))
        else:
            qkv = jnp.stack(
                [
                    _normal(rngs, (d, h, k), f * (d * k) ** -0.5, param_dtype),
                    _normal(rngs, (d, h, k), f * d**-0.5, param_dtype),
                    _normal(rngs, (d, h, k), f * d**-0.5, param_dtype),
                ],
                axis=1,
            )
            self.qkv = nnx.Param(qkv)  # [d_model, 3, heads, d_kv]
        self.o = nnx.Param(_normal(rngs, (h, k, d), f * (h * k) ** -0.5, param_dtype))
        if ia3:
            self.ia3_k = IA3Param(jnp.ones((h, k), param_dtype))  # [heads, d_kv]
            self.ia3_v = IA3Param(jnp.ones((h, k), param_dtype))  # [heads, d_kv]

    def __call__(
        self,
        x: jax.Array,
        attn: _AttnInputs,
        keys: _Keys,
        memory: jax.Array | None = None,
    ) -> jax.Array:
        """Attention of ``x`` over itself or over ``memory``.

        Args:
            x: [b, q, d_model] queries' hidden states (compute dtype).
            attn: position bias and masks. The einsum path adds ``attn.terms`` (position bias
                [1, h, q, k], padding/causal mask [b or 1, 1, q or 1, k]) inside the softmax
                fusion; the fused path passes them to ``jax.nn.dot_product_attention``.
            keys: dropout keys.
            memory: [b, k, d_model] encoder output for cross-attention, else None.

        Returns:
            [b, q, d_model] in the compute dtype.
        """
        dt = self.dtype
        if self.cross and self._project_queries(x.shape[1], memory.shape[1]):
            return self._cross_projected(x, attn, keys, memory)
        if self.cross:
            q = jnp.einsum("bqd,dhk->bqhk", x, self.q[...].astype(dt))  # [b, q, h, dk]
            # Projection outputs stay in the GEMM's own [b, l, (t h dk)] order (a leading t
            # would cost a transpose of the whole output on GPU); the slices fuse into users.
            kv = jnp.einsum("bld,dthk->blthk", memory, self.kv[...].astype(dt))  # [b, l, 2, h, dk]
            k, v = kv[:, :, 0], kv[:, :, 1]
        else:
            qkv = jnp.einsum("bld,dthk->blthk", x, self.qkv[...].astype(dt))  # [b, l, 3, h, dk]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if hasattr(self, "ia3_k"):  # IA3: l_k * K and l_v * V (T-Few scales the k/v outputs)
            k = k * self.ia3_k[...].astype(dt)
            v = v * self.ia3_v[...].astype(dt)
        if self.attention != "einsum" and (keys.deterministic or self.dropout_rate == 0.0):
            # Fused kernel (cuDNN flash attention on GPU) when the probabilities need no
            # dropout: the [b, h, q, l] scores are never written to memory. scale=1: T5 has
            # no 1/sqrt(d_kv).
            q_lengths = None
            if attn.kv_lengths is not None:
                # Every query row is real (padded queries attend like HF's do). Derived from
                # kv_lengths, not a constant, so that under vmap both length vectors carry
                # the same batch axis (cuDNN's batching rule reshapes them together).
                q_lengths = attn.kv_lengths * 0 + q.shape[1]
            impl, bias = self.attention, attn.position
            if impl == "cudnn" and not _cudnn_supports(q.shape[1], k.shape[1], q.shape[-1], bias):
                impl = "xla"  # same computation, XLA kernels
            if impl == "cudnn" and bias is not None:
                bias = bias.astype(dt)  # the kernel takes the bias in the q/k/v dtype
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                bias=bias,
                scale=1.0,
                is_causal=attn.causal,
                query_seq_lengths=q_lengths,
                key_value_seq_lengths=attn.kv_lengths,
                implementation=impl,
            )  # [b, q, h, dk]
        else:
            # T5: no 1/sqrt(d_kv). The q.k product is rounded to the compute dtype; bias, mask
            # and softmax are evaluated in float32.
            scores = jnp.einsum("bqhk,blhk->bhql", q, k)  # [b, h, q, l]
            probs = self._probs(scores, attn, keys)
            out = jnp.einsum("bhql,blhk->bqhk", probs, v)  # [b, q, h, dk]
        return jnp.einsum("bqhk,hkd->bqd", out, self.o[...].astype(dt))  # [b, q, d_model]

    def _probs(self, scores: jax.Array, attn: _AttnInputs, keys: _Keys) -> jax.Array:
        """Softmax of [b, h, q, l] scores plus the additive terms, in float32; dropout; dt."""
        scores = scores.astype(jnp.float32)
        for term in attn.terms:
            scores = scores + term
        probs = jax.nn.softmax(scores, axis=-1)
        return keys.dropout(probs, self.dropout_rate).astype(self.dtype)

    def _project_queries(self, n_q: int, n_k: int) -> bool:
        """Whether cross-attention of n_q queries over n_k memory rows takes the projected form.

        Multiply-adds per example: the usual form projects all n_k memory rows to keys and
        values, n_k d (h dk) each, then spends n_q n_k (h dk) on scores and as much on outputs;
        the projected form maps the queries to and the outputs from d_model per head,
        n_q (h dk) d each, and attends over the raw memory, n_q h n_k d for scores and as much
        for outputs. With 2-8 target tokens over 100+ input tokens the projected form is 5-20x
        cheaper. Shapes are static, so this is decided at trace time.
        """
        if self.cross_mode != "auto":
            return self.cross_mode == "always"
        d, h, dk = self.q[...].shape
        usual = 2 * n_k * d * h * dk + 2 * n_q * n_k * h * dk
        projected = 2 * n_q * h * dk * d + 2 * n_q * h * n_k * d
        return projected < usual

    def _cross_projected(self, x, attn: _AttnInputs, keys: _Keys, memory):
        """Cross-attention with the key/value projections moved to the query side (exact).

        q.(W_k m) = (W_k^T q).m and p.(m W_v) = (p.m) W_v, per head; IA3's l_k scales the query
        instead of the keys (q.(l_k * k) = (l_k * q).k) and l_v scales the output of each head.
        The [b, l_in, h, dk] keys and values are never formed.
        """
        dt = self.dtype
        kv = self.kv[...].astype(dt)  # [d, 2, h, dk]
        q = jnp.einsum("bqd,dhk->bqhk", x, self.q[...].astype(dt))  # [b, q, h, dk]
        if hasattr(self, "ia3_k"):
            q = q * self.ia3_k[...].astype(dt)
        q_mem = jnp.einsum("bqhk,dhk->bqhd", q, kv[:, 0])  # [b, q, h, d_model]
        scores = jnp.einsum("bqhd,bld->bhql", q_mem, memory)  # [b, h, q, l]
        probs = self._probs(scores, attn, keys)
        read = jnp.einsum("bhql,bld->bqhd", probs, memory)  # [b, q, h, d_model]
        out = jnp.einsum("bqhd,dhk->bqhk", read, kv[:, 1])  # [b, q, h, dk]
        if hasattr(self, "ia3_v"):
            out = out * self.ia3_v[...].astype(dt)
        return jnp.einsum("bqhk,hkd->bqd", out, self.o[...].astype(dt))  # [b, q, d_model]


class _FeedForward(nnx.Module):
    """wo(dropout(ia3 * act(wi x))) or, gated, wo(dropout(ia3 * act(wi_0 x) * (wi_1 x)))."""

    def __init__(self, config, *, ia3: bool, dtype, param_dtype, rngs: nnx.Rngs):
        d, ff, f = config.d_model, config.d_ff, config.initializer_factor
        self.gated = bool(config.is_gated_act)
        self.act = config.dense_act_fn
        _activation(self.act)  # fail at construction on an unknown activation
        self.dtype = dtype
        self.dropout_rate = float(config.dropout_rate)
        if self.gated:
            self.wi = nnx.Param(_normal(rngs, (d, 2, ff), f * d**-0.5, param_dtype))  # [d, 2, ff]
        else:
            self.wi = nnx.Param(_normal(rngs, (d, ff), f * d**-0.5, param_dtype))  # [d, ff]
        self.wo = nnx.Param(_normal(rngs, (ff, d), f * ff**-0.5, param_dtype))  # [ff, d]
        if ia3:
            self.ia3_ff = IA3Param(jnp.ones((ff,), param_dtype))  # [d_ff]

    def __call__(self, x: jax.Array, keys: _Keys) -> jax.Array:
        dt = self.dtype
        act = _activation(self.act)
        if self.gated:
            hh = jnp.einsum("bld,dtf->bltf", x, self.wi[...].astype(dt))  # [b, l, 2, ff]
            h = act(hh[:, :, 0]) * hh[:, :, 1]  # [b, l, ff]
        else:
            h = act(jnp.einsum("bld,df->blf", x, self.wi[...].astype(dt)))  # [b, l, ff]
        if hasattr(self, "ia3_ff"):  # IA3: l_ff * inner activation, before wo
            h = h * self.ia3_ff[...].astype(dt)
        h = keys.dropout(h, self.dropout_rate)
        return jnp.einsum("blf,fd->bld", h, self.wo[...].astype(dt))  # [b, l, d_model]


class _Block(nnx.Module):
    """Pre-norm residual block: self-attention, [cross-attention], feed-forward."""

    def __init__(
        self, config, *, decoder: bool, ia3: bool, dtype, param_dtype, rngs, attention="einsum"
    ):
        eps = config.layer_norm_epsilon
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        akw = dict(kw, attention=attention)
        self.dropout_rate = float(config.dropout_rate)
        self.self_norm = _RMSNorm(config.d_model, eps, **kw)
        self.self_attn = _Attention(config, cross=False, ia3=ia3, rngs=rngs, **akw)
        if decoder:
            self.cross_norm = _RMSNorm(config.d_model, eps, **kw)
            self.cross_attn = _Attention(config, cross=True, ia3=ia3, rngs=rngs, **akw)
        self.ff_norm = _RMSNorm(config.d_model, eps, **kw)
        self.ff = _FeedForward(config, ia3=ia3, rngs=rngs, **kw)

    def __call__(self, x, self_attn, keys, memory=None, cross_attn=None):
        r = self.dropout_rate
        x = x + keys.dropout(self.self_attn(self.self_norm(x), self_attn, keys), r)
        if memory is not None:
            x = x + keys.dropout(self.cross_attn(self.cross_norm(x), cross_attn, keys, memory), r)
        return x + keys.dropout(self.ff(self.ff_norm(x), keys), r)


class _Stack(nnx.Module):
    """Encoder or decoder stack; the relative position bias table is shared by all blocks."""

    def __init__(
        self,
        config,
        *,
        decoder: bool,
        ia3: bool,
        dtype,
        param_dtype,
        rngs,
        scan_layers=False,
        attention="einsum",
    ):
        n = config.num_decoder_layers if decoder else config.num_layers
        self.decoder = decoder
        self.fused = attention != "einsum"  # the fused kernels take key lengths, not masks
        self.scan_layers = scan_layers
        self.dtype = dtype
        self.dropout_rate = float(config.dropout_rate)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nnx.Param(
            _normal(
                rngs,
                (config.relative_attention_num_buckets, config.num_heads),
                config.initializer_factor * config.d_model**-0.5,
                param_dtype,
            )
        )  # [buckets, heads]
        self.blocks = nnx.List(
            [
                _Block(
                    config,
                    decoder=decoder,
                    ia3=ia3,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                    attention=attention,
                )
                for _ in range(n)
            ]
        )
        self.final_norm = _RMSNorm(
            config.d_model, config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype
        )

    def _position_bias(self, q_len: int, k_len: int) -> jax.Array:
        buckets = _relative_buckets(
            q_len,
            k_len,
            bidirectional=not self.decoder,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # [q, k]
        table = self.relative_attention_bias[...].astype(jnp.float32)  # [buckets, h]
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, h, q, k]
        # Materialise the small [1, h, q, k] bias once per stack call: otherwise XLA fuses the
        # gather into every layer's "scores + bias", which then cannot join the softmax's
        # fusion and writes a [b, h, q, k] float32 array per layer on GPU.
        return jax.lax.optimization_barrier(bias)

    def __call__(self, embedded, keys, self_mask, memory=None, cross_mask=None):
        """Run the stack.

        Args:
            embedded: [b, l, d_model] token embeddings (compute dtype).
            keys: dropout keys.
            self_mask: bool [b, 1, 1, l] non-padding positions (encoder; inputs right-padded)
                or [1, 1, l, l] causal (decoder).
            memory: [b, l_in, d_model] encoder output (decoder only).
            cross_mask: bool [b, 1, 1, l_in] non-padding encoder positions (decoder only).

        Returns:
            [b, l, d_model] after the final layer norm and dropout.
        """
        length = embedded.shape[1]
        position = self._position_bias(length, length)  # [1, h, l, l]

        def lengths(mask):  # [b, 1, 1, l] -> int32 [b] (right padding)
            return jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32)

        self_attn = _AttnInputs(
            terms=(position, jnp.where(self_mask, 0.0, _NEG_INF).astype(jnp.float32)),
            position=position,
            kv_lengths=None if self.decoder else lengths(self_mask),
            causal=self.decoder,
        )
        cross_attn = None
        if memory is not None:  # T5 cross-attention has no position bias
            cross_attn = _AttnInputs(
                terms=(jnp.where(cross_mask, 0.0, _NEG_INF).astype(jnp.float32),),  # [b,1,1,l_in]
                position=None,
                kv_lengths=lengths(cross_mask),
                causal=False,
            )
        if self.fused and not self.decoder:
            # The fused kernels see each row's length, so they express right padding only. A
            # row with a pad before a real token (left or inner padding) would get silently
            # wrong attention: make its whole encoding (and so its loss) NaN instead.
            m = self_mask[:, 0, 0, :]  # [b, l]
            right = jnp.all(m == (jnp.arange(length) < lengths(self_mask)[:, None]), axis=-1)
            embedded = jnp.where(right[:, None, None], embedded, jnp.nan)  # [b, l, d]
        x = keys.dropout(embedded, self.dropout_rate)
        if self.scan_layers and len(self.blocks) > 1:
            # lax.scan over the blocks' stacked parameters: compile time no longer grows with
            # depth (the stacking copies the block weights once per step).
            block_def, _ = nnx.split(self.blocks[0])
            stacked = jax.tree.map(
                lambda *xs: jnp.stack(xs), *[nnx.split(b)[1] for b in self.blocks]
            )  # [layers, ...] per parameter

            def body(h, layer):
                index, state = layer
                block = nnx.merge(block_def, state)
                return block(h, self_attn, keys.fold(index), memory, cross_attn), None

            index = jnp.arange(len(self.blocks), dtype=jnp.uint32)
            x, _ = jax.lax.scan(body, x, (index, stacked))
        else:
            for block in self.blocks:
                x = block(x, self_attn, keys, memory, cross_attn)
        return keys.dropout(self.final_norm(x), self.dropout_rate)


class T5(nnx.Module):
    """T5 encoder-decoder (T5, T5 v1.1 / LM-adapted, T0), optionally with IA3 vectors.

    Args:
        config: a ``transformers.T5Config`` (``feed_forward_proj`` 'relu' or 'gated-gelu').
        ia3: add IA3 vectors (ones) to every attention's keys/values and every feed-forward.
        dtype: compute dtype of the matmuls (float32 or bfloat16); norms, softmax and logits
            stay float32.
        param_dtype: storage dtype of the parameters.
        rngs: ``nnx.Rngs`` for the random initialisation (HF's init distributions).
        scan_layers: run each stack's blocks with ``lax.scan`` (same parameters and results,
            compile time independent of depth; dropout masks differ from the unrolled loop).
        attention: "einsum" (default: explicit scores, float32 softmax), or "xla" / "cudnn":
            ``jax.nn.dot_product_attention`` with that implementation wherever the attention
            probabilities need no dropout (evaluation, or dropout rate 0); "cudnn" is the fused
            GPU kernel (bf16/fp16 only). Training with attention dropout keeps the einsum path.
            The fused kernels take key lengths, so with "xla"/"cudnn" inputs must be
            right-padded (pad id 0 only after the last token); any other row comes out NaN.

    Token ids outside [0, vocab_size) (e.g. Hugging Face's ignore index -100) are not
    supported: they give NaN, never a silently wrapped embedding.

    References:
        T5: https://arxiv.org/abs/1910.10683; IA3: https://arxiv.org/abs/2205.05638.
    """

    def __init__(
        self,
        config,
        *,
        ia3: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        scan_layers: bool = False,
        attention: str = "einsum",
    ):
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={attention!r}; choose one of {ATTENTION_IMPLS}")
        if getattr(config, "model_type", None) != "t5":
            raise ValueError(
                f"config.model_type={getattr(config, 'model_type', None)!r} is not 't5'; "
                "build the model from a transformers.T5Config"
            )
        self.d_model = config.d_model
        self.vocab_size = config.vocab_size
        self.tied = is_tied(config)
        self.start_id = int(getattr(config, "decoder_start_token_id", None) or 0)
        self.dtype = dtype
        self.ia3 = ia3
        factor = config.initializer_factor
        self.shared = nnx.Param(
            _normal(rngs, (config.vocab_size, config.d_model), factor * 1.0, param_dtype)
        )  # [vocab, d_model]
        kw = dict(
            ia3=ia3,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            scan_layers=scan_layers,
            attention=attention,
        )
        self.encoder = _Stack(config, decoder=False, **kw)
        self.decoder = _Stack(config, decoder=True, **kw)
        if not self.tied:
            self.lm_head = nnx.Param(
                _normal(rngs, (config.d_model, config.vocab_size), factor * 1.0, param_dtype)
            )  # [d_model, vocab]

    def _embed(self, ids: jax.Array) -> jax.Array:
        # Out-of-range ids (negative ones too: jnp.take would wrap them) embed as NaN.
        ids = jnp.where((ids < 0) | (ids >= self.vocab_size), self.vocab_size, ids)
        table = self.shared[...]  # [vocab, d_model]
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(self.dtype)

    def encode(
        self,
        inputs: Int[Array, "b L_in"],
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        _keys=None,
    ) -> Float[Array, "b L_in d_model"]:
        """Encoder hidden states.

        Args:
            inputs: int32 [batch, L_in], pad id 0.
            deterministic: no dropout when True.
            dropout_rng: PRNG key, required when ``deterministic=False``.

        Returns:
            [batch, L_in, d_model] in the compute dtype (after the final layer norm).
        """
        keys = _keys or _Keys(_dropout_key(deterministic, dropout_rng))
        mask = (inputs != 0)[:, None, None, :]  # [b, 1, 1, L_in]
        return self.encoder(self._embed(inputs), keys, mask)

    def decode(
        self,
        encoded: Float[Array, "b L_in d_model"],
        inputs: Int[Array, "b L_in"],
        targets: Int[Array, "b L_tgt"],
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        _keys=None,
    ) -> Float[Array, "b L_tgt vocab"]:
        """Logits of each target token given the encoder output (teacher forcing).

        Args:
            encoded: [batch, L_in, d_model] from ``encode``.
            inputs: int32 [batch, L_in] (its padding masks the cross-attention).
            targets: int32 [batch, L_tgt]; decoder inputs are these shifted right.
            deterministic: no dropout when True.
            dropout_rng: PRNG key, required when ``deterministic=False``.

        Returns:
            float32 [batch, L_tgt, vocab].
        """
        keys = _keys or _Keys(_dropout_key(deterministic, dropout_rng))
        length = targets.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, L_tgt, L_tgt]
        cross_mask = (inputs != 0)[:, None, None, :]  # [b, 1, 1, L_in]
        dec_in = shift_right(targets, self.start_id)
        h = self.decoder(self._embed(dec_in), keys, causal, encoded, cross_mask)  # [b, L, d]
        if self.tied:
            h = h * jnp.asarray(self.d_model**-0.5, h.dtype)
            w = self.shared[...].astype(self.dtype).T  # [d_model, vocab]
        else:
            w = self.lm_head[...].astype(self.dtype)  # [d_model, vocab]
        return jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        inputs: Int[Array, "b L_in"],
        targets: Int[Array, "b L_tgt"],
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "b L_tgt vocab"]:
        """Teacher-forced logits.

        Args:
            inputs: int32 [batch, L_in], pad id 0.
            targets: int32 [batch, L_tgt], pad id 0, ending with EOS.
            deterministic: no dropout when True.
            dropout_rng: PRNG key, required when ``deterministic=False``.

        Returns:
            float32 [batch, L_tgt, vocab].
        """
        keys = _Keys(_dropout_key(deterministic, dropout_rng))
        encoded = self.encode(inputs, _keys=keys)
        return self.decode(encoded, inputs, targets, _keys=keys)


def _dropout_key(deterministic: bool, dropout_rng):
    if deterministic:
        return None
    if dropout_rng is None:
        raise ValueError("deterministic=False needs dropout_rng (a jax.random key)")
    return dropout_rng

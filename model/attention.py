"""Multi-head attention: RoPE, grouped-query heads, causal or bidirectional, segment masking.

Packed sequences carry `segment_ids_BxL` (one id per document, 0 = padding): a token attends
only to tokens of its own segment, so packed documents never see each other.
"""

from __future__ import annotations

from typing import Any

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import axes, layers
from model.layers import Dense, lowp, row_major as _row_major
from model.quantize import QuantSpec

NEG_INF = -1e30


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half convention) in float32.

    Written as x * cos + swap_halves(x) * [-sin, sin]: one concatenate instead of two splits
    and a concatenate of four products: bit-identical and much faster fwd+bwd on CPU (README,
    Performance).
    """
    k = x_BxLxHxK.shape[-1]
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2[None, None, :]
    sin_BxLxK2, cos_BxLxK2 = jnp.sin(angle_BxLxK2), jnp.cos(angle_BxLxK2)
    sin_BxLx1xK = jnp.concatenate([-sin_BxLxK2, sin_BxLxK2], axis=-1)[:, :, None, :]
    cos_BxLx1xK = jnp.concatenate([cos_BxLxK2, cos_BxLxK2], axis=-1)[:, :, None, :]
    x_BxLxHxK = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
    return x_BxLxHxK * cos_BxLx1xK + jnp.concatenate([x2, x1], axis=-1) * sin_BxLx1xK


def attention_mask(segment_ids_BxL: jax.Array, causal: bool) -> jax.Array:
    """Boolean [B, 1, L, L] mask: same non-zero segment, and key <= query if causal.

    A negative segment id marks a shared prefix: its tokens are seen by every real token of the row
    (causal: every later one). A row [prompt (-1) | completion 1 | completion 2 ...] so computes the
    prompt once for several continuations, each seeing the prompt and itself only (rl/groups.py)."""
    seg_q_BxLx1 = segment_ids_BxL[:, :, None]
    seg_k_Bx1xL = segment_ids_BxL[:, None, :]
    mask_BxLxL = ((seg_q_BxLx1 == seg_k_Bx1xL) | ((seg_k_Bx1xL < 0) & (seg_q_BxLx1 != 0))) & (seg_k_Bx1xL != 0)
    if causal:
        length = segment_ids_BxL.shape[1]
        mask_BxLxL = mask_BxLxL & jnp.tril(jnp.ones((length, length), bool))[None]  # noqa
    return mask_BxLxL[:, None]


# Query rows per block when causal attention skips the key blocks above the diagonal (the
# [L, L] work then shrinks by about half). 128 measured best at L = 256 on CPU.
CAUSAL_BLOCK = 128


# Independent batch slices for the attention core on CPU. XLA:CPU runs a batched matmul with
# items this small ([128 x 256]) on one thread, but runs independent ops side by side: two
# halves of the batch keep both cores busy (measured with the transposed-rhs products: README,
# Performance).
CPU_BATCH_SLICES = 2


def batch_slices() -> int:
    """CPU_BATCH_SLICES on a single CPU device, else 1: with several devices the batch is already
    split across them, and slicing the global batch made XLA reshard it (collective-permutes)."""
    return CPU_BATCH_SLICES if jax.default_backend() == "cpu" and jax.device_count() == 1 else 1


def _t(x, dtype):
    """The last two dims swapped, in `dtype` (an operand of _bmm, which pins it row-major)."""
    return jnp.swapaxes(x.astype(dtype), -1, -2)


def _bmm(a_XxMxK, b_XxKxN, dtype, rhs_transposed=False):
    """Batched a @ b (or a @ b^T: b is [..., N, K]) over leading dims, operands in `dtype`, float32
    (row-major) result. YNNPACK takes a transposed right operand as it is (no transpose op)."""
    batch = tuple(range(a_XxMxK.ndim - 2))
    contract = b_XxKxN.ndim - 1 if rhs_transposed else b_XxKxN.ndim - 2
    return _row_major(jax.lax.dot_general(
        _row_major(lowp(a_XxMxK, dtype)), _row_major(lowp(b_XxKxN, dtype)),
        (((a_XxMxK.ndim - 1,), (contract,)), (batch, batch)), preferred_element_type=jnp.float32))


def _attend(q_BxHxQxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xQxS, dtype):
    scores_BxHxQxS = _bmm(q_BxHxQxK, k_BxHxSxK, dtype, rhs_transposed=True)
    scores_BxHxQxS = jnp.where(mask_Bx1xQxS, scores_BxHxQxS, NEG_INF)
    probs_BxHxQxS = jax.nn.softmax(scores_BxHxQxS, axis=-1)
    return _bmm(probs_BxHxQxS, v_BxHxSxK, dtype), probs_BxHxQxS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lowp_attention(q_BxHxQxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xQxS, dtype):
    return _attend(q_BxHxQxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xQxS, dtype)[0]


def _lowp_attention_fwd(q, k, v, mask, dtype):
    out, probs = _attend(q, k, v, mask, dtype)
    return out, (q.astype(dtype), k.astype(dtype), v.astype(dtype), probs.astype(dtype), mask)


def _lowp_attention_bwd(dtype, res, dout_BxHxQxK):
    q, k, v, probs_BxHxQxS, mask = res
    # Every product is a batched matmul YNNPACK takes ([..., m, k] @ [..., k, n], or @ [..., n, k]
    # transposed) with low-precision operands; only the small [Q or S, K] tensors are transposed,
    # never the [Q, S] ones (dv^T = dout^T p and dk^T = q^T dscores instead of p^T dout and
    # dscores^T q: a transposed *left* operand is not taken).
    dv_BxHxSxK = jnp.swapaxes(_bmm(_t(dout_BxHxQxK, dtype), probs_BxHxQxS, dtype), -1, -2)
    dprobs_BxHxQxS = _bmm(dout_BxHxQxK, v, dtype, rhs_transposed=True)
    p = probs_BxHxQxS.astype(jnp.float32)
    dscores_BxHxQxS = p * (dprobs_BxHxQxS - jnp.sum(dprobs_BxHxQxS * p, axis=-1, keepdims=True))
    dq_BxHxQxK = _bmm(dscores_BxHxQxS, k, dtype)
    dk_BxHxSxK = jnp.swapaxes(_bmm(_t(q, dtype), dscores_BxHxQxS, dtype), -1, -2)
    return dq_BxHxQxK, dk_BxHxSxK, dv_BxHxSxK, None


_lowp_attention.defvjp(_lowp_attention_fwd, _lowp_attention_bwd)


def dot_product_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype=jnp.float32,
                          causal: bool = False):
    """softmax(q k^T + mask) v with float32 scores and softmax; q is pre-scaled.

    With a low-precision `dtype` the matmuls (two forward, four backward) take bf16 operands
    with float32 accumulation, the backward pass included (a custom VJP). `causal=True`
    promises the mask is causal (it may also mask more): query block i then only looks at
    keys up to its own last row, skipping the all-masked blocks above the diagonal. On CPU the
    batch is cut into batch_slices() independent slices (both cores busy).
    """
    if jnp.dtype(dtype) == jnp.float32 and layers.f32_autodiff():
        return _attend(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, jnp.float32)[0]
    dtype = jnp.dtype(dtype)
    b, slices = q_BxHxLxK.shape[0], batch_slices()
    if slices > 1 and b % slices == 0:
        n = b // slices
        return jnp.concatenate([_blocked_attention(
            q_BxHxLxK[i:i + n], k_BxHxLxK[i:i + n], v_BxHxLxK[i:i + n],
            mask_Bx1xLxL if mask_Bx1xLxL.shape[0] == 1 else mask_Bx1xLxL[i:i + n], dtype, causal)
            for i in range(0, b, n)], axis=0)
    return _blocked_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype, causal)


def _blocked_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype, causal: bool):
    length = q_BxHxLxK.shape[2]
    if not causal or length <= CAUSAL_BLOCK:
        return _lowp_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype)
    outs = []
    for start in range(0, length, CAUSAL_BLOCK):
        end = min(start + CAUSAL_BLOCK, length)
        outs.append(_lowp_attention(q_BxHxLxK[:, :, start:end], k_BxHxLxK[:, :, :end], v_BxHxLxK[:, :, :end],
                                    mask_Bx1xLxL[:, :, start:end, :end], dtype))
    return jnp.concatenate(outs, axis=2)


def use_platform_attention() -> bool:
    """GPU/TPU: `jax.nn.dot_product_attention` (cuDNN's fused kernel where it applies, XLA's
    otherwise). CPU: this module's bf16 core, measured faster there (README, Performance)."""
    return jax.default_backend() != "cpu"


def platform_attention(q_BxLxHxK, k_BxLxVxK, v_BxLxVxK, mask_Bx1xLxL, dtype):
    """softmax(q k^T + mask) v through jax.nn.dot_product_attention, operands in `dtype`, float32
    result; q is pre-scaled, key/value heads may be fewer (grouped-query attention)."""
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK.astype(dtype), k_BxLxVxK.astype(dtype), v_BxLxVxK.astype(dtype), mask=mask_Bx1xLxL, scale=1.0)
    return out_BxLxHxK.astype(jnp.float32)


def cache_dtype(dtype):
    """The KV cache's storage dtype: the matmul dtype (bf16 by default), except on CPU, where XLA
    converted a bf16 cache to float32 around every scatter and dot (the whole cache, every token:
    7x slower decoding). There it is float32 holding values rounded to `dtype`, so every product
    sees the numbers a bf16 cache would give."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(dtype)


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool = True
    use_rope: bool = True
    rope_theta: float = 10000.0
    dtype: Any = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02
    use_bias: bool = False
    dropout: float = 0.0
    decode: bool = False  # read and extend the 'cache' collection (model/decode.py); training never sets it
    quant: QuantSpec | None = None  # the projections' weight quantization (model/quantize.py)
    cache_int8: bool = False  # decoding: keys/values cached as int8 + a float32 scale per token and head

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic: bool = True):
        b, length, d = x_BxLxD.shape
        h, kv, k = self.n_heads, self.n_kv_heads, self.head_dim
        if h % kv:
            raise ValueError(f"model.n_heads={h} is not divisible by model.n_kv_heads={kv}")
        g = h // kv
        init = nn.initializers.normal(self.init_std)

        def proj(n, name):
            return Dense(n * k, (axes.EMBED, axes.HEADS if n == h else axes.KV_HEADS), dtype=self.dtype,
                         use_bias=self.use_bias, kernel_init=init, quant=self.quant, name=name)(x_BxLxD)

        q_BxLxHxK = proj(h, "query").reshape(b, length, h, k)
        k_BxLxVxK = proj(kv, "key").reshape(b, length, kv, k)
        v_BxLxVxK = proj(kv, "value").reshape(b, length, kv, k)
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
        if self.use_rope:
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.rope_theta)
            k_BxLxVxK = rope(k_BxLxVxK, positions_BxL, self.rope_theta)

        if self.decode:
            out_BxLxHK = self._cached_attention(q_BxLxHxK * (k ** -0.5), k_BxLxVxK, v_BxLxVxK, positions_BxL)
            return Dense(d, (axes.HEADS, axes.EMBED), dtype=self.dtype, use_bias=self.use_bias,
                         kernel_init=nn.initializers.normal(self.out_init_std), quant=self.quant,
                     name="out")(out_BxLxHK)

        # Heads-major layout; key/value heads repeated for their query-head groups (GQA).
        q_BxHxLxK = jnp.swapaxes(q_BxLxHxK * (k ** -0.5), 1, 2)
        k_BxHxLxK = jnp.repeat(jnp.swapaxes(k_BxLxVxK, 1, 2), g, axis=1)
        v_BxHxLxK = jnp.repeat(jnp.swapaxes(v_BxLxVxK, 1, 2), g, axis=1)
        mask_Bx1xLxL = attention_mask(segment_ids_BxL, self.causal)
        if self.dropout > 0.0 and not deterministic:  # explicit probabilities, so dropout can act on them
            scores_BxHxLxL = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxLxK, k_BxHxLxK.astype(jnp.float32))
            probs_BxHxLxL = jax.nn.softmax(jnp.where(mask_Bx1xLxL, scores_BxHxLxL, NEG_INF), axis=-1)
            probs_BxHxLxL = nn.Dropout(self.dropout)(probs_BxHxLxL, deterministic=False)
            out_BxHxLxK = jnp.einsum("bhqs,bhsk->bhqk", probs_BxHxLxL, v_BxHxLxK.astype(jnp.float32))
        elif use_platform_attention() and jnp.dtype(self.dtype) != jnp.float32:
            out_BxHxLxK = jnp.swapaxes(platform_attention(
                jnp.swapaxes(q_BxHxLxK, 1, 2), k_BxLxVxK, v_BxLxVxK, mask_Bx1xLxL, self.dtype), 1, 2)
        else:
            out_BxHxLxK = dot_product_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, self.dtype,
                                                causal=self.causal)
        out_BxLxHK = jnp.swapaxes(out_BxHxLxK, 1, 2).reshape(b, length, h * k)
        out_BxLxHK = nn.with_logical_constraint(out_BxLxHK, (axes.BATCH, axes.LENGTH, axes.HEADS))
        return Dense(d, (axes.HEADS, axes.EMBED), dtype=self.dtype, use_bias=self.use_bias,
                     kernel_init=nn.initializers.normal(self.out_init_std), quant=self.quant,
                     name="out")(out_BxLxHK)

    def _cached_attention(self, q_BxTxHxK, k_BxTxVxK, v_BxTxVxK, positions_BxT):
        """Decoding: write this chunk's keys/values at their positions (slot = position), then attend
        from each query to every cached slot at or before its position. The cache ('cache' collection:
        cached_key/cached_value [B, V, S, K], heads-major so both products read it as it lies) is made
        by model/kv_decode.init_cache; at init it takes the input's length. Same math as the training
        path (q pre-scaled, operands in `dtype`, float32 scores and softmax): a cached key cast to
        `dtype` is the value the full forward casts too."""
        b, t, h, k = q_BxTxHxK.shape
        kv = k_BxTxVxK.shape[2]
        dtype = jnp.dtype(self.dtype)
        names = (axes.BATCH, axes.KV_HEADS, axes.LENGTH, axes.HEAD_DIM)
        put = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (0, s, 0)))

        def cached(name, new_BxTxVxK):
            """The cache `name` with this chunk written at its positions, as the products read it."""
            new_BxVxTxK = jnp.swapaxes(new_BxTxVxK, 1, 2).astype(dtype)
            if not self.cache_int8:
                c = self.variable("cache", name, jnp.zeros, (b, kv, t, k), cache_dtype(dtype))
                c.value = nn.with_logical_constraint(
                    put(c.value, new_BxVxTxK.astype(c.value.dtype), positions_BxT[:, 0]), names)
                return c.value
            c = self.variable("cache", name, jnp.zeros, (b, kv, t, k), jnp.int8)
            scale = self.variable("cache", name + "_scale", jnp.ones, (b, kv, t, 1), jnp.float32)
            x_BxVxTxK = new_BxVxTxK.astype(jnp.float32)
            s_BxVxTx1 = jnp.maximum(jnp.max(jnp.abs(x_BxVxTxK), axis=-1, keepdims=True), 1e-8) / 127.0
            q_BxVxTxK = jnp.clip(jnp.round(x_BxVxTxK / s_BxVxTx1), -127, 127).astype(jnp.int8)
            c.value = nn.with_logical_constraint(put(c.value, q_BxVxTxK, positions_BxT[:, 0]), names)
            scale.value = put(scale.value, s_BxVxTx1, positions_BxT[:, 0])
            return c.value.astype(jnp.float32) * scale.value

        keys_BxVxSxK = cached("cached_key", k_BxTxVxK)
        values_BxVxSxK = cached("cached_value", v_BxTxVxK)
        slots = keys_BxVxSxK.shape[2]
        g = h // kv
        # [B, V, G*T, K]: each key/value head's query group and positions, one batched product per head.
        q_BxVxGTxK = jnp.swapaxes(q_BxTxHxK.reshape(b, t, kv, g, k), 1, 2).transpose(0, 1, 3, 2, 4).reshape(
            b, kv, g * t, k)
        # Operands rounded to `dtype`, multiplied in the cache's dtype (no per-token cast of the cache).
        stored = keys_BxVxSxK.dtype
        scores_BxVxGTxS = _bmm(q_BxVxGTxK.astype(dtype).astype(stored), keys_BxVxSxK, stored, rhs_transposed=True)
        visible_BxTxS = jnp.arange(slots)[None, None, :] <= positions_BxT[:, :, None]
        visible_Bx1xGTxS = jnp.tile(visible_BxTxS, (1, g, 1))[:, None]
        probs_BxVxGTxS = jax.nn.softmax(jnp.where(visible_Bx1xGTxS, scores_BxVxGTxS, NEG_INF), axis=-1)
        out_BxVxGTxK = _bmm(probs_BxVxGTxS.astype(dtype).astype(stored), values_BxVxSxK, stored)
        out_BxTxHK = out_BxVxGTxK.reshape(b, kv, g, t, k).transpose(0, 3, 1, 2, 4).reshape(b, t, h * k)
        return nn.with_logical_constraint(out_BxTxHK, (axes.BATCH, axes.LENGTH, axes.HEADS))

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

from model import axes
from model.layers import Dense

NEG_INF = -1e30


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half convention) in float32."""
    k = x_BxLxHxK.shape[-1]
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2[None, None, :]
    sin_BxLx1xK2 = jnp.sin(angle_BxLxK2)[:, :, None, :]
    cos_BxLx1xK2 = jnp.cos(angle_BxLxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos_BxLx1xK2 - x2 * sin_BxLx1xK2,
                            x2 * cos_BxLx1xK2 + x1 * sin_BxLx1xK2], axis=-1)


def attention_mask(segment_ids_BxL: jax.Array, causal: bool) -> jax.Array:
    """Boolean [B, 1, L, L] mask: same non-zero segment, and key <= query if causal."""
    seg_q_BxLx1 = segment_ids_BxL[:, :, None]
    seg_k_Bx1xL = segment_ids_BxL[:, None, :]
    mask_BxLxL = (seg_q_BxLx1 == seg_k_Bx1xL) & (seg_k_Bx1xL != 0)
    if causal:
        length = segment_ids_BxL.shape[1]
        mask_BxLxL = mask_BxLxL & jnp.tril(jnp.ones((length, length), bool))[None]  # noqa
    return mask_BxLxL[:, None]


def _bmm(a_XxMxK, b_XxKxN, dtype):
    """Batched a @ b over leading dims, operands in `dtype`, float32 result."""
    batch = tuple(range(a_XxMxK.ndim - 2))
    return jax.lax.dot_general(a_XxMxK.astype(dtype), b_XxKxN.astype(dtype),
                               (((a_XxMxK.ndim - 1,), (b_XxKxN.ndim - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


def _attend(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype):
    scores_BxHxLxL = _bmm(q_BxHxLxK, jnp.swapaxes(k_BxHxLxK, -1, -2), dtype)
    scores_BxHxLxL = jnp.where(mask_Bx1xLxL, scores_BxHxLxL, NEG_INF)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
    return _bmm(probs_BxHxLxL, v_BxHxLxK, dtype), probs_BxHxLxL


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lowp_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype):
    return _attend(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype)[0]


def _lowp_attention_fwd(q, k, v, mask, dtype):
    out, probs = _attend(q, k, v, mask, dtype)
    return out, (q.astype(dtype), k.astype(dtype), v.astype(dtype), probs.astype(dtype), mask)


def _lowp_attention_bwd(dtype, res, dout_BxHxLxK):
    q, k, v, probs_BxHxLxL, mask = res
    # Every product is a canonical batched matmul ([..., m, k] @ [..., k, n]) with low-precision
    # operands: the CPU dot kernels reject bf16 contractions over other dimensions.
    dv_BxHxLxK = _bmm(jnp.swapaxes(probs_BxHxLxL, -1, -2), dout_BxHxLxK, dtype)
    dprobs_BxHxLxL = _bmm(dout_BxHxLxK, jnp.swapaxes(v, -1, -2), dtype)
    p = probs_BxHxLxL.astype(jnp.float32)
    dscores_BxHxLxL = p * (dprobs_BxHxLxL - jnp.sum(dprobs_BxHxLxL * p, axis=-1, keepdims=True))
    dq_BxHxLxK = _bmm(dscores_BxHxLxL, k, dtype)
    dk_BxHxLxK = _bmm(jnp.swapaxes(dscores_BxHxLxL, -1, -2), q, dtype)
    return dq_BxHxLxK, dk_BxHxLxK, dv_BxHxLxK, None


_lowp_attention.defvjp(_lowp_attention_fwd, _lowp_attention_bwd)


def dot_product_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, dtype=jnp.float32):
    """softmax(q k^T + mask) v with float32 scores and softmax; q is pre-scaled.

    With a low-precision `dtype` the four matmuls (two forward, four backward) take bf16
    operands with float32 accumulation, the backward pass included (a custom VJP).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return _attend(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, jnp.float32)[0]
    return _lowp_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, jnp.dtype(dtype))


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
                         use_bias=self.use_bias, kernel_init=init, name=name)(x_BxLxD)

        q_BxLxHxK = proj(h, "query").reshape(b, length, h, k)
        k_BxLxVxK = proj(kv, "key").reshape(b, length, kv, k)
        v_BxLxVxK = proj(kv, "value").reshape(b, length, kv, k)
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
        if self.use_rope:
            q_BxLxHxK = rope(q_BxLxHxK, positions_BxL, self.rope_theta)
            k_BxLxVxK = rope(k_BxLxVxK, positions_BxL, self.rope_theta)

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
        else:
            out_BxHxLxK = dot_product_attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, mask_Bx1xLxL, self.dtype)
        out_BxLxHK = jnp.swapaxes(out_BxHxLxK, 1, 2).reshape(b, length, h * k)
        out_BxLxHK = nn.with_logical_constraint(out_BxLxHK, (axes.BATCH, axes.LENGTH, axes.HEADS))
        return Dense(d, (axes.HEADS, axes.EMBED), dtype=self.dtype, use_bias=self.use_bias,
                     kernel_init=nn.initializers.normal(self.out_init_std), name="out")(out_BxLxHK)

"""Multi-head attention: RoPE, grouped-query heads, causal or bidirectional, segment masking.

Packed sequences carry `segment_ids_BxL` (one id per document, 0 = padding): a token attends
only to tokens of its own segment, so packed documents never see each other.
"""

from __future__ import annotations

from typing import Any

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

        # Scores in float32; query heads grouped over their shared key/value head.
        q_BxLxVxGxK = q_BxLxHxK.reshape(b, length, kv, g, k) * (k ** -0.5)
        scores_BxVxGxLxL = jnp.einsum("bqvgk,bsvk->bvgqs", q_BxLxVxGxK, k_BxLxVxK.astype(jnp.float32))
        mask_Bx1x1xLxL = attention_mask(segment_ids_BxL, self.causal)[:, :, None]
        scores_BxVxGxLxL = jnp.where(mask_Bx1x1xLxL, scores_BxVxGxLxL, NEG_INF)
        probs_BxVxGxLxL = jax.nn.softmax(scores_BxVxGxLxL, axis=-1)
        probs_BxVxGxLxL = nn.Dropout(self.dropout)(probs_BxVxGxLxL, deterministic=deterministic)
        out_BxLxVxGxK = jnp.einsum("bvgqs,bsvk->bqvgk", probs_BxVxGxLxL, v_BxLxVxK.astype(jnp.float32))
        out_BxLxHK = out_BxLxVxGxK.reshape(b, length, h * k)
        out_BxLxHK = nn.with_logical_constraint(out_BxLxHK, (axes.BATCH, axes.LENGTH, axes.HEADS))
        return Dense(d, (axes.HEADS, axes.EMBED), dtype=self.dtype, use_bias=self.use_bias,
                     kernel_init=nn.initializers.normal(self.out_init_std), name="out")(out_BxLxHK)

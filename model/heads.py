"""Task heads over `Transformer.encode`, and the wrappers that give backbone + heads one param tree.

Every wrapper keeps the backbone under the name `backbone`, so a classifier can warm start from
a masked-LM run's `params["backbone"]` (or from a causal run, whose whole tree is a Transformer).

- MLM head: BERT's transform (dense, GELU, norm) then the backbone's tied output embedding
  (`Transformer.logits`, padded vocabulary rows masked).
- NSP / classification heads: a small Dense (tanh pooler, then logits) on one pooled hidden state.
  NSP pools `<cls>` (BERT) or, with `nsp_pool='boundary'`, the `<sep>` that closes segment A: with
  segments cut at arbitrary points the pair signal is local to the cut (does B's start continue A's
  end?), and at the CPU size `<cls>` does not learn to find it (README: Why NSP stays at chance).
- Span-QA head: one Dense(2) on every hidden state -> start and end logits (padding masked).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import axes
from model.layers import Dense, make_norm
from model.transformer import ModelConfig, Transformer


class PooledHead(nn.Module):
    """[B, D] pooled state -> [B, num_classes] float32 logits (BERT pooler: dense + tanh, then dense)."""
    num_classes: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, pooled_BxD, deterministic: bool = True):
        init = nn.initializers.normal(self.cfg.init_std)
        h_BxD = jnp.tanh(Dense(self.cfg.d_model, (axes.EMBED, None), dtype=self.cfg.compute_dtype,
                               use_bias=True, kernel_init=init, name="pooler")(pooled_BxD))
        h_BxD = nn.Dropout(self.cfg.dropout)(h_BxD, deterministic=deterministic)
        return Dense(self.num_classes, (None, None), dtype=self.cfg.compute_dtype, use_bias=True,
                     kernel_init=init, name="out")(h_BxD).astype(jnp.float32)


class MlmHead(nn.Module):
    """Hidden states -> vocabulary logits through a transform and the backbone's (tied) LM head."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxLxD, backbone: Transformer):
        h_BxLxD = nn.gelu(Dense(self.cfg.d_model, (axes.EMBED, None), dtype=self.cfg.compute_dtype, use_bias=True,
                                kernel_init=nn.initializers.normal(self.cfg.init_std), name="transform")(h_BxLxD))
        h_BxLxD = make_norm(self.cfg.norm, self.cfg.norm_eps, name="norm")(h_BxLxD)
        return backbone.logits(h_BxLxD)


def last_token_index(segment_ids_BxL: jax.Array) -> jax.Array:
    """Index of each row's last non-pad token (segment id != 0); 0 for an all-pad row."""
    length = segment_ids_BxL.shape[1]
    idx_BxL = jnp.broadcast_to(jnp.arange(length)[None, :], segment_ids_BxL.shape)
    return jnp.max(jnp.where(segment_ids_BxL != 0, idx_BxL, 0), axis=1)


def pair_boundary_index(token_types_BxL: jax.Array) -> jax.Array:
    """Index of each row's `<sep>` closing segment A (the token before the first type-1 token);
    0 (the `<cls>`) for a row without a B segment."""
    first_b_B = jnp.argmax(token_types_BxL == 1, axis=1)
    has_b_B = jnp.any(token_types_BxL == 1, axis=1)
    return jnp.where(has_b_B, first_b_B - 1, 0)


def pool(h_BxLxD: jax.Array, segment_ids_BxL: jax.Array, how: str) -> jax.Array:
    """'first': the <cls> token (encoders); 'last': the last non-pad token (decoders)."""
    if how == "first":
        return h_BxLxD[:, 0]
    if how == "last":
        i_B = last_token_index(segment_ids_BxL)
        return jnp.take_along_axis(h_BxLxD, i_B[:, None, None], axis=1)[:, 0]
    raise ValueError(f"classify.pool={how!r}: expected 'first' or 'last'")


class MaskedLM(nn.Module):
    """Bidirectional backbone + MLM head (+ NSP head when `nsp`, on the `<cls>` state or, with
    `nsp_pool='boundary'`, on the state of the `<sep>` between segments A and B)."""
    cfg: ModelConfig
    nsp: bool = True
    nsp_pool: str = "first"  # 'first': <cls> | 'boundary': the <sep> closing segment A

    def setup(self):
        self.backbone = Transformer(self.cfg)
        self.mlm_head = MlmHead(self.cfg)
        if self.nsp_pool not in ("first", "boundary"):
            raise ValueError(f"nsp_pool={self.nsp_pool!r}: expected 'first' or 'boundary'")
        if self.nsp:
            self.nsp_head = PooledHead(2, self.cfg)

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, token_types_BxL=None,
                 deterministic: bool = True):
        """-> (mlm logits [B, L, V], nsp logits [B, 2] or None)."""
        h_BxLxD = self.backbone.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic, token_types_BxL)
        nsp_Bx2 = None
        if self.nsp:
            if self.nsp_pool == "boundary" and token_types_BxL is not None:
                i_B = pair_boundary_index(token_types_BxL)
                pooled_BxD = jnp.take_along_axis(h_BxLxD, i_B[:, None, None], axis=1)[:, 0]
            else:  # <cls>; also for inputs without token types (no B segment to find)
                pooled_BxD = h_BxLxD[:, 0]
            nsp_Bx2 = self.nsp_head(pooled_BxD, deterministic)
        return self.mlm_head(h_BxLxD, self.backbone), nsp_Bx2


class Classifier(nn.Module):
    """Backbone + a classification head on the pooled ('first' or 'last' token) hidden state."""
    cfg: ModelConfig
    num_classes: int
    pool: str = "first"

    def setup(self):
        self.backbone = Transformer(self.cfg)
        self.cls_head = PooledHead(self.num_classes, self.cfg)

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, token_types_BxL=None,
                 deterministic: bool = True):
        """-> logits [B, num_classes]."""
        h_BxLxD = self.backbone.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic, token_types_BxL)
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
        return self.cls_head(pool(h_BxLxD, segment_ids_BxL, self.pool), deterministic)


class SpanQA(nn.Module):
    """Backbone + a per-token Dense(2): start and end logits for extractive QA (pad positions -1e9)."""
    cfg: ModelConfig

    def setup(self):
        self.backbone = Transformer(self.cfg)
        self.qa_head = Dense(2, (axes.EMBED, None), dtype=self.cfg.compute_dtype, use_bias=True,
                             kernel_init=nn.initializers.normal(self.cfg.init_std))

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, token_types_BxL=None,
                 deterministic: bool = True):
        """-> (start logits [B, L], end logits [B, L]) in float32."""
        h_BxLxD = self.backbone.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic, token_types_BxL)
        logits_BxLx2 = self.qa_head(h_BxLxD).astype(jnp.float32)
        if segment_ids_BxL is not None:
            logits_BxLx2 = jnp.where((segment_ids_BxL != 0)[..., None], logits_BxLx2, -1e9)
        return logits_BxLx2[..., 0], logits_BxLx2[..., 1]


class ScalarHead(nn.Module):
    """[..., D] hidden states -> [...] float32 scalars (a reward, or a critic's value): one Dense(1) in
    float32, initialised at zero so a warm-started model starts from scores of 0."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_xD):
        out = Dense(1, (axes.EMBED, None), dtype=jnp.float32, use_bias=True, kernel_init=nn.initializers.zeros,
                    name="out")(h_xD.astype(jnp.float32))
        return out[..., 0]


class RewardModel(nn.Module):
    """Backbone + a scalar head read at each row's last real token (a response's closing <|end|>):
    one reward per sequence [B], float32 (Bradley-Terry reward model, Ouyang et al. 2022)."""
    cfg: ModelConfig

    def setup(self):
        self.backbone = Transformer(self.cfg)
        self.reward_head = ScalarHead(self.cfg)

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, token_types_BxL=None,
                 deterministic: bool = True):
        """-> rewards [B] (float32)."""
        h_BxLxD = self.backbone.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic, token_types_BxL)
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
        return self.reward_head(pool(h_BxLxD, segment_ids_BxL, "last"))


class PolicyValue(nn.Module):
    """A policy and its critic (PPO): backbone + the LM logits + a per-token value head, read from the
    policy's own trunk (`separate_critic=False`: one forward, shared features) or from a second
    transformer `critic` (True: the value loss never touches the policy's weights). The value at input
    position t estimates the return from choosing target t onward. The policy alone is `Transformer(cfg)`
    on `params['backbone']` (what the decoder samples with)."""
    cfg: ModelConfig
    separate_critic: bool = False

    def setup(self):
        self.backbone = Transformer(self.cfg)
        if self.separate_critic:
            self.critic = Transformer(self.cfg)
        self.value_head = ScalarHead(self.cfg)

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic: bool = True):
        """-> (logits [B, L, V] float32, values [B, L] float32)."""
        h_BxLxD = self.backbone.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic)
        v_BxLxD = h_BxLxD
        if self.separate_critic:
            v_BxLxD = self.critic.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic)
        return self.backbone.logits(h_BxLxD), self.value_head(v_BxLxD)

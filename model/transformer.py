"""The transformer: ModelConfig, one pre-norm block, the stack (loop or nn.scan) and the LM.

`Transformer.encode` returns final hidden states (used by every head); `__call__` adds the
LM head (tied to the token embedding by default). `causal=False` gives the bidirectional
encoder used by masked-LM pretraining: a switch, not a copy.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import axes
from model.attention import Attention
from model.layers import Dense, Embed, Mlp, make_norm
from model.quantize import QuantSpec

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # rows of the embedding table (padded for sharding/efficiency)
    num_tokens: int  # tokens the tokenizer can produce; logits >= num_tokens are masked
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 512
    mlp: str = "swiglu"  # 'swiglu' | 'gelu'
    norm: str = "rms"  # 'rms' | 'layer'
    norm_eps: float = 1e-6
    pos: str = "rope"  # 'rope' | 'learned'
    max_len: int = 2048  # learned-position table size
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    use_bias: bool = False
    dropout: float = 0.0
    causal: bool = True
    type_vocab_size: int = 0  # segment (token-type) embeddings, e.g. 2 for BERT sentence pairs; 0 = none
    dtype: str = "bfloat16"  # matmul operand dtype; params and activations stay float32
    scan_layers: bool = False
    remat: str = "none"  # 'none' | 'full' | 'dots'
    init_std: float = 0.02
    quant: QuantSpec | None = None  # weight quantization of the blocks' kernels and the embedding (config.quant)
    kv_cache_int8: bool = False  # decoding only (model/decode.Decoder(kv_int8=True)): an int8 KV cache

    def __post_init__(self):
        for name in ("vocab_size", "num_tokens", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.dropout < 1.0:  # nn.Dropout would scale by 1 / (1 - rate): negative or infinite
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.pos not in ("rope", "learned"):
            raise ValueError(f"model.pos={self.pos!r}: expected 'rope' or 'learned'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.num_tokens > self.vocab_size:
            raise ValueError(f"num_tokens {self.num_tokens} > vocab_size {self.vocab_size}")
        if self.type_vocab_size < 0:
            raise ValueError(f"model.type_vocab_size={self.type_vocab_size} must be >= 0")
        for name in ("norm_eps", "init_std", "rope_theta"):  # NaN or <= 0: NaN activations or a sign-flipped init
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name}={value!r} must be a finite value > 0")
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim={self.head_dim} must be >= 0 (0 = d_model // n_heads)")
        if self.pos == "learned" and self.max_len < 1:
            raise ValueError(f"model.max_len={self.max_len} must be positive (the learned-position table's size)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def embed_quant(self) -> QuantSpec | None:
        """The token embedding's / LM head's quantization: quant with embed_bits as its bits."""
        if self.quant is None or self.quant.embed_bits == 0:
            return None
        return dataclasses.replace(self.quant, bits=self.quant.embed_bits, act_scale=False)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention."""
        k = self.kv_head_dim
        attn = self.d_model * k * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = self.d_model * self.d_ff * (3 if self.mlp == "swiglu" else 2)
        head = self.d_model * self.vocab_size
        matmul_params = self.n_layers * (attn + mlp) + head
        attention_scores = self.n_layers * 2 * self.n_heads * k * seq_len  # QK^T and PV, fwd
        return 6.0 * matmul_params + 6.0 * attention_scores


class Block(nn.Module):
    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic):
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2 residual scaling
        h_BxLxD = make_norm(cfg.norm, cfg.norm_eps, name="attn_norm")(x_BxLxD)
        h_BxLxD = Attention(
            n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.kv_head_dim, causal=cfg.causal,
            use_rope=cfg.pos == "rope", rope_theta=cfg.rope_theta, dtype=cfg.compute_dtype,
            init_std=cfg.init_std, out_init_std=out_std, use_bias=cfg.use_bias, dropout=cfg.dropout,
            decode=self.decode, quant=cfg.quant, cache_int8=cfg.kv_cache_int8,
            name="attn")(h_BxLxD, positions_BxL, segment_ids_BxL, deterministic)
        x_BxLxD = x_BxLxD + nn.Dropout(cfg.dropout)(h_BxLxD, deterministic=deterministic)
        h_BxLxD = make_norm(cfg.norm, cfg.norm_eps, name="mlp_norm")(x_BxLxD)
        h_BxLxD = Mlp(cfg.d_model, cfg.d_ff, kind=cfg.mlp, dtype=cfg.compute_dtype, init_std=cfg.init_std,
                      out_init_std=out_std, use_bias=cfg.use_bias, quant=cfg.quant, name="mlp")(h_BxLxD)
        x_BxLxD = x_BxLxD + nn.Dropout(cfg.dropout)(h_BxLxD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BxLxD, (axes.BATCH, axes.LENGTH, axes.EMBED))


class _ScanBlock(nn.Module):
    """Block with the (carry, xs) -> (carry, ys) signature nn.scan wants."""
    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic):
        return Block(self.cfg, self.decode, name="block")(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic), None


class Transformer(nn.Module):
    cfg: ModelConfig
    decode: bool = False  # KV-cache decoding (model/decode.py): same params, a 'cache' collection

    def setup(self):
        cfg = self.cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, init_std=cfg.init_std,
                           quant=cfg.embed_quant)
        if cfg.pos == "learned":
            self.pos_embed = Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype, init_std=cfg.init_std,
                                   table_axes=(None, axes.EMBED))
        policy = REMAT_POLICIES[cfg.remat]
        if cfg.scan_layers:
            block = _ScanBlock
            if cfg.remat != "none":
                block = nn.remat(block, policy=policy, static_argnums=(4,))
            self.layers = nn.scan(
                block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS})(cfg, self.decode, name="layers")
        else:
            block = Block if cfg.remat == "none" else nn.remat(Block, policy=policy, static_argnums=(4,))
            self.layers = [block(cfg, self.decode, name=f"layer_{i}") for i in range(cfg.n_layers)]
        if cfg.type_vocab_size > 0:
            self.type_embed = Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                                    init_std=cfg.init_std, table_axes=(None, axes.EMBED))
        self.final_norm = make_norm(cfg.norm, cfg.norm_eps)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg.vocab_size, (axes.EMBED, axes.VOCAB), dtype=cfg.compute_dtype,
                                 kernel_init=nn.initializers.normal(cfg.init_std), quant=cfg.embed_quant)

    def encode(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic: bool = True,
               token_types_BxL=None):
        """Final hidden states [B, L, D] (after the final norm). `token_types_BxL` (sentence A/B ids)
        are used only when cfg.type_vocab_size > 0 (default type 0)."""
        b, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length), (b, length))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((b, length), jnp.int32)
        x_BxLxD = self.embed(tokens_BxL)
        if self.cfg.pos == "learned":
            x_BxLxD = x_BxLxD + self.pos_embed(positions_BxL)
        if self.cfg.type_vocab_size > 0:
            if token_types_BxL is None:
                token_types_BxL = jnp.zeros((b, length), jnp.int32)
            x_BxLxD = x_BxLxD + self.type_embed(token_types_BxL)
        x_BxLxD = self.embed_dropout(x_BxLxD, deterministic=deterministic)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, (axes.BATCH, axes.LENGTH, axes.EMBED))
        if self.cfg.scan_layers:
            x_BxLxD, _ = self.layers(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic)
        else:
            for layer in self.layers:
                x_BxLxD = layer(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic)
        return self.final_norm(x_BxLxD)

    def logits(self, h_BxLxD):
        """LM logits [B, L, V] in float32; padded vocabulary rows are masked out."""
        if self.cfg.tie_embeddings:
            logits_BxLxV = self.embed.attend(h_BxLxD)
        else:
            logits_BxLxV = self.lm_head(h_BxLxD)
        if self.cfg.num_tokens < self.cfg.vocab_size:
            valid_V = jnp.arange(self.cfg.vocab_size) < self.cfg.num_tokens
            logits_BxLxV = jnp.where(valid_V[None, None, :], logits_BxLxV, -1e9)
        return nn.with_logical_constraint(logits_BxLxV, (axes.BATCH, axes.LENGTH, axes.VOCAB))

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic: bool = True):
        return self.logits(self.encode(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic))

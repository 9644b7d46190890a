"""Models from a run's config: the one place that turns `config.model` (+ the tokenizer's size and
the mode's options) into a Flax module. Scripts that only generate, convert or evaluate use this,
never the train-step module.

`config` is the run's ConfigDict (or any object with the same fields); only `config.model`,
`config.mlm.nsp`, `config.mlm.nsp_pool`, `config.lora` and `config.quant` are read here.
"""

from __future__ import annotations

import math

from model import heads, lora, quantize
from model.transformer import ModelConfig, Transformer


def model_config(config, num_tokens: int) -> ModelConfig:
    """config.model + the tokenizer's size -> ModelConfig (vocab padded to model.vocab_multiple)."""
    fields = config.model.to_dict()
    multiple = int(fields.pop("vocab_multiple"))
    if multiple < 1:
        raise ValueError(f"model.vocab_multiple={multiple} must be positive (1 = no padding)")
    vocab = -(-num_tokens // multiple) * multiple
    return ModelConfig(vocab_size=vocab, num_tokens=num_tokens, quant=quantize.spec_from_config(config), **fields)


def transformer(config, num_tokens: int) -> Transformer:
    """The plain language model (no adapters)."""
    return Transformer(model_config(config, num_tokens))


def causal_lm(config, num_tokens: int, base_size: int):
    """The language model, LoRA-wrapped when lora.rank > 0 (params {'base', 'lora'}; the base frozen).
    lora.train_new_rows: the embedding rows after the tokenizer's `base_size` ids (its special tokens,
    then padding) get a trainable delta too."""
    model = transformer(config, num_tokens)
    r = config.lora
    if int(r.rank) <= 0:
        return model
    if model.cfg.quant is not None:
        raise ValueError(f"lora.rank={r.rank} with quant.bits={model.cfg.quant.bits}: LoRA on quantized weights "
                         f"is not supported; set one of them to 0")
    if not (math.isfinite(float(r.alpha)) and float(r.alpha) > 0):
        raise ValueError(f"lora.alpha={r.alpha!r} must be a finite value > 0 (the update is scaled by alpha / rank)")
    new_rows = model.cfg.vocab_size - base_size if r.train_new_rows else 0
    return lora.LoraModel(model, rank=int(r.rank), alpha=float(r.alpha), targets=tuple(r.targets),
                          base_dtype=r.base_dtype, new_rows=new_rows)


def masked_lm(config, num_tokens: int) -> heads.MaskedLM:
    """A bidirectional encoder with the MLM head (+ the NSP head when mlm.nsp)."""
    if config.model.causal:
        raise ValueError("mode='mlm' needs model.causal=False (a bidirectional encoder)")
    if config.mlm.nsp and config.model.type_vocab_size < 2:
        raise ValueError(f"mlm.nsp=True needs model.type_vocab_size >= 2 (sentence A/B), "
                         f"got {config.model.type_vocab_size}")
    return heads.MaskedLM(model_config(config, num_tokens), nsp=bool(config.mlm.nsp), nsp_pool=config.mlm.nsp_pool)


def classifier(config, num_tokens: int, num_classes: int) -> heads.Classifier:
    """A pooled classification head: the last real token of a causal model, <cls> of an encoder."""
    return heads.Classifier(model_config(config, num_tokens), num_classes,
                            pool="last" if config.model.causal else "first")


def span_qa(config, num_tokens: int) -> heads.SpanQA:
    return heads.SpanQA(model_config(config, num_tokens))


def reward_model(config, num_tokens: int) -> heads.RewardModel:
    """The transformer + a scalar reward head at the last real token (mode 'reward')."""
    if not config.model.causal:
        raise ValueError("mode='reward' reads the last real token: it needs model.causal=True")
    return heads.RewardModel(model_config(config, num_tokens))


def policy_value(config, num_tokens: int) -> heads.PolicyValue:
    """The language model + a value head on its trunk (rl.critic='shared') or on a critic transformer of
    the same shape (rl.critic='separate'): mode 'ppo'."""
    return heads.PolicyValue(model_config(config, num_tokens), separate_critic=config.rl.critic == "separate")


def language_model(model, params):
    """(the causal LM, its params) inside a model: a PolicyValue's backbone, a LoRA PPO policy's LoraModel
    with its {'base', 'lora'}; any other model as it is."""
    if isinstance(model, lora.LoraTrunk):
        return model.language_model(params)
    if isinstance(model, heads.PolicyValue):
        return Transformer(model.cfg), params["backbone"]
    return model, params

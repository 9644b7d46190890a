"""model/lora.py: zero-B identity, merge == apply, adapter-only training, trainable fraction, a LoRA trunk
under heads (PPO's policy + value head)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from model.heads import PolicyValue
from model.lora import TARGETS, LoraModel, LoraTrunk, apply_lora, count_params, init_lora, merge_lora
from model.transformer import ModelConfig, Transformer


def _model(**kw):
    cfg = ModelConfig(**{**dict(vocab_size=64, num_tokens=60, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=64, dtype="float32"), **kw})
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 60)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"])
    return model, params, tokens


@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_is_exactly_the_base_model(scan):
    model, params, tokens = _model(scan_layers=scan)
    lora = init_lora(params, rank=4, targets=TARGETS, key=jax.random.PRNGKey(2))
    assert len(jax.tree.leaves(lora)) == 2 * 7 * (1 if scan else 2)  # A and B per kernel (scan: stacked layers)
    base = jax.jit(model.apply)({"params": params}, tokens)  # jitted: one compile, not one per op
    adapted = jax.jit(lambda p, a: model.apply({"params": apply_lora(p, a, alpha=8.0, rank=4)}, tokens))(params, lora)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


@pytest.mark.parametrize("scan", [False, True])
def test_merge_equals_apply(scan):
    model, params, tokens = _model(scan_layers=scan)
    lora = init_lora(params, rank=4, targets=("attn/query", "attn/value", "mlp/down"), key=jax.random.PRNGKey(2))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape), lora)  # B != 0
    applied = model.apply({"params": apply_lora(params, lora, alpha=8.0, rank=4)}, tokens)
    merged = merge_lora(params, lora, alpha=8.0, rank=4)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(merged))
    from_merged = model.apply({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(from_merged), np.asarray(applied), rtol=1e-5, atol=1e-5)
    base = model.apply({"params": params}, tokens)
    assert np.abs(np.asarray(applied) - np.asarray(base)).max() > 1e-3  # the adapters do something


def test_training_updates_only_adapters_and_lowers_loss():
    model, params, tokens = _model()
    rank, alpha = 4, 8.0
    targets = ("attn/query", "attn/value")
    lora = init_lora(params, rank=rank, targets=targets, key=jax.random.PRNGKey(2))
    tx = optax.adam(1e-2)
    opt_state = tx.init(lora)
    base_before = jax.tree.map(np.array, params)

    def loss_fn(lora, base):
        p = apply_lora(jax.lax.stop_gradient(base), lora, alpha=alpha, rank=rank)
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(lora, opt_state, base):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    lora0 = lora
    losses = []
    for _ in range(20):
        lora, opt_state, loss = step(lora, opt_state, params)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, params))
    for path, x in traverse_util.flatten_dict(lora).items():
        assert not np.array_equal(np.asarray(x), np.asarray(traverse_util.flatten_dict(lora0)[path])), path
    merged = traverse_util.flatten_dict(merge_lora(params, lora, alpha=alpha, rank=rank))
    for path, w in traverse_util.flatten_dict(params).items():
        changed = not np.array_equal(merged[path], np.asarray(w))
        assert changed == ("/".join(path[-3:-1]) in targets), path


def test_trainable_fraction_rank8_small_model():
    # the 'small' size of configs/common.py (256d, 4 layers, 4 heads, d_ff 768), byte vocab padded to 384
    cfg = ModelConfig(vocab_size=384, num_tokens=267, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768)
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(Transformer(cfg).init(k, jnp.zeros((1, 8), jnp.int32))),
                            jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    lora = init_lora(params, rank=8, targets=TARGETS, key=jax.random.PRNGKey(0))
    full, trainable = count_params(params), count_params(lora)
    # per layer: 4 attention (256+256)*8 + 3 MLP (256+768)*8 = 16384 + 24576 = 40960; x4 = 163840
    assert trainable == 163_840
    assert full == 3_508_480
    assert trainable / full < 0.05  # 4.67%: the 384x256 tied embedding is small at this size
    print(f"LoRA r=8 all targets: {trainable} / {full} = {trainable / full:.2%}")


def test_bad_arguments():
    _, params, _ = _model()
    with pytest.raises(ValueError, match="unknown"):
        init_lora(params, rank=4, targets=("attn/qkv",), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="match no kernel"):
        init_lora({"x": {"kernel": jnp.zeros((4, 4))}}, rank=2, targets=("attn/query",), key=jax.random.PRNGKey(0))
    lora = init_lora(params, rank=4, targets=("attn/query",), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(params, lora, alpha=1.0, rank=8)
    from configs import sft
    from model import build
    config = sft.get_config("tiny")
    config.lora.rank = 4
    for alpha in (0.0, -1.0, float("nan")):  # the update's scale alpha / rank: was used as given
        config.lora.alpha = alpha
        with pytest.raises(ValueError, match=rf"lora.alpha={alpha} must be a finite value > 0"):
            build.causal_lm(config, 60, 60)


@pytest.mark.parametrize("separate", [False, True], ids=["shared_critic", "separate_critic"])
def test_lora_trunk_adapts_the_policy_and_trains_the_heads(separate):
    model, _, tokens = _model()
    lm = LoraModel(Transformer(model.cfg), rank=4, alpha=8.0, targets=TARGETS, new_rows=4)
    pv = PolicyValue(model.cfg, separate_critic=separate)
    trunk = LoraTrunk(pv, lm)
    params = nn.meta.unbox(trunk.init(jax.random.PRNGKey(0), tokens)["params"])
    assert set(params) == {"base", "lora", "value_head"} | ({"critic"} if separate else set())
    # B = 0 and zero row deltas: exactly the inner model on its trunk's weights, and the policy alone is the LoraModel
    plain = {"backbone": params["base"], **{k: v for k, v in params.items() if k not in ("base", "lora")}}
    logits_BxLxV, values_BxL = trunk.apply({"params": params}, tokens)
    want_logits, want_values = pv.apply({"params": plain}, tokens)
    np.testing.assert_array_equal(np.asarray(logits_BxLxV), np.asarray(want_logits))
    np.testing.assert_array_equal(np.asarray(values_BxL), np.asarray(want_values))
    policy, policy_params = trunk.language_model(params)
    assert policy is lm and set(policy_params) == {"base", "lora"}
    np.testing.assert_array_equal(np.asarray(policy.apply({"params": policy_params}, tokens)), np.asarray(logits_BxLxV))

    def loss(p):
        logits, values = trunk.apply({"params": p}, tokens)
        return jnp.mean(logits[..., 0] ** 2) + jnp.mean((values - 1.0) ** 2)
    head = jax.tree.map(lambda x: x + 0.1, params["value_head"])  # a zero-init head passes no gradient back
    grads = jax.grad(loss)(dict(params, value_head=head))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["base"]))  # frozen: stop_gradient
    for name in ("value_head",) + (("critic",) if separate else ()):
        assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads[name])), name
    lora_b = [g for path, g in traverse_util.flatten_dict(grads["lora"]).items() if path[-1] == "lora_b"]
    assert lora_b and any(np.any(np.asarray(g)) for g in lora_b)


def test_lora_trunk_refuses_a_language_model_of_another_shape():
    model, _, _ = _model()
    other = Transformer(ModelConfig(vocab_size=64, num_tokens=60, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32))
    with pytest.raises(ValueError, match="config differs from PolicyValue's"):
        LoraTrunk(PolicyValue(model.cfg), LoraModel(other, rank=2, alpha=4.0, targets=TARGETS))

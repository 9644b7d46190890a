"""One model row per prompt (rl/groups.py): the same log-probs, losses and gradients as one row per completion."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import checkpoint
import sharding
import train
from configs import grpo as grpo_config, ppo as ppo_config
from data.sft import Problem
from metrics import read_jsonl
from model import attention, decode, heads
from model.transformer import ModelConfig, Transformer
from rl import groups, loop, objectives, rewards, rollout

G = 3


def test_a_negative_segment_is_a_prefix_that_every_later_token_sees():
    seg = jnp.array([[-1, -1, 1, 1, 2, 2, 0]])
    got = np.asarray(attention.attention_mask(seg, causal=True))[0, 0].astype(int)
    want = np.array([[1, 0, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0],  # completion 1 sees the prompt and itself
                     [1, 1, 1, 1, 0, 0, 0],
                     [1, 1, 0, 0, 1, 0, 0],  # completion 2: the prompt and itself, not completion 1
                     [1, 1, 0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0, 0, 0]])  # padding sees nothing
    np.testing.assert_array_equal(got, want)
    plain = jnp.array([[1, 1, 2, 2, 0]])  # positive ids: documents, as before
    np.testing.assert_array_equal(np.asarray(attention.attention_mask(plain, causal=False))[0, 0].astype(int),
                                  [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0] * 5])


def _rollout(seed=0, mask_truncated=False):
    """Two prompts (5 and 11 tokens) x G completions of 1-6 tokens, as rl/rollout.to_rows lays them out."""
    rng = np.random.default_rng(seed)
    probs = [Problem(rng.integers(3, 60, n).astype(np.int32), "a", "k") for n in (5, 11)]
    outs = []
    for p in probs:
        for _ in range(G):
            k = int(rng.integers(1, 7))
            outs.append(decode.Completion(tokens=[int(t) for t in rng.integers(3, 60, k)],
                                          logprobs=[float(x) for x in -rng.random(k)],
                                          finish_reason=rng.choice(["stop", "length"]), prompt_tokens=len(p.prompt)))
    ro = rollout.to_rows(probs, outs, group=G, width=18, pad_id=0, stop_ids=[1], detokenize=lambda t: "",
                         mask_truncated=mask_truncated)
    packed = groups.pack(ro.rows, [len(p.prompt) for p in ro.problem], G, max_prompt_len=12, max_new_tokens=6)
    return ro, packed


def _on_tokens(x_NxL, completion_NxL):
    """The completion tokens' values, in order (rows: completion-major either way)."""
    return np.asarray(x_NxL)[np.asarray(completion_NxL) > 0]


def _init(model, seed: int):
    return jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.key(seed))


CFG = dict(vocab_size=64, num_tokens=60, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.3,
           dtype="float32")


@pytest.mark.parametrize("variant,aggregation", [
    (dict(), "sequence_mean"),  # RoPE, GQA, SwiGLU
    (dict(n_kv_heads=4, pos="learned", max_len=32, norm="layer", mlp="gelu", use_bias=True), "constant_norm"),  # GPT-2
], ids=["rope_gqa", "gpt2"])
def test_one_row_per_prompt_scores_and_trains_as_one_row_per_completion(variant, aggregation):
    ro, packed = _rollout(mask_truncated=True)
    comp_rows, comp_packed = ro.rows["completion"], groups.per_row(packed["completion"])
    assert packed["inputs"].shape[0] == 2 and packed["src"].shape == (2, G, 8)  # slots of 32 + G x 8 tokens
    assert packed["positions"].max() == ro.rows["positions"].max()  # no position the rows do not use (max_len)
    np.testing.assert_array_equal(_on_tokens(ro.rows["targets"], comp_rows),
                                  _on_tokens(groups.per_row(packed["targets"]), comp_packed))
    model = Transformer(ModelConfig(**{**CFG, **variant}))
    params = _init(model, 0)
    logps = jax.jit(functools.partial(objectives.token_logps, model))  # jitted: one compile, not one per op
    a, _ = logps(params, ro.rows)
    b, _ = logps(params, packed)
    assert b.shape == packed["src"].shape
    np.testing.assert_allclose(_on_tokens(a, comp_rows), _on_tokens(groups.per_row(b), comp_packed), atol=2e-5)

    # GRPO's loss and gradient: advantages per completion, a reference, old log-probs off the params
    adv_N = np.linspace(-1, 1, 2 * G).astype(np.float32)
    ref_rows = np.asarray(a) - 0.1 * ro.rows["completion"]
    rows = dict(ro.rows, advantages=adv_N, ref_logp=ref_rows, old_logp=np.asarray(a) + 0.05)
    packed = dict(packed, advantages=groups.per_group(adv_N, G),
                  ref_logp=np.asarray(b) - 0.1 * packed["completion"], old_logp=np.asarray(b) + 0.05)
    loss = functools.partial(objectives.grpo, rng=None, model=model, eps_low=0.2, eps_high=0.28, dual_clip=0.0,
                             beta=0.04, kl_estimator="k3", aggregation=aggregation, max_len=6)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (la, ma), ga = grad(params, rows)
    (lb, mb), gb = grad(params, packed)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5, atol=1e-6)
    for key in ("entropy", "clip_low", "clip_high", "kl", "tokens", "logp_gap_max"):
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-4, atol=1e-6, err_msg=key)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_ppo_values_and_loss_per_prompt_equal_per_completion():
    ro, packed = _rollout(seed=1)
    model = heads.PolicyValue(ModelConfig(**CFG))
    params = _init(model, 1)
    logps = jax.jit(functools.partial(objectives.token_logps, model))
    la, va = logps(params, ro.rows)
    lb, vb = logps(params, packed)
    comp_rows, comp_packed = ro.rows["completion"], groups.per_row(packed["completion"])
    np.testing.assert_allclose(_on_tokens(va, comp_rows), _on_tokens(groups.per_row(vb), comp_packed), atol=2e-5)
    extra = {}
    for name, lp, v, comp in (("rows", la, va, comp_rows), ("packed", groups.per_row(lb), groups.per_row(vb),
                                                              comp_packed)):
        r = rewards.place_on_last_token(np.linspace(0, 1, 2 * G), comp)
        adv, ret = (np.asarray(x) for x in loop.adv_lib.gae(r, np.asarray(v) * comp, comp, 1.0, 0.95))
        extra[name] = dict(advantages=adv, returns=ret, old_values=np.asarray(v) * comp, old_logp=np.asarray(lp))
    rows = dict(ro.rows, **extra["rows"])
    packed = dict(packed, **{k: groups.per_group(x, G) for k, x in extra["packed"].items()})
    loss = functools.partial(objectives.ppo, rng=None, model=model, eps_low=0.2, eps_high=0.2, dual_clip=3.0,
                             value_clip=0.2, vf_coef=0.1, entropy_coef=0.01, aggregation="token_mean", max_len=6)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (la, _), ga = grad(params, rows)
    (lb, _), gb = grad(params, packed)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_pack_refuses_rows_whose_group_does_not_share_a_prompt():
    ro, _ = _rollout()
    with pytest.raises(ValueError, match="must share their prompt"):
        groups.pack(ro.rows, [5, 5, 11, 11, 11, 11], G, max_prompt_len=12, max_new_tokens=6)
    with pytest.raises(ValueError, match="6 rows are not whole groups of 4"):
        groups.pack(ro.rows, [5] * 6, 4, max_prompt_len=12, max_new_tokens=6)


def _prompts(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice(list("abcdef"), int(rng.integers(2, 9))))  # prompts of several lengths
            f.write('{"prompt": "say x %s", "answer": "x", "kind": "say"}\n' % word)
    return str(path)


def _cfg(tmp_path, module, **kw):
    # 8 prompts per update: one group per device of the tests' 8 (one row per prompt needs whole groups per shard)
    base = dict(rl__val_path=_prompts(tmp_path / "val.jsonl", 4, seed=1), rl__rewards=("say_x",),
                rl__eval_generate=0, rl__max_prompt_len=24, rl__max_new_tokens=8, data__batch_size=8,
                rl__group_size=2, rl__minibatch=0, optim__lr=3e-2, optim__schedule="constant", train__log_every=1,
                model__dtype="float32", train__eval_every=100, train__checkpoint_every=100)
    return tiny_config(_prompts(tmp_path / "prompts.jsonl", 64), module, **{**base, **kw})


@pytest.mark.parametrize("module", [grpo_config, ppo_config], ids=["grpo", "ppo_minibatches"])
def test_a_run_with_one_row_per_prompt_equals_one_row_per_completion_and_resumes_exactly(tmp_path, say_x, module):
    # PPO: 16 prompts x 2, minibatches of 8 groups (one per device), 2 epochs: 4 updates an iteration
    kw = dict(data__batch_size=16, rl__minibatch=16, rl__epochs=2) if module is ppo_config else {}
    config = _cfg(tmp_path, module, **kw)
    mesh = sharding.make_mesh(config.mesh)
    assert loop.shares_prompts(config, mesh)
    assert not loop.shares_prompts(_cfg(tmp_path, module, **kw, rl__share_prompts=False), mesh)
    assert not loop.shares_prompts(_cfg(tmp_path, module, data__batch_size=4), mesh)  # 4 groups over 8 devices
    runs = {name: str(tmp_path / name) for name in ("shared", "rows", "straight")}
    if module is grpo_config:  # one update: the same rollout, loss and update either way
        train.train_and_evaluate(_cfg(tmp_path, module, train__steps=1), runs["shared"])
        train.train_and_evaluate(_cfg(tmp_path, module, train__steps=1, rl__share_prompts=False), runs["rows"])
        first = {name: read_jsonl(os.path.join(runs[name], "metrics.jsonl"))[0] for name in ("shared", "rows")}
        for key in ("rl/reward_mean", "rl/length_mean", "train/loss", "rl/entropy", "rl/logp_diff_max"):
            np.testing.assert_allclose(first["shared"][key], first["rows"][key], rtol=1e-4, atol=1e-5, err_msg=key)
        pa, pb = (jax.tree.leaves(checkpoint.load_for_inference(runs[n])[1]) for n in ("shared", "rows"))
        for x, y in zip(pa, pb):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
    else:  # minibatches are shuffled groups (not rows), so only the resume is compared
        train.train_and_evaluate(_cfg(tmp_path, module, train__steps=1, **kw), runs["shared"])
    # resume: 1 iteration, stop, 1 more == 2 straight, bit for bit
    train.train_and_evaluate(_cfg(tmp_path, module, train__steps=2, **kw), runs["shared"])  # resumes at 1
    train.train_and_evaluate(_cfg(tmp_path, module, train__steps=2, **kw), runs["straight"])
    losses = {n: [r["train/loss"] for r in read_jsonl(os.path.join(runs[n], "metrics.jsonl")) if "train/loss" in r]
              for n in ("shared", "straight")}
    assert losses["shared"] == losses["straight"] and len(losses["straight"]) == 2
    pa, pb = (jax.tree.leaves(checkpoint.load_for_inference(runs[n])[1]) for n in ("shared", "straight"))
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

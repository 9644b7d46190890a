"""Modes 'grpo' and 'ppo': rows and rewards of rollouts, sampler/trainer consistency, learning a trivial
reward, guardrails, the adaptive KL controller, bad config values, PPO with a LoRA policy, the batched
scoring of rows, the reference's params, and exact resume."""

import json
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

import checkpoint
import evaluation
import modes
import objectives
import serving
import sharding
import steps
import train
import warmstart
from metrics import read_jsonl
from configs import grpo as grpo_config, ppo as ppo_config
from data import chat
from data.sft import Problem
from data.tokenizer import ByteTokenizer
from model import build, decode, lora
from rl import guardrails, loop, reference, rewards, rollout
from rl import objectives as rl_objectives

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import generate  # noqa: E402
import merge_lora  # noqa: E402
import policy_kl  # noqa: E402


def _prompts(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            word = "".join(rng.choice(list("abcdef"), 3))
            f.write(json.dumps({"prompt": f"say x {word}", "answer": "x", "kind": "say"}) + "\n")
    return str(path)


def _cfg(tmp_path, module, **kw):
    train_path = _prompts(tmp_path / "prompts.jsonl", 64)
    val_path = _prompts(tmp_path / "val.jsonl", 8, seed=1)
    base = dict(rl__val_path=val_path, rl__rewards=("say_x",), rl__eval_generate=4, rl__max_prompt_len=24,
                rl__max_new_tokens=8, data__batch_size=4, rl__group_size=4, rl__minibatch=8,
                optim__lr=3e-2, optim__schedule="constant", train__log_every=1)
    return tiny_config(train_path, module, **{**base, **kw})


@pytest.mark.parametrize("field,value,message", [
    ("kl_coef", -0.1, r"rl.kl_coef=-0.1 must be a finite value >= 0"),  # rewarded drifting from the reference
    ("gamma", 1.5, r"rl.gamma=1.5 must be in \[0, 1\]"), ("lam", float("nan"), r"rl.lam=nan must be in \[0, 1\]"),
    ("eps_high", float("nan"), r"rl.eps_high=nan must be a finite value >= 0"),
    ("kl_max", float("nan"), r"rl.kl_max=nan must be a finite value > 0"),  # a NaN threshold never fired
    ("value_loss_max", 0.0, r"rl.value_loss_max=0.0 must be a finite value > 0"),
    ("dual_clip", 0.5, r"rl.dual_clip=0.5 must be 0 \(off\) or a finite value > 1"),
    ("length_target", -1, r"rl.length_target=-1 must be >= 0")])
def test_rl_numbers_out_of_range_are_refused_by_name(tmp_path, field, value, message):
    import feedback_inputs
    config = _cfg(tmp_path, ppo_config, **{f"rl__{field}": value})
    with pytest.raises(ValueError, match=message):
        feedback_inputs.check_rl(config)


def test_a_reward_model_of_another_mode_is_refused_before_anything_is_written(tmp_path):
    import feedback_inputs
    checkpoint.save_params(str(tmp_path / "sft"), 1, {"w": np.zeros(2, np.float32)}, {"mode": "sft"})
    config = _cfg(tmp_path, ppo_config, rl__reward_model=str(tmp_path / "sft"), rl__rewards=())
    with pytest.raises(ValueError, match=r"rl.reward_model=.*sft' is a mode='sft' run, not a reward model"):
        feedback_inputs.rl_inputs(config, str(tmp_path / "run"), 4)
    config.rl.reward_weights = (0.5,)  # weights of programmatic rewards the reward model replaces: named
    with pytest.raises(ValueError, match=r"rl.reward_weights=\(0.5,\) weighs rl.rewards, but rl.reward_model="):
        feedback_inputs.rl_inputs(config, str(tmp_path / "run"), 4)
    assert not os.path.exists(tmp_path / "run")


def test_rows_put_the_completion_mask_logps_and_reward_on_the_right_tokens():
    tok = ByteTokenizer()
    end = tok.special_id(chat.END_TOKEN)
    probs = [Problem(np.array([5, 6, 7], np.int32), "ab", "k"), Problem(np.array([9], np.int32), "c", "k")]
    outs = [decode.Completion(tokens=[97, 98, end], logprobs=[-1.0, -2.0, -3.0], finish_reason="stop", prompt_tokens=3),
            decode.Completion(tokens=[99, 99, 99, 99], logprobs=[-.5] * 4, finish_reason="length", prompt_tokens=1)]
    ro = rollout.to_rows(probs, outs, group=1, width=8, pad_id=0, stop_ids=[end], detokenize=tok.decode,
                         mask_truncated=True)
    np.testing.assert_array_equal(ro.rows["inputs"][0], [5, 6, 7, 97, 98, 0, 0, 0])
    np.testing.assert_array_equal(ro.rows["targets"][0], [6, 7, 97, 98, end, 0, 0, 0])
    np.testing.assert_array_equal(ro.rows["completion"][0], [0, 0, 1, 1, 1, 0, 0, 0])  # targets 97, 98, <|end|>
    np.testing.assert_array_equal(ro.rows["sampler_logp"][0], [0, 0, -1, -2, -3, 0, 0, 0])
    np.testing.assert_array_equal(ro.rows["segment_ids"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ro.rows["completion"][1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ro.rows["mask"][1], np.zeros(8))  # truncated: no loss under mask_truncated
    assert ro.texts == ["ab", "cccc"] and ro.finishes == ["stop", "length"] and list(ro.lengths) == [3, 4]
    token_rewards = rewards.place_on_last_token(np.array([1.0, 0.5]), ro.rows["completion"])
    assert token_rewards[0, 4] == 1.0 and token_rewards[0].sum() == 1.0  # on <|end|>, the stopping token
    assert token_rewards[1, 3] == 0.5 and token_rewards[1].sum() == 0.5  # on the last token of a truncated one
    assert rewards.place_on_last_token(np.array([2.0]), np.zeros((1, 4))).sum() == 0  # no completion: nothing
    # a reward model scores the very tokens the trainer trains on: prompt + completion, right-padded
    ids, seg = rewards.completion_rows(probs, [o.tokens for o in outs], 1, 9, 0)
    np.testing.assert_array_equal(ids[0], [5, 6, 7, 97, 98, end, 0, 0, 0])
    np.testing.assert_array_equal(seg[0], [1, 1, 1, 1, 1, 1, 0, 0, 0])
    for i in range(2):
        m = int(ro.rows["segment_ids"][i].sum())
        np.testing.assert_array_equal(ids[i, 1:m + 1], ro.rows["targets"][i, :m])
        np.testing.assert_array_equal(ids[i, :m], ro.rows["inputs"][i, :m])
        assert seg[i].sum() == m + 1
    with pytest.raises(ValueError, match="row 0: prompt \\+ completion are 6 tokens > width 5"):
        rewards.completion_rows(probs, [o.tokens for o in outs], 1, 5, 0)


def test_programmatic_rewards_and_bad_names():
    got = rewards.programmatic(["exact_match", "format"], [" 42 ", "41", ""], ["42", "42", "42"],
                               ["stop", "stop", "stop"], [3, 3, 1], length_penalty=0.5, length_target=2)
    np.testing.assert_allclose(got, [2 - 0.5, 1 - 0.5, 0.0])
    with pytest.raises(ValueError, match="'bogus' is not a programmatic reward"):
        rewards.check_names(["bogus"])


def test_prompt_only_conversations_and_an_answer_field_of_their_own(tmp_path, caplog):
    """TRL's conversational prompt-only records ({"prompt": [messages]}) are RL prompts; rl.answer_field
    reads the answer from the data's own field (e.g. 'solution'); training prompts without an answer under
    exact_match are warned about (they would all score 0, silently)."""
    import logging
    import feedback_inputs
    from data import prompts as prompts_data
    from data.sources import DataError
    from data.tokenizer import ByteTokenizer
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say x"}]
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps({"prompt": convo, "solution": "x"}) + "\n" for _ in range(8)))
    (p, *_), _ = prompts_data.read_prompts(str(path), ByteTokenizer(), max_prompt_len=64, strict=True,
                                           answer_field="solution")
    assert list(p.messages) == convo and p.reference == "x"
    # verl's prompts keep the answer nested: a dotted answer_field reads it (a number as its text)
    verl = tmp_path / "verl.jsonl"
    verl.write_text(json.dumps({"prompt": convo, "data_source": "gsm8k",
                                "reward_model": {"style": "rule", "ground_truth": 72}}) + "\n")
    (p,), _ = prompts_data.read_prompts(str(verl), ByteTokenizer(), max_prompt_len=64, strict=True,
                                        answer_field="reward_model.ground_truth")
    assert p.reference == "72" and p.record["data_source"] == "gsm8k"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": convo + [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*a prompt conversation ends with a user turn"):
        prompts_data.read_prompts(str(bad), ByteTokenizer(), max_prompt_len=64, strict=True)
    config = _cfg(tmp_path, grpo_config, rl__rewards=("exact_match",), data__path=str(path), rl__val_path=str(path))
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        feedback_inputs.rl_inputs(config, str(tmp_path / "w1"), 4)
    assert "8 of 8 training prompts have no answer (field 'answer'" in caplog.text
    caplog.clear()
    config.rl.answer_field = "solution"
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        got = feedback_inputs.rl_inputs(config, str(tmp_path / "w2"), 4)
    assert "no answer" not in caplog.text and {p.reference for p in got.prompts} == {"x"}


def test_a_reward_function_of_ones_own_by_file_or_module(tmp_path, monkeypatch):
    """rl.rewards may name a function of the user's own, FILE.py:FUNCTION or module:FUNCTION (as verl's
    custom_reward_function), with the built-ins' signature; it adds up with them. Every way it can be
    wrong is named: no file, no module, no such function, a value that is not a number."""
    (tmp_path / "my_rewards.py").write_text(
        "def digits(text, answer, finish, n_tokens):\n    return float(text.strip().isdigit())\n\n"
        "def half_len(text, answer, finish, n_tokens):\n    return n_tokens / 2\n\n"
        "def words(text, answer, finish, n_tokens):\n    return 'many'\n\nNOT_A_FUNCTION = 3\n")
    file_reward = f"{tmp_path / 'my_rewards.py'}:digits"
    got = rewards.programmatic(["exact_match", file_reward], [" 42 ", "4x", "7"], ["42", "42", "42"],
                               ["stop"] * 3, [3, 2, 1])
    np.testing.assert_allclose(got, [2.0, 0.0, 1.0])
    monkeypatch.syspath_prepend(str(tmp_path))
    np.testing.assert_allclose(rewards.programmatic(["my_rewards:half_len"], ["a", "b"], ["", ""], ["stop"] * 2, [3, 4]),
                               [1.5, 2.0])
    rewards.check_names([file_reward, "my_rewards:half_len", "exact_match"])
    for name, message in ((f"{tmp_path / 'none.py'}:digits", r"no file '.*none\.py'"),
                          ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz'"),
                          (f"{tmp_path / 'my_rewards.py'}:missing", r"has no function 'missing'"),
                          ("my_rewards:NOT_A_FUNCTION", r"has no function 'NOT_A_FUNCTION'")):
        with pytest.raises(ValueError, match=r"rl\.rewards: '.*:\w+': .*" + message):
            rewards.check_names([name])
    with pytest.raises(ValueError, match=r"'my_rewards:words' returned 'many' for the completion 'a': a reward is a "
                                         r"number"):
        rewards.programmatic(["my_rewards:words"], ["a"], [""], ["stop"], [1])
    # its file is part of the run's inputs: edited before a resume, it is named like a changed data file
    import harness
    config = _cfg(tmp_path, grpo_config, rl__rewards=(file_reward,))
    (tmp_path / "run").mkdir()
    harness.record_inputs(str(tmp_path / "run"), harness.check_inputs_unchanged(config, str(tmp_path / "run"), False))
    with open(tmp_path / "my_rewards.py", "a") as f:
        f.write("# tuned\n")
    with pytest.raises(ValueError, match=r"rl\.rewards\[.*my_rewards\.py:digits\]='.*my_rewards\.py': 1 files"):
        harness.check_inputs_unchanged(config, str(tmp_path / "run"), resuming=True)
    # so is the module file of a module:FUNCTION reward (found on sys.path, as the run imports it)
    config = _cfg(tmp_path, grpo_config, rl__rewards=("my_rewards:half_len",))
    (tmp_path / "run2").mkdir()
    run2 = str(tmp_path / "run2")
    harness.record_inputs(run2, harness.check_inputs_unchanged(config, run2, False))
    with open(tmp_path / "my_rewards.py", "a") as f:
        f.write("# tuned again\n")
    with pytest.raises(ValueError, match=r"rl\.rewards\[my_rewards:half_len\]='.*my_rewards\.py': 1 files"):
        harness.check_inputs_unchanged(config, run2, resuming=True)
    assert rewards.reward_source("exact_match") == rewards.reward_source("no_such_module_xyz:f") == ""


def test_a_reward_of_ones_own_may_take_the_prompt_record_and_rewards_are_weighted(tmp_path, monkeypatch):
    """A function of the user's own that takes a keyword `record` (or **kwargs) gets its prompt's record as
    read, every field (as TRL passes dataset columns), in the RL loop; the built-ins' signature still works."""
    (tmp_path / "rec_rewards.py").write_text(
        "def n_tests(text, answer, finish, n_tokens, record):\n    return float(len(record['tests']))\n\n"
        "def weight(text, answer, finish, n_tokens, **kwargs):\n    return kwargs['record']['weight']\n")
    names = [f"{tmp_path / 'rec_rewards.py'}:n_tests", f"{tmp_path / 'rec_rewards.py'}:weight", "exact_match"]
    got = rewards.programmatic(names, ["x", "y"], ["x", "x"], ["stop"] * 2, [1, 1],
                               records=[{"tests": [1, 2], "weight": 0.5}, {"tests": [], "weight": 2}])
    np.testing.assert_allclose(got, [2 + 0.5 + 1, 0 + 2 + 0])
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say x {i}", "answer": "x", "tests": ["a", "b"], "weight": 1.0})
                            + "\n" for i in range(16)))
    work = str(tmp_path / "run")
    train.train_and_evaluate(_cfg(tmp_path, grpo_config, data__path=str(path), rl__val_path=str(path),
                                  rl__rewards=tuple(names[:2]), rl__reward_weights=(0.25, 3.0), train__steps=1,
                                  rl__eval_generate=0), work)
    rows = [r for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if "rl/reward_mean" in r]
    # weighted as rl.reward_weights says (TRL's reward_weights), each reward's mean logged by its function's name
    assert rows[0]["rl/reward_mean"] == 0.25 * 2 + 3.0 * 1 and rows[0]["rl/reward_std"] == 0.0
    assert (rows[0]["rl/reward/n_tests"], rows[0]["rl/reward/weight"]) == (2.0, 1.0)
    assert rewards.metric_names(["exact_match", "a.py:f", "b.py:f", "m:g"]) == ["exact_match", "f", "f_2", "g"]
    # a reward listed twice counts twice (and takes its own weight)
    np.testing.assert_allclose(rewards.programmatic(["exact_match", "exact_match"], ["x"], ["x"], ["stop"], [1],
                                                    weights=(1.0, 0.5)), [1.5])


def test_rollout_sampling_takes_the_rl_block_s_filters():
    import ml_collections
    from model.sampling import Sampling
    r = ml_collections.ConfigDict({"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05})
    assert rollout.sampling_of(r) == Sampling(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)
    del r["top_k"], r["min_p"]  # a run from before these fields: off
    assert rollout.sampling_of(r) == Sampling(temperature=0.7, top_p=0.9)


def test_guardrails_each_fire_on_a_constructed_failure(caplog):
    cfg = types.SimpleNamespace(kl_estimator="k3", kl_max=1.0, min_length=2.0, max_new_tokens=8, entropy_floor=0.01,
                                value_loss_max=10.0, logp_diff_warn=0.01)
    healthy = {"rl/reward_mean": 0.5, "rl/kl": 0.1, "rl/length_mean": 5.0, "rl/truncated": 0.1, "rl/entropy": 1.0,
               "rl/zero_variance_groups": 0.5, "rl/value_loss": 1.0, "rl/logp_diff_mean": 0.001,
               "rl/logp_diff_max": 0.06, "rl/value_mean": 0.0}
    assert guardrails.check(7, healthy, cfg) == []
    failures = {"rl/reward_mean": float("nan"), "rl/value_mean": float("inf"), "rl/kl": -0.5, "rl/length_mean": 1.0,
                "rl/truncated": 1.0, "rl/entropy": 0.0, "rl/zero_variance_groups": 1.0, "rl/value_loss": 1e6,
                "rl/logp_diff_mean": 0.5}
    for key, value in failures.items():
        msgs = guardrails.check(7, dict(healthy, **{key: value}), cfg)
        assert len(msgs) == 1 and msgs[0].startswith("iteration 7:"), (key, msgs)
    assert "exceeds rl.kl_max=1.0" in guardrails.check(3, dict(healthy, **{"rl/kl": 5.0}), cfg)[0]
    with pytest.raises(guardrails.RLAnomalyError, match="iteration 7: policy entropy 0 fell below"):
        guardrails.apply(guardrails.check(7, dict(healthy, **{"rl/entropy": 0.0}), cfg), "halt")
    guardrails.apply(["iteration 1: something"], "warn")
    assert "rl guardrail: iteration 1: something" in caplog.text


def test_adaptive_kl_moves_toward_the_target():
    assert loop.adaptive_kl(0.1, kl=0.2, target=0.1, horizon=100, n=10) == pytest.approx(0.1 * 1.02)  # clipped +0.2
    assert loop.adaptive_kl(0.1, kl=0.05, target=0.1, horizon=100, n=10) == pytest.approx(0.1 * 0.98)  # -0.2


@pytest.mark.parametrize("field,value,message", [
    ("rl__kl_estimator", "k9", "rl.kl_estimator='k9'"), ("rl__aggregation", "sum", "rl.aggregation='sum'"),
    ("rl__minibatch", 5, "rl.minibatch=5"), ("rl__rewards", ("bogus",), "'bogus' is not"),
    ("rl__temperature", 0.0, "rl.temperature=0.0"),
    ("rl__top_p", 0.0, "rl.top_p: sampling top_p=0.0 is out of range"),
    ("rl__top_k", -1, "rl.top_k: sampling top_k=-1"),
    ("rl__min_p", 1.5, "rl.min_p: sampling min_p=1.5"),
    ("rl__reward_weights", (1.0, 2.0), "rl.reward_weights=(1.0, 2.0): give one number per rl.rewards entry"),
    ("rl__on_anomaly", "panic", "rl.on_anomaly='panic'"),
    ("rl__ptx_coef", 0.5, "rl.ptx_coef=0.5 must be >= 0, and > 0 needs rl.ptx_path"),
    ("rl__ptx_coef", -1.0, "rl.ptx_coef=-1.0"),
    ("rl__group_size", 1, "rl.group_size=1: GRPO's advantage is a completion's reward minus its group's mean")])
def test_bad_rl_values_name_the_field_and_write_nothing(tmp_path, say_x, field, value, message):
    work = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train_and_evaluate(_cfg(tmp_path, grpo_config, **{field: value}), str(work))
    assert not (work / "checkpoints").exists()


def test_grpo_learns_a_trivial_reward_with_sampler_trainer_agreement(tmp_path, say_x):
    work = str(tmp_path / "grpo")
    # one update per iteration (rl.minibatch=0): the loss reuses its own forward's log-probs as the old ones
    train.train_and_evaluate(_cfg(tmp_path, grpo_config, train__steps=8, train__eval_every=8,
                                  train__checkpoint_every=8, rl__kl_coef=0.01, rl__minibatch=0), work)
    rows = [r for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if "rl/reward_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # before any update the trainer's log-probs of the sampled tokens are the sampler's
    assert rows[0]["rl/logp_diff_max"] < 2e-2 and rows[0]["rl/logp_diff_mean"] < 2e-3
    assert abs(rows[0]["rl/kl"]) < 1e-3  # policy == reference at the first iteration
    for key in ("rl/reward_std", "rl/entropy", "rl/clip_low", "rl/clip_high", "rl/approx_kl", "rl/kl_coef",
                "rl/length_mean", "rl/length_min", "rl/length_max", "rl/truncated", "rl/zero_variance_groups",
                "perf/rollout_tokens_per_s", "perf/update_tokens_per_s", "train/grad_norm"):
        assert key in rows[-1], key
    first, last = np.mean([r["rl/reward_mean"] for r in rows[:2]]), np.mean([r["rl/reward_mean"] for r in rows[-2:]])
    assert last > first + 0.1, [r["rl/reward_mean"] for r in rows]
    # per-prompt greedy answers of the policy (scripts/evaluate.py --out_predictions), as exact match scores them
    preds = str(tmp_path / "preds.jsonl")
    got = evaluation.evaluate_run(work, out_predictions=preds)
    answers = read_jsonl(preds)
    assert got["predictions"] == len(answers) == 4 and answers[0]["reference"] == "x"
    assert np.mean([a["correct"] for a in answers]) == pytest.approx(got["eval/exact_match"])
    # the prompts as a file of their own (evaluate.py --data), the training prompts gone: the same answers
    os.remove(tmp_path / "prompts.jsonl")
    alone = evaluation.evaluate_run(work, data=str(tmp_path / "val.jsonl"))
    assert alone["split"] == "data" and alone["eval/exact_match"] == got["eval/exact_match"]
    # scripts/policy_kl.py: a run against itself is at KL 0 exactly (same params, same forward)
    out = policy_kl.policy_kl(work, work, str(tmp_path / "val.jsonl"), n=4, samples=2, max_new_tokens=8,
                              max_prompt_len=24, batch_size=8)
    assert out["completions"] == 8 and out["tokens"] > 0 and out["kl_per_token"] == 0.0


def test_ppo_learns_a_trivial_reward(tmp_path, say_x):
    work = str(tmp_path / "ppo")
    train.train_and_evaluate(_cfg(tmp_path, ppo_config, train__steps=8, train__eval_every=8,
                                  train__checkpoint_every=8, rl__kl_coef=0.01, rl__epochs=2), work)
    rows = [r for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if "rl/reward_mean" in r]
    assert rows[0]["rl/logp_diff_max"] < 2e-2
    assert "rl/value_loss" in rows[-1] and "rl/explained_variance" in rows[-1]
    first, last = np.mean([r["rl/reward_mean"] for r in rows[:2]]), np.mean([r["rl/reward_mean"] for r in rows[-2:]])
    assert last > first + 0.1, [r["rl/reward_mean"] for r in rows]
    # scripts/generate.py samples the run's policy (the backbone under its value head; it read the whole
    # params tree before, and failed on every PPO run without LoRA)
    _, model, params, tok, _ = generate.load(work)
    out = decode.Decoder(model, batch=1, cache_len=32).generate(params, [tok.encode("Say")], max_new_tokens=4)[0]
    assert 1 <= len(out.tokens) <= 4


def _ppo_init(tmp_path, **kw):
    """(config, model, mesh, rules, state, state_sh, source params saved at tmp_path/src) of a tiny PPO run."""
    cfg = _cfg(tmp_path, ppo_config, **kw)
    source = build.transformer(cfg, ByteTokenizer().vocab_size)
    src_params = nn.meta.unbox(source.init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32))["params"])
    checkpoint.save_params(str(tmp_path / "src"), 3, src_params, json.loads(cfg.to_json()))
    model = modes.get(cfg).model(cfg, types.SimpleNamespace(tokenizer=ByteTokenizer()))
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.sharding)
    state, state_sh = steps.init_state(model, optax.sgd(0.1), mesh, rules, 0, 8)
    return cfg, model, mesh, rules, state, state_sh, src_params


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_a_separate_critic_starts_from_the_policy_weights(tmp_path, rank):
    *_, state, state_sh, src_params = _ppo_init(tmp_path, rl__critic="separate", lora__rank=rank)
    trunk = "base" if rank else "backbone"
    assert set(state.params) == {trunk, "critic", "value_head"} | ({"lora"} if rank else set())
    warm = warmstart.warm_start(state, state_sh, str(tmp_path / "src"))
    for name in (trunk, "critic"):  # both transformers hold the source's weights
        for a, b in zip(jax.tree.leaves(warm.params[name]), jax.tree.leaves(src_params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("value_head",) + (("lora",) if rank else ()):  # the head and the adapters keep their init
        for a, b in zip(jax.tree.leaves(warm.params[name]), jax.tree.leaves(state.params[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("init_from", [False, True], ids=["fresh", "warm"])
def test_the_reference_params_are_the_initial_policy_without_optimizer_state(tmp_path, init_from):
    cfg, model, mesh, rules, state, state_sh, _ = _ppo_init(tmp_path, seed=0, data__seq_len=8)
    if init_from:
        cfg.init_from = str(tmp_path / "src")
        state = warmstart.warm_start(state, state_sh, cfg.init_from)
    run = types.SimpleNamespace(config=cfg, model=model, mesh=mesh, rules=rules, state_sh=state_sh)
    params = loop.initial_params(run)  # steps.init_params (+ warm start): the same values as init_state's
    assert set(params) == set(state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_in_batches_pads_the_last_batch_to_one_shape_and_keeps_the_order():
    rows = {"a": np.arange(10, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32)}
    shapes, placed = [], []

    def fn(batch):
        shapes.append(batch["a"].shape)
        return batch["a"].sum(axis=1) * 2, None
    sums_N, none = reference.in_batches(fn, rows, 4, put=lambda b: placed.append(len(b["a"])) or b)
    np.testing.assert_array_equal(sums_N, np.arange(10) * 6)
    assert none is None and shapes == [(4, 3)] * 3 and placed == [4, 4, 4]  # one shape: one compile
    np.testing.assert_array_equal(reference.in_batches(lambda b: b["a"], rows, 4), rows["a"])
    with pytest.raises(ValueError, match="batch size 0 must be positive"):
        reference.in_batches(fn, rows, 0)


def test_ppo_with_lora_trains_adapters_and_value_head_on_a_frozen_base(tmp_path, say_x):
    work = str(tmp_path / "ppo_lora")
    cfg = _cfg(tmp_path, ppo_config, lora__rank=4, train__steps=2, train__eval_every=2, train__checkpoint_every=2,
               rl__kl_coef=0.01)
    assert modes.frozen_params(cfg) == ("base",)
    train.train_and_evaluate(cfg, work)
    rows = [r for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if "rl/reward_mean" in r]
    # the sampler (the decoder on the LoRA policy) and the trainer agree before any update, and the reference
    # (the LoRA-disabled base) is the policy then: B = 0
    assert rows[0]["rl/logp_diff_max"] < 2e-2 and rows[0]["rl/logp_diff_mean"] < 2e-3
    assert abs(rows[0]["rl/kl"]) < 1e-6
    _, params, _ = checkpoint.load_for_inference(work)
    assert set(params) == {"base", "lora", "value_head"}
    model = modes.get(cfg).model(cfg, types.SimpleNamespace(tokenizer=ByteTokenizer()))
    assert isinstance(model, lora.LoraTrunk)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.sharding)
    init = steps.init_params(model, mesh, rules, cfg.seed, cfg.data.seq_len,
                             steps.abstract_params(model, mesh, rules, cfg.data.seq_len)[1])
    for a, b in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(init["base"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen
    for name in ("lora", "value_head"):
        assert any(not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(init[name]))), name
    served = serving.load_run(work)  # the policy alone: the LoraModel on {'base', 'lora'}
    assert isinstance(served.model, lora.LoraModel) and set(served.params) == {"base", "lora"}
    out = policy_kl.policy_kl(work, work, str(tmp_path / "val.jsonl"), n=4, samples=2, max_new_tokens=8,
                              max_prompt_len=24, batch_size=8)
    assert out["completions"] == 8 and out["tokens"] > 0 and out["kl_per_token"] == 0.0
    # merged: a plain PPO checkpoint (backbone + value head) whose policy gives the LoRA policy's logits
    merge_lora.merge_run(work, str(tmp_path / "merged"))
    merged = serving.load_run(str(tmp_path / "merged"))
    assert not isinstance(merged.model, lora.LoraModel) and merged.config.lora.rank == 0
    ids_1xL = jnp.arange(1, 13, dtype=jnp.int32)[None]
    np.testing.assert_allclose(np.asarray(merged.model.apply({"params": merged.params}, ids_1xL)),
                               np.asarray(served.model.apply({"params": served.params}, ids_1xL)), atol=1e-4)


def test_ptx_rows_that_do_not_split_over_the_mesh_are_refused_before_anything_is_written(tmp_path, say_x):
    work = tmp_path / "run"
    with pytest.raises(ValueError, match=r"rl\.ptx_rows=3 is not divisible by 8 data-parallel devices"):
        train.train_and_evaluate(_cfg(tmp_path, grpo_config, rl__ptx_coef=0.5, rl__ptx_path=_ptx_file(tmp_path),
                                      rl__ptx_rows=3), str(work))
    assert not (work / "checkpoints").exists() and not (work / "tokenizer.json").exists()


def _ptx_file(tmp_path) -> str:
    """SFT chat records for the PPO-ptx term: 'say x <word>' answered 'x'."""
    path = tmp_path / "ptx.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say x {w}"},
                                                     {"role": "assistant", "content": "x"}]}) + "\n"
                            for w in ("abc", "bcd", "cde", "def", "efa", "fab")))
    return str(path)


@pytest.mark.parametrize("module,rank", [(grpo_config, 4), (ppo_config, 0), (ppo_config, 4)],
                         ids=["grpo_lora_ptx", "ppo_separate_critic", "ppo_lora_separate_critic"])
def test_resume_is_exact(tmp_path, say_x, module, rank):
    # one model row per completion (2 groups per update over 8 devices); plain GRPO and PPO with one row per
    # prompt: tests/rl_groups_test.py
    # stop after 1 iteration, 2 more after the resume: the restored state (params, optimizer, adaptive KL
    # coefficient, prompt iterator) feeds the first resumed iteration and that one's the second; GRPO also
    # with the PPO-ptx term, whose SFT rows are drawn by (seed, iteration, epoch, update)
    kw = dict(train__steps=3, train__eval_every=100, train__checkpoint_every=100, rl__kl_target=0.01,
              lora__rank=rank)
    if module is ppo_config:
        kw["rl__critic"] = "separate"
    else:
        kw.update(rl__ptx_coef=0.5, rl__ptx_path=_ptx_file(tmp_path), rl__ptx_rows=8)
    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    train.train_and_evaluate(_cfg(tmp_path, module, **kw), straight)
    train.train_and_evaluate(_cfg(tmp_path, module, train__stop_after=1, **kw), stopped)
    train.train_and_evaluate(_cfg(tmp_path, module, **kw), stopped)  # resumes at 1
    keys = ("rl/reward_mean", "train/loss", "rl/kl_coef", "rl/length_mean") + (("rl/ptx_loss",) if module is
                                                                                 grpo_config else ())
    for key in keys:
        a = [r[key] for r in read_jsonl(os.path.join(straight, "metrics.jsonl")) if key in r]
        b = [r[key] for r in read_jsonl(os.path.join(stopped, "metrics.jsonl")) if key in r]
        assert a == b and len(a) == 3, key
    pa, pb = (jax.tree.leaves(checkpoint.load_for_inference(w)[1]) for w in (straight, stopped))
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_the_ptx_term_adds_coef_times_the_sft_nll_of_its_rows(objective):
    """PPO-ptx: the RL loss + ptx_coef x the mean token NLL of the SFT rows, exactly the causal LM loss mode
    'sft' trains with on those rows (value and gradient); logged as ptx_loss."""
    tok = ByteTokenizer()
    cfg = tiny_config("unused", grpo_config)
    lm = build.causal_lm(cfg, tok.vocab_size, tok.base_size)
    model = build.policy_value(cfg, tok.vocab_size) if objective == "ppo" else lm
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 16), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    lm_params = params["backbone"] if objective == "ppo" else params
    end = tok.special_id(chat.END_TOKEN)
    probs = [Problem(np.array([5, 6, 7], np.int32), "ab", "k"), Problem(np.array([9, 8], np.int32), "c", "k")]
    outs = [decode.Completion(tokens=[97, 98, end], logprobs=[-1.0] * 3, finish_reason="stop", prompt_tokens=3),
            decode.Completion(tokens=[99, end], logprobs=[-0.5] * 2, finish_reason="stop", prompt_tokens=2)]
    rows = rollout.to_rows(probs, outs, group=1, width=8, pad_id=0, stop_ids=[end], detokenize=tok.decode,
                           mask_truncated=False).rows
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    batch.update(old_logp=jnp.asarray(rows["sampler_logp"]), advantages=jnp.array([1.0, -1.0]))
    if objective == "ppo":
        batch["advantages"] = jnp.asarray(rows["mask"]) * 0.3
        batch.update(returns=jnp.asarray(rows["mask"]), old_values=jnp.zeros((2, 8)))
        kw = dict(value_clip=0.2, vf_coef=0.1, entropy_coef=0.0)
        fn = rl_objectives.ppo
    else:
        kw = dict(beta=0.0, kl_estimator="k3")
        fn = rl_objectives.grpo
    kw.update(eps_low=0.2, eps_high=0.2, dual_clip=0.0, aggregation="token_mean", max_len=8)
    conv = [chat.render({"prompt": "say x", "response": "x"}, tok), chat.render({"prompt": "hi", "response": "yo"}, tok)]
    sft_rows = chat.stack(chat.pack_conversations(conv, 16, pad_id=tok.pad_id, fit="first"))
    sft_rows = {k: jnp.asarray(v) for k, v in sft_rows.items()}
    with_ptx = dict(batch, **{rl_objectives.PTX + k: v for k, v in sft_rows.items()})
    # jitted: a compile per function instead of one per operation
    plain = jax.jit(lambda p: fn(p, batch, None, model=model, **kw))
    mixed = jax.jit(lambda p: fn(p, with_ptx, None, model=model, ptx_coef=0.5, **kw))
    sft = jax.jit(lambda p: objectives.causal_lm(p, sft_rows, None, model=lm))
    (l0, m0), (l1, m1) = plain(params), mixed(params)
    nll = sft(lm_params)[0]
    np.testing.assert_allclose(float(m1["ptx_loss"]), float(nll), rtol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0) + 0.5 * float(nll), rtol=1e-5)
    assert float(m1["loss"]) == float(l1) and "ptx_loss" not in m0
    g0 = jax.jit(jax.grad(lambda p: plain(p)[0]))(params)
    g1 = jax.jit(jax.grad(lambda p: mixed(p)[0]))(params)
    g_sft = jax.jit(jax.grad(lambda p: sft(p)[0]))(lm_params)
    g1_lm, g0_lm = (g["backbone"] if objective == "ppo" else g for g in (g1, g0))
    for a, b, c in zip(jax.tree.leaves(g1_lm), jax.tree.leaves(g0_lm), jax.tree.leaves(g_sft)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + 0.5 * np.asarray(c), rtol=1e-4, atol=1e-6)

"""mode='sft': greedy decoding, the chat-data path, end-to-end learning, LoRA, merge, embedding extension."""

import json
import os
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

import checkpoint
import evaluation
import modes
import sharding
import steps
import task_eval
import train
import warmstart
from configs import sft as sft_config
from data import chat, sft as sft_data
from data.tokenizer import ByteTokenizer
from model import build, decode, lora

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import merge_lora  # noqa: E402


def _copy_task(path, n, seed, letters=2):
    """'copy x' -> 'x' (letters=1): a 64-wide 2-layer model learns it in ~120 steps (every seed tried)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice("abcdef") for _ in range(letters))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"copy {w}"},
                                             {"role": "assistant", "content": w}], "kind": "copy"}) + "\n")
    return str(path)


def _sft_cfg(train_path, val_path, **kw):
    base = dict(sft__val_path=val_path, data__seq_len=64, sft__eval_generate=32)
    return tiny_config(train_path, sft_config, **{**base, **kw})


def test_bad_records_are_counted_or_named_under_strict(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = [{"messages": [{"role": "user", "content": "no answer"}]},
           {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
           {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
           {"prompt": "p" * 5, "response": "r" * 50}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] + bad) + "\n")
    records, stats = sft_data.read_split(str(path), strict=False)
    assert len(records) == 2 and sum(stats.skipped.values()) == 3  # format errors: counted, named by reason
    tok = ByteTokenizer()
    convs = sft_data.render_split(records, tok, stats, seq_len=32, too_long="drop", train_on="assistant",
                                  strict=False)
    assert len(convs) == 1 and stats.skipped["too long"] == 1
    convs = sft_data.render_split(records, tok, stats, seq_len=32, too_long="truncate", train_on="assistant",
                                  strict=False)
    assert len(convs) == 2 and stats.truncated == 1 and len(convs[1][0]) == 33
    with pytest.raises(ValueError, match=r"d\.jsonl:2"):
        sft_data.read_split(str(path), strict=True)
    with pytest.raises(ValueError, match=r"d\.jsonl:5: too long"):
        sft_data.render_split(records, tok, stats, seq_len=32, too_long="drop", train_on="assistant", strict=True)


def test_generation_problems_and_exact_match_scoring():
    tok = ByteTokenizer()
    records = [("f:1", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " 42 "}],
                        "kind": "add"}),
               ("f:2", {"prompt": "r", "response": "x"})]
    problems = sft_data.generation_problems(records, tok, limit=10)
    assert [p.reference for p in problems] == [" 42 ", "x"] and [p.kind for p in problems] == ["add", ""]
    np.testing.assert_array_equal(problems[0].prompt, chat.render_prompt([{"role": "user", "content": "q"}], tok))

    class Echo:  # a fake decoder: answers "42" then <|end|> for every prompt
        def generate(self, params, prompts, **kw):
            assert kw["stop_ids"] == [tok.special_id("<|end|>")] and kw["sampling"].temperature == 0
            ids = list(tok.encode("42")) + [tok.special_id("<|end|>")]
            return [decode.Completion(tokens=ids, logprobs=[0.0] * 3, finish_reason="stop", prompt_tokens=len(p))
                    for p in prompts]
    answers = task_eval.answers_and_finishes(Echo(), None, problems, tok, width=16, max_new_tokens=4)
    assert answers == [("42", "stop"), ("42", "stop")]


@pytest.fixture(scope="module")
def pretrained(corpus_dir, tmp_path_factory):
    """A tiny causal run on the stdlib corpus, 64-wide (the model the SFT tests start from)."""
    run = str(tmp_path_factory.mktemp("pre") / "run")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=4, model__d_model=64, model__d_ff=128,
                                         data__seq_len=64), run)
    return run


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("copy")
    return _copy_task(d / "train.jsonl", 400, 0, letters=1), _copy_task(d / "val.jsonl", 32, 1, letters=1)


def test_sft_after_pretraining_learns_the_task(pretrained, copy_data, tmp_path):
    tr, va = copy_data
    cfg = _sft_cfg(tr, va, init_from=pretrained, model__d_model=64, model__d_ff=128, train__steps=120,
                   train__eval_every=120, train__log_every=40, optim__lr=5e-3, optim__warmup_steps=5)
    # the pretrained model, before SFT, on the same problems
    _, params, _ = checkpoint.load_for_inference(pretrained)
    tok = ByteTokenizer()
    problems = sft_data.generation_problems(sft_data.read_split(va, strict=True)[0], tok, 32)
    model = build.transformer(cfg, tok.vocab_size)
    before = task_eval.exact_match_eval(problems, tok, width=64, max_new_tokens=8, batch_size=8)(model, params)
    out = train.train_and_evaluate(cfg, str(tmp_path / "sft"))
    assert before["eval/exact_match"] == 0.0
    assert out["eval/exact_match"] >= 0.8 and out["eval/exact_match/copy"] == out["eval/exact_match"]
    with open(tmp_path / "sft" / "chat_template.json") as f:
        assert json.load(f) == chat.template_spec()
    # scripts/evaluate.py's path: the saved run on its validation file, given as other data
    again = evaluation.evaluate_run(str(tmp_path / "sft"), data=va)
    assert again["eval/exact_match"] == out["eval/exact_match"]
    assert again["eval/loss"] == pytest.approx(out["eval/loss"], rel=1e-5)


def test_lora_sft_trains_only_adapters_and_merges_exactly(pretrained, copy_data, tmp_path):
    tr, va = copy_data
    run, merged_dir = str(tmp_path / "lora"), str(tmp_path / "merged")
    # no answers generated at eval: nothing here reads them (LoRA eval generation: train_test's sft_lora)
    cfg = _sft_cfg(tr, va, init_from=pretrained, model__d_model=64, model__d_ff=128, train__steps=6,
                   lora__rank=4, lora__alpha=8.0, optim__lr=1e-2, sft__eval_generate=0)
    train.train_and_evaluate(cfg, run)
    _, pre, _ = checkpoint.load_for_inference(pretrained)
    _, params, step = checkpoint.load_for_inference(run)
    assert set(params) == {"base", "lora"} and step == 6
    for a, b in zip(jax.tree.leaves(pre), jax.tree.leaves(params["base"])):  # the base never moves
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(params["lora"]))  # B moved from 0
    # merged export == adapted model
    merge_lora.merge_run(run, merged_dir)
    config, merged, _ = checkpoint.load_for_inference(merged_dir)
    assert config["lora"]["rank"] == 0 and "lora" not in merged
    model = build.transformer(cfg, ByteTokenizer().vocab_size)
    wrapped = build.causal_lm(cfg, ByteTokenizer().vocab_size, ByteTokenizer().base_size)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64)), jnp.int32)
    want = jax.jit(wrapped.apply)({"params": params}, tokens)  # jitted: one compile, not one per op
    got = jax.jit(model.apply)({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert os.path.exists(os.path.join(merged_dir, "chat_template.json"))
    with pytest.raises(ValueError, match="not a LoRA run"):
        merge_lora.merge_run(merged_dir, str(tmp_path / "again"))


def test_lora_bf16_base_and_trainable_fraction(copy_data, tmp_path, caplog):
    tr, va = copy_data
    cfg = _sft_cfg(tr, va, train__steps=3, lora__rank=2, lora__base_dtype="bfloat16",
                   lora__targets=("attn/query", "attn/value"))
    with caplog.at_level("INFO", logger="lmstack"):
        train.train_and_evaluate(cfg, str(tmp_path / "run"))
    _, params, _ = checkpoint.load_for_inference(str(tmp_path / "run"))
    assert {x.dtype for x in jax.tree.leaves(params["base"])} == {np.dtype(jnp.bfloat16)}
    n_lora, n_all = lora.count_params(params["lora"]), lora.count_params(params)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model:"))
    assert f"({n_lora / 1e6:.2f}M trained, {100 * n_lora / n_all:.2f}%)" in line


def test_warm_start_extends_a_smaller_embedding_keeping_old_rows(corpus_dir, copy_data, tmp_path):
    tr, va = copy_data
    pre = str(tmp_path / "pre")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3, model__vocab_multiple=1), pre)  # 267 rows
    cfg = _sft_cfg(tr, va)
    model = build.transformer(cfg, ByteTokenizer().vocab_size)  # vocab_multiple=64: 320 rows
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.sharding)
    state, state_sh = steps.init_state(model, optax.sgd(0.1), mesh, rules, 0, 64)
    new = warmstart.warm_start(state, state_sh, pre).params
    _, old, _ = checkpoint.load_for_inference(pre)
    old_e, new_e = np.asarray(old["embed"]["embedding"]), np.asarray(new["embed"]["embedding"])
    assert old_e.shape[0] == 267 and new_e.shape[0] == 320
    np.testing.assert_array_equal(new_e[:267], old_e)
    np.testing.assert_allclose(new_e[267:], np.broadcast_to(old_e.mean(0), (53, old_e.shape[1])), rtol=1e-6)


def test_extend_rows_and_mismatch_errors():
    old = np.arange(12, dtype=np.float32).reshape(4, 3)
    new = warmstart.extend_rows(old, 6)
    np.testing.assert_array_equal(new[:4], old)
    np.testing.assert_array_equal(new[4], old.mean(0))
    with pytest.raises(ValueError, match="cannot shrink"):
        warmstart.extend_rows(old, 3)
    assert warmstart._fit_loaded("layers_0/attn/query/kernel", old, (4, 4)) is None


def test_a_resumed_run_refuses_a_different_chat_template(copy_data, tmp_path):
    tr, va = copy_data
    run = str(tmp_path / "run")
    train.train_and_evaluate(_sft_cfg(tr, va, train__steps=3, sft__eval_generate=0), run)
    with open(os.path.join(run, "chat_template.json"), "w") as f:
        json.dump(dict(chat.template_spec(), version=0), f)
    with pytest.raises(ValueError, match="chat template mismatch"):
        train.train_and_evaluate(_sft_cfg(tr, va, train__steps=4, sft__eval_generate=0), run)


def test_lora_is_refused_for_modes_without_it(corpus_dir):
    cfg = tiny_config(corpus_dir, lora__rank=2)
    cfg.mode = "mlm"
    with pytest.raises(ValueError, match="lora.rank=2 is supported for mode 'causal' and 'sft'"):
        modes.frozen_params(cfg)


def test_a_split_cut_away_by_seq_len_is_an_error_naming_the_setting(tmp_path):
    """Every training (or validation) record cut to nothing at data.seq_len: the error lists what was left out
    and names data.seq_len, for SFT and for the preference modes; nothing is written to the workdir's
    checkpoints."""
    import feedback_inputs
    import task_inputs
    from configs import reward as reward_config
    long_path, short_path = tmp_path / "long.jsonl", tmp_path / "short.jsonl"
    long_path.write_text("".join(json.dumps({"prompt": "x" * 80 + str(i), "chosen": "yes", "rejected": "no",
                                             "response": "yes"}) + "\n" for i in range(12)))
    short_path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "ok", "rejected": "no",
                                              "response": "ok"}) + "\n" for i in range(12)))
    for module, build_inputs, section, what in ((sft_config, task_inputs.sft_inputs, "sft", "packed SFT rows"),
                                                (reward_config, feedback_inputs.reward_inputs, "pref",
                                                 "preference pairs")):
        for train_path, val_path, message in (
                (long_path, short_path, f"the training split gives 0 {what} \\(left out: 12 no "),
                (short_path, long_path, "no validation .* left to evaluate .*skipped: 12 no ")):
            work = tmp_path / f"{section}_{message[:3]}"
            work.mkdir()
            config = tiny_config(str(train_path), module, data__seq_len=32, **{f"{section}__val_path": str(val_path)})
            with pytest.raises(Exception, match=message + r".* tokens after truncation; data.seq_len=32 cut them: "
                                                          r"raise --config.data.seq_len"):
                build_inputs(config, str(work), 8)
            assert not os.path.exists(work / "checkpoints")

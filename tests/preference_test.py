"""Modes 'reward' and 'dpo': pair rendering, the Bradley-Terry and DPO-family objectives on hand-built
batches, the cached reference log-probs, end-to-end runs warm-started from a tiny SFT run, config errors,
scripts/score.py on the trained reward model, and on-policy pairs (scripts/sample_pairs.py)."""

import functools
import glob
import json
import logging
import math
import os
import random
import re
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
import conftest
from conftest import tiny_config

import checkpoint
import evaluation
import harness
import feedback_inputs
import objectives
import train
from configs import dpo as dpo_config, ppo as ppo_config, reward as reward_config, sft as sft_config
from data import chat, formats, preference, prompts as prompts_data, tasks
from data.sources import ReadStats, Source
from data.tokenizer import ByteTokenizer
from metrics import read_jsonl
from model import build
from rl import pairs, reference, rewards

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import sample_pairs  # noqa: E402
import score  # noqa: E402

SEQ_LEN = 64
TOK = ByteTokenizer()
END = TOK.special_id(chat.END_TOKEN)


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ---- Rendering ------------------------------------------------------------------------------------

def _check_side(example, side, record):
    """Weights are 1 exactly on the response tokens and the closing <|end|> as targets; the last real
    input token is that <|end|>."""
    prompt_len = len(TOK.encode(record["prompt"]))
    n = prompt_len + len(TOK.encode(record[side])) + 4  # <|user|> prompt <|end|> <|assistant|> response <|end|>
    target_index = np.arange(1, SEQ_LEN + 1)  # weights[j] belongs to token j + 1 of the conversation
    want = ((target_index >= prompt_len + 3) & (target_index <= n - 1)).astype(np.float32)
    np.testing.assert_array_equal(example[f"{side}_weights"], want)
    weighted = example[f"{side}_targets"][want > 0]
    assert TOK.decode(weighted[:-1].tolist()) == record[side] and weighted[-1] == END
    seg = example[f"{side}_segment_ids"]
    last = int(np.max(np.nonzero(seg)[0]))
    assert last == n - 1 and example[f"{side}_inputs"][last] == END and (seg[:n] == 1).all()
    assert example[f"{side}_inputs"][0] == TOK.special_id("<|user|>")


def test_render_pair_weights_and_last_token():
    record = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "six", "margin": 2}
    example, status = preference.render_pair(record, TOK, seq_len=SEQ_LEN, too_long="truncate")
    assert status == "rendered" and example["margin"] == 2.0 and example["weight"] == 1.0
    for side in preference.SIDES:
        _check_side(example, side, record)
        assert example[f"{side}_inputs"].shape == (SEQ_LEN,) and example[f"{side}_inputs"].dtype == np.int32
    assert preference.render_pair({k: v for k, v in record.items() if k != "margin"}, TOK, seq_len=SEQ_LEN,
                                  too_long="drop")[0]["margin"] == 0.0


def test_truncation_drops_and_bad_margins_are_counted_or_named():
    short = {"prompt": "p", "chosen": "a", "rejected": "b"}
    long_ = {"prompt": "p", "chosen": "c" * 80, "rejected": "b"}  # 85 tokens > seq_len + 1
    cut = {"prompt": "q" * 80, "chosen": "a", "rejected": "b"}  # no response token survives
    alike = {"prompt": "p", "chosen": "x" * 80 + "A", "rejected": "x" * 80 + "B"}  # differ only past the cut
    records = [("f.jsonl:1", short), ("f.jsonl:2", long_), ("f.jsonl:3", cut), ("f.jsonl:4", alike)]
    stats = ReadStats()
    examples = preference.render_split(records, TOK, stats, seq_len=SEQ_LEN, too_long="truncate")
    assert len(examples) == 2  # an equal pair has no preference to learn and is never ranked right: dropped
    # the cut pair is kept: counted apart from the skipped ones, and the log line says so
    assert stats.skipped == {"no response tokens after truncation": 1, "sides equal after truncation": 1}
    assert stats.truncated == 1 and stats.left_out() == (
        "1 no response tokens after truncation, 1 sides equal after truncation, 1 kept but cut to fit")
    full, _ = chat.render(preference.conversation(long_, "chosen"), TOK)
    ex = examples[1]
    np.testing.assert_array_equal(ex["chosen_inputs"], full[:SEQ_LEN])  # the seq_len tokens kept, all inputs
    # so the last kept token is the row's last real INPUT (where a reward head reads); the tail is trained
    assert ex["chosen_segment_ids"].all()
    assert ex["chosen_weights"][-2] == 1.0 and ex["chosen_weights"][-1] == 0.0  # no target after the last token
    _check_side(ex, "rejected", long_)  # the short side is whole
    stats = ReadStats()
    assert len(preference.render_split(records, TOK, stats, seq_len=SEQ_LEN, too_long="drop")) == 1
    assert stats.skipped == {"too long": 3}
    with pytest.raises(ValueError, match=r"^pref.too_long='clip': expected one of"):  # the field, not record 1
        preference.render_split(records, TOK, ReadStats(), seq_len=SEQ_LEN, too_long="clip")
    for bad in ("x", True, float("inf")):
        with pytest.raises(ValueError, match=re.escape(f"f.jsonl:7: margin={bad!r}")):
            preference.render_split([("f.jsonl:7", {**short, "margin": bad})], TOK, ReadStats(),
                                    seq_len=SEQ_LEN, too_long="truncate")


def test_a_side_of_seq_len_plus_one_tokens_still_ends_on_end_token():
    record = {"prompt": "ab", "chosen": "xyz", "rejected": "q"}
    n = len(chat.render(preference.conversation(record, "chosen"), TOK)[0])
    example, status = preference.render_pair(record, TOK, seq_len=n - 1, too_long="truncate")
    last = int(np.max(np.nonzero(example["chosen_segment_ids"])[0]))
    assert example["chosen_inputs"][last] == END or status != "rendered"
    # scripts/score.py reads the same token and counts the side as cut exactly when training does
    row, cut = score.render(record, "chosen", TOK, n - 1)
    np.testing.assert_array_equal(row["inputs"], example["chosen_inputs"])
    assert cut == (status == "truncated")
    assert score.render(record, "chosen", TOK, n)[1] is False


# ---- Objectives on hand-built batches -------------------------------------------------------------

class FixedRewards:
    """A stub reward model: the rewards [2B] (chosen rows, then rejected rows) are its params."""

    def apply(self, variables, tokens_BxL, positions_BxL, segment_ids_BxL, deterministic=True, rngs=None):
        assert tokens_BxL.shape[0] == variables["params"]["r"].shape[0]
        return variables["params"]["r"]


def _pref_batch(records, seq_len=SEQ_LEN, weights=None):
    examples = [preference.render_pair(r, TOK, seq_len=seq_len, too_long="truncate")[0] for r in records]
    batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
    if weights is not None:
        batch["weight"] = np.asarray(weights, np.float32)
    return batch


RECORDS = [{"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "52", "margin": 0.5},
           {"prompt": "Reverse 'abc'.", "chosen": "cba", "rejected": "bca"},
           {"prompt": "Sort 'dcab'.", "chosen": "abcd", "rejected": "abdc", "margin": 1.0},
           {"prompt": "Count 'a' in 'aab'.", "chosen": "2", "rejected": "3"}]


def test_bradley_terry_loss_margin_weights_gradient_and_centering():
    batch = _pref_batch(RECORDS, weights=[1, 1, 1, 0])  # the last pair is padding
    rc, rr = np.array([1.0, -0.5, 2.0, 50.0], np.float32), np.array([0.0, 0.5, 1.5, -50.0], np.float32)
    params = {"r": jnp.asarray(np.concatenate([rc, rr]))}
    margin = np.array([0.5, 0.0, 1.0, 0.0])
    want = np.mean([-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip(rc[:3], rr[:3], margin[:3])])
    loss_fn = jax.jit(lambda p, coef: objectives.reward(p, batch, None, model=FixedRewards(), center_coef=coef))
    loss, metrics = loss_fn(params, 0.0)
    assert float(loss) == pytest.approx(want, rel=1e-6) and float(metrics["pairs"]) == 3
    assert float(metrics["correct_sum"]) == 2 and float(metrics["margin_sum"]) == pytest.approx(1.0 - 1.0 + 0.5)
    grad = np.asarray(jax.jit(jax.grad(lambda p: loss_fn(p, 0.0)[0]))(params)["r"])
    assert (grad[:3] < 0).all() and (grad[4:7] > 0).all()  # chosen pushed up, rejected down
    assert grad[3] == 0 and grad[7] == 0  # the zero-weight pair is ignored
    centered, m2 = loss_fn(params, 0.1)
    assert float(centered) == pytest.approx(want + 0.1 * np.mean((rc[:3] + rr[:3]) ** 2), rel=1e-6)
    assert float(m2["bt_loss"]) == pytest.approx(want, rel=1e-6)


SIMPO_BETA, SIMPO_GAMMA = 2.0, 0.5


@pytest.fixture(scope="module")
def at_reference():
    """A tiny random causal LM whose batch carries its own reference log-probs (rl/reference.sequence_logps on
    the same params): the batch, dpo's sigmoid / ipo / simpo (loss, metrics), and each side's logits. One
    compiled program (compiles dominate the time of these tests)."""
    cfg = tiny_config("unused", sft_config, data__seq_len=SEQ_LEN)
    model = build.causal_lm(cfg, TOK.vocab_size, TOK.base_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"])
    batch = _pref_batch(RECORDS, weights=[1, 1, 1, 0])

    @jax.jit
    def run(params, batch):
        batch = dict(batch, ref_known=jnp.ones_like(batch["weight"]))
        logits = {}
        for side in preference.SIDES:
            rows = {k: batch[f"{side}_{k}"] for k in reference.ROW_KEYS}
            batch[f"ref_{side}_logp"] = reference.sequence_logps(model, params, rows)[0]
            logits[side] = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"])
        dpo = functools.partial(objectives.dpo, params, batch, None, model=model)
        simpo_batch = {**batch, "ref_chosen_logp": jnp.full(4, 123.0)}  # ignored by simpo
        return {"sigmoid": dpo(loss="sigmoid", beta=0.1), "ipo": dpo(loss="ipo", beta=0.1),
                "rpo": dpo(loss="sigmoid", beta=0.1, nll_coef=0.5),
                "simpo": objectives.dpo(params, simpo_batch, None, model=model, loss="simpo", beta=SIMPO_BETA,
                                        simpo_gamma=SIMPO_GAMMA),
                "simpo_smoothed": objectives.dpo(params, simpo_batch, None, model=model, loss="simpo",
                                                 beta=SIMPO_BETA, simpo_gamma=SIMPO_GAMMA, label_smoothing=0.1),
                "logits": logits}
    return batch, jax.device_get(run(params, batch))


def test_dpo_at_the_reference_and_simpo_by_hand(at_reference):
    batch, out = at_reference
    loss, metrics = out["sigmoid"]
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5) and float(metrics["pairs"]) == 3
    assert float(metrics["chosen_logp_change_sum"]) == pytest.approx(0.0, abs=1e-4)
    assert float(out["ipo"][0]) == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)
    # SimPO: -log sigmoid(beta (mean chosen log-prob - mean rejected log-prob) - gamma), no reference
    lp, n = _sequence_logps_by_hand(batch, out["logits"])
    z = SIMPO_BETA * (lp["chosen"] / n["chosen"] - lp["rejected"] / n["rejected"]) - SIMPO_GAMMA
    want = np.mean(np.log1p(np.exp(-z[:3])))  # the zero-weight pair left out
    assert float(out["simpo"][0]) == pytest.approx(want, rel=1e-5)
    smoothed = np.mean(0.9 * np.log1p(np.exp(-z[:3])) + 0.1 * np.log1p(np.exp(z[:3])))  # dpo.label_smoothing
    assert float(out["simpo_smoothed"][0]) == pytest.approx(smoothed, rel=1e-5)  # (it was ignored for simpo)
    assert abs(want - math.log1p(math.exp(SIMPO_GAMMA))) > 1e-3  # the normalised log-probs mattered


def _sequence_logps_by_hand(batch, logits_by_side):
    """side -> (sum of the response tokens' log-probs [B], their count [B]) in float64 numpy."""
    lp, n = {}, {}
    for side in preference.SIDES:
        logits = logits_by_side[side].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        tok_lp = np.take_along_axis(logp, batch[f"{side}_targets"][..., None], -1)[..., 0]
        lp[side], n[side] = (tok_lp * batch[f"{side}_weights"]).sum(-1), batch[f"{side}_weights"].sum(-1)
    return lp, n


def test_dpo_nll_term_adds_the_chosen_mean_token_nll(at_reference):
    """dpo.nll_coef (RPO): at the reference the DPO part is log 2, plus coef x each pair's chosen mean NLL."""
    batch, out = at_reference
    lp, n = _sequence_logps_by_hand(batch, out["logits"])
    nll = -lp["chosen"][:3] / n["chosen"][:3]  # the zero-weight pair left out
    assert float(out["rpo"][0]) == pytest.approx(math.log(2) + 0.5 * np.mean(nll), rel=1e-5)
    assert float(out["rpo"][1]["correct_sum"]) == float(out["sigmoid"][1]["correct_sum"])  # rewards unchanged


def test_dpo_accuracy_counts_no_pair_correct_at_the_reference(at_reference):
    _, out = at_reference
    assert float(out["sigmoid"][1]["correct_sum"]) == 0


# ---- End to end: SFT -> reward / DPO ---------------------------------------------------------------

@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    splits = tasks.make_splits(0, {"train": 64, "val": 16}, kinds=("add", "reverse"))  # (nearly) all fit SEQ_LEN
    rng = random.Random(0)
    files = {}
    for name, problems in splits.items():
        files[f"{name}_sft"] = _write_jsonl(d / f"{name}_sft.jsonl", [tasks.sft_record(p) for p in problems])
        files[f"{name}_pref"] = _write_jsonl(d / f"{name}_pref.jsonl",
                                             [tasks.preference_record(p, rng) for p in problems])
    return files


@pytest.fixture(scope="module")
def sft_run(task_files, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("sft") / "run")
    train.train_and_evaluate(tiny_config(task_files["train_sft"], sft_config, sft__val_path=task_files["val_sft"],
                                         data__seq_len=SEQ_LEN, train__steps=2, optim__warmup_steps=1,
                                         sft__eval_generate=0), run)
    return run


def _pref_cfg(module, task_files, **kw):
    base = dict(pref__val_path=task_files["val_pref"], data__seq_len=SEQ_LEN)
    return tiny_config(task_files["train_pref"], module, **{**base, **kw})


def _dpo_cfg(task_files, sft_run, **kw):
    return _pref_cfg(dpo_config, task_files, **{**_DPO_KW, "init_from": sft_run, **kw})


_DPO_KW = dict(dpo__loss="sigmoid", pref__eval_generate=0)


def test_dpo_starts_at_its_cached_reference(task_files, sft_run, tmp_path, monkeypatch, caplog):
    run = str(tmp_path / "dpo")
    cfg = _dpo_cfg(task_files, sft_run, train__steps=2, train__log_every=1, train__eval_every=2, optim__warmup_steps=1)
    out = train.train_and_evaluate(cfg, run)
    first = read_jsonl(os.path.join(run, "metrics.jsonl"))[0]
    assert first["step"] == 1 and first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert out["step"] == 2 and "eval/chosen_logp_change" in out
    caches = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "reference_logps_*.npz")))
    assert [c.split("_")[2] for c in caches] == ["train", "val"]
    # per-problem greedy answers of the policy (scripts/evaluate.py --out_predictions), as exact match scores them
    preds = str(tmp_path / "preds.jsonl")
    got = evaluation.evaluate_run(run, overrides=lambda c: setattr(c.pref, "eval_generate", 6), out_predictions=preds)
    rows = read_jsonl(preds)
    assert got["predictions"] == len(rows) == 6 and {"prompt", "prediction", "reference", "kind"} <= set(rows[0])
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(got["eval/exact_match"])
    # evaluating a file (evaluate.py --data): its pairs' reference log-probs only, and data.path is not read
    splits, add = [], reference.add_reference_logps
    with monkeypatch.context() as m:
        m.setattr(reference, "add_reference_logps", lambda ex, **k: (splits.append(k["split"]), add(ex, **k)))
        given = evaluation.evaluate_run(run, data=task_files["val_pref"],
                                        overrides=lambda c: setattr(c.data, "path", str(tmp_path / "gone.jsonl")))
    assert splits == ["val"] and given["split"] == "data" and given["eval/accuracy"] == got["eval/accuracy"]
    # a second read of the same pairs takes the cache: nothing is computed
    def no_compute(*a, **k):
        raise AssertionError("reference log-probs recomputed despite the cache")
    with monkeypatch.context() as m:
        m.setattr(reference, "sequence_logps", no_compute)
        with caplog.at_level(logging.INFO, logger="lmstack"):
            again = feedback_inputs.dpo_inputs(cfg, run, cfg.data.batch_size)
    assert caplog.text.count("cached in") == 2
    z = np.load(os.path.join(run, caches[1]))
    np.testing.assert_array_equal(np.concatenate([b["ref_chosen_logp"] for b in again.eval_batches])[:len(z["chosen"])],
                                  z["chosen"])
    # one changed training record: a new training cache beside the old one; validation's is reused
    records = [json.loads(line) for line in open(task_files["train_pref"])]
    records[5]["rejected"] += "9"
    changed = _write_jsonl(tmp_path / "changed.jsonl", records)
    feedback_inputs.dpo_inputs(tiny_config(changed, dpo_config, pref__val_path=task_files["val_pref"], data__seq_len=SEQ_LEN,
                                      init_from=sft_run, **_DPO_KW), run, 8)
    after = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run, "reference_logps_*.npz")))
    assert len(after) == 3 and set(caches) < set(after) and [c.split("_")[2] for c in after].count("train") == 2


@pytest.mark.parametrize("override,message", [
    (dict(dpo__loss="bogus"), "dpo.loss='bogus'"),
    (dict(dpo__beta=0.0), "dpo.beta=0.0"),
    (dict(dpo__label_smoothing=0.5), "dpo.label_smoothing=0.5"),
    (dict(dpo__nll_coef=-1.0), "dpo.nll_coef=-1.0"),
    (dict(init_from=""), "dpo.loss='sigmoid' compares the policy with a reference model"),
])
def test_dpo_config_errors_name_the_value_before_writing(task_files, sft_run, tmp_path, override, message):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        train.train_and_evaluate(_dpo_cfg(task_files, sft_run, **override), str(run))
    assert not (run / "checkpoints").exists() and not glob.glob(str(run / "reference_logps_*"))


def test_ipo_with_label_smoothing_is_refused_by_check_dpo(task_files):
    with pytest.raises(ValueError, match=re.escape("dpo.label_smoothing=0.1")):
        feedback_inputs.check_dpo(_dpo_cfg(task_files, "unused", dpo__loss="ipo", dpo__label_smoothing=0.1))


@pytest.fixture(scope="module")
def reward_run(task_files, sft_run, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("rm") / "run")
    out = train.train_and_evaluate(_pref_cfg(reward_config, task_files, init_from=sft_run, train__steps=4,
                                             optim__lr=1e-3), run)
    return run, out


def test_reward_run_warm_starts_trains_and_reports(reward_run, sft_run):
    run, out = reward_run
    assert out["step"] == 4
    evals = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "eval/accuracy" in r]
    assert evals and evals[-1]["step"] == 4
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/reward_mean", "eval/reward_std"):
        assert np.isfinite(evals[-1][key]), key
    assert 0 <= evals[-1]["eval/accuracy"] <= 1 and evals[-1]["eval/reward_std"] > 0
    _, sft_params, _ = checkpoint.load_for_inference(sft_run)
    _, params, _ = checkpoint.load_for_inference(run)
    assert set(params) == {"backbone", "reward_head"}
    # 4 Adam steps at lr <= 1e-3 move a weight by < 5e-3: the backbone is the SFT model's, not a fresh init
    flat_sft = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(sft_params)[0]}
    flat_rm = jax.tree_util.tree_flatten_with_path(params["backbone"])[0]
    assert len(flat_rm) == len(flat_sft)
    for k, v in flat_rm:
        np.testing.assert_allclose(np.asarray(v), np.asarray(flat_sft[jax.tree_util.keystr(k)]), atol=5e-3)
    assert np.abs(np.asarray(params["reward_head"]["out"]["kernel"])).max() > 0  # the zero-init head moved
    with pytest.raises(ValueError, match="mode='reward': its items are pairs: score them with scripts/score.py"):
        evaluation.evaluate_run(run, out_predictions=os.path.join(run, "..", "preds.jsonl"))
    # its validation pairs as a file of their own, the training file gone: scored the same
    own = evaluation.evaluate_run(run)
    given = evaluation.evaluate_run(run, data=own["data"], overrides=lambda c: setattr(c.data, "path", "/gone.jsonl"))
    assert given["split"] == "data" and {k: v for k, v in given.items() if k.startswith("eval/")} == {
        k: v for k, v in own.items() if k.startswith("eval/")}


# ---- scripts/score.py -----------------------------------------------------------------------------

def _main(script, monkeypatch, capsys, **flag_values):
    """(exit code, captured output) of a script's main() on these flags (a fresh FlagValues patched in)."""
    fv = flags.FlagValues()
    script.define_flags(fv)
    fv([script.__name__] + [f"--{k}={v}" for k, v in flag_values.items()])
    monkeypatch.setattr(script, "FLAGS", fv)
    rc = script.main([])
    return rc, capsys.readouterr()


_score = functools.partial(_main, score)


def test_score_matches_the_training_objective(reward_run, task_files, tmp_path, monkeypatch, capsys):
    run, _ = reward_run
    pairs = [r for r in map(json.loads, open(task_files["val_pref"])) if r["kind"] == "add"][:5]  # none cut
    pairs.append({"prompt": "p" * 30, "chosen": "c" * 60, "rejected": "r"})  # truncated: 95 tokens > 65
    singles = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(pairs)]
    data = _write_jsonl(tmp_path / "mixed.jsonl", pairs + singles)
    out = tmp_path / "scored.jsonl"
    rc, cap = _score(monkeypatch, capsys, workdir=run, data=data, out=out, batch_size=4)
    assert rc == 0 and cap.out == ""
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 12 and rows[6]["id"] == 0 and rows[0]["kind"] == pairs[0]["kind"]  # order and fields kept
    # the training objective's rewards for the same pairs
    config, params, _ = checkpoint.load_for_inference(run)
    model = build.reward_model(ml_collections.ConfigDict(config), TOK.vocab_size)
    batch = _pref_batch(pairs)

    @jax.jit
    def training_rewards(params, batch):  # the rewards objectives.reward computes, and its metrics
        rows = objectives._both_sides(batch)
        r = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"])
        return r, objectives.reward(params, batch, None, model=model)[1]
    r, metrics = jax.device_get(training_rewards(params, batch))
    got_c = np.array([row["reward_chosen"] for row in rows[:6]])
    got_r = np.array([row["reward_rejected"] for row in rows[:6]])
    np.testing.assert_allclose(got_c, r[:6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_r, r[6:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([row["reward"] for row in rows[6:]], got_c, rtol=1e-5, atol=1e-6)
    summary = json.loads(cap.err.strip().splitlines()[-1])
    assert summary["records"] == 12 and summary["pairs"] == 6 and summary["truncated"] == 2
    assert summary["accuracy"] == pytest.approx(float(metrics["correct_sum"]) / 6)
    every = np.concatenate([got_c, got_r, got_c])
    assert summary["mean"] == pytest.approx(every.mean(), rel=1e-4, abs=1e-6)
    assert summary["std"] == pytest.approx(every.std(), rel=1e-3, abs=1e-6)
    # stdout when no --out
    rc, cap = _score(monkeypatch, capsys, workdir=run, data=data, batch_size=4)
    assert rc == 0 and [json.loads(line) for line in cap.out.splitlines()] == rows
    # chat records (an SFT file): the last assistant turn is the response to the turns before it
    chats = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                                 {"role": "assistant", "content": r["chosen"]}]}
                                                   for r in pairs])
    rc, cap = _score(monkeypatch, capsys, workdir=run, data=chats, batch_size=4)
    scored = [json.loads(line) for line in cap.out.splitlines()]
    assert rc == 0 and [r["response"] for r in scored] == [r["chosen"] for r in pairs]
    np.testing.assert_allclose([r["reward"] for r in scored], got_c, rtol=1e-5, atol=1e-6)


def test_score_errors_exit_1_and_write_nothing(reward_run, sft_run, task_files, tmp_path, monkeypatch, capsys):
    run, _ = reward_run
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "response": "b"}])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "text": "c"}])
    out = tmp_path / "out.jsonl"
    cases = [(dict(workdir=tmp_path / "missing", data=good), "missing"),
             (dict(workdir=run, data=tmp_path / "nope.jsonl"), "nope.jsonl"),
             (dict(workdir=run, data=bad), r"bad\.jsonl:2"),
             (dict(workdir=run, data=_write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
                 {"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}]}])),
              r"chat\.jsonl:1: a chat record to score must end with a user turn and the assistant's reply"),
             (dict(workdir=sft_run, data=good), "mode 'sft'")]
    for flag_values, message in cases:
        rc, cap = _score(monkeypatch, capsys, out=out, **flag_values)
        assert rc == 1 and cap.out == "", flag_values
        assert "score.py: error:" in cap.err and re.search(message, cap.err), cap.err
        assert not out.exists() and not glob.glob(str(tmp_path / "*.tmp*"))


def test_trimmed_pair_batches_give_the_same_log_probs_and_rewards():
    """The supervised loop cuts pair batches to their longest real side (modes' `trim`): the padding cut off
    is never attended nor scored, so log-probs and rewards are those of the full-width batch."""
    batch = _pref_batch(RECORDS)
    cut = preference.trim_pairs(batch)
    assert cut["chosen_inputs"].shape == (4, 32) and batch["chosen_inputs"].shape == (4, SEQ_LEN)
    assert cut["margin"] is batch["margin"] and preference.trim_pairs(cut)["chosen_inputs"].shape == (4, 32)
    cfg = tiny_config("unused", sft_config, data__seq_len=SEQ_LEN)
    lm, rm = build.causal_lm(cfg, TOK.vocab_size, TOK.base_size), build.reward_model(cfg, TOK.vocab_size)
    dummy = jnp.zeros((1, SEQ_LEN), jnp.int32)
    lm_params = nn.meta.unbox(jax.jit(lm.init)(jax.random.PRNGKey(0), dummy)["params"])
    rm_params = nn.meta.unbox(jax.jit(rm.init)(jax.random.PRNGKey(1), dummy)["params"])
    rm_params["reward_head"]["out"]["kernel"] = jnp.ones_like(rm_params["reward_head"]["out"]["kernel"])  # not 0
    logps = jax.jit(lambda rows: reference.sequence_logps(lm, lm_params, rows)[0])  # a compile per width, not per op
    reward = jax.jit(lambda r: rm.apply({"params": rm_params}, r["inputs"], r["positions"], r["segment_ids"]))
    for side in preference.SIDES:
        full, short = ({k: b[f"{side}_{k}"] for k in reference.ROW_KEYS} for b in (batch, cut))
        np.testing.assert_allclose(logps(short), logps(full), rtol=1e-5, atol=1e-5)
        rewards = [reward(r) for r in (full, short)]
        np.testing.assert_allclose(rewards[1], rewards[0], rtol=1e-5, atol=1e-5)


# ---- On-policy pairs (rl/pairs.py, scripts/sample_pairs.py) ---------------------------------------

def test_choose_pairs_the_best_finished_sample_with_the_worst():
    def drawn(rewards, finishes=None, texts=None):
        n = len(rewards)
        return pairs.Drawn(texts or [f"t{i}" for i in range(n)], finishes or ["stop"] * n, np.asarray(rewards))
    # the truncated sample's 2.0 is never chosen; the worst may be anything
    assert pairs.choose(drawn([0.5, 1.0, 2.0, 0.0], ["stop", "stop", "length", "stop"])) == (1, 3)
    assert pairs.choose(drawn([0.5, 1.0, 2.0, -1.0], ["stop", "stop", "stop", "length"])) == (2, 3)
    assert pairs.choose(drawn([1.0, 1.0, 0.0, 0.0])) == (0, 2)  # ties: the earliest sample
    assert pairs.choose(drawn([1.0, 1.0, 1.0])) is None  # no preference
    assert pairs.choose(drawn([1.0, 0.0]), min_gap=1.0) is None and pairs.choose(drawn([1.0, 0.0]), min_gap=0.5)
    assert pairs.choose(drawn([1.0, 0.0], ["length", "length"])) is None
    assert pairs.choose(drawn([1.0, 0.0], texts=["same", "same"])) is None
    assert pairs.choose(drawn([1.0, 0.5, 0.0], texts=["a", "b", " "])) == (0, 1)  # empty text: never a side


_sample_pairs = functools.partial(_main, sample_pairs)


def test_sample_pairs_from_the_policy_feed_dpo(task_files, sft_run, reward_run, tmp_path, monkeypatch, capsys, say_x):
    out = tmp_path / "pairs" / "train_pref.jsonl"
    common = dict(workdir=sft_run, data=task_files["train_sft"], samples=8, max_new_tokens=32, limit=48, batch_rows=64)
    rc, cap = _sample_pairs(monkeypatch, capsys, out=out, rewards="say_x", **common)
    assert rc == 0, cap.err
    summary = json.loads(cap.out)
    records = read_jsonl(str(out))
    assert summary["prompts"] == 48 and summary["samples"] == 384 and summary["pairs"] == len(records) >= 8
    assert summary["pairs"] + summary["no_preference"] == 48
    prompts = {r["messages"][0]["content"]: r for r in map(json.loads, open(task_files["train_sft"]))}
    for r in records:
        formats.validate(r, "preference")
        assert r["answer"] == prompts[r["prompt"]]["answer"] and r["kind"] == prompts[r["prompt"]]["kind"]
        assert r["chosen_reward"] == pytest.approx(conftest._say_x(r["chosen"], "", "", 0))
        assert r["rejected_reward"] == pytest.approx(conftest._say_x(r["rejected"], "", "", 0))
        assert r["chosen_reward"] > r["rejected_reward"]
    first = out.read_bytes()
    assert _sample_pairs(monkeypatch, capsys, out=out, rewards="say_x", **common)[0] == 0
    assert out.read_bytes() == first  # same run, data and seed: the same pairs
    # DPO trains on them as on any preference file
    dpo_out = train.train_and_evaluate(_dpo_cfg(task_files, sft_run, data__path=str(out), train__steps=2,
                                                optim__warmup_steps=1),
                                       str(tmp_path / "dpo"))
    assert dpo_out["step"] == 2 and np.isfinite(dpo_out["train/loss"])
    # rewards from a reward model: a chosen (finished) answer scores as scripts/score.py scores it alone
    rm_out = tmp_path / "rm_pairs.jsonl"
    rc, cap = _sample_pairs(monkeypatch, capsys, out=rm_out, reward_model=reward_run[0], **common)
    assert rc == 0, cap.err
    rm_records = read_jsonl(str(rm_out))
    assert rm_records and all(r["chosen_reward"] > r["rejected_reward"] for r in rm_records)
    # the rows a reward model scores sampled completions on are the conversations score.py scores
    problems, _ = prompts_data.read_prompts(task_files["val_pref"], TOK, max_prompt_len=SEQ_LEN, strict=True)
    answers = [json.loads(line)["chosen"] for line in open(task_files["val_pref"])]
    completions = [list(TOK.encode(a)) + [END] for a in answers]
    rows = rewards.completion_rows(problems, completions, 1, SEQ_LEN + 16, TOK.pad_id)
    got = rewards.RewardModelScorer(reward_run[0], TOK)(*rows)
    scored, _ = score.score(reward_run[0], task_files["val_pref"], batch_size=4)
    whole = [len(p.prompt) + len(c) <= SEQ_LEN + 1 for p, c in zip(problems, completions)]  # score.py cuts longer
    assert sum(whole) >= 8
    np.testing.assert_allclose(got[whole], np.array([s["reward_chosen"] for s in scored])[whole], rtol=1e-4, atol=1e-5)


def test_ppo_rewards_each_completion_with_the_reward_models_score_of_it_alone(task_files, sft_run, reward_run,
                                                                             tmp_path, monkeypatch):
    """PPO against a reward-model run: the rows it scores are prompt + completion, right-padded, and each
    reward is what the reward model gives that conversation alone (more padding and no batch-mates change
    nothing)."""
    calls = []
    real = rewards.RewardModelScorer.__call__

    def spy(self, ids, seg):
        out = real(self, ids, seg)
        calls.append((ids.copy(), seg.copy(), np.asarray(out)))
        return out

    monkeypatch.setattr(rewards.RewardModelScorer, "__call__", spy)
    run = str(tmp_path / "ppo")
    cfg = tiny_config(task_files["train_pref"], ppo_config, init_from=sft_run, rl__reward_model=reward_run[0],
                      rl__rewards=(), rl__val_path=task_files["val_pref"], rl__eval_generate=0,
                      rl__max_prompt_len=SEQ_LEN, rl__max_new_tokens=8, data__batch_size=4, rl__group_size=2,
                      rl__minibatch=8, train__steps=1, train__log_every=1)
    train.train_and_evaluate(cfg, run)
    record = json.loads(open(os.path.join(run, harness.DATA_FINGERPRINT)).read())
    assert record["rl.reward_model"] == {"path": reward_run[0], "step": 4, "digest": "step 4"}  # for resumes
    logged = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "rl/reward_mean" in r]
    assert len(calls) == len(logged) == 1
    (ids, seg, out), row = calls[0], logged[0]
    width = SEQ_LEN + 8
    assert ids.shape == (8, width) and out.std() > 1e-3  # rows score apart, far beyond the tolerance below
    assert row["rl/reward_mean"] == pytest.approx(float(out.mean()), rel=1e-5, abs=1e-6)
    prompts = [tuple(p.prompt) for p in prompts_data.read_prompts(task_files["train_pref"], TOK,
                                                                  max_prompt_len=SEQ_LEN, strict=False)[0]]
    alone = rewards.RewardModelScorer(reward_run[0], TOK)
    for i in range(len(ids)):
        n = int(seg[i].sum())
        assert seg[i, :n].all() and (ids[i, n:] == TOK.pad_id).all()  # real tokens first, then padding
        starts = [p for p in prompts if tuple(ids[i, :len(p)]) == p]
        assert starts  # a training prompt, then its completion: ended by <|end|> or cut at max_new_tokens
        assert ids[i, n - 1] == END or n - len(starts[0]) == 8
        padded = np.full((1, width + 16), TOK.pad_id, np.int32)
        padded[0, :n] = ids[i, :n]
        np.testing.assert_allclose(alone(padded, (padded != TOK.pad_id).astype(np.int32)), out[i:i + 1],
                                   rtol=1e-4, atol=1e-5)


def test_a_resume_after_the_reward_run_trained_on_is_refused(task_files, sft_run, reward_run, tmp_path):
    """PPO / GRPO read rl.reward_model at its latest checkpoint at every start: a reward run trained further
    between a stop and a resume would have the resumed run score with another model, without a word.
    The run records the reward run's step; a resume after it moved is refused naming both steps."""
    rm = str(tmp_path / "rm")
    shutil.copytree(reward_run[0], rm)
    cfg = tiny_config(task_files["train_pref"], ppo_config, init_from=sft_run, rl__reward_model=rm, rl__rewards=())
    workdir = tmp_path / "ppo"
    workdir.mkdir()
    harness.record_inputs(str(workdir), harness.check_inputs_unchanged(cfg, str(workdir), resuming=False))
    assert harness.check_inputs_unchanged(cfg, str(workdir), resuming=True) is None  # unchanged
    train.train_and_evaluate(_pref_cfg(reward_config, task_files, init_from=sft_run, train__steps=5,
                                       optim__lr=1e-3), rm)  # the reward run goes on: step 5
    with pytest.raises(ValueError, match=r"rl\.reward_model='.*rm': its latest checkpoint was step 4 when this run "
                                         r"started, now 5\).*another reward model.*data_fingerprint\.json"):
        harness.check_inputs_unchanged(cfg, str(workdir), resuming=True)


def test_sample_pairs_errors_exit_1_and_write_nothing(task_files, sft_run, reward_run, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "out.jsonl"
    good = dict(workdir=sft_run, data=task_files["val_sft"], limit=2, max_new_tokens=4)
    cases = [(dict(good, samples=1), "samples=1"),
             (dict(good, temperature=0), "--temperature=0.0"),
             (dict(good, rewards="nope"), "'nope' is not a programmatic reward"),
             (dict(good, workdir=tmp_path / "missing"), "missing"),
             (dict(good, workdir=reward_run[0]), "mode='reward'"),
             (dict(good, data=tmp_path / "nope.jsonl"), "nope.jsonl"),
             (dict(good, min_gap=10.0), r"no pairs: for each of the 2 prompts .* --min_gap=10.0"),
             (dict(good, reward_weights="1,2"), r"rl.reward_weights=\(1.0, 2.0\): give one number per"),
             (dict(good, reward_weights="x"), r"--reward_weights=x: numbers"),
             (dict(good, reward_weights="1", reward_model=reward_run[0]), r"--reward_weights=1 weighs --rewards")]
    for flag_values, message in cases:
        rc, cap = _sample_pairs(monkeypatch, capsys, out=out, **flag_values)
        assert rc == 1 and cap.out == "", flag_values
        assert "sample_pairs.py: error:" in cap.err and re.search(message, cap.err), cap.err
        assert not out.exists() and not glob.glob(str(tmp_path / "*.tmp*"))


# ---- Conversational prompts ------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "And 2+2?"}]


def test_a_conversational_pair_weights_only_the_last_reply():
    record = {"prompt": CONVERSATION, "chosen": "4", "rejected": "five"}
    assert formats.validate(record, "preference") is record
    assert formats.record_text(record, "preference").split("\n") == ["Be brief.", "Say hi.", "hi", "And 2+2?", "4",
                                                                     "five"]
    example, status = preference.render_pair(record, TOK, seq_len=SEQ_LEN, too_long="drop")
    assert status == "rendered"
    prompt = preference.prompt_ids(record, TOK)
    for side in preference.SIDES:
        weighted = example[f"{side}_targets"][example[f"{side}_weights"] > 0]
        assert TOK.decode(weighted[:-1].tolist()) == record[side] and weighted[-1] == END  # not the earlier "hi"
        n = int(example[f"{side}_segment_ids"].sum())
        np.testing.assert_array_equal(example[f"{side}_inputs"][:len(prompt)], prompt)  # the whole conversation
        assert n == len(prompt) + len(TOK.encode(record[side])) + 1
    # a one-turn prompt as text or as one user message: the same rows
    flat = {"prompt": "And 2+2?", "chosen": "4", "rejected": "five"}
    listed = dict(flat, prompt=[{"role": "user", "content": "And 2+2?"}])
    a, b = (preference.render_pair(r, TOK, seq_len=SEQ_LEN, too_long="drop")[0] for r in (flat, listed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # TRL's conversational form: each side a list of the one assistant message; the same rows
    trl = dict(record, chosen=[{"role": "assistant", "content": "4"}],
               rejected=[{"role": "assistant", "content": "five"}])
    assert formats.record_text(trl, "preference") == formats.record_text(record, "preference")
    c, d = (preference.render_pair(r, TOK, seq_len=SEQ_LEN, too_long="drop")[0] for r in (record, trl))
    assert all(np.array_equal(c[k], d[k]) for k in c)
    for bad_side in ([{"role": "user", "content": "4"}], [], [{"role": "assistant", "content": "4"}] * 2):
        with pytest.raises(formats.FormatError, match="'chosen' is a list but not one assistant message"):
            formats.validate(dict(record, chosen=bad_side), "preference")
    with pytest.raises(formats.FormatError, match="chosen equals rejected"):
        formats.validate(dict(trl, rejected="4"), "preference")
    # the prompt must be a conversation the assistant answers next
    for bad, message in ((CONVERSATION[:3], "must end with a user turn"),
                         ([{"role": "bot", "content": "x"}], "prompt[0].role='bot'"),
                         ([CONVERSATION[1], CONVERSATION[0]], "prompt[1] is a system message"), ([], "non-empty list")):
        with pytest.raises(formats.FormatError, match=re.escape(message)):
            formats.validate(dict(record, prompt=bad), "preference")


def test_implicit_prompt_pairs_read_as_their_explicit_form(tmp_path):
    """TRL's implicit-prompt pairs (trl-lib's ultrafeedback / hh-rlhf style: no "prompt", both sides whole
    conversations that differ only in their final assistant turn) read as the explicit pair of the shared
    turns, everywhere pairs are read: validation, training rows, RL prompts and score.py; so do such pairs
    that give the prompt too (HuggingFaceH4's ultrafeedback_binarized), when it is those turns."""
    implicit = {"chosen": CONVERSATION + [{"role": "assistant", "content": "4"}],
                "rejected": CONVERSATION + [{"role": "assistant", "content": "five"}], "kind": "add"}
    explicit = {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "five"}], "kind": "add"}
    assert formats.validate(implicit, "preference") == explicit
    assert formats.record_text(formats.validate(implicit, "preference"), "preference") == \
        formats.record_text(explicit, "preference")
    path = _write_jsonl(tmp_path / "implicit.jsonl", [implicit])
    (_, record), = formats.read_records(Source(kind="files", path=path), "preference", ReadStats(), strict=True)
    a, _ = preference.render_pair(record, TOK, seq_len=SEQ_LEN, too_long="drop")
    b, _ = preference.render_pair(explicit, TOK, seq_len=SEQ_LEN, too_long="drop")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    problems, _ = prompts_data.read_prompts(path, TOK, max_prompt_len=SEQ_LEN, strict=True)
    assert list(problems[0].messages) == CONVERSATION and problems[0].reference == "4"
    assert [(w, r["prompt"], f) for w, r, f in score.read_records(path)] == [(f"{path}:1", CONVERSATION,
                                                                             ("chosen", "rejected"))]
    # HuggingFaceH4's ultrafeedback_binarized: the prompt given as well, the shared user turn's text
    h4 = dict(implicit, prompt="And 2+2?")
    assert formats.validate(h4, "preference") == explicit
    assert formats.validate(dict(implicit, prompt=CONVERSATION), "preference") == explicit
    with pytest.raises(formats.FormatError, match=r"prompt mismatch: 'prompt' 'Say hi\.' is neither the 4 turns"):
        formats.validate(dict(implicit, prompt="Say hi."), "preference")
    # what is not such a pair is named; text sides without a prompt are told about the form
    user = {"role": "user", "content": "Hi"}
    for bad, message in (
            (dict(implicit, rejected=CONVERSATION[:2] + [user, {"role": "assistant", "content": "five"}]),
             "share 2 turns: whole conversations as a pair's sides differ only in their last turn"),
            (dict(implicit, rejected=implicit["chosen"]), "identical conversations"),
            ({"chosen": "Human: Hi Assistant: hello", "rejected": "Human: Hi Assistant: go"}, "TRL's implicit prompt")):
        with pytest.raises(formats.FormatError, match=re.escape(message)):
            formats.validate(bad, "preference")
    with pytest.raises(ValueError, match=r"implicit\.jsonl:1: implicit prompt: 'chosen' \(5 turns\)"):
        score.read_records(_write_jsonl(tmp_path / "implicit.jsonl", [dict(implicit, rejected=implicit["chosen"][
            :2] + [user, {"role": "assistant", "content": "x"}])]))


HH = "\n\nHuman: Say hi.\n\nAssistant: hi\n\nHuman: And 2+2?\n\nAssistant: "


def test_anthropic_hh_transcripts_and_dahoas_prompts_read_as_conversations(tmp_path):
    """Anthropic HH-RLHF's raw pairs (both sides whole transcripts) and DeepSpeed-Chat's Dahoas/rm-static
    records (a transcript prompt ending in the 'Assistant:' cue, the sides its replies) read as the explicit
    conversational pair, in validation, training rows, RL prompts and score.py; SFT reads Dahoas' prompt +
    response as that conversation too. Text that only looks like a transcript is not read as one."""
    turns = CONVERSATION[1:]
    explicit = {"prompt": turns, "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "five"}]}
    hh = {"chosen": HH + "4", "rejected": HH + "five"}
    assert formats.validate(hh, "preference") == explicit
    dahoas = {"prompt": HH.rstrip(" "), "response": " 4", "chosen": " 4", "rejected": " five"}
    assert formats.validate(dahoas, "preference") == dict(explicit, response=" 4", chosen="4", rejected="five")
    assert chat.messages_of(dahoas) == turns + [{"role": "assistant", "content": "4"}]
    assert formats.validate(dahoas, "chat") is dahoas  # SFT: prompt + response, rendered from those messages
    path = _write_jsonl(tmp_path / "hh.jsonl", [hh, dahoas])
    rows = [preference.render_pair(r, TOK, seq_len=SEQ_LEN, too_long="drop")[0] for _, r in formats.read_records(
        Source(kind="files", path=path), "preference", ReadStats(), strict=True)]
    want, _ = preference.render_pair(explicit, TOK, seq_len=SEQ_LEN, too_long="drop")
    assert all(all(np.array_equal(row[k], want[k]) for k in want) for row in rows)
    problems, _ = prompts_data.read_prompts(path, TOK, max_prompt_len=SEQ_LEN, strict=True)
    assert [list(p.messages) for p in problems] == [turns, turns] and [p.reference for p in problems] == ["4", "4"]
    assert [r["prompt"] for _, r, _ in score.read_records(path)] == [turns, turns]
    # an empty final reply (some HH pairs have one) is an empty side, named; a transcript without the cue,
    # or text that merely mentions 'Human:', is a prompt of its own text
    with pytest.raises(formats.FormatError, match="empty text"):
        formats.validate({"chosen": HH + "4", "rejected": HH}, "preference")
    assert chat.transcript_messages("Human: Hi Assistant: go") is None
    plain = {"prompt": "\n\nHuman: Hi\n\nAssistant: hello", "chosen": "a", "rejected": "b"}
    assert formats.validate(plain, "preference") is plain


def test_openai_preference_records_read_as_conversational_pairs(tmp_path):
    """OpenAI's preference fine-tuning JSONL: {"input": {"messages", "tools"...}, "preferred_output",
    "non_preferred_output"} is the pair of those messages and outputs in every reader."""
    record = {"input": {"messages": CONVERSATION, "tools": [], "parallel_tool_calls": True},
              "preferred_output": [{"role": "assistant", "content": "4"}],
              "non_preferred_output": [{"role": "assistant", "content": "five"}]}
    explicit = {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "five"}]}
    assert formats.validate(record, "preference") == explicit
    path = _write_jsonl(tmp_path / "openai.jsonl", [record])
    problems, _ = prompts_data.read_prompts(path, TOK, max_prompt_len=SEQ_LEN, strict=True)
    assert list(problems[0].messages) == CONVERSATION and problems[0].reference == "4"
    assert [r["prompt"] for _, r, _ in score.read_records(path)] == [CONVERSATION]
    bad = dict(record, non_preferred_output=[{"role": "assistant", "content": "4"}])
    with pytest.raises(formats.FormatError, match="chosen equals rejected"):
        formats.validate(bad, "preference")


def test_conversational_prompts_reach_rl_prompts_and_on_policy_pairs(tmp_path):
    trl_side = [{"role": "assistant", "content": "4"}]  # TRL's conversational form of a side
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": CONVERSATION, "chosen": trl_side, "rejected": "5"},
                                                   {"prompt": "Say hi.", "chosen": "hi", "rejected": "ho"}])
    problems, _ = prompts_data.read_prompts(path, TOK, max_prompt_len=SEQ_LEN, strict=True)
    assert [list(p.messages) for p in problems] == [CONVERSATION, [CONVERSATION[1]]]
    assert [p.reference for p in problems] == ["4", "hi"]
    np.testing.assert_array_equal(problems[0].prompt, preference.prompt_ids({"prompt": CONVERSATION}, TOK))
    # sample_pairs writes the prompt back as it came: messages, or the text of a single user turn
    assert [pairs.prompt_field(p) for p in problems] == [CONVERSATION, "Say hi."]

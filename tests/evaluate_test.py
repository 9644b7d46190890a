"""scripts/evaluate.py: a saved run evaluates exactly as training did, on its split or on other data."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

import checkpoint
import evaluation
import train
from classify_test import ALPHABETS, _write_task
from configs import finetune_classify, finetune_qa
from configs import sft as sft_config
from data import classify as classify_data, pipeline, sources
from data import tokenizer as tokenizer_lib
from model import build, heads
from qa_test import _write_task as qa_write_task
from sft_test import _copy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import evaluate  # noqa: E402


def _files(workdir):
    """Every file under the workdir with its size and mtime: evaluation must change none."""
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, fs in os.walk(workdir) for f in fs}


@pytest.fixture(scope="module")
def causal_run(corpus_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("causal"))
    config = tiny_config(corpus_dir, train__steps=4, train__eval_every=4, train__eval_batches=2, optim__lr=3e-3,
                         model__n_layers=1)  # one layer: compiles faster
    return workdir, train.train_and_evaluate(config, workdir), config


@pytest.fixture(scope="module")
def full_val(causal_run):
    """Every batch of the run's validation split (the default)."""
    workdir, _, _ = causal_run
    before = _files(workdir)
    out = evaluate.evaluate(workdir)
    assert _files(workdir) == before  # nothing written into the run
    return out


def test_reproduces_training_eval_on_another_mesh(causal_run, full_val):
    workdir, last, _ = causal_run
    before = _files(workdir)
    out = evaluate.evaluate(workdir, max_batches=2, config_overrides={"mesh.fsdp": "2"})  # trained with fsdp=1
    assert (out["step"], out["mode"], out["split"], out["examples"]) == (4, "causal", "val", 16)
    for key in ("eval/loss", "eval/accuracy"):
        assert out[key] == pytest.approx(last[key], rel=1e-5), key
    assert _files(workdir) == before  # nothing written into the run
    assert full_val["examples"] > 16 and np.isfinite(full_val["eval/loss"])


def test_data_text_is_evaluated_in_full(causal_run, full_val, tmp_path):
    """--data replaces the split: the validation documents given as a file score as the split itself."""
    workdir, _, config = causal_run
    docs, _ = sources.read_documents(config.data.path)
    _, val_texts = pipeline.split_documents([d.text for d in docs], config.data.split, config.data.val_fraction)
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in val_texts))
    out_file = str(tmp_path / "out.json")
    given = evaluate.evaluate(workdir, data=str(path), out=out_file)
    assert given["data"] == str(path) and given["examples"] == full_val["examples"]
    assert given["eval/loss"] == pytest.approx(full_val["eval/loss"], rel=1e-6)
    assert json.load(open(out_file)) == given


def test_errors_name_the_problem(causal_run, tmp_path):
    workdir, _, _ = causal_run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.evaluate(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
        evaluate.evaluate(str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")  # not created either
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .*available steps: \[4\]"):
        evaluate.evaluate(workdir, step=3)
    with pytest.raises(FileNotFoundError, match="data path .*missing.txt' does not exist"):
        evaluate.evaluate(workdir, data=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="split='test'.*has no test split"):
        evaluate.evaluate(workdir, split="test")
    with pytest.raises(ValueError, match="max_batches=-1: expected a number of batches, or 0"):  # was: all
        evaluate.evaluate(workdir, max_batches=-1)
    with pytest.raises(ValueError, match="config field 'mesh.fdsp' does not exist"):
        evaluate.evaluate(workdir, config_overrides={"mesh.fdsp": "2"})
    cli = subprocess.run([sys.executable, "scripts/evaluate.py", f"--workdir={workdir}", "--step=7"], cwd=ROOT,
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "available steps: [4]" in cli.stderr and not cli.stdout


def test_classify_on_a_test_file_matches_an_independent_count(tmp_path):
    train_path = _write_task(tmp_path / "train.jsonl", 96, 0)
    val_path = _write_task(tmp_path / "val.jsonl", 24, 1)
    test_path = _write_task(tmp_path / "test.jsonl", 37, 2)  # not a multiple of the batch: padding rows
    workdir = str(tmp_path / "cls")
    config = tiny_config(train_path, finetune_classify, classify__val_path=val_path, train__steps=4,
                         optim__lr=1e-2, model__n_layers=1)
    train.train_and_evaluate(config, workdir)
    os.remove(train_path)  # evaluating a test file needs the run, not its training data
    out = evaluate.evaluate(workdir, data=test_path, split="test")
    assert (out["mode"], out["split"], out["examples"]) == ("classify", "test", 37)
    # independently: encode each record, one forward pass, argmax against labels.json
    saved, params, _ = checkpoint.load_for_inference(workdir)
    cfg = ml_collections.ConfigDict(saved)
    tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
    labels = classify_data.load_labels(os.path.join(workdir, "labels.json"))
    records = [json.loads(line) for line in open(test_path)]
    rows = [classify_data.encode_example(tok, r["text"], None, cfg.data.seq_len, "first") for r in records]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = heads.Classifier(build.model_config(cfg, tok.vocab_size), len(labels), pool="first")
    logits = jax.jit(model.apply)({"params": jax.device_get(params)}, batch["inputs"], batch["positions"],
                                  batch["segment_ids"], batch["token_types"])
    truth = np.array([labels.index(r["label"]) for r in records])
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == truth))
    assert out["eval/accuracy"] == pytest.approx(accuracy, abs=1e-9)


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_classify_reports_the_held_out_share_and_writes_predictions(tmp_path):
    """Without classify.val_path the scored set is the hash-held-out share of data.path, and says so; the
    predictions are the scored records (their mean correctness is eval/accuracy)."""
    train_path = _write_task(tmp_path / "train.jsonl", 120, 0, pair=True)
    test_path = _write_task(tmp_path / "test.jsonl", 21, 2, pair=True)
    workdir = str(tmp_path / "cls")
    train.train_and_evaluate(tiny_config(train_path, finetune_classify, train__steps=3, model__n_layers=1), workdir)
    preds = str(tmp_path / "preds.jsonl")
    out = evaluate.evaluate(workdir, out_predictions=preds)
    assert (out["split"], out["data"], out["example_unit"]) == ("val", train_path, "records")
    assert out["held_out"] == "held out from data.path by hash (data.val_fraction=0.2)"
    rows = _lines(preds)
    assert out["predictions"] == len(rows) == out["examples"] > 0 and out["out_predictions"] == preds
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(out["eval/accuracy"], abs=1e-9)
    records = {f"{train_path}:{i + 1}": json.loads(line) for i, line in enumerate(open(train_path))}
    for r in rows:  # each row names its record, and carries its text, pair and gold label
        rec = records[r["where"]]
        assert (r["text"], r["text_pair"], r["label"]) == (rec["text"], rec["text_pair"], rec["label"])
        assert r["prediction"] in ALPHABETS and r["correct"] == (r["prediction"] == r["label"])
    # a test file without --split: labelled by what it is, never "val"; only 2 batches scored
    given = evaluate.evaluate(workdir, data=test_path, max_batches=2, out_predictions=preds)
    assert (given["split"], given["data"], given["examples"]) == ("data", test_path, 16) and "held_out" not in given
    assert [r["text"] for r in _lines(preds)] == [json.loads(line)["text"] for line in open(test_path)][:16]


def test_evaluation_leaves_the_callers_config_alone(tmp_path):
    train_path = _write_task(tmp_path / "train.jsonl", 60, 0)
    test_path = _write_task(tmp_path / "test.jsonl", 9, 2)
    workdir = str(tmp_path / "cls")
    train.train_and_evaluate(tiny_config(train_path, finetune_classify, train__steps=3, model__n_layers=1), workdir)
    config, _ = evaluation.load_run(workdir)
    before = config.to_dict()
    evaluation.eval_inputs(config, workdir, 8, data=test_path)
    assert config.to_dict() == before  # classify.val_path not set on it
    seen = []
    evaluation.evaluate_run(workdir, data=test_path, max_batches=1, overrides=seen.append)
    assert seen[0].to_dict() == before  # train.eval_batches not set on the config the caller was handed


def test_predictions_are_refused_for_text_modes(causal_run, tmp_path):
    workdir, _, _ = causal_run
    preds = tmp_path / "p.jsonl"
    with pytest.raises(ValueError, match=r"predictions are not defined for mode='causal'.*"
                                         r"\['classify', 'dpo', 'grpo', 'ppo', 'qa', 'sft'\]"):
        evaluate.evaluate(workdir, out_predictions=str(preds))
    assert not preds.exists()
    cli = subprocess.run([sys.executable, "scripts/evaluate.py", f"--workdir={workdir}", f"--out_predictions={preds}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 1 and "predictions are not defined for mode='causal'" in cli.stderr and not preds.exists()


def test_sft_reports_conversations_and_how_many_problems_were_scored(tmp_path):
    tr, va = _copy_task(tmp_path / "train.jsonl", 40, 0), _copy_task(tmp_path / "val.jsonl", 10, 1)
    workdir = str(tmp_path / "sft")
    train.train_and_evaluate(tiny_config(tr, sft_config, sft__val_path=va, data__seq_len=64, sft__eval_generate=4,
                                         train__steps=3, model__n_layers=1), workdir)
    preds = str(tmp_path / "preds.jsonl")
    out = evaluate.evaluate(workdir, out_predictions=preds)
    assert (out["data"], out["examples"], out["example_unit"]) == (va, 10, "conversations")  # not packed rows
    assert (out["exact_match_scored"], out["exact_match_of"], out["exact_match_unit"]) == (4, 10, "problems")
    rows = _lines(preds)
    assert len(rows) == 4 and np.mean([r["correct"] for r in rows]) == pytest.approx(out["eval/exact_match"])
    first = json.loads(open(va).readline())
    assert rows[0]["prompt"] == first["messages"][:1] and rows[0]["reference"] == first["messages"][1]["content"]
    assert rows[0]["kind"] == "copy" and isinstance(rows[0]["prediction"], str)
    os.remove(tr)  # a file of its own to score: the training file is not read
    bigger = evaluate.evaluate(workdir, data=va, config_overrides={"sft.eval_generate": "20"})
    assert (bigger["split"], bigger["exact_match_scored"], bigger["exact_match_of"]) == ("data", 10, 10)
    with pytest.raises(ValueError, match=r"sft.eval_generate=0 generates no answers"):
        evaluate.evaluate(workdir, out_predictions=preds, config_overrides={"sft.eval_generate": "0"})


def test_qa_predictions_explain_exact_match_and_f1(tmp_path):
    train_path = qa_write_task(tmp_path / "train.jsonl", 80, 0)
    workdir = str(tmp_path / "qa")
    train.train_and_evaluate(tiny_config(train_path, finetune_qa, train__steps=3, model__n_layers=1), workdir)
    preds = str(tmp_path / "preds.jsonl")
    out = evaluate.evaluate(workdir, out_predictions=preds, max_batches=1)  # span metrics cover every question
    assert (out["data"], out["example_unit"]) == (train_path, "windows") and out["held_out"].startswith("held out")
    rows = _lines(preds)
    assert len(rows) == out["exact_match_scored"] == out["exact_match_of"] and out["exact_match_unit"] == "questions"
    assert 100 * np.mean([r["exact_match"] for r in rows]) == pytest.approx(out["eval/exact_match"])
    assert 100 * np.mean([r["f1"] for r in rows]) == pytest.approx(out["eval/f1"])
    assert set(rows[0]) == {"id", "question", "prediction", "answers", "exact_match", "f1"}
    # a test file, with the training file gone: scored all, the training data not read
    test_path = qa_write_task(tmp_path / "test.jsonl", 12, 3)
    os.remove(train_path)
    given = evaluate.evaluate(workdir, data=test_path)
    assert (given["data"], given["exact_match_of"]) == (test_path, 12) and "held_out" not in given


def test_the_scored_data_is_each_modes_validation_file():
    """"data" names the file the eval set came from: the mode's own validation field (reward / dpo read
    pref.val_path, grpo / ppo rl.val_path; they were reported as a hash share of data.path)."""
    from configs import dpo, grpo, ppo, reward
    for module, field in ((reward, "pref"), (dpo, "pref"), (grpo, "rl"), (ppo, "rl"), (finetune_classify, "classify")):
        c = module.get_config()
        c[field].val_path = "given/val.jsonl"
        assert evaluation.scored_data(c, "") == {"data": "given/val.jsonl"}, c.mode
        c[field].val_path = ""
        assert evaluation.scored_data(c, "")["held_out"].startswith("held out from data.path"), c.mode

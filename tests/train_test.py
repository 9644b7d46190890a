"""End to end: train_and_evaluate learns, resumes exactly, and refuses bad input clearly."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

import checkpoint
import resilience
import train
from configs import dpo, finetune_classify, finetune_qa, pretrain_causal, pretrain_mlm, reward, sft
from metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return restored


def test_smoke_run_lowers_loss(corpus_dir, tmp_path):
    config = tiny_config(corpus_dir, train__steps=30, train__log_every=5, train__eval_every=15, optim__lr=3e-3)
    out = train.train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert rows[0]["train/loss"] > 5.0  # ~ln(267) at init
    assert evals[-1] < rows[0]["train/loss"] - 1.0 and evals[-1] < evals[0]
    since = [r["perf/since_start_s"] for r in rows if "eval/loss" in r]  # wall time to each eval result
    assert len(since) == len(evals) and 0 < since[0] < since[-1]
    assert out["step"] == 30 and np.isfinite(out["eval/perplexity"])
    assert os.path.exists(tmp_path / "tokenizer.json")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "30"


def _classification_jsonl(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": "".join(rng.choice(list("abcdefgh"), 12)), "label": f"c{i % 3}"}) + "\n")
    return str(path)


def _chat_jsonl(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice(list("abcdefgh"), int(rng.integers(2, 9))))
            f.write(json.dumps({"prompt": f"sort {w}", "response": "".join(sorted(w))}) + "\n")
    return str(path)


def _pref_jsonl(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = "".join(rng.choice(list("abcdefgh"), int(rng.integers(2, 9)), replace=False))
            good = "".join(sorted(w))
            f.write(json.dumps({"prompt": f"sort {w}", "chosen": good, "rejected": good[::-1]}) + "\n")
    return str(path)


def _qa_jsonl(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            context = " ".join(rng.choice(["ab", "cd", "ef", "gh"], 30)) + f" key {i}"
            f.write(json.dumps({"id": str(i), "question": "key?", "context": context,
                                "answers": [{"text": str(i), "answer_start": len(context) - len(str(i))}]}) + "\n")
    return str(path)


@pytest.mark.parametrize("mode", ["causal", "mlm", "classify", "qa", "sft", "sft_lora", "reward", "dpo"])
def test_resume_is_exact(corpus_dir, tmp_path, mode):
    module = {"causal": pretrain_causal, "mlm": pretrain_mlm, "classify": finetune_classify, "qa": finetune_qa,
              "sft": sft, "sft_lora": sft, "reward": reward, "dpo": dpo}[mode]
    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    kw = dict(train__steps=6, train__log_every=1, train__eval_every=100, train__checkpoint_every=100,
              model__dropout=0.1)
    if mode == "classify":
        corpus_dir = _classification_jsonl(tmp_path / "train.jsonl", 64, 0)
        kw["classify__val_path"] = _classification_jsonl(tmp_path / "val.jsonl", 16, 1)
    if mode == "qa":
        corpus_dir = _qa_jsonl(tmp_path / "train.jsonl", 32, 0)
        kw["qa__val_path"] = _qa_jsonl(tmp_path / "val.jsonl", 8, 1)
    if mode.startswith("sft"):  # data.seq_len: common.tiny's, shorter than the :tiny variant's (the tasks' 128)
        corpus_dir = _chat_jsonl(tmp_path / "train.jsonl", 96, 0)
        kw.update(sft__val_path=_chat_jsonl(tmp_path / "val.jsonl", 16, 1), sft__eval_generate=4, data__seq_len=32)
        if mode == "sft_lora":
            kw.update(lora__rank=2)
    if mode in ("reward", "dpo"):  # their :tiny configs: no init_from (dpo: SimPO, reference-free)
        corpus_dir = _pref_jsonl(tmp_path / "train.jsonl", 64, 0)
        kw.update(pref__val_path=_pref_jsonl(tmp_path / "val.jsonl", 16, 1), data__seq_len=32)
    train.train_and_evaluate(tiny_config(corpus_dir, module, **kw), straight)
    train.train_and_evaluate(tiny_config(corpus_dir, module, train__stop_after=3, **kw), stopped)
    assert sorted(os.listdir(os.path.join(stopped, "checkpoints"))) == ["3"]
    train.train_and_evaluate(tiny_config(corpus_dir, module, **kw), stopped)  # resumes at 3
    a, b = _params(straight, 6), _params(stopped, 6)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)
    # identical batches: identical per-step losses, and the same data-iterator position
    la = {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(straight, "metrics.jsonl")) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(stopped, "metrics.jsonl")) if "train/loss" in r}
    assert la == lb and sorted(la) == [1, 2, 3, 4, 5, 6]
    it_a = open(os.path.join(straight, "checkpoints", "6", "data", os.listdir(
        os.path.join(straight, "checkpoints", "6", "data"))[0])).read()
    it_b = open(os.path.join(stopped, "checkpoints", "6", "data", os.listdir(
        os.path.join(stopped, "checkpoints", "6", "data"))[0])).read()
    assert it_a == it_b


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_incompatible_checkpoint_names_fields(corpus_dir, tmp_path):
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3), str(tmp_path))
    with pytest.raises(checkpoint.IncompatibleCheckpointError) as e:
        train.train_and_evaluate(tiny_config(corpus_dir, train__steps=4, model__d_model=64, data__seq_len=16),
                                 str(tmp_path))
    assert "model.d_model: 32 -> 64" in str(e.value) and "data.seq_len: 32 -> 16" in str(e.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # nothing overwritten
    # harmless changes (more steps, another lr) resume fine
    out = train.train_and_evaluate(tiny_config(corpus_dir, train__steps=4, optim__lr=5e-4), str(tmp_path))
    assert out["step"] == 4


def test_nan_loss_halts_with_step_range(corpus_dir, tmp_path):
    config = tiny_config(corpus_dir, train__steps=6, train__log_every=1, optim__lr=1e30, optim__clip_norm=0.0,
                         optim__warmup_steps=0, optim__schedule="constant", train__on_nonfinite="halt")
    with pytest.raises(resilience.NonFiniteLossError, match=r"non-finite within steps \[\d+, \d+\]"):
        train.train_and_evaluate(config, str(tmp_path))


def test_bad_inputs_named(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        train.train_and_evaluate(tiny_config(str(tmp_path / "does-not-exist")), str(tmp_path / "w1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="no usable text"):
        train.train_and_evaluate(tiny_config(str(empty)), str(tmp_path / "w2"))
    assert not os.path.exists(tmp_path / "w2")  # the failed start's own workdir is not left behind
    (tmp_path / "mine").mkdir()  # ... but a directory the user made stays, whatever it holds
    with pytest.raises(ValueError, match="no usable text"):
        train.train_and_evaluate(tiny_config(str(empty)), str(tmp_path / "mine"))
    assert os.path.isdir(tmp_path / "mine")
    with pytest.raises(ValueError, match="data.batch_size / optim.grad_accum_steps=6 is not divisible by 8"):
        train.train_and_evaluate(tiny_config(corpus_dir, data__batch_size=6), str(tmp_path / "w3"))
    with pytest.raises(ValueError, match="needs 3 devices but 8"):
        train.train_and_evaluate(tiny_config(corpus_dir, mesh__data=3), str(tmp_path / "w4"))
    with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
        train.train_and_evaluate(tiny_config(corpus_dir, mesh__fsdp=3), str(tmp_path / "w4"))
    assert not os.path.exists(tmp_path / "w3") and not os.path.exists(tmp_path / "w4")  # refused before mkdir
    # a workdir inside the data directory: on resume its own files would be read as training text
    data_dir = tmp_path / "corpus"
    shutil.copytree(corpus_dir, data_dir)
    with pytest.raises(ValueError, match=r"--workdir='.*corpus/runs/a' is inside data.path='.*corpus'"):
        train.train_and_evaluate(tiny_config(str(data_dir)), str(data_dir / "runs" / "a"))
    assert not os.path.exists(data_dir / "runs")
    with pytest.raises(ValueError, match=r"data.path='gs://bucket/data' is a URL.*mount the bucket"):
        train.train_and_evaluate(tiny_config("gs://bucket/data"), str(tmp_path / "w6"))
    assert not os.path.exists(tmp_path / "w6")
    for field, value in (("data__seq_len", 0), ("data__batch_size", -1), ("train__steps", 0), ("train__eval_every", 0),
                         ("train__log_every", -1), ("train__checkpoint_every", 0), ("train__keep_checkpoints", -1)):
        with pytest.raises(ValueError, match=rf"{field.replace('__', '.')}={value} must be a positive integer"):
            train.train_and_evaluate(tiny_config(corpus_dir, **{field: value}), str(tmp_path / "w5"))
    nan = float("nan")  # each of these was accepted (NaN weights or updates, a silent default) or a library's error
    for field, value, message in (("model__dropout", 1.0, r"model.dropout=1.0 must be in \[0, 1\)"),
                                  ("optim__clip_norm", -1.0, r"optim.clip_norm=-1.0 must be >= 0"),
                                  ("train__eval_batches", -1, r"train.eval_batches=-1 must be an integer >= 0"),
                                  ("train__max_nonfinite", -1, r"train.max_nonfinite=-1 must be an integer >= 0"),
                                  ("train__rollback_lr_factor", nan, r"train.rollback_lr_factor=nan must be a finite"),
                                  ("train__memory_limit_gb", nan, r"train.memory_limit_gb=nan must be a finite"),
                                  ("model__norm_eps", -1.0, r"model.norm_eps=-1.0 must be a finite value > 0"),
                                  ("model__init_std", nan, r"model.init_std=nan must be a finite value > 0"),
                                  ("model__rope_theta", nan, r"model.rope_theta=nan must be a finite value > 0"),
                                  ("model__head_dim", -1, r"model.head_dim=-1 must be >= 0"),
                                  ("model__vocab_multiple", 0, r"model.vocab_multiple=0 must be positive"),
                                  ("optim__b1", nan, r"optim.b1=nan must be in \[0, 1\)"),
                                  ("optim__b2", -1.0, r"optim.b2=-1.0 must be in \[0, 1\)"),
                                  ("optim__eps", nan, r"optim.eps=nan must be a finite value >= 0"),
                                  ("lora__rank", -1, r"lora.rank=-1 must be >= 0")):
        with pytest.raises(ValueError, match=message):
            train.train_and_evaluate(tiny_config(corpus_dir, **{field: value}), str(tmp_path / "w5"))
    assert not os.path.exists(tmp_path / "w5")


def test_a_failed_start_leaves_no_tokenizer_for_the_next_run(corpus_dir, tmp_path):
    """A start that fails after building its tokenizer (here: too little data for one window) in a workdir
    it did not create (one it creates is removed) leaves tokenizer.json behind; the next run in that
    workdir, with no checkpoint to resume, builds its own from its data instead of reusing that one (an
    8-character vocabulary: most of its text <unk>)."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world\n")
    workdir = str(tmp_path / "run")
    os.mkdir(workdir)
    with pytest.raises(ValueError, match="windows"):
        train.train_and_evaluate(tiny_config(str(tiny), data__split="tail", data__tokenizer="char"), workdir)
    assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
    train.train_and_evaluate(tiny_config(corpus_dir, data__tokenizer="char", train__steps=3), workdir)
    chars = json.load(open(os.path.join(workdir, "tokenizer.json")))["chars"]
    assert "{" in chars and "Q" in chars and len(chars) > 60


def test_cli_overrides_and_unknown_key(tmp_path):
    base = [sys.executable, "train.py", "--config=configs/pretrain_causal.py:tiny", f"--workdir={tmp_path}"]
    bad = subprocess.run(base + ["--config.optim.lrr=0.1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "train.py: error: a --config.* override names a field that does not exist: 'lrr' "
        'Did you mean "lr" instead of "lrr"?']  # one line, no traceback
    # a config argument the file refuses, and a config file that does not exist: one line each, nothing written
    for config, line in (("configs/pretrain_causal.py:huge", "train.py: error: config arg 'huge': expected nothing, "
                                                             "'tiny' or a size in "),
                         ("configs/pretrain_casual.py", f"train.py: error: --config=configs/pretrain_casual.py: no "
                                                        f"config file 'configs/pretrain_casual.py' in {ROOT}")):
        bad = subprocess.run([sys.executable, "train.py", f"--config={config}", f"--workdir={tmp_path}/w"], cwd=ROOT,
                             capture_output=True, text=True)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert bad.stderr.startswith(line) and not os.path.exists(tmp_path / "w")

"""The run harness and the mode records: warm starts keep the source run's tokenizer, a dropped update
does not count as a step, rollback with no checkpoint says what it does, config paths are named before
anything is written, the console shows each mode's headline metrics."""

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

import checkpoint
import inputs
import modes
import optim
import overrides
import train
from configs import common, finetune_classify, pretrain_mlm, sft
from data import sources
from data.tokenizer import CharTokenizer, load_tokenizer, save_tokenizer
from metrics import Progress, read_jsonl
from resilience_test import _Poison, _state


def _corpus(path, alphabet: str, seed: int) -> str:
    """A char corpus over `alphabet`: 12 documents of random words."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(12):
        words = ["".join(rng.choice(list(alphabet), size=int(rng.integers(2, 7)))) for _ in range(120)]
        with open(os.path.join(path, f"doc{i}.txt"), "w") as f:
            f.write(" ".join(words) + "\n")
    return str(path)


def test_validation_characters_a_char_vocabulary_lacks_are_counted(tmp_path, caplog):
    """The char vocabulary comes from the training split: characters only the validation split has are
    <unk> there, and the log says how many (they were scored silently)."""
    src = _corpus(tmp_path / "a", "abcdefghij", 0)
    with open(os.path.join(src, "doc0.txt"), "a") as f:
        f.write("αβγδ" * 5 + "\n")  # the end of a document: 'tail' holds it out for validation
    config = tiny_config(src, data__tokenizer="char", data__split="tail")
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        os.makedirs(tmp_path / "run")
        tok, train_stream, val = inputs.prepare_data(config, str(tmp_path / "run"))
    # the 20 Greek letters, and every newline: 'tail' holds out the end of each document, its newline too
    unknown = int(np.count_nonzero(val.tokens == tok.special_id("<unk>")))
    assert unknown == 20 + 13
    assert f"{unknown} of {len(val)} validation tokens" in caplog.text and "training tokens" not in caplog.text


def test_warm_start_keeps_the_source_runs_tokenizer(tmp_path, caplog):
    # two char vocabularies that differ but pad to the same 64 embedding rows
    a = _corpus(tmp_path / "a", "abcdefghij", 0)
    b = _corpus(tmp_path / "b", "klmnopqrst", 1)
    src = str(tmp_path / "src")
    train.train_and_evaluate(tiny_config(a, data__tokenizer="char", train__steps=3), src)
    tok_a = load_tokenizer(os.path.join(src, "tokenizer.json"))
    assert CharTokenizer.from_texts(["klmnopqrst \n"]).vocab_size <= 64 and tok_a.vocab_size <= 64
    run = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="lmstack"):
        train.train_and_evaluate(tiny_config(b, data__tokenizer="char", train__steps=3, init_from=src), run)
    assert load_tokenizer(os.path.join(run, "tokenizer.json")).to_json() == tok_a.to_json()
    assert "tokenizer: init_from's 'char'" in caplog.text
    assert "are <unk>" in caplog.text  # corpus b's characters are not in the source's vocabulary: said
    # a config asking for another tokenizer is refused, naming both; nothing is trained
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"data.tokenizer='byte'.*'char' \(\d+ ids\)"):
        train.train_and_evaluate(tiny_config(b, train__steps=3, init_from=src), str(tmp_path / "byte"))
    assert not os.path.exists(tmp_path / "byte" / "checkpoints")


def test_prepared_dataset_with_another_tokenizer_than_the_source_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_tokenizer(CharTokenizer("abc"), str(src / "tokenizer.json"))
    config = common.base()
    config.init_from, config.data.path = str(src), "prepared-dir"
    (tmp_path / "w").mkdir()
    (tmp_path / "w2").mkdir()
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"prepared dataset.*'char' \(14 ids\).*'char'"):
        inputs.run_tokenizer(config, str(tmp_path / "w"), data_tok=CharTokenizer("abd"))
    assert inputs.run_tokenizer(config, str(tmp_path / "w"), data_tok=CharTokenizer("abc")).chars == "abc"
    config.data.tokenizer = "char"
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="has no tokenizer.json"):
        config.init_from = str(tmp_path)
        inputs.run_tokenizer(config, str(tmp_path / "w2"), texts=["x"])


def _find(tree, name):
    """Every value under a dict key `name` in a restored (nested dict / list) optimizer state."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(getattr(k, "key", None) == name for k in path):
            found.append(int(np.asarray(leaf)))
    return found


@pytest.mark.parametrize("accum", [1, 2])
def test_a_dropped_update_is_not_a_step(corpus_dir, tmp_path, monkeypatch, accum):
    monkeypatch.setattr(train.sharding, "put_batch", _Poison(3))
    config = tiny_config(corpus_dir, train__steps=6, train__log_every=1, train__eval_every=100,
                         data__batch_size=8 * accum, optim__grad_accum_steps=accum, optim__schedule="linear",
                         optim__warmup_steps=4)
    out = train.train_and_evaluate(config, str(tmp_path))
    assert out["step"] == 6 and out["train/dropped_updates"] == 1.0
    state = _state(str(tmp_path), 6)
    applied = 6 * accum - 1
    assert int(state["step"]) == applied
    if accum > 1:  # MultiSteps' own counters agree with state.step: the windows did not shift
        assert _find(state["opt_state"], "gradient_step") == [applied // accum]
        assert _find(state["opt_state"], "mini_step") == [applied % accum]
    # the logged LR is the one AdamW applied: the schedule at the number of updates applied before it
    schedule = optim.make_schedule(config.optim, config.train.steps)
    rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/lr" in r]
    last_call_applied_before = (applied - 1) // accum  # updates completed before the last micro-step
    assert rows[-1]["train/lr"] == pytest.approx(float(schedule(last_call_applied_before)))


def test_rollback_before_any_checkpoint_says_what_it_does(corpus_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train.sharding, "put_batch", _Poison(2))
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        out = train.train_and_evaluate(
            tiny_config(corpus_dir, train__steps=6, train__log_every=1, train__eval_every=100,
                        train__checkpoint_every=100, train__on_nonfinite="rollback", optim__schedule="constant",
                        optim__warmup_steps=0), str(tmp_path))
    assert "no checkpoint exists yet: continuing from the current parameters" in caplog.text
    assert out["step"] == 6 and out["train/lr"] == pytest.approx(0.5 * 2e-3)


def test_missing_input_names_the_config_field_and_writes_nothing(tmp_path):
    train_path = tmp_path / "train.jsonl"
    train_path.write_text(json.dumps({"prompt": "1+1", "response": "2"}) + "\n")
    config = tiny_config(str(train_path), sft)  # sft.val_path keeps its default 'datasets/tasks/val.jsonl'
    work = tmp_path / "run"
    with pytest.raises(sources.DataError, match=r"sft.val_path='datasets/tasks/val.jsonl' does not exist in .* \(set "
                                                r"--config.sft.val_path=PATH, or --config.sft.val_path= to hold out"):
        train.train_and_evaluate(config, str(work))
    assert not os.path.exists(work)
    with pytest.raises(sources.DataError, match=r"classify.val_path='nope.jsonl'"):
        train.train_and_evaluate(tiny_config(str(train_path), finetune_classify, classify__val_path="nope.jsonl"),
                                 str(work))
    with pytest.raises(sources.DataError, match=r"init_from='no-such-run'"):
        train.train_and_evaluate(tiny_config(str(train_path), sft, sft__val_path=str(train_path),
                                             init_from="no-such-run"), str(work))
    assert not os.path.exists(work)


def test_every_mode_record_names_real_config_fields():
    base = json.loads(common.base().to_json())
    fields = set(checkpoint.flatten(base))
    for name, mode in modes.MODES.items():
        for field in mode.all_must_match() + mode.paths:
            assert field in fields or (field.endswith(".") and any(f.startswith(field) for f in fields)), (name, field)
        for field in mode.all_added_defaults():
            assert field in fields, (name, field)
        for key in mode.headline:  # eval scalars, or (on-policy modes) the per-iteration rl/ scalars
            assert key.startswith("eval/") or (mode.on_policy and key.startswith("rl/")), (name, key)
        assert mode.example_unit in ("windows", "records", "conversations", "pairs", "prompts"), name
    with pytest.raises(ValueError, match=r"mode='kto': expected one of \['causal', 'classify', 'dpo', 'grpo', 'mlm', "
                                         r"'ppo', 'qa', 'reward', 'sft'\]"):
        modes.get(ml_collections.ConfigDict({"mode": "kto"}))


def test_console_shows_the_modes_headline_metrics(corpus_dir, tmp_path, caplog, capsys):
    line = Progress(10, 0, stream=io.StringIO(), headline=("eval/accuracy", "eval/macro_f1")).line(
        5, {"eval/loss": 0.5, "eval/accuracy": 0.75, "eval/macro_f1": 0.7})
    assert "val 0.5000" in line and "accuracy 0.7500" in line and "macro_f1 0.7000" in line
    with caplog.at_level(logging.INFO, logger="lmstack"):
        train.train_and_evaluate(tiny_config(corpus_dir, pretrain_mlm, train__steps=3, train__eval_every=3),
                                 str(tmp_path))
    printed = capsys.readouterr().out
    assert "mlm_accuracy" in printed and "nsp_accuracy" in printed
    assert "finished at step 3 | train/loss" in caplog.text and "eval/mlm_accuracy" in caplog.text


def test_warm_start_names_the_heads_it_leaves_behind(corpus_dir, tmp_path, caplog):
    mlm_dir = str(tmp_path / "mlm")
    one = dict(model__n_layers=1)  # both runs one layer: the heads left behind do not depend on depth
    train.train_and_evaluate(tiny_config(corpus_dir, pretrain_mlm, train__steps=3, **one), mlm_dir)
    records = tmp_path / "cls.jsonl"
    records.write_text("".join(json.dumps({"text": t, "label": t[0]}) + "\n" for t in ["ab", "ba", "aa", "bb"] * 8))
    with caplog.at_level(logging.INFO, logger="lmstack"):
        train.train_and_evaluate(tiny_config(str(records), finetune_classify, train__steps=3, init_from=mlm_dir,
                                             data__val_fraction=0.3, **one), str(tmp_path / "cls"))
    left = caplog.text.split("unused: ")[1].splitlines()[0]
    assert "mlm_head" in left and "nsp_head" in left and "params)" in left


def test_cli_config_error_is_one_message_not_a_traceback(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train_path = tmp_path / "train.jsonl"
    train_path.write_text(json.dumps({"prompt": "1+1", "response": "2"}) + "\n")
    work = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config=configs/sft.py:tiny", f"--workdir={work}",
           f"--config.data.path={train_path}"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "train.py: error: sft.val_path='datasets/tasks/val.jsonl' does not exist" in out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(work)
    empty = subprocess.run(cmd[:4] + ["--config.data.path="], cwd=root, capture_output=True, text=True)
    assert empty.returncode == 1 and "data.path is empty: mode='sft'" in empty.stderr


@pytest.mark.parametrize("script,args", [("merge_lora.py", ["--out=OUT"]), ("bits_per_byte.py", []),
                                         ("quantize.py", ["--out=OUT"])])
def test_scripts_say_a_missing_workdir_in_one_line(tmp_path, script, args):
    """Scripts run through overrides.run: a workdir that is not a run is one `script: error:` line naming it
    (merge_lora and bits_per_byte printed a traceback), and nothing is written to --out."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join("scripts", script), f"--workdir={tmp_path}/nothere",
                          *[a.replace("OUT", str(tmp_path / "out")) for a in args]],
                         cwd=root, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith(f"{script}: error: ") and "nothere" in out.stderr.splitlines()[0]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script", ["benchmark.py", "estimate_memory.py", "profile_step.py"])
def test_scripts_say_a_bad_config_value_in_one_line(script):
    """Every script runs through overrides.run: a config value the model refuses is one line naming it (these
    three printed a traceback), and a file without get_config() (a helper module) is named as not a config."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join("scripts", script), "--config=configs/pretrain_causal.py:tiny"]
    out = subprocess.run(cmd + ["--config.model.n_layers=0"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith(f"{script}: error: model.n_layers=0 must be positive"), out.stderr[-2000:]
    helper = subprocess.run(cmd[:2] + ["--config=configs/common.py"], cwd=root, capture_output=True, text=True)
    assert helper.returncode == 1 and helper.stderr.strip() == (
        f"{script}: error: --config=configs/common.py: the file has no get_config() function, so it is not a "
        f"config (common.py, presets.py and rl_common.py are helpers the configs import)")


def test_prepare_data_says_a_missing_source_in_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "scripts/prepare_data.py", f"--config=configs/data/files.py:{tmp_path}/none",
                          f"--out={tmp_path}/out"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"prepare_data.py: error: sources.files.path='{tmp_path}/none' does not exist", overrides.TRACEBACK_HINT]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script,flag,args", [("make_tasks.py", "--n_train=-5", ["--out=OUT"]),
                                              ("generate.py", "--num_samples=0", ["--workdir=OUT"]),
                                              ("make_classification_data.py", "--chars=0", ["--out=OUT"])])
def test_count_flags_are_bounded(tmp_path, script, flag, args):
    """A negative or zero count is refused by name when the flags are parsed, before anything is read or written
    (make_tasks --n_train=-5 wrote nothing and exited 0; --chars=0 failed inside range())."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join("scripts", script), flag,
                          *[a.replace("OUT", str(tmp_path / "out")) for a in args]], cwd=root, capture_output=True,
                         text=True)
    assert out.returncode == 1 and f"flag {flag}: " in out.stderr, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")


def test_preference_and_task_numbers_out_of_range_are_refused_by_name(tmp_path):
    """Each was accepted: a NaN loss term, an eval silently off, a NaN threshold that never fires."""
    import feedback_inputs
    from configs import dpo as dpo_config, reward as reward_config
    with pytest.raises(ValueError, match=r"dpo.simpo_gamma=nan must be a finite value >= 0"):
        feedback_inputs.check_dpo(tiny_config("unused", dpo_config, dpo__simpo_gamma=float("nan")))
    with pytest.raises(ValueError, match=r"reward.center_coef=-1.0 must be a finite value >= 0"):
        feedback_inputs.reward_inputs(tiny_config("unused", reward_config, reward__center_coef=-1.0), str(tmp_path), 2)
    import harness
    import task_inputs
    for section in ("sft", "pref", "rl"):  # -1 turned the exact-match eval off, silently
        with pytest.raises(ValueError, match=rf"{section}.eval_generate=-1 must be an integer >= 0"):
            harness._check_counts(tiny_config("unused", **{f"{section}__eval_generate": -1}))
    from configs import finetune_qa
    with pytest.raises(ValueError, match=r"qa.null_threshold=nan must be a finite number"):
        task_inputs.qa_inputs(tiny_config("unused", finetune_qa, qa__null_threshold=float("nan")), str(tmp_path), 2)


def test_a_failing_metric_close_does_not_replace_the_runs_error(corpus_dir, tmp_path, monkeypatch):
    """On a full disk the metric files' final flush fails too: the error that ended the run (e.g. the checkpoint
    write's, naming the disk) is the one raised; without an earlier error the close's own error is raised."""
    import harness
    import metrics

    def full(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(metrics.MetricWriter, "close", full)
    config = tiny_config(corpus_dir)
    with pytest.raises(ValueError, match="the run's own error"):
        with harness.open_run(config, str(tmp_path / "a")):
            raise ValueError("the run's own error")
    with pytest.raises(OSError, match="No space left"):
        with harness.open_run(config, str(tmp_path / "b")):
            pass


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed here")
def test_importing_the_metric_writers_does_not_import_torch():
    """tensorboardX would import PyTorch (~1 s at every start of train.py) where it is installed."""
    code = ("import sys, metrics; assert 'torch' not in sys.modules, 'torch imported'; "
            "import torch; print(torch.__name__)")  # and torch still imports afterwards
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "torch", p.stderr[-2000:]


def test_a_resume_on_changed_input_files_is_refused(corpus_dir, tmp_path):
    """A new run records its inputs' files and sizes; a resume after a file was added, removed or resized
    would continue the saved data position in another stream: refused naming the field; deleting the
    record accepts the change. Unchanged inputs resume as before."""
    import shutil
    import harness
    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    workdir = tmp_path / "run"
    config = tiny_config(str(data), train__steps=4, train__stop_after=2, train__eval_every=4)
    train.train_and_evaluate(config, str(workdir))
    record = json.loads((workdir / harness.DATA_FINGERPRINT).read_text())
    assert record["data.path"]["files"] == len(os.listdir(corpus_dir)) and record["data.path"]["digest"]
    assert harness.check_inputs_unchanged(config, str(workdir), resuming=True) is None  # unchanged: no record
    first = sorted(os.listdir(data))[0]
    with open(data / first, "a") as f:
        f.write("# one more line\n")
    with pytest.raises(ValueError, match=r"inputs changed since it started \(data\.path='.*data': "
                                         r"\d+ files, [\d,]+ bytes -> \d+ files, [\d,]+ bytes\).*data_fingerprint"):
        train.train_and_evaluate(tiny_config(str(data), train__steps=4, train__eval_every=4), str(workdir))
    (data / "new.txt").write_text("another document\n")
    with pytest.raises(ValueError, match=r"inputs changed"):
        harness.check_inputs_unchanged(config, str(workdir), resuming=True)
    os.remove(workdir / harness.DATA_FINGERPRINT)  # the documented way to accept the change
    assert harness.check_inputs_unchanged(config, str(workdir), resuming=True)["data.path"]["files"] == \
        record["data.path"]["files"] + 1

"""scripts/sweep.py: a grid of normal training runs, tables, the best trial, resume, failing trials."""

import csv
import json
import os
import shutil
import sys

import pytest
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402

GRID = "optim.lr=1e-3,1e-2;optim.warmup_steps=0,1"


def _config(corpus):
    return tiny_config(corpus, train__steps=2, train__eval_every=2, train__checkpoint_every=2, train__eval_batches=1,
                       optim__warmup_steps=1, model__n_layers=1)  # one layer: the trials are mostly compile time


@pytest.fixture(scope="module")
def swept(corpus_dir, tmp_path_factory):
    sweep_dir = str(tmp_path_factory.mktemp("sweep"))
    return sweep_dir, sweep.run_sweep(_config(corpus_dir), sweep_dir, GRID)


def _csv(sweep_dir):
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_grid_tables_and_best(swept):
    sweep_dir, out = swept
    rows = _csv(sweep_dir)
    assert [(float(r["optim.lr"]), int(r["optim.warmup_steps"])) for r in rows] == [
        (1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
    assert all(r["status"] == "ok" and r["step"] == "2" and float(r["wall_s"]) > 0 for r in rows)
    assert rows[0]["trial"] == "trial_00_lr0.001_warmup_steps0"
    losses = {r["trial"]: float(r["eval/loss"]) for r in rows}
    assert len(set(losses.values())) == 4  # the values really differ per trial
    best = min(losses, key=losses.get)
    assert json.load(open(os.path.join(sweep_dir, "best.json")))["trial"] == best == out["best"]["trial"]
    md = open(os.path.join(sweep_dir, "results.md")).read()
    assert md.count("| trial_0") == 4 and f"**Best**: {best}" in md
    for r in rows:  # each trial is a normal run in its own workdir
        assert sorted(os.listdir(os.path.join(sweep_dir, r["trial"], "checkpoints"))) == ["2"]


def test_rerun_skips_finished_trials(swept, corpus_dir, monkeypatch):
    sweep_dir, first = swept
    calls = []

    def stub(config, workdir):
        calls.append(os.path.basename(workdir))
        raise RuntimeError("stub: no training here,\nand the detail on the next line")
    monkeypatch.setattr(sweep.train, "train_and_evaluate", stub)
    again = sweep.run_sweep(_config(corpus_dir), sweep_dir, GRID)
    assert calls == [] and [r.get("reused") for r in again["rows"]] == [True] * 4
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in first["rows"]]
    # a changed base config is not "finished": its trials run again (here the stub fails them)
    changed = _config(corpus_dir)
    changed.train.steps = 3
    with pytest.raises(RuntimeError, match="all 2 trials failed; first error: RuntimeError: stub: no training "
                                           "here, and the detail on the next line"):  # one line, nothing lost
        sweep.run_sweep(changed, sweep_dir, "optim.lr=1e-3;optim.warmup_steps=0,1")
    assert calls == ["trial_00_lr0.001_warmup_steps0", "trial_01_lr0.001_warmup_steps1"]


def test_failing_trial_recorded_and_all_failing_raises(swept, corpus_dir, tmp_path):
    sweep_dir, _ = swept
    done = "trial_00_lr0.001_warmup_steps0"  # finished in `swept`: reused here, so only the failure is new
    shutil.copytree(os.path.join(sweep_dir, done), tmp_path / done)
    out = sweep.run_sweep(_config(corpus_dir), str(tmp_path), "optim.lr=1e-3;optim.warmup_steps=0,2")
    ok, failed = out["rows"]
    assert ok["trial"] == done and ok.get("reused") and out["best"]["trial"] == done
    assert failed["status"] == "failed" and "optim.warmup_steps=2 must be < train.steps=2" in failed["error"]
    rows = _csv(str(tmp_path))
    assert [r["status"] for r in rows] == ["ok", "failed"] and "warmup_steps=2" in rows[1]["error"]
    with pytest.raises(RuntimeError, match="all 1 trials failed; first error: ValueError: data.batch_size"):
        sweep.run_sweep(_config(corpus_dir), str(tmp_path / "bad"), "data.batch_size=12")
    assert "| failed |" in open(tmp_path / "bad" / "results.md").read()


def test_grid_errors_name_the_field(corpus_dir, tmp_path):
    config = _config(corpus_dir)
    with pytest.raises(ValueError, match="config field 'optim.lrr' does not exist"):
        sweep.parse_grid(config, "optim.lrr=1e-3")
    with pytest.raises(ValueError, match="config field 'train.steps' .*cannot use 'ten'"):
        sweep.parse_grid(config, "train.steps=5,ten")
    with pytest.raises(ValueError, match="expected FIELD=V1,V2"):
        sweep.parse_grid(config, "optim.lr")
    assert sweep.parse_grid(config, "model.causal=false; train.steps=1e2") == [("model.causal", [False]),
                                                                              ("train.steps", [100])]
    picked = sweep.trial_list(sweep.parse_grid(config, "optim.lr=1,2,3;train.steps=1,2"), n_random=3, seed=5)
    assert len(picked) == 3 and picked == sweep.trial_list(
        sweep.parse_grid(config, "optim.lr=1,2,3;train.steps=1,2"), n_random=3, seed=5)
    assert len({i for i, _ in picked}) == 3


def test_a_missing_config_file_is_named_before_the_grid(tmp_path):
    """sweep.py reads the grid against the config: a mistyped --config used to surface as 'config field
    optim.lr does not exist (the config has: no fields)'; it is one line naming the file, nothing written."""
    import subprocess
    bad = subprocess.run([sys.executable, "scripts/sweep.py", "--config=configs/pretrain_casual.py:tiny",
                          f"--workdir={tmp_path}/sweep", "--grid=optim.lr=1e-3"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"sweep.py: error: --config=configs/pretrain_casual.py:tiny: no config file 'configs/pretrain_casual.py' "
        f"in {ROOT}"]
    assert not os.path.exists(tmp_path / "sweep")

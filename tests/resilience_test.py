"""Reliability: preemption, kill -9 mid-checkpoint, non-finite updates, full disk, determinism."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

import checkpoint
import resilience
import sharding
import train
from metrics import read_jsonl, read_tb_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, corpus, *extra):
    return [sys.executable, "train.py", "--config=configs/pretrain_causal.py:tiny", f"--workdir={workdir}",
            f"--config.data.path={corpus}", "--config.data.val_fraction=0.2", *extra]


def _wait_for_step(workdir, step, proc, timeout=120):
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        if os.path.exists(path) and any(r["step"] >= step for r in read_jsonl(path)):
            return
        time.sleep(0.05)
    raise AssertionError("trainer made no progress")


def _state(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_checkpoints_and_exits_zero(corpus_dir, tmp_path, sig):
    cache = f"--config.train.compile_cache_dir={tmp_path / 'xla_cache'}"  # the resume loads the compiled steps
    proc = subprocess.Popen(_cli(tmp_path, corpus_dir, "--config.train.steps=100000", "--config.train.log_every=1",
                                 "--config.train.checkpoint_every=100000", cache),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(str(tmp_path), 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"{signal.Signals(sig).name} received: stopped after step" in err
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert len(saved) == 1 and saved[0] >= 3
    resumed = subprocess.run(_cli(tmp_path, corpus_dir, "--config.train.steps=100000",
                                  f"--config.train.stop_after={saved[0] + 2}", cache),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and f"at step {saved[0]}" in resumed.stderr


def test_kill_9_during_async_checkpoints_resumes_exactly(corpus_dir, tmp_path):
    steps_total = 36  # killed after step >= 12 with a dozen or more steps still to go (checkpoints every step)
    cache = tmp_path / "xla_cache"  # the resumed run loads the victim's compiled steps: still exact
    args = ["--config.train.steps=%d" % steps_total, "--config.train.checkpoint_every=1",
            "--config.train.keep_checkpoints=2", "--config.train.log_every=1", "--config.train.eval_every=100000",
            f"--config.train.compile_cache_dir={cache}"]
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_cli(victim, corpus_dir, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_step(str(victim), 12, proc)
    time.sleep(np.random.default_rng().uniform(0.0, 0.3))
    proc.kill()  # SIGKILL: no chance to finish a write
    proc.wait()
    assert max(int(d) for d in os.listdir(victim / "checkpoints") if d.isdigit()) < steps_total  # killed mid-run
    again = subprocess.run(_cli(victim, corpus_dir, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr
    assert len(os.listdir(cache)) >= 2  # train and eval steps at least
    straight = tmp_path / "straight"  # uninterrupted, in-process (same 8-device mesh as the subprocess)
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=steps_total, train__checkpoint_every=1000,
                                         train__log_every=1, train__eval_every=100000), str(straight))
    a, b = _state(str(victim), steps_total), _state(str(straight), steps_total)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not [d for d in os.listdir(victim / "checkpoints") if "tmp" in d]


class _Poison:
    """Replaces put_batch: the n-th training batch gets NaN weights (loss becomes NaN)."""

    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, sharding.put_batch

    def __call__(self, batch, sh):
        if batch["inputs"].shape[0] and "weights" in batch and self.calls >= 0:
            self.calls += 1
            if self.calls == self.n:
                batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
        return self.real(batch, sh)


def test_nonfinite_skip_drops_the_update(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train.sharding, "put_batch", _Poison(4))
    out = train.train_and_evaluate(tiny_config(corpus_dir, train__steps=8, train__log_every=1,
                                               train__eval_every=100), str(tmp_path))
    assert out["train/dropped_updates"] == 1.0 and out["step"] == 8
    state = _state(str(tmp_path), 8)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert np.isnan([r["train/loss"] for r in rows if r["step"] == 4 and "train/loss" in r][0])


def test_nonfinite_halt_names_the_step_range(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train.sharding, "put_batch", _Poison(5))
    with pytest.raises(resilience.NonFiniteLossError, match=r"within steps \[5, 6\].*last at step 5"):
        train.train_and_evaluate(tiny_config(corpus_dir, train__steps=12, train__log_every=2,
                                             train__eval_every=100, train__on_nonfinite="halt"), str(tmp_path))
    # what was logged before the halt is on disk: JSONL and the TensorBoard events (writer closed on the way out)
    tb = read_tb_scalars(str(tmp_path / "tb"))
    assert [step for step, _ in tb["train/loss"]] == [2, 4]
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in r] == [2, 4]


def test_nonfinite_rollback_restores_and_lowers_lr(corpus_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train.sharding, "put_batch", _Poison(6))
    out = train.train_and_evaluate(
        tiny_config(corpus_dir, train__steps=10, train__log_every=1, train__eval_every=100,
                    train__checkpoint_every=4, train__on_nonfinite="rollback", optim__schedule="constant",
                    optim__warmup_steps=0), str(tmp_path))
    assert out["step"] == 10
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    steps_logged = [r["step"] for r in rows if "train/lr" in r]
    assert steps_logged.count(5) == 2  # step 5 ran again after rolling back to 4
    assert [r for r in rows if "train/lr" in r][-1]["train/lr"] == pytest.approx(0.5 * 1e-3 * 2)  # lr 2e-3 (default config) x 0.5


def test_disk_full_is_a_clear_error_and_keeps_checkpoints(corpus_dir, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        config = tiny_config(corpus_dir, train__steps=200, train__checkpoint_every=1, train__keep_checkpoints=100,
                             train__eval_every=1000, train__log_every=50)
        with pytest.raises(checkpoint.CheckpointWriteError, match=r"No space left on device.*earlier checkpoints intact"):
            train.train_and_evaluate(config, str(mnt / "run"))
        mngr = ocp.CheckpointManager(str(mnt / "run" / "checkpoints"))
        good = mngr.latest_step()
        assert good is not None and good >= 1
        mngr.restore(good, args=ocp.args.Composite(state=ocp.args.StandardRestore()))  # still readable
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_unwritable_workdir_named(corpus_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(resilience.WorkdirError, match="a_file/run.*not a writable directory"):
        train.train_and_evaluate(tiny_config(corpus_dir), str(blocker / "run"))
    with pytest.raises(resilience.WorkdirError, match="train.compile_cache_dir '.*a_file/cache' is not a writable"):
        train.train_and_evaluate(tiny_config(corpus_dir, train__compile_cache_dir=str(blocker / "cache")),
                                 str(tmp_path / "run"))
    # a URL would have had Orbax write to the bucket and everything else to a local directory named 'gs:'
    with pytest.raises(resilience.WorkdirError, match="--workdir='gs://bucket/run' is a URL.*gcsfuse"):
        train.train_and_evaluate(tiny_config(corpus_dir), "gs://bucket/run")
    assert not os.path.exists("gs:") and not os.path.exists(tmp_path / "run")


def test_same_seed_same_metrics(corpus_dir, tmp_path):
    kw = dict(train__steps=6, train__log_every=1, model__dropout=0.1)
    train.train_and_evaluate(tiny_config(corpus_dir, **kw), str(tmp_path / "a"))
    train.train_and_evaluate(tiny_config(corpus_dir, **kw), str(tmp_path / "b"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # noqa: E731
    a = strip(read_jsonl(str(tmp_path / "a" / "metrics.jsonl")))
    b = strip(read_jsonl(str(tmp_path / "b" / "metrics.jsonl")))
    assert a == b and len(a) >= 6
    c = strip(read_jsonl(str(tmp_path / "a" / "metrics.jsonl")))
    train.train_and_evaluate(tiny_config(corpus_dir, seed=1, **kw), str(tmp_path / "c"))
    assert strip(read_jsonl(str(tmp_path / "c" / "metrics.jsonl"))) != c


def test_mode_change_is_incompatible(corpus_dir, tmp_path):
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3), str(tmp_path))
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="mode: 'causal' -> 'mlm'"):
        train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3, mode="mlm"), str(tmp_path))
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_one_run_at_a_time_in_a_workdir(corpus_dir, tmp_path):
    """A second run in a workdir another process holds is refused (flock on the directory: no file written);
    a run that fails releases its lock, so the next start in that workdir goes ahead."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    other = resilience.WorkdirLock(str(workdir))  # stands in for a run in another process: its own descriptor
    with pytest.raises(resilience.WorkdirError, match="is in use by another run"):
        train.train_and_evaluate(tiny_config(corpus_dir), str(workdir))
    other.release()
    assert os.listdir(workdir) == []
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world\n")
    with pytest.raises(ValueError, match="windows"):  # fails after taking the lock (while reading its data)
        train.train_and_evaluate(tiny_config(str(tiny), data__split="tail", data__tokenizer="char"), str(workdir))
    resilience.WorkdirLock(str(workdir)).release()  # free again

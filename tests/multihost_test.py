"""Multi-host training on one machine: two `train.py` processes joined by jax.distributed (127.0.0.1, gloo
collectives on CPU), 2 devices each, on a hybrid mesh (mesh.dcn_data=2: each process is one DCN group),
against one process with 4 devices on the same global mesh shape; then the 2-process checkpoint resumed
by one process on another mesh.

Slow-ish (about a minute: four train.py processes, each compiling its own steps). The subprocesses do
not inherit conftest's 8 fake devices: JAX_NUM_CPU_DEVICES sets each one's device count.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoint
import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP = 10, 8  # the 2-process run stops (with a checkpoint) at STOP; one process resumes it to STEPS


def _env(n_devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n_devices))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _args(corpus: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/pretrain_causal.py:tiny",
            f"--workdir={workdir}", f"--config.data.path={corpus}", "--config.data.val_fraction=0.2",
            "--config.train.async_checkpoint=False", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            *extra]


def _run(args: list[str], n_devices: int) -> None:
    p = subprocess.run(args, cwd=ROOT, env=_env(n_devices), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _two_processes(corpus: str, workdir: str, args=None) -> None:
    """Two processes of 2 devices (dcn data 2 x fsdp 2); `args(*extra)`: each one's command (default: _args with
    train.stop_after=STOP)."""
    import portpicker
    port = portpicker.pick_unused_port()
    args = args or (lambda *extra: _args(corpus, workdir, f"--config.train.stop_after={STOP}", *extra))
    procs = [subprocess.Popen(args("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2",
                                   f"--config.dist.coordinator_address=127.0.0.1:{port}",
                                   "--config.dist.num_processes=2", f"--config.dist.process_id={i}"),
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    errs = [err for (_, err), p in zip(outs, procs) if p.returncode != 0]
    if errs and all("jax.distributed.initialize(" in e and ("UNAVAILABLE" in e or "DEADLINE_EXCEEDED" in e)
                    for e in errs):
        pytest.skip(f"the distributed runtime could not start here: {errs[0][-500:]}")
    assert not errs, "\n----\n".join(e[-3000:] for e in errs)
    assert "process 1 of 2: 2 local devices, 4 in all" in outs[1][1]


def _losses(workdir: str) -> dict:
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {(r["step"], k): r[k] for r in rows for k in ("train/loss", "eval/loss") if k in r}


def _params(workdir: str, step: int) -> list[np.ndarray]:
    _, params, got = checkpoint.load_for_inference(workdir, step)
    assert got == step
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=rtol, atol=0)


def test_two_processes_match_one_and_resume_in_one(corpus_dir, tmp_path):
    two, ref = str(tmp_path / "two"), str(tmp_path / "ref")
    _two_processes(corpus_dir, two)
    _run(_args(corpus_dir, ref, "--config.mesh.data=2", "--config.mesh.fsdp=2"), 4)  # the same mesh, one process
    # the same global batches in the same row order on the same device layout: only the collectives'
    # transport differs (gloo across processes vs in-process). Measured: params bit-identical, a logged loss
    # 1 ulp off (its reduction's order); 1e-6 relative = a few f32 ulps, far below any real difference
    # (a step's loss change is ~1e-2)
    losses2, losses1 = _losses(two), _losses(ref)
    _close(losses2, {k: v for k, v in losses1.items() if k[0] <= STOP}, rtol=1e-6)
    assert len(losses2) == STOP + 2  # a train loss every step, an eval loss at 4 and 8
    assert sorted(os.listdir(os.path.join(two, "checkpoints", str(STOP), "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]  # grain: one iterator file per process
    for a, b in zip(_params(two, STOP), _params(ref, STOP)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    # one process, another mesh (fsdp=4 instead of dcn data 2 x fsdp 2) resumes the 2-process checkpoint: its
    # params, optimizer state and data position continue to the straight run's last steps
    _run(_args(corpus_dir, two, "--config.mesh.data=1", "--config.mesh.fsdp=4"), 4)
    _close({k: v for k, v in _losses(two).items() if k[0] > STOP},
           {k: v for k, v in losses1.items() if k[0] > STOP}, rtol=1e-5)
    for a, b in zip(_params(two, STEPS), _params(ref, STEPS)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---- RL (mode grpo): rollouts, rewards and advantages over the global batch on every process -------------
RL_STEPS, RL_STOP = 3, 2
# train.py with a dense programmatic reward a random tiny model can move ('say letters': the share of lowercase
# ASCII letters in the completion), registered in each subprocess before train.py reads its flags
_RL_MAIN = ("import sys; sys.path.insert(0, {root!r}); from absl import app; from rl import rewards; "
            "rewards.PROGRAMMATIC['letters'] = lambda text, answer, finish, n: "
            "sum('a' <= c <= 'z' for c in text) / max(len(text), 1); import train; app.run(train.main)")


def _rl_args(prompts: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", _RL_MAIN.format(root=ROOT), "--config=configs/grpo.py:tiny", f"--workdir={workdir}",
            f"--config.data.path={prompts}/train.jsonl", f"--config.rl.val_path={prompts}/val.jsonl",
            "--config.rl.rewards=('letters',)", "--config.rl.max_prompt_len=24", "--config.rl.kl_coef=0.05",
            "--config.optim.lr=3e-2", "--config.optim.schedule=constant", "--config.train.async_checkpoint=False",
            f"--config.train.steps={RL_STEPS}", *extra]


def _write_prompts(path) -> str:
    path.mkdir()
    for name, n, seed in (("train", 64, 0), ("val", 8, 1)):
        rng = np.random.default_rng(seed)
        with open(path / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": f"say x {''.join(rng.choice(list('abcdef'), 3))}", "answer": "x",
                                    "kind": "say"}) + "\n")
    return str(path)


def _rl_metrics(workdir: str) -> dict:
    keys = ("train/loss", "rl/pg_loss", "rl/reward_mean", "rl/kl", "rl/length_mean", "eval/exact_match")
    return {(r["step"], k): r[k] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            for k in keys if k in r}


def test_grpo_in_two_processes_matches_one_and_resumes(tmp_path):
    """GRPO (with the KL penalty's reference) in 2 processes x 2 devices: each process reads its block of the
    prompt iterator, the blocks are gathered, the rollouts run on the global mesh, every process computes the
    rewards and advantages of all rows. Against one process x 4 devices on the same mesh shape; then one
    process resumes the 2-process checkpoint (its per-process prompt iterator states) to the straight run's end."""
    prompts = _write_prompts(tmp_path / "prompts")
    two, ref = str(tmp_path / "two"), str(tmp_path / "ref")
    _two_processes("", two, lambda *extra: _rl_args(prompts, two, f"--config.train.stop_after={RL_STOP}", *extra))
    # the one-process runs share a compilation cache: the resume (same mesh, same programs) loads the reference
    # run's compiled rollout and update steps instead of compiling them again (JAX keys them on the program)
    cache = f"--config.train.compile_cache_dir={tmp_path / 'xla_cache'}"
    _run(_rl_args(prompts, ref, "--config.mesh.data=2", "--config.mesh.fsdp=2", cache), 4)
    # the same rows on the same device layout: only the collectives' transport (gloo across processes) orders
    # sums differently. Measured: the same sampled completions (rewards, lengths and KL equal), params within
    # 1.2e-7 absolute, pg_loss within 6e-6 relative after one update (Adam at lr 3e-2 amplifies an ulp); the
    # first step's loss is ~1e-8 (advantages sum to ~0), hence the absolute floor. A real difference (another
    # prompt, completion or row order) moves these by 1e-2 or more
    m2, m1 = _rl_metrics(two), _rl_metrics(ref)
    assert {k[0] for k in m2} == {1, 2} and (2, "eval/exact_match") in m2 and (1, "rl/kl") in m2
    _close_abs(m2, {k: v for k, v in m1.items() if k[0] <= RL_STOP})
    assert sorted(os.listdir(os.path.join(two, "checkpoints", str(RL_STOP), "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]  # the RL prompts' iterator, per process
    for a, b in zip(_params(two, RL_STOP), _params(ref, RL_STOP)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _run(_rl_args(prompts, two, "--config.mesh.data=2", "--config.mesh.fsdp=2", cache), 4)  # resumes at RL_STOP
    _close_abs({k: v for k, v in _rl_metrics(two).items() if k[0] > RL_STOP},
               {k: v for k, v in m1.items() if k[0] > RL_STOP})
    for a, b in zip(_params(two, RL_STEPS), _params(ref, RL_STEPS)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _close_abs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=1e-4, atol=1e-6)


def test_host_blocks_give_the_same_global_batches_for_any_process_count():
    """Per-host data: process p reads only block p of each global batch; stacked, the blocks are the one-process
    batches in the same row order, and every process's iterator state is the one-process state."""
    from data import pipeline
    stream = pipeline.TokenStream(np.arange(4000, dtype=np.int32) % 97, np.repeat(np.arange(1, 41, dtype=np.int32), 100))
    kw = dict(seq_len=16, global_batch=8, seed=3)
    for count in (2, 4):
        its = [pipeline.train_iterator(stream, process_index=p, process_count=count, **kw) for p in range(count)]
        ref = pipeline.train_iterator(stream, **kw)
        for _ in range(30):  # past an epoch (249 windows / 8 rows)
            parts = [next(it) for it in its]
            want = next(ref)
            for k in want:
                np.testing.assert_array_equal(np.concatenate([b[k] for b in parts]), want[k])
        assert all(it.get_state() == ref.get_state() for it in its)
    with pytest.raises(Exception, match="not divisible by 3 processes"):
        pipeline.train_iterator(stream, process_index=0, process_count=3, **kw)


def _fake(tmp_path, name: str) -> dict:
    """PATH with a `name` command that records its arguments (one per line) in tmp_path/name.args."""
    exe = tmp_path / name
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / (name + ".args")}\n')
    exe.chmod(0o755)
    return dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")


def test_launch_scripts(tmp_path):
    for script in ("launch_tpu_vm.sh", "slurm.sbatch"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", script)], check=True)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch_tpu_vm.sh"), "my-tpu"], capture_output=True,
                       text=True)  # too few arguments: the usage, before any gcloud call
    assert p.returncode == 2 and "launch_tpu_vm.sh NAME ZONE --setup" in p.stderr
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch_tpu_vm.sh"), "my-tpu", "z", "--bogus"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr
    # what each script runs (gcloud and srun replaced by recorders)
    env = dict(_fake(tmp_path, "gcloud"), WORKDIR="/mnt/b/run")
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch_tpu_vm.sh"), "my-tpu", "us-z", "configs/llama_1b.py:v4-8",
                    "--config.optim.lr=1e-4"], env=env, check=True, capture_output=True)
    args = (tmp_path / "gcloud.args").read_text().splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in args
    assert ("train.py --config=configs/llama_1b.py:v4-8 --workdir=/mnt/b/run --config.optim.lr=1e-4"
            in args[-1])
    env = dict(_fake(tmp_path, "srun"), SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="7")
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm.sbatch"), "--config.train.steps=5"], env=env,
                   check=True, cwd=ROOT)
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:2] == ["--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert args[3:] == ["train.py", "--config=configs/llama_1b.py:gpu8", "--workdir=runs/slurm-7", "--config.mesh.data=1",
                        "--config.mesh.fsdp=8", "--config.mesh.dcn_data=2", "--config.train.steps=5"]

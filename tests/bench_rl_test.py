"""scripts/bench_rl.py: lmstack and TRL (GRPOTrainer / DPOTrainer), each in its own process, run the same tiny
GPT-2 on the same token ids and report real token counts and per-round ratios (skipped without torch/TRL)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args: str) -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, "scripts/bench_rl.py", "--size=tiny", "--rounds=1", "--iters=1",
                          "--warmup=1", "--gap-s=0", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, XLA_FLAGS=""))  # one real CPU device, as a user's command runs
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("| ") and "round 0:" in out.stderr
    return json.loads(lines[-2])


def test_grpo_both_sides_train_the_same_tokens():
    row = _bench("--what=grpo", "--prompts=2", "--group=2", "--new-tokens=4")
    assert row["what"] == "rl_grpo_vs_trl" and row["lmstack_params"] == row["trl_params"]  # GPT-2 shape: parity
    assert row["prompt_tokens_per_iteration"]["lmstack"] == row["prompt_tokens_per_iteration"]["trl"] > 0
    assert row["completion_tokens_per_iteration"]["trl"] == 2 * 2 * 4  # forced to the full length
    assert 0 < row["completion_tokens_per_iteration"]["lmstack"] <= 2 * 2 * 4  # stops at <|end|>
    assert row["lmstack_tokens_per_s"] > 0 and row["trl_tokens_per_s"] > 0 and row["trl_reference"] == "model each step"
    q = row["ratio_tokens_per_s"]
    assert q["min"] <= q["median"] <= q["max"] and row["cpu"] and len(row["loadavg_1m"]) == 2
    assert set(row["split_s_per_iteration"]) == {"lmstack", "trl"}


def test_dpo_both_sides_train_the_same_tokens():
    row = _bench("--what=dpo", "--pairs=2")
    assert row["what"] == "rl_dpo_vs_trl" and row["lmstack_params"] == row["trl_params"]
    assert row["tokens_per_step"]["lmstack"] == row["tokens_per_step"]["trl"] > 0
    assert row["trl_reference"] == "precomputed" and row["lmstack_iters_per_s"] > 0 and row["trl_iters_per_s"] > 0

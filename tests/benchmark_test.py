"""scripts/benchmark.py runs end to end and prints the documented JSON (numbers are README's job)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("what,keys", [
    ("train", {"tokens_per_s", "step_ms", "model_flops_per_token", "achieved_gflops", "mfu"}),
    ("eval", {"tokens_per_s", "mfu"}),
    ("decode", {"tokens_per_s", "ms_per_token"}),
])
def test_benchmark_prints_json(what, keys, corpus_dir):
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user runs it
    out = subprocess.run([sys.executable, "scripts/benchmark.py", "--config=configs/pretrain_causal.py:tiny",
                          f"--what={what}", "--steps=3", "--warmup=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys <= set(row) and row["tokens_per_s"] > 0


def test_benchmark_data_pipeline(corpus_dir):
    out = subprocess.run([sys.executable, "scripts/benchmark.py", "--config=configs/pretrain_causal.py:tiny",
                          "--what=data", f"--config.data.path={corpus_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["tokens_per_s"] > 1e5 and row["tokens"] > 1000


def test_benchmark_mfu_vs_peak():
    out = subprocess.run([sys.executable, "scripts/benchmark.py", "--config=configs/pretrain_causal.py:tiny",
                          "--vs-peak", "--steps=2", "--rounds=2", "--warmup=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["what"] == "mfu_vs_peak" and row["peak_gflops_median"] > 0
    assert 0 < row["mfu_min"] <= row["mfu_median"] <= row["mfu_max"]
    assert abs(row["mfu_median"] - row["step_gflops_median"] / row["peak_gflops_median"]) < 0.5 * row["mfu_median"]
    assert out.stderr.count("MFU") == 2  # one line per round


def test_benchmark_compile_variants():
    out = subprocess.run([sys.executable, "scripts/benchmark.py", "--config=configs/pretrain_causal.py:tiny",
                          "--what=compile", "--layers=3", "--steps=1", "--rounds=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["what"] == "compile" and r["n_layers"] == 3
    rows = {(x["scan_layers"], x["remat"]): x for x in r["rows"]}
    assert set(rows) == {(False, "none"), (True, "none"), (False, "full"), (True, "full"), (True, "dots")}
    assert all(x["compile_s"] > 0 and x["temp_mb"] > 0 and x["step_ms"] > 0 for x in rows.values())
    # scanned layers with full remat keep only each layer's input for the backward pass
    assert rows[(True, "full")]["temp_mb"] < rows[(False, "none")]["temp_mb"]

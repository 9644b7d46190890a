"""scripts/benchmark.py runs end to end and prints the documented JSON (numbers are README's job)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(*args, env=None):
    """scripts/benchmark.py on one CPU device (as a user runs it) -> (its last JSON line, stderr)."""
    out = subprocess.run([sys.executable, "scripts/benchmark.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, XLA_FLAGS="", **(env or {})))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.parametrize("what,keys", [
    ("train", {"tokens_per_s", "step_ms", "model_flops_per_token", "achieved_gflops", "mfu"}),
    ("eval", {"tokens_per_s", "mfu"}),
    ("decode", {"tokens_per_s", "ms_per_token"}),
])
def test_benchmark_prints_json(what, keys, corpus_dir):
    row, _ = _benchmark("--config=configs/pretrain_causal.py:tiny", f"--what={what}", "--steps=3", "--warmup=1")
    assert keys <= set(row) and row["tokens_per_s"] > 0


def test_benchmark_data_pipeline(corpus_dir):
    row, _ = _benchmark("--config=configs/pretrain_causal.py:tiny", "--what=data", f"--config.data.path={corpus_dir}")
    # a rate, not a speed bar (a loaded 2-core machine ran it at 0.78e5 tokens/s, an idle one well above 1e5:
    # speed is the benchmark's to report, not a test's to time)
    assert np.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 and row["tokens"] > 1000


def test_benchmark_mfu_vs_peak():
    row, stderr = _benchmark("--config=configs/pretrain_causal.py:tiny", "--vs-peak", "--steps=2", "--rounds=2",
                             "--warmup=1")
    assert row["what"] == "mfu_vs_peak" and row["peak_gflops_median"] > 0
    assert 0 < row["mfu_min"] <= row["mfu_median"] <= row["mfu_max"]
    assert abs(row["mfu_median"] - row["step_gflops_median"] / row["peak_gflops_median"]) < 0.5 * row["mfu_median"]
    assert stderr.count("MFU") == 2  # one line per round
    from model import layers
    native = layers.native_lowp_dots()  # the same check the script makes: the peak is in the dots' dtype
    assert row["peak_dtype"] == ("bfloat16" if native else "float32"), row
    row, _ = _benchmark("--config=configs/pretrain_causal.py:tiny", "--vs-peak", "--steps=1", "--rounds=1",
                        "--warmup=0", "--peak-dtype=bf16")
    assert row["peak_dtype"] == "bfloat16"


def test_measure_peak_with_pytorch_in_its_own_process():
    pytest.importorskip("torch")
    row, _ = _benchmark("--measure-peak", "--peak-torch", "--torch-omp-wait=passive")
    for key in ("f32_gflops_median", "bf16_gflops_median", "torch_f32_gflops_median"):
        assert row[key] > 1, row
    assert row["torch"]["threads"] == 2 and row["cpu"]  # --torch-threads' default


def test_benchmark_compile_variants(tmp_path):
    # a persistent compilation cache turned on from the environment must not serve the timed compiles
    # (it would report the load of a cached program as its compile time): nothing is written to it
    cache = tmp_path / "xla_cache"
    r, _ = _benchmark("--config=configs/pretrain_causal.py:tiny", "--what=compile", "--layers=3", "--steps=1",
                      "--rounds=1", env={"JAX_COMPILATION_CACHE_DIR": str(cache),
                                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    assert not (cache.exists() and os.listdir(cache)), sorted(os.listdir(cache))
    assert r["what"] == "compile" and r["n_layers"] == 3
    rows = {(x["scan_layers"], x["remat"]): x for x in r["rows"]}
    assert set(rows) == {(False, "none"), (True, "none"), (False, "full"), (True, "full"), (True, "dots")}
    assert all(x["compile_s"] > 0 and x["temp_mb"] > 0 and x["step_ms"] > 0 for x in rows.values())
    # scanned layers with full remat keep only each layer's input for the backward pass
    assert rows[(True, "full")]["temp_mb"] < rows[(False, "none")]["temp_mb"]


def _benchmark_fails(*args):
    out = subprocess.run([sys.executable, "scripts/benchmark.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode != 0
    return out.stderr


@pytest.mark.parametrize("arch,variants", [("gpt2", "f32,bf16"), ("llama", "f32")])
def test_vs_torch_runs_each_variant_in_its_own_process_at_equal_parameter_count(arch, variants):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    row, stderr = _benchmark("--config=configs/pretrain_causal.py:tiny", "--vs-torch", f"--torch-arch={arch}",
                             f"--torch-variants={variants}", "--rounds=2", "--steps=2", "--warmup=1", "--gap_s=0")
    assert row["what"] == "train_vs_torch" and row["arch"] == arch and "family" in row["cpu"]
    for v in variants.split(","):
        r = row[v]
        assert r["torch_params"] == row["jax_params"]  # the same model size on both sides, exactly
        assert r["torch_tokens_per_s"] > 0 and 0 < r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    assert stderr.count("round ") == 2


def test_vs_torch_bad_settings_are_named():
    err = _benchmark_fails("--config=configs/pretrain_causal.py:tiny", "--vs-torch", "--torch-variants=f16",
                           "--rounds=1", "--steps=1", "--warmup=1")
    assert "--torch-variants=f16" in err
    err = _benchmark_fails("--config=configs/pretrain_causal.py:tiny", "--vs-torch", "--torch-arch=llama",
                           "--config.model.mlp=gelu", "--rounds=1", "--steps=1", "--warmup=1")
    assert "model.mlp='swiglu'" in err and "'gelu'" in err


def test_mode_step_is_timed_against_the_causal_step_of_its_model(tmp_path):
    tasks = tmp_path / "tasks"
    subprocess.run([sys.executable, "scripts/make_tasks.py", f"--out={tasks}", "--n_train=64", "--n_val=8",
                    "--n_test=8"], cwd=ROOT, check=True, capture_output=True)
    row, stderr = _benchmark("--what=mode", "--config=configs/sft.py:tiny", f"--config.data.path={tasks}/train.jsonl",
                             f"--config.sft.val_path={tasks}/val.jsonl", "--config.data.seq_len=128", "--config.lora.rank=4", "--steps=2",
                             "--rounds=2", "--warmup=1")
    assert row["what"] == "mode" and row["mode"] == "sft" and row["lora_rank"] == 4
    assert row["mode_tokens_per_s"] > 0 and row["causal_tokens_per_s"] > 0
    assert 0 < row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"] and stderr.count("round ") == 2
    err = _benchmark_fails("--what=mode", "--config=configs/grpo.py:tiny", "--steps=1", "--rounds=1")
    assert "mode='grpo' is on-policy" in err

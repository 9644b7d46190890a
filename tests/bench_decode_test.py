"""scripts/bench_decode (benchmark.py --what=decode): the old recompute loop and the KV decoder choose the same
greedy tokens on the same params, and both JSON reports carry their keys (the HF side only with torch installed)."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pretrain_causal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_decode  # noqa: E402


def _tiny_f32():
    """The tiny default model (window data.seq_len = 32) with float32 matmuls: a near-tie between two logits
    cannot flip with the rounding of a differently shaped bf16 computation."""
    config = pretrain_causal.get_config("tiny")
    config.model.dtype = "float32"
    return config


def test_kv_decoder_matches_the_recompute_loop_and_reports_its_speedup():
    config = _tiny_f32()
    log = io.StringIO()
    row = bench_decode.kv_vs_recompute(config, 267, prompt_len=6, new_tokens=40, rounds=1, log=log)
    assert {"tokens_per_s", "ms_per_token", "kv_tokens_per_s", "recompute_tokens_per_s", "speedup_median",
            "speedup_min", "speedup_max", "agree_tokens", "comparable_tokens", "cpu", "cache_len"} <= set(row)
    # tokens 1..27 see their whole context in both; after that the recompute loop's window slides
    assert row["comparable_tokens"] == 32 - 6 + 1 and row["cache_len"] == 46
    assert row["agree_tokens"] == row["comparable_tokens"]
    assert row["speedup_min"] <= row["speedup_median"] <= row["speedup_max"] and row["kv_tokens_per_s"] > 0
    assert log.getvalue().count("round ") == 1 and row["cpu"]


def test_recompute_loop_is_the_full_forward_argmax():
    """The baseline itself: its first token is the argmax of one plain forward pass over the prompt."""
    model, params = bench_decode.model_and_params(_tiny_f32(), 267)
    prompt = bench_decode.random_prompts(1, 5, 267)[0]
    first = bench_decode.recompute_greedy(model, params, prompt, window=32, max_new_tokens=1)
    logits = jax.jit(model.apply)({"params": params}, prompt[None, :])
    assert first == [int(np.argmax(logits[0, -1]))]


def test_vs_hf_runs_both_processes_and_reports_ratios():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "scripts/benchmark.py", "--config=configs/pretrain_causal.py:tiny",
                          "--what=decode", "--vs-hf", "--rounds=1", "--hf_batches=3", "--prompt_len=4",
                          "--new_tokens=8", "--gap_s=0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["what"] == "decode_vs_hf" and row["jax_params"] == row["torch_params"]  # GPT-2 shape: parity
    r = row["batch_3"]
    for key in ("generate_tokens_per_s", "prefill_tokens_per_s", "ttft_ms"):
        assert r[f"jax_{key}"] > 0 and r[f"torch_{key}"] > 0 and r[f"ratio_{key}_median"] > 0
    assert "family" in row["cpu"] and out.stderr.count("round 0 batch 3:") == 1

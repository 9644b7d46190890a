"""Memory preflight (preflight.py, scripts/estimate_memory.py) and the Llama presets (configs/presets.py)."""

import gc
import math
import os
import re
import subprocess
import sys

import jax
import pytest

import modes
import preflight
import sharding
import steps
import train
from configs import llama_7b, llama_125m, presets
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_7b_fsdp8_params_per_device_are_a_eighth_without_allocating():
    c = llama_7b.get_config("gpu8")
    mode = modes.get(c)
    model = mode.model(c, preflight.sized_inputs(32000))
    tx = modes.optimizer(c)[0]
    sizes = sharding.mesh_sizes(c.mesh, 8)
    assert sizes == {"data": 1, "fsdp": 8, "tensor": 1}
    gc.collect()  # earlier tests' garbage would otherwise be freed during the call and change the count
    live_before = len(jax.live_arrays())
    p_dev, o_dev, p_all = preflight.state_bytes(model, tx, sizes, sharding.logical_rules(c.sharding), c.data.seq_len)
    assert len(jax.live_arrays()) == live_before  # eval_shape only: nothing allocated
    assert 6.5e9 < p_all / 4 < 6.8e9  # Llama-2 7B's shape with a 32k vocabulary, float32
    assert p_dev * 8 == p_all
    assert 0 <= o_dev - 3 * p_dev < 1024  # AdamW's two moments + MultiSteps' gradient sum (accumulation 16), sharded


def test_per_device_bytes_match_the_real_shardings_on_8_devices(corpus_dir):
    """The size arithmetic agrees with the NamedShardings the train step uses (fsdp x tensor mesh)."""
    c = tiny_config(corpus_dir, mesh__data=1, mesh__fsdp=4, mesh__tensor=2)
    mode = modes.get(c)
    model = mode.model(c, preflight.sized_inputs(267))
    tx = modes.optimizer(c)[0]
    mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c.sharding)
    p_dev, _, p_all = preflight.state_bytes(model, tx, sharding.mesh_sizes(c.mesh, 8), rules, c.data.seq_len)
    abstract, _ = steps.abstract_params(model, mesh, rules, c.data.seq_len)
    real = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    assert p_dev == real and p_all == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))


def test_tiny_estimate_within_20_percent_of_xla_measured():
    """The CLI as a user runs it, on one CPU device: estimate vs XLA's compiled train step (arguments +
    temporaries per device)."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "scripts/estimate_memory.py", "--config=configs/pretrain_causal.py:tiny",
                          "--measure"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = float(re.search(r"estimate / measured = ([0-9.]+)", out.stdout).group(1))
    assert 0.8 <= ratio <= 1.2, out.stdout


def test_remat_and_fsdp_and_accumulation_lower_the_estimate():
    base = llama_125m.get_config("gpu8")
    mode = modes.get(base)
    inputs = preflight.sized_inputs(32000)
    est = lambda c: preflight.estimate(c, mode, inputs, n_devices=8, platform="gpu")  # noqa: E731
    ref = est(base)
    for key, value in (("model.remat", "full"), ("optim.grad_accum_steps", 4)):
        c = llama_125m.get_config("gpu8")
        a, b = key.split(".")
        c[a][b] = value
        assert est(c).activations < ref.activations, key
    c = llama_125m.get_config("gpu8")
    c.mesh.data, c.mesh.fsdp = 1, 8
    assert est(c).params * 8 == est(c).total_params and est(c).params < ref.params


def test_7b_on_v4_8_fits_with_adafactor_not_adamw_and_v5e_16_fits():
    mode = modes.get(llama_7b.get_config("v4-8"))
    inputs = preflight.sized_inputs(32000)
    tpu = dict(n_devices=4, limit=32 * 2**30, platform="tpu")
    v4 = llama_7b.get_config("v4-8")
    assert v4.optim.name == "adafactor" and preflight.estimate(v4, mode, inputs, **tpu).fits
    v4.optim.name = "adamw"
    adamw = preflight.estimate(v4, mode, inputs, **tpu)
    assert not adamw.fits and adamw.params + adamw.opt_state > 24 * 2**30
    v5e = preflight.estimate(llama_7b.get_config("v5e-16"), mode, inputs, n_devices=16, limit=16 * 2**30,
                             platform="tpu")
    assert v5e.fits


def test_start_up_refuses_a_run_that_would_not_fit_before_writing_a_checkpoint(corpus_dir, tmp_path):
    c = tiny_config(corpus_dir, data__batch_size=64)
    need = preflight.estimate(c, modes.get(c), preflight.sized_inputs(267), n_devices=8).total
    c.train.memory_limit_gb = 0.95 * need / 2**30  # over the 90% headroom
    with pytest.raises(preflight.MemoryPreflightError) as e:
        train.train_and_evaluate(c, str(tmp_path / "run"))
    msg = str(e.value)
    assert f"about {preflight.human(need)} per device" in msg and "--config.optim.grad_accum_steps=2" in msg, msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_suggestions_fit_when_applied(corpus_dir):
    """A suggestion is a set of --config overrides; applied, the estimate fits the same limit."""
    c = presets.llama("1b", "gpu8")
    mode = modes.get(c)
    inputs = preflight.sized_inputs(32000)
    limit = 30 * 2**30
    plan = lambda cfg: preflight.estimate(cfg, mode, inputs, n_devices=8, limit=limit, platform="gpu")  # noqa: E731
    assert not plan(c).fits
    first = preflight.suggestions(plan, c)[0]
    for flag in first.split("  (")[0].split():
        key, value = flag[len("--config."):].split("=")
        a, b = key.split(".")
        c[a][b] = type(c[a][b])(value) if not isinstance(c[a][b], bool) else value == "True"
    assert plan(c).fits


def test_preset_tiny_trains_with_the_check_switched_off(corpus_dir, tmp_path):
    """The presets' `:tiny` smoke run; train.preflight=False runs despite a limit the estimate exceeds."""
    c = llama_125m.get_config("tiny")
    c.data.path, c.data.val_fraction, c.train.async_checkpoint = corpus_dir, 0.2, False
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 4, 4, 4
    c.train.compile_cache_dir = ""
    c.train.memory_limit_gb, c.train.preflight = 1e-4, False
    out = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert out["step"] == 4 and out["eval/loss"] < out["train/loss"] + 1.0


def test_unknown_preset_target_is_named():
    with pytest.raises(ValueError, match="'v9-8'"):
        presets.llama("1b", "v9-8")

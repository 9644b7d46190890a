"""checkpoint.py: readers of a run never touch its checkpoints, even while one is being written."""

import asyncio
import logging
import os
import sys
import threading
import time

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from conftest import tiny_config
from flax import struct
# Orbax's own tests hold a save in flight the same way (mock.patch.object on this class's finalize).
from orbax.checkpoint._src.path import atomicity

import checkpoint
import evaluation
import train
import warmstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bits_per_byte  # noqa: E402
import merge_lora  # noqa: E402

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how orbax-checkpoint 0.12.8 names a step's unfinished directory


@pytest.fixture(scope="module")
def run(corpus_dir, tmp_path_factory):
    """A tiny causal run with a checkpoint at every step, written in the background."""
    workdir = str(tmp_path_factory.mktemp("live"))
    config = tiny_config(corpus_dir, train__steps=3, train__checkpoint_every=1, train__async_checkpoint=True,
                         train__keep_checkpoints=10, train__eval_every=3, train__eval_batches=1, model__n_layers=1)
    train.train_and_evaluate(config, workdir)
    return workdir


def _hold_finalize(monkeypatch) -> threading.Event:
    """Every save stays in flight (written into its tmp directory, not yet renamed) until the event is set."""
    release = threading.Event()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self):
        await asyncio.to_thread(release.wait, 120)
        await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held)
    return release


def _wait_for(path: str, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not os.path.isdir(path):
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.01)


class _Target(struct.PyTreeNode):
    """What warm_start reads of a train state: its params (and, for the shardings, the same tree)."""
    params: Any


def _warm_start_target(run_dir: str):
    """A target of the run's shapes to warm start into, with its shardings."""
    _, params, _ = checkpoint.load_for_inference(run_dir)
    return _Target(params=params), _Target(params=jax.tree.map(lambda x: x.sharding, params))


def test_readers_leave_an_in_flight_async_save_alone(run, tmp_path, monkeypatch):
    state, state_sh = _warm_start_target(run)  # before the hold: it compiles and reads
    trainer = checkpoint.make_manager(run, keep=10, async_save=True)  # the training process's own manager
    latest = trainer.latest_step()
    saved = trainer.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                            config=ocp.args.JsonRestore()))
    release = _hold_finalize(monkeypatch)
    step = latest + 1
    trainer.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved["state"]),
                                               config=ocp.args.JsonSave(saved["config"])))
    in_flight = os.path.join(run, "checkpoints", f"{step}{TMP_SUFFIX}")
    _wait_for(in_flight)
    try:
        readers = {
            "load_for_inference (generate.py, merge_lora.py)": lambda: checkpoint.load_for_inference(run),
            "warmstart.warm_start": lambda: warmstart.warm_start(state, state_sh, run),
            "merge_lora.merge_run": lambda: pytest.raises(ValueError, merge_lora.merge_run, run,
                                                          str(tmp_path / "merged")),
            "bits_per_byte": lambda: pytest.raises(ValueError, bits_per_byte.bits_per_byte, run),
            "evaluation.load_run": lambda: evaluation.load_run(run),
            "evaluation.evaluate_run": lambda: evaluation.evaluate_run(run, max_batches=1),
        }
        for name, read in readers.items():
            read()
            assert os.path.isdir(in_flight), f"after {name}: the in-flight checkpoint {in_flight} is gone"
        assert checkpoint.load_for_inference(run)[2] == latest  # readers see only complete checkpoints
    finally:
        release.set()
    trainer.wait_until_finished()
    trainer.close()
    assert not os.path.exists(in_flight)
    reader = checkpoint.open_read_only(run)
    assert sorted(reader.all_steps()) == list(range(1, step + 1))
    for s in reader.all_steps():  # every checkpoint the run wrote is complete and restores
        reader.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    reader.close()
    _, params, at = checkpoint.load_for_inference(run)
    assert at == step
    jax.tree.map(np.testing.assert_array_equal, params, saved["state"]["params"])


def test_read_only_managers_open_without_orbaxs_read_only_warning(run, caplog):
    caplog.set_level(logging.INFO)
    evaluation.load_run(run)  # what scripts/evaluate.py opens (twice a call)
    checkpoint.open_read_only(run).close()
    absl_logging.warning("Given directory is read only=%s", "elsewhere")  # not opening: passes
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Given directory is read only")]
    assert notices == ["Given directory is read only=elsewhere"]


def test_checkpoint_from_before_loss_scale_restores(tmp_path):
    """A state saved before TrainState had `loss_scale` (float16 support) restores into today's TrainState
    (loss_scale None), exactly; today's checkpoints restore as before."""
    import dataclasses

    import jax.numpy as jnp

    import steps
    state = steps.TrainState(step=jnp.int32(7), params={"w": jnp.arange(4.0)}, opt_state={"mu": jnp.ones((4,))},
                             rng=jnp.zeros((2,), jnp.uint32), lr_scale=jnp.float32(0.5), dropped=jnp.int32(1),
                             last_dropped=jnp.int32(3))
    old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "loss_scale"}
    mngr = checkpoint.make_manager(str(tmp_path), keep=5, async_save=False)
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
    mngr.save(8, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    for step in (7, 8):
        got = checkpoint.restore_state(mngr, step, abstract)
        assert isinstance(got, steps.TrainState) and got.loss_scale is None
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, b)


def test_single_process_saves_compile_no_replica_slices(tmp_path, caplog):
    """Arrays replicated over the 8 devices save without Orbax's replica-parallel slicing in one process (it
    compiled a slice program per array shape and replica at the first save) and restore exactly."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",))
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    state = {"w": jax.device_put(np.arange(24.0 * 40).reshape(24, 40), replicated),
             "b": jax.device_put(np.arange(16, dtype=np.int32), split)}
    mngr = checkpoint.make_manager(str(tmp_path), keep=2, async_save=False)
    assert checkpoint.use_replica_parallel_saves() is False
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mngr.wait_until_finished()
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not [m for m in compiled if "slice" in m], compiled
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    got = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    for k in state:
        assert got[k].sharding == state[k].sharding
        np.testing.assert_array_equal(got[k], state[k])
    mngr.close()

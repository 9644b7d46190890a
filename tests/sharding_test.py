"""Sharding: mesh construction, clear errors, and an 8-device step equal to a 1-device step."""

import types

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

import objectives
import optim
import sharding
import steps
from model import build
from data import pipeline, sources, tokenizer as tokenizer_lib


def test_mesh_fill_and_errors():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 3 devices but 8"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match="data.batch_size=6 is not divisible by 4 data-parallel devices"):
        sharding.check_batch_size(6, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))


def _setup(config, mesh, corpus):
    docs, _ = sources.read_documents(corpus)
    tok = tokenizer_lib.ByteTokenizer()
    stream = pipeline.tokenize_stream([d.text for d in docs], tok)
    batches = pipeline.eval_batches(stream, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
                                    max_batches=3)
    model = build.transformer(config, tok.vocab_size)
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    rules = sharding.logical_rules(config.sharding)
    state, sh = steps.init_state(model, tx, mesh, rules, config.seed, config.data.seq_len)
    step = steps.make_train_step(model=model, tx=tx, objective=objectives.causal_lm, schedule=schedule, accum=1,
                                 mesh=mesh, rules=rules, state_shardings=sh)
    losses = []
    for b in batches:
        state, m = step(state, sharding.put_batch(b, sharding.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-3)])
def test_eight_device_step_matches_one_device(corpus_dir, dtype, tol):
    config = tiny_config(corpus_dir, model__dtype=dtype)
    mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s1, l1 = _setup(config, mesh1, corpus_dir)
    s8, l8 = _setup(config, mesh8, corpus_dir)
    np.testing.assert_allclose(l8, l1, rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=10 * tol, atol=10 * tol)
    # the big parameters really are sharded: the embedding over tensor x fsdp
    emb = s8.params["embed"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)


def test_indivisible_parameter_names_it(corpus_dir):
    config = tiny_config(corpus_dir, model__d_model=30, model__n_heads=3, model__n_kv_heads=3)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    model = build.transformer(config, 267)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    with pytest.raises(ValueError, match=r"embedding.*dimension 30 is not divisible by 4"):
        steps.init_state(model, tx, mesh, sharding.logical_rules(config.sharding), 0, 32)


def test_simulated_two_slice_hybrid_mesh(corpus_dir):
    """8 devices in 2 simulated slices (interleaved, so slice order is not device order): mesh.dcn_data=2 puts
    each slice's devices in one contiguous half of the data axis, and a train step on that mesh equals one device's."""
    real = jax.devices()
    fake = [types.SimpleNamespace(id=d.id, platform="cpu", device_kind="cpu", process_index=0, slice_index=i % 2)
            for i, d in enumerate(real)]
    grid = sharding.hybrid_grid([1, 2, 2], [2, 1, 1], fake)
    assert grid.shape == (2, 2, 2)
    assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]  # data index i = slice i
    assert sharding.granule_attr(fake) == "slice_index" and sharding.granule_attr(real) == "process_index"
    by_id = {d.id: d for d in real}
    mesh = jax.sharding.Mesh(np.vectorize(lambda d: by_id[d.id], otypes=[object])(grid), sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    config = tiny_config(corpus_dir)
    mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=real[:1])
    s1, l1 = _setup(config, mesh1, corpus_dir)
    s8, l8 = _setup(config, mesh, corpus_dir)
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
    # Adam moves an element whose gradient is ~0 by up to ~lr on rounding noise alone (seen: 1 of 1024 by 2e-4):
    # each element within lr / 2, and the mean difference (seen: 2e-6) far below the ~1e-3 per element that
    # three updates at lr 1e-3 make (wrong rows or devices would change them all at that scale)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=5e-4)
        assert np.abs(np.asarray(b) - np.asarray(a)).mean() < 1e-5
    with pytest.raises(ValueError, match=r"asks for 4 slices/hosts but the 8 devices form 2 \(by slice_index\)"):
        sharding.hybrid_grid([1, 2, 1], [2, 2, 1], fake)
    # GPU nodes with one process per GPU (SLURM): 8 processes on 2 hosts, consecutive ranks on one host
    gpus = [types.SimpleNamespace(id=i, platform="cpu", device_kind="cpu", process_index=i, slice_index=0)
            for i in range(8)]
    grid = sharding.hybrid_grid([1, 4, 1], [2, 1, 1], gpus)
    assert [[d.process_index for d in grid[i].flat] for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_hybrid_mesh_config_errors():
    # one process, no slices: the 8 devices form one DCN group
    with pytest.raises(ValueError, match=r"asks for 2 slices/hosts but the 8 devices form 1 \(by process_index\)"):
        sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1, "dcn_tensor": 1})
    with pytest.raises(ValueError, match="cannot be split into 3 equal groups"):
        sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "dcn_fsdp": 3})
    with pytest.raises(ValueError, match=r"mesh.dcn_\* sizes .*'dcn_tensor'|each must be >= 1"):
        sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "dcn_tensor": 0})
    # dcn sizes of 1 are today's mesh
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert list(mesh.devices.flat) == jax.devices()
    assert sharding.host_rows(mesh, 16) == (0, 1)  # one process feeds every row
    # sizes without devices (the memory preflight): each axis in all = inside a slice/host x across them
    assert sharding.mesh_sizes({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2}, 16) == {"data": 2, "fsdp": 8,
                                                                                             "tensor": 1}


def test_large_replicated_parameter_under_fsdp_names_it(corpus_dir):
    config = tiny_config(corpus_dir, model__d_model=256)
    rules = tuple((k, None if k in ("embed", "vocab") else v) for k, v in sharding.logical_rules(config.sharding))
    model = build.transformer(config, 267)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with pytest.raises(ValueError, match=r"parameter .*'embed'.*'embedding'.* of shape \(320, 256\) \(81,920 elements\) "
                                         r"would be replicated on every device although mesh.fsdp=8.*\('vocab', 'fsdp'\)"):
        steps.init_state(model, tx, mesh, rules, 0, 32)
    # the same rules without FSDP (pure data parallel) are fine: replication is what data parallelism means
    steps.init_state(model, tx, sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}), rules, 0, 32)


def test_initialize_distributed_checks_and_single_process():
    import ml_collections
    from configs import common

    def dist(**kw):
        d = ml_collections.ConfigDict(common.base().dist.to_dict())
        d.update(kw)
        return d
    for kw, msg in [(dict(coordinator_address="10.0.0.1"), r"dist.coordinator_address='10.0.0.1': expected HOST:PORT"),
                    (dict(coordinator_address="h:99999"), r"dist.coordinator_address='h:99999'"),
                    (dict(num_processes=2, process_id=2), r"dist.process_id=2 must be < dist.num_processes=2"),
                    (dict(initialize="maybe"), r"dist.initialize='maybe': expected 'auto', 'yes' or 'no'"),
                    (dict(process_id=-2), r"dist.process_id=-2")]:
        with pytest.raises(ValueError, match=msg):
            sharding.initialize_distributed(dist(**kw))
    assert sharding.initialize_distributed(dist(initialize="no")) is False
    assert sharding.cluster_processes() == 1  # no SLURM / TPU-pod environment here
    assert sharding.initialize_distributed(dist()) is False  # 'auto' alone: one process, nothing to join

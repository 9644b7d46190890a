"""Sharding: mesh construction, clear errors, and an 8-device step equal to a 1-device step."""

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

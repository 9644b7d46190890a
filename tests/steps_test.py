"""Train step: gradient accumulation (optax.MultiSteps) equals one step on the full batch."""

import jax
import numpy as np
from conftest import tiny_config

import objectives
import optim
import sharding
import steps
from model import build
from data import pipeline, sources, tokenizer as tokenizer_lib


def _run(config, batches):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = sharding.logical_rules(config.sharding)
    model = build.transformer(config, 267)
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    state, sh = steps.init_state(model, tx, mesh, rules, 0, config.data.seq_len)
    step = steps.make_train_step(model=model, tx=tx, objective=objectives.causal_lm, schedule=schedule,
                                 accum=config.optim.grad_accum_steps, mesh=mesh, rules=rules, state_shardings=sh)
    for b in batches:
        state, _ = step(state, sharding.put_batch(b, sharding.batch_sharding(mesh)))
    return state


def test_multisteps_k4_matches_full_batch(corpus_dir):
    docs, _ = sources.read_documents(corpus_dir)
    stream = pipeline.tokenize_stream([d.text for d in docs], tokenizer_lib.ByteTokenizer())
    full = pipeline.eval_batches(stream, seq_len=32, batch_size=16, max_batches=2)
    for b in full:  # equal token counts per micro-batch so the mean of means is the full mean
        b["weights"][:] = 1.0
    micro = [{k: v[i * 4:(i + 1) * 4] for k, v in b.items()} for b in full for i in range(4)]
    cfg_full = tiny_config(corpus_dir, model__dtype="float32", data__batch_size=16)
    cfg_acc = tiny_config(corpus_dir, model__dtype="float32", data__batch_size=16, optim__grad_accum_steps=4)
    s_full = _run(cfg_full, full)
    s_acc = _run(cfg_acc, micro)
    assert int(s_acc.step) == 8 and int(s_full.step) == 2
    for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_acc.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(_run(cfg_full, full[:1]).params)))
    assert moved > 1e-4  # the second update really happened (the comparison is not vacuous)


def test_argmax_first_matches_jnp_argmax_with_ties():
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (5, 7, 9)).astype(np.float32)  # few values: many ties
    x[0, 0] = 2.0  # a row of equal logits: index 0
    x[1, 1, 3] = np.inf
    got = objectives.argmax_first(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, -1))
    assert got.dtype == jnp.int32

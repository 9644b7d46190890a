"""float16 dynamic loss scaling: the pure state update, the train step's skip/halve/grow, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from optim_test import train_resumed

import loss_scale
import objectives
import optim
import sharding
import steps
from configs import common
from data import pipeline, sources, tokenizer as tokenizer_lib
from metrics import read_jsonl
from model import build


def _ls(scale, good=0, period=3):
    return loss_scale.LossScale(scale=jnp.float32(scale), good_steps=jnp.int32(good), skipped=jnp.int32(0),
                                period=period)


def test_adjust_rules():
    t, f = jnp.bool_(True), jnp.bool_(False)
    ls, skip = loss_scale.adjust(_ls(8.0, good=1), t, t)  # finite: one more good step
    assert (float(ls.scale), int(ls.good_steps), bool(skip)) == (8.0, 2, False)
    ls, skip = loss_scale.adjust(ls, t, t)  # the period's 3rd finite step: doubles, run restarts
    assert (float(ls.scale), int(ls.good_steps), bool(skip)) == (16.0, 0, False)
    ls, skip = loss_scale.adjust(_ls(16.0, good=2), t, f)  # overflow: halve, a skip (not a dropped update)
    assert (float(ls.scale), int(ls.good_steps), int(ls.skipped), bool(skip)) == (8.0, 0, 1, True)
    ls, skip = loss_scale.adjust(_ls(16.0, good=2), f, f)  # the loss itself non-finite: a real drop
    assert (float(ls.scale), int(ls.good_steps), int(ls.skipped), bool(skip)) == (16.0, 0, 0, False)
    ls, skip = loss_scale.adjust(_ls(1.0), t, f)  # overflow at the floor: nothing left to shrink, counted
    assert (float(ls.scale), int(ls.skipped), bool(skip)) == (1.0, 0, False)
    ls, _ = loss_scale.adjust(_ls(2.0**40, good=2), t, t)  # capped: the scale stays finite
    assert float(ls.scale) == 2.0**40


def test_initial_state_and_errors():
    o = common.base().optim
    assert loss_scale.initial("bfloat16", o) is None and loss_scale.initial("float32", o) is None
    ls = loss_scale.initial("float16", o)
    assert float(ls.scale) == 2.0**15 and ls.period == 2000
    with pytest.raises(ValueError, match=r"model.dtype='half'.*'bfloat16', 'float16', 'float32'"):
        loss_scale.initial("half", o)
    o.loss_scale_init = 0.5
    with pytest.raises(ValueError, match="optim.loss_scale_init=0.5"):
        loss_scale.initial("float16", o)
    o.loss_scale_init, o.loss_scale_period = 1024.0, 0
    with pytest.raises(ValueError, match="optim.loss_scale_period=0"):
        loss_scale.initial("float16", o)


def test_fp16_step_skips_overflow_halves_and_grows(corpus_dir):
    """A scale so large that the float16 backward overflows: the step changes nothing but the scale (halved)
    and the skip count; once it fits, updates apply and the scale doubles after `period` of them. A
    non-finite loss is still a dropped update."""
    config = tiny_config(corpus_dir, model__dtype="float16", optim__loss_scale_init=2.0**30,
                         optim__loss_scale_period=2, optim__warmup_steps=0, optim__schedule="constant")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = sharding.logical_rules(config.sharding)
    model = build.transformer(config, 267)
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    state, sh = steps.init_state(model, tx, mesh, rules, 0, config.data.seq_len,
                                 loss_scale.initial(config.model.dtype, config.optim))
    step = steps.make_train_step(model=model, tx=tx, objective=objectives.causal_lm, schedule=schedule, accum=1,
                                 mesh=mesh, rules=rules, state_shardings=sh)
    docs, _ = sources.read_documents(corpus_dir)
    stream = pipeline.tokenize_stream([d.text for d in docs], tokenizer_lib.ByteTokenizer())
    batches = pipeline.eval_batches(stream, seq_len=32, batch_size=8, max_batches=12)
    put = lambda b: sharding.put_batch(b, sharding.batch_sharding(mesh))  # noqa: E731
    kinds = []
    for b in batches:
        before = jax.device_get(state)  # the step donates its input
        state, m = step(state, put(b))
        after = jax.device_get(state)
        applied = bool(np.isfinite(m["grad_norm"]))
        assert np.isfinite(m["loss"]) and int(after.dropped) == 0
        same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves((before.params, before.opt_state)),
                                                        jax.tree.leaves((after.params, after.opt_state))))
        assert same != applied and int(after.step) == int(before.step) + applied
        s0, s1 = float(before.loss_scale.scale), float(after.loss_scale.scale)
        if not applied:  # overflow: skipped, scale halved
            assert s1 == s0 / 2 and int(after.loss_scale.skipped) == int(before.loss_scale.skipped) + 1
            kinds.append("skip")
        elif int(before.loss_scale.good_steps) + 1 == 2:  # the period's 2nd finite step: doubled
            assert s1 == 2 * s0 and int(after.loss_scale.good_steps) == 0
            kinds.append("grow")
        else:
            assert s1 == s0 and int(after.loss_scale.good_steps) == int(before.loss_scale.good_steps) + 1
            kinds.append("ok")
        assert float(m["loss_scale"]) == s1 and int(m["overflow_skips"]) == int(after.loss_scale.skipped)
    assert kinds[0] == "skip" and "grow" in kinds and "ok" in kinds, kinds
    # a non-finite loss is counted (the non-finite policy sees it); the scale is kept
    before = jax.device_get(state)
    state, m = step(state, put(dict(batches[0], weights=np.full_like(batches[0]["weights"], np.nan))))
    assert int(state.dropped) == 1 and int(state.loss_scale.skipped) == int(before.loss_scale.skipped)
    assert float(state.loss_scale.scale) == float(before.loss_scale.scale) and int(state.step) == int(before.step)


def test_fp16_overflows_resume_exactly(corpus_dir, tmp_path):
    """Overflow skips at the start (scale 2**26) and after every growth (period 2): a run stopped and resumed
    gives the straight run's params, optimizer state and loss scale bit for bit; no skip is a dropped update."""
    def config_fn(**kw):
        return tiny_config(corpus_dir, model__dtype="float16", optim__loss_scale_init=2.0**26,
                           optim__loss_scale_period=2, model__dropout=0.1, train__log_every=1,
                           train__eval_every=100, train__checkpoint_every=100, **kw)
    # measured: 5 skips (2**26 -> 2**21), 2 finite steps, doubled, overflow again. The stop at 6 falls between
    # the two finite steps: the growth after it needs the restored run of good steps.
    straight, stopped, out = train_resumed(config_fn, tmp_path, steps=8, stop=6)
    rows = [r for r in read_jsonl(f"{straight}/metrics.jsonl") if "train/loss_scale" in r]
    scales = [r["train/loss_scale"] for r in rows]
    assert scales == [r["train/loss_scale"] for r in read_jsonl(f"{stopped}/metrics.jsonl") if "train/loss_scale" in r]
    assert scales[0] == 2.0**25 and any(b == 2 * a for a, b in zip(scales, scales[1:]))  # halved, later grown
    assert rows[-1]["train/overflow_skips"] >= 1 and out["train/dropped_updates"] == 0.0

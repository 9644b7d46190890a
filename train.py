"""Train any supervised-style mode from a config: `python train.py --config=configs/X.py --workdir=DIR`.

Overrides: `--config.optim.lr=3e-4`, `--config=configs/X.py:tiny`. The run resumes from the
latest checkpoint in --workdir automatically. `train_and_evaluate(config, workdir)` is the
importable entry that tests and notebooks call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import checkpoint
import hostenv
import resilience
import metrics as metrics_lib
import objectives
import optim
import sharding
import steps
from data import pipeline, prepared, sources, tokenizer as tokenizer_lib

log = logging.getLogger("lmstack")


def quiet_logs() -> None:
    """Our INFO lines; only warnings from orbax/jax/grain's chatty INFO logging."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    log.setLevel(logging.INFO)


def prepare_data(config, workdir: str):
    """Documents -> split -> tokenizer (saved with the run, reused on resume) -> token streams."""
    if prepared.is_prepared(config.data.path):  # a scripts/prepare_data.py directory: its tokenizer + shards
        tok, train, val = prepared.load_prepared(config.data.path)
        prepared.use_tokenizer_in_workdir(tok, workdir, write=jax.process_index() == 0)
        log.info("prepared data: %d train, %d val tokens (%s tokenizer, %d ids)", len(train), len(val), tok.kind,
                 tok.vocab_size)
        return tok, train, val
    docs, stats = sources.read_documents(config.data.path, config.data.text_field)
    log.info("data: %s", stats.summary())
    train_texts, val_texts = pipeline.split_documents([d.text for d in docs], config.data.split,
                                                      config.data.val_fraction)
    tok_path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(tok_path):
        tok = tokenizer_lib.load_tokenizer(tok_path)
        if tok.kind != config.data.tokenizer:
            raise checkpoint.IncompatibleCheckpointError(
                f"workdir {workdir!r} has a {tok.kind!r} tokenizer but data.tokenizer={config.data.tokenizer!r}")
    else:
        tok = tokenizer_lib.build_tokenizer(config.data.tokenizer, train_texts)
        if jax.process_index() == 0:
            tokenizer_lib.save_tokenizer(tok, tok_path)
    train = pipeline.tokenize_stream(train_texts, tok)
    val = pipeline.tokenize_stream(val_texts, tok)
    log.info("tokens: %d train, %d val (%s tokenizer, %d ids)", len(train), len(val), tok.kind, tok.vocab_size)
    return tok, train, val


def evaluate(eval_step, params, batches, batch_sharding) -> dict:
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(params, sharding.put_batch(batch, batch_sharding)))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["tokens"], 1.0)
    loss = totals["loss_sum"] / n
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/accuracy": totals["correct_sum"] / n}


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    resilience.check_workdir(workdir)
    k = int(config.optim.grad_accum_steps)
    total_steps = int(config.train.steps)

    # ---- Devices and mesh ---------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding)
    if config.data.batch_size % k:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                         f"optim.grad_accum_steps={k}")
    micro_batch = config.data.batch_size // k
    sharding.check_batch_size(micro_batch, mesh, "data.batch_size / optim.grad_accum_steps")
    batch_sharding = sharding.batch_sharding(mesh)

    # ---- Checkpoints: refuse an incompatible workdir before touching it --------------------------
    mngr = checkpoint.make_manager(workdir, config.train.keep_checkpoints, config.train.async_checkpoint)
    config_dict = json.loads(config.to_json())
    latest = mngr.latest_step()
    if latest is not None:
        changed = checkpoint.check_compatible(checkpoint.saved_config(mngr, latest), config_dict, workdir)
        if changed:
            log.info("config changed since the checkpoint (allowed): %s", "; ".join(changed))

    # ---- Input pipeline -------------------------------------------------------------------------
    tok, train_stream, val_stream = prepare_data(config, workdir)
    data_iter = pipeline.train_iterator(train_stream, seq_len=config.data.seq_len, global_batch=micro_batch,
                                        seed=config.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    eval_data = pipeline.eval_batches(val_stream, seq_len=config.data.seq_len, batch_size=micro_batch,
                                      max_batches=config.train.eval_batches)

    # ---- Model, optimizer, sharded state --------------------------------------------------------
    if config.mode not in objectives.OBJECTIVES:
        raise ValueError(f"mode={config.mode!r}: expected one of {sorted(objectives.OBJECTIVES)}")
    objective = objectives.OBJECTIVES[config.mode]
    model = steps.build_model(config, tok.vocab_size)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    state, state_sh = steps.init_state(model, tx, mesh, rules, config.seed, config.data.seq_len)
    if latest is not None:
        state = checkpoint.restore(mngr, latest, steps.abstract_state(state_sh, state), data_iter)
        log.info("resumed from %s at step %d", mngr.directory, latest)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    flops_per_token = model.cfg.flops_per_token(config.data.seq_len)
    log.info("model: %.2fM parameters, %.1f MFLOPs/token; mesh %s", n_params / 1e6, flops_per_token / 1e6,
             dict(mesh.shape))

    train_step = steps.make_train_step(model=model, tx=tx, objective=objective, schedule=schedule, accum=k,
                                       mesh=mesh, rules=rules, state_shardings=state_sh)
    eval_step = steps.make_eval_step(model=model, objective=objective, mesh=mesh, rules=rules,
                                     state_shardings=state_sh)

    # ---- Loop -----------------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
    step = int(jax.device_get(state.step)) // k
    progress = metrics_lib.Progress(total_steps, step)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    nonfinite = resilience.NonFinitePolicy(config.train.on_nonfinite, config.train.max_nonfinite, step,
                                           seen=int(jax.device_get(state.dropped)))
    last, pending = {}, None
    clock = {"t": time.time(), "step": step, "first": True}

    def log_metrics(at_step, device_metrics) -> str:
        """Fetch a log step's metrics (after the next step was dispatched), apply the non-finite policy."""
        m = jax.device_get(device_metrics)
        action = nonfinite.check(at_step, int(m["dropped"]), int(m["last_dropped"]))
        dt, n = time.time() - clock["t"], at_step - clock["step"]
        rate = n * tokens_per_step / dt if dt > 0 and n > 0 else 0.0
        scalars = {"train/loss": float(m["loss"]), "train/lr": float(m["lr"]),
                   "train/grad_norm": float(m["grad_norm"]), "train/dropped_updates": float(m["dropped"]),
                   "perf/tokens_per_s": rate, "perf/step_ms": 1000 * dt / max(n, 1),
                   "perf/mfu": metrics_lib.mfu(flops_per_token, rate / jax.device_count(), config.train.peak_flops)}
        clock.update(t=time.time(), step=at_step)
        writer.write(at_step, scalars)
        progress.print(at_step, scalars)
        last.update(scalars)
        return action

    def save(at_step, force=False):
        try:
            checkpoint.save(mngr, at_step, state, data_iter, config_dict, force=force)
        except Exception as e:  # noqa: BLE001 - re-raised, named, unless it is not a write failure
            if not checkpoint.is_write_failure(e):
                raise
            raise checkpoint.CheckpointWriteError(mngr, at_step, e) from e

    stop_at = min(total_steps, int(config.train.stop_after) or total_steps)
    with resilience.PreemptionGuard() as guard:
        while step < stop_at:
            for _ in range(k):
                batch = sharding.put_batch(next(data_iter), batch_sharding)
                state, step_metrics = train_step(state, batch)
            step += 1
            if clock["first"]:  # the first step includes compilation: start the throughput clock after it
                jax.block_until_ready(state)
                clock.update(t=time.time(), step=step, first=False)
            action = "ok"
            if pending is not None:  # the previous log step's metrics are ready by now
                action = log_metrics(*pending)
                pending = None
            if step % config.train.log_every == 0 or step == stop_at:
                pending = (step, step_metrics)
            if action == "rollback" and mngr.latest_step() is not None:
                back = mngr.latest_step()
                mngr.wait_until_finished()
                restored = checkpoint.restore_state(mngr, back, steps.abstract_state(state_sh, state))
                state = restored.replace(lr_scale=state.lr_scale * config.train.rollback_lr_factor,
                                         dropped=state.dropped, last_dropped=state.last_dropped)
                log.warning("rolled back to step %d (data continues forward); LR scale now %.3g",
                            back, float(state.lr_scale))
                step, pending = back, None
                continue
            if step % config.train.eval_every == 0 or step == stop_at:
                if pending is not None:
                    log_metrics(*pending)
                    pending = None
                scalars = evaluate(eval_step, state.params, eval_data, batch_sharding)
                writer.write(step, scalars)
                progress.print(step, scalars)
                last.update(scalars)
                jax.block_until_ready(state)
                clock.update(t=time.time(), step=step)  # don't charge eval time to training throughput
            if guard.received:
                save(step, force=True)
                break
            if step % config.train.checkpoint_every == 0 or step == stop_at:
                save(step, force=step == stop_at)
        if pending is not None:
            log_metrics(*pending)
        try:
            mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if not checkpoint.is_write_failure(e):
                raise
            raise checkpoint.CheckpointWriteError(mngr, step, e) from e
    mngr.close()
    writer.close()
    last["step"] = step
    if guard.received:
        log.warning("%s received: stopped after step %d with a checkpoint in %s; rerun the same command to resume",
                    guard.name, step, mngr.directory)
        last["preempted"] = True
    return last


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    hostenv.tune_malloc()
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)

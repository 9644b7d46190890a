"""Train any supervised-style mode from a config: `python train.py --config=configs/X.py --workdir=DIR`.

Overrides: `--config.optim.lr=3e-4`, `--config=configs/X.py:tiny`. The run resumes from the
latest checkpoint in --workdir automatically. `train_and_evaluate(config, workdir)` is the
importable entry that tests and notebooks call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

_PROCESS_T0 = time.time()  # before jax is imported: 'perf/since_start_s' includes start-up

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import hostenv  # noqa: E402
import resilience  # noqa: E402
import metrics as metrics_lib  # noqa: E402
import modes  # noqa: E402
import objectives  # noqa: E402
import optim  # noqa: E402
import sharding  # noqa: E402
import steps  # noqa: E402
import warmstart  # noqa: E402

log = logging.getLogger("lmstack")


def quiet_logs() -> None:
    """Our INFO lines; only warnings from orbax/jax/grain's chatty INFO logging."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    log.setLevel(logging.INFO)


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics."""
    resilience.check_workdir(workdir)
    cache_dir = os.path.expanduser(config.train.compile_cache_dir)
    if cache_dir:  # JAX would only warn on each compile and run without the cache
        resilience.check_workdir(cache_dir, what="train.compile_cache_dir")
    hostenv.compile_cache(cache_dir)
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
    if config.mode not in modes.MODES:
        raise ValueError(f"mode={config.mode!r}: expected one of {sorted(modes.MODES)}")
    make_inputs, make_model = modes.MODES[config.mode]
    inputs = make_inputs(config, workdir, micro_batch)
    data_iter = inputs.train_iter

    # ---- Model, optimizer, sharded state --------------------------------------------------------
    objective = objectives.OBJECTIVES[config.mode]
    model = make_model(config, inputs)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    frozen = modes.frozen_params(config)
    if frozen:
        tx = optim.freeze(tx, frozen)
    state, state_sh = steps.init_state(model, tx, mesh, rules, config.seed, config.data.seq_len)
    if config.init_from and latest is None:
        state = warmstart.warm_start(state, state_sh, config.init_from)
    if latest is not None:
        state = checkpoint.restore(mngr, latest, steps.abstract_state(state_sh, state), data_iter)
        log.info("resumed from %s at step %d", mngr.directory, latest)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_trained = sum(x.size for k, v in state.params.items() if k not in frozen for x in jax.tree.leaves(v))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    flops_per_token = model.cfg.flops_per_token(config.data.seq_len)
    log.info("model: %.2fM parameters (%.2fM trained, %.2f%%), optimizer state %.1f MB, %.1f MFLOPs/token; mesh %s",
             n_params / 1e6, n_trained / 1e6, 100 * n_trained / n_params, opt_bytes / 1e6, flops_per_token / 1e6,
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
        scalars.update({f"train/{key}": float(v) for key, v in m.items() if key.endswith("_loss")})  # mlm_loss, ...
        clock.update(t=time.time(), step=at_step)
        writer.write(at_step, scalars)
        progress.print(at_step, scalars)
        last.update(scalars)
        return action

    def save(at_step, force=False):
        with checkpoint.write_errors(mngr, at_step):
            checkpoint.save(mngr, at_step, state, data_iter, config_dict, force=force)

    stop_at = min(total_steps, int(config.train.stop_after) or total_steps)
    # closing(writer): the TensorBoard events logged so far reach the disk on an error exit too
    with contextlib.closing(writer), resilience.PreemptionGuard() as guard:
        while step < stop_at:
            for _ in range(k):
                batch = sharding.put_batch(next(data_iter), batch_sharding)
                state, step_metrics = train_step(state, batch)
            step += 1
            if clock["first"]:  # the first step includes compilation: start the throughput clock after it
                jax.block_until_ready(state)
                clock.update(t=time.time(), step=step, first=False)
            actions = []
            if pending is not None:  # the previous log step's metrics are ready by now
                actions.append(log_metrics(*pending))
                pending = None
            is_eval = step % config.train.eval_every == 0 or step == stop_at
            if step % config.train.log_every == 0 or step == stop_at:
                pending = (step, step_metrics)
                if is_eval:  # evaluation syncs anyway: log this step now
                    actions.append(log_metrics(*pending))
                    pending = None
            back = None
            if "rollback" in actions:  # to the last complete checkpoint (an async write may be in flight)
                mngr.wait_until_finished()
                back = mngr.latest_step()
            if back is not None:
                restored = checkpoint.restore_state(mngr, back, steps.abstract_state(state_sh, state))
                state = restored.replace(lr_scale=state.lr_scale * config.train.rollback_lr_factor,
                                         dropped=state.dropped, last_dropped=state.last_dropped)
                log.warning("rolled back to step %d (data continues forward); LR scale now %.3g",
                            back, float(state.lr_scale))
                step, pending = back, None
                continue
            if is_eval:
                scalars = evaluation.run_eval(eval_step, state.params, inputs, mode=config.mode, model=model,
                                              mesh=mesh, rules=rules, batch_sharding=batch_sharding)
                scalars["perf/since_start_s"] = time.time() - _PROCESS_T0  # wall time to this eval's result
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
        with checkpoint.write_errors(mngr, step):
            mngr.wait_until_finished()
    mngr.close()
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

"""Train any mode from a config: `python train.py --config=configs/X.py --workdir=DIR`.

Overrides: `--config.optim.lr=3e-4`, `--config=configs/X.py:tiny`. The run resumes from the
latest checkpoint in --workdir automatically. `train_and_evaluate(config, workdir)` is the
importable entry that tests and notebooks call. The set-up and tear-down every loop shares
(checks, checkpoints, warm start, metrics, preemption, non-finite policy) are in harness.py;
this file is the supervised loop.
"""

from __future__ import annotations

import logging
import time

_PROCESS_T0 = time.time()  # before jax is imported: 'perf/since_start_s' includes start-up

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import checkpoint  # noqa: E402
import continual  # noqa: E402
import harness  # noqa: E402
import hostenv  # noqa: E402
import overrides  # noqa: E402
import resilience  # noqa: E402
import sharding  # noqa: E402
import steps  # noqa: E402
from rl import guardrails, loop as rl_loop  # noqa: E402

log = logging.getLogger("lmstack")


def quiet_logs() -> None:
    """Our INFO lines; only warnings from orbax/jax/grain's chatty INFO logging."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    log.setLevel(logging.INFO)


def supervised(run, config) -> int:
    """The supervised loop (every mode but the on-policy ones): steps, logs, evals, checkpoints; returns
    the last step."""
    t = config.train
    train_step = steps.make_train_step(model=run.model, tx=run.tx, schedule=run.schedule, accum=run.accum,
                                       mesh=run.mesh, rules=run.rules, state_shardings=run.state_sh,
                                       **continual.train_objective(run.mode.loss(config), config, run.anchor))
    eval_step = steps.make_eval_step(model=run.model, objective=run.mode.loss(config), mesh=run.mesh,
                                     rules=run.rules, state_shardings=run.state_sh)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    step, stop_at = run.start_step, min(t.steps, int(t.stop_after) or t.steps)
    pending = None  # a log step's metrics, fetched after the next step is dispatched (no sync)
    while step < stop_at:
        for _ in range(run.accum):
            batch = next(run.inputs.train_iter)
            if run.mode.trim is not None:  # pairs: columns that are padding in every row are not computed
                batch = run.mode.trim(batch)
            batch = sharding.put_batch(batch, run.batch_sharding)
            run.state, step_metrics = train_step(run.state, batch)
        step += 1
        if step == run.start_step + 1:  # the first step compiled: measure throughput from here
            run.start_clock(step)
        actions = [run.log_train(*pending, tokens_per_step)] if pending else []
        pending = None
        is_eval = step % t.eval_every == 0 or step == stop_at
        if step % t.log_every == 0 or step == stop_at:
            if is_eval:  # evaluation syncs anyway: log this step now
                actions.append(run.log_train(step, step_metrics, tokens_per_step))
            else:
                pending = (step, step_metrics)
        if "rollback" in actions and (back := run.rollback(step)) is not None:
            step, pending = back, None  # the data iterator keeps going forward
            continue
        if is_eval:
            run.evaluate(step, eval_step)
        if run.guard.received:
            run.save(step, force=True)
            break
        if step % t.checkpoint_every == 0 or step == stop_at:
            run.save(step, force=step == stop_at)
    if pending:
        run.log_train(*pending, tokens_per_step)
    return step


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last logged metrics (+ 'step', and 'preempted' if so)."""
    with harness.open_run(config, workdir, process_t0=_PROCESS_T0) as run:
        step = rl_loop.iterate(run) if run.mode.on_policy else supervised(run, config)
    log.info("%s", run.summary_line(step))
    out = dict(run.last, step=step)
    if run.guard.received:
        log.warning("%s received: stopped after step %d with a checkpoint in %s; rerun the same command to resume",
                    run.guard.name, step, run.mngr.directory)
        out["preempted"] = True
    return out


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    hostenv.tune_malloc()
    sharding.initialize_distributed(FLAGS.config.dist)  # several hosts: join them before any device use
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
    return 0


# bad config values, inputs, workdirs, non-finite halts: one line whose message names what to change
main = overrides.guarded(_main, "train.py", errors=(
    ValueError, FileNotFoundError, resilience.WorkdirError, resilience.NonFiniteLossError,
    checkpoint.CheckpointWriteError, guardrails.RLAnomalyError))


if __name__ == "__main__":
    app.run(main, flags_parser=overrides.flags_parser('train.py'))

"""The run harness: what every training loop shares around its steps.

`open_run(config, workdir)` checks the config and its input paths, refuses an incompatible
workdir, builds the mode's inputs, model, optimizer and sharded state, warm-starts or resumes,
and opens the metric writer and the preemption guard. It yields a `Run`; leaving the `with`
block waits for the last checkpoint write and closes the writer (on an error exit too, so what
was logged reaches the disk). A loop (the supervised one in train.py; an RL iteration loop)
only steps and calls `run.log_train`, `run.evaluate`, `run.save` and `run.rollback`.

Order matters: nothing is written to the workdir before the config's input paths are checked,
and the checkpoint directory is created only after the inputs were read without error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax

import bounds
import checkpoint
import continual
import evaluation
import hostenv
import loss_scale
import metrics as metrics_lib
import modes
import preflight
import resilience
import sharding
import steps
import warmstart
from data import answers
from model import build, prune

log = logging.getLogger("lmstack")


@dataclasses.dataclass
class Run:
    """A run's set-up, shared by its loop. `state` is the live TrainState (the loop replaces it)."""
    config: Any
    workdir: str
    mode: modes.Mode
    mesh: Any
    rules: Any
    batch_sharding: Any
    accum: int  # micro-batches per optimizer update
    inputs: modes.Inputs
    model: Any
    tx: Any
    schedule: Callable
    state: Any
    state_sh: Any
    start_step: int  # the checkpoint step resumed from (0 for a new run)
    mngr: Any
    writer: metrics_lib.MetricWriter
    progress: metrics_lib.Progress
    nonfinite: resilience.NonFinitePolicy
    guard: resilience.PreemptionGuard
    config_dict: dict
    flops_per_token: float
    process_t0: float  # when the process started: 'perf/since_start_s' counts from here
    last: dict = dataclasses.field(default_factory=dict)  # the latest value of every logged scalar
    saved_step: int = 0  # the step of the latest checkpoint write started
    anchor: Any = None  # continual.Anchor: theta_0 (+ Fisher) the L2-SP / EWC penalties read; None: no penalty
    _clock: tuple[float, int] = (0.0, 0)  # (time, step) the throughput is measured from

    # ---- Logging ----------------------------------------------------------------------------------
    def start_clock(self, step: int) -> None:
        """Throughput is measured from here (call after the first, compiling, step and after each eval)."""
        jax.block_until_ready(self.state)
        self._clock = (time.time(), step)

    def write(self, step: int, scalars: dict) -> None:
        self.writer.write(step, scalars)
        if self.writer.enabled:  # process 0 logs for all
            self.progress.print(step, scalars)
        self.last.update(scalars)

    def log_train(self, step: int, device_metrics: dict, tokens_per_step: int) -> str:
        """A log step's train metrics (fetched now: call it after the next step was dispatched) -> the
        non-finite policy's action: 'ok', 'skip' or 'rollback' (or NonFiniteLossError for 'halt')."""
        m = jax.device_get(device_metrics)
        action = self.nonfinite.check(step, int(m["dropped"]), int(m["last_dropped"]))
        t0, s0 = self._clock
        dt, n = time.time() - t0, step - s0
        rate = n * tokens_per_step / dt if dt > 0 and n > 0 else 0.0
        scalars = {"train/loss": float(m["loss"]), "train/lr": float(m["lr"]),
                   "train/grad_norm": float(m["grad_norm"]), "train/dropped_updates": float(m["dropped"]),
                   "perf/tokens_per_s": rate, "perf/step_ms": 1000 * dt / max(n, 1),
                   "perf/mfu": metrics_lib.mfu(self.flops_per_token, rate / jax.device_count(),
                                               self.config.train.peak_flops)}
        scalars.update({f"train/{k}": float(v) for k, v in m.items() if k.endswith("_loss")})  # mlm_loss, ...
        scalars.update({f"train/{k}": float(m[k]) for k in ("loss_scale", "overflow_skips") if k in m})  # float16
        self._clock = (time.time(), step)
        self.write(step, scalars)
        return action

    def evaluate(self, step: int, eval_step) -> dict:
        """The mode's evaluation of the live params, logged; the eval's time is not charged to throughput."""
        scalars = evaluation.run_eval(eval_step, self.state.params, self.inputs, mode=self.config.mode,
                                      model=self.model, mesh=self.mesh, rules=self.rules,
                                      batch_sharding=self.batch_sharding)
        if self.config.prune.method != "none":  # the share of zeros in each pruned kernel and over all of them
            scalars.update(prune_scalars(self.state.params, self.config.prune))
        scalars["perf/since_start_s"] = time.time() - self.process_t0  # wall time to this eval's result
        self.write(step, scalars)
        self.start_clock(step)
        return scalars

    # ---- Checkpoints ------------------------------------------------------------------------------
    def save(self, step: int, force: bool = False, extra: dict | None = None) -> None:
        """A checkpoint of the state and the train iterator's position at `step` (asynchronous by default),
        plus a loop's own JSON `extra` state."""
        self.saved_step = step
        with checkpoint.write_errors(self.mngr, step):
            checkpoint.save(self.mngr, step, self.state, self.inputs.train_iter, self.config_dict, force=force,
                            extra=extra)

    def rollback(self, step: int) -> int | None:
        """The non-finite policy's rollback: the last complete checkpoint's state (the data iterator keeps
        going forward) with the LR scaled by train.rollback_lr_factor; returns that checkpoint's step. With
        no checkpoint yet: the current state (its bad updates were dropped) with the LR scaled; None."""
        self.mngr.wait_until_finished()  # an async write may be in flight
        back = self.mngr.latest_step()
        factor = self.config.train.rollback_lr_factor
        if back is None:
            self.state = self.state.replace(lr_scale=self.state.lr_scale * factor)
            log.warning("rollback requested at step %d but no checkpoint exists yet: continuing from the current "
                        "parameters (the non-finite updates were dropped); LR scale now %.3g", step,
                        float(self.state.lr_scale))
            return None
        restored = checkpoint.restore_state(self.mngr, back, steps.abstract_state(self.state_sh, self.state))
        self.state = restored.replace(lr_scale=self.state.lr_scale * factor, dropped=self.state.dropped,
                                      last_dropped=self.state.last_dropped)
        log.warning("rolled back to step %d (data continues forward); LR scale now %.3g", back,
                    float(self.state.lr_scale))
        return back

    def summary_line(self, step: int) -> str:
        """The run's last metrics in one line: loss, validation loss and the mode's headline metrics."""
        parts = [f"finished at step {step}"]
        for key in ("train/loss", "eval/loss") + self.mode.headline:
            if key in self.last:
                parts.append(f"{key} {self.last[key]:.4g}")
        return " | ".join(parts)


def prune_scalars(params, pcfg) -> dict:
    """'prune/sparsity' (over every pruned kernel) and 'prune/sparsity/<param path>' per kernel."""
    report = prune.sparsity_report(prune.prunable_tensors(params, bool(pcfg.include_embedding),
                                                          bool(pcfg.include_heads)))
    return {("prune/sparsity" if k == "global" else f"prune/sparsity/{k}"): v for k, v in report.items()}


def _check_counts(config) -> None:
    """train.* and data.* counts and rates, named with their value (a 0, negative or NaN one otherwise fails
    later as another field's error, a library's message without the field, a division by zero, or not at all:
    keep_checkpoints=-1 was Orbax's error, a NaN rollback_lr_factor a NaN learning rate)."""
    for field, low in (("train.steps", 1), ("data.batch_size", 1), ("data.seq_len", 1), ("train.log_every", 1),
                       ("train.eval_every", 1), ("train.checkpoint_every", 1), ("train.keep_checkpoints", 1),
                       ("train.eval_batches", 0), ("train.stop_after", 0), ("train.max_nonfinite", 0),
                       ("sft.eval_generate", 0), ("pref.eval_generate", 0), ("rl.eval_generate", 0)):  # -1: eval off
        section, name = field.split(".")
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{field}={value!r} must be " + ("a positive integer" if low else "an integer >= 0"))
    for name, zero_ok in (("rollback_lr_factor", False), ("peak_flops", False),
                          ("memory_limit_gb", True)):  # NaN, or a negative LR / FLOP rate / memory
        bounds.check(f"train.{name}", config.train[name], low_ok=zero_ok)


def _checked_config(config) -> tuple[modes.Mode, int, int]:
    """(mode, micro-batches per update, micro-batch) after every check that needs no file or device."""
    mode = modes.get(config)
    k = int(config.optim.grad_accum_steps)  # >= 1: optim.make_optimizer checked it
    if config.data.batch_size % k:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                         f"optim.grad_accum_steps={k}")
    build.model_config(config, num_tokens=1)  # model.* values (model/transformer.ModelConfig), before any write
    answers.check(config.data.answer_check)  # how decoded answers are checked (data.answer_check)
    modes.check_paths(config)  # missing input files name their config field
    continual.check(config, mode)  # continual.* values and continual.replay_path
    return mode, k, config.data.batch_size // k


DATA_FINGERPRINT = "data_fingerprint.json"


def check_inputs_unchanged(config, workdir: str, resuming: bool) -> dict | None:
    """What the run's input paths hold (modes.input_fingerprint: their files and sizes) against the record a
    new run leaves in WORKDIR/data_fingerprint.json (`record_inputs`). On a resume, a file added, removed or
    resized since would have the restored iterator continue at its position in another stream (neither exact
    nor what was trained on): refused, naming the field; deleting the record accepts the change. Returns the
    fingerprint to record (a new run, or a run from before the record existed), else None."""
    path = os.path.join(workdir, DATA_FINGERPRINT)
    now = modes.input_fingerprint(config)
    if not (resuming and os.path.exists(path)):
        return now
    with open(path, encoding="utf-8") as f:
        before = json.load(f)
    changed = [f"{k}={v['path']!r}: {_change(before[k], v)}"
               for k, v in now.items() if k in before and v["digest"] != before[k]["digest"]]
    if changed:
        raise ValueError(f"the run's inputs changed since it started ({'; '.join(changed)}): resuming would "
                         f"continue the saved data position in a different stream, or score with another reward "
                         f"model. Restore them, start a new --workdir, or delete {path} to go on with the change")
    return None


def _change(before: dict, now: dict) -> str:
    if "step" in now:  # a reward-model run (modes.input_fingerprint)
        return f"its latest checkpoint was step {before.get('step')} when this run started, now {now['step']}"
    same_totals = (now["files"], now["bytes"]) == (before["files"], before["bytes"])
    return (f"{before['files']} files, {before['bytes']:,} bytes -> {now['files']} files, {now['bytes']:,} bytes"
            + (" (a file renamed, or resized and another by as much)" if same_totals else ""))


def record_inputs(workdir: str, fingerprint: dict | None) -> None:
    if fingerprint is not None and jax.process_index() == 0:
        with open(os.path.join(workdir, DATA_FINGERPRINT), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f, indent=1, sort_keys=True)
            f.write("\n")


def _resume_step(workdir: str, config_dict: dict, mode: modes.Mode) -> int | None:
    """The latest complete checkpoint's step (None: a new run), after refusing an incompatible config.
    Read-only: nothing in the workdir is created or cleaned here."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    try:
        mngr = checkpoint.open_read_only(workdir)
    except FileNotFoundError:  # a checkpoints directory with no complete checkpoint
        return None
    try:
        latest = mngr.latest_step()
        changed = checkpoint.check_compatible(checkpoint.saved_config(mngr, latest), config_dict, workdir,
                                              mode.all_must_match(), mode.all_added_defaults())
    finally:
        mngr.close()
    if changed:
        log.info("config changed since the checkpoint (allowed): %s", "; ".join(changed))
    return latest


@contextlib.contextmanager
def open_run(config, workdir: str, process_t0: float | None = None):
    """Set up a run (resumed from `workdir` when it holds a checkpoint) and yield its `Run`."""
    _check_counts(config)
    total_steps = int(config.train.steps)  # RL modes: iterations, each of mode.updates_per_step optimizer updates
    tx, schedule, frozen = modes.optimizer(config)  # refuses lora.rank in a mode without adapters
    scale = loss_scale.initial(config.model.dtype, config.optim)  # None unless model.dtype='float16'
    mode, k, micro_batch = _checked_config(config)
    modes.check_workdir_outside_inputs(config, workdir)
    # ---- Devices and mesh (sizes checked against the devices before the workdir is created) --------
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding)
    rows, what = modes.device_rows(config, mode, micro_batch)
    sharding.check_batch_size(rows, mesh, what)
    cache_dir = os.path.expanduser(config.train.compile_cache_dir)
    if cache_dir:  # JAX would only warn on each compile and run without the cache
        resilience.check_workdir(cache_dir, what="train.compile_cache_dir")
    created = not os.path.isdir(workdir)  # by this start: removed again if the set-up fails (below)
    resilience.check_workdir(workdir)
    lock = resilience.WorkdirLock(workdir, enabled=jax.process_index() == 0)  # one run at a time
    set_up = False
    try:
        hostenv.compile_cache(cache_dir)

        # ---- An incompatible workdir is refused before anything is written -------------------------
        config_dict = json.loads(config.to_json())
        latest = _resume_step(workdir, config_dict, mode)
        fingerprint = check_inputs_unchanged(config, workdir, resuming=latest is not None)

        # ---- Inputs, model, sharded state: warm start (new runs) or resume ---------------------------
        inputs = mode.inputs(config, workdir, micro_batch)
        model = mode.model(config, inputs)
        if config.train.preflight:  # before compiling or allocating: an error with changes that would fit
            preflight.check(config, mode, inputs)
        state, state_sh = steps.init_state(model, tx, mesh, rules, config.seed, config.data.seq_len, scale)
        mngr = checkpoint.make_manager(workdir, config.train.keep_checkpoints, config.train.async_checkpoint)
        if config.init_from and latest is None:  # weights, or the full state (continual.init_state)
            state = warmstart.continue_from(state, state_sh, config)
        if latest is not None:
            state = checkpoint.restore(mngr, latest, steps.abstract_state(state_sh, state), inputs.train_iter)
            log.info("resumed from %s at step %d", mngr.directory, latest)
        anchor = continual.anchor(config, workdir, objective=mode.loss(config), model=model, inputs=inputs,
                                  params=state.params, params_sh=state_sh.params, new_run=latest is None,
                                  micro_batch=micro_batch)  # L2-SP / EWC: theta_0 and the Fisher (else None)
        start = latest or 0
        _log_model(state, frozen, model, config, mesh)

        writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
        nonfinite = resilience.NonFinitePolicy(config.train.on_nonfinite, config.train.max_nonfinite, start,
                                               seen=int(jax.device_get(state.dropped)))
        try:
            with resilience.PreemptionGuard() as guard:
                run = Run(config=config, workdir=workdir, mode=mode, mesh=mesh, rules=rules,
                          batch_sharding=sharding.batch_sharding(mesh), accum=k, inputs=inputs, model=model, tx=tx,
                          schedule=schedule, state=state, state_sh=state_sh, start_step=start, mngr=mngr,
                          writer=writer, progress=metrics_lib.Progress(total_steps, start, headline=mode.headline),
                          nonfinite=nonfinite, guard=guard, config_dict=config_dict,
                          flops_per_token=model.cfg.flops_per_token(config.data.seq_len),
                          process_t0=time.time() if process_t0 is None else process_t0, saved_step=start,
                          anchor=anchor)
                record_inputs(workdir, fingerprint)  # set up without error: what its data is, for later resumes
                set_up = True
                yield run
                with checkpoint.write_errors(mngr, run.saved_step):
                    mngr.wait_until_finished()
        except BaseException:
            try:
                writer.close()
            except OSError as e:  # a full disk fails the metric files' flush too: the run's error stays the one raised
                log.warning("closing the metric files failed as well: %s", e)
            raise
        writer.close()
        mngr.close()
    finally:
        lock.release()
        if created and not set_up and jax.process_count() == 1:
            _remove_if_only_set_up(workdir)


# What a start writes before it trains, all rebuilt by the next start: a workdir that a failed start created
# and that holds nothing else is removed (unreadable inputs, a model that does not fit: a directory that looked
# like a run, and was not). Anything costly it wrote (DPO's reference log-probs, a continual anchor) keeps it.
_SET_UP_FILES = ("tokenizer.json", "chat_template.json", "labels.json", DATA_FINGERPRINT, "checkpoints")


def _remove_if_only_set_up(workdir: str) -> None:
    try:
        entries = os.listdir(workdir)
        if all(e in _SET_UP_FILES for e in entries) and not checkpoint.has_checkpoint(workdir):
            shutil.rmtree(workdir)
    except OSError as e:
        log.warning("could not remove the workdir %r of this failed start: %s", workdir, e)


def _log_model(state, frozen, model, config, mesh) -> None:
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_trained = sum(x.size for k, v in state.params.items() if k not in frozen for x in jax.tree.leaves(v))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    log.info("model: %.2fM parameters (%.2fM trained, %.2f%%), optimizer state %.1f MB, %.1f MFLOPs/token; mesh %s",
             n_params / 1e6, n_trained / 1e6, 100 * n_trained / n_params, opt_bytes / 1e6,
             model.cfg.flops_per_token(config.data.seq_len) / 1e6, dict(mesh.shape))

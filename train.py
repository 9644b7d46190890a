"""Train any supervised-style mode from a config: `python train.py --config=configs/X.py --workdir=DIR`.

Overrides: `--config.optim.lr=3e-4`, `--config=configs/X.py:tiny`. The run resumes from the
latest checkpoint in --workdir automatically. `train_and_evaluate(config, workdir)` is the
importable entry that tests and notebooks call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import flax
import flax.traverse_util
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
from data import classify as classify_data, formats, mlm as mlm_data, pipeline, prepared, sources, tokenizer as tokenizer_lib
from model import heads

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


def evaluate(eval_step, params, batches, batch_sharding, summary) -> dict:
    """Adds the eval step's metric sums over `batches`; `summary` (objectives.SUMMARIES) makes the scalars."""
    outputs = (jax.device_get(eval_step(params, sharding.put_batch(b, batch_sharding))) for b in batches)
    return summary(objectives.sum_metrics(outputs))


# ---- Modes: each picks its input pipeline and its model; the objective is objectives.OBJECTIVES ----

@dataclasses.dataclass
class Inputs:
    tokenizer: tokenizer_lib.Tokenizer
    train_iter: object  # grain iterator of this process's batches (checkpointed)
    eval_batches: list
    num_classes: int = 0  # mode='classify'


def causal_inputs(config, workdir: str, micro_batch: int) -> Inputs:
    tok, train_stream, val_stream = prepare_data(config, workdir)
    data_iter = pipeline.train_iterator(train_stream, seq_len=config.data.seq_len, global_batch=micro_batch,
                                        seed=config.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    eval_data = pipeline.eval_batches(val_stream, seq_len=config.data.seq_len, batch_size=micro_batch,
                                      max_batches=config.train.eval_batches)
    return Inputs(tok, data_iter, eval_data)


def _documents(stream: pipeline.TokenStream, eos_id: int) -> list[np.ndarray]:
    """A packed token stream back into its documents (each without its trailing <eos>)."""
    cuts = np.flatnonzero(np.diff(stream.segments)) + 1
    return [d[:-1] if len(d) and d[-1] == eos_id else d for d in np.split(stream.tokens, cuts)]


def mlm_inputs(config, workdir: str, micro_batch: int) -> Inputs:
    tok, train_stream, val_stream = prepare_data(config, workdir)
    m = config.mlm

    def source(stream, seed):
        return mlm_data.MlmSource(_documents(stream, tok.eos_id), config.data.seq_len, seed=seed,
                                  base_size=tok.base_size, cls_id=tok.special_id("<cls>"),
                                  sep_id=tok.special_id("<sep>"), mask_id=tok.special_id("<mask>"),
                                  pad_id=tok.pad_id, nsp=m.nsp, mask_prob=m.mask_prob,
                                  mask_token_frac=m.mask_token_frac, random_token_frac=m.random_token_frac)
    train_src, val_src = source(train_stream, config.seed), source(val_stream, config.seed + 1)
    log.info("mlm: %d train, %d val examples (nsp=%s)", len(train_src), len(val_src), m.nsp)
    data_iter = mlm_data.train_iterator(train_src, global_batch=micro_batch, seed=config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count())
    eval_data = mlm_data.eval_batches(val_src, batch_size=micro_batch, max_batches=config.train.eval_batches)
    return Inputs(tok, data_iter, eval_data)


def _classify_tokenizer(config, workdir: str, texts: list[str]) -> tokenizer_lib.Tokenizer:
    """The run's saved tokenizer; else the warm-start run's (ids must match its embedding); else a new one."""
    tok_path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(tok_path):
        return tokenizer_lib.load_tokenizer(tok_path)
    if config.init_from:
        tok = tokenizer_lib.load_tokenizer(os.path.join(config.init_from, "tokenizer.json"))
    else:
        tok = tokenizer_lib.build_tokenizer(config.data.tokenizer, texts)
    if jax.process_index() == 0:
        tokenizer_lib.save_tokenizer(tok, tok_path)
    return tok


def classify_inputs(config, workdir: str, micro_batch: int) -> Inputs:
    c = config.classify
    train_recs, stats = classify_data.read_split(config.data.path, strict=c.strict)
    if c.val_path:
        val_recs, val_stats = classify_data.read_split(c.val_path, strict=c.strict)
    else:
        held = [pipeline._hash_unit(formats.record_text(r, "classification")) < config.data.val_fraction
                for _, r in train_recs]
        val_recs = [x for x, h in zip(train_recs, held) if h]
        train_recs = [x for x, h in zip(train_recs, held) if not h]
        val_stats = sources.ReadStats()
        if not val_recs or not train_recs:
            raise sources.DataError(f"data.val_fraction={config.data.val_fraction} of {config.data.path!r} gave "
                                    f"{len(train_recs)} train and {len(val_recs)} validation records")
    labels_path = os.path.join(workdir, "labels.json")
    labels = classify_data.build_labels(train_recs)
    if os.path.exists(labels_path):
        saved = classify_data.load_labels(labels_path)
        if saved != labels:
            raise checkpoint.IncompatibleCheckpointError(
                f"{labels_path} holds labels {saved} but the training split has {labels}")
    elif jax.process_index() == 0:
        classify_data.save_labels(labels, labels_path)
    if len(labels) < 2:
        raise sources.DataError(f"{config.data.path!r}: a classifier needs >= 2 labels, found {labels}")
    tok = _classify_tokenizer(config, workdir, [formats.record_text(r, "classification") for _, r in train_recs])
    pool = "last" if config.model.causal else "first"
    make = functools.partial(classify_data.make_source, tok=tok, labels=labels, seq_len=config.data.seq_len,
                             pool=pool, strict=c.strict)
    train_src, val_src = make(train_recs, stats=stats), make(val_recs, stats=val_stats)
    log.info("classify: %d labels; train %d examples (skipped: %s); validation %d (skipped: %s)", len(labels),
             len(train_src), stats.skipped or "none", len(val_src), val_stats.skipped or "none")
    data_iter = pipeline.shuffled_batches(train_src, global_batch=micro_batch, seed=config.seed,
                                          what="classification examples", process_index=jax.process_index(),
                                          process_count=jax.process_count())
    eval_data = classify_data.eval_batches(val_src, batch_size=micro_batch, max_batches=config.train.eval_batches)
    return Inputs(tok, data_iter, eval_data, num_classes=len(labels))


def causal_model(config, inputs: Inputs):
    return steps.build_model(config, inputs.tokenizer.vocab_size)


def mlm_model(config, inputs: Inputs):
    if config.model.causal:
        raise ValueError("mode='mlm' needs model.causal=False (a bidirectional encoder)")
    if config.mlm.nsp and config.model.type_vocab_size < 2:
        raise ValueError(f"mlm.nsp=True needs model.type_vocab_size >= 2 (sentence A/B), "
                         f"got {config.model.type_vocab_size}")
    return heads.MaskedLM(steps.model_config(config, inputs.tokenizer.vocab_size), nsp=bool(config.mlm.nsp))


def classify_model(config, inputs: Inputs):
    return heads.Classifier(steps.model_config(config, inputs.tokenizer.vocab_size), inputs.num_classes,
                            pool="last" if config.model.causal else "first")


MODES = {  # mode -> (input builder, model builder)
    "causal": (causal_inputs, causal_model),
    "mlm": (mlm_inputs, mlm_model),
    "classify": (classify_inputs, classify_model),
}


def warm_start(state, state_sh, init_from: str):
    """Backbone params from `init_from`'s latest checkpoint (a wrapper's 'backbone', or a causal run's
    whole tree); everything else keeps its fresh init. Mismatched shapes raise naming the params."""
    _, loaded, at = checkpoint.load_for_inference(init_from)
    source = flax.traverse_util.flatten_dict(dict(loaded.get("backbone", loaded)), sep="/")
    target = flax.traverse_util.flatten_dict(dict(state.params["backbone"]), sep="/")
    bad = [f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(v.shape)}" for k, v in target.items()
           if k in source and tuple(source[k].shape) != tuple(v.shape)]
    if bad:
        raise checkpoint.IncompatibleCheckpointError(
            f"init_from={init_from!r}: parameter shapes differ:\n  " + "\n  ".join(bad))
    shardings = flax.traverse_util.flatten_dict(dict(state_sh.params["backbone"]), sep="/")
    merged = {k: jax.device_put(np.asarray(source[k]), shardings[k]) if k in source else v
              for k, v in target.items()}
    loaded_names = sorted(k for k in target if k in source)
    fresh = sorted(f"backbone/{k}" for k in target if k not in source)
    fresh += sorted(k for k in state.params if k != "backbone")
    log.info("warm start from %s (step %d): loaded %d backbone params (%s); re-initialised: %s; unused: %s",
             init_from, at, len(loaded_names), ", ".join(loaded_names), ", ".join(fresh) or "none",
             ", ".join(sorted(set(source) - set(target))) or "none")
    params = dict(state.params, backbone=flax.traverse_util.unflatten_dict(merged, sep="/"))
    return state.replace(params=params)


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
    if config.mode not in MODES:
        raise ValueError(f"mode={config.mode!r}: expected one of {sorted(MODES)}")
    make_inputs, make_model = MODES[config.mode]
    inputs = make_inputs(config, workdir, micro_batch)
    data_iter, eval_data = inputs.train_iter, inputs.eval_batches

    # ---- Model, optimizer, sharded state --------------------------------------------------------
    objective = objectives.OBJECTIVES[config.mode]
    model = make_model(config, inputs)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    if config.mode == "classify" and config.classify.freeze_backbone:
        tx = optim.freeze(tx, ("backbone",))
    state, state_sh = steps.init_state(model, tx, mesh, rules, config.seed, config.data.seq_len)
    if config.init_from and latest is None:
        if "backbone" not in state.params:
            raise ValueError(f"init_from needs a model with a 'backbone' (mode='classify'), not mode={config.mode!r}")
        state = warm_start(state, state_sh, config.init_from)
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
        scalars.update({f"train/{key}": float(v) for key, v in m.items() if key.endswith("_loss")})  # mlm_loss, ...
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
                scalars = evaluate(eval_step, state.params, eval_data, batch_sharding,
                                   objectives.SUMMARIES[config.mode])
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

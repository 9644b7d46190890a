"""Orbax checkpoints: train state + grain iterator state + the run's config, resumed from the workdir.

A workdir belongs to one run: restoring under a config whose model/data/mode differ from the
saved one is an error listing the differing fields (never a silent overwrite). Fields that
do not change what is saved (lr, steps, logging) may differ and are reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from model import prune

# Config fields every mode's resume must match: they fix parameter shapes, the data order and the
# meaning of the saved state (each mode adds its own: modes.Mode.must_match). A prefix ending in '.'
# covers a whole sub-config.
MUST_MATCH = ("mode", "seed", "model.", "data.path", "data.text_field", "data.tokenizer", "data.seq_len",
              "data.batch_size", "data.split", "data.val_fraction", "optim.grad_accum_steps", "init_from", "lora.",
              "quant.", "prune.", "continual.",
              "optim.name", "optim.adafactor_min_dim")  # these two fix the optimizer state's structure

# Common fields added after checkpoints existed: absent from a saved config means this value (each mode
# adds its own section's: modes.Mode.added_defaults).
ADDED_DEFAULTS = {"model.type_vocab_size": 0, "init_from": "", "data.answer_check": "exact", "lora.rank": 0,
                  "lora.alpha": 16.0,
                  "lora.targets": ["attn/query", "attn/key", "attn/value", "attn/out", "mlp/gate", "mlp/up", "mlp/down"],
                  "lora.base_dtype": "float32", "lora.train_new_rows": True,
                  "train.compile_cache_dir": "", "quant.bits": 0, "quant.group": 0, "quant.embed_bits": 8,
                  "quant.stored": False, "quant.act_scale": False,
                  "prune.method": "none", "prune.sparsity": 0.5, "prune.initial_sparsity": 0.0, "prune.start_step": 0,
                  "prune.end_step": 0, "prune.frequency": 100, "prune.n": 2, "prune.m": 4, "prune.scope": "layer",
                  "prune.include_embedding": False, "prune.include_heads": False,
                  "optim.name": "adamw", "optim.momentum": 0.9, "optim.nesterov": False, "optim.adafactor_min_dim": 128,
                  "optim.muon_beta": 0.95, "optim.muon_rms": 0.2, "optim.loss_scale_init": 2.0**15,
                  "optim.loss_scale_period": 2000,
                  "continual.init_state": "weights", "continual.replay_path": "", "continual.replay_ratio": 0.0,
                  "continual.l2sp": 0.0, "continual.ewc": 0.0, "continual.fisher_batches": 8,
                  "mesh.dcn_data": 1, "mesh.dcn_fsdp": 1, "mesh.dcn_tensor": 1, "dist.initialize": "auto",
                  "dist.coordinator_address": "", "dist.num_processes": 0, "dist.process_id": -1}


class IncompatibleCheckpointError(ValueError):
    pass


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; names the step, the cause and what is still intact."""

    def __init__(self, mngr: ocp.CheckpointManager, step: int, cause: Exception):
        intact = [s for s in mngr.all_steps() if s != step]
        super().__init__(getattr(cause, "errno", None), f"writing checkpoint {step} under {str(mngr.directory)!r} "
                         f"failed: {cause}; earlier checkpoints intact: {intact or 'none'}")


@contextlib.contextmanager
def write_errors(mngr: ocp.CheckpointManager, step: int):
    """Turns a failed (possibly asynchronous) checkpoint write into a CheckpointWriteError."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised as is unless it is a write failure
        if not is_write_failure(e):
            raise
        raise CheckpointWriteError(mngr, step, e) from e


def is_write_failure(e: Exception) -> bool:
    """OSError, or the storage layer's (tensorstore) errors for a full or unwritable disk."""
    return isinstance(e, OSError) or any(m in str(e) for m in ("No space left", "RESOURCE_EXHAUSTED",
                                                               "Permission denied", "Read-only file system"))


def use_replica_parallel_saves() -> bool:
    """Orbax's replica-parallel saving (its default off GPU) divides each replicated array among the
    devices holding a copy, which pays where several processes share the writing. In one process every
    copy is local: it buys nothing there and costs a compiled slice program per array shape and replica
    at the first save (48 of them for a tiny model over 8 CPU devices). So it is on only when the run has
    several processes; a save restores the same values either way."""
    global _replica_parallel
    on = jax.process_count() > 1
    if _replica_parallel != on:  # once per process (Orbax warns at each override of its jax.Array handler)
        with _without_absl_notice("Type handler registry type"):
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=on), override=True)
        _replica_parallel = on
    return on


_replica_parallel: bool | None = None


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The writing process's own manager: creates checkpoints/ and deletes the unfinished temporary
    checkpoints it finds there (an earlier attempt's, killed mid-write). Never for reading a run another
    process may be writing: that would delete its in-flight checkpoint (readers use open_read_only)."""
    use_replica_parallel_saves()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, config_dict: dict, force: bool = False,
         extra: dict | None = None) -> bool:
    """`extra`: a loop's own small JSON state (an RL run's KL coefficient); floats round-trip exactly."""
    items = dict(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                 config=ocp.args.JsonSave(config_dict))
    if extra is not None:
        items["extra"] = ocp.args.JsonSave(extra)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_extra(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The `extra` JSON saved with `step` (an error naming the step if it has none)."""
    return mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
    """State onto the shardings in `abstract_state` (any mesh); the iterator's position is set in place.
    Grain writes one iterator file per process (data/process_<i>-of-<n>.json); a checkpoint written by
    another process count restores from its process 0's file: the state (the global batch index,
    data/pipeline._host_batches) is the same in every process and for every count."""
    target, rebuild = _state_target(mngr, step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(target))
    other = _other_count_iterator_file(mngr, step)
    if other is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    if other is not None:
        with open(other) as f:
            data_iter.set_state(json.load(f))
        logging.getLogger("lmstack").info("data iterator restored from %s (written by another process count)", other)
    return rebuild(out["state"])


def _other_count_iterator_file(mngr: ocp.CheckpointManager, step: int) -> str | None:
    """Process 0's iterator file when `step` has none for this process count (else None)."""
    data = os.path.join(str(mngr.directory), str(step), "data")
    own = os.path.join(data, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if os.path.exists(own) or not os.path.isdir(data):
        return None
    zeros = sorted(f for f in os.listdir(data) if f.startswith("process_0-of-") and f.endswith(".json"))
    return os.path.join(data, zeros[0]) if zeros else None


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Only the train state (the data iterator keeps its position): used by rollback."""
    target, rebuild = _state_target(mngr, step, abstract_state)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return rebuild(out["state"])


def _state_target(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """(restore target, rebuild). A checkpoint written before a TrainState field existed (`loss_scale`, added
    with float16 training) lacks it; when this run holds None there, the other fields are restored as a dict
    and the state rebuilt with the None, so an upgrade never strands a run's checkpoints."""
    if not dataclasses.is_dataclass(abstract_state):
        return abstract_state, lambda s: s
    on_disk = set(ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / "state").keys())
    fields = [f.name for f in dataclasses.fields(abstract_state)]
    absent = [n for n in fields if n not in on_disk and getattr(abstract_state, n) is None]
    if not absent:
        return abstract_state, lambda s: s
    target = {n: getattr(abstract_state, n) for n in fields if n not in absent}
    return target, lambda s: dataclasses.replace(abstract_state, **s)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, current: dict, must_match=MUST_MATCH,
                       added=ADDED_DEFAULTS) -> tuple[list[str], list[str]]:
    """(incompatible, harmless) differences, each as 'field: saved -> current'. `must_match` and `added`
    are the common tables plus the mode's (modes.Mode)."""
    a, b = flatten(saved), flatten(json.loads(json.dumps(current)))
    bad, ok = [], []
    for key in sorted(set(a) | set(b)):
        if key not in a and key in added:
            a[key] = added[key]
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        must = any(key == m or (m.endswith(".") and key.startswith(m)) for m in must_match)
        (bad if must else ok).append(line)
    return bad, ok


def check_compatible(saved: dict, current: dict, workdir: str, must_match=MUST_MATCH,
                     added=ADDED_DEFAULTS) -> list[str]:
    """Raise naming every incompatible field; return the harmless differences."""
    bad, ok = config_differences(saved, current, must_match, added)
    if bad:
        raise IncompatibleCheckpointError(
            f"workdir {workdir!r} holds a checkpoint from an incompatible config; differing fields:\n  "
            + "\n  ".join(bad) + "\nUse a new --workdir, or restore the saved values.")
    return ok


def load_for_inference(workdir: str, step: int | None = None) -> tuple[dict, dict, int]:
    """(saved config dict, params, step) from a run's workdir: latest complete checkpoint by default.
    Read-only, so safe on a run that is still training (its in-flight checkpoint is left alone)."""
    mngr = open_read_only(workdir)
    try:
        available = sorted(mngr.all_steps())
        step = available[-1] if step is None else step
        if step not in available:
            raise FileNotFoundError(f"no checkpoint for step {step} under {str(mngr.directory)!r}; "
                                    f"available steps: {available}")
        config = saved_config(mngr, step)
        # arrays saved on other devices (another process count, a pod) are read replicated onto these
        fallback = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
                                              jax.sharding.PartitionSpec())
        state = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(fallback_sharding=fallback)))["state"]
    finally:
        mngr.close()
    params = state["params"] if isinstance(state, dict) else state.params
    return config, prune.unpack_tree(params), step  # a compactly stored pruned checkpoint: dense again


def save_params(workdir: str, step: int, params, config_dict: dict) -> str:
    """A params-only checkpoint (export: merged LoRA, converted weights) that load_for_inference,
    scripts/generate.py and config.init_from read like a training checkpoint. `workdir` must hold no
    checkpoints yet: checked before the writing manager exists, which would clean a live run's."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise IncompatibleCheckpointError(f"{workdir!r} already holds checkpoints ({sorted(os.listdir(directory))} "
                                          f"in {directory!r}); export into a new directory")
    mngr = make_manager(workdir, keep=1, async_save=False)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                            config=ocp.args.JsonSave(config_dict)))
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(os.path.abspath(workdir), "checkpoints", str(step))


RUN_FILES = ("tokenizer.json", "chat_template.json", "labels.json")  # what a run directory needs beside checkpoints


def check_new_dir(out: str, flag: str = "--out") -> None:
    """`out` must not exist, or be an empty directory (a derived run never overwrites anything)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        what = sorted(os.listdir(out))[:5] if os.path.isdir(out) else "a file"
        raise ValueError(f"{flag}={out!r} already exists and is not empty ({what}): give a new directory")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def save_run(out: str, step: int, params, config_dict: dict, source: str,
             json_files: Callable[[str], dict] | None = None) -> str:
    """A new run directory `out` derived from the run `source` (merged, quantized, pruned weights): a
    params-only checkpoint, the source's tokenizer / chat template / labels, and the JSON files
    `json_files(run_dir)` returns ({file name: object}; it may measure the written checkpoint). Built
    in a hidden directory beside `out` and renamed into place last: on any error nothing is at `out`."""
    check_new_dir(out)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        save_params(tmp, step, params, config_dict)
        for name in RUN_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), os.path.join(tmp, name))
        for name, obj in (json_files(tmp) if json_files else {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1)
        check_new_dir(out)  # still new or empty
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def open_read_only(workdir: str) -> ocp.CheckpointManager:
    """A manager over a run's checkpoints that never creates, writes or cleans anything (safe on a live run)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints directory {directory!r}: is {workdir!r} a training run's workdir?")
    with _without_absl_notice("Given directory is read only"):
        mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0))
    if not mngr.all_steps():
        mngr.close()
        raise FileNotFoundError(f"no complete checkpoint under {directory!r}")
    return mngr


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a complete checkpoint (a run to resume), without creating anything."""
    try:
        open_read_only(workdir).close()
    except FileNotFoundError:
        return False
    return True


def latest_step(workdir: str) -> int:
    """A run's latest complete checkpoint step (read-only; FileNotFoundError when it has none)."""
    mngr = open_read_only(workdir)
    try:
        return int(mngr.latest_step())
    finally:
        mngr.close()


@contextlib.contextmanager
def _without_absl_notice(prefix: str):
    """Orbax's one expected warning starting with `prefix` (logged through absl) dropped while the block runs;
    every other message kept. 'Given directory is read only=DIR': every read-only manager logs it; 'Type
    handler registry type ... overriding': our own jax.Array handler replacing Orbax's default."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(keep)
    try:
        yield
    finally:
        absl_logger.removeFilter(keep)


def has_packed_params(mngr: ocp.CheckpointManager, step: int) -> bool:
    """Whether `step` stores pruned tensors compactly (model/prune.pack: scripts/prune.py's output)."""
    absl_logger = logging.getLogger("absl")  # its note that a params-only checkpoint has no step metadata file
    no_note = lambda r: not r.getMessage().startswith("Metadata file does not exist")  # noqa: E731
    absl_logger.addFilter(no_note)
    try:
        tree = ocp.StandardCheckpointer().metadata(os.path.join(str(mngr.directory), str(step), "state"))
    finally:
        absl_logger.removeFilter(no_note)
    tree = getattr(tree, "item_metadata", tree)
    return prune.has_packed(dict(tree.get("params", {})) if hasattr(tree, "get") else {})


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
    """Only the params, onto the shardings in `abstract_params` (any mesh); the optimizer state is not read.
    Compactly stored pruned tensors are read whole and made dense (a params-only checkpoint: nothing else)."""
    if has_packed_params(mngr, step):
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        dense = prune.unpack_tree(jax.tree.map(np.asarray, state["params"]))
        return jax.tree.map(lambda a, x: jax.device_put(np.asarray(x, a.dtype), a.sharding), abstract_params, dense)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
    args = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                  partial_restore=True)
    return mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

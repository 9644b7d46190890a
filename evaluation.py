"""Evaluation as training runs it, and of a saved run on any split or data.

`run_eval` is the eval of every train.py eval step: the mode's metric sums over the eval batches
(the mode's summary) plus `Inputs.extra_eval`. `evaluate_run` restores a run's params from its
workdir (read-only, onto this process's mesh) and runs that same eval on the run's validation
split or on other data (the mode's `other_eval_data` says how other data replaces its eval split).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import types

import jax
import ml_collections
import numpy as np

import checkpoint
import modes
import objectives
import sharding
import steps
from data import prepared, sources

ALL_BATCHES = 2**31 - 1  # train.eval_batches meaning "every batch" for every mode


def summed_eval(eval_step, params, batches, batch_sharding, summary) -> dict:
    """Adds the eval step's metric sums over `batches`; `summary` (the mode's) makes the scalars. Every process
    holds the whole eval set (small); each places only its devices' rows."""
    outputs = (jax.device_get(eval_step(params, sharding.put_global_batch(b, batch_sharding))) for b in batches)
    return summary(objectives.sum_metrics(outputs))


def run_eval(eval_step, params, inputs: modes.Inputs, *, mode: str, model, mesh, rules, batch_sharding) -> dict:
    """The mode's eval scalars over `inputs.eval_batches`, plus `inputs.extra_eval` (under the mesh)."""
    scalars = summed_eval(eval_step, params, inputs.eval_batches, batch_sharding, modes.MODES[mode].summary)
    if inputs.extra_eval is not None:
        with sharding.activate(mesh, rules):
            scalars.update(inputs.extra_eval(model, params))
    return scalars


def count_examples(batches: list[dict], *, per_segment: bool = False) -> int:
    """Rows that are not padding (padding rows have all-zero segment ids): windows, records, pairs; with
    `per_segment`, the segments in them (packed SFT rows number their conversations 1..k)."""
    if per_segment:
        return sum(int(b["segment_ids"].max(axis=-1).sum()) for b in batches)
    key = lambda b: "segment_ids" if "segment_ids" in b else "chosen_segment_ids"  # noqa: E731 (pairs: one row each)
    return sum(int((b[key(b)] != 0).any(axis=-1).sum()) for b in batches)


def scored_data(config, data: str) -> dict:
    """What the eval set was cut from: {"data": the file/dir scored} plus "held_out" when it is a share of
    data.path (not a file of its own)."""
    if data:
        return {"data": data}
    for field in modes.get(config).paths:  # the mode's validation file, if the run had one (classify.val_path,
        section, name = field.split(".")    # pref.val_path for reward / dpo, rl.val_path for grpo / ppo, ...)
        if name == "val_path" and config.get(section) is not None and config[section].get("val_path"):
            return {"data": config[section].val_path}
    path = config.data.path or "the embedded corpus"
    text = modes.get(config).text_corpus
    if text and prepared.is_prepared(config.data.path):
        return {"data": path, "held_out": "the prepared dataset's 'val' split"}
    if text and config.data.split == "tail":
        how = f"the last data.val_fraction={config.data.val_fraction} of every document (data.split='tail')"
    else:
        how = f"by hash (data.val_fraction={config.data.val_fraction})"
    return {"data": path, "held_out": f"held out from data.path {how}"}


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def training_rows(config, workdir: str, rows: int) -> tuple[modes.Inputs, list[dict]]:
    """The run's inputs rebuilt as training built them, and its first `rows` training rows (batches, the
    last one cut): calibration data for compression (scripts/quantize.py, scripts/prune.py). Built in a
    scratch directory holding a copy of the run's tokenizer / chat template / labels and cached reference
    log-probs, and a link to its checkpoints, so the inputs see a run that resumes (its own tokenizer and
    labels, not rebuilt from the data); nothing is written into the run (checkpoints are only opened
    read-only by the inputs)."""
    if rows <= 0:
        raise ValueError(f"--calib={rows}: calibration needs at least one sequence")
    c = config.copy_and_resolve_references()
    c.train.eval_batches = 1  # only the training iterator is read
    scratch = tempfile.mkdtemp(prefix="lmstack_calib_")
    try:
        for name in checkpoint.RUN_FILES:
            if os.path.exists(os.path.join(workdir, name)):
                shutil.copy(os.path.join(workdir, name), scratch)
        for cached in glob.glob(os.path.join(glob.escape(workdir), "reference_logps_*.npz")):  # DPO's (rl/reference)
            shutil.copy(cached, scratch)
        os.symlink(os.path.abspath(os.path.join(workdir, "checkpoints")), os.path.join(scratch, "checkpoints"))
        inputs = modes.get(c).inputs(c, scratch, c.data.batch_size // c.optim.grad_accum_steps)
        batches, have = [], 0
        while have < rows:
            batch = next(inputs.train_iter)
            take = min(rows - have, len(next(iter(batch.values()))))
            batches.append({k: np.asarray(v)[:take] for k, v in batch.items()})
            have += take
        return inputs, batches
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def eval_inputs(config, workdir: str, micro_batch: int, data: str = "", split: str = "val") -> modes.Inputs:
    """The run's own validation split (exactly as training built it), or `data` as the eval set."""
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}: expected 'val' or 'test'")
    mode = modes.get(config)
    if split == "val" and not data:
        return mode.inputs(config, workdir, micro_batch, eval_only=True)
    if data:
        if not os.path.exists(os.path.expanduser(data)):
            raise FileNotFoundError(f"data path {data!r} does not exist{sources.in_cwd(data)}")
        return mode.other_eval_data(config, workdir, micro_batch, os.path.expanduser(data), split)
    if mode.text_corpus and prepared.is_prepared(config.data.path):
        return mode.other_eval_data(config, workdir, micro_batch, config.data.path, split)
    raise ValueError(f"split='test': the run's data ({config.data.path or 'the embedded corpus'!r}) has no test "
                     f"split; give the test data with --data=PATH")


# ---- A saved run --------------------------------------------------------------------------------

def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A checkpoint's config dict as a ConfigDict (fields added since it was written get their old meaning)."""
    config = ml_collections.ConfigDict(saved)
    for field, value in modes.get(config).all_added_defaults().items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        if leaf not in node:
            node[leaf] = value
    return config


def load_run(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """(saved config, step) of a run's checkpoint; errors name a missing workdir or list the steps there."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    mngr = checkpoint.open_read_only(workdir)
    try:
        available = sorted(mngr.all_steps())
        step = available[-1] if step is None else step
        if step not in available:
            raise FileNotFoundError(f"no checkpoint for step {step} in {workdir!r}; available steps: {available}")
        return config_from_saved(checkpoint.saved_config(mngr, step)), step
    finally:
        mngr.close()


def evaluate_run(workdir: str, *, step: int | None = None, split: str = "", data: str = "",
                 max_batches: int = 0, overrides=None, out_predictions: str = "") -> dict:
    """Restore a run's params (any mesh) and evaluate them as training does. `overrides(config)` may edit
    the saved config first (mesh, batch size). `split` '' is the run's validation split, or with `data` all
    of that file (labelled "data"; a prepared dataset directory: its 'val' split). `out_predictions`: also
    write one JSON line per evaluated item (the mode's `predictions`). Returns the eval scalars plus step, mode,
    split, the data scored, examples and their unit, and (decoded metrics) how many items they scored of how many."""
    if max_batches < 0:
        raise ValueError(f"max_batches={max_batches}: expected a number of batches, or 0 for all of them")
    config, step = load_run(workdir, step)
    if overrides is not None:
        overrides(config)
    mode = modes.get(config)
    if out_predictions and mode.predictions is None:
        with_predictions = sorted(name for name, m in modes.MODES.items() if m.predictions is not None)
        raise ValueError(f"predictions are not defined for mode={config.mode!r}: {mode.no_predictions} "
                         f"(modes with predictions: {with_predictions})")
    config = config.copy_and_resolve_references()  # the eval's own settings; the caller's config is not changed
    config.train.eval_batches = max_batches if max_batches > 0 else ALL_BATCHES
    if not os.path.exists(os.path.join(workdir, "tokenizer.json")):
        raise FileNotFoundError(f"{workdir!r} has checkpoints but no tokenizer.json")
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding)
    micro_batch = config.data.batch_size // config.optim.grad_accum_steps
    rows, what = modes.device_rows(config, mode, micro_batch)
    sharding.check_batch_size(rows, mesh, what)
    inputs = eval_inputs(config, workdir, micro_batch, data, split or "val")
    model = mode.model(config, inputs)
    target, param_sh = steps.abstract_params(model, mesh, rules, config.data.seq_len)
    mngr = checkpoint.open_read_only(workdir)
    try:
        params = checkpoint.restore_params(mngr, step, target)
    finally:
        mngr.close()
    result = {"step": step, "mode": config.mode,
              "split": split or ("data" if data and not prepared.is_prepared(os.path.expanduser(data)) else "val"),
              **scored_data(config, data)}
    if out_predictions:  # first: a mode or setting without predictions fails before the eval
        with sharding.activate(mesh, rules):
            rows = mode.predictions(config, inputs, model, params, workdir=workdir, data=os.path.expanduser(data))
        write_jsonl(rows, out_predictions)
        result.update(predictions=len(rows), out_predictions=out_predictions)
    eval_step = steps.make_eval_step(model=model, objective=mode.loss(config), mesh=mesh,
                                     rules=rules, state_shardings=types.SimpleNamespace(params=param_sh))
    scalars = run_eval(eval_step, params, inputs, mode=config.mode, model=model, mesh=mesh, rules=rules,
                       batch_sharding=sharding.batch_sharding(mesh))
    unit = mode.example_unit
    result.update(examples=count_examples(inputs.eval_batches, per_segment=unit == "conversations"),
                  example_unit=unit)
    if hasattr(inputs.extra_eval, "coverage"):  # decoded metrics (task_eval): items scored of items there were
        result.update(inputs.extra_eval.coverage())
    return {**result, **scalars}

"""Continual learning: the checks, L2-SP and EWC penalties toward the starting model, and EWC's Fisher.

A run that continues from `init_from` (weights or full state: warmstart.continue_from) may
  - replay the old domain (`continual.replay_path` at `continual.replay_ratio`: data/mixture.py),
  - add `continual.l2sp * sum (theta - theta_0)^2` (L2-SP, Li et al. 2018) and/or
    `continual.ewc * sum F (theta - theta_0)^2` (EWC, Kirkpatrick et al. 2017) to the task loss.

theta_0 is the run's starting params (after the warm start / full-state load). F is the diagonal empirical
Fisher of the mode's own loss at theta_0: the mean over N = continual.fisher_batches x micro-batch
old-domain rows of the squared gradient of each row's loss (per example, not per batch: the squared
mean gradient of a batch estimates F / batch + (mean gradient)^2 instead, shrinking F by the batch
size where the gradient averages out). Both are computed once by a new run, written to
WORKDIR/continual_anchor (Orbax) with a fingerprint (continual_anchor.json), and read back from there,
by the new run itself and by every resume, so a resumed run uses bit-identical constants. The train
step gets them as jit arguments (steps.make_train_step's `consts`) with the params' shardings.
The penalties are logged apart from the task loss (train/l2sp_loss, train/ewc_loss); train/loss stays
the task loss. With both weights 0 nothing here runs and the train step is today's exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import checkpoint
from data import mixture, sources

log = logging.getLogger("lmstack")

INIT_STATES = ("weights", "full")
OLD_ROW_MODES = ("causal", "mlm", "sft")  # modes whose inputs build continual.replay_path's rows (inputs.old_rows)
ANCHOR_DIR = "continual_anchor"  # in the workdir: {'params': theta_0, 'fisher': F} (Orbax)
ANCHOR_JSON = "continual_anchor.json"  # its fingerprint: what it was computed from, and checksums


def penalties_on(config) -> bool:
    return float(config.continual.l2sp) > 0 or float(config.continual.ewc) > 0


def check(config, mode) -> None:
    """continual.* values (and a full-state source that fits: check_full_source), for `mode` (its modes.Mode
    record); errors name the field and value, raised before anything is written."""
    n = config.continual
    if n.init_state not in INIT_STATES:
        raise ValueError(f"continual.init_state={n.init_state!r}: expected one of {INIT_STATES}")
    mixture.check_ratio(n.replay_ratio)
    for name in ("l2sp", "ewc"):
        if not float(n[name]) >= 0:
            raise ValueError(f"continual.{name}={n[name]!r} must be >= 0 (0 = off)")
    if int(n.fisher_batches) < 1:
        raise ValueError(f"continual.fisher_batches={n.fisher_batches!r} must be >= 1")
    wants = [f"continual.{k}={n[k]!r}" for k in ("replay_ratio", "ewc") if float(n[k]) > 0]
    if wants and config.mode not in OLD_ROW_MODES:
        raise ValueError(f"{' and '.join(wants)}: mode={config.mode!r} cannot read old-domain rows for replay or "
                         f"EWC (modes that can: {OLD_ROW_MODES})")
    if wants and not n.replay_path:
        raise ValueError(f"{' and '.join(wants)} read the old domain's data: set continual.replay_path=PATH")
    if n.replay_path and not os.path.exists(os.path.expanduser(n.replay_path)):
        raise sources.DataError(f"continual.replay_path={n.replay_path!r} does not exist"
                                f"{sources.in_cwd(n.replay_path)} (set --config.continual.replay_path=PATH)")
    needs = [f"continual.{k}={n[k]!r}" for k in ("l2sp", "ewc") if float(n[k]) > 0]
    needs += ["continual.init_state='full'"] if n.init_state == "full" else []
    if needs and not config.init_from:
        raise ValueError(f"{' and '.join(needs)} continue a run: set init_from=<its workdir>")
    if penalties_on(config) and mode.on_policy:
        raise ValueError(f"continual.l2sp / continual.ewc apply to the supervised loop, not mode={config.mode!r}")
    if n.init_state == "full" and config.init_from:
        check_full_source(config, mode.all_added_defaults())


# Config fields that fix the train state's structure: a full-state continue needs the source's equal.
STATE_FIELDS = ("mode", "model.", "lora.", "quant.", "prune.method", "prune.n", "prune.m", "optim.grad_accum_steps",
                "optim.name", "optim.adafactor_min_dim")


def check_full_source(config, added_defaults: dict) -> None:
    """continual.init_state='full': init_from's latest checkpoint has this run's mode, model shape and optimizer
    structure (STATE_FIELDS); else an error naming init_from and every differing field."""
    mngr = checkpoint.open_read_only(config.init_from)
    try:
        saved = checkpoint.saved_config(mngr, mngr.latest_step())
    finally:
        mngr.close()
    bad, _ = checkpoint.config_differences(saved, json.loads(config.to_json()), STATE_FIELDS, added_defaults)
    if bad:
        raise checkpoint.IncompatibleCheckpointError(
            f"continual.init_state='full' from init_from={config.init_from!r}: its train state does not fit this "
            f"run (use continual.init_state='weights'); differing fields (source -> this run):\n  " + "\n  ".join(bad))


# ---- Penalties (pure) ---------------------------------------------------------------------------------

def l2sp_penalty(params, anchor) -> jax.Array:
    """sum over every param of (theta - theta_0)^2 (float32)."""
    sq = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))), params, anchor)
    return sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32))


def ewc_penalty(params, anchor, fisher) -> jax.Array:
    """sum over every param of F (theta - theta_0)^2 (float32)."""
    sq = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
                      params, anchor, fisher)
    return sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32))


def penalized(task: Callable, *, l2sp: float, ewc: float) -> Callable:
    """The task objective plus the weighted penalties; `consts` = {'params': theta_0, 'fisher': F (EWC only)}.
    metrics['loss'] stays the task loss; the penalties are metrics 'l2sp_loss' / 'ewc_loss'."""
    def objective(params, batch, rng, *, model, consts):
        loss, metrics = task(params, batch, rng, model=model)
        metrics = dict(metrics)
        if l2sp > 0:
            metrics["l2sp_loss"] = l2sp * l2sp_penalty(params, consts["params"])
            loss = loss + metrics["l2sp_loss"]
        if ewc > 0:
            metrics["ewc_loss"] = ewc * ewc_penalty(params, consts["params"], consts["fisher"])
            loss = loss + metrics["ewc_loss"]
        return loss, metrics
    return objective


def train_objective(task: Callable, config, anchor: "Anchor | None") -> dict:
    """steps.make_train_step's objective keywords: the task alone, or penalized with the anchor as `consts`."""
    if anchor is None:
        return {"objective": task}
    n = config.continual
    return {"objective": penalized(task, l2sp=float(n.l2sp), ewc=float(n.ewc)), "consts": anchor.arrays,
            "consts_shardings": anchor.shardings}


# ---- The diagonal empirical Fisher -------------------------------------------------------------------

def diagonal_fisher(objective: Callable, model, params, batches: list[dict]) -> Any:
    """Mean over every row of `batches` of the squared gradient of that row's loss (`objective` on a batch of
    one row, no dropout), a float32 tree shaped like `params`."""

    @jax.jit
    def batch_sum(params, batch_BxL):
        def one(acc, row):
            grads = jax.grad(lambda p: objective(p, jax.tree.map(lambda x: x[None], row), None, model=model)[0])(params)
            return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads), None
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return jax.lax.scan(one, zeros, batch_BxL)[0]

    total, rows = None, 0
    for batch in batches:
        part = batch_sum(params, batch)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        rows += len(next(iter(batch.values())))
    return jax.tree.map(lambda t: t / rows, total)


# ---- The anchor: theta_0 and F, written once, read by the run and every resume ------------------------

@dataclasses.dataclass
class Anchor:
    arrays: dict  # {'params': theta_0} (+ 'fisher': F with EWC), on the params' shardings
    shardings: dict  # the same structure of shardings


def _fingerprint(config, arrays: dict) -> dict:
    n = config.continual
    sums = {k: float(sum(float(jnp.sum(x.astype(jnp.float32))) for x in jax.tree.leaves(v)))
            for k, v in arrays.items()}
    return {"init_from": config.init_from, "init_state": n.init_state, "replay_path": n.replay_path,
            "fisher_batches": int(n.fisher_batches), "ewc": float(n.ewc) > 0, "sums": sums}


def _check_fingerprint(saved: dict, now: dict, path: str) -> None:
    for key in ("init_from", "init_state", "replay_path", "fisher_batches", "ewc"):
        if saved.get(key) != now[key]:
            raise checkpoint.IncompatibleCheckpointError(
                f"{path} was computed with {key}={saved.get(key)!r}, but this run has {now[key]!r}: the anchor and "
                f"Fisher are never recomputed differently on resume (use a new --workdir)")
    for key, value in now["sums"].items():
        if not np.isclose(saved["sums"].get(key, np.nan), value, rtol=1e-5, atol=1e-12):
            raise checkpoint.IncompatibleCheckpointError(
                f"{path}: the {key!r} read back sums to {value!r}, not the {saved['sums'].get(key)!r} written")


def anchor(config, workdir: str, *, objective: Callable, model, inputs, params, params_sh, new_run: bool,
           micro_batch: int) -> Anchor | None:
    """The run's Anchor (None with both penalty weights 0). A new run computes theta_0 = `params` and, with
    EWC, the Fisher on `inputs.old_rows`, and writes them; then every run reads them back from the workdir."""
    if not penalties_on(config):
        return None
    n = config.continual
    path = os.path.join(os.path.abspath(workdir), ANCHOR_DIR)
    meta = os.path.join(os.path.abspath(workdir), ANCHOR_JSON)
    keys = ("params", "fisher") if float(n.ewc) > 0 else ("params",)
    shardings = {k: params_sh for k in keys}
    if new_run:
        arrays = {"params": params}
        if "fisher" in keys:
            count = int(n.fisher_batches) * micro_batch
            rows = mixture.first_rows(inputs.old_rows, count, config.seed)
            arrays["fisher"] = diagonal_fisher(objective, model, params, mixture.stack(rows, micro_batch))
            log.info("continual: diagonal Fisher from %d old-domain rows (%d batches of %d): mean %.3g, max %.3g",
                     count, int(n.fisher_batches), micro_batch,
                     float(np.mean([float(jnp.mean(f)) for f in jax.tree.leaves(arrays["fisher"])])),
                     max(float(jnp.max(f)) for f in jax.tree.leaves(arrays["fisher"])))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, arrays, force=True)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            with open(meta, "w") as f:
                json.dump(_fingerprint(config, arrays), f, indent=1)
    if not os.path.exists(meta):
        raise checkpoint.IncompatibleCheckpointError(
            f"{workdir!r} resumes a run with continual.l2sp / continual.ewc but has no {ANCHOR_JSON}: the run was "
            f"started without them (they cannot be turned on mid-run: use a new --workdir)")
    target = {k: jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, jnp.float32 if k == "fisher" else p.dtype,
                                                                sharding=s), params, params_sh) for k in keys}
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(path, target)
    with open(meta) as f:
        _check_fingerprint(json.load(f), _fingerprint(config, arrays), path)
    log.info("continual: anchor theta_0%s read from %s (l2sp %s, ewc %s)", " and Fisher" if "fisher" in keys else "",
             path, n.l2sp, n.ewc)
    return Anchor(arrays=arrays, shardings=shardings)

"""Warm start: a pretrained run's weights into a new model (a head on its backbone, a LoRA base, SFT).

`continue_from` (a new run from init_from): warm_start, or with continual.init_state='full' the source's
whole train state (params + optimizer state; the step count and LR schedule start over).
`warm_start(state, state_shardings, init_from)` loads `init_from`'s latest checkpoint into this
model's 'backbone' (task heads), 'base' (LoRA) or whole tree (causal / SFT); everything else
keeps its fresh init. A token embedding with fewer rows (new tokens) is extended, its old rows
untouched; any other shape mismatch is an error naming every differing parameter. The log says
what was loaded, extended, re-initialised and left unused.
"""

from __future__ import annotations

import logging

import flax.traverse_util
import jax
import numpy as np
import optax

import checkpoint
import steps

log = logging.getLogger("lmstack")


def extend_rows(old_VxD: np.ndarray, rows: int) -> np.ndarray:
    """An embedding table grown to `rows` rows: old rows untouched, new rows = the mean old row
    (a new token starts as the average token rather than noise of a different scale)."""
    old_VxD = np.asarray(old_VxD)
    if rows < old_VxD.shape[0]:
        raise ValueError(f"cannot shrink an embedding of {old_VxD.shape[0]} rows to {rows}")
    new_NxD = np.broadcast_to(old_VxD.mean(axis=0, keepdims=True), (rows - old_VxD.shape[0], old_VxD.shape[1]))
    return np.concatenate([old_VxD, new_NxD.astype(old_VxD.dtype)], axis=0)


def _fit_loaded(name: str, loaded: np.ndarray, shape: tuple) -> np.ndarray | None:
    """`loaded` as a param of `shape`: equal shapes, or a token table with fewer rows (extended)."""
    if tuple(loaded.shape) == shape:
        return loaded
    if name.endswith("embed/embedding") and loaded.ndim == 2 and loaded.shape[1] == shape[1] \
            and loaded.shape[0] < shape[0]:
        return extend_rows(loaded, shape[0])
    if name.endswith("lm_head/kernel") and loaded.ndim == 2 and loaded.shape[0] == shape[0] \
            and loaded.shape[1] < shape[1]:
        return extend_rows(loaded.T, shape[1]).T
    return None


def _subtree(params) -> tuple[str | None, dict]:
    """Where pretrained weights go: a wrapper's 'backbone', a LoRA model's frozen 'base', or the whole tree."""
    for name in ("backbone", "base"):
        if name in params:
            return name, params[name]
    return None, params


def unused_params(loaded: dict, source_where: str | None, unmatched: set[str]) -> list[str]:
    """What a warm start leaves behind: the source subtree's params the model has no place for, and every
    other top-level subtree of the checkpoint (an MLM run's 'mlm_head' and 'nsp_head' beside its
    'backbone'), each with its parameter count."""
    prefix = f"{source_where}/" if source_where else ""
    out = [prefix + k for k in sorted(unmatched)]
    for name in sorted(loaded):
        if source_where and name != source_where:
            count = sum(int(np.size(x)) for x in jax.tree.leaves(loaded[name]))
            out.append(f"{name} ({count:,} params)")
    return out


NEW_ZERO = "type_embed/embedding"  # params a warm start zeroes when the source has none (see _fill)


def _fill(source: dict, target_tree, target_sh, init_from: str):
    """(target_tree with every source param of the same name loaded, loaded names, extended descriptions)."""
    target = flax.traverse_util.flatten_dict(dict(target_tree), sep="/")
    fitted = {k: _fit_loaded(k, np.asarray(source[k]), tuple(v.shape)) for k, v in target.items() if k in source}
    bad = [f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
           for k, v in fitted.items() if v is None]
    if bad:
        raise checkpoint.IncompatibleCheckpointError(
            f"init_from={init_from!r}: parameter shapes differ:\n  " + "\n  ".join(bad))
    shardings = flax.traverse_util.flatten_dict(dict(target_sh), sep="/")
    # a token-type table the source lacks (a causal LM under a sentence-pair classifier) starts at zero: the
    # warm-started trunk then computes the source's function, and a frozen backbone carries no fixed noise
    merged = {k: jax.device_put(fitted[k].astype(v.dtype), shardings[k]) if k in fitted
              else jax.device_put(np.zeros(v.shape, v.dtype), shardings[k]) if k.endswith(NEW_ZERO) else v
              for k, v in target.items()}
    extended = [f"{k} {tuple(source[k].shape)} -> {tuple(target[k].shape)}" for k in sorted(fitted)
                if tuple(source[k].shape) != tuple(target[k].shape)]
    return flax.traverse_util.unflatten_dict(merged, sep="/"), set(fitted), extended, set(target)


def warm_start(state, state_sh, init_from: str):
    """Pretrained weights from `init_from`'s latest checkpoint (a wrapper's 'backbone', or a causal
    run's whole tree) into this model's backbone / LoRA base / whole tree, and into a PPO policy's
    separate 'critic' too, LoRA policy or not (a critic starts from the policy's weights); everything
    else keeps its fresh init. A token table with fewer rows is extended (old rows kept); other shape
    mismatches raise naming the params. The log names what was loaded, extended and re-initialised."""
    return state.replace(params=warm_start_params(state.params, state_sh.params, init_from))


def warm_start_params(params, params_sh, init_from: str):
    """warm_start on the params alone (their shardings `params_sh`): the new params."""
    _, loaded, at = checkpoint.load_for_inference(init_from)
    source_where, source_tree = _subtree(loaded)
    where, target_tree = _subtree(params)
    _, target_sh = _subtree(params_sh)
    prefix = f"{where}/" if where else ""
    source = flax.traverse_util.flatten_dict(dict(source_tree), sep="/")
    tree, fitted, extended, target = _fill(source, target_tree, target_sh, init_from)
    out = dict(params, **{where: tree}) if where else tree
    also = [name for name in ("critic",) if where in ("backbone", "base") and name in params]
    for name in also:
        out[name] = _fill(source, params[name], params_sh[name], init_from)[0]
    fresh = sorted(prefix + k + (" (zeros)" if k.endswith(NEW_ZERO) else "") for k in target if k not in source)
    fresh += sorted(k for k in params if where and k not in (where, *also))
    log.info("warm start from %s (step %d): loaded %d params into %s; extended: %s; re-initialised: %s; "
             "unused: %s", init_from, at, len(fitted), " and ".join([where or "the model"] + also),
             ", ".join(extended) or "none", ", ".join(fresh) or "none",
             ", ".join(unused_params(loaded, source_where, set(source) - target)) or "none")
    return out


def _reset_schedule_counts(tree):
    """The optimizer state with every LR-schedule step count (optax.ScaleByScheduleState) set to 0; every
    other leaf (Adam's moments and its bias-correction count, pruning masks) as it is."""
    if isinstance(tree, optax.ScaleByScheduleState):
        return tree._replace(count=tree.count * 0)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*[_reset_schedule_counts(x) for x in tree])
    if isinstance(tree, (tuple, list)):
        return type(tree)(_reset_schedule_counts(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _reset_schedule_counts(v) for k, v in tree.items()}
    return tree


def continue_from(state, state_sh, config):
    """A new run's start from init_from: its weights (continual.init_state='weights': warm_start), or its full
    state ('full'): params and optimizer state of its latest checkpoint. Step semantics of 'full': this run
    counts its own steps from 0 (train.steps, checkpoints, data order); its LR schedule starts over, so
    optim.warmup_steps re-warm from the continued state; Adam's moments and bias-correction count continue
    (they describe the carried-over gradient statistics). A source whose state does not fit is refused."""
    if config.continual.init_state != "full":
        return warm_start(state, state_sh, config.init_from)
    source = config.init_from
    mngr = checkpoint.open_read_only(source)
    try:
        at = mngr.latest_step()  # its mode / shape / optimizer fields were checked (continual.check_full_source)
        try:
            loaded = checkpoint.restore_state(mngr, at, steps.abstract_state(state_sh, state))
        except (ValueError, KeyError, TypeError) as e:
            raise checkpoint.IncompatibleCheckpointError(
                f"continual.init_state='full' from init_from={source!r} (step {at}): its train state does not fit "
                f"this run's ({type(e).__name__}: {str(e)[:400]}); use continual.init_state='weights'") from e
    finally:
        mngr.close()
    log.info("continued the full state of %s at its step %d (params + optimizer state); this run counts its steps "
             "from 0 and its LR schedule re-warms from 0", source, at)
    return state.replace(params=loaded.params, opt_state=_reset_schedule_counts(loaded.opt_state))

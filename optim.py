"""Optimizer from config: LR schedule, gradient clipping, AdamW with a decay mask, pruning masks, MultiSteps."""

from __future__ import annotations

import jax
import optax

from model import prune

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then the named decay to `lr * min_lr_ratio` at total_steps."""
    lr, warmup = float(ocfg.lr), int(ocfg.warmup_steps)
    end = lr * float(ocfg.min_lr_ratio)
    if ocfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={ocfg.schedule!r}: expected one of {SCHEDULES}")
    if warmup >= total_steps and ocfg.schedule != "constant":
        raise ValueError(f"optim.warmup_steps={warmup} must be < train.steps={total_steps}")
    decay_steps = max(1, total_steps - warmup)
    warm = optax.linear_schedule(0.0, lr, max(1, warmup))
    if ocfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif ocfg.schedule == "linear":
        rest = optax.linear_schedule(lr, end, decay_steps)
    elif ocfg.schedule == "constant":
        rest = optax.constant_schedule(lr)
    else:  # warmup-stable-decay: hold, then decay linearly over the last `wsd_decay_fraction`
        decay = max(1, int(decay_steps * float(ocfg.wsd_decay_fraction)))
        rest = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)],
                                    [decay_steps - decay])
    if warmup == 0:
        return rest
    return optax.join_schedules([warm, rest], [warmup])


def _leaf_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params, decay_embeddings: bool):
    """True where weight decay applies: matmul kernels (and embeddings if asked); never norms or biases."""
    def decide(path, _):
        name = _leaf_name(path)
        return name == "kernel" or (decay_embeddings and name == "embedding")
    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(ocfg, total_steps: int, pcfg=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clip) with the schedule; then the `prune` block's masks (model/prune.masked; None or
    method 'none': no pruning); wrapped in MultiSteps when grad_accum_steps > 1 (so the pruning schedule
    counts real updates).

    `total_steps` counts optimizer updates; with accumulation each takes `grad_accum_steps`
    calls of the train step (micro-batches).
    """
    k = int(ocfg.grad_accum_steps)
    if k < 1:
        raise ValueError(f"optim.grad_accum_steps={k} must be >= 1")
    pruning = prune.settings(pcfg, total_steps)
    schedule = make_schedule(ocfg, total_steps)
    parts = []
    if float(ocfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
    parts.append(optax.adamw(schedule, b1=float(ocfg.b1), b2=float(ocfg.b2), eps=float(ocfg.eps),
                             weight_decay=float(ocfg.weight_decay),
                             mask=lambda p: decay_mask(p, bool(ocfg.decay_embeddings))))
    tx = prune.masked(optax.chain(*parts), pruning)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule


def freeze(tx: optax.GradientTransformation, frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """Zero updates (and no optimizer state) for the top-level param subtrees named in `frozen`."""
    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v) for k, v in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

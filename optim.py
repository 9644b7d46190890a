"""Optimizer from config: LR schedule, gradient clipping, the optimizer `optim.name` picks (AdamW, Adafactor,
Lion, SGD with momentum, Muon + AdamW) with its weight-decay mask, pruning masks, MultiSteps."""

from __future__ import annotations

import flax.linen as nn
import jax
import optax

import bounds
from model import prune

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd", "muon")


def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then the named decay to `lr * min_lr_ratio` at total_steps."""
    lr, warmup = float(ocfg.lr), int(ocfg.warmup_steps)
    end = lr * float(ocfg.min_lr_ratio)
    for field in ("lr", "min_lr_ratio", "warmup_steps"):  # a negative LR would ascend the loss, silently
        bounds.check(f"optim.{field}", ocfg[field])
    if ocfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={ocfg.schedule!r}: expected one of {SCHEDULES}")
    if ocfg.schedule == "wsd" and not 0.0 < float(ocfg.wsd_decay_fraction) <= 1.0:
        raise ValueError(f"optim.wsd_decay_fraction={ocfg.wsd_decay_fraction!r} must be in (0, 1] (the share of "
                         f"the steps after warmup spent decaying)")
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


def _names(path) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _leaf_name(path) -> str:
    names = _names(path)
    return names[-1] if names else ""


def decay_mask(params, decay_embeddings: bool):
    """True where weight decay applies: matmul kernels (and embeddings if asked); never norms or biases."""
    def decide(path, _):
        name = _leaf_name(path)
        return name == "kernel" or (decay_embeddings and name == "embedding")
    return jax.tree_util.tree_map_with_path(decide, params)


def muon_labels(params):
    """'muon' for the transformer blocks' matrix kernels (2-D; 3-D when stacked by model.scan_layers),
    'adamw' for the rest: embeddings, the LM and task heads, norms, biases, LoRA adapters."""
    def label(path, x):
        names = _names(path)
        in_block = any(n == "layers" or n.startswith("layer_") for n in names)
        return "muon" if in_block and names and names[-1] == "kernel" and x.ndim >= 2 else "adamw"
    return jax.tree_util.tree_map_with_path(label, params)


def _muon_dims(params):
    """Every (muon-labelled) kernel is a [..., in, out] matrix; leading (scanned layer) axes are batch axes."""
    return jax.tree.map(lambda x: optax.contrib.MuonDimensionNumbers(x.ndim - 2, x.ndim - 1), params)


def _factored_rms(min_dim: int) -> optax.GradientTransformation:
    """optax.scale_by_factored_rms whose state shards like the params: its init sees plain arrays (the
    factored statistics have fewer axes than the param's logical names), then each full-size second moment
    (a tensor too small to factor) is boxed like its param; the row/column statistics stay replicated (small)."""
    tx = optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def init(params):
        state = tx.init(nn.meta.unbox(params))
        rebox = lambda p, v: (p.replace_boxed(v) if is_box(p) and hasattr(v, "shape")  # noqa: E731
                              and v.shape == p.value.shape else v)
        return state._replace(v=jax.tree.map(rebox, params, state.v, is_leaf=is_box))
    return optax.GradientTransformation(init, tx.update)


def _unit_interval(ocfg, field: str) -> float:
    value = float(ocfg[field])
    if not 0.0 <= value < 1.0:
        raise ValueError(f"optim.{field}={ocfg[field]!r} must be in [0, 1) for optim.name={ocfg.name!r}")
    return value


def check_name(ocfg) -> None:
    if ocfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={ocfg.name!r}: expected one of {OPTIMIZERS}")


def _core(ocfg, schedule) -> optax.GradientTransformation:
    """The update rule `optim.name` names, at the schedule's LR, with decoupled weight decay (x LR) on the
    decay mask. The one place optimizers are chosen."""
    check_name(ocfg)
    name, wd = ocfg.name, bounds.check("optim.weight_decay", ocfg.weight_decay)
    mask = lambda p: decay_mask(p, bool(ocfg.decay_embeddings))  # noqa: E731
    if name in ("adamw", "lion", "muon"):  # muon updates its non-matrix parameters with AdamW
        b1, b2 = _unit_interval(ocfg, "b1"), _unit_interval(ocfg, "b2")
        eps = bounds.check("optim.eps", ocfg.eps)
    adamw = lambda: optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)  # noqa: E731
    if name == "adamw":
        return adamw()
    if name == "adafactor":  # optax.adafactor's factored RMS + update clipping, without its parameter-scale
        # step (lr is then an absolute step size, as for AdamW) and with the decay multiplied by the lr
        min_dim = int(ocfg.adafactor_min_dim)
        if min_dim < 1:
            raise ValueError(f"optim.adafactor_min_dim={min_dim} must be >= 1")
        return optax.chain(_factored_rms(min_dim), optax.clip_by_block_rms(1.0),
                           optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(schedule))
    if name == "lion":
        return optax.lion(schedule, b1=b1, b2=b2, weight_decay=wd, mask=mask)
    if name == "sgd":
        return optax.chain(optax.trace(_unit_interval(ocfg, "momentum"), nesterov=bool(ocfg.nesterov)),
                           optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(schedule))
    rms = float(ocfg.muon_rms)
    if rms < 0:
        raise ValueError(f"optim.muon_rms={rms} must be >= 0 (0: optax's width scaling)")
    muon = optax.contrib.muon(schedule, beta=_unit_interval(ocfg, "muon_beta"), weight_decay=wd,
                              weight_decay_mask=mask, muon_weight_dimension_numbers=_muon_dims,
                              consistent_rms=rms or None)
    return optax.multi_transform({"muon": muon, "adamw": adamw()}, muon_labels)


def make_optimizer(ocfg, total_steps: int, pcfg=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip + the named optimizer (_core) with the schedule; then the `prune` block's masks (model/prune.masked;
    None or method 'none': no pruning); wrapped in MultiSteps when grad_accum_steps > 1 (so the pruning schedule
    counts real updates).

    `total_steps` counts optimizer updates; with accumulation each takes `grad_accum_steps`
    calls of the train step (micro-batches).
    """
    check_name(ocfg)
    k = int(ocfg.grad_accum_steps)
    if k < 1:
        raise ValueError(f"optim.grad_accum_steps={k} must be >= 1")
    pruning = prune.settings(pcfg, total_steps)
    schedule = make_schedule(ocfg, total_steps)
    if not float(ocfg.clip_norm) >= 0:
        raise ValueError(f"optim.clip_norm={ocfg.clip_norm!r} must be >= 0 (0 = no clipping)")
    parts = []
    if float(ocfg.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(ocfg.clip_norm)))
    parts.append(_core(ocfg, schedule))
    tx = prune.masked(optax.chain(*parts), pruning)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule


def freeze(tx: optax.GradientTransformation, frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """Zero updates (and no optimizer state) for the top-level param subtrees named in `frozen`."""
    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v) for k, v in params.items()}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

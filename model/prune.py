"""Weight pruning: which kernels, the cubic sparsity schedule, masks, and compact storage.

Kernels are [in, out] = K x M (a leading [n_layers] under nn.scan: leading dims are a batch of
matrices). Masks are bool, True = kept. Mask makers (pure jax, jit-able):
- `magnitude_masks`: the lowest-|w| share per kernel matrix ('layer') or under one threshold over
  every pruned kernel ('global');
- `nm_mask`: N:M, the N largest of every M consecutive input-dim entries (2:4);
- `column_mask`: per output column, the lowest-score share of its K entries (Wanda with
  score |W_km| * ||x_k||_2, `wanda_scores`).
Gradual pruning during training is `masked`, an optax wrapper whose state holds the masks (so they
are checkpointed and resumed with the optimizer state); one-shot pruning is scripts/prune.py.
Compact storage (`pack` / `unpack`): the non-zero values + a packed bit mask + the shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("none", "magnitude", "nm")
SCOPES = ("layer", "global")
# one-shot comparison groups: every kernel, one threshold over all kernels, or each output column
# (Wanda's, per its paper; the default for method 'wanda', 'layer' for 'magnitude')
ONESHOT_SCOPES = ("layer", "global", "output")
PACKED_KEYS = ("sparse_values", "sparse_bits", "sparse_shape")  # a packed tensor's dict (checkpoint leaves)


# ---- Which parameters ------------------------------------------------------------------------------

def key_names(path) -> tuple[str, ...]:
    """The dict keys of a pytree path (boxes and other nodes skipped)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def is_block(names: tuple[str, ...]) -> bool:
    return any(n.startswith("layer_") or n == "layers" for n in names)


def is_prunable(names: tuple[str, ...], include_embedding: bool = False, include_heads: bool = False) -> bool:
    """Dense kernels inside the transformer blocks; optionally the token embedding / untied LM head and the
    output-side heads' kernels (MLM transform, poolers, classification, span-QA, reward and value heads).
    LoRA adapters ('lora' subtree) never: they are a delta on the kernels, not weights of their own."""
    if not names or "lora" in names:
        return False
    if names[-1] == "embedding":
        return include_embedding and len(names) >= 2 and names[-2] == "embed"
    if names[-1] != "kernel":
        return False
    if is_block(names):
        return True
    if len(names) >= 2 and names[-2] == "lm_head":
        return include_embedding
    return include_heads


def input_axis(name: str) -> int:
    """The contraction (input) dim of a prunable tensor: a kernel's K (-2); the token table's D (-1),
    which the tied LM head contracts over."""
    return -1 if name.endswith("embedding") else -2


def path_name(names: tuple[str, ...]) -> str:
    return "/".join(names)


# ---- Schedule --------------------------------------------------------------------------------------

def cubic_sparsity(step, *, initial: float, final: float, start: int, end: int):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (end - t0))^3 for t0 <= t < end;
    0 before `start`, s_f from `end` on. Works on Python ints and traced arrays."""
    t = jnp.asarray(step, jnp.float32)
    span = max(end - start, 1)
    frac = jnp.clip((t - start) / span, 0.0, 1.0)
    ramp = final + (initial - final) * (1.0 - frac) ** 3
    return jnp.where(t < start, 0.0, jnp.where(t >= end, final, ramp))


def is_prune_step(step, *, start: int, end: int, frequency: int):
    """Masks are recomputed at start, every `frequency` updates after it, and at `end` (then fixed)."""
    t = jnp.asarray(step, jnp.int32)
    return (t >= start) & (t <= end) & (((t - start) % frequency == 0) | (t == end))


# ---- Masks -----------------------------------------------------------------------------------------

def lowest_out(score_BxN: jax.Array, k_B: jax.Array) -> jax.Array:
    """keep_BxN: False at the k lowest scores of each row (ties: the earlier index goes first)."""
    b, n = score_BxN.shape
    order_BxN = jnp.argsort(score_BxN, axis=-1, stable=True)
    rank_keep_BxN = jnp.arange(n)[None, :] >= jnp.reshape(k_B, (b, 1))
    return jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], order_BxN].set(rank_keep_BxN)


def _count(sparsity, n: int, cap: int | None = None) -> jax.Array:
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
    return jnp.minimum(k, n if cap is None else cap)


def magnitude_masks(scores: dict, sparsity, scope: str = "layer", prunable_counts: dict | None = None) -> dict:
    """name -> keep mask for name -> score tensor (|w|, or anything where lower = pruned first).
    'layer': each [K, M] matrix (leading dims are a batch) loses round(sparsity * K*M) entries;
    'global': one ranking over every tensor, round(sparsity * total) entries in all. `prunable_counts`
    (name -> entries that may go, per matrix) caps the count: gradual N:M protects each group's top N."""
    if scope not in SCOPES:
        raise ValueError(f"prune scope={scope!r}: expected one of {SCOPES}")
    if scope == "global":
        flat_1xT = jnp.concatenate([s.reshape(1, -1).astype(jnp.float32) for s in scores.values()], axis=1)
        total = flat_1xT.shape[1]
        cap = None if prunable_counts is None else sum(prunable_counts[k] * _matrices(s)
                                                       for k, s in scores.items())
        keep_T = lowest_out(flat_1xT, _count(sparsity, total, cap)[None])[0]
        out, at = {}, 0
        for name, s in scores.items():
            out[name] = keep_T[at:at + s.size].reshape(s.shape)
            at += s.size
        return out
    out = {}
    for name, s in scores.items():
        per = s.shape[-2] * s.shape[-1]
        s_BxN = s.reshape(-1, per).astype(jnp.float32)
        cap = None if prunable_counts is None else prunable_counts[name]
        k_B = jnp.broadcast_to(_count(sparsity, per, cap), (s_BxN.shape[0],))
        out[name] = lowest_out(s_BxN, k_B).reshape(s.shape)
    return out


def _matrices(s) -> int:
    return math.prod(s.shape[:-2])


def check_nm(n: int, m: int) -> None:
    if not (0 < n < m):
        raise ValueError(f"N:M sparsity {n}:{m}: need 0 < N < M (N kept of every M)")


def nm_mask(score_xKxM: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """Keep the n largest scores of every m consecutive entries along `axis` (the input dim)."""
    check_nm(n, m)
    s = jnp.moveaxis(score_xKxM, axis, -1)
    k = s.shape[-1]
    if k % m:
        raise ValueError(f"N:M {n}:{m}: input dim {k} of a {tuple(score_xKxM.shape)} tensor is not divisible by M={m}")
    s_GxM = s.reshape(s.shape[:-1] + (k // m, m)).astype(jnp.float32)
    order = jnp.argsort(-s_GxM, axis=-1, stable=True)  # largest first, earlier index first among ties
    rank = jnp.argsort(order, axis=-1, stable=True)
    keep = (rank < n).reshape(s.shape)
    return jnp.moveaxis(keep, -1, axis)


def column_mask(score_xKxM: jax.Array, sparsity) -> jax.Array:
    """Per output column m: False at the round(sparsity * K) lowest-score entries of its K inputs."""
    s_xMxK = jnp.swapaxes(score_xKxM, -1, -2)
    k = s_xMxK.shape[-1]
    s_BxK = s_xMxK.reshape(-1, k).astype(jnp.float32)
    k_B = jnp.broadcast_to(_count(sparsity, k), (s_BxK.shape[0],))
    return jnp.swapaxes(lowest_out(s_BxK, k_B).reshape(s_xMxK.shape), -1, -2)


def wanda_scores(w_xKxM: jax.Array, norm_xK: jax.Array) -> jax.Array:
    """Wanda (Sun et al. 2023): |W_km| * ||x_k||_2, x the layer's calibration inputs (norm over tokens)."""
    return jnp.abs(w_xKxM) * norm_xK[..., :, None]


def gradual_masks(weights: dict, old_masks: dict, sparsity, *, method: str, scope: str, n: int = 2,
                  m: int = 4) -> dict:
    """Masks for the weights after an update at the schedule's `sparsity`: already-pruned entries score
    below every kept one (masks only shrink while the sparsity rises). 'nm': each group's top n are never
    candidates, so at sparsity 1 - n/m the masks are exactly N:M."""
    scores = {k: jnp.where(old_masks[k], jnp.abs(w).astype(jnp.float32), -1.0) for k, w in weights.items()}
    if method == "magnitude":
        return magnitude_masks(scores, sparsity, scope)
    if method != "nm":
        raise ValueError(f"prune.method={method!r}: expected one of {METHODS}")
    protected = {k: nm_mask(s, n, m, input_axis(k)) for k, s in scores.items()}
    scores = {k: jnp.where(protected[k], jnp.inf, s) for k, s in scores.items()}
    counts = {k: s.shape[-2] * s.shape[-1] * (m - n) // m for k, s in scores.items()}
    return magnitude_masks(scores, sparsity, scope, prunable_counts=counts)


def default_scope(method: str) -> str:
    return "output" if method == "wanda" else "layer"


def oneshot_masks(weights: dict, *, method: str, sparsity: float, scope: str | None = None,
                  nm: tuple[int, int] | None = None, norms: dict | None = None) -> dict:
    """One-shot masks for name -> weight: 'magnitude' (|w|) or 'wanda' (|w| * ||x||; `norms`: name -> the
    input norm [.., K]), the lowest scores dropped within each `scope` (ONESHOT_SCOPES; default: the
    method's, default_scope); with `nm` = (n, m), N:M on either score."""
    scope = scope or default_scope(method)
    if scope not in ONESHOT_SCOPES:
        raise ValueError(f"one-shot scope={scope!r}: expected one of {ONESHOT_SCOPES}")
    if method == "wanda":
        missing = sorted(set(weights) - set(norms or {}))
        if missing:
            raise ValueError(f"wanda: no calibration inputs for {missing} (only Dense kernels have them; the "
                             f"token table does not: leave the embedding out or use method 'magnitude')")
        scores = {k: wanda_scores(w, norms[k]) for k, w in weights.items()}
    elif method == "magnitude":
        scores = {k: jnp.abs(w) for k, w in weights.items()}
    else:
        raise ValueError(f"one-shot method={method!r}: expected 'magnitude' or 'wanda'")
    if nm is not None:
        return {k: nm_mask(s, nm[0], nm[1], input_axis(k)) for k, s in scores.items()}
    if scope == "output":
        return {k: column_mask(s, sparsity) for k, s in scores.items()}
    return magnitude_masks(scores, sparsity, scope)


# ---- Report ----------------------------------------------------------------------------------------

def sparsity_report(tensors: dict) -> dict:
    """name -> share of exact zeros, plus 'global' over all of them (host floats)."""
    zeros = {k: int(jax.device_get(jnp.sum(v == 0))) for k, v in tensors.items()}
    sizes = {k: int(np.size(v)) for k, v in tensors.items()}
    out = {k: zeros[k] / max(sizes[k], 1) for k in tensors}
    out["global"] = sum(zeros.values()) / max(sum(sizes.values()), 1)
    return out


# ---- Compact storage -------------------------------------------------------------------------------

def pack(w: np.ndarray) -> dict:
    """A tensor as its non-zero values (1-D, its dtype) + a bit mask (np.packbits, uint8) + its shape."""
    w = np.asarray(w)
    nz = w != 0
    return {"sparse_values": w[nz].reshape(-1), "sparse_bits": np.packbits(nz.reshape(-1)),
            "sparse_shape": np.asarray(w.shape, np.int32)}


def is_packed(node) -> bool:
    return isinstance(node, dict) and set(node) == set(PACKED_KEYS)


def unpack(packed: dict) -> np.ndarray:
    """The dense tensor `pack` stored (exactly: zeros where the mask is off)."""
    shape = tuple(int(d) for d in np.asarray(packed["sparse_shape"]))
    values = np.asarray(packed["sparse_values"])
    size = math.prod(shape)
    nz = np.unpackbits(np.asarray(packed["sparse_bits"], np.uint8), count=size).astype(bool)
    if int(nz.sum()) != values.size:
        raise ValueError(f"packed tensor of shape {shape}: mask has {int(nz.sum())} set bits but "
                         f"{values.size} values are stored")
    out = np.zeros(size, values.dtype)
    out[nz] = values
    return out.reshape(shape)


def unpack_tree(tree):
    """A params tree with every packed tensor made dense again (other leaves as they are)."""
    if is_packed(tree):
        return unpack(tree)
    if isinstance(tree, dict):
        return {k: unpack_tree(v) for k, v in tree.items()}
    return tree


def has_packed(tree) -> bool:
    if is_packed(tree):
        return True
    return isinstance(tree, dict) and any(has_packed(v) for v in tree.values())


# ---- Gradual pruning in the optimizer ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked `prune` config block (steps count optimizer updates; train.py's step numbering)."""
    method: str = "none"
    sparsity: float = 0.5  # the target ('nm': 1 - n/m)
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 0
    frequency: int = 100
    n: int = 2
    m: int = 4
    scope: str = "layer"
    include_embedding: bool = False
    include_heads: bool = False

    def selects(self, names: tuple[str, ...]) -> bool:
        return is_prunable(names, self.include_embedding, self.include_heads)


def settings(pcfg, total_steps: int) -> Settings:
    """The `prune` block checked (errors name the field and value); end_step 0 = the last update.
    A missing block (a config saved before pruning existed) means method 'none'."""
    if pcfg is None:
        return Settings()
    get = pcfg.get if hasattr(pcfg, "get") else lambda k, d=None: getattr(pcfg, k, d)
    method = get("method", "none")
    if method not in METHODS:
        raise ValueError(f"prune.method={method!r}: expected one of {METHODS}")
    if method == "none":
        return Settings()
    n, m = int(get("n", 2)), int(get("m", 4))
    sparsity = float(get("sparsity", 0.5))
    if method == "nm":
        if not 0 < n < m:
            raise ValueError(f"prune.n={n}, prune.m={m}: N:M sparsity needs 0 < n < m (n kept of every m)")
        sparsity = 1.0 - n / m
    initial = float(get("initial_sparsity", 0.0))
    for field, value in (("sparsity", sparsity), ("initial_sparsity", initial)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"prune.{field}={value}: must be in [0, 1)")
    if initial > sparsity:
        raise ValueError(f"prune.initial_sparsity={initial} is above the target sparsity {sparsity}")
    start, end = int(get("start_step", 0)), int(get("end_step", 0)) or int(total_steps)
    frequency = int(get("frequency", 100))
    if frequency < 1:
        raise ValueError(f"prune.frequency={frequency} must be >= 1")
    if start < 0 or end < start:
        raise ValueError(f"prune.end_step={end} must be >= prune.start_step={start} >= 0")
    if start > total_steps:
        raise ValueError(f"prune.start_step={start} is after the run's last update ({total_steps}): "
                         f"nothing would be pruned")
    scope = get("scope", "layer")
    if scope not in SCOPES:
        raise ValueError(f"prune.scope={scope!r}: expected one of {SCOPES}")
    return Settings(method=method, sparsity=sparsity, initial_sparsity=initial, start_step=start, end_step=end,
                    frequency=frequency, n=n, m=m, scope=scope,
                    include_embedding=bool(get("include_embedding", False)),
                    include_heads=bool(get("include_heads", False)))


class MaskedState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    masks: Any  # params-shaped: bool (True = kept) for pruned tensors, optax.MaskedNode elsewhere
    count: jax.Array  # optimizer updates applied so far


def prunable_tensors(tree, include_embedding: bool = False, include_heads: bool = False) -> dict:
    """name ('layer_0/attn/query/kernel') -> leaf for the prunable leaves of a params-shaped tree
    (MaskedNode slots of frozen subtrees hold no leaf)."""
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {path_name(key_names(p)): x for p, x in flat
            if is_prunable(key_names(p), include_embedding, include_heads)}


def _named(tree, s: Settings) -> dict:
    return prunable_tensors(tree, s.include_embedding, s.include_heads)


def _replace(tree, s: Settings, new: dict):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: new[path_name(key_names(p))] if s.selects(key_names(p)) else x, tree)


def masked(inner: optax.GradientTransformation, s: Settings) -> optax.GradientTransformation:
    """`inner`, then gradual magnitude (or N:M) pruning: at the schedule's steps the masks are recomputed
    from |params + updates|, and the returned updates make new params = (params + updates) * mask, so
    pruned weights are exactly zero after every update. Put it inside MultiSteps (it counts real updates)
    and inside optim.freeze (it sees only the trained params)."""
    if s.method == "none":
        return inner

    def init(params):
        names = _named(params, s)
        if not names:
            raise ValueError(f"prune.method={s.method!r}: no prunable kernel among the trained parameters "
                             f"(include_embedding={s.include_embedding}, include_heads={s.include_heads}; "
                             f"frozen subtrees and LoRA adapters are never pruned)")
        if s.method == "nm":
            for k, x in names.items():
                if x.shape[input_axis(k)] % s.m:
                    raise ValueError(f"prune N:M {s.n}:{s.m}: {k} has input dim {x.shape[input_axis(k)]} "
                                     f"(shape {tuple(x.shape)}), not divisible by M={s.m}")
        masks = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.ones(x.shape, bool) if s.selects(key_names(p)) else optax.MaskedNode(), params)
        return MaskedState(inner=inner.init(params), masks=masks, count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prune.masked needs the params in update()")
        updates, inner_state = inner.update(updates, state.inner, params)
        t = state.count + 1  # the update being made: the train step whose params it produces
        after = _named(jax.tree.map(lambda p, u: p + u, params, updates), s)
        old = _named(state.masks, s)

        def recompute(old_masks):
            target = cubic_sparsity(t, initial=s.initial_sparsity, final=s.sparsity, start=s.start_step,
                                    end=s.end_step)
            return gradual_masks(after, old_masks, target, method=s.method, scope=s.scope, n=s.n, m=s.m)

        new = jax.lax.cond(is_prune_step(t, start=s.start_step, end=s.end_step, frequency=s.frequency),
                           recompute, lambda o: o, old)
        masks = _replace(state.masks, s, new)
        before = _named(params, s)
        keep_u = _replace(updates, s, {k: jnp.where(new[k], u, -before[k]) for k, u in _named(updates, s).items()})
        return keep_u, MaskedState(inner=inner_state, masks=masks, count=t)

    return optax.GradientTransformation(init, update)


def find_masks(opt_state):
    """The masks tree of the (first) MaskedState inside an optimizer state, or None."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedState)):
        if isinstance(node, MaskedState):
            return node.masks
    return None


def apply_masks(params, opt_state):
    """params * mask where the optimizer state holds masks (the train step's guard: an LR scale < 1 after a
    rollback would otherwise leave a share of a newly pruned weight); params unchanged without masks."""
    masks = find_masks(opt_state)
    if masks is None:
        return params
    return jax.tree.map(lambda k, p: p if isinstance(k, optax.MaskedNode) else jnp.where(k, p, jnp.zeros_like(p)),
                        masks, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

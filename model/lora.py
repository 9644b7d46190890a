"""LoRA as a parameter transformation: the model code is untouched.

    lora   = init_lora(params, rank=8, targets=("attn/query", "attn/value"), key=key)
    params = apply_lora(base, lora, alpha=16.0, rank=8)   # W + alpha/rank * A @ B, then model.apply
    export = merge_lora(base, lora, alpha=16.0, rank=8)   # the same math, plain arrays for export

`params` are plain (unboxed) Flax params, e.g. `nn.meta.unbox(model.init(...)["params"])`. A
target 'attn/query' matches every kernel whose path ends in '.../attn/query/kernel' (all layers;
also the stacked [n_layers, in, out] kernels of scan_layers, where A and B get the same leading
axis). Known targets: 'attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp/gate', 'mlp/up',
'mlp/down'. Biases, norms and embeddings are never adapted.

The lora tree mirrors the matched paths: {..., 'attn': {'query': {'lora_a': A [in, r],
'lora_b': B [r, out]}}}. A ~ N(0, 1/in) (Kaiming-normal for a linear map, as in the LoRA paper's
random Gaussian A), B = 0, so at init apply_lora(base, lora) == base exactly.

`LoraModel` wraps a language model this way (params {'base', 'lora'}); `LoraTrunk` wraps a model with
heads around one (PPO's policy + value head: the heads and a separate critic stay trainable beside them).

Freezing the base is the caller's choice: take `jax.grad` with respect to the lora tree only
(base is then a constant of the loss), and, if base is also a traced argument of a jitted
function, wrap it in `jax.lax.stop_gradient` to be explicit. Weight decay on adapters is an
optimizer choice as well.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

TARGETS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/gate", "mlp/up", "mlp/down")


def _matches(path: tuple, targets) -> bool:
    if path[-1] != "kernel":
        return False
    joined = "/" + "/".join(str(p) for p in path)
    return any(joined.endswith(f"/{t}/kernel") for t in targets)


def init_lora(params, *, rank: int, targets=TARGETS, key: jax.Array) -> dict:
    """Adapters (A random, B zero) for every kernel matched by `targets`; error if none matches."""
    if rank <= 0:
        raise ValueError(f"lora rank={rank} must be positive")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"lora targets {unknown} unknown: expected some of {TARGETS}")
    flat = traverse_util.flatten_dict(params)
    matched = sorted((p for p in flat if _matches(p, targets)), key=str)
    if not matched:
        raise ValueError(f"lora targets {tuple(targets)} match no kernel in params")
    out = {}
    for i, path in enumerate(matched):
        w = flat[path]
        if w.ndim < 2:
            raise ValueError(f"{'/'.join(path)} has shape {w.shape}; expected a [.., in, out] kernel")
        *lead, d_in, d_out = w.shape
        if rank > min(d_in, d_out):
            raise ValueError(f"lora rank={rank} exceeds {'/'.join(path)} shape {w.shape}")
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, rank), jnp.float32) / math.sqrt(d_in)
        out[path[:-1] + ("lora_a",)] = a.astype(w.dtype)
        out[path[:-1] + ("lora_b",)] = jnp.zeros((*lead, rank, d_out), w.dtype)
    return traverse_util.unflatten_dict(out)


def _delta(a, b, scale):
    return scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


def apply_lora(base, lora, *, alpha: float, rank: int):
    """Params with W + alpha/rank * A @ B on every adapted kernel (differentiable in both trees)."""
    scale = alpha / rank
    flat = dict(traverse_util.flatten_dict(base))
    flat_lora = traverse_util.flatten_dict(lora)
    for path, a in flat_lora.items():
        if path[-1] != "lora_a":
            continue
        kpath = path[:-1] + ("kernel",)
        if kpath not in flat:
            raise ValueError(f"lora adapter {'/'.join(path[:-1])} has no kernel in the base params")
        b = flat_lora[path[:-1] + ("lora_b",)]
        w = flat[kpath]
        if a.shape[-1] != rank:
            raise ValueError(f"{'/'.join(path)} has rank {a.shape[-1]}, apply_lora was given rank={rank}")
        flat[kpath] = (w.astype(jnp.float32) + _delta(a, b, scale)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge_lora(base, lora, *, alpha: float, rank: int):
    """Plain (numpy) params with the adapters folded in, for export / inference without LoRA."""
    return jax.tree.map(np.asarray, apply_lora(base, lora, alpha=alpha, rank=rank))


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class LoraModel:
    """A Flax module wrapped so its params are {'base': frozen weights, 'lora': adapters}.

    `init` / `apply` mirror Flax's, so objectives and the train step use it unchanged:
    `apply` runs the inner module on apply_lora(stop_gradient(base), lora). Gradients reach only
    the adapters (freezing the base in the optimizer, optim.freeze(tx, ('base',)), then keeps
    no optimizer state for it). `base_dtype='bfloat16'` stores the frozen base in bf16.
    """

    def __init__(self, inner, *, rank: int, alpha: float, targets, base_dtype: str = "float32", new_rows: int = 0):
        if base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"lora.base_dtype={base_dtype!r}: expected 'float32' or 'bfloat16'")
        self.inner, self.rank, self.alpha, self.targets = inner, int(rank), float(alpha), tuple(targets)
        self.base_dtype = jnp.dtype(base_dtype)
        self.new_rows = int(new_rows)  # trainable delta on the last rows of the token embedding
        self.cfg = inner.cfg

    def init(self, key, *args, **kwargs):
        base_key, lora_key = jax.random.split(key)
        return {"params": self.adapt(self.inner.init(base_key, *args, **kwargs)["params"], lora_key)}

    def adapt(self, base, key) -> dict:
        """The inner module's params -> {'base': them in base_dtype, 'lora': fresh adapters (B = 0)}."""
        base = jax.tree.map(lambda x: x.astype(self.base_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            base)
        lora = init_lora(nn.meta.unbox(base), rank=self.rank, targets=self.targets, key=key)
        lora = jax.tree.map(lambda x: x.astype(jnp.float32), lora)
        if self.new_rows:
            lora[ROWS] = jnp.zeros((self.new_rows, self.cfg.d_model), jnp.float32)
        return {"base": base, "lora": lora}

    def effective_params(self, params):
        """{'base', 'lora'} -> the inner module's params, exactly as `apply` computes them (the decoder
        runs the inner module on these, so its log-probs are the training forward's)."""
        merged = apply_lora(jax.lax.stop_gradient(params["base"]), params["lora"], alpha=self.alpha, rank=self.rank)
        return add_rows(merged, params["lora"])

    def apply(self, variables, *args, **kwargs):
        return self.inner.apply({"params": self.effective_params(variables["params"])}, *args, **kwargs)


class LoraTrunk:
    """A model with heads whose trunk (the language model) is LoRA-adapted: PPO's policy + value head.

    params: {'base': the trunk's weights (frozen, like a LoraModel's), 'lora': its adapters, and every
    other subtree of the inner model as it is ('value_head'; rl.critic='separate': 'critic'), trained
    whole}. `apply` runs the inner model with params[trunk] = lm.effective_params(base, lora), so the
    trunk's forward is exactly the LoraModel `lm`'s; `language_model(params)` is that policy alone,
    (lm, {'base', 'lora'}), what the decoder samples with; its LoRA-disabled base is the reference.
    """

    def __init__(self, inner, lm: LoraModel, trunk: str = "backbone"):
        if lm.cfg != inner.cfg:
            raise ValueError(f"LoraTrunk: the language model's config differs from {type(inner).__name__}'s")
        self.inner, self.lm, self.trunk, self.cfg = inner, lm, trunk, inner.cfg

    def init(self, key, *args, **kwargs):
        inner_key, lora_key = jax.random.split(key)
        params = dict(self.inner.init(inner_key, *args, **kwargs)["params"])
        trunk = params.pop(self.trunk)
        clash = sorted(set(params) & {"base", "lora"})
        if clash:
            raise ValueError(f"LoraTrunk: {type(self.inner).__name__} already has param subtrees {clash}")
        return {"params": dict(params, **self.lm.adapt(trunk, lora_key))}

    def effective_params(self, params):
        """{'base', 'lora', heads...} -> the inner model's params (the trunk's adapters applied)."""
        heads = {k: v for k, v in params.items() if k not in ("base", "lora")}
        return dict(heads, **{self.trunk: self.lm.effective_params(params)})

    def apply(self, variables, *args, **kwargs):
        return self.inner.apply({"params": self.effective_params(variables["params"])}, *args, **kwargs)

    def language_model(self, params):
        """(the LoRA language model, its {'base', 'lora'} params): the policy without its heads."""
        return self.lm, {"base": params["base"], "lora": params["lora"]}


ROWS = "embed_rows"  # lora-tree key of the trainable delta on the embedding's last rows


def add_rows(params, lora):
    """params with lora['embed_rows'] ([n, D], if present) added to the last n rows of embed/embedding:
    the reserved special tokens (chat roles, <|end|>) that pretraining never trained, so frozen
    random rows would otherwise be the only way a LoRA model can read and emit them."""
    if ROWS not in lora:
        return params
    table = params["embed"]["embedding"]
    delta = lora[ROWS]
    n = delta.shape[0]
    if n > table.shape[0]:
        raise ValueError(f"lora {ROWS} has {n} rows; the embedding has {table.shape[0]}")
    rows = table[-n:].astype(jnp.float32) + delta.astype(jnp.float32)
    new_table = jnp.concatenate([table[:-n], rows.astype(table.dtype)], axis=0)
    return dict(params, embed=dict(params["embed"], embedding=new_table))


def merged_params(params, *, alpha: float, rank: int):
    """A LoRA model's {'base', 'lora'} params as plain float32 model params (adapters folded in);
    any other params unchanged. Inference and export use this; training keeps the two trees."""
    if not (isinstance(params, dict) and set(params) == {"base", "lora"}):
        return params
    base = jax.tree.map(lambda x: np.asarray(x, np.float32), params["base"])
    merged = merge_lora(base, params["lora"], alpha=alpha, rank=rank)
    return jax.tree.map(np.asarray, add_rows(merged, params["lora"]))

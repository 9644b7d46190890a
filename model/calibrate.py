"""Calibration statistics of a model's Dense layers: what each kernel sees on real inputs.

`dense_input_stats` runs a forward (any mode's objective, or any function of params that calls
the model) under `nn.intercept_methods` and adds up x^2 per input channel of every `layers.Dense`
call: name 'layer_0/attn/query/kernel' -> sum_x_K (or the Gram matrix sum x x^T for GPTQ / AWQ).
Wanda's norm is sqrt of that sum. Inside
nn.scan a traced value cannot leave the loop, so a scanned model is calibrated as its unscanned
twin: `unstack_layers` turns scan params into per-layer ones and `stack_layers` turns per-layer
statistics back into the scanned kernels' [n_layers, K] form.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import layers


STATS = {
    "sq": lambda x_NxK: jnp.sum(jnp.square(x_NxK), axis=0),  # [K]: Wanda's norm is its square root
    "gram": lambda x_NxK: x_NxK.T @ x_NxK,  # [K, K]: GPTQ's / AWQ's view of the inputs (model/ptq.py)
}


def dense_input_stats(forward: Callable, params, batches, stat: str = "sq") -> dict:
    """name -> float64 statistic of the input x of each Dense kernel, summed over every token of
    `batches`: 'sq' = sum of x_k^2 [K], 'gram' = sum of x x^T [K, K]. `forward(params, batch)` runs
    the model (its output is ignored)."""
    reduce = STATS[stat]

    def collect(params, batch):
        sums = {}

        def intercept(next_fun, args, kwargs, context):
            if isinstance(context.module, layers.Dense) and context.method_name == "__call__":
                x_NxK = args[0].astype(jnp.float32)
                name = "/".join(context.module.path) + "/kernel"
                value = reduce(x_NxK.reshape(-1, x_NxK.shape[-1]))
                sums[name] = sums[name] + value if name in sums else value
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(intercept):
            forward(params, batch)
        return sums

    step = jax.jit(collect)
    total: dict = {}
    for batch in batches:
        for name, value in jax.device_get(step(params, batch)).items():
            total[name] = total.get(name, 0.0) + np.asarray(value, np.float64)
    return total


def dense_input_sq_sums(forward: Callable, params, batches) -> dict:
    """name -> float64 [K]: sum over every token of x_k^2 for the input x of each Dense kernel."""
    return dense_input_stats(forward, params, batches, "sq")


def unstack_layers(params: dict) -> dict:
    """A scan model's params ('layers': {'block': leaves [n_layers, ...]}) as the unscanned model's
    ('layer_0', 'layer_1', ...); wrappers (a head's 'backbone') are followed."""
    out = {}
    for k, v in params.items():
        if k == "layers" and isinstance(v, dict) and set(v) == {"block"}:
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], v["block"])
        elif isinstance(v, dict):
            out[k] = unstack_layers(v)
        else:
            out[k] = v
    return out


def layer_part(parts: list[str]) -> int | None:
    """Where in a kernel name's parts the unscanned block ('layer_3') is, or None outside the blocks."""
    return next((j for j, p in enumerate(parts) if p.startswith("layer_") and p[6:].isdigit()), None)


def stack_layers(per_layer: dict, n_layers: int) -> dict:
    """name -> statistic of the unscanned model ('.../layer_3/attn/query/kernel') -> the scanned
    kernels' names ('.../layers/block/attn/query/kernel') with a leading [n_layers] dim; names outside
    the blocks are kept."""
    out, stacked = {}, {}
    for name, value in per_layer.items():
        parts = name.split("/")
        at = layer_part(parts)
        if at is None:
            out[name] = value
            continue
        key = "/".join(parts[:at] + ["layers", "block"] + parts[at + 1:])
        stacked.setdefault(key, {})[int(parts[at][6:])] = value
    for key, by_layer in stacked.items():
        if sorted(by_layer) != list(range(n_layers)):
            raise ValueError(f"calibration of {key}: layers {sorted(by_layer)} seen, expected 0..{n_layers - 1}")
        out[key] = np.stack([by_layer[i] for i in range(n_layers)])
    return out

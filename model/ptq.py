"""Post-training quantization of a params tree: calibration statistics from the model's own forward,
then every float kernel turned into the ints + scales a `stored` QuantSpec model declares.

- `calibrate(model_cfg, params, token_batches)`: for every transformer in the tree (a language model,
  a PPO policy's backbone and critic, a classifier's trunk) the input Gram matrix H = sum x x^T of
  each Dense kernel, accumulated over the batches (model/calibrate.py's interceptor).
- `quantize_params(params, abstract, method, grams)`: walks the stored model's abstract params; each
  'kernel_q' / 'embedding_q' node is filled from the float 'kernel' / 'embedding' at the same path,
  by round-to-nearest, GPTQ or AWQ (model/quantize.py); every other leaf is copied. The embedding /
  LM head is always round-to-nearest (its rows are looked up as well as multiplied: no single input
  Gram matrix describes its error).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import calibrate as calibrate_lib, quantize
from model.transformer import ModelConfig, Transformer

METHODS = ("rtn", "gptq", "awq")


def transformer_paths(params) -> list[tuple[str, ...]]:
    """Paths of the subtrees that are a Transformer's params (they hold 'embed' and 'final_norm')."""
    found = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if "embed" in node and "final_norm" in node:
            found.append(path)
            return
        for k, v in node.items():
            walk(v, path + (k,))
    walk(params, ())
    return found


def subtree(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def calibrate(model_cfg: ModelConfig, params, token_batches) -> dict:
    """{transformer path: {kernel name ('layer_0/attn/query/kernel'; nn.scan: 'layers/block/...', the
    layers stacked): float64 Gram matrix}} over `token_batches` (model/calibrate.py; a scanned model
    is calibrated as its unscanned twin)."""
    model = Transformer(dataclasses.replace(model_cfg, quant=None, scan_layers=False, remat="none"))
    forward = lambda p, tokens_BxL: model.apply({"params": p}, jnp.asarray(tokens_BxL), method="encode")  # noqa: E731
    out = {}
    for path in transformer_paths(params):
        p = subtree(params, path)
        grams = calibrate_lib.dense_input_stats(
            forward, calibrate_lib.unstack_layers(p) if model_cfg.scan_layers else p, token_batches, "gram")
        if not grams:
            raise ValueError("calibration needs at least one batch of tokens")
        out[path] = calibrate_lib.stack_layers(grams, model_cfg.n_layers) if model_cfg.scan_layers else grams
    return out


def _gram_for(grams: dict | None, path: tuple[str, ...]):
    """The Gram matrix of the kernel of the Dense module at `path`, or None."""
    for prefix, by_name in (grams or {}).items():
        if path[:len(prefix)] == prefix:
            return by_name.get("/".join(path[len(prefix):] + ("kernel",)))
    return None


def _quantize_kernel(w_KxM, h_KxK, bits: int, group: int, method: str, act_scale: bool, act_order: bool = False):
    """One [..., K, M] kernel (leading dims looped for the calibrated methods) -> (values, scale, s_K or None)."""
    if method == "rtn" or h_KxK is None:
        q, scale = quantize.rtn(np.asarray(w_KxM, np.float32), bits, group)
        s = np.ones(w_KxM.shape[:-1], np.float32) if act_scale else None
        return quantize.stored_values(q, bits), scale, s
    lead = w_KxM.shape[:-2]
    w = np.asarray(w_KxM, np.float64).reshape((-1,) + w_KxM.shape[-2:])
    h = np.asarray(h_KxK, np.float64).reshape((-1,) + h_KxK.shape[-2:])
    qs, scales, ss = [], [], []
    for i in range(w.shape[0]):
        if method == "gptq":
            q, scale = quantize.gptq(w[i], h[i], bits, group, act_order=act_order)
            s = np.ones(w.shape[1], np.float32)
        else:
            q, scale, s = quantize.awq(w[i], h[i], bits, group)
        qs.append(q), scales.append(scale), ss.append(s)
    q = np.stack(qs).reshape(lead + qs[0].shape)
    scale = np.stack(scales).reshape(lead + scales[0].shape)
    s = np.stack(ss).reshape(lead + ss[0].shape) if act_scale else None
    return quantize.stored_values(q, bits), scale, s


def quantize_params(params, abstract, method: str, grams: dict | None = None,
                    group: int = 0, act_order: bool = False) -> tuple[dict, dict]:
    """(stored params matching `abstract`, {kernel path: how it was quantized}); `act_order`: GPTQ's inputs
    in decreasing order of activation (model/quantize.py)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    report = {}

    def fill(src, target, path):
        if not isinstance(target, dict):
            return np.asarray(src)
        if "kernel_q" in target:
            bits = 4 if target["kernel_q"].dtype == jnp.uint8 else 8
            h = _gram_for(grams, path)
            kind = method if h is not None else "rtn"
            values, scale, s = _quantize_kernel(src["kernel"], h, bits, group, kind, "kernel_in_scale" in target,
                                                act_order)
            out = {"kernel_q": values, "kernel_scale": np.asarray(scale).astype(quantize.SCALE_DTYPE)}
            if s is not None:
                out["kernel_in_scale"] = s
            out.update({n: np.asarray(v) for n, v in src.items() if n != "kernel"})
            report["/".join(path)] = {"bits": bits, "group": group, "method": kind,
                                      "shape": list(src["kernel"].shape)}
            return out
        if "embedding_q" in target:
            bits = 4 if target["embedding_q"].dtype == jnp.uint8 else 8
            q_DxV, scale_GxV = quantize.rtn(np.asarray(src["embedding"], np.float32).T, bits, group)
            report["/".join(path)] = {"bits": bits, "group": group, "method": "rtn",
                                      "shape": list(src["embedding"].shape)}
            return {"embedding_q": np.ascontiguousarray(quantize.stored_values(q_DxV, bits).T),
                    "embedding_scale": np.ascontiguousarray(scale_GxV.T).astype(quantize.SCALE_DTYPE)}
        missing = sorted(set(target) - set(src))
        if missing:
            raise ValueError(f"params at {'/'.join(path) or '<root>'} have no {missing} (have {sorted(src)}): "
                             f"not the checkpoint of this model")
        return {k: fill(src[k], target[k], path + (k,)) for k in target}

    out = fill(nn.meta.unbox(params), nn.meta.unbox(abstract), ())
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(nn.meta.unbox(abstract))):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"quantized leaf {a.shape} {a.dtype} does not match the model's {b.shape} {b.dtype}")
    return out, report

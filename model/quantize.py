"""Weight-only quantization: symmetric absmax int8 / int4 grids, int4 packing, fake quantization for
QAT, and the two calibrated methods that pick better int4 grids than round-to-nearest (GPTQ, AWQ).

Layout: a kernel is w_KxM (K inputs, M outputs; leading dims, e.g. nn.scan's layer axis, are batch).
Its scales are scale_GxM: one per output channel (G = 1, `group` 0) or one per `group` consecutive
inputs (G = K / group). q = clip(round(w / scale), -qmax, qmax), qmax = 2^(bits-1) - 1 (127 or 7);
w ~= q * scale. Scales are stored as bfloat16 (SCALE_DTYPE; GPTQ / AWQ checkpoints keep 16-bit scales
too) and every grid is built on the rounded scale, so |w - q * scale| <= scale / 2 still holds. int4
values are stored two per byte along K (`pack_int4`). The embedding table [V, D] is the transposed
case (D is the LM head's input): callers pass table.T.

The calibrated methods read a layer's input statistics only through H_KxK = sum over calibration
tokens of x x^T: a kernel's output error on those inputs is trace(dW^T H dW) (`output_error`).
- GPTQ (Frantar et al. 2022): inputs quantized one at a time; each rounding error is pushed onto
  the inputs not yet quantized through the inverse Hessian's Cholesky factor.
- AWQ (Lin et al. 2023): inputs with large activations get their weights scaled up by s_k = rms(x_k)^a
  before rounding (and the dequantized weight divided back): the grid resolves those weights better.
  a is searched per kernel on the calibration output error; then per-group clipping of the range.

Why our own and not Google's qwix: README, Compression.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the transformer's weights are quantized (config.quant; None or bits 0 = float)."""
    bits: int = 0  # dense kernels: 0 = float, 8 or 4
    group: int = 0  # 0 = per output channel; else inputs per scale
    embed_bits: int = 8  # embedding / LM head: 0 = float, 8 or 4
    stored: bool = False  # params hold ints + scales (a quantized checkpoint); False = fake quantization (QAT)
    act_scale: bool = False  # kernels carry a per-input scale (AWQ)

    def __post_init__(self):
        for name in ("bits", "embed_bits"):
            if getattr(self, name) not in (0, 4, 8):
                raise ValueError(f"quant.{name}={getattr(self, name)}: expected 0 (off), 8 or 4")
        if self.group < 0 or (self.group and self.group % 2):
            raise ValueError(f"quant.group={self.group}: expected 0 (per output channel) or an even group size")


def spec_from_config(config) -> QuantSpec | None:
    """The run config's quant block as a QuantSpec; None when off (older configs have no block)."""
    q = config.get("quant") if hasattr(config, "get") else getattr(config, "quant", None)
    if q is None or int(q.bits) == 0:
        return None
    return QuantSpec(bits=int(q.bits), group=int(q.group), embed_bits=int(q.get("embed_bits", 8)),
                     stored=bool(q.get("stored", False)), act_scale=bool(q.get("act_scale", False)))


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# Stored scales: half of float32's bytes (per output channel they are ~1.5% of an int8 kernel) at a
# relative rounding of at most 2^-9, float32's range; the values are rounded against these scales.
SCALE_DTYPE = jnp.bfloat16


def on_scale_grid(scale):
    """`scale` rounded to what SCALE_DTYPE holds, as float32 (numpy or jax, like its input)."""
    xp = jnp if isinstance(scale, jax.Array) else np
    return xp.asarray(scale).astype(SCALE_DTYPE).astype(xp.float32)


def check_group(k: int, group: int, bits: int, where: str) -> int:
    """The group size in use for a K-input kernel (K when per channel); errors name the kernel."""
    g = group or k
    if k % g:
        raise ValueError(f"{where}: quant group {group} does not divide its input dim {k}")
    if bits == 4 and k % 2:
        raise ValueError(f"{where}: int4 packs two values per byte along the input dim, which is odd ({k})")
    return g


def _grouped(w_KxM, g: int):
    """[..., K, M] -> [..., K/g, g, M]."""
    *lead, k, m = w_KxM.shape
    return w_KxM.reshape(*lead, k // g, g, m)


def absmax_scale(w_KxM, bits: int, group: int, clip_GxM=None):
    """scale_GxM = absmax over each group of inputs / qmax (optionally shrunk by a clip ratio)."""
    xp = jnp if isinstance(w_KxM, jax.Array) else np
    g = group or w_KxM.shape[-2]
    amax_GxM = xp.max(xp.abs(_grouped(w_KxM, g)), axis=-2)
    if clip_GxM is not None:
        amax_GxM = amax_GxM * clip_GxM
    return on_scale_grid(xp.maximum(amax_GxM, 1e-8).astype(xp.float32) / qmax(bits))


def _per_input(scale_GxM, k: int):
    """scale_GxM repeated to [..., K, M] (each group's scale on its inputs)."""
    xp = jnp if isinstance(scale_GxM, jax.Array) else np
    return xp.repeat(scale_GxM, k // scale_GxM.shape[-2], axis=-2)


def quantize(w_KxM, scale_GxM, bits: int):
    """Round-to-nearest onto the grid: int8 values in [-qmax, qmax]."""
    xp = jnp if isinstance(w_KxM, jax.Array) else np
    q = xp.round(w_KxM / _per_input(scale_GxM, w_KxM.shape[-2]))
    return xp.clip(q, -qmax(bits), qmax(bits)).astype(xp.int8)


def dequantize(q_KxM, scale_GxM):
    """q * scale in float32."""
    return q_KxM.astype(jnp.float32) * _per_input(scale_GxM.astype(jnp.float32), q_KxM.shape[-2])


def rtn(w_KxM, bits: int, group: int):
    """(q, scale) by round-to-nearest with absmax scales."""
    scale_GxM = absmax_scale(w_KxM, bits, group)
    return quantize(w_KxM, scale_GxM, bits), scale_GxM


def fake_quant(w_KxM: jax.Array, bits: int, group: int) -> jax.Array:
    """dequantize(rtn(w)) in the forward, identity in the backward (straight-through estimator)."""
    q, scale_GxM = rtn(w_KxM, bits, group)
    return w_KxM + jax.lax.stop_gradient(dequantize(q, scale_GxM) - w_KxM)


def pack_int4(q_KxM):
    """int4 values [..., K, M] (K even) -> uint8 [..., K/2, M]: row 2i in the low nibble, 2i+1 in the high."""
    xp = jnp if isinstance(q_KxM, jax.Array) else np
    u = q_KxM.astype(xp.uint8) & 0xF
    return (u[..., 0::2, :] | (u[..., 1::2, :] << 4)).astype(xp.uint8)


def unpack_int4(p_HxM):
    """uint8 [..., K/2, M] -> int8 [..., K, M] in [-8, 7] (inverse of pack_int4)."""
    xp = jnp if isinstance(p_HxM, jax.Array) else np
    lo = (p_HxM & 0xF).astype(xp.int8)
    hi = (p_HxM >> 4).astype(xp.int8)
    lo = xp.where(lo > 7, lo - 16, lo).astype(xp.int8)
    hi = xp.where(hi > 7, hi - 16, hi).astype(xp.int8)
    *lead, h, m = p_HxM.shape
    return xp.stack([lo, hi], axis=-2).reshape(*lead, 2 * h, m)


def stored_values(q_KxM, bits: int):
    """What a checkpoint holds for q: int8 as it is, int4 packed."""
    return pack_int4(q_KxM) if bits == 4 else q_KxM


def stored_shape(k: int, m: int, bits: int) -> tuple[int, int]:
    return (k // 2, m) if bits == 4 else (k, m)


def unstored(values, bits: int):
    return unpack_int4(values) if bits == 4 else values


def output_error(w_KxM, w_hat_KxM, h_KxK) -> float:
    """trace(dW^T H dW): the summed squared output error of the kernel on the calibration inputs."""
    d = np.asarray(w_KxM, np.float64) - np.asarray(w_hat_KxM, np.float64)
    return float(np.einsum("km,kl,lm->", d, np.asarray(h_KxK, np.float64), d))


def gptq(w_KxM: np.ndarray, h_KxK: np.ndarray, bits: int, group: int, damp: float = 0.01,
         act_order: bool = False):
    """(q, scale) for one kernel [K, M] by GPTQ on the input Gram matrix H. A group's scales are the
    absmax of its (already error-updated) weights, fixed when the first of its inputs is reached.
    `act_order`: inputs are quantized in decreasing order of H's diagonal (the most active first,
    while the most inputs remain to absorb their error); groups stay consecutive inputs as stored.
    Weights that are exactly zero (a pruned kernel's) stay zero: the error updates skip them, so a
    pruned run quantized by GPTQ keeps its sparsity (the updates filled about a tenth of them before)."""
    w = np.array(w_KxM, np.float64)
    h = np.array(h_KxK, np.float64)
    k, m = w.shape
    live = w != 0.0  # from the weights as given: pruned positions are the zeros
    g = group or k
    dead = np.diag(h) == 0  # inputs never active in calibration: their weights do not matter there
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h, live = w[order], h[np.ix_(order, order)], live[order]
    group_of = order // g  # the stored group of each input, in processing order
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor: row i holds how input i's error spreads onward
    top = qmax(bits)
    q = np.zeros((k, m), np.int8)
    scale = np.zeros((k // g, m), np.float64)
    fixed = np.zeros(k // g, bool)
    for i in range(k):
        j = group_of[i]
        if not fixed[j]:
            scale[j] = on_scale_grid(np.maximum(np.max(np.abs(w[group_of == j]), axis=0), 1e-8) / top)
            fixed[j] = True
        s = scale[j]
        qi = np.clip(np.round(w[i] / s), -top, top)
        q[i] = qi
        err = (w[i] - qi * s) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], err) * live[i + 1:]
    out = np.zeros_like(q)
    out[order] = q
    return out, scale.astype(np.float32)


def _clip_search(w_KxM, h_KxK, bits: int, g: int, ratios=np.linspace(1.0, 0.6, 9)):
    """Per (group, output) shrink ratio of the absmax range minimising the group's own output error
    (H's diagonal blocks: groups treated as independent)."""
    k, m = w_KxM.shape
    wg = w_KxM.reshape(k // g, g, m)
    hb = np.stack([h_KxK[i:i + g, i:i + g] for i in range(0, k, g)])  # [G, g, g]
    best_err = np.full((k // g, m), np.inf)
    best = np.ones((k // g, m))
    for r in ratios:
        clip = np.full((k // g, m), r)
        scale = absmax_scale(w_KxM, bits, g, clip)
        d = wg - dequantize(np.asarray(quantize(w_KxM, scale, bits)), scale).reshape(k // g, g, m)
        err = np.einsum("Gim,Gij,Gjm->Gm", d, hb, d)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, r, best)
    return best


def awq(w_KxM: np.ndarray, h_KxK: np.ndarray, bits: int, group: int, grid: int = 20):
    """(q, scale, s_K) for one kernel: the grid is fitted to w * s (s on the inputs), and the served
    weight is dequantize(q, scale) / s. s = rms(x)^a with a in [0, 1) searched on the output error
    (a = 0 is round-to-nearest), then each group's range clipped where that lowers its error."""
    w = np.asarray(w_KxM, np.float64)
    h = np.asarray(h_KxK, np.float64)
    k, m = w.shape
    g = group or k
    rms = np.sqrt(np.maximum(np.diag(h), 0) / max(float(np.max(np.diag(h))), 1e-30)) + 1e-6
    best = (np.inf, None)
    for a in np.arange(grid) / grid:
        s = rms ** a
        s = s / np.sqrt(s.max() * s.min())
        ws = w * s[:, None]
        q, scale = rtn(ws, bits, g)
        err = output_error(w, dequantize(q, scale) / s[:, None], h)
        if err < best[0]:
            best = (err, s)
    s = best[1]
    ws = w * s[:, None]
    clip = _clip_search(ws, h / np.outer(s, s), bits, g)  # error of ws measured on inputs x / s
    scale = absmax_scale(ws, bits, g, clip)
    return quantize(ws, scale, bits), scale.astype(np.float32), s.astype(np.float32)

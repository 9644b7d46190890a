"""Building blocks: mixed-precision matmul, Dense, norms, embeddings, MLP.

Parameters are float32 and carry logical axis names (model/axes.py). Matmul operands are
cast to `dtype` (bf16 by default) with float32 accumulation in the forward AND backward
pass (`matmul` below); activations, norms, softmax and the loss stay float32. On CPUs with
avx512_bf16 this is the fast path (see STACK-NOTES.md); on TPU/GPU it is the usual recipe.
On CPUs without bf16 hardware the rounded operands go to float32 dots (`lowp`): same products.
A float32 model takes the same custom backward on CPU (XLA's autodiff of plain f32 dots ran 1.4x
slower there; LMSTACK_F32_AUTODIFF=1 restores it, for A/B measurements).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from model import axes, quantize

Dtype = Any
Initializer = Callable[..., jax.Array]


def row_major(x: jax.Array) -> jax.Array:
    """x, constrained to a row-major layout on CPU (identity elsewhere).

    XLA:CPU's layout assignment likes to turn a transpose feeding a dot into a column-major
    layout of the dot operand (or to fold it into the dot as a contraction over the operand's
    first dim). Its bf16 dot library (YNNPACK) takes neither, so such dots silently ran in f32,
    or failed at run time ("Unsupported element type for DotThunk: BF16 x BF16 =
    F32"). A layout constraint keeps the operand row-major: a transpose is then materialised,
    and a tensor that is row-major already costs nothing (the earlier pin, a 1-D reshape behind
    an optimization barrier, copied it). scripts/profile_step.py shows each dot's operand dtype.
    """
    if x.ndim < 2 or jax.default_backend() != "cpu":
        return x
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


@functools.lru_cache(maxsize=None)
def native_lowp_dots() -> bool:
    """Whether bf16 dots run as such: always off CPU; on CPUs only with AVX512-BF16 or AMX (elsewhere
    XLA:CPU emulates them, ~2.5x slower than float32 dots: Performance in README). The environment
    variable LMSTACK_BF16_DOTS=native|f32 overrides the CPU check (read once per process)."""
    override = os.environ.get("LMSTACK_BF16_DOTS", "auto")
    if override not in ("auto", "native", "f32"):
        raise ValueError(f"LMSTACK_BF16_DOTS={override!r}: expected auto, native or f32")
    if jax.default_backend() != "cpu" or override != "auto":
        return jax.default_backend() != "cpu" or override == "native"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


_NATIVE_FORCED = [False]


@contextlib.contextmanager
def native_dots():
    """While tracing inside it, bf16 dots stay bf16 dots whatever the CPU (`lowp` hands nothing over as
    float32). The decoder traces under it: its loop reads bf16 weights that XLA:CPU upcasts once,
    outside the loop, where float32 hand-over converted every weight at every token (a single
    request served at 485 instead of 701 tokens/s, Zen 2)."""
    before, _NATIVE_FORCED[0] = _NATIVE_FORCED[0], True
    try:
        yield
    finally:
        _NATIVE_FORCED[0] = before


def lowp(x: jax.Array, dtype: Dtype) -> jax.Array:
    """x rounded to the matmul dtype, as a dot operand. Where low-precision dots have no hardware it is
    handed over as float32 holding the rounded values: the same products (a product of two bf16
    numbers is exact in float32, and the sum is float32 either way), at float32 dot speed."""
    x = x.astype(dtype)
    if jnp.dtype(dtype) != jnp.float32 and not _NATIVE_FORCED[0] and not native_lowp_dots():
        return x.astype(jnp.float32)
    return x


def _dot(x_NxK: jax.Array, w_KxM: jax.Array, dtype: Dtype) -> jax.Array:
    return jax.lax.dot_general(
        lowp(x_NxK, dtype), lowp(w_KxM, dtype), (((x_NxK.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lowp_matmul(x_NxK, w_KxM, dtype):
    return _dot(x_NxK, w_KxM, dtype)


def _lowp_fwd(x_NxK, w_KxM, dtype):
    # Residuals kept in the low-precision dtype (half the memory); zero-size arrays carry the
    # primal dtypes so the cotangents come back in them.
    return _dot(x_NxK, w_KxM, dtype), (x_NxK.astype(dtype), w_KxM.astype(dtype),
                                       jnp.zeros((0,), x_NxK.dtype), jnp.zeros((0,), w_KxM.dtype))


def _lowp_bwd(dtype, res, g_NxM):
    x_NxK, w_KxM, x_tag, w_tag = res
    g_NxM = row_major(g_NxM.astype(dtype))  # e.g. a grouped-query head sum could reach here transposed
    dx_NxK = _dot(g_NxM, w_KxM.T, dtype)
    k, m = w_KxM.shape
    # Transpose explicitly (and materialise it row-major) so the weight-gradient dot is canonical.
    dw_KxM = row_major(_dot(row_major(x_NxK.reshape(-1, k).T), row_major(g_NxM.reshape(-1, m)), dtype))
    return dx_NxK.astype(x_tag.dtype), dw_KxM.astype(w_tag.dtype)


_lowp_matmul.defvjp(_lowp_fwd, _lowp_bwd)


def matmul(x_NxK: jax.Array, w_KxM: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """x @ w with float32 output; operands cast to `dtype` in forward and backward. A float32 model takes
    the same custom backward (row-major weight-gradient dots) on CPU; elsewhere XLA's own."""
    if jnp.dtype(dtype) == jnp.float32 and f32_autodiff():
        return jnp.dot(x_NxK, w_KxM.astype(x_NxK.dtype), preferred_element_type=jnp.float32)
    return _lowp_matmul(x_NxK, w_KxM, jnp.dtype(dtype))


F32_AUTODIFF = [os.environ.get("LMSTACK_F32_AUTODIFF", "") == "1"]  # XLA's autodiff for f32 on CPU too (A/B)


def f32_autodiff() -> bool:
    """Whether float32 matmuls and attention use XLA's autodiff (off CPU, or LMSTACK_F32_AUTODIFF=1) rather
    than the custom VJPs the low-precision path has."""
    return F32_AUTODIFF[0] or jax.default_backend() != "cpu"


class Dense(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] with logical names `kernel_axes`."""
    features: int
    kernel_axes: tuple[str | None, str | None]
    dtype: Dtype = jnp.bfloat16
    use_bias: bool = False
    kernel_init: Initializer = nn.initializers.normal(0.02)
    quant: quantize.QuantSpec | None = None  # None: a float kernel; else QAT or a quantized checkpoint's ints

    def kernel(self, k: int) -> jax.Array:
        """The kernel [K, M] as the matmul reads it: the float param, fake-quantized (QAT), or
        dequantized from the stored ints and scales (and per-input AWQ scales)."""
        spec, m = self.quant, self.features
        if spec is None or spec.bits == 0:
            return self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                              (k, m), jnp.float32)
        g = quantize.check_group(k, spec.group, spec.bits, "/".join(self.path) or self.name or "Dense")
        if not spec.stored:
            kernel_KxM = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                                    (k, m), jnp.float32)
            return quantize.fake_quant(kernel_KxM, spec.bits, spec.group)
        values = self.param("kernel_q", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes),
                            quantize.stored_shape(k, m, spec.bits), jnp.uint8 if spec.bits == 4 else jnp.int8)
        scale_GxM = self.param("kernel_scale", nn.with_logical_partitioning(
            nn.initializers.ones, (None, self.kernel_axes[1])), (k // g, m), quantize.SCALE_DTYPE)
        kernel_KxM = quantize.dequantize(quantize.unstored(values, spec.bits), scale_GxM)
        if spec.act_scale:
            s_K = self.param("kernel_in_scale", nn.with_logical_partitioning(
                nn.initializers.ones, (self.kernel_axes[0],)), (k,), jnp.float32)
            kernel_KxM = kernel_KxM / s_K[:, None]
        return kernel_KxM

    @nn.compact
    def __call__(self, x_NxK: jax.Array) -> jax.Array:
        kernel_KxM = self.kernel(x_NxK.shape[-1])
        y_NxM = matmul(x_NxK, kernel_KxM, self.dtype)
        if self.use_bias:
            bias_M = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, (self.kernel_axes[1],)), (self.features,), jnp.float32)
            y_NxM = y_NxM + bias_M.reshape((1,) * (y_NxM.ndim - 1) + (-1,))
        return y_NxM


def _lead(v_D: jax.Array, ndim: int) -> jax.Array:
    """[D] -> [1, ..., 1, D] (explicit broadcasting; tests run with rank promotion = raise)."""
    return v_D.reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
                             (x_NxD.shape[-1],), jnp.float32)
        x_NxD = x_NxD.astype(jnp.float32)
        ms_Nx1 = jnp.mean(jnp.square(x_NxD), axis=-1, keepdims=True)
        return x_NxD * jax.lax.rsqrt(ms_Nx1 + self.eps) * _lead(scale_D, x_NxD.ndim)


class LayerNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        d = x_NxD.shape[-1]
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
                             (d,), jnp.float32)
        bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
                            (d,), jnp.float32)
        x_NxD = x_NxD.astype(jnp.float32)
        mean_Nx1 = jnp.mean(x_NxD, axis=-1, keepdims=True)
        var_Nx1 = jnp.mean(jnp.square(x_NxD - mean_Nx1), axis=-1, keepdims=True)
        return ((x_NxD - mean_Nx1) * jax.lax.rsqrt(var_Nx1 + self.eps) * _lead(scale_D, x_NxD.ndim)
                + _lead(bias_D, x_NxD.ndim))


def make_norm(kind: str, eps: float, name: str | None = None) -> nn.Module:
    if kind == "rms":
        return RMSNorm(eps=eps, name=name)
    if kind == "layer":
        return LayerNorm(eps=eps, name=name)
    raise ValueError(f"model.norm={kind!r}: expected 'rms' or 'layer'")


class Embed(nn.Module):
    """Token (or position) embedding table [num, D]; `attend` gives tied output logits."""
    num_embeddings: int
    features: int
    dtype: Dtype = jnp.bfloat16
    init_std: float = 0.02
    table_axes: tuple[str | None, str | None] = (axes.VOCAB, axes.EMBED)
    quant: quantize.QuantSpec | None = None  # its `bits` apply (the caller passes embed_bits there)

    def setup(self):
        spec, v, d = self.quant, self.num_embeddings, self.features
        if spec is None or spec.bits == 0 or not spec.stored:
            self.embedding = self.param(
                "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.table_axes),
                (v, d), jnp.float32)
            return
        # stored as the LM head's kernel [D, V] would be, transposed back to [V, D] (int4: [V, D/2])
        g = quantize.check_group(d, spec.group, spec.bits, "embedding")
        self.embedding_q = self.param(
            "embedding_q", nn.with_logical_partitioning(nn.initializers.zeros, self.table_axes),
            quantize.stored_shape(d, v, spec.bits)[::-1], jnp.uint8 if spec.bits == 4 else jnp.int8)
        self.embedding_scale = self.param("embedding_scale", nn.with_logical_partitioning(
            nn.initializers.ones, (self.table_axes[0], None)), (v, d // g), quantize.SCALE_DTYPE)

    def table(self) -> jax.Array:
        """The [V, D] table as used: float, fake-quantized (QAT) or dequantized."""
        spec = self.quant
        if spec is None or spec.bits == 0:
            return self.embedding
        if not spec.stored:
            return quantize.fake_quant(self.embedding.T, spec.bits, spec.group).T
        q_DxV = quantize.unstored(self.embedding_q.T, spec.bits)
        return quantize.dequantize(q_DxV, self.embedding_scale.T).T

    def __call__(self, ids_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.table(), ids_BxL, axis=0)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        return matmul(x_BxLxD, self.table().T, self.dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, with a hand-written backward: autodiff's version materialised sigmoid(gate)
    and silu(gate) * up as extra float32 [N, d_ff] tensors (five passes over them a layer,
    three here; its gain on the step: README, Performance). Same math, float32."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    return g * up * sig * (1.0 + gate * (1.0 - sig)), g * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
    """GELU (GPT-2) or SwiGLU (Llama) feed-forward block."""
    d_model: int
    d_ff: int
    kind: str = "swiglu"
    dtype: Dtype = jnp.bfloat16
    init_std: float = 0.02
    out_init_std: float = 0.02
    use_bias: bool = False
    quant: quantize.QuantSpec | None = None

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dense = functools.partial(Dense, dtype=self.dtype, use_bias=self.use_bias, quant=self.quant,
                                  kernel_init=nn.initializers.normal(self.init_std))
        if self.kind == "swiglu":
            gate_BxLxF = dense(self.d_ff, (axes.EMBED, axes.MLP), name="gate")(x_BxLxD)
            up_BxLxF = dense(self.d_ff, (axes.EMBED, axes.MLP), name="up")(x_BxLxD)
            h_BxLxF = swiglu(gate_BxLxF, up_BxLxF)
        elif self.kind == "gelu":
            h_BxLxF = nn.gelu(dense(self.d_ff, (axes.EMBED, axes.MLP), name="up")(x_BxLxD))
        else:
            raise ValueError(f"model.mlp={self.kind!r}: expected 'swiglu' or 'gelu'")
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, (axes.BATCH, axes.LENGTH, axes.MLP))
        return Dense(self.d_model, (axes.MLP, axes.EMBED), dtype=self.dtype, use_bias=self.use_bias,
                     kernel_init=nn.initializers.normal(self.out_init_std), quant=self.quant, name="down")(h_BxLxF)

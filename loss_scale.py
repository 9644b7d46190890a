"""Dynamic loss scaling for float16 matmuls (model.dtype='float16'): pure functions on a small state.

float16 has 5 exponent bits: backward matmul operands below ~6e-8 flush to zero and above 65504 become
inf. The train step multiplies the loss by `scale` before differentiating (so the cotangents the float16
matmuls see are `scale` times larger and small gradients survive) and divides the float32 gradients by it
afterwards. A step whose gradients come out non-finite while the loss is finite overflowed: it is skipped
and the scale halves; after `period` consecutive finite steps the scale doubles. Such a skip is routine
under loss scaling and is not reported to the non-finite policy (train.on_nonfinite) unless the scale is
already at its floor, 1 (no smaller scale could help); a loss that is itself non-finite always is.
Scales are powers of two (given a power-of-two start), so scaling and unscaling are exact.

bfloat16 and float32 runs have no state (None) and their train step is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

DTYPES = ("bfloat16", "float16", "float32")
MIN_SCALE, MAX_SCALE = 1.0, 2.0**40  # the cap only keeps the scale finite (overflows stop growth long before)


class LossScale(struct.PyTreeNode):
    scale: jax.Array  # float32: the loss multiplier
    good_steps: jax.Array  # int32: consecutive finite steps since the scale last changed
    skipped: jax.Array  # int32: overflow skips in all (not counted as dropped updates)
    period: int = struct.field(pytree_node=False, default=2000)  # finite steps before the scale doubles


def initial(dtype: str, ocfg) -> LossScale | None:
    """The state a new run starts from: None unless model.dtype is 'float16'. Checks the fields."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: expected one of {DTYPES}")
    if dtype != "float16":
        return None
    init, period = float(ocfg.loss_scale_init), int(ocfg.loss_scale_period)
    if not MIN_SCALE <= init <= MAX_SCALE:
        raise ValueError(f"optim.loss_scale_init={ocfg.loss_scale_init!r} must be in [{MIN_SCALE:g}, 2**40]")
    if period < 1:
        raise ValueError(f"optim.loss_scale_period={ocfg.loss_scale_period!r} must be >= 1")
    return LossScale(scale=jnp.asarray(init, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                     skipped=jnp.zeros((), jnp.int32), period=period)


def scaled(objective, ls: LossScale):
    """objective(params, batch, rng) -> (loss, metrics) as a function whose value is loss * scale, with the
    unscaled loss carried beside the metrics: differentiate it with has_aux=True."""
    def fn(params, batch, rng):
        loss, metrics = objective(params, batch, rng)
        return loss * ls.scale, (loss, metrics)
    return fn


def unscale(ls: LossScale, grads):
    """Gradients of the scaled loss -> gradients of the loss."""
    inv = 1.0 / ls.scale
    return jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)


def adjust(ls: LossScale, loss_finite: jax.Array, grads_finite: jax.Array) -> tuple[LossScale, jax.Array]:
    """After a step: (the next state, whether this step was an overflow skip the policy should not count).
    Finite step: one more good step, doubling at `period`. Overflow (finite loss, non-finite gradients):
    halve (not below MIN_SCALE), counted as a skip while the scale was above the floor. Non-finite loss:
    scale kept, run of good steps reset."""
    ok = loss_finite & grads_finite
    overflow = loss_finite & ~grads_finite
    skip = overflow & (ls.scale > MIN_SCALE)
    good = jnp.where(ok, ls.good_steps + 1, 0)
    grow = good >= ls.period
    scale = jnp.where(grow, jnp.minimum(ls.scale * 2.0, MAX_SCALE), ls.scale)
    scale = jnp.where(overflow, jnp.maximum(ls.scale * 0.5, MIN_SCALE), scale)
    return ls.replace(scale=scale, good_steps=jnp.where(grow, 0, good),
                      skipped=ls.skipped + skip.astype(jnp.int32)), skip

"""Train state, sharded initialisation, and the jitted train / eval steps (pure functions)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

import loss_scale
import sharding
from model import prune


class TrainState(struct.PyTreeNode):
    step: jax.Array  # applied train steps (micro-batches when accumulating); dropped ones not counted
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data; a call's dropout key is fold_in(rng, step + dropped [+ overflow skips])
    lr_scale: jax.Array  # multiplies every update (lowered by a non-finite rollback)
    dropped: jax.Array  # updates dropped because the loss or gradients were not finite
    last_dropped: jax.Array  # step of the most recent dropped update (-1: none)
    loss_scale: loss_scale.LossScale | None = None  # model.dtype='float16' only (loss_scale.py)


def init_state(model, tx, mesh, rules, seed: int, seq_len: int, scale: loss_scale.LossScale | None = None):
    """Sharded TrainState: eval_shape first, then a jitted init straight into its shardings,
    so weights are never materialised unsharded. `scale`: loss_scale.initial(...) (float16 runs).
    Returns (state, state_shardings)."""

    def init_fn(key):
        params_key, dropout_key = jax.random.split(key)
        params = _fresh_params(model, params_key, seq_len)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(dropout_key), lr_scale=jnp.ones((), jnp.float32),
                          dropped=jnp.zeros((), jnp.int32), last_dropped=-jnp.ones((), jnp.int32),
                          loss_scale=scale)

    key = jax.random.key(seed)
    with sharding.activate(mesh, rules):
        abstract = jax.eval_shape(init_fn, key)
        shardings = sharding.state_shardings(abstract, mesh, rules)
        state = jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=shardings)(key)
    return state, shardings


def _fresh_params(model, params_key, seq_len: int):
    return model.init(params_key, jnp.zeros((1, seq_len), jnp.int32))["params"]


def init_params(model, mesh, rules, seed: int, seq_len: int, params_shardings):
    """The params init_state starts from (the same key, the same values), alone: no optimizer state. For a
    frozen copy of the initial model (the RL reference) beside the live state."""
    params_key = jax.random.split(jax.random.key(seed))[0]
    with sharding.activate(mesh, rules):
        return jax.jit(lambda k: nn.meta.unbox(_fresh_params(model, k, seq_len)), out_shardings=params_shardings)(
            params_key)


def abstract_state(state_shardings, state) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for Orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)


def _train_step(state: TrainState, batch, *, model, tx, objective, schedule, accum: int):
    ls = state.loss_scale  # None (bf16/f32): no scaling, and none of its operations are traced
    calls = state.step + state.dropped  # train-step calls so far, dropped ones included
    if ls is not None:
        calls = calls + ls.skipped  # and the overflow skips
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), calls)
    if ls is None:
        grad_fn = jax.value_and_grad(functools.partial(objective, model=model), has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
    else:
        grad_fn = jax.grad(loss_scale.scaled(functools.partial(objective, model=model), ls), has_aux=True)
        grads, (loss, metrics) = grad_fn(state.params, batch, rng)
        grads = loss_scale.unscale(ls, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    params = prune.apply_masks(params, opt_state)  # pruned weights stay exactly 0 under an LR scale < 1 too
    # A non-finite loss or gradient never reaches the parameters, the optimizer moments or the step count:
    # `step` counts applied micro-steps, as the optimizer's own counters do (LR schedule, MultiSteps windows).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    uncounted = finite  # not a dropped update for the non-finite policy
    if ls is not None:  # float16: an overflow skip is routine (it shrinks the scale), not a dropped update
        ls, skip = loss_scale.adjust(ls, jnp.isfinite(loss), jnp.isfinite(grad_norm))
        uncounted = finite | skip
        metrics = dict(metrics, loss_scale=ls.scale, overflow_skips=ls.skipped)
    dropped = state.dropped + (~uncounted).astype(jnp.int32)
    last_dropped = jnp.where(uncounted, state.last_dropped, calls // accum + 1)
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step // accum) * state.lr_scale,
                   dropped=dropped, last_dropped=last_dropped)
    return state.replace(step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), dropped=dropped,
                         last_dropped=last_dropped, loss_scale=ls), metrics


def make_train_step(*, model, tx, objective: Callable, schedule, accum: int, mesh, rules,
                    state_shardings, consts=None, consts_shardings=None) -> Callable:
    """jit(train_step) with explicit shardings and a donated state; traced under the mesh rules. `consts`
    (continual.py: the anchor params and Fisher) reach the objective as its `consts=` keyword, passed as a
    jit argument with `consts_shardings` (not constants baked into the program)."""
    options = dict(model=model, tx=tx, schedule=schedule, accum=accum)
    if consts is None:
        fn, extra = functools.partial(_train_step, objective=objective, **options), ()
    else:
        def fn(state, batch, c):
            return _train_step(state, batch, objective=functools.partial(objective, consts=c), **options)
        extra = (consts,)
    in_shardings = (state_shardings, sharding.batch_sharding(mesh)) + ((consts_shardings,) if extra else ())
    step = jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_shardings, None), donate_argnums=0)

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return step(state, batch, *extra)
    run.jitted = step
    return run


def make_eval_step(*, model, objective: Callable, mesh, rules, state_shardings) -> Callable:
    """params, batch -> metric sums (no dropout)."""
    step = jax.jit(lambda params, batch: objective(params, batch, None, model=model)[1],
                   in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)))

    def run(params, batch):
        with sharding.activate(mesh, rules):
            return step(params, batch)
    return run


def abstract_params(model, mesh, rules, seq_len: int):
    """(params as ShapeDtypeStructs carrying their shardings, those shardings): a restore target, no init."""
    dummy_1xL = jnp.zeros((1, seq_len), jnp.int32)
    with sharding.activate(mesh, rules):
        boxed = jax.eval_shape(lambda k: model.init(k, dummy_1xL)["params"], jax.random.key(0))
        shardings = sharding.state_shardings(boxed, mesh, rules)
    plain = nn.meta.unbox(boxed)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings), shardings

"""Batched greedy decoding in one compiled loop (full-window forward per token; no KV cache yet).

    generate = make_greedy(model, width=256, max_new_tokens=32, stop_id=end_id)
    out_BxT = generate(params, prompts_BxW, lengths_B)   # T = max_new_tokens; after a stop: stop_id

Prompts sit left-aligned in a [B, width] buffer (anything after a row's length is ignored: the
model is causal, so position i only sees positions <= i). Each step runs the model over the
buffer, takes the argmax at every row's last position and appends it. A row stops after emitting
`stop_id` or when its buffer is full; its remaining outputs are `stop_id`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def make_greedy(model, *, width: int, max_new_tokens: int, stop_id: int) -> Callable:
    """jit((params, prompts_BxW int32, lengths_B int32) -> generated ids [B, max_new_tokens])."""

    def run(params, buf_BxW, lengths_B):
        b = buf_BxW.shape[0]
        pos_BxW = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
        seg_BxW = jnp.ones((b, width), jnp.int32)
        rows_B = jnp.arange(b)

        def step(t, carry):
            buf_BxW, len_B, done_B, out_BxT = carry
            logits_BxWxV = model.apply({"params": params}, buf_BxW, pos_BxW, seg_BxW)
            next_B = jnp.argmax(logits_BxWxV[rows_B, len_B - 1], axis=-1).astype(jnp.int32)
            done_B = done_B | (len_B >= width)
            next_B = jnp.where(done_B, stop_id, next_B)
            out_BxT = out_BxT.at[:, t].set(next_B)
            write_B = jnp.minimum(len_B, width - 1)
            buf_BxW = buf_BxW.at[rows_B, write_B].set(jnp.where(done_B, buf_BxW[rows_B, write_B], next_B))
            len_B = jnp.where(done_B, len_B, len_B + 1)
            return buf_BxW, len_B, done_B | (next_B == stop_id), out_BxT

        out_BxT = jnp.full((b, max_new_tokens), stop_id, jnp.int32)
        init = (buf_BxW, lengths_B, jnp.zeros((b,), bool), out_BxT)
        return jax.lax.fori_loop(0, max_new_tokens, step, init)[3]

    return jax.jit(run)


def left_align(prompts: list[np.ndarray], width: int, rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ([rows, width] buffer, lengths). A prompt longer than `width - 1` keeps its last
    width - 1 tokens (room for one new token); missing rows are one pad token long."""
    buf = np.full((rows, width), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        p = np.asarray(p, np.int32)[-(width - 1):]
        buf[i, :len(p)] = p
        lengths[i] = max(len(p), 1)
    return buf, lengths


def until_stop(ids, stop_id: int) -> list[int]:
    """Generated ids up to (not including) the first stop id."""
    ids = [int(i) for i in ids]
    return ids[:ids.index(stop_id)] if stop_id in ids else ids

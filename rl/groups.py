"""One row per prompt: a group's completions share their prompt's forward pass (GRPO's G, PPO's group_size).

A rollout's rows (rl/rollout.to_rows) repeat each prompt for every completion, so the trainer, the reference
and the old-log-prob pass would compute the same prompt positions G times: with 70-token prompts and
16-token completions that is 4 of every 5 positions. `pack` lays a group out as ONE model row instead,

    [ prompt (segment -1), padding | completion 1 (segment 1) | completion 2 (segment 2) | ... ]

where a negative segment id is a shared prefix (model/attention.attention_mask: seen by every later token
of the row) and each completion sees the prompt and itself only, at the positions it has in its own row
(prompt length + t). The logits that score completion g's token t are those at its previous token: the
prompt's last one for t = 0, else token t - 1 of its slot; `src` holds that index. The math is the rows'
(same positions, same visible keys), in a quarter of the work.

The per-group batch: `inputs`, `positions`, `segment_ids` [P, W] (the model's), and every other array with
leading dims [P, G] (`src`, `targets`, `mask`, `completion`, `sampler_logp` [P, G, T]; later `old_logp`,
`ref_logp`, `advantages` ...), so a minibatch or a data-parallel shard is a slice of whole groups.
`flat(batch)` gives the losses those as [P * G, ...]: the completion-major token layout (token t of a
completion at column t) on which rl/objectives.py computes exactly what it computes on rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

MODEL_KEYS = ("inputs", "positions", "segment_ids")
TOKEN_KEYS = ("targets", "mask", "completion", "sampler_logp")


def is_grouped(batch: dict) -> bool:
    return "src" in batch


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def pack(rows: dict, prompt_lens_N: np.ndarray, group: int, *, max_prompt_len: int, max_new_tokens: int) -> dict:
    """Rollout rows [N, L] (rl/rollout.to_rows: prompt + completion, completion marked by `completion`) ->
    the per-group batch. Prompt slots are the longest prompt rounded up to 32 (at most max_prompt_len),
    completion slots the longest completion rounded up to 8 (at most max_new_tokens): few shapes, few
    compiles."""
    prompt_lens_N = np.asarray(prompt_lens_N, np.int64)
    n = len(prompt_lens_N)
    if n % group:
        raise ValueError(f"{n} rows are not whole groups of {group}")
    p = n // group
    lens_PxG = prompt_lens_N.reshape(p, group)
    if np.any(lens_PxG != lens_PxG[:, :1]):
        raise ValueError("the rows of a group must share their prompt (rows are problem-major, group per problem)")
    lens_P = lens_PxG[:, 0]
    k_N = rows["completion"].sum(axis=1).astype(np.int64)  # completion tokens per row
    lp = min(_round_up(int(lens_P.max()), 32), _round_up(int(max_prompt_len), 8))
    t = min(_round_up(max(int(k_N.max()), 1), 8), _round_up(int(max_new_tokens), 8))
    w = lp + group * t
    inputs = np.zeros((p, w), np.int32)
    positions = np.zeros((p, w), np.int32)
    segment_ids = np.zeros((p, w), np.int32)
    out = {"src": np.zeros((p, group, t), np.int32)}
    out.update({k: np.zeros((p, group, t), rows[k].dtype) for k in TOKEN_KEYS})
    for i in range(n):
        q, g = divmod(i, group)
        m, k = int(lens_P[q]), int(k_N[i])
        first = m - 1  # the row's column that predicts the completion's first token
        if g == 0:
            inputs[q, :m] = rows["inputs"][i, :m]  # ids[:-1] of the row: the prompt, then the completion
            positions[q, :m] = np.arange(m)
            segment_ids[q, :m] = -1
        start = lp + g * t  # the completion's tokens but its last (which predicts nothing), as its row feeds them
        inputs[q, start:start + k - 1] = rows["targets"][i, first:first + k - 1]
        positions[q, start:start + k - 1] = m + np.arange(k - 1)
        segment_ids[q, start:start + k - 1] = g + 1
        out["src"][q, g, :k] = np.concatenate([[first], start + np.arange(k - 1)])
        for key in TOKEN_KEYS:
            out[key][q, g, :k] = rows[key][i, first:first + k]
    out.update(inputs=inputs, positions=positions, segment_ids=segment_ids)
    return out


def per_group(x_Nx, group: int):
    """[N, ...] (problem-major rows) -> [N / group, group, ...]."""
    return np.asarray(x_Nx).reshape(-1, group, *np.shape(x_Nx)[1:])


def per_row(x_PxGx):
    """[P, G, ...] -> [P * G, ...]: works on numpy and jax arrays."""
    return x_PxGx.reshape(-1, *x_PxGx.shape[2:])


def flat(batch: dict) -> dict:
    """The per-group batch with every non-model array as rows [P * G, ...] (the model keys dropped)."""
    return {k: per_row(v) for k, v in batch.items() if k not in MODEL_KEYS}


def gather(x_PxWx, src_PxGxT):
    """x at each completion token's scoring position: [P, W, ...] -> [P * G, T, ...] (within each group's row,
    so a shard of whole groups gathers locally)."""
    p, g, t = src_PxGxT.shape
    idx = src_PxGxT.reshape(p, g * t, *[1] * (x_PxWx.ndim - 2))  # broadcast over x's trailing dims
    return jnp.take_along_axis(x_PxWx, idx, axis=1).reshape(p * g, t, *x_PxWx.shape[2:])

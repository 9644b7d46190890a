"""Choosing the next token: penalties, temperature, top-k / top-p / min-p support, seeded draws.

    s = Sampling(temperature=0.8, top_p=0.95)            # one request's settings (host side)
    rows = stack([s, Sampling()], batch=4)               # per-row [B] arrays for the decoder
    token_B = choose(logits_BxV, rows, keys_B, counts_BxV, prompt_BxV)

Every setting is a per-row array, so one batch can serve requests with different settings (the
server's decode slots). Order, as in vLLM and Hugging Face: penalties on the raw logits
(repetition over prompt + output tokens, presence/frequency over output tokens), then
temperature, then top-k, then top-p on the top-k distribution renormalised, then min-p (a token
is kept when its probability is at least min_p x the most likely one's). Temperature 0 is greedy
(argmax of the penalised logits). The most likely token always survives every filter.

Log-probs reported by the decoder are of the raw model distribution (log-softmax of the
unpenalised logits at temperature 1): the quantity a training forward pass recomputes.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class SamplingError(ValueError):
    """A sampling value out of range; `field` names it (the server answers it as the error's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's sampling settings; defaults leave the distribution unchanged (temperature 1)."""
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output

    def __post_init__(self):
        # every value a finite number (NaN / inf penalties turned the logits into NaN: garbage tokens), top_k
        # within the int32 the rows hold (a larger one overflowed inside the decoder, failing its whole batch)
        checks = {"temperature": (self.temperature >= 0, "temperature >= 0"),
                  "top_k": (0 <= self.top_k < 2**31, "0 <= top_k < 2**31"),
                  "top_p": (0 < self.top_p <= 1, "0 < top_p <= 1"), "min_p": (0 <= self.min_p <= 1, "0 <= min_p <= 1"),
                  "repetition_penalty": (self.repetition_penalty > 0, "repetition_penalty > 0"),
                  "presence_penalty": (True, ""), "frequency_penalty": (True, "")}
        for name, (ok, rule) in checks.items():
            value = getattr(self, name)
            if not ok or not np.isfinite(value):
                raise SamplingError(name, f"sampling {name}={value!r} is out of range (a finite number"
                                          f"{', ' + rule if rule else ''})")


GREEDY = Sampling(temperature=0.0)


@flax.struct.dataclass
class Rows:
    """Sampling settings as per-row arrays ([B] each)."""
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    min_p_B: jax.Array
    repetition_penalty_B: jax.Array
    presence_penalty_B: jax.Array
    frequency_penalty_B: jax.Array


def stack(settings: list[Sampling], batch: int | None = None) -> Rows:
    """Per-request settings -> Rows of `batch` rows (missing rows greedy)."""
    batch = len(settings) if batch is None else batch
    settings = list(settings) + [GREEDY] * (batch - len(settings))
    col = lambda name, dtype: np.array([getattr(s, name) for s in settings], dtype)  # noqa: E731
    return Rows(col("temperature", np.float32), col("top_k", np.int32), col("top_p", np.float32),
                col("min_p", np.float32), col("repetition_penalty", np.float32),
                col("presence_penalty", np.float32), col("frequency_penalty", np.float32))


def penalize(logits_BxV, rows: Rows, counts_BxV, prompt_BxV):
    """Repetition (CTRL: divide a positive logit, multiply a negative one) over tokens in the prompt or
    output, then presence and frequency penalties over output tokens (counts_BxV)."""
    seen_BxV = prompt_BxV | (counts_BxV > 0)
    r_Bx1 = rows.repetition_penalty_B[:, None]
    logits_BxV = jnp.where(seen_BxV, jnp.where(logits_BxV > 0, logits_BxV / r_Bx1, logits_BxV * r_Bx1), logits_BxV)
    return (logits_BxV - rows.presence_penalty_B[:, None] * (counts_BxV > 0)
            - rows.frequency_penalty_B[:, None] * counts_BxV.astype(jnp.float32))


def support(logits_BxV, rows: Rows):
    """Boolean [B, V]: the tokens top-k, then top-p, then min-p keep, on logits / temperature."""
    b, v = logits_BxV.shape
    temp_Bx1 = jnp.maximum(rows.temperature_B, 1e-6)[:, None]
    order_BxV = jnp.argsort(-logits_BxV, axis=-1)  # most likely first
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1) / temp_Bx1
    rank_V = jnp.arange(v)
    k_Bx1 = jnp.where(rows.top_k_B > 0, rows.top_k_B, v)[:, None]
    keep_BxV = rank_V[None, :] < k_Bx1
    probs_BxV = jax.nn.softmax(jnp.where(keep_BxV, sorted_BxV, -jnp.inf), axis=-1)  # renormalised over top-k
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
    keep_BxV = keep_BxV & ((before_BxV < rows.top_p_B[:, None]) | (rows.top_p_B[:, None] >= 1))  # no rounding loss
    keep_BxV = keep_BxV & (probs_BxV >= rows.min_p_B[:, None] * probs_BxV[:, :1])
    keep_BxV = keep_BxV.at[:, 0].set(True)
    rows_B1 = jnp.arange(b)[:, None]
    return jnp.zeros((b, v), bool).at[rows_B1, order_BxV].set(keep_BxV)


def choose(logits_BxV, rows: Rows, keys, counts_BxV, prompt_BxV):
    """The next token of every row: argmax at temperature 0, else a draw from the filtered
    distribution with that row's key (so a row's text depends on its seed, not on its batch).
    `keys` is a [B] key array or a function making one (then derived only when some row samples).
    All-greedy batches skip the draw, and batches without top-k/top-p/min-p skip the sort."""
    logits_BxV = penalize(logits_BxV.astype(jnp.float32), rows, counts_BxV, prompt_BxV)
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def sampled():
        scaled_BxV = logits_BxV / jnp.maximum(rows.temperature_B, 1e-6)[:, None]
        filtered = jnp.any((rows.top_k_B > 0) | (rows.top_p_B < 1) | (rows.min_p_B > 0))
        masked_BxV = jax.lax.cond(filtered, lambda: jnp.where(support(logits_BxV, rows), scaled_BxV, -jnp.inf),
                                  lambda: scaled_BxV)
        keys_B = keys() if callable(keys) else keys
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, masked_BxV).astype(jnp.int32)
        return jnp.where(rows.temperature_B > 0, drawn_B, greedy_B)

    return jax.lax.cond(jnp.all(rows.temperature_B == 0), lambda: greedy_B, sampled)

"""The KV-cache decoding programs: pure functions over a batch of decode slots (`State`), which
model/decode.py's Decoder jits once per model config, batch, cache length and n_top (`shared_programs`)
and drives from the host.

- `prepare`: the params decoding runs on: a LoRA run's adapters applied exactly as its training
  forward applies them, and dense kernels cast to the matmul dtype once (not at every token).
- `prefill`: new prompts (right-padded [N, T], any lengths) run through the model in decode mode
  (`Transformer(decode=True)`: the same params plus a 'cache' collection, slot = position, so the
  padding after a prompt is never attended and is overwritten as the row grows) (`prefill_rows`);
  their cache rows are written into decode slots of the batch state (`insert`), and each row's first
  token is chosen from the logits at its last real token.
- `resize`: the batch state holds only the cache slots its rows can reach (a window, a few sizes per
  context: `attention_window`), cut or grown as they advance, so every decode step reads the cache where it lies.
- `decode_steps`: a `lax.while_loop` of one-token steps over every slot, ending when every row is
  done or after `n` steps; it returns each step's tokens, their log-probs (float32 log-softmax of the
  raw logits: what a training forward pass gives) and, with `n_top`, the most likely alternatives
  (`decode_rows`: the same over a subset of the slots).
A row finishes with 'stop' (a stop id) or 'length' (max_new_tokens, or no cache slot left): `FINISH`.
Random draws use key(seed) folded with the token's index in its completion, so a request's text depends
on its seed only, never on its batch or slot. scripts/export.py exports these same functions.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model import layers
from model import lora as lora_lib
from model import sampling
from model.transformer import Transformer

FINISH = {1: "stop", 2: "length"}
MAX_STOP_IDS = 8


@flax.struct.dataclass
class State:
    """Everything a decode slot holds between steps ([B] per field unless named otherwise)."""
    cache: dict  # per layer: cached_key/cached_value [B, V, S, K] (with scan_layers: [n_layers, B, V, S, K])
    token_B: jax.Array  # the next input token (the last one chosen)
    position_B: jax.Array  # its cache slot
    generated_B: jax.Array  # tokens chosen so far
    max_new_B: jax.Array
    done_B: jax.Array
    finish_B: jax.Array  # 0 running / free, 1 stop, 2 length
    seed_B: jax.Array
    stop_BxS: jax.Array  # stop ids, -1 = none
    counts_BxV: jax.Array  # output token counts (presence / frequency penalties)
    prompt_BxV: jax.Array  # tokens in the prompt (repetition penalty)
    rows: sampling.Rows


def unwrap(model) -> tuple[nn.Module, Callable]:
    """(the plain Transformer, params -> its params): a LoraModel's adapters applied as in training."""
    if isinstance(model, lora_lib.LoraModel):
        return model.inner, model.effective_params
    if not isinstance(model, Transformer):
        raise TypeError(f"the decoder needs a causal Transformer (or a LoRA-wrapped one), got {type(model).__name__}")
    return model, lambda params: params


def prepare(model, params):
    """Params for decoding: adapters applied, dense kernels in the matmul dtype (cast once)."""
    inner, effective = unwrap(model)
    dtype = inner.cfg.compute_dtype

    def cast(path, x):
        return x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x
    return jax.tree_util.tree_map_with_path(cast, effective(nn.meta.unbox(params)))


def init_cache(dec_model: Transformer, batch: int, cache_len: int) -> dict:
    shapes = jax.eval_shape(lambda: dec_model.init(jax.random.key(0), jnp.zeros((batch, cache_len), jnp.int32),
                                                   method="encode"))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def empty_state(dec_model: Transformer, batch: int, cache_len: int) -> State:
    """A batch of free slots (all done)."""
    zeros = jnp.zeros((batch,), jnp.int32)
    v = dec_model.cfg.vocab_size
    return State(cache=init_cache(dec_model, batch, cache_len), token_B=zeros, position_B=zeros, generated_B=zeros,
                 max_new_B=zeros, done_B=jnp.ones((batch,), bool), finish_B=zeros, seed_B=zeros.astype(jnp.uint32),
                 stop_BxS=jnp.full((batch, MAX_STOP_IDS), -1, jnp.int32),
                 counts_BxV=jnp.zeros((batch, v), jnp.int32), prompt_BxV=jnp.zeros((batch, v), bool),
                 rows=jax.tree.map(jnp.asarray, sampling.stack([], batch)))


def _forward(dec_model, params, cache, tokens_BxT, positions_BxT, last_B):
    """Logits [B, V] at position last_B of each row, and the cache with this chunk written in."""
    h_BxTxD, mutated = dec_model.apply({"params": params, "cache": cache}, tokens_BxT, positions_BxT,
                                       method="encode", mutable=["cache"])
    h_Bx1xD = h_BxTxD[jnp.arange(h_BxTxD.shape[0]), last_B][:, None]
    return dec_model.apply({"params": params}, h_Bx1xD, method="logits")[:, 0], mutated["cache"]


def _pick(logits_BxV, rows, seed_B, index_B, counts_BxV, prompt_BxV, n_top: int, want_top=True):
    """(tokens, their log-probs, the n_top most likely (log-probs [B, K], ids [B, K]) or None); with
    `want_top` False (traced) the alternatives are zeros and cost nothing (a vocabulary top-k per step
    is ~0.5 ms at batch 32)."""
    keys = lambda: jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, index_B)  # noqa: E731
    token_B = sampling.choose(logits_BxV, rows, keys, counts_BxV, prompt_BxV)
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    logp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    top = None
    if n_top:
        b = logp_BxV.shape[0]
        top = jax.lax.cond(want_top, lambda: tuple(jax.lax.top_k(logp_BxV, n_top)),
                           lambda: (jnp.zeros((b, n_top), jnp.float32), jnp.zeros((b, n_top), jnp.int32)))
    return token_B, logp_B, top


def _finish(token_B, generated_B, position_B, max_new_B, stop_BxS, cache_len: int):
    """0 = keep going, 1 = stop id, 2 = length (max_new_tokens reached, or no slot to feed the token)."""
    stopped_B = jnp.any(stop_BxS == token_B[:, None], axis=-1)
    full_B = (generated_B >= max_new_B) | (position_B >= cache_len)
    return jnp.where(stopped_B, 1, jnp.where(full_B, 2, 0)).astype(jnp.int32)


def batch_axis(dec_model) -> int:
    return 1 if dec_model.cfg.scan_layers else 0


def _native_dots(fn):
    """Trace `fn` with bf16 dots kept as such (layers.native_dots: faster for decoding on every CPU measured)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with layers.native_dots():
            return fn(*args, **kwargs)
    return traced


@_native_dots
def prefill(dec_model, cache_len: int, n_top: int, params, state: State, tokens_NxT, lengths_N, slots_N, rows,
            seed_N, max_new_N, stop_NxS):
    """Prompts -> their cache rows and first tokens, written into slots_N of `state` (a slot index
    >= B is a padding row: computed, then dropped). Returns (state, token_N, logp_N, top, finish_N)."""
    new, token_N, logp_N, top, finish_N = prefill_rows(dec_model, cache_len, n_top, params, tokens_NxT, lengths_N,
                                                       rows, seed_N, max_new_N, stop_NxS)
    return insert(dec_model, state, new, slots_N), token_N, logp_N, top, finish_N


@_native_dots
def prefill_rows(dec_model, cache_len: int, n_top: int, params, tokens_UxT, lengths_U, rows, seed_N, max_new_N,
                 stop_NxS, src_N=None):
    """prefill's model half: the prompts' own N-row State (its cache as long as the prompts, T slots)
    and first tokens. Returns (new rows, token_N, logp_N, top, finish_N); `insert` puts the rows in slots.
    Row i is prompt src_N[i] of the U given (default: U = N, row i is prompt i): the model runs on each
    distinct prompt once, its cache row and last logits copied to every row sampling from it."""
    u, t = tokens_UxT.shape
    # The prompts attend within a cache of their own length (prompt x prompt, not prompt x context).
    positions_UxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (u, t))
    logits_UxV, cache_u = _forward(dec_model, params, init_cache(dec_model, u, t), tokens_UxT, positions_UxT,
                                   lengths_U - 1)
    if src_N is None:
        tokens_NxT, lengths_N, logits_NxV, cache_n = tokens_UxT, lengths_U, logits_UxV, cache_u
    else:
        tokens_NxT, lengths_N, logits_NxV = tokens_UxT[src_N], lengths_U[src_N], logits_UxV[src_N]
        cache_n = jax.tree.map(lambda c: jnp.take(c, src_N, axis=batch_axis(dec_model)), cache_u)
    n = tokens_NxT.shape[0]
    v = logits_NxV.shape[-1]
    real_NxT = jnp.arange(t)[None, :] < lengths_N[:, None]
    prompt_NxV = jnp.zeros((n, v), bool).at[jnp.arange(n)[:, None], tokens_NxT].max(real_NxT)
    counts_NxV = jnp.zeros((n, v), jnp.int32)
    token_N, logp_N, top = _pick(logits_NxV, rows, seed_N, jnp.zeros((n,), jnp.int32), counts_NxV, prompt_NxV, n_top)
    generated_N = jnp.ones((n,), jnp.int32)
    finish_N = _finish(token_N, generated_N, lengths_N, max_new_N, stop_NxS, cache_len)
    counts_NxV = counts_NxV.at[jnp.arange(n), token_N].add(1)
    new = State(cache=cache_n, token_B=token_N, position_B=lengths_N, generated_B=generated_N, max_new_B=max_new_N,
                done_B=finish_N > 0, finish_B=finish_N, seed_B=seed_N, stop_BxS=stop_NxS, counts_BxV=counts_NxV,
                prompt_BxV=prompt_NxV, rows=rows)
    return new, token_N, logp_N, top, finish_N


def insert(dec_model, state: State, new: State, slots_N) -> State:
    """`state` with the rows of `new` (prefill_rows' State, cache at most as long as state's) written into
    slots_N (an index >= B is dropped); their cache rows are zero-padded to the state's extent."""
    axis = batch_axis(dec_model)
    extent = cache_extent(dec_model, state)
    put = lambda big, part: big.at[slots_N].set(part, mode="drop")  # noqa: E731
    put_cache = lambda big, part: (big.at[slots_N] if axis == 0 else big.at[:, slots_N]).set(  # noqa: E731
        _pad_slots(part, extent, axis + 2), mode="drop")
    return jax.tree.map(put, state.replace(cache=None), new.replace(cache=None)).replace(
        cache=jax.tree.map(put_cache, state.cache, new.cache))


def cache_extent(dec_model, state: State) -> int:
    """How many cache slots (positions) the state holds per row: the Decoder keeps just the window its
    rows need (`resize`), so a chunk of steps reads the cache as it lies instead of a copy of it."""
    return jax.tree.leaves(state.cache)[0].shape[batch_axis(dec_model) + 2]


def resize(dec_model, extent: int, state: State) -> State:
    """`state` with its cache cut or zero-padded to `extent` slots (the slots cut must hold nothing a
    running row still attends to: positions past every running row's)."""
    axis = batch_axis(dec_model) + 2
    fit = lambda c: (jax.lax.slice_in_dim(c, 0, extent, axis=axis) if c.shape[axis] >= extent  # noqa: E731
                     else _pad_slots(c, extent, axis))
    return state.replace(cache=jax.tree.map(fit, state.cache))


def _pad_slots(c, extent: int, axis: int):
    """A cache leaf zero-padded along `axis` to `extent` slots (its length may be symbolic: the export)."""
    return jnp.pad(c, [(0, extent - c.shape[axis] if i == axis else 0) for i in range(c.ndim)])


@_native_dots
def decode_steps(dec_model, cache_len: int, n_top: int, chunk: int, window: int, params, state: State, n,
                 want_top=True):
    """Up to min(n, chunk) one-token steps for every running row, in one lax.while_loop that ends early
    when every row is done. Returns (state, tokens [B, chunk] (-1 where a row produced nothing),
    log-probs [B, chunk], top (log-probs, ids) [B, chunk, n_top] or None; zeros unless `want_top`).

    The loop attends over the cache's first `window` slots only: the caller picks a window past every
    row's last position, so short sequences in a long context do not pay for the empty slots. The
    Decoder keeps its state's cache exactly `window` long (`resize`); a longer one is sliced before
    and written back after the loop (a copy of the window: costly next to a chunk of a few steps)."""
    if cache_extent(dec_model, state) == window:
        state, bufs = _loop(dec_model, cache_len, n_top, chunk, window, params, state, n, want_top)
        return (state,) + _unpack(bufs, n_top)
    slot_axis = batch_axis(dec_model) + 2  # cache leaves [(layers,) B, V, S, K]
    full_cache = state.cache
    state = state.replace(cache=jax.tree.map(lambda c: jax.lax.slice_in_dim(c, 0, window, axis=slot_axis), full_cache))
    state, bufs = _loop(dec_model, cache_len, n_top, chunk, window, params, state, n, want_top)
    state = state.replace(cache=jax.tree.map(lambda f, w: jax.lax.dynamic_update_slice_in_dim(f, w, 0, slot_axis),
                                             full_cache, state.cache))
    return (state,) + _unpack(bufs, n_top)


@_native_dots
def decode_rows(dec_model, cache_len: int, n_top: int, chunk: int, window: int, params, state: State, n, want_top,
                rows_K):
    """decode_steps over the slots rows_K only (an index >= B pads: it runs as a done row and is
    dropped): a batch with few busy slots computes only those. Same returns, [B, ...] buffers."""
    b = state.token_B.shape[0]
    axis = batch_axis(dec_model)
    at = (slice(None),) * axis + (jnp.minimum(rows_K, b - 1), slice(None), slice(0, window))
    pad_K = rows_K >= b
    sub = jax.tree.map(lambda x: x[jnp.minimum(rows_K, b - 1)], state.replace(cache=None))
    sub = sub.replace(cache=jax.tree.map(lambda c: c[at], state.cache), done_B=sub.done_B | pad_K)
    sub, bufs = _loop(dec_model, cache_len, n_top, chunk, window, params, sub, n, want_top)
    back = (slice(None),) * axis + (rows_K, slice(None), slice(0, window))
    put = lambda full, part: full.at[rows_K].set(part, mode="drop")  # noqa: E731
    state = jax.tree.map(put, state.replace(cache=None), sub.replace(cache=None)).replace(
        cache=jax.tree.map(lambda full, part: full.at[back].set(part, mode="drop"), state.cache, sub.cache))
    fill = (-1, 0.0, 0.0, 0)
    bufs = tuple(put(jnp.full((b,) + x.shape[1:], f, x.dtype), x) for x, f in zip(bufs, fill))
    return (state,) + _unpack(bufs, n_top)


def _unpack(bufs, n_top):
    return bufs[0], bufs[1], (bufs[2], bufs[3]) if n_top else None


def _loop(dec_model, cache_len: int, n_top: int, chunk: int, window: int, params, state: State, n, want_top):
    """The while loop of decode_steps over a state whose cache holds the first `window` slots."""
    b = state.token_B.shape[0]
    rows_B = jnp.arange(b)
    bufs = (jnp.full((b, chunk), -1, jnp.int32), jnp.zeros((b, chunk), jnp.float32))
    if n_top:
        bufs += (jnp.zeros((b, chunk, n_top), jnp.float32), jnp.zeros((b, chunk, n_top), jnp.int32))

    def cond(carry):
        i, st, _ = carry
        return (i < jnp.minimum(n, chunk)) & ~jnp.all(st.done_B)

    def body(carry):
        i, st, bufs = carry
        running_B = ~st.done_B
        position_B = jnp.minimum(st.position_B, window - 1)
        logits_BxV, cache = _forward(dec_model, params, st.cache, st.token_B[:, None], position_B[:, None],
                                     jnp.zeros((b,), jnp.int32))
        token_B, logp_B, top = _pick(logits_BxV, st.rows, st.seed_B, st.generated_B, st.counts_BxV, st.prompt_BxV,
                                     n_top, want_top)
        generated_B = st.generated_B + running_B
        next_position_B = st.position_B + running_B
        finish_B = _finish(token_B, generated_B, next_position_B, st.max_new_B, st.stop_BxS, cache_len)
        st = st.replace(
            cache=cache, token_B=jnp.where(running_B, token_B, st.token_B), position_B=next_position_B,
            generated_B=generated_B, done_B=st.done_B | (running_B & (finish_B > 0)),
            finish_B=jnp.where(running_B, finish_B, st.finish_B),
            counts_BxV=st.counts_BxV.at[rows_B, token_B].add(running_B.astype(jnp.int32)))
        new = (jnp.where(running_B, token_B, -1), logp_B) + (tuple(top) if n_top else ())
        bufs = tuple(buf.at[:, i].set(x) for buf, x in zip(bufs, new))
        return i + 1, st, bufs

    _, state, bufs = jax.lax.while_loop(cond, body, (jnp.int32(0), state, bufs))
    return state, bufs


def bucket(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, at least lo, at most hi (fewer shapes to compile)."""
    return min(max(lo, 1 << max(0, n - 1).bit_length()), hi)


def attention_window(reach: int, cache_len: int) -> int:
    """The attention window for a chunk reaching slot `reach`: rounded up to a quarter of its power of
    two (at least 64): at most 4 compiled windows per octave, at most 1/4 of it unused."""
    p = 1 << max(0, reach - 1).bit_length()
    step = max(64, p // 4)
    return min(-(-reach // step) * step, cache_len)


@functools.lru_cache(maxsize=None)
def loop_compiler_options(dtype) -> tuple:
    """XLA options for the decode loop. On CPU its dense products are skinny ([batch, D] @ [D, N]):
    XLA:CPU's Eigen dots ran them faster than its YNNPACK fusions (f32, AMD Zen 2: 1.19x decode
    tokens/s at batch 16, 1.00x at batch 1; bf16 emulated there: 1.09x). Not where bf16 matmuls have
    hardware (AVX512-BF16, AMX): there YNNPACK's bf16 dots win (Zen 5, default model: Eigen dots gave
    0.89x decode tokens/s at batch 16 and 0.81x at batch 32); nor on other backends."""
    if jax.default_backend() != "cpu" or (jnp.dtype(dtype) != jnp.float32 and layers.native_lowp_dots()):
        return ()
    return (("xla_cpu_experimental_ynn_fusion_type", ""),)


class Programs:
    """A decoder's jitted functions: they depend only on the model config, batch, cache length and n_top
    (params and state are arguments), and on the mesh and logical rules the calls run under."""

    def __init__(self, cfg, batch: int, cache_len: int, n_top: int):
        self.dec_model = dec_model = Transformer(cfg, decode=True)
        self.prefill_rows = jax.jit(functools.partial(prefill_rows, dec_model, cache_len, n_top))
        self.insert = jax.jit(functools.partial(insert, dec_model), donate_argnums=(0,))
        # no donation: a resized cache cannot reuse the old one's buffers
        self.resize = jax.jit(functools.partial(resize, dec_model), static_argnums=(0,))
        # a fresh state holds the smallest window; prefill and steps resize it to what its rows need
        self.empty = jax.jit(functools.partial(empty_state, dec_model, batch, attention_window(2, cache_len)))
        self.steps = {}  # (chunk, window, rows) -> the compiled decode loop
        self.loop_options = loop_compiler_options(cfg.compute_dtype)


@functools.lru_cache(maxsize=32)
def shared_programs(cfg, batch: int, cache_len: int, n_top: int, mesh, rules: tuple) -> Programs:
    """One Programs per distinct (config, batch, cache_len, n_top, mesh, rules) in a process, so a second
    decoder of the same settings (an RL run's rollouts after a resume, each model an evaluation scores,
    every compression variant of one model) reuses the traced and compiled programs instead of tracing
    and compiling them again. The key is every input the programs close over or run under: the config
    (a frozen dataclass, compared by value), the sizes, and the mesh and logical-axis rules that
    `Decoder._context` enters (JAX's trace cache does not see Flax's rules, so they must be in the key)."""
    del mesh, rules  # in the key only: the calls enter them (Decoder._context)
    return Programs(cfg, batch, cache_len, n_top)

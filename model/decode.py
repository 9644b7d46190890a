"""THE decoder: a KV cache, prefill, one compiled decode loop, sampling and per-token log-probs.

    dec = Decoder(model, batch=4, cache_len=256)       # a Transformer, or a LoraModel (adapters unmerged)
    outs = dec.generate(params, [ids_a, ids_b], max_new_tokens=64, sampling=Sampling(temperature=0.8),
                        seeds=[0, 1], stop_ids=[end_id], stop_strings=["\\n\\n"], detokenize=tok.decode)
    outs[0].tokens, outs[0].logprobs, outs[0].finish_reason, outs[0].text

Every caller that generates goes through this file: scripts/generate.py, the SFT exact-match eval,
the server's decode slots (scripts/serve.py via serving.py), the export, RL rollouts.

The pieces, each a pure function the Decoder compiles once:
- `prepare`: the params decoding runs on: a LoRA run's adapters applied exactly as its training
  forward applies them, and dense kernels cast to the matmul dtype once (not at every token).
- `prefill`: new prompts (right-padded [N, T], any lengths) run through the model in decode mode
  (`Transformer(decode=True)`: the same params plus a 'cache' collection, slot = position, so the
  padding after a prompt is never attended and is overwritten as the row grows) (`prefill_rows`);
  their cache rows are written into decode slots of the batch state (`insert`), and each row's first
  token is chosen from the logits at its last real token.
- `resize`: the batch state holds only the cache slots its rows can reach (a window, a few sizes per
  context), cut or grown as they advance, so every decode step reads the cache where it lies.
- `decode_steps`: a `lax.while_loop` of one-token steps over every slot, ending when every row is
  done or after `n` steps; it returns each step's tokens, their log-probs (float32 log-softmax of the
  raw logits: what a training forward pass gives) and, with `n_top`, the most likely alternatives.
A row finishes with 'stop' (a stop id, or a stop string found by the host) or 'length'
(max_new_tokens, or no cache slot left). Random draws use key(seed) folded with the token's index
in its completion, so a request's text depends on its seed only, never on its batch or slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from model import layers
from model import lora as lora_lib
from model import sampling
from model.sampling import Sampling
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


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # 'stop' | 'length'
    prompt_tokens: int
    text: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


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


def _batch_axis(dec_model) -> int:
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
        cache_n = jax.tree.map(lambda c: jnp.take(c, src_N, axis=_batch_axis(dec_model)), cache_u)
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
    axis = _batch_axis(dec_model)
    extent = cache_extent(dec_model, state)
    put = lambda big, part: big.at[slots_N].set(part, mode="drop")  # noqa: E731
    put_cache = lambda big, part: (big.at[slots_N] if axis == 0 else big.at[:, slots_N]).set(  # noqa: E731
        _pad_slots(part, extent, axis + 2), mode="drop")
    return jax.tree.map(put, state.replace(cache=None), new.replace(cache=None)).replace(
        cache=jax.tree.map(put_cache, state.cache, new.cache))


def cache_extent(dec_model, state: State) -> int:
    """How many cache slots (positions) the state holds per row: the Decoder keeps just the window its
    rows need (`resize`), so a chunk of steps reads the cache as it lies instead of a copy of it."""
    return jax.tree.leaves(state.cache)[0].shape[_batch_axis(dec_model) + 2]


def resize(dec_model, extent: int, state: State) -> State:
    """`state` with its cache cut or zero-padded to `extent` slots (the slots cut must hold nothing a
    running row still attends to: positions past every running row's)."""
    axis = _batch_axis(dec_model) + 2
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
    slot_axis = _batch_axis(dec_model) + 2  # cache leaves [(layers,) B, V, S, K]
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
    axis = _batch_axis(dec_model)
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


def _bucket(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, at least lo, at most hi (fewer shapes to compile)."""
    return min(max(lo, 1 << max(0, n - 1).bit_length()), hi)


def _window(reach: int, cache_len: int) -> int:
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


def to_host(tree):
    """jax.device_get, also for arrays spread over several processes' devices (multi-host: the batch sharded
    across hosts): those are gathered, so every process gets the whole global value."""
    spread = lambda x: isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)  # noqa: E731
    if not any(spread(x) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True) if spread(x) else jax.device_get(x),
                        tree)


class _Programs:
    """A decoder's jitted functions: they depend only on the model config, batch, cache length and n_top
    (params and state are arguments), and on the mesh and logical rules the calls run under."""

    def __init__(self, cfg, batch: int, cache_len: int, n_top: int):
        self.dec_model = dec_model = Transformer(cfg, decode=True)
        self.prefill_rows = jax.jit(functools.partial(prefill_rows, dec_model, cache_len, n_top))
        self.insert = jax.jit(functools.partial(insert, dec_model), donate_argnums=(0,))
        # no donation: a resized cache cannot reuse the old one's buffers
        self.resize = jax.jit(functools.partial(resize, dec_model), static_argnums=(0,))
        # a fresh state holds the smallest window; prefill and steps resize it to what its rows need
        self.empty = jax.jit(functools.partial(empty_state, dec_model, batch, _window(2, cache_len)))
        self.steps = {}  # (chunk, window, rows) -> the compiled decode loop
        self.loop_options = loop_compiler_options(cfg.compute_dtype)


@functools.lru_cache(maxsize=32)
def _shared_programs(cfg, batch: int, cache_len: int, n_top: int, mesh, rules: tuple) -> _Programs:
    """One _Programs per distinct (config, batch, cache_len, n_top, mesh, rules) in a process, so a second
    decoder of the same settings (an RL run's rollouts after a resume, each model an evaluation scores,
    every compression variant of one model) reuses the traced and compiled programs instead of tracing
    and compiling them again. The key is every input the programs close over or run under: the config
    (a frozen dataclass, compared by value), the sizes, and the mesh and logical-axis rules that
    `Decoder._context` enters (JAX's trace cache does not see Flax's rules, so they must be in the key)."""
    del mesh, rules  # in the key only: the calls enter them (Decoder._context)
    return _Programs(cfg, batch, cache_len, n_top)


class Decoder:
    """Compiled prefill / decode functions for one model, batch size (decode slots) and cache length.

    `kv_int8`: keys and values cached as int8 with a float32 scale per token and head (absmax): a quarter
    of a float32 cache's memory, about half of bf16's; read back dequantized (README, Compression).
    `mesh` (+ logical `rules`): calls run under it, the batch over the data axes and heads over
    `tensor` as the model's logical names say; params should already be placed on it.
    """

    def __init__(self, model, *, batch: int, cache_len: int, n_top: int = 0, chunk: int = 16, mesh=None, rules=(),
                 kv_int8: bool = False):
        inner, _ = unwrap(model)
        cfg = dataclasses.replace(inner.cfg, kv_cache_int8=bool(kv_int8))
        if cfg.pos == "learned" and cache_len > cfg.max_len:
            raise ValueError(f"cache_len={cache_len} exceeds model.max_len={cfg.max_len} (learned positions)")
        if not cfg.causal:
            raise ValueError("the decoder needs a causal model (model.causal=True)")
        if batch <= 0 or cache_len <= 1:
            raise ValueError(f"Decoder batch={batch} and cache_len={cache_len} must be >= 1 and >= 2")
        self.model, self.batch, self.cache_len, self.n_top, self.chunk = model, batch, cache_len, n_top, chunk
        self.vocab_size = cfg.vocab_size
        self.mesh, self.rules = mesh, tuple(rules)
        self._prepare = jax.jit(functools.partial(prepare, model))
        self._prepared = None  # ([weakrefs to the params' leaves], prepared params) of the last prepare
        try:  # the compiled programs of an equal decoder made earlier in this process, if any
            programs = _shared_programs(cfg, batch, cache_len, n_top, mesh, self.rules)
        except TypeError:  # unhashable rules (lists): programs of its own
            programs = _Programs(cfg, batch, cache_len, n_top)
        self.dec_model = programs.dec_model
        self._prefill_rows, self._insert, self._resize, self._empty, self._steps, self._loop_options = (
            programs.prefill_rows, programs.insert, programs.resize, programs.empty, programs.steps,
            programs.loop_options)

    def _context(self):
        """The mesh and logical rules (sharding.activate's two lines: model/ cannot import sharding.py)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def prepare(self, params):
        """`prepare(model, params)`, compiled; the last result is reused while `params` holds the very same
        arrays (weakly referenced: jax arrays never change in place, so the same arrays give the same
        result), so repeated generate calls on one checkpoint cast its weights once."""
        leaves = jax.tree.leaves(params)
        last = self._prepared
        if last is not None and len(last[0]) == len(leaves) and all(r() is x for r, x in zip(last[0], leaves)):
            return last[1]
        with self._context():
            out = self._prepare(params)
        # numpy leaves can change in place: reuse only for jax arrays
        reusable = all(isinstance(x, jax.Array) for x in leaves)
        self._prepared = ([weakref.ref(x) for x in leaves], out) if reusable else None
        return out

    def empty(self, like=None) -> State:
        """A batch of free slots. Without a mesh, committed to the one device `like` (the prepared params)
        lives on, so every later prefill and step call sees the same placement and compiles once;
        params spread over several devices leave it to follow them."""
        with self._context():
            state = self._empty()
            devices = {d for x in jax.tree.leaves(like) for d in x.devices()} if like is not None else set()
            if self.mesh is None and len(devices) == 1:
                state = jax.device_put(state, devices.pop())
            return state

    def extents(self) -> list[int]:
        """Every cache extent (window) a state of this decoder may hold."""
        return sorted({_window(r, self.cache_len) for r in range(2, self.cache_len + 1)})

    def resize(self, state: State, extent: int) -> State:
        """`state` holding `extent` cache slots per row (module `resize`; a new state unless it holds them already)."""
        if cache_extent(self.dec_model, state) == extent:
            return state
        with self._context():
            return self._resize(extent, state)

    def set_done(self, state: State, done_B) -> State:
        """`state` with these slots marked done (freed, or ended by a stop string found on the host)."""
        done_B = np.asarray(done_B, bool)
        if getattr(state.done_B, "committed", True):
            done_B = jax.device_put(done_B, state.done_B.sharding)
        return state.replace(done_B=done_B)

    def check_request(self, prompt, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> None:
        """The ValueError prefill would raise for this request, before anything runs."""
        self.check_prompt(prompt, max_new_tokens)
        n = len(set(int(x) for x in stop_ids))
        if n > MAX_STOP_IDS:
            raise ValueError(f"{n} stop token ids; at most {MAX_STOP_IDS}")

    def check_prompt(self, prompt, max_new_tokens: int) -> None:
        n = len(prompt)
        if n == 0:
            raise ValueError("an empty prompt: give at least one token (e.g. <eos> to start from nothing)")
        if n >= self.cache_len:
            raise ValueError(f"prompt of {n} tokens leaves no room in a context of {self.cache_len} tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")

    def prefill(self, dparams, state: State, prompts: Sequence, slots: Sequence[int], settings: Sequence[Sampling],
                seeds: Sequence[int], max_new: Sequence[int], stop_ids: Sequence[Sequence[int]],
                share_prompts: bool = False):
        """Start len(prompts) requests in `slots`; returns (state, first tokens, their log-probs, top, finish),
        host numpy arrays for the given prompts. `share_prompts`: equal prompts run through the model once
        (`prefill_rows`' src_N; RL's G samples of a prompt), their rows then sampled apart as ever."""
        k = len(prompts)
        for p, m in zip(prompts, max_new):
            self.check_prompt(p, m)
        n = _bucket(k, 1, self.batch)
        t = _bucket(max(len(p) for p in prompts), 8, self.cache_len)
        distinct, src = {}, None
        if share_prompts:
            src = np.zeros((n,), np.int32)  # padding rows copy prompt 0 (their slots are dropped)
            for i, p in enumerate(prompts):
                src[i] = distinct.setdefault(tuple(int(x) for x in p), len(distinct))
            if len(distinct) == k:  # nothing shared
                src = None
        u = _bucket(len(distinct), 1, self.batch) if src is not None else n
        tokens = np.zeros((u, t), np.int32)
        lengths = np.ones((u,), np.int32)
        for i, p in enumerate(list(distinct) if src is not None else prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        stops = np.full((n, MAX_STOP_IDS), -1, np.int32)
        for i, ids in enumerate(stop_ids):
            ids = list(dict.fromkeys(int(x) for x in ids))
            if len(ids) > MAX_STOP_IDS:
                raise ValueError(f"{len(ids)} stop token ids; at most {MAX_STOP_IDS}")
            stops[i, :len(ids)] = ids
        pad = lambda xs, fill, dtype: np.array(list(xs) + [fill] * (n - k), dtype)  # noqa: E731
        if cache_extent(self.dec_model, state) < t:
            state = self.resize(state, _window(t, self.cache_len))
        with self._context():
            new, token, logp, top, finish = self._prefill_rows(
                dparams, tokens, lengths, jax.tree.map(jnp.asarray, sampling.stack(list(settings), n)),
                pad(seeds, 0, np.uint32), pad(max_new, 1, np.int32), stops, src)
            state = self._insert(state, new, pad(slots, self.batch, np.int32))
        out = to_host((token, logp, top, finish))
        return (state,) + tuple(None if x is None else jax.tree.map(lambda a: a[:k], x) for x in out)

    def loop_variants(self, chunk: int | None = None) -> list[tuple[int, int, int]]:
        """Every (chunk, window, rows) decode loop `steps` may compile for this chunk."""
        chunk = chunk or self.chunk
        windows = self.extents()
        rows = [self.batch] if self.mesh is not None else sorted({_bucket(k, 1, self.batch)
                                                                   for k in range(1, self.batch + 1)})
        return [(chunk, w, k) for w in windows for k in rows]

    def warm_up(self, dparams, state: State, chunk: int | None = None, prompt_lengths: Sequence[int] = (),
                group_sizes: Sequence[int] = (1,)) -> State:
        """Compile, before any request, every decode loop `steps` may need for `chunk` (and prefills of
        `group_sizes` prompts at these lengths' buckets, and the cache resizes between windows), so no
        request waits on a compile. `state` must have no running rows (a fresh one). Each runs once on
        no rows (prefills write to slots past the batch, loops run zero steps). A server with S slots and
        context C compiles about 4 log2(C/64) x (log2(S) + 1) loops."""
        running = int(np.sum(~np.asarray(to_host(state.done_B))))
        if running:
            raise ValueError(f"warm_up needs a state without running rows (Decoder.empty()); this one has {running}")
        chunk = chunk or self.chunk
        extents = self.extents()
        for a in extents:  # every resize steps or prefill may do: from any extent to any other
            for b in extents:
                state = self.resize(self.resize(state, a), b)
        for n in sorted(set(group_sizes)):
            for t in sorted({_bucket(m, 8, self.cache_len) for m in prompt_lengths}):
                prompt = np.zeros(min(t, self.cache_len - 1), np.int32)
                for e in (e for e in extents if e >= t):  # the rows go into a state of each extent they fit
                    state, *_ = self.prefill(dparams, self.resize(state, e), [prompt] * n, [self.batch] * n,
                                             [sampling.GREEDY] * n, [0] * n, [1] * n, [()] * n)
        for key in self.loop_variants(chunk):
            if key not in self._steps:
                self._steps[key] = self._compile_loop(*key)
            args = () if key[2] == self.batch else (np.full(key[2], self.batch, np.int32),)
            with self._context():
                state = self._steps[key](dparams, self.resize(state, key[1]), jnp.int32(0), jnp.bool_(True),
                                         *args)[0]
        return state

    def _compile_loop(self, chunk: int, window: int, k: int):
        fn = decode_steps if k == self.batch else decode_rows
        return jax.jit(functools.partial(fn, self.dec_model, self.cache_len, self.n_top, chunk, window),
                       donate_argnums=(1,), compiler_options=dict(self._loop_options) or None)

    def steps(self, dparams, state: State, n: int, chunk: int | None = None, want_top: bool = True):
        """Up to n decode steps (at most `chunk`); returns (state, tokens [B, chunk], logprobs, top), on host.
        Attends over a window of the cache past every running row's reach (`_window`), the state's cache
        cut or grown to it first (`resize`: the window changes a few times in a row's life, where
        slicing it out of a full-length cache copied it at every chunk: 1.7x the time of a 4-step
        chunk at batch 32), and, without a mesh, runs only the busy slots when they are at most half
        the batch (`decode_rows`, a power of two of them): one compiled loop per (chunk, window, rows)."""
        chunk = chunk or self.chunk
        done, position = to_host((state.done_B, state.position_B))
        reach = int(np.max(np.where(done, 0, position))) + min(n, chunk) + 1
        window = _window(reach, self.cache_len)
        busy = np.nonzero(~done)[0]
        k = _bucket(len(busy), 1, self.batch)
        if self.mesh is not None or k == self.batch:
            k, args = self.batch, ()
        else:  # few busy slots: compute only those (a power of two of them; pads index past the batch)
            # over every slot the state holds: shrinking it would copy the whole batch's cache for a few rows
            window = max(window, cache_extent(self.dec_model, state))
            args = (np.concatenate([busy, np.full(k - len(busy), self.batch)]).astype(np.int32),)
        state = self.resize(state, window)  # the loop then reads the cache in place (decode_steps)
        key = (chunk, window, k)
        if key not in self._steps:
            self._steps[key] = self._compile_loop(chunk, window, k)
        with self._context():
            state, tokens, logp, top = self._steps[key](dparams, state, jnp.int32(n), jnp.bool_(want_top), *args)
        return (state,) + tuple(to_host((tokens, logp, top)))

    def generate(self, params, prompts: Sequence, *, max_new_tokens: int, sampling: Sampling | Sequence[Sampling] = None,
                 seeds: Sequence[int] | int = 0, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 detokenize: Callable[[list[int]], str] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Completion]:
        """Complete every prompt (a list of token-id sequences), `batch` at a time. `on_tokens(i, ids)` is
        called with each prompt's new tokens as they come (streaming). Stop strings need `detokenize`:
        the text is cut just before the first one, the tokens end with the one that completed it."""
        if stop_strings and detokenize is None:
            raise ValueError("stop_strings need detokenize (ids -> text)")
        settings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or Sampling()] * len(prompts)
        seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [int(seeds) + i for i in range(len(prompts))]
        if len(settings) != len(prompts) or len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} sampling settings and {len(seeds)} seeds")
        bad = [x for x in seeds if not 0 <= int(x) < 2**32]
        if bad:  # a row's seed is a uint32 (random draws: key(seed) folded with the token's index)
            raise ValueError(f"seed={bad[0]} must be in [0, 2**32)")
        dparams = self.prepare(params)
        out = []
        for lo in range(0, len(prompts), self.batch):
            out += self._generate_group(dparams, prompts[lo:lo + self.batch], settings[lo:lo + self.batch],
                                        seeds[lo:lo + self.batch], max_new_tokens, stop_ids, stop_strings,
                                        detokenize, on_tokens, lo)
        return out

    def _generate_group(self, dparams, prompts, settings, seeds, max_new_tokens, stop_ids, stop_strings,
                        detokenize, on_tokens, offset):
        k = len(prompts)
        state, token, logp, top, finish = self.prefill(
            dparams, self.empty(dparams), prompts, list(range(k)), settings, seeds, [max_new_tokens] * k,
            [stop_ids] * k, share_prompts=True)
        rows = [Row(len(p)) for p in prompts]
        for i, r in enumerate(rows):
            r.add(int(token[i]), float(logp[i]), tops_at(top, i, None))
            r.finish = int(finish[i])
        streaming = on_tokens is not None or bool(stop_strings)
        # Without streaming, big batches still go in chunks of 32 steps: each chunk's attention window
        # then ends near the rows' reach (1.08x at batch 16 over one loop for 192 tokens, Zen 2), where
        # at batch 1 a chunk's host round trip costs more than the window saves (0.89x).
        whole = _bucket(max_new_tokens - 1, 8, 1 << 16)
        chunk = self.chunk if streaming else (min(whole, 32) if self.batch >= 8 else whole)
        done = np.array([r.finish > 0 for r in rows] + [True] * (self.batch - k))
        self._after_chunk(rows, [1] * k, stop_strings, detokenize, on_tokens, offset)
        while not all(r.finish for r in rows):
            stopped = [i for i, r in enumerate(rows) if r.finish and not done[i]]
            if stopped:  # a stop string ended these rows on the host
                done[stopped] = True
                state = self.set_done(state, done)
            state, tokens, logps, tops = self.steps(dparams, state, max_new_tokens, chunk)
            fin = np.asarray(to_host(state.finish_B))
            new = []
            for i, r in enumerate(rows):
                before = len(r.tokens)
                if not r.finish:
                    for j in np.nonzero(tokens[i] >= 0)[0]:
                        r.add(int(tokens[i, j]), float(logps[i, j]), tops_at(tops, i, j))
                    r.finish = int(fin[i])
                new.append(len(r.tokens) - before)
            done[:k] = done[:k] | (fin[:k] > 0)
            self._after_chunk(rows, new, stop_strings, detokenize, on_tokens, offset)
        return [r.completion(detokenize, self.n_top > 0) for r in rows]

    @staticmethod
    def _after_chunk(rows, new, stop_strings, detokenize, on_tokens, offset):
        for i, (r, m) in enumerate(zip(rows, new)):
            if m and stop_strings and not r.cut:
                r.apply_stop_strings(stop_strings, detokenize, len(r.tokens) - m)
            if on_tokens is not None and len(r.tokens) > r.sent:
                on_tokens(offset + i, r.tokens[r.sent:])
                r.sent = len(r.tokens)


def tops_at(top, i, j):
    """Row i's (step j's) top alternatives as [(id, log-prob)], or None without n_top."""
    if top is None:
        return None
    lp, ids = top
    lp, ids = (lp[i], ids[i]) if j is None else (lp[i, j], ids[i, j])
    return [(int(a), float(b)) for a, b in zip(ids, lp)]


class Row:
    """One completion being assembled on the host (the server's slots use it too)."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.tokens, self.logprobs, self.top = prompt_tokens, [], [], []
        self.finish, self.sent, self.cut = 0, 0, None

    def add(self, token, logp, top):
        self.tokens.append(token)
        self.logprobs.append(logp)
        self.top.append(top)

    def apply_stop_strings(self, stop_strings, detokenize, first_new: int):
        """Find the first stop string completed by a token at index >= first_new; cut there."""
        for m in range(max(first_new, 0) + 1, len(self.tokens) + 1):
            text = detokenize(self.tokens[:m])
            hits = [text.find(s) for s in stop_strings if s and s in text]
            if hits:
                self.cut = min(hits)
                del self.tokens[m:], self.logprobs[m:], self.top[m:]
                self.finish = 1
                return

    def completion(self, detokenize, with_top: bool) -> Completion:
        text = None
        if detokenize is not None:
            text = detokenize(self.tokens)
            if self.cut is not None:
                text = text[:self.cut]
        return Completion(tokens=self.tokens, logprobs=self.logprobs, finish_reason=FINISH[self.finish],
                          prompt_tokens=self.prompt_tokens, text=text, top_logprobs=self.top if with_top else None)

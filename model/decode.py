"""THE decoder: a KV cache, prefill, one compiled decode loop, sampling and per-token log-probs.

    dec = Decoder(model, batch=4, cache_len=256)       # a Transformer, or a LoraModel (adapters unmerged)
    outs = dec.generate(params, [ids_a, ids_b], max_new_tokens=64, sampling=Sampling(temperature=0.8),
                        seeds=[0, 1], stop_ids=[end_id], stop_strings=["\\n\\n"], detokenize=tok.decode)
    outs[0].tokens, outs[0].logprobs, outs[0].finish_reason, outs[0].text

Every caller that generates goes through this file: scripts/generate.py, the SFT exact-match eval,
the server's decode slots (scripts/serve.py via serving.py), the export, RL rollouts.

This file is the host side: decode slots, prompt and chunk bucketing, stop strings, streaming and
`Completion`s. The compiled pieces (the decode `State`, `prepare`, `prefill`, `resize`, the
`decode_steps` loop) are pure functions in model/kv_decode.py, jitted here once per model config,
batch, cache length and n_top and shared by every Decoder of equal settings in a process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from model import kv_decode as kv
from model import sampling
from model.sampling import Sampling

FINISH, MAX_STOP_IDS = kv.FINISH, kv.MAX_STOP_IDS  # finish codes and stop-id width, for the host side's callers


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # 'stop' | 'length'
    prompt_tokens: int
    text: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def to_host(tree):
    """jax.device_get, also for arrays spread over several processes' devices (multi-host: the batch sharded
    across hosts): those are gathered, so every process gets the whole global value."""
    spread = lambda x: isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)  # noqa: E731
    if not any(spread(x) for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True) if spread(x) else jax.device_get(x),
                        tree)


class Decoder:
    """Compiled prefill / decode functions for one model, batch size (decode slots) and cache length.

    `kv_int8`: keys and values cached as int8 with a float32 scale per token and head (absmax): a quarter
    of a float32 cache's memory, about half of bf16's; read back dequantized (README, Compression).
    `mesh` (+ logical `rules`): calls run under it, the batch over the data axes and heads over
    `tensor` as the model's logical names say; params should already be placed on it.
    """

    def __init__(self, model, *, batch: int, cache_len: int, n_top: int = 0, chunk: int = 16, mesh=None, rules=(),
                 kv_int8: bool = False):
        inner, _ = kv.unwrap(model)
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
        self._prepare = jax.jit(functools.partial(kv.prepare, model))
        self._prepared = None  # ([weakrefs to the params' leaves], prepared params) of the last prepare
        try:  # the compiled programs of an equal decoder made earlier in this process, if any
            programs = kv.shared_programs(cfg, batch, cache_len, n_top, mesh, self.rules)
        except TypeError:  # unhashable rules (lists): programs of its own
            programs = kv.Programs(cfg, batch, cache_len, n_top)
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

    def empty(self, like=None) -> kv.State:
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
        return sorted({kv.attention_window(r, self.cache_len) for r in range(2, self.cache_len + 1)})

    def resize(self, state: kv.State, extent: int) -> kv.State:
        """`state` holding `extent` cache slots per row (module `resize`; a new state unless it holds them already)."""
        if kv.cache_extent(self.dec_model, state) == extent:
            return state
        with self._context():
            return self._resize(extent, state)

    def set_done(self, state: kv.State, done_B) -> kv.State:
        """`state` with these slots marked done (freed, or ended by a stop string found on the host)."""
        done_B = np.asarray(done_B, bool)
        if getattr(state.done_B, "committed", True):
            done_B = jax.device_put(done_B, state.done_B.sharding)
        return state.replace(done_B=done_B)

    def check_request(self, prompt, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> None:
        """The ValueError prefill would raise for this request, before anything runs."""
        self.check_prompt(prompt, max_new_tokens)
        n = len(set(int(x) for x in stop_ids))
        if n > kv.MAX_STOP_IDS:
            raise ValueError(f"{n} stop token ids; at most {kv.MAX_STOP_IDS}")

    def check_prompt(self, prompt, max_new_tokens: int) -> None:
        n = len(prompt)
        if n == 0:
            raise ValueError("an empty prompt: give at least one token (e.g. <eos> to start from nothing)")
        if n >= self.cache_len:
            raise ValueError(f"prompt of {n} tokens leaves no room in a context of {self.cache_len} tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")

    def prefill(self, dparams, state: kv.State, prompts: Sequence, slots: Sequence[int], settings: Sequence[Sampling],
                seeds: Sequence[int], max_new: Sequence[int], stop_ids: Sequence[Sequence[int]],
                share_prompts: bool = False):
        """Start len(prompts) requests in `slots`; returns (state, first tokens, their log-probs, top, finish),
        host numpy arrays for the given prompts. `share_prompts`: equal prompts run through the model once
        (`prefill_rows`' src_N; RL's G samples of a prompt), their rows then sampled apart as ever."""
        k = len(prompts)
        for p, m in zip(prompts, max_new):
            self.check_prompt(p, m)
        n = kv.bucket(k, 1, self.batch)
        t = kv.bucket(max(len(p) for p in prompts), 8, self.cache_len)
        distinct, src = {}, None
        if share_prompts:
            src = np.zeros((n,), np.int32)  # padding rows copy prompt 0 (their slots are dropped)
            for i, p in enumerate(prompts):
                src[i] = distinct.setdefault(tuple(int(x) for x in p), len(distinct))
            if len(distinct) == k:  # nothing shared
                src = None
        u = kv.bucket(len(distinct), 1, self.batch) if src is not None else n
        tokens = np.zeros((u, t), np.int32)
        lengths = np.ones((u,), np.int32)
        for i, p in enumerate(list(distinct) if src is not None else prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        stops = np.full((n, kv.MAX_STOP_IDS), -1, np.int32)
        for i, ids in enumerate(stop_ids):
            ids = list(dict.fromkeys(int(x) for x in ids))
            if len(ids) > kv.MAX_STOP_IDS:
                raise ValueError(f"{len(ids)} stop token ids; at most {kv.MAX_STOP_IDS}")
            stops[i, :len(ids)] = ids
        pad = lambda xs, fill, dtype: np.array(list(xs) + [fill] * (n - k), dtype)  # noqa: E731
        if kv.cache_extent(self.dec_model, state) < t:
            state = self.resize(state, kv.attention_window(t, self.cache_len))
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
        rows = [self.batch] if self.mesh is not None else sorted({kv.bucket(k, 1, self.batch)
                                                                   for k in range(1, self.batch + 1)})
        return [(chunk, w, k) for w in windows for k in rows]

    def warm_up(self, dparams, state: kv.State, chunk: int | None = None, prompt_lengths: Sequence[int] = (),
                group_sizes: Sequence[int] = (1,)) -> kv.State:
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
            for t in sorted({kv.bucket(m, 8, self.cache_len) for m in prompt_lengths}):
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
        fn = kv.decode_steps if k == self.batch else kv.decode_rows
        return jax.jit(functools.partial(fn, self.dec_model, self.cache_len, self.n_top, chunk, window),
                       donate_argnums=(1,), compiler_options=dict(self._loop_options) or None)

    def steps(self, dparams, state: kv.State, n: int, chunk: int | None = None, want_top: bool = True):
        """Up to n decode steps (at most `chunk`); returns (state, tokens [B, chunk], logprobs, top), on host.
        Attends over a window of the cache past every running row's reach (`attention_window`), the state's cache
        cut or grown to it first (`resize`: the window changes a few times in a row's life, where
        slicing it out of a full-length cache copied it at every chunk: 1.7x the time of a 4-step
        chunk at batch 32), and, without a mesh, runs only the busy slots when they are at most half
        the batch (`decode_rows`, a power of two of them): one compiled loop per (chunk, window, rows)."""
        chunk = chunk or self.chunk
        done, position = to_host((state.done_B, state.position_B))
        reach = int(np.max(np.where(done, 0, position))) + min(n, chunk) + 1
        window = kv.attention_window(reach, self.cache_len)
        busy = np.nonzero(~done)[0]
        k = kv.bucket(len(busy), 1, self.batch)
        if self.mesh is not None or k == self.batch:
            k, args = self.batch, ()
        else:  # few busy slots: compute only those (a power of two of them; pads index past the batch)
            # over every slot the state holds: shrinking it would copy the whole batch's cache for a few rows
            window = max(window, kv.cache_extent(self.dec_model, state))
            args = (np.concatenate([busy, np.full(k - len(busy), self.batch)]).astype(np.int32),)
        state = self.resize(state, window)  # the loop then reads the cache in place (kv.decode_steps)
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
        whole = kv.bucket(max_new_tokens - 1, 8, 1 << 16)
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
        return Completion(tokens=self.tokens, logprobs=self.logprobs, finish_reason=kv.FINISH[self.finish],
                          prompt_tokens=self.prompt_tokens, text=text, top_logprobs=self.top if with_top else None)

"""Continuous batching over the decoder's slots: the engine behind scripts/serve.py.

    run = load_run("runs/sft")                                   # model, params, tokenizer, chat template?
    engine = Engine(Decoder(run.model, batch=8, cache_len=256, n_top=20, chunk=4), run.params,
                    detokenize=run.tokenizer.decode, max_queue=64).start()
    engine.submit([Request(prompt=ids, max_new=64, sampling=Sampling(), seed=0, stop_ids=(eos,))], deliver)
    # deliver(Update) is called from the engine thread: new tokens, their text, then a finish reason
    engine.stop()

One background thread owns the Decoder and its State, and loops:
1. drops requests whose client went away (`cancel`) from the queue and from their slots;
2. admits waiting requests into free slots, one prefill per group of them (their first tokens), then
   those that arrived meanwhile; a request admitted here joins the running batch at the next decode step;
3. runs `chunk` one-token steps for every busy slot (a small chunk keeps admission latency low);
4. hands each request its new tokens and text, cuts at a stop string (found on the host text, the
   rule of model/decode.py's rows), and frees a slot the moment its request ends.
A request's text depends on its prompt, settings and seed only, never on its slot or neighbours.
Streamed text is held back while it may still turn into a stop string or ends in an incomplete
UTF-8 character, so the pieces joined are exactly the final text.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

import checkpoint
from data import chat
from data import tokenizer as tokenizer_lib
from model import build, decode
from model.sampling import Sampling


# Requests admitted together share one prefill, in groups of these sizes (no padded rows; a few compiled
# prefill shapes): a burst of 32 arrivals is two prefills, not 32.
ADMIT_GROUPS = (16, 4, 1)

LM_MODES = ("causal", "sft", "dpo", "grpo", "ppo")  # modes (modes.MODES) whose model is (or holds) a causal LM


@dataclasses.dataclass
class Run:
    """A trained run, ready to serve."""
    name: str  # the workdir's base name: the model id clients ask for
    config: ml_collections.ConfigDict
    model: object  # a Transformer, or a LoraModel the Decoder unwraps
    params: dict
    step: int
    tokenizer: tokenizer_lib.Tokenizer
    chat: bool  # the run has a chat template (an SFT run): /v1/chat/completions works


def load_run(workdir: str, step: int | None = None) -> Run:
    """A run's latest (or `step`) checkpoint, config, tokenizer and whether it has a chat template.
    The params land on the first device (no mesh: a model must fit one accelerator)."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} is not a directory")
    tok_path = os.path.join(workdir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} not found: is {workdir!r} a training run's workdir?")
    config_dict, params, step = checkpoint.load_for_inference(workdir, step)
    # the Decoder runs here without a mesh: every weight on one device, whatever the layout it was saved in
    params = jax.device_put(params, jax.devices()[0])
    config = ml_collections.ConfigDict(config_dict)
    if config.mode not in LM_MODES:
        raise ValueError(f"{workdir!r} is a mode={config.mode!r} run: only language models ({', '.join(LM_MODES)}) "
                         f"generate text")
    if config.mode == "ppo":  # a policy with a value head on its trunk: the policy is the backbone (LoRA: base + lora)
        params = {k: params[k] for k in ("base", "lora")} if "lora" in params else params["backbone"]
    tok = tokenizer_lib.load_tokenizer(tok_path)
    template = os.path.join(workdir, "chat_template.json")
    has_chat = os.path.exists(template)
    if has_chat:
        with open(template) as f:
            chat.check_template_spec(json.load(f))
    model = build.causal_lm(config, tok.vocab_size, tok.base_size)
    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    return Run(name=name, config=config, model=model, params=params, step=step, tokenizer=tok, chat=has_chat)


@dataclasses.dataclass(eq=False)
class Request:
    """One completion to generate (an HTTP request with n choices or several prompts makes several)."""
    prompt: Sequence[int]
    max_new: int
    sampling: Sampling
    seed: int
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    index: int = 0  # carried by its updates (the choice index)
    top_logprobs: bool = False  # wants the most likely alternatives (the engine computes them only then)
    cancelled: bool = False
    deliver: Callable[["Update"], None] | None = None  # set by Engine.submit


@dataclasses.dataclass
class Update:
    """What a request got since its last update (called from the engine thread)."""
    index: int
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # per token: the decoder's n_top (id, log-prob), most likely first
    text: str  # new text, settled (see the module docstring)
    finish_reason: str | None = None  # 'stop' | 'length' on the last update
    error: str | None = None  # the request failed; no more updates follow


class QueueFull(Exception):
    pass


def settled(text: str) -> str:
    """Text that later tokens cannot change: without trailing U+FFFD (a UTF-8 character still incomplete)."""
    return text.rstrip("\ufffd")


@dataclasses.dataclass
class _Live:
    request: Request
    row: decode.Row  # tokens, log-probs, finish, stop-string cut (model/decode.py)
    text: str = ""  # text delivered so far


class Engine:
    """Requests in, updates out; a background thread runs the decoder (module docstring)."""

    def __init__(self, decoder: decode.Decoder, params, *, detokenize: Callable[[list[int]], str],
                 max_queue: int = 64, chunk: int | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.dec, self.detokenize, self.max_queue = decoder, detokenize, max_queue
        self.chunk = chunk or decoder.chunk
        self.slots = decoder.batch
        self.group_sizes = tuple(n for n in ADMIT_GROUPS if n <= self.slots)
        self._dparams = decoder.prepare(params)
        # committed to the params' device like every state the decoder returns: one compiled prefill, not two
        self._device = jax.sharding.SingleDeviceSharding(next(iter(jax.tree.leaves(self._dparams)[0].devices())))
        self._state = jax.device_put(decoder.empty(), self._device)
        self._live: list[_Live | None] = [None] * self.slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._device_stale = False  # a slot freed on the host is still running on the device
        self._thread = threading.Thread(target=self._loop, name="serving-engine", daemon=True)
        self.served = self.generated = 0

    def warm_up(self) -> "Engine":
        """Compile every prefill and decode loop the engine may run (before start(): the first requests
        then never wait on XLA). Returns self."""
        if self._thread.is_alive():
            raise RuntimeError("warm_up() runs before start()")
        self._state = self.dec.warm_up(self._dparams, self._state, self.chunk, range(1, self.dec.cache_len),
                                       self.group_sizes)
        return self

    # ---- called from any thread -------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the loop; requests still waiting or running get an error update."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        for r in list(self._waiting) + [live.request for live in self._live if live is not None]:
            _send(r, Update(r.index, [], [], None, "", error="the server is shutting down"))
        self._waiting.clear()
        self._live = [None] * self.slots

    def submit(self, requests: Sequence[Request], deliver: Callable[[Update], None]) -> None:
        """Queue requests (all or none). `deliver` must be thread-safe. Raises QueueFull."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already wait for one of {self.slots} decode slots; "
                                f"{len(requests)} more would pass max_queue={self.max_queue}")
            for r in requests:
                r.deliver = deliver
                self._waiting.append(r)
            self._cond.notify()

    def cancel(self, requests: Sequence[Request]) -> None:
        """The client is gone: drop these requests, freeing their slots at the next step."""
        with self._cond:
            for r in requests:
                r.cancelled = True
                if r in self._waiting:
                    self._waiting.remove(r)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            busy = sum(live is not None for live in self._live)
            return {"slots": self.slots, "busy": busy, "free": self.slots - busy, "waiting": len(self._waiting),
                    "served": self.served, "generated_tokens": self.generated}

    # ---- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or any(self._live)):
                    self._cond.wait()
                if self._stopping:
                    return
            taken: list[Request] = []  # off the queue in this round: failed with the rest if a step fails
            try:
                for slot, live in enumerate(self._live):
                    if live is not None and live.request.cancelled:
                        self._free(slot, device_done=False)
                # requests that arrive during a round's prefills are admitted in the same round (up to a
                # batch of them: a flood of one-token requests cannot hold the decode steps back)
                while len(taken) < self.slots and (admissions := self._take_waiting()):
                    taken += [r for _, r in admissions]
                    self._admit_all(admissions)
                self._step()
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                logging.exception("serving engine step failed")
                self._fail_all(f"decoding failed: {type(e).__name__}: {e}", taken)

    def _take_waiting(self) -> list[tuple[int, Request]]:
        """Waiting requests paired with free slots, in arrival order, taken off the queue."""
        with self._cond:
            free = [i for i, live in enumerate(self._live) if live is None]
            return [(slot, self._waiting.popleft()) for slot in free[:len(self._waiting)]]

    def _admit_all(self, admissions: list[tuple[int, Request]]) -> None:
        ok = []
        for slot, r in admissions:
            if r.cancelled:
                continue
            try:
                self.dec.check_request(r.prompt, r.max_new, r.stop_ids)
                ok.append((slot, r))
            except ValueError as e:  # the decoder's own checks, before anything runs: this request only
                _send(r, Update(r.index, [], [], None, "", error=str(e)))
        for group in admission_groups(ok, self.group_sizes):
            self._admit(group)

    def _step(self) -> None:
        """`chunk` decode steps for every busy slot; each request gets what it generated."""
        if not any(self._live):
            return
        if self._device_stale:  # slots the host freed (stop string, client gone) stop on the device too
            self._state = self.dec.set_done(self._state, [live is None for live in self._live])
            self._device_stale = False
        want_top = any(live is not None and live.request.top_logprobs for live in self._live)
        self._state, tokens, logps, tops = self.dec.steps(self._dparams, self._state, self.chunk, self.chunk,
                                                          want_top)
        finish_B = np.asarray(jax.device_get(self._state.finish_B))
        for slot, live in enumerate(self._live):
            if live is None:
                continue
            new = 0
            for j in np.nonzero(tokens[slot] >= 0)[0]:
                live.row.add(int(tokens[slot, j]), float(logps[slot, j]), decode.tops_at(tops, slot, j))
                new += 1
            live.row.finish = int(finish_B[slot])
            self._publish(slot, new, device_done=finish_B[slot] > 0)

    def _admit(self, group: list[tuple[int, Request]]) -> None:
        """One prefill for a group of requests (their first tokens); each joins the batch in its slot."""
        slots, rs = [s for s, _ in group], [r for _, r in group]
        self._state, token, logp, top, finish = self.dec.prefill(
            self._dparams, self._state, [r.prompt for r in rs], slots, [r.sampling for r in rs], [r.seed for r in rs],
            [r.max_new for r in rs], [r.stop_ids for r in rs])
        for i, (slot, r) in enumerate(group):
            row = decode.Row(len(r.prompt))
            row.add(int(token[i]), float(logp[i]), decode.tops_at(top, i, None))
            row.finish = int(finish[i])
            with self._cond:
                self._live[slot] = _Live(r, row)
            self._publish(slot, 1, device_done=finish[i] > 0)

    def _publish(self, slot: int, new: int, *, device_done: bool) -> None:
        """Stop strings, then the request's update; frees the slot when the request is over."""
        live = self._live[slot]
        r, row = live.request, live.row
        if new and r.stop_strings and row.cut is None:
            row.apply_stop_strings(r.stop_strings, self.detokenize, len(row.tokens) - new)
        done = row.finish > 0
        text = self.detokenize(row.tokens)
        if row.cut is not None:
            text = text[:row.cut]
        if not done:
            text = settled(text)
            hold = max((len(s) for s in r.stop_strings), default=1) - 1
            text = text[:max(0, len(text) - hold)]
        delta = text[len(live.text):] if text.startswith(live.text) else ""
        live.text += delta
        tokens = row.tokens[row.sent:]
        if tokens or delta or done:
            self.generated += len(tokens)
            _send(r, Update(r.index, tokens, row.logprobs[row.sent:], row.top[row.sent:] if self.dec.n_top else None,
                            delta, decode.FINISH[row.finish] if done else None))
            row.sent = len(row.tokens)
        if done:
            r.deliver = None  # its last update: nothing more goes to it
            self.served += 1
            self._free(slot, device_done=device_done)

    def _free(self, slot: int, *, device_done: bool) -> None:
        with self._cond:
            self._live[slot] = None
        self._device_stale |= not device_done

    def _fail_all(self, message: str, admitted: Sequence[Request]) -> None:
        """After an error inside the decoder the state may be gone: fail every request in it, start afresh."""
        for r in {id(r): r for r in list(admitted) + [x.request for x in self._live if x is not None]}.values():
            _send(r, Update(r.index, [], [], None, "", error=message))
        with self._cond:
            self._live = [None] * self.slots
        self._device_stale = False
        self._state = jax.device_put(self.dec.empty(), self._device)


def admission_groups(items: list, sizes: Sequence[int]) -> list[list]:
    """`items` (requests with their slots) in groups of the given sizes, largest first, shortest prompts
    together (a group's prompts are padded to its longest): 37 with sizes (16, 4, 1) -> 16, 16, 4, 1."""
    items = sorted(items, key=lambda item: len(item[1].prompt))
    groups, i = [], 0
    for n in sorted(sizes, reverse=True):
        while len(items) - i >= n:
            groups.append(items[i:i + n])
            i += n
    return groups


def _send(r: Request, update: Update) -> None:
    if r.deliver is not None and not r.cancelled:
        r.deliver(update)

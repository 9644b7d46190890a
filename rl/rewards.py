"""Rewards of RL completions: named programmatic rewards, and a trained reward model's scores.

A programmatic reward is a pure function `(completion text, reference answer, finish reason,
completion length in tokens) -> float`. `PROGRAMMATIC` names them (the config's `rl.rewards`
lists which to add up):
- 'exact_match': 1 when the text (up to the stop token) equals the answer ignoring surrounding
  whitespace (data/tasks.exact_match), else 0.
- 'final_answer': 1 when the text's final answer equals the answer's (data/answers.final_match: what
  follows '####', else the last \\boxed{}, else the last number; numbers by value), else 0: GSM8K / MATH
  references that are whole worked solutions, and replies that reason before they answer.
- 'format': 1 when the completion ended on its own (finish 'stop': it produced the end token) and
  is not empty, else 0.
`rl.reward_weights` weighs them (one number each, as TRL's reward_weights; () = 1 each; each reward's mean
is logged as rl/reward/<name>); `rl.length_penalty` subtracts coef * max(0, tokens - rl.length_target) on top.
A reward of your own, with the same signature, is named by where it is: `FILE.py:FUNCTION` (a file,
as verl's custom_reward_function) or `package.module:FUNCTION` (importable), e.g.
`--config.rl.rewards="('exact_match', 'my_rewards.py:contains_answer')"`; it is loaded once per process
(`resolve`), and a value that is not a number is an error naming it. A function of your own that also
takes a keyword `record` (or **kwargs) gets the prompt's record as read, every field of it (as TRL passes
a dataset's columns to its reward functions): test cases for a code reward, a tolerance, a rubric.

A reward-model run (`rl.reward_model=RUNDIR`, mode 'reward') scores the rendered conversation
`<|user|> prompt <|end|> <|assistant|> completion` at its last token (the completion's <|end|>
when it stopped), exactly as it was trained (data/preference.py). The scorer refuses a run whose
tokenizer differs from the policy's (its ids would be read as other tokens).

Every reward lands on the completion's LAST REAL token (the one that ended it), never on padding:
`place_on_last_token`.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import inspect
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import checkpoint
from data import answers, sources, tasks
from data import tokenizer as tokenizer_lib
from model import build


def exact_match(text: str, answer: str, finish: str, n_tokens: int) -> float:
    del finish, n_tokens
    return 1.0 if tasks.exact_match(text, answer) else 0.0


def final_answer(text: str, answer: str, finish: str, n_tokens: int) -> float:
    del finish, n_tokens
    return 1.0 if answers.final_match(text, answer) else 0.0


def well_formed(text: str, answer: str, finish: str, n_tokens: int) -> float:
    del answer, n_tokens
    return 1.0 if finish == "stop" and text.strip() else 0.0


PROGRAMMATIC = {"exact_match": exact_match, "final_answer": final_answer, "format": well_formed}


def check_names(names) -> None:
    for name in names:
        resolve(name)


def resolve(name: str) -> Callable[[str, str, str, int], float]:
    """The reward function `name` stands for: one of PROGRAMMATIC, or FILE.py:FUNCTION / module:FUNCTION."""
    if name in PROGRAMMATIC:
        return PROGRAMMATIC[name]
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(f"rl.rewards: {name!r} is not a programmatic reward; expected some of {sorted(PROGRAMMATIC)}, "
                         f"or a function of your own as FILE.py:FUNCTION or package.module:FUNCTION")
    return _load(name)


def reward_file(name: str) -> str:
    """The file of a FILE.py:FUNCTION reward ('' for any other name)."""
    where = name.rsplit(":", 1)[0] if isinstance(name, str) and ":" in name else ""
    return where if where.endswith(".py") else ""


def reward_source(name: str) -> str:
    """The source file of a reward of one's own: FILE.py's, or the module file of module:FUNCTION (found
    without running the module itself); '' for a built-in or a module without a file."""
    if reward_file(name) or not isinstance(name, str) or ":" not in name:
        return reward_file(name)
    try:
        spec = importlib.util.find_spec(name.rsplit(":", 1)[0])
    except (ImportError, ValueError):
        return ""
    origin = getattr(spec, "origin", None) or ""
    return origin if origin.endswith(".py") and os.path.isfile(origin) else ""


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Callable:
    where, function = name.rsplit(":", 1)
    if reward_file(name):
        path = os.path.abspath(os.path.expanduser(where))
        if not os.path.isfile(path):
            raise ValueError(f"rl.rewards: {name!r}: no file {where!r}{sources.in_cwd(where)}")
        spec = importlib.util.spec_from_file_location(f"lmstack_reward_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"rl.rewards: {name!r}: cannot import {where!r} ({e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"rl.rewards: {name!r}: {where!r} has no function {function!r}")
    return fn


def _takes_record(fn: Callable) -> bool:
    """Whether `fn` accepts a keyword `record` (by name, or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "record" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _value(name: str, fn: Callable, takes_record: bool, text: str, answer: str, finish: str, n: int,
           record: dict) -> float:
    value = fn(text, answer, finish, n, record=dict(record)) if takes_record else fn(text, answer, finish, n)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"rl.rewards: {name!r} returned {value!r:.80} for the completion {text!r:.60}: "
                         f"a reward is a number")
    return float(value)


def each_reward(names, texts, answers, finishes, lengths, records=None) -> list[np.ndarray]:
    """Float32 [N] per named reward (in `names`' order, a name listed twice twice): each reward of every
    completion; `records`: each completion's prompt record, for the functions that take one (none: {})."""
    fns = [(name, fn, _takes_record(fn)) for name, fn in ((name, resolve(name)) for name in names)]
    records = [{}] * len(texts) if records is None else records
    out = [np.zeros(len(texts), np.float32) for _ in names]
    for i, (text, answer, finish, n, record) in enumerate(zip(texts, answers, finishes, lengths, records)):
        for k, (name, fn, takes_record) in enumerate(fns):
            out[k][i] = _value(name, fn, takes_record, text, answer, finish, n, record)
    return out


def metric_names(names) -> list[str]:
    """Each reward's key under rl/reward/: a built-in's name, a function of one's own by its function name
    (a second of the same name gets _2, ...): TensorBoard tags without a file path in them."""
    out, seen = [], collections.Counter()
    for name in names:
        short = name.rsplit(":", 1)[-1]
        seen[short] += 1
        out.append(short if seen[short] == 1 else f"{short}_{seen[short]}")
    return out


def check_weights(names, weights) -> None:
    """rl.reward_weights: empty (every reward weighs 1) or one number per rl.rewards entry."""
    if len(weights) and (len(weights) != len(names) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise ValueError(f"rl.reward_weights={tuple(weights)!r}: give one number per rl.rewards entry "
                         f"{tuple(names)!r}, or () for weights of 1")


def weighted_sum(each: list[np.ndarray], weights=(), lengths=None, *, length_penalty: float = 0.0,
                 length_target: int = 0) -> np.ndarray:
    """sum_k weight_k * reward_k per completion (weights () = all 1), minus the length penalty; float32 [N]."""
    weights = tuple(weights) or (1.0,) * len(each)
    if len(weights) != len(each):
        raise ValueError(f"{len(weights)} reward weights for {len(each)} rewards")
    out = sum(float(w) * r for w, r in zip(weights, each))
    if length_penalty:
        out = out - length_penalty * np.maximum(0, np.asarray(lengths) - length_target)
    return np.asarray(out, np.float32)


def programmatic(names, texts, answers, finishes, lengths, *, length_penalty: float = 0.0,
                 length_target: int = 0, records=None, weights=()) -> np.ndarray:
    """The weighted sum of the named rewards (minus the length penalty) per completion, float32 [N]."""
    return weighted_sum(each_reward(names, texts, answers, finishes, lengths, records), weights, lengths,
                        length_penalty=length_penalty, length_target=length_target)


def place_on_last_token(rewards_N: np.ndarray, mask_NxL: np.ndarray) -> np.ndarray:
    """[N] sequence rewards -> [N, L] per-token rewards: all of it on each row's last masked (real
    completion) token, 0 elsewhere; a row without a completion token gets nothing."""
    mask = np.asarray(mask_NxL) > 0
    out = np.zeros(mask.shape, np.float32)
    has = mask.any(axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    out[np.nonzero(has)[0], last[has]] = np.asarray(rewards_N, np.float32)[has]
    return out


def completion_rows(problems: list, completions: list, group: int, width: int, pad_id: int):
    """Right-padded [N, width] token rows prompt + completion (token lists, the stop token included when
    sampled; `group` per problem, problem-major) and their segment ids (1 on real tokens): the rows a
    reward model scores, for the RL loop and rl/pairs alike."""
    ids = np.full((len(completions), width), pad_id, np.int32)
    seg = np.zeros((len(completions), width), np.int32)
    for i, tokens in enumerate(completions):
        row = np.concatenate([np.asarray(problems[i // group].prompt, np.int32), np.asarray(tokens, np.int32)])
        if len(row) > width:
            raise ValueError(f"row {i}: prompt + completion are {len(row)} tokens > width {width}")
        ids[i, :len(row)] = row
        seg[i, :len(row)] = 1
    return ids, seg


class RewardModelScorer:
    """A trained reward model (mode 'reward' run) scoring token rows; compiled once per row shape."""

    def __init__(self, workdir: str, policy_tok: tokenizer_lib.Tokenizer):
        saved, params, step = checkpoint.load_for_inference(workdir)
        if saved.get("mode") != "reward":
            raise ValueError(f"rl.reward_model={workdir!r} is a mode={saved.get('mode')!r} run, not a reward model")
        tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
        if tok.to_json() != policy_tok.to_json():
            raise ValueError(f"rl.reward_model={workdir!r} has a {tok.kind!r} tokenizer of {tok.vocab_size} ids that "
                             f"differs from the policy's ({policy_tok.kind!r}, {policy_tok.vocab_size} ids)")
        self.workdir, self.step = workdir, step
        self.model = build.reward_model(ml_collections.ConfigDict(saved), tok.vocab_size)
        self.params = jax.device_put(params, jax.local_devices()[0])  # each process scores all rows on its own device
        self._score = jax.jit(functools.partial(_score, self.model))

    def __call__(self, tokens_NxL: np.ndarray, segment_ids_NxL: np.ndarray) -> np.ndarray:
        """Rewards [N] of right-padded rows (segment id 1 on real tokens, 0 on padding)."""
        positions = np.broadcast_to(np.arange(tokens_NxL.shape[1], dtype=np.int32), tokens_NxL.shape)
        return np.asarray(self._score(self.params, tokens_NxL, positions, segment_ids_NxL))

    def describe(self) -> str:
        return json.dumps({"reward_model": self.workdir, "step": int(self.step)})


def _score(model, params, tokens_NxL, positions_NxL, segment_ids_NxL):
    return model.apply({"params": params}, jnp.asarray(tokens_NxL), positions_NxL, segment_ids_NxL)

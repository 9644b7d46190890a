"""Rollouts: sample completions with THE decoder (model/decode.py) and lay them out as training rows.

`sample` asks the decoder for `group` completions of each prompt, with the run's sampling settings,
the end-of-turn stop id, and one seed per completion derived from (run seed, iteration, row): the
same iteration samples the same text after a resume. Each completion comes back with the float32
log-prob of every chosen token (the sampler's view of the policy).

`policy` is the causal LM inside a mode's model that the decoder samples with (a PPO policy's backbone,
or its LoRA trunk).

`to_rows` builds fixed-shape rows [N, L] (L = max prompt + max new tokens - 1: one compile):
prompt + completion as pack_window lays out any sequence (inputs = ids[:-1], targets = ids[1:],
positions from 0, segment id 1 on real tokens, 0 on padding). `mask` is 1 on the targets that are
completion tokens: the first is predicted at the prompt's last token, the last is the token that
ended the completion (the stop id when it stopped, so the policy learns to stop). `sampler_logp`
holds the decoder's log-probs at those positions. With `mask_truncated`, completions that hit the
length limit keep `completion` (for metrics) but get a zero `mask` (no loss: DAPO's overlong filter).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model import decode
from model.sampling import Sampling, SamplingError


@dataclasses.dataclass
class Rollout:
    rows: dict  # inputs/targets/positions/segment_ids int32 [N, L]; mask, completion, sampler_logp float32 [N, L]
    texts: list[str]  # completion text (stop token removed)
    finishes: list[str]  # 'stop' | 'length'
    lengths: np.ndarray  # completion tokens [N] (the stop token included)
    problem: list  # the prompt's Problem for each row (data/sft.Problem: prompt ids, reference, kind)


def sampling_of(r) -> Sampling:
    """The rollout sampling settings of an rl config block (temperature, top_k, top_p, min_p); a value out
    of range is a ValueError naming its rl.* field."""
    try:
        return Sampling(temperature=float(r.temperature), top_k=int(r.get("top_k", 0)), top_p=float(r.top_p),
                        min_p=float(r.get("min_p", 0.0)))
    except SamplingError as e:
        raise ValueError(f"rl.{e.field}: {e}") from None


def seeds_for(seed: int, iteration: int, n: int) -> list[int]:
    """One uint32 seed per completion of an iteration, distinct across iterations and rows."""
    base = (int(seed) * 1_000_003 + int(iteration) * 65_537) % (1 << 32)
    return [(base + i * 7_919) % (1 << 32) for i in range(n)]


def sample(decoder: decode.Decoder, params, problems: list, *, group: int, sampling: Sampling, seeds: list[int],
           max_new_tokens: int, stop_ids: list[int]) -> list[decode.Completion]:
    """`group` completions of every problem's prompt, problem-major (rows i*group .. i*group+group-1)."""
    prompts = [np.asarray(p.prompt, np.int32) for p in problems for _ in range(group)]
    return decoder.generate(params, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seeds=seeds,
                            stop_ids=stop_ids)


def to_rows(problems: list, outs: list[decode.Completion], *, group: int, width: int, pad_id: int,
            stop_ids: list[int], detokenize, mask_truncated: bool) -> Rollout:
    """Completions (problem-major, `group` per problem) -> a Rollout of [N, width] rows."""
    n = len(outs)
    rows = {k: np.zeros((n, width), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    rows.update({k: np.zeros((n, width), np.float32) for k in ("mask", "completion", "sampler_logp")})
    texts, finishes, lengths, owner = [], [], np.zeros(n, np.int32), []
    stops = set(int(s) for s in stop_ids)
    for i, out in enumerate(outs):
        problem = problems[i // group]
        prompt = np.asarray(problem.prompt, np.int32)
        ids = np.concatenate([prompt, np.asarray(out.tokens, np.int32)])
        m = len(ids) - 1
        if m > width:
            raise ValueError(f"row {i}: prompt {len(prompt)} + completion {len(out.tokens)} tokens exceed the "
                             f"rollout width {width} + 1")
        rows["inputs"][i, :m] = ids[:-1]
        rows["targets"][i, :m] = ids[1:]
        rows["positions"][i, :m] = np.arange(m)
        rows["segment_ids"][i, :m] = 1
        first, k = len(prompt) - 1, len(out.tokens)
        rows["completion"][i, first:first + k] = 1.0
        rows["sampler_logp"][i, first:first + k] = out.logprobs
        if not (mask_truncated and out.finish_reason == "length"):
            rows["mask"][i, first:first + k] = 1.0
        texts.append(detokenize([t for t in out.tokens if t not in stops]))
        finishes.append(out.finish_reason)
        lengths[i] = k
        owner.append(problem)
    return Rollout(rows=rows, texts=texts, finishes=finishes, lengths=lengths, problem=owner)

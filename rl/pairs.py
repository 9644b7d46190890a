"""On-policy preference pairs: a policy's own samples of each prompt, ranked by a reward, best against worst.

DPO learns from pairs; pairs written by hand or by a template (scripts/make_tasks.py's near misses) hold
mistakes the policy may never make, and DPO then moves probability in ways the pairs do not check
(on the tasks, DPO on the template pairs lowers held-out exact match; README, Post-training). Pairs
drawn from the policy itself put the preference exactly where its samples disagree: what online and
iterative DPO and rejection-sampling pipelines do between rounds.

`sample_pairs` draws `samples` completions of every prompt with THE decoder (rl/rollout.sample: the RL
loop's sampling, seeds and stop id), rewards them with the named programmatic rewards or a reward-model
run (rl/rewards.py, as the RL loop does), and `choose` makes at most one pair a prompt:
- chosen: the highest reward among the completions that ended on their own (a completion cut at
  max_new_tokens never is: DPO would teach the cut as a finished answer);
- rejected: the lowest reward among all of them (truncated ones included);
- an empty completion (only <|end|>, or whitespace) is neither: a preference record's sides are text;
- no pair when the gap is not above `min_gap` (every sample as good: no preference to learn) or the two
  texts are equal. Ties go to the earliest sample: the file is a function of (run, prompts, seed).

Records are data/formats 'preference' records `{"prompt", "chosen", "rejected"}` plus "kind", "answer",
"chosen_reward", "rejected_reward", so `configs/dpo.py` (and `configs/reward.py`) read them as they are;
"prompt" is the prompt's text when it is one user turn, else its messages (a conversational prompt).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from data import chat
from data.sft import Problem
from model import decode
from model.sampling import Sampling
from rl import rewards as rewards_lib, rollout


@dataclasses.dataclass
class Drawn:
    texts: list[str]  # completion text (stop token removed)
    finishes: list[str]  # 'stop' | 'length'
    rewards: np.ndarray  # float32 [samples]


def choose(drawn: Drawn, *, min_gap: float = 0.0) -> tuple[int, int] | None:
    """(chosen, rejected) indices into one prompt's samples, or None when they give no preference."""
    rewards = np.asarray(drawn.rewards, np.float64)
    said = [i for i, t in enumerate(drawn.texts) if t.strip()]
    finished = [i for i in said if drawn.finishes[i] == "stop"]
    if not finished:
        return None
    best = max(finished, key=lambda i: (rewards[i], -i))
    worst = min(said, key=lambda i: (rewards[i], i))
    if not rewards[best] - rewards[worst] > min_gap or drawn.texts[best] == drawn.texts[worst]:
        return None
    return best, worst


def prompt_field(problem: Problem):
    """A preference record's "prompt" for a problem: the text of a one-user-turn prompt, else its messages
    (data/formats' conversational prompt)."""
    messages = [dict(m) for m in problem.messages]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def sample_pairs(model, params, problems: list[Problem], tok, *, samples: int, sampling: Sampling,
                 max_new_tokens: int, max_prompt_len: int, seed: int = 0, batch_rows: int = 64,
                 reward_names=("exact_match",), scorer=None, min_gap: float = 0.0,
                 reward_weights=()) -> tuple[list[dict], dict]:
    """(pair records in prompt order, summary) for `problems` (data/prompts.read_prompts), `samples` each."""
    if samples < 2:
        raise ValueError(f"samples={samples}: a pair needs at least 2 completions of a prompt")
    if batch_rows < samples:
        raise ValueError(f"batch_rows={batch_rows} must be >= samples={samples} (a prompt's samples decode together)")
    if scorer is None:
        rewards_lib.check_names(reward_names)
        rewards_lib.check_weights(reward_names, reward_weights)
    prompt_fields = [prompt_field(p) for p in problems]
    for i, p in enumerate(problems):
        if len(p.prompt) > max_prompt_len:
            raise ValueError(f"prompt {i}: {len(p.prompt)} tokens > max_prompt_len={max_prompt_len}")
    per_call = batch_rows // samples
    width = max_prompt_len + max_new_tokens
    decoder = decode.Decoder(model, batch=per_call * samples, cache_len=width)
    end_id = tok.special_id(chat.END_TOKEN)
    records, summary = [], collections.Counter()
    reward_sum, kinds = 0.0, collections.Counter()
    for call, at in enumerate(range(0, len(problems), per_call)):
        chunk = problems[at:at + per_call]
        outs = rollout.sample(decoder, params, chunk, group=samples, sampling=sampling,
                              seeds=rollout.seeds_for(seed, call, len(chunk) * samples),
                              max_new_tokens=max_new_tokens, stop_ids=[end_id])
        texts = [tok.decode([t for t in o.tokens if t != end_id]) for o in outs]
        finishes = [o.finish_reason for o in outs]
        if scorer is not None:
            r_N = scorer(*rewards_lib.completion_rows(chunk, [o.tokens for o in outs], samples, width, tok.pad_id))
        else:
            lengths = np.asarray([len(o.tokens) for o in outs], np.int32)
            answers = [chunk[i // samples].reference for i in range(len(outs))]
            r_N = rewards_lib.programmatic(reward_names, texts, answers, finishes, lengths, weights=reward_weights,
                                           records=[chunk[i // samples].record for i in range(len(outs))])
        reward_sum += float(np.sum(r_N))
        for j, problem in enumerate(chunk):
            s = slice(j * samples, (j + 1) * samples)
            drawn = Drawn(texts[s], finishes[s], np.asarray(r_N[s], np.float32))
            summary["truncated"] += drawn.finishes.count("length")
            picked = choose(drawn, min_gap=min_gap)
            if picked is None:
                summary["no_preference"] += 1
                continue
            best, worst = picked
            records.append({"prompt": prompt_fields[at + j], "chosen": drawn.texts[best],
                            "rejected": drawn.texts[worst], "kind": problem.kind, "answer": problem.reference,
                            "chosen_reward": float(drawn.rewards[best]),
                            "rejected_reward": float(drawn.rewards[worst])})
            kinds[problem.kind or ""] += 1
    n = len(problems) * samples
    out = {"prompts": len(problems), "samples": n, "pairs": len(records),
           "no_preference": int(summary["no_preference"]), "truncated": int(summary["truncated"]),
           "reward_mean": reward_sum / max(n, 1), "pairs_by_kind": dict(sorted(kinds.items()))}
    return records, out

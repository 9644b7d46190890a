"""KL of a post-trained policy to its reference on held-out prompts, comparable across DPO, GRPO and PPO.

    python scripts/policy_kl.py --workdir=runs/grpo --reference=runs/sft --data=datasets/tasks/val.jsonl \
        [--n=200] [--samples=4] [--max_new_tokens=16] [--seed=0]

Samples `--samples` completions per prompt from the policy (temperature 1, THE decoder, stopping at
<|end|>), scores every sampled token under the policy and the reference (a training forward pass
each), and prints one JSON object: the Monte-Carlo estimate of KL(policy || reference) per
completion (the sum over its tokens of log p - log q: unbiased), per token (k1) and with the
non-negative k3 estimator, plus counts. Training-time KLs differ by run (GRPO/PPO log theirs on
their own rollouts; DPO samples nothing); this measures all of them the same way. Both runs must
share a tokenizer. Nothing is written. Errors exit 1 with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402
import serving  # noqa: E402
from data import chat, prompts as prompts_data  # noqa: E402
from model import decode  # noqa: E402
from model.sampling import Sampling  # noqa: E402
from rl import losses, rollout  # noqa: E402
from rl.objectives import token_logps  # noqa: E402
from rl.reference import in_batches  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The policy's run (mode causal, sft, dpo, grpo or ppo).")
    flags.DEFINE_string("reference", None, "The reference run (usually the SFT run the policy started from).")
    flags.DEFINE_string("data", None, "Prompt records (data/prompts.py formats), e.g. the validation tasks.")
    flags.DEFINE_integer("n", 200, "Prompts used (the first n).", lower_bound=1)
    flags.DEFINE_integer("samples", 4, "Completions sampled per prompt.", lower_bound=1)
    flags.DEFINE_integer("max_new_tokens", 16, "Completion length limit.", lower_bound=1)
    flags.DEFINE_integer("max_prompt_len", 96, "Longer prompts are skipped.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Rows decoded and scored at a time.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def policy_kl(workdir: str, reference: str, data: str, *, n: int = 200, samples: int = 4, max_new_tokens: int = 16,
              max_prompt_len: int = 96, batch_size: int = 64, seed: int = 0) -> dict:
    """The script without the command line (tests call this)."""
    pol, ref = serving.load_run(workdir), serving.load_run(reference)
    tok = pol.tokenizer
    if tok.to_json() != ref.tokenizer.to_json():
        raise ValueError(f"{workdir!r} and {reference!r} have different tokenizers")
    problems, _ = prompts_data.read_prompts(data, tok, max_prompt_len=max_prompt_len, strict=False)
    problems = problems[:n]
    end = tok.special_id(chat.END_TOKEN)
    width = max_prompt_len + max_new_tokens - 1
    decoder = decode.Decoder(pol.model, batch=batch_size, cache_len=width + 1)
    outs = rollout.sample(decoder, pol.params, problems, group=samples, sampling=Sampling(temperature=1.0),
                          seeds=rollout.seeds_for(seed, 0, len(problems) * samples), max_new_tokens=max_new_tokens,
                          stop_ids=[end])
    ro = rollout.to_rows(problems, outs, group=samples, width=width, pad_id=tok.pad_id, stop_ids=[end],
                         detokenize=tok.decode, mask_truncated=False)
    score_pol = jax.jit(functools.partial(token_logps, pol.model))
    score_ref = jax.jit(functools.partial(token_logps, ref.model))
    rows = {k: ro.rows[k] for k in ("inputs", "targets", "positions", "segment_ids")}
    m = len(rows["inputs"])
    lp_pol = in_batches(lambda batch: score_pol(pol.params, batch)[0], rows, batch_size)
    lp_ref = in_batches(lambda batch: score_ref(ref.params, batch)[0], rows, batch_size)
    comp = ro.rows["completion"] > 0
    k1 = np.where(comp, lp_pol - lp_ref, 0.0)
    k3 = np.where(comp, np.asarray(losses.kl_estimate(lp_pol, lp_ref, "k3")), 0.0)
    tokens = int(comp.sum())
    return {"workdir": workdir, "reference": reference, "data": data, "prompts": len(problems),
            "completions": m, "tokens": tokens, "kl_per_completion": float(k1.sum(axis=1).mean()),
            "kl_per_token": float(k1.sum() / max(tokens, 1)), "kl_k3_per_token": float(k3.sum() / max(tokens, 1)),
            "mean_length": float(ro.lengths.mean())}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("workdir", "reference", "data"):
        if not getattr(FLAGS, name):
            print(f"policy_kl.py: error: --{name} is required", file=sys.stderr)
            return 1
    try:
        out = policy_kl(FLAGS.workdir, FLAGS.reference, FLAGS.data, n=FLAGS.n, samples=FLAGS.samples,
                        max_new_tokens=FLAGS.max_new_tokens, max_prompt_len=FLAGS.max_prompt_len,
                        batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"policy_kl.py: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'policy_kl.py')

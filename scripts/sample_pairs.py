"""Preference pairs from a run's own samples (on-policy DPO data); one JSON line per pair.

    python scripts/sample_pairs.py --workdir=runs/sft --data=datasets/tasks/train.jsonl \
        --out=datasets/pairs_sft/train_pref.jsonl [--samples=8] [--temperature=1.0] [--top_p=1.0] \
        [--max_new_tokens=16] [--max_prompt_len=128] \
        [--rewards=exact_match [--reward_weights=1] | --reward_model=runs/rm] \
        [--min_gap=0] [--limit=0] [--seed=0] [--batch_rows=64] [--step=N]
    python train.py --config=configs/dpo.py --workdir=runs/dpo_onpolicy --config.init_from=runs/sft \
        --config.data.path=datasets/pairs_sft/train_pref.jsonl

Samples --samples completions of every prompt of --data (any RL prompt file: data/prompts.py; the SFT
task files work as they are) from the run's latest checkpoint (or --step; LoRA and PPO runs decode
their policy), with the project's decoder and sampling, stopping at <|end|>. Each completion is
rewarded by the named programmatic rewards (default exact_match against the record's answer) or by a
reward-model run (--reward_model), and each prompt gives at most one pair: its best finished sample
against its worst (rl/pairs.py; prompts whose samples all score the same give none).

Output: data/formats 'preference' records {"prompt", "chosen", "rejected", "kind", "answer",
"chosen_reward", "rejected_reward"} to --out (written whole at the end through a temporary file),
then one JSON summary line on stdout: prompts, samples, pairs, no_preference, truncated, reward_mean,
pairs_by_kind; "prompt" is a list of messages where the prompt is more than one user turn. The same run,
data and --seed give the same file. Errors (no workdir or checkpoint, a run that does not generate text,
a missing or bad data file, a bad value of a flag) print one `sample_pairs.py: error: ...` line, exit 1
and write nothing.
Runtime: 4,000 prompts x 8 samples of the default-size SFT model in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402
import serving  # noqa: E402
from data import prompts as prompts_data  # noqa: E402
from data.sources import DataError  # noqa: E402
from model.sampling import Sampling  # noqa: E402
from rl import pairs, rewards as rewards_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The flags, into `fv` (tests pass a fresh FlagValues and patch FLAGS)."""
    flags.DEFINE_string("workdir", None, "The run whose policy samples (checkpoints/, tokenizer.json).", flag_values=fv)
    flags.DEFINE_string("data", None, "JSONL prompt records (data/prompts.py), e.g. an SFT task file.", flag_values=fv)
    flags.DEFINE_string("out", None, "Write the pairs here (JSONL).", flag_values=fv)
    flags.DEFINE_integer("samples", 8, "Completions per prompt (>= 2).", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 16, "Tokens per completion at most (the <|end|> included).", flag_values=fv)
    flags.DEFINE_integer("max_prompt_len", 128, "Prompt tokens at most (longer prompts are skipped, counted).",
                         flag_values=fv)
    flags.DEFINE_list("rewards", ["exact_match"], f"Programmatic rewards to add up ({sorted(rewards_lib.PROGRAMMATIC)}, "
                      f"or your own as FILE.py:FUNCTION).", flag_values=fv)
    flags.DEFINE_list("reward_weights", [], "One weight per --rewards entry (default: 1 each).", flag_values=fv)
    flags.DEFINE_string("reward_model", "", "A reward-model run scoring the completions instead.", flag_values=fv)
    flags.DEFINE_string("answer_field", "answer", "The prompt records' field the rewards check against.",
                        flag_values=fv)
    flags.DEFINE_float("min_gap", 0.0, "A pair needs chosen reward - rejected reward > this.", flag_values=fv)
    flags.DEFINE_integer("limit", 0, "Use the first N prompts; 0 = all.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same pairs.", flag_values=fv)
    flags.DEFINE_integer("batch_rows", 64, "Completions per decoder call (a multiple of --samples is used).",
                         flag_values=fv)
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.", flag_values=fv)


def run(fv) -> dict:
    """Sample, pair, write; returns the summary (errors raise before anything is written)."""
    for name in ("workdir", "data", "out"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required")
    if not fv.temperature > 0:
        raise ValueError(f"--temperature={fv.temperature}: must be > 0 (greedy samples are all the same)")
    if fv.limit < 0 or fv.max_new_tokens < 1 or fv.max_prompt_len < 1:
        raise ValueError(f"--limit={fv.limit}, --max_new_tokens={fv.max_new_tokens}, "
                         f"--max_prompt_len={fv.max_prompt_len}: limit >= 0 and lengths >= 1")
    try:
        weights = tuple(float(w) for w in fv.reward_weights)
    except ValueError:
        raise ValueError(f"--reward_weights={','.join(fv.reward_weights)}: numbers, one per --rewards entry") from None
    if weights and fv.reward_model:
        raise ValueError(f"--reward_weights={','.join(fv.reward_weights)} weighs --rewards, but --reward_model gives "
                         f"the reward (set one or the other)")
    loaded = serving.load_run(fv.workdir, None if fv.step < 0 else fv.step)
    scorer = rewards_lib.RewardModelScorer(fv.reward_model, loaded.tokenizer) if fv.reward_model else None
    problems, stats = prompts_data.read_prompts(fv.data, loaded.tokenizer, max_prompt_len=fv.max_prompt_len,
                                                strict=False, answer_field=fv.answer_field)
    if stats.skipped:
        print(f"sample_pairs.py: {fv.data}: skipped {stats.summary()}", file=sys.stderr)
    if fv.limit:
        problems = problems[:fv.limit]
    try:
        records, summary = pairs.sample_pairs(
            loaded.model, loaded.params, problems, loaded.tokenizer, samples=fv.samples,
            sampling=Sampling(temperature=fv.temperature, top_p=fv.top_p), max_new_tokens=fv.max_new_tokens,
            max_prompt_len=fv.max_prompt_len, seed=fv.seed, batch_rows=fv.batch_rows, reward_names=tuple(fv.rewards),
            scorer=scorer, min_gap=fv.min_gap, reward_weights=weights)
    except ValueError as e:
        raise ValueError(f"{fv.data}: {e}") from None
    if not records:  # an empty file would only fail later, as a DPO or reward run's data
        raise ValueError(f"no pairs: for each of the {summary['prompts']} prompts the best and worst of its "
                         f"--samples={fv.samples} completions are the same text or their rewards differ by no more "
                         f"than --min_gap={fv.min_gap} ({summary['truncated']} of {summary['samples']} completions "
                         f"cut at --max_new_tokens={fv.max_new_tokens}); nothing written to --out")
    tmp = f"{fv.out}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, fv.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dict(summary, out=fv.out, workdir=fv.workdir, step=loaded.step)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        summary = run(FLAGS)
    except (FileNotFoundError, ValueError, DataError, OSError) as e:
        print(f"sample_pairs.py: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'sample_pairs.py')

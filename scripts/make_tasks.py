"""Offline verifiable instruction tasks (data/tasks.py) as SFT and preference JSONL.

    python scripts/make_tasks.py --out=datasets/tasks --seed=0 --n_train=4000 --n_val=200 --n_test=200
    # a larger held-out set, disjoint from every problem of an existing dataset (its other splits stay empty)
    python scripts/make_tasks.py --out=datasets/tasks_test2k --seed=1 --n_train=0 --n_val=0 --n_test=2000 \
        --exclude=datasets/tasks

Writes OUT/{train,val,test}.jsonl (SFT: {"messages": [...], "kind", "answer"}) and
OUT/{train,val,test}_pref.jsonl ({"prompt", "chosen", "rejected", "kind", "answer"}); problems are
unique and the splits disjoint; the same seed gives byte-identical files. Every record is checked
with data/formats.validate before it is written. Evaluate with data.tasks.exact_match. `--exclude`
(files or directories of JSONL: chat records' first user turn, preference records' prompt) names
questions never drawn; a split of 0 problems is not written.
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import overrides  # noqa: E402
from data import chat, formats, tasks  # noqa: E402
from data.sources import ReadStats, Source, source_records  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("seed", 0, "Random seed (problems, splits and wrong answers).")
flags.DEFINE_integer("n_train", 4000, "Training problems.", lower_bound=0)
flags.DEFINE_integer("n_val", 200, "Validation problems.", lower_bound=0)
flags.DEFINE_integer("n_test", 200, "Test problems.", lower_bound=0)
flags.DEFINE_list("kinds", list(tasks.KINDS), f"Task kinds, some of {tasks.KINDS}.")
flags.DEFINE_list("exclude", [], "JSONL files or directories of them whose questions are never drawn.")
flags.mark_flags_as_required(["out"])


def write(path: str, records: list[dict], fmt: str) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(formats.validate(r, fmt), sort_keys=True) + "\n")


def questions(paths: list[str]) -> set[str]:
    """The user questions of chat records (first user turn) and preference records (prompt; a conversational
    prompt's first user turn) in these JSONL files, directories or globs (read as every record source is:
    data/sources.source_records)."""
    out = set()
    for path in paths:
        for where, record in source_records(Source(kind="files", path=path), ReadStats(), strict=True):
            if isinstance(record, dict) and "chosen" in record:
                try:
                    record = formats.explicit_prompt(record)  # an implicit-prompt pair: its shared turns
                except formats.FormatError as e:
                    raise ValueError(f"{where}: {e}") from None
            if isinstance(record, dict) and "prompt" in record and "response" not in record:  # a preference record
                if not isinstance(record["prompt"], list):
                    out.add(record["prompt"])
                    continue
                record = {"messages": record["prompt"]}  # a conversational prompt: its first user turn
            try:
                user = [m["content"] for m in chat.messages_of(record) if m["role"] == "user"]
            except chat.ChatError as e:
                raise ValueError(f"{where}: {e}") from None
            if not user:
                raise ValueError(f"{where}: neither a preference record's prompt nor a user turn")
            out.add(user[0])
    return out


def main(argv):
    del argv
    exclude = questions(FLAGS.exclude)
    splits = tasks.make_splits(FLAGS.seed, {"train": FLAGS.n_train, "val": FLAGS.n_val, "test": FLAGS.n_test},
                               kinds=tuple(FLAGS.kinds), exclude=exclude)
    rng = random.Random(FLAGS.seed + 1)
    os.makedirs(FLAGS.out, exist_ok=True)
    if exclude:
        print(f"{len(exclude)} questions of {', '.join(FLAGS.exclude)} excluded")
    for name, problems in splits.items():
        if not problems:
            continue
        write(os.path.join(FLAGS.out, f"{name}.jsonl"), [tasks.sft_record(p) for p in problems], "chat")
        write(os.path.join(FLAGS.out, f"{name}_pref.jsonl"), [tasks.preference_record(p, rng) for p in problems],
              "preference")
        print(f"{name}: {len(problems)} problems -> {name}.jsonl, {name}_pref.jsonl")


if __name__ == "__main__":
    overrides.run(main, 'make_tasks.py')

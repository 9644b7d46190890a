"""Offline verifiable instruction tasks (data/tasks.py) as SFT and preference JSONL.

    python scripts/make_tasks.py --out=datasets/tasks --seed=0 --n_train=4000 --n_val=200 --n_test=200

Writes OUT/{train,val,test}.jsonl (SFT: {"messages": [...], "kind", "answer"}) and
OUT/{train,val,test}_pref.jsonl ({"prompt", "chosen", "rejected", "kind", "answer"}); problems are
unique and the splits disjoint; the same seed gives byte-identical files. Every record is checked
with data/formats.validate before it is written. Evaluate with data.tasks.exact_match.
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from data import formats, tasks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("seed", 0, "Random seed (problems, splits and wrong answers).")
flags.DEFINE_integer("n_train", 4000, "Training problems.")
flags.DEFINE_integer("n_val", 200, "Validation problems.")
flags.DEFINE_integer("n_test", 200, "Test problems.")
flags.DEFINE_list("kinds", list(tasks.KINDS), f"Task kinds, some of {tasks.KINDS}.")
flags.mark_flags_as_required(["out"])


def write(path: str, records: list[dict], fmt: str) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(formats.validate(r, fmt), sort_keys=True) + "\n")


def main(argv):
    del argv
    splits = tasks.make_splits(FLAGS.seed, {"train": FLAGS.n_train, "val": FLAGS.n_val, "test": FLAGS.n_test},
                               kinds=tuple(FLAGS.kinds))
    rng = random.Random(FLAGS.seed + 1)
    os.makedirs(FLAGS.out, exist_ok=True)
    for name, problems in splits.items():
        write(os.path.join(FLAGS.out, f"{name}.jsonl"), [tasks.sft_record(p) for p in problems], "chat")
        write(os.path.join(FLAGS.out, f"{name}_pref.jsonl"), [tasks.preference_record(p, rng) for p in problems],
              "preference")
        print(f"{name}: {len(problems)} problems -> {name}.jsonl, {name}_pref.jsonl")


if __name__ == "__main__":
    app.run(main)

"""A small real classification task from the embedded corpus: which stdlib package a code snippet is from.

    python scripts/make_classification_data.py --out=datasets/stdlib_cls

Snippets are consecutive ~`--chars` character pieces of the .py files of `--packages`; whole
files go to train or val by a hash of their path (no file is split across the two), so
validation measures generalisation to unseen files. Writes OUT/train.jsonl and OUT/val.jsonl
({"text", "label"}) and prints the label counts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import overrides  # noqa: E402
from data import sources  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_list("packages", ["email", "json", "asyncio", "unittest"], "stdlib packages = labels.")
flags.DEFINE_integer("chars", 200, "Characters per snippet.", lower_bound=1)
flags.DEFINE_float("val_fraction", 0.2, "Share of files held out for validation.")
flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    root = sources.stdlib_dir()
    os.makedirs(FLAGS.out, exist_ok=True)
    counts = collections.Counter()
    with open(os.path.join(FLAGS.out, "train.jsonl"), "w") as tr, open(os.path.join(FLAGS.out, "val.jsonl"), "w") as va:
        for pkg in FLAGS.packages:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, pkg))):
                if "__pycache__" in dirpath:
                    continue
                for name in sorted(f for f in files if f.endswith(".py")):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, root)
                    h = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little") / 2.0**64
                    split, f = ("val", va) if h < FLAGS.val_fraction else ("train", tr)
                    text = open(path, encoding="utf-8", errors="replace").read()
                    for i in range(0, len(text) - FLAGS.chars // 2, FLAGS.chars):
                        snippet = text[i:i + FLAGS.chars]
                        if snippet.strip():
                            f.write(json.dumps({"text": snippet, "label": pkg}) + "\n")
                            counts[(split, pkg)] += 1
    for split in ("train", "val"):
        print(split, {pkg: counts[(split, pkg)] for pkg in FLAGS.packages})


if __name__ == "__main__":
    overrides.run(main, 'make_classification_data.py')

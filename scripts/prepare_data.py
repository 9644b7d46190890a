"""Prepare a dataset: collect, clean, deduplicate, split, train a tokenizer, tokenize, write shards.

    python scripts/prepare_data.py --config=configs/data/stdlib.py --out=datasets/stdlib [--strict]
    python scripts/prepare_data.py --config=configs/data/stdlib.py --out=/tmp/ds \
        --config.tokenizer.vocab_size=4096 --config.dedup.threshold=0.7      # dotted overrides

Prints one line per phase (seconds, MB/s) and a summary; writes manifest.json, report.md,
tokenizer.json and ArrayRecord token shards into --out (see data/prepared.py). Train on it with
`python train.py --config=configs/pretrain_causal.py --config.data.path=OUT --workdir=...`.
--strict turns the first malformed record into an error naming its file and line.
The same inputs and config give byte-identical outputs. --out must be new or empty.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import overrides  # noqa: E402
from data import prepare  # noqa: E402
from data.sources import DataError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Data config (configs/data/*.py).", lock_config=True)
flags.DEFINE_string("out", None, "Output dataset directory.")
flags.DEFINE_bool("strict", False, "Fail on the first malformed record (naming file and line).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    m = prepare.prepare(FLAGS.config, FLAGS.out, strict=FLAGS.strict)
    total = sum(t["seconds"] for t in m["_timings"])
    d = m["documents"]
    splits = ", ".join(f"{k} {v['documents']} docs / {v['tokens']:,} tokens" for k, v in m["splits"].items())
    in_mb = sum(s["bytes"] for s in m["sources"].values()) / 1e6
    print(f"done in {total:.1f} s ({in_mb / total:.1f} MB/s overall): {d['collected']} documents -> {d['kept']} kept, "
          f"{d['removed']} removed; {splits}; tokenizer {m['tokenizer']['kind']} ({m['tokenizer']['vocab_size']} ids)")
    print(f"wrote {FLAGS.out}/manifest.json and report.md")


if __name__ == "__main__":
    overrides.run(main, 'prepare_data.py', errors=(DataError, ValueError, OSError))  # bad inputs, config values, paths

"""Your own text, prepared: a file, a directory, a glob, JSONL or Parquet (any of them .gz).

Command:  python scripts/prepare_data.py --config=configs/data/files.py:~/my_corpus --out=datasets/mine
          then: python train.py --config=configs/pretrain_causal.py --workdir=runs/mine \
                    --config.data.path=datasets/mine
          JSONL / Parquet records: the text is the 'text' field (--config.sources.files.text_field=body);
          task records (`--config.format=chat|classification|qa|preference`) are validated and written
          with their tokens instead of cleaned.
Runtime:  about 0.3 s per MB of input on 2 CPU cores (this Python's whole lib directory, 404 MB of
          sources: 126 s on an AMD EPYC Zen 3; cleaning, BPE training and tokenizing dominate).
Result:   manifest.json and report.md in --out list the documents kept per split and every removal
          by reason. The filters are Gopher's thresholds for prose (common.base, every field commented
          there): source code or text in scripts without spaces needs looser ones (configs/data/stdlib.py
          shows which; clean.min_words counts whitespace-separated words). Splits hold whole documents (a
          file, or a JSONL record, is one): a few large files give an empty val split, which is refused
          by name; split the text up, or train on the raw file with --config.data.split=tail.
"""

from configs.data import common


def get_config(arg=None):
    c = common.base()
    # the path is the config argument (FILE.py:PATH) or --config.sources.files.path=PATH
    c.sources.files = common.source(kind="files", path=arg or "")
    return c

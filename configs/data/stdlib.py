"""The embedded default corpus, prepared: the Python standard library's source, byte-level BPE.

Command:  python scripts/prepare_data.py --config=configs/data/stdlib.py --out=datasets/stdlib
          then: python train.py --config=configs/pretrain_causal.py --workdir=runs/bpe \
                    --config.data.path=datasets/stdlib
Runtime:  about 20 s on 2 CPU cores for the 31.5 MB corpus (clean, dedup, tokenizer training,
          tokenize, write); one line per phase with its MB/s.
Result:   1,612 of 1,758 documents kept (removed: tiny __init__ files, generated tables, 30 exact
          or near duplicates such as the encodings/cp*.py codecs), an 8,192-id BPE at about 3.65
          bytes/token (8.28M tokens); manifest.json and report.md in --out say what was removed
          and why. Trained with the default model at equal FLOPs it reaches 1.69 val bits/byte
          vs 1.98 for bytes (README, Data preparation).
"""

from configs.data import common


def get_config(arg=None):
    c = common.base()
    c.sources.stdlib = common.source(kind="stdlib")
    # Source code, not prose: Gopher's word-repetition limits would drop most test modules
    # (many `self.assertEqual(` lines), so they are loosened to catch only generated tables.
    c.clean.min_chars = 100
    c.clean.min_words = 10
    c.clean.min_alnum_fraction = 0.3
    c.clean.max_mean_line_length = 200.0
    c.clean.max_dup_line_fraction = 0.5
    c.clean.max_dup_line_char_fraction = 0.5
    c.clean.max_top_ngram_fraction = (0.3, 0.25, 0.2)
    c.clean.max_dup_ngram_fraction = (0.6, 0.6, 0.6, 0.6, 0.6, 0.6)
    c.split.ratios = (0.95, 0.05, 0.0)
    c.tokenizer.vocab_size = 8192
    if arg:
        raise ValueError(f"config arg {arg!r}: expected nothing")
    return c

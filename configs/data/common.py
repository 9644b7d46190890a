"""Data preparation configs (scripts/prepare_data.py): every field, commented, in one place.

Config files call `base()`, add their sources with `source(...)` and override thresholds.
"""

import ml_collections

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".tex", ".parquet",
                   ".arrow", ".csv", ".tsv")


def source(kind: str = "files", path: str = "", **overrides) -> ml_collections.ConfigDict:
    """One input; add as `c.sources.NAME = source(...)`."""
    s = ml_collections.ConfigDict()
    s.kind = kind  # 'files' (a file, directory or glob) | 'stdlib' (embedded default) | 'tfds'
    s.path = path  # 'files': file/dir/glob; 'tfds': dataset name; 'stdlib': unused
    s.text_field = "text"  # JSONL/Parquet/TFDS field holding the text (format='text')
    s.extensions = TEXT_EXTENSIONS  # directory walks read these extensions (and the same + '.gz')
    s.tfds_split = "train"  # 'tfds': which split of the TFDS dataset to read
    s.data_dir = ""  # 'tfds': its data_dir ('' = the TFDS default, ~/tensorflow_datasets)
    s.max_file_mb = 256.0  # files larger than this (decompressed) are skipped as 'file too large'
    for key, value in overrides.items():
        if key not in s:
            raise KeyError(f"source(): unknown field {key!r}; fields: {sorted(s.keys())}")
        s[key] = value
    return s


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.format = "text"  # 'text' (pretraining) | 'classification' | 'qa' | 'chat' | 'preference'
    c.sources = ml_collections.ConfigDict()  # NAME -> source(...), read in insertion order

    c.clean = k = ml_collections.ConfigDict()  # format='text' only; task records are kept verbatim
    k.normalize = True  # NFC, newline/control-char/space clean-up (data/clean.normalize)
    k.strip_trailing_whitespace = True  # drop spaces/tabs at line ends
    k.max_blank_lines = 2  # cap runs of blank lines (-1: no cap)
    k.scrub_emails = False  # replace email addresses with '[email]'
    k.scrub_ips = False  # replace IPv4 addresses with '[ip]'
    k.min_chars = 200  # shorter documents: 'too short'
    k.max_chars = 5_000_000  # longer documents: 'too long' (0 = no limit)
    k.min_mean_line_length = 5.0  # characters per line below this: 'short lines'
    # above this: 'long lines' (minified code, one-line blobs; 0 = off). Not lower: a JSONL record's paragraph
    # is one line of often a few thousand characters
    k.max_mean_line_length = 10_000.0
    k.min_alnum_fraction = 0.25  # alphanumeric share of characters below this: 'low alphanumeric'
    k.max_dup_line_fraction = 0.3  # share of non-blank lines repeating an earlier line: 'dup lines'
    k.max_dup_line_char_fraction = 0.2  # share of non-blank characters in those lines: 'dup lines'
    k.min_words = 50  # fewer whitespace-separated words: 'too few words'
    k.max_top_ngram_fraction = (0.20, 0.18, 0.16)  # n = 2, 3, 4: most frequent n-gram's character share
    k.max_dup_ngram_fraction = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5..10: repeated n-gram share

    c.dedup = d = ml_collections.ConfigDict()
    d.exact = True  # drop exact duplicates (same text after whitespace normalization), keep the first
    d.near = True  # MinHash + LSH near-duplicate detection
    d.near_action = "remove"  # 'remove': keep each cluster's first document | 'keep': keep all, same split
    d.shingle = "word"  # 'word' (runs of words) | 'char' (runs of UTF-8 bytes)
    d.ngram = 5  # words (or bytes) per shingle
    d.num_perm = 128  # MinHash permutations (signature length)
    d.threshold = 0.8  # estimated Jaccard similarity at which two documents are near duplicates
    d.bands = 0  # LSH bands (0: chosen from threshold and num_perm)
    d.rows = 0  # LSH rows per band (with bands; bands * rows <= num_perm)
    d.seed = 0  # permutation seed
    d.report_clusters = 20  # largest clusters listed in manifest.json / report.md

    c.split = s = ml_collections.ConfigDict()
    s.ratios = (0.95, 0.05, 0.0)  # train, val, test shares of documents (by representative hash)
    s.salt = "lmstack"  # hash salt: change it to draw a different split

    c.tokenizer = t = ml_collections.ConfigDict()
    t.kind = "bpe"  # 'bpe' (byte-level BPE trained on the train split) | 'byte' | 'char'
    t.vocab_size = 8192  # 'bpe': all ids including the 11 special tokens
    t.min_frequency = 2  # 'bpe': a merge needs a pair seen this many times

    c.output = o = ml_collections.ConfigDict()
    o.shard_mb = 64.0  # target ArrayRecord shard size (documents never straddle shards)
    return c

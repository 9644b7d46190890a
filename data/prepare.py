"""The data preparation stage: collect -> clean -> deduplicate -> split -> train a tokenizer ->
tokenize -> write shards, manifest.json and report.md (scripts/prepare_data.py is its CLI).

Every input document ends in exactly one place: kept in a split, or counted under a named
reason (collection skips per source, cleaning filters, exact/near duplicates). The manifest
checks that: documents collected == kept + removed. Nothing depends on the clock, the
machine or Python's salted hash(): the same inputs and config give byte-identical outputs.

Splits are assigned by a hash of the cluster representative's text (salted by split.salt):
exact duplicates share the representative's key, and every member of a near-duplicate cluster
takes its representative's split, so no near-duplicate pair straddles train and val/test.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable

import numpy as np

from data import clean, dedup, formats, prepared, report
from data.sources import DataError, ReadStats, Source, in_cwd, is_within, source_documents
from data.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_json_bytes


@dataclasses.dataclass
class Doc:
    source: str  # the config's source name
    where: str  # file[:line] / tfds:name/split:index
    text: str
    record: dict | None = None  # task datasets: the validated record


def source_from_config(sc) -> Source:
    return Source(kind=sc.kind, path=sc.path, text_field=sc.text_field, extensions=tuple(sc.extensions),
                  tfds_split=sc.tfds_split, data_dir=sc.data_dir, max_file_mb=sc.max_file_mb)


def split_unit(key: bytes, salt: str) -> float:
    """Deterministic value in [0, 1) from a document key."""
    digest = hashlib.blake2b(salt.encode("utf-8") + key, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def assign_splits(keys: list[bytes], ratios, salt: str) -> list[str]:
    """'train' / 'val' / 'test' per key, by the configured ratios (normalized to sum 1)."""
    ratios = np.asarray(ratios, np.float64)
    if ratios.shape != (3,) or (ratios < 0).any() or ratios[0] <= 0:
        raise DataError(f"split.ratios={tuple(ratios)} must be three non-negative numbers (train, val, test) "
                        f"with train > 0")
    edges = np.cumsum(ratios / ratios.sum())
    return [prepared.SPLITS[min(int(np.searchsorted(edges, split_unit(k, salt), side="right")), 2)] for k in keys]


class _Phases:
    """Times each phase and prints one progress line per phase with its throughput."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.rows, self._t = log, [], time.perf_counter()

    def done(self, name: str, nbytes: int, detail: str) -> None:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        self.rows.append((name, dt, nbytes))
        self.log(f"[{name:>9}] {dt:6.2f} s  {nbytes / 1e6 / max(dt, 1e-9):7.1f} MB/s  {detail}")


def collect(config, strict: bool) -> tuple[list[Doc], dict]:
    docs, entries = [], {}
    for name, sc in config.sources.items():
        src, stats = source_from_config(sc), ReadStats()
        if config.format == "text":
            docs += [Doc(name, d.source, d.text) for d in source_documents(src, stats, strict=strict)]
        else:
            for where, record in formats.read_records(src, config.format, stats, strict=strict):
                text = formats.record_text(record, config.format)
                stats.chars += len(text)
                docs.append(Doc(name, where, text, record))
        entries[name] = {"kind": src.kind, "path": src.path, "files": stats.files, "documents": stats.documents,
                         "bytes": stats.bytes, "chars": stats.chars, "skipped": dict(sorted(stats.skipped.items()))}
    if not docs:
        raise DataError(f"the sources hold no usable documents: {json.dumps(entries)}")
    return docs, entries


def clean_docs(docs: list[Doc], cfg, fmt: str) -> tuple[list[Doc], dict]:
    """Text datasets: normalize, scrub, filter. Task records are validated, never rewritten."""
    removed: dict[str, int] = {}
    pii = 0
    if fmt != "text":
        return docs, {"removed": {}, "pii_replacements": 0}
    kept = []
    for d in docs:
        text, reason, hits = clean.clean_document(d.text, cfg)
        pii += hits
        if reason:
            removed[reason] = removed.get(reason, 0) + 1
        else:
            kept.append(dataclasses.replace(d, text=text))
    return kept, {"removed": dict(sorted(removed.items())), "pii_replacements": pii}


def deduplicate(docs: list[Doc], cfg) -> tuple[list[Doc], list[int], dict]:
    """Exact then near-duplicate removal. Returns the kept documents, each one's representative
    index into the kept list, and the manifest entry (with the largest clusters)."""
    keys = [dedup.exact_key(d.text) for d in docs]
    first: dict[bytes, int] = {}
    exact_groups: dict[int, list[int]] = {}
    keep_idx = []
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        if j == i or not cfg.exact:
            keep_idx.append(i)
        if j != i:
            exact_groups.setdefault(j, [j]).append(i)
    docs_e = [docs[i] for i in keep_idx]
    reps = list(range(len(docs_e)))
    if not cfg.exact:  # exact duplicates kept: they share their first copy's representative
        pos = {i: n for n, i in enumerate(keep_idx)}
        reps = [pos[first[keys[i]]] for i in keep_idx]
    near_clusters: dict[int, list[int]] = {}
    if cfg.near and len(docs_e) > 1:
        shingles = [dedup.shingle_hashes(d.text, cfg.shingle, cfg.ngram) for d in docs_e]
        sig = dedup.minhash_signatures(shingles, cfg.num_perm, cfg.seed)
        near = dedup.near_duplicate_representatives(sig, cfg.threshold, cfg.bands, cfg.rows)
        reps = [int(near[r]) for r in reps]
        for i, r in enumerate(near.tolist()):
            if r != i:
                near_clusters.setdefault(r, [r]).append(i)
    if cfg.near and cfg.near_action == "remove":
        kept_idx = [i for i, r in enumerate(reps) if r == i]
    elif cfg.near_action in ("remove", "keep"):
        kept_idx = list(range(len(docs_e)))
    else:
        raise DataError(f"dedup.near_action={cfg.near_action!r}: expected 'remove' or 'keep'")
    pos = {i: n for n, i in enumerate(kept_idx)}
    kept = [docs_e[i] for i in kept_idx]
    kept_reps = [pos[reps[i]] for i in kept_idx]
    largest = sorted(near_clusters.values(), key=lambda c: (-len(c), c[0]))[:cfg.report_clusters]
    largest_exact = sorted(exact_groups.values(), key=lambda c: (-len(c), c[0]))[:cfg.report_clusters]
    entry = {
        "exact_duplicates": sum(len(g) - 1 for g in exact_groups.values()),
        "exact_groups": len(exact_groups),
        "exact_removed": len(docs) - len(docs_e),
        "near_clusters": len(near_clusters),
        "near_duplicates": sum(len(c) - 1 for c in near_clusters.values()),
        "near_removed": len(docs_e) - len(kept),
        "largest_exact_groups": [[docs[i].where for i in g] for g in largest_exact],
        "largest_near_clusters": [[docs_e[i].where for i in c] for c in largest],
    }
    return kept, kept_reps, entry


def build_tokenizer(cfg, train_texts: list[str]) -> Tokenizer:
    if cfg.kind == "bpe":
        return BPETokenizer.train(train_texts, cfg.vocab_size, cfg.min_frequency)
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "char":
        return CharTokenizer.from_texts(train_texts)
    raise DataError(f"tokenizer.kind={cfg.kind!r}: expected 'bpe', 'byte' or 'char'")


def encode_all(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tok, BPETokenizer):
        return tok.encode_batch(texts)
    return [tok.encode(t) for t in texts]


def check_config(config) -> None:
    """Threshold values that would silently turn a filter off or make no sense, named with their value."""
    k, d = config.clean, config.dedup
    lengths = {"max_top_ngram_fraction": 3, "max_dup_ngram_fraction": 6}  # n = 2..4, n = 5..10
    for name, n in lengths.items():
        values = tuple(k[name])
        if len(values) != n or not all(0 <= float(v) <= 1 for v in values):
            raise DataError(f"clean.{name}={values}: expected {n} fractions in [0, 1] (one per n-gram size)")
    for name in ("min_alnum_fraction", "max_dup_line_fraction", "max_dup_line_char_fraction"):
        if not 0 <= float(k[name]) <= 1:
            raise DataError(f"clean.{name}={k[name]!r}: expected a fraction in [0, 1]")
    for name in ("min_chars", "max_chars", "min_words"):
        if int(k[name]) < 0:
            raise DataError(f"clean.{name}={k[name]!r}: expected >= 0")
    if not 0 < float(d.threshold) <= 1:
        raise DataError(f"dedup.threshold={d.threshold!r}: expected a Jaccard similarity in (0, 1]")
    for name in ("ngram", "num_perm"):
        if int(d[name]) < 1:
            raise DataError(f"dedup.{name}={d[name]!r}: expected >= 1")
    if not float(config.output.shard_mb) > 0:
        raise DataError(f"output.shard_mb={config.output.shard_mb!r}: expected > 0")


def check_sources(config, out_dir: str) -> None:
    """Every 'files' source names a path that exists (or a glob), said with its config field; --out is not
    inside a source directory (the dataset's manifest.json, report.md and tokenizer.json are text files the
    next preparation of that source would collect as documents)."""
    if not config.sources:
        raise DataError("no sources: add one in the config (c.sources.NAME = source(...)) or use "
                        "--config=configs/data/files.py:PATH")
    for name, sc in config.sources.items():
        if sc.kind != "files":
            continue
        field = f"sources.{name}.path"
        if not sc.path:
            raise DataError(f"{field} is empty: give a file, directory or glob (--config.{field}=PATH, or "
                            f"--config=configs/data/files.py:PATH)")
        path = os.path.expanduser(sc.path)
        if not os.path.exists(path) and not glob.has_magic(path):
            raise DataError(f"{field}={sc.path!r} does not exist{in_cwd(path)}")
        if os.path.isdir(path) and is_within(out_dir, path):
            raise DataError(f"--out={out_dir!r} is inside {field}={sc.path!r}: the dataset's own files (manifest.json, "
                            f"report.md, tokenizer.json) would be collected as documents by the next preparation "
                            f"of that source; write it elsewhere")


def check_out_dir(out_dir: str) -> None:
    """The dataset goes into a new or empty directory: a rerun into an old dataset would leave its extra
    shards beside the new ones, and an output inside a source directory would be collected as data by
    the next run (then the same inputs no longer give the same dataset; check_sources refuses that)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out={out_dir!r} is a file, not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"--out={out_dir!r} is not empty ({len(os.listdir(out_dir))} entries): give a new or empty "
                        f"directory (remove an old dataset first to rebuild it)")


def prepare(config, out_dir: str, *, strict: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs every phase; writes the dataset into out_dir and returns its manifest."""
    if config.format not in ("text",) + formats.FORMATS:
        raise DataError(f"format={config.format!r}: expected 'text' or one of {formats.FORMATS}")
    check_config(config)
    check_sources(config, out_dir)
    check_out_dir(out_dir)
    # Built in a hidden directory beside out_dir and renamed into place at the end: a run that fails
    # (every document cleaned away, an empty val split, a bad record under --strict) writes nothing to --out.
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work_dir, 0o777 & ~umask)  # mkdtemp's 0700 would make the dataset private to this user
    try:
        manifest = _prepare(config, work_dir, out_dir, strict, log)
        os.replace(work_dir, out_dir)  # onto a missing or empty directory (check_out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return manifest


def _prepare(config, out_dir: str, shown_dir: str, strict: bool, log: Callable[[str], None]) -> dict:
    """prepare()'s phases, writing into out_dir (a scratch directory; the log names shown_dir)."""
    phases = _Phases(log)

    docs, source_entries = collect(config, strict)
    in_bytes = sum(e["bytes"] for e in source_entries.values())
    skipped = sum(sum(e["skipped"].values()) for e in source_entries.values())
    phases.done("collect", in_bytes, f"{len(docs)} documents from {len(source_entries)} source(s); "
                                     f"{skipped} files/records skipped")

    nbytes = sum(len(d.text.encode("utf-8")) for d in docs)
    kept, clean_entry = clean_docs(docs, config.clean, config.format)
    phases.done("clean", nbytes, f"{len(kept)} kept, removed {clean_entry['removed'] or 'none'}")
    if not kept:
        raise DataError(f"cleaning removed all {len(docs)} documents ({clean_entry['removed']}): loosen the clean.* "
                        f"thresholds that removed them (clean.min_words counts whitespace-separated words: text "
                        f"in scripts written without spaces has few)")

    nbytes = sum(len(d.text.encode("utf-8")) for d in kept)
    kept, reps, dedup_entry = deduplicate(kept, config.dedup)
    phases.done("dedup", nbytes, f"{len(kept)} kept; {dedup_entry['exact_removed']} exact and "
                                 f"{dedup_entry['near_removed']} near duplicates removed "
                                 f"({dedup_entry['near_clusters']} near clusters)")

    keys = [dedup.exact_key(kept[r].text) for r in reps]
    splits = assign_splits(keys, config.split.ratios, config.split.salt)
    by_split = {s: [i for i, x in enumerate(splits) if x == s] for s in prepared.SPLITS}
    train_texts = [kept[i].text for i in by_split["train"]]
    if not train_texts:
        raise DataError(f"split.ratios={tuple(config.split.ratios)} left no training documents "
                        f"out of {len(kept)}")
    if not by_split["val"] and float(config.split.ratios[1]) > 0:  # train.py needs one: say so now, not there
        raise DataError(f"split.ratios={tuple(config.split.ratios)} put none of the {len(kept)} kept documents "
                        f"in val: splits hold whole documents (a file, or a JSONL record, is one), so a corpus of "
                        f"a few large files needs more of them (split the text into files or records), a larger "
                        f"val share, or another split.salt; a single text file can also be trained on as it is: "
                        f"train.py --config.data.path=FILE --config.data.split=tail")
    tok = build_tokenizer(config.tokenizer, train_texts)
    train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    phases.done("tokenizer", train_bytes, f"{tok.kind}, {tok.vocab_size} ids, trained on the train split "
                                          f"({len(train_texts)} documents)")

    all_texts = [d.text for d in kept]
    ids = encode_all(tok, all_texts)
    nbytes = sum(len(t.encode("utf-8")) for t in all_texts)
    phases.done("tokenize", nbytes, f"{sum(len(x) for x in ids)} tokens")

    dtype = prepared.token_dtype(tok.vocab_size)
    shard_bytes = int(config.output.shard_mb * 2**20)
    split_entries = {}
    unk_id = tok.special_id("<unk>")
    for split in prepared.SPLITS:
        idx = by_split[split]
        records = [kept[i].record for i in idx] if config.format != "text" else None
        entry = prepared.write_split(out_dir, split, [ids[i] for i in idx], dtype, shard_bytes, records)
        entry["tokens"] = int(sum(len(ids[i]) for i in idx))
        # characters a char tokenizer (vocabulary from the train split) does not have: counted, never silent
        entry["unknown_tokens"] = int(sum(np.count_nonzero(ids[i] == unk_id) for i in idx))
        if entry["unknown_tokens"]:
            log(f"warning: {entry['unknown_tokens']} of the {split} split's {entry['tokens']} tokens are <unk> "
                f"(characters the {tok.kind} tokenizer, built from the train split, does not have)")
        entry["bytes"] = int(sum(len(all_texts[i].encode("utf-8")) for i in idx))
        split_entries[split] = entry
    tok_bytes = tokenizer_json_bytes(tok)
    with open(os.path.join(out_dir, prepared.TOKENIZER), "wb") as f:
        f.write(tok_bytes)

    collected = len(docs)
    removed = sum(clean_entry["removed"].values()) + dedup_entry["exact_removed"] + dedup_entry["near_removed"]
    assert collected == len(kept) + removed, (collected, len(kept), removed)
    manifest = {
        "format_version": 1,
        "format": config.format,
        "sources": source_entries,
        "documents": {"collected": collected, "kept": len(kept), "removed": removed},
        "cleaning": clean_entry,
        "dedup": dedup_entry,
        "splits": split_entries,
        "token_dtype": dtype.str,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size,
                      "sha256": hashlib.sha256(tok_bytes).hexdigest(), "file": prepared.TOKENIZER},
        "config": json.loads(config.to_json()),
    }
    with open(os.path.join(out_dir, prepared.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report.render(manifest))
    total = sum(e["bytes"] for e in split_entries.values())
    phases.done("write", total, f"{sum(len(e['shards']) for e in split_entries.values())} shards -> {shown_dir}")
    manifest["_timings"] = [{"phase": n, "seconds": dt, "bytes": b} for n, dt, b in phases.rows]
    return manifest

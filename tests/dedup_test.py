"""Deduplication (exact, MinHash + LSH) and the leakage-free split."""

import random
import string

import numpy as np
import pytest

from configs.data import common
from data import dedup, prepare
from data.prepare import Doc

RNG = random.Random(1)


def _words(n, rng=RNG):
    return [("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))) for _ in range(n)]


def _text(n=400, rng=RNG):
    words = _words(n, rng)
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, n, 12)) + "\n"


def _mutate(text, frac, rng):
    """Replace `frac` of the words: word-5-gram Jaccard drops roughly like (1-frac)**5."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * frac)):
        words[i] = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
    return " ".join(words)


def test_exact_key_ignores_whitespace_only():
    assert dedup.exact_key("a  b\n\tc\n") == dedup.exact_key("a b c")
    assert dedup.exact_key("a b c") != dedup.exact_key("a b  d")
    assert dedup.exact_key("A b c") != dedup.exact_key("a b c")


def test_shingles_are_content_hashes():
    a = dedup.shingle_hashes("one two three four five six", "word", 3)
    b = dedup.shingle_hashes("zero   one two three four five six", "word", 3)
    assert len(a) == 4 and len(np.intersect1d(a, b)) == 4 and len(b) == 5
    assert len(dedup.shingle_hashes("short", "word", 5)) == 1  # fewer words than n: one shingle
    assert len(dedup.shingle_hashes("abcdefg", "char", 3)) == 5
    assert len(dedup.shingle_hashes("", "char", 3)) == 1
    c = dedup.shingle_hashes("ab" * 50, "char", 4)
    assert len(c) == 2  # "abab" and "baba"
    with pytest.raises(ValueError, match="shingle"):
        dedup.shingle_hashes("x", "line", 3)


def test_minhash_estimates_jaccard():
    rng = random.Random(3)
    base = _text(2000, rng)
    other = _mutate(base, 0.05, rng)
    a, b = dedup.shingle_hashes(base), dedup.shingle_hashes(other)
    sig = dedup.minhash_signatures([a, b], num_perm=256, seed=0)
    assert sig.shape == (2, 256) and sig.dtype == np.uint64
    assert abs(dedup.estimated_jaccard(sig[0], sig[1]) - dedup.jaccard(a, b)) < 0.08
    again = dedup.minhash_signatures([a, b], num_perm=256, seed=0)
    np.testing.assert_array_equal(sig, again)


def test_lsh_params():
    bands, rows = dedup.lsh_params(0.8, 128)
    assert bands * rows <= 128 and rows > 1
    # the candidate probability is low well below the threshold and high well above it
    p = lambda s: 1 - (1 - s ** rows) ** bands
    assert p(0.5) < 0.1 and p(0.95) > 0.99


def test_near_duplicates_found_and_unrelated_kept():
    rng = random.Random(7)
    originals = [_text(600, rng) for _ in range(30)]
    docs = list(originals)
    docs.append(_mutate(originals[3], 0.01, rng))  # 30: near copy of 3
    docs.append(_mutate(originals[3], 0.01, rng))  # 31: another one
    docs.append(_mutate(originals[10], 0.01, rng))  # 32: near copy of 10
    docs.append(_mutate(originals[20], 0.6, rng))  # 33: mostly rewritten: not a duplicate
    sig = dedup.minhash_signatures([dedup.shingle_hashes(d) for d in docs], 128, 0)
    rep = dedup.near_duplicate_representatives(sig, 0.8)
    expected = np.arange(len(docs))
    expected[[30, 31]] = 3
    expected[32] = 10
    np.testing.assert_array_equal(rep, expected)


def _cfg(**dedup_overrides):
    c = common.base()
    for k, v in dedup_overrides.items():
        c.dedup[k] = v
    return c


def test_deduplicate_exact_and_near():
    rng = random.Random(11)
    texts = [_text(500, rng) for _ in range(12)]
    docs = [Doc("s", f"d{i}", t) for i, t in enumerate(texts)]
    docs.append(Doc("s", "exact-of-2", texts[2].replace(" ", "  ")))
    docs.append(Doc("s", "near-of-5", _mutate(texts[5], 0.01, rng)))
    kept, reps, entry = prepare.deduplicate(docs, _cfg().dedup)
    assert [d.where for d in kept] == [f"d{i}" for i in range(12)]
    assert reps == list(range(12))
    assert entry["exact_removed"] == 1 and entry["near_removed"] == 1 and entry["near_clusters"] == 1
    assert entry["largest_exact_groups"] == [["d2", "exact-of-2"]]
    assert entry["largest_near_clusters"] == [["d5", "near-of-5"]]

    kept, reps, entry = prepare.deduplicate(docs, _cfg(near_action="keep").dedup)
    assert len(kept) == 13 and reps[12] == 5 and entry["near_removed"] == 0
    kept, reps, entry = prepare.deduplicate(docs, _cfg(near=False, exact=False).dedup)
    assert len(kept) == 14 and reps[12] == 2 and reps[13] == 13


def test_split_is_deterministic_with_ratios():
    keys = [dedup.exact_key(f"document {i}") for i in range(3000)]
    splits = prepare.assign_splits(keys, (0.8, 0.1, 0.1), "s")
    assert splits == prepare.assign_splits(keys, (0.8, 0.1, 0.1), "s")
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert abs(counts["train"] / 3000 - 0.8) < 0.03 and abs(counts["test"] / 3000 - 0.1) < 0.02
    assert prepare.assign_splits(keys, (0.8, 0.1, 0.1), "other salt") != splits
    assert "test" not in prepare.assign_splits(keys, (0.9, 0.1, 0.0), "s")
    # a content hash (not Python's salted hash()): the same on every process and machine
    assert splits[:12] == ["train"] * 10 + ["test", "train"]
    with pytest.raises(ValueError, match="ratios"):
        prepare.assign_splits(keys, (0.0, 0.5, 0.5), "s")


def test_near_duplicate_clusters_never_straddle_splits():
    """Planted near-duplicates kept (near_action='keep'): every cluster lands in one split, even
    though its members alone would hash to different splits."""
    rng = random.Random(5)
    texts, cluster_of = [], []
    for c in range(40):
        base = _text(400, rng)
        for _ in range(4):
            texts.append(_mutate(base, 0.005, rng))
            cluster_of.append(c)
    docs = [Doc("s", f"d{i}", t) for i, t in enumerate(texts)]
    kept, reps, entry = prepare.deduplicate(docs, _cfg(near_action="keep").dedup)
    assert len(kept) == len(docs) and entry["near_clusters"] == 40
    keys = [dedup.exact_key(kept[r].text) for r in reps]
    splits = prepare.assign_splits(keys, (0.5, 0.25, 0.25), "s")
    for c in range(40):
        assert len({s for s, k in zip(splits, cluster_of) if k == c}) == 1
    alone = prepare.assign_splits([dedup.exact_key(t) for t in texts], (0.5, 0.25, 0.25), "s")
    assert any(len({s for s, k in zip(alone, cluster_of) if k == c}) > 1 for c in range(40))
    assert len(set(splits)) == 3

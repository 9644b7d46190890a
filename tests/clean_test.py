"""Cleaning: normalization, every quality filter and PII scrubbing on hand-made cases."""

import random
import string
import unicodedata

import pytest

from configs.data import common
from data import clean


def cfg(**overrides):
    c = common.base().clean
    for k, v in overrides.items():
        c[k] = v
    return c


# ---------------------------------------------------------------- normalization

def test_normalize_nfc_newlines_controls_spaces():
    decomposed = "Cafe\u0301"  # e + combining acute
    assert not unicodedata.is_normalized("NFC", decomposed)
    out = clean.normalize(f"\ufeff{decomposed}\r\nline\x00two\x07\rthree\x85four\u2028five\u00a0six\u3000x  \t\n")
    assert out == "Caf\u00e9\nlinetwo\nthree\nfour\nfive six x\n"
    assert unicodedata.is_normalized("NFC", out)


def test_normalize_keeps_tabs_and_indentation_caps_blank_lines():
    text = "\n\n\ndef f():\n\tif x:   \n        return 1\n\n\n\n\n\nz = 2\n\n\n"
    assert clean.normalize(text) == "def f():\n\tif x:\n        return 1\n\n\nz = 2\n"
    assert clean.normalize(text, max_blank_lines=0) == "def f():\n\tif x:\n        return 1\nz = 2\n"
    assert clean.normalize(text, max_blank_lines=-1, strip_trailing=False).count("\n\n\n\n\n\n") == 1
    assert clean.normalize("x   ", strip_trailing=False) == "x   \n"


def test_normalize_idempotent_and_empty():
    text = "a\u0301 b\r\n\r\n\r\n\r\nc\x1b[0m"
    once = clean.normalize(text)
    assert clean.normalize(once) == once
    assert clean.normalize("") == "" and clean.normalize(" \n\x00\n\r\n") == ""


# ---------------------------------------------------------------- measures

def test_mean_line_length():
    assert clean.mean_line_length("abc\ndefgh\n") == 10 / 2
    assert clean.mean_line_length("abc\ndefgh") == 9 / 2
    assert clean.mean_line_length("") == 0.0
    assert clean.mean_line_length("x" * 1000) == 1000


def test_alnum_fraction():
    assert clean.alnum_fraction("abc123") == 1.0
    assert clean.alnum_fraction("a_b-c d") == 4 / 7  # underscore is not alphanumeric
    assert clean.alnum_fraction("日本語!") == 0.75
    assert clean.alnum_fraction("") == 0.0 and clean.alnum_fraction("!!!") == 0.0


def test_duplicate_line_fractions():
    text = "aa\nbbbb\n\n\naa\n  aa  \ncc\n"  # non-blank: aa, bbbb, aa, aa, cc -> 2 repeats
    lines, chars = clean.duplicate_line_fractions(text)
    assert lines == 2 / 5
    assert chars == 4 / (2 + 4 + 2 + 2 + 2)
    assert clean.duplicate_line_fractions("a\n\n\n\nb\n") == (0.0, 0.0)  # blank lines never count
    assert clean.duplicate_line_fractions("") == (0.0, 0.0)


def test_top_ngram_fraction():
    words = "the cat sat on the cat mat".split()
    # "the cat" occurs twice: 2 * 6 of the 20 word characters
    assert clean.top_ngram_fraction(words, 2) == pytest.approx(12 / 20)
    assert clean.top_ngram_fraction("a b c d".split(), 2) == 0.0  # nothing repeats
    assert clean.top_ngram_fraction(["x"], 2) == 0.0
    # ties broken by the most characters: "aa b", "b c" and "c d" all twice
    assert clean.top_ngram_fraction("aa b c d aa b c d".split(), 2) == pytest.approx(2 * 3 / 10)


def test_duplicate_ngram_fraction():
    words = "a b c d e a b c d e f".split()
    # the second "a b c d e" repeats the first: 5 of 11 characters
    assert clean.duplicate_ngram_fraction(words, 5) == pytest.approx(5 / 11)
    assert clean.duplicate_ngram_fraction(words, 6) == 0.0
    assert clean.duplicate_ngram_fraction("one two three four five six".split(), 5) == 0.0
    # overlapping repeats count each word once: every word after the first is in a repeat
    assert clean.duplicate_ngram_fraction(["z"] * 10, 5) == pytest.approx(9 / 10)


def test_ngram_keys_exact_for_big_vocabularies():
    import numpy as np
    ids = np.arange(100_000, dtype=np.uint64)  # > 2**12 ids: the hashed path
    ids = np.concatenate([ids, ids[:10]])
    words = [str(i) for i in ids.tolist()]
    assert clean.duplicate_ngram_fraction(words, 10, ids) > 0
    assert clean.top_ngram_fraction(words, 2, ids) > 0


# ---------------------------------------------------------------- PII

def test_scrub_pii():
    text = "Mail jane.doe+x@mail.example.org or ops@host.io; ping 192.168.1.20 and 10.0.0.1."
    out, n = clean.scrub_pii(text)
    assert out == "Mail [email] or [email]; ping [ip] and [ip]."
    assert n == 4
    keep = "version 1.2.3.4.5, 999.1.1.1, user@localhost, x@y, 3.14"
    assert clean.scrub_pii(keep) == (keep, 0)
    assert clean.scrub_pii(text, emails=False, ips=False) == (text, 0)
    assert clean.scrub_pii(text, ips=False)[0] == "Mail [email] or [email]; ping 192.168.1.20 and 10.0.0.1."


# ---------------------------------------------------------------- the filter chain

_RNG = random.Random(0)
PROSE = " ".join("".join(_RNG.choice(string.ascii_lowercase) for _ in range(_RNG.randint(3, 8)))
                 for _ in range(300)) + "\n"  # 300 varied words: no n-gram repeats
LOOSE = dict(min_chars=10, min_words=3, max_top_ngram_fraction=(1, 1, 1), max_dup_ngram_fraction=(1,) * 6)


@pytest.mark.parametrize("text,overrides,reason", [
    ("tiny", {}, "too short"),
    ("x" * 500, dict(max_chars=100), "too long"),
    ("a\n" * 300, dict(min_chars=10), "short lines"),
    ("word " * 300, dict(min_chars=10, max_mean_line_length=100), "long lines"),
    ("!? " * 100 + "\n", dict(LOOSE, min_mean_line_length=1), "low alphanumeric"),
    ("same line here\n" * 20 + "other\n", dict(LOOSE), "dup lines"),
    ("a b c\n" * 2 + "d\n", dict(min_chars=1, min_mean_line_length=1, max_dup_line_fraction=1,
                                 max_dup_line_char_fraction=1), "too few words"),
])
def test_quality_reason(text, overrides, reason):
    assert clean.quality_reason(text, cfg(**overrides)) == reason


def test_quality_reason_ngram_filters():
    one_line = dict(max_mean_line_length=0)  # these texts are single lines
    rep = ("alpha beta " * 100) + PROSE
    assert clean.quality_reason(rep, cfg(**one_line)) == "top 2-gram"
    tri = ("one two three " * 50) + PROSE
    assert clean.quality_reason(tri, cfg(max_top_ngram_fraction=(1, 0.18, 0.16), **one_line)) == "top 3-gram"
    quad = ("un deux trois quatre " * 40) + PROSE
    assert clean.quality_reason(quad, cfg(max_top_ngram_fraction=(1, 1, 0.16), **one_line)) == "top 4-gram"
    repeated = " ".join(f"w{i}" for i in range(12)) + " "
    no_top = dict(max_top_ngram_fraction=(1, 1, 1), **one_line)
    assert clean.quality_reason(repeated * 20 + PROSE, cfg(**no_top)) == "dup 5-grams"
    only_10 = cfg(max_dup_ngram_fraction=(1, 1, 1, 1, 1, 0.1), **no_top)
    assert clean.quality_reason(repeated * 20 + PROSE, only_10) == "dup 10-grams"
    assert clean.quality_reason(PROSE, cfg(**one_line)) is None


def test_huge_single_line_is_rejected_cheaply():
    text = "x" * 20_000_000  # stands in for a 100 MB single line: rejected by length, nothing counted
    assert clean.quality_reason(text, cfg()) == "too long"
    assert clean.quality_reason(text, cfg(max_chars=0)) == "long lines"


def test_clean_document():
    c = cfg(scrub_emails=True, min_chars=10, min_words=3)
    text, reason, hits = clean.clean_document("Write to a@b.org\r\nplease, says the note.  \n", c)
    assert (text, reason, hits) == ("Write to [email]\nplease, says the note.\n", None, 1)
    assert clean.clean_document("\x00\x01  \r\n", c) == (None, "empty after cleaning", 0)
    assert clean.clean_document("short", c)[1] == "too short"

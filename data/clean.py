"""Cleaning: text normalization, quality filters (Gopher-style) and PII scrubbing.

Every measure is a small pure function of the text (or its whitespace-split words) returning a
number; `quality_reason(text, cfg)` compares them with the thresholds in `config.clean` and
names the first filter a document fails ('too short', 'dup 5-grams', ...), cheapest first, so
a 100 MB single-line document is rejected by its length before any n-gram is counted.

Definitions (after Rae et al. 2021, "Gopher", appendix A; fractions of characters count the
characters of whitespace-split words):
- mean line length: characters / lines.
- alphanumeric fraction: alphanumeric characters / all characters.
- duplicate-line fraction: non-blank lines that repeat an earlier line / non-blank lines; and
  the characters in them / characters in non-blank lines. Blank lines never count: code is
  full of them.
- top n-gram fraction (n = 2, 3, 4): characters in all occurrences of the most frequent word
  n-gram (if it occurs more than once) / all word characters.
- duplicate n-gram fraction (n = 5..10): characters of words covered by a later occurrence of
  an n-gram seen earlier in the document / all word characters.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

# C0/C1 controls except \t and \n (\r is handled first), DEL, and the byte-order mark.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Unicode spaces other than ' ' (no-break, em, ideographic, ...) become ' '.
_SPACES_RE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_SEPS_RE = re.compile("[\x85\u2028\u2029]")
_TRAILING_WS_RE = re.compile(r"[ \t]+$", re.MULTILINE)
_NOT_ALNUM_RE = re.compile(r"[\W_]+")
EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
EMAIL_PLACEHOLDER = "[email]"
IP_PLACEHOLDER = "[ip]"


# ------------------------------------------------------------------------------- normalization

def normalize(text: str, *, strip_trailing: bool = True, max_blank_lines: int = 2) -> str:
    """NFC; CR/CRLF/NEL/U+2028/U+2029 -> '\\n'; control characters (but \\t, \\n) and BOMs removed;
    exotic spaces -> ' '; trailing spaces stripped per line; runs of blank lines capped at
    `max_blank_lines` (< 0: uncapped); no leading blank lines; exactly one final '\\n' (or '')."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_SEPS_RE.sub("\n", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL_RE.sub("", text)
    text = _SPACES_RE.sub(" ", text)
    if strip_trailing:
        text = _TRAILING_WS_RE.sub("", text)
    if max_blank_lines >= 0:
        text = re.sub("\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    text = text.lstrip("\n").rstrip("\n")
    return text + "\n" if text else ""


def scrub_pii(text: str, *, emails: bool = True, ips: bool = True) -> tuple[str, int]:
    """Emails -> '[email]', IPv4 addresses -> '[ip]'; returns (text, replacements)."""
    n = 0
    if emails and "@" in text:
        text, k = EMAIL_RE.subn(EMAIL_PLACEHOLDER, text)
        n += k
    if ips:
        text, k = IPV4_RE.subn(IP_PLACEHOLDER, text)
        n += k
    return text, n


# ------------------------------------------------------------------------------- measures

def mean_line_length(text: str) -> float:
    lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    return len(text) / max(lines, 1)


def alnum_fraction(text: str) -> float:
    if not text:
        return 0.0
    return len(_NOT_ALNUM_RE.sub("", text)) / len(text)


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(repeated non-blank lines / non-blank lines, their characters / non-blank characters)."""
    seen: set[str] = set()
    n_lines = dup_lines = chars = dup_chars = 0
    for line in text.split("\n"):
        key = line.strip()
        if not key:
            continue
        n_lines += 1
        chars += len(key)
        if key in seen:
            dup_lines += 1
            dup_chars += len(key)
        else:
            seen.add(key)
    if not n_lines:
        return 0.0, 0.0
    return dup_lines / n_lines, dup_chars / max(chars, 1)


def word_ids(words: list[str]) -> np.ndarray:
    """Per-document word ids (first-occurrence order): equal words, equal ids."""
    table: dict[str, int] = {}
    return np.array([table.setdefault(w, len(table)) for w in words], np.uint64)


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per word n-gram: exact while ids < 2**(64 // n), else a polynomial hash."""
    m = len(ids) - n + 1
    bits = 64 // n
    if len(ids) and int(ids.max()) < (1 << bits):
        keys = np.zeros(m, np.uint64)
        for k in range(n):
            keys = (keys << np.uint64(bits)) | ids[k:k + m]
        return keys
    keys = np.zeros(m, np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    for k in range(n):
        keys = keys * mult + ids[k:k + m] + np.uint64(1)
    return keys


def top_ngram_fraction(words: list[str], n: int, ids: np.ndarray | None = None) -> float:
    """Characters in all occurrences of the most frequent word n-gram / all word characters."""
    if len(words) < n:
        return 0.0
    ids = word_ids(words) if ids is None else ids
    keys = _ngram_keys(ids, n)
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if counts.max() < 2:
        return 0.0
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    top = counts.max()
    # ties: the most characters among the most frequent
    starts = first[counts == top]
    span_chars = max(int(lengths[s:s + n].sum()) for s in starts)
    return top * span_chars / max(int(lengths.sum()), 1)


def duplicate_ngram_fraction(words: list[str], n: int, ids: np.ndarray | None = None) -> float:
    """Characters of words covered by repeated (non-first) occurrences of word n-grams / all."""
    if len(words) < n:
        return 0.0
    ids = word_ids(words) if ids is None else ids
    keys = _ngram_keys(ids, n)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    repeat_starts = np.flatnonzero(first[inverse] != np.arange(len(keys)))
    if not len(repeat_starts):
        return 0.0
    delta = np.zeros(len(words) + 1, np.int64)
    np.add.at(delta, repeat_starts, 1)
    np.add.at(delta, repeat_starts + n, -1)
    covered = np.cumsum(delta[:-1]) > 0
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    return float(lengths[covered].sum()) / max(int(lengths.sum()), 1)


# ------------------------------------------------------------------------------- the filter

def quality_reason(text: str, cfg) -> str | None:
    """The first quality filter `text` fails (a reason name), or None. `cfg` is `config.clean`."""
    n = len(text)
    if n < cfg.min_chars:
        return "too short"
    if cfg.max_chars and n > cfg.max_chars:
        return "too long"
    mll = mean_line_length(text)
    if mll < cfg.min_mean_line_length:
        return "short lines"
    if cfg.max_mean_line_length and mll > cfg.max_mean_line_length:
        return "long lines"
    if alnum_fraction(text) < cfg.min_alnum_fraction:
        return "low alphanumeric"
    line_frac, line_char_frac = duplicate_line_fractions(text)
    if line_frac > cfg.max_dup_line_fraction or line_char_frac > cfg.max_dup_line_char_fraction:
        return "dup lines"
    words = text.split()
    if len(words) < cfg.min_words:
        return "too few words"
    ids = word_ids(words)
    for k, limit in zip((2, 3, 4), cfg.max_top_ngram_fraction):
        if top_ngram_fraction(words, k, ids) > limit:
            return f"top {k}-gram"
    for k, limit in zip(range(5, 11), cfg.max_dup_ngram_fraction):
        if duplicate_ngram_fraction(words, k, ids) > limit:
            return f"dup {k}-grams"
    return None


def clean_document(text: str, cfg) -> tuple[str | None, str | None, int]:
    """normalize -> PII scrub -> quality filters: (clean text or None, reason or None, PII hits)."""
    if cfg.normalize:
        text = normalize(text, strip_trailing=cfg.strip_trailing_whitespace, max_blank_lines=cfg.max_blank_lines)
    if not text.strip():
        return None, "empty after cleaning", 0
    hits = 0
    if cfg.scrub_emails or cfg.scrub_ips:
        text, hits = scrub_pii(text, emails=cfg.scrub_emails, ips=cfg.scrub_ips)
    reason = quality_reason(text, cfg)
    return (None, reason, hits) if reason else (text, None, hits)

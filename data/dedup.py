"""Deduplication: exact (hash of whitespace-normalized text) and near-duplicate (MinHash + LSH).

Why a hand-written numpy MinHash rather than `datasketch`: datasketch hashes every shingle
with a Python call (sha1 per shingle) and updates one `MinHash` object per document: the
stdlib corpus's word shingles alone would not fit in the preparation's time budget (README, Data
preparation), and it adds a dependency. Here a document's shingle
hashes come from prefix sums over its UTF-8 bytes (no Python loop per shingle), and each of
the `num_perm` permutations is two vectorized passes over all shingles of the corpus at once
plus one `np.minimum.reduceat`. Deterministic: no salted `hash()`, fixed seeds.

Shingles are taken from the whitespace-normalized text (`" ".join(text.split())`): 'word'
shingles are runs of `ngram` words, 'char' shingles runs of `ngram` bytes. A shingle's hash is
a polynomial hash mod 2**64 finished by the splitmix64 mixer. Permutation p maps a hash x to
((x ^ b_p) * a_p) with a_p odd (a bijection of uint64) followed by an xor-shift; the
signature is the minimum per permutation.

LSH: the signature is cut into `bands` bands of `rows` rows (chosen to minimise the false
positive + false negative probability mass around `threshold` unless configured). Documents
that agree on every row of some band are candidates; a candidate pair joins a cluster when
the signatures agree on at least `threshold` of all permutations (the MinHash estimate of
their Jaccard similarity). Clusters are the connected components (union-find); each cluster's
representative is its first document in input order.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)  # odd, so invertible mod 2**64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 2**64))


def normalized_for_dedup(text: str) -> str:
    return " ".join(text.split())


def exact_key(text: str) -> bytes:
    """16-byte digest of the whitespace-normalized text: equal keys = exact duplicates."""
    return hashlib.blake2b(normalized_for_dedup(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


_POW_CACHE: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE_INV**i for i < n (cached, grown geometrically)."""
    have = _POW_CACHE.get("fwd")
    if have is None or len(have) < n:
        size = max(n, 2 * (0 if have is None else len(have)), 1 << 16)
        _POW_CACHE["fwd"] = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _BASE, np.uint64))])
        _POW_CACHE["inv"] = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _BASE_INV, np.uint64))])
    return _POW_CACHE["fwd"][:n], _POW_CACHE["inv"][:n]


def _span_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Position-independent polynomial hashes of data[s:e] for each span (then mixed)."""
    n = len(data)
    fwd, inv = _powers(n + 1)
    # prefix[j] = sum_{t<j} (data[t] + 1) * BASE_INV**t ; span hash = (prefix[e] - prefix[s]) * BASE**s
    prefix = np.zeros(n + 1, np.uint64)
    np.cumsum((data.astype(np.uint64) + np.uint64(1)) * inv[:n], out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * fwd[starts] + (ends - starts).astype(np.uint64)
    return _mix(h)


def shingle_hashes(text: str, kind: str = "word", ngram: int = 5) -> np.ndarray:
    """uint64 hashes of the document's shingles (unique, sorted); at least one per document."""
    norm = normalized_for_dedup(text)
    data = np.frombuffer(norm.encode("utf-8", "surrogatepass"), np.uint8)
    if kind == "char":
        if len(data) <= ngram:
            starts = np.zeros(1, np.int64)
            ends = np.array([len(data)], np.int64)
        else:
            starts = np.arange(len(data) - ngram + 1, dtype=np.int64)
            ends = starts + ngram
    elif kind == "word":
        spaces = np.flatnonzero(data == 32)
        word_starts = np.concatenate([[0], spaces + 1]).astype(np.int64)
        word_ends = np.concatenate([spaces, [len(data)]]).astype(np.int64)
        k = min(ngram, len(word_starts))
        starts = word_starts[:len(word_starts) - k + 1]
        ends = word_ends[k - 1:]
    else:
        raise ValueError(f"dedup.shingle={kind!r}: expected 'word' or 'char'")
    return np.unique(_span_hashes(data, starts, ends))


def permutation_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(shingles: list[np.ndarray], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """[documents, num_perm] uint64 MinHash signatures, all documents at once."""
    if not shingles:
        return np.zeros((0, num_perm), np.uint64)
    lengths = np.array([len(s) for s in shingles], np.int64)
    if (lengths == 0).any():
        raise ValueError("every document needs at least one shingle")
    flat = np.concatenate(shingles)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    a, b = permutation_params(num_perm, seed)
    sig = np.empty((len(shingles), num_perm), np.uint64)
    tmp = np.empty_like(flat)
    for p in range(num_perm):
        np.bitwise_xor(flat, b[p], out=tmp)
        np.multiply(tmp, a[p], out=tmp)
        np.bitwise_xor(tmp, tmp >> np.uint64(29), out=tmp)
        sig[:, p] = np.minimum.reduceat(tmp, offsets)
    return sig


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimising the area of false positives below the
    threshold plus false negatives above it, for P(candidate | s) = 1 - (1 - s**rows)**bands."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = 1.0 - (1.0 - s ** rows) ** bands
        cost = np.trapezoid(np.where(s < threshold, p, 1.0 - p), s)
        if cost < best_cost - 1e-12:
            best, best_cost = (bands, rows), cost
    return best


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index stays the root: the representative is the first document
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_representatives(sig: np.ndarray, threshold: float, bands: int = 0, rows: int = 0) -> np.ndarray:
    """rep[i] = index of the first document of i's near-duplicate cluster (rep[i] == i: alone/first)."""
    n, num_perm = sig.shape
    if not bands:
        bands, rows = lsh_params(threshold, num_perm)
    if bands * rows > num_perm or bands < 1 or rows < 1:
        raise ValueError(f"dedup bands={bands} x rows={rows} does not fit num_perm={num_perm}")
    uf = _UnionFind(n)
    need = int(np.ceil(threshold * num_perm - 1e-9))
    checked: set[tuple[int, int]] = set()
    for band in range(bands):
        cols = sig[:, band * rows:(band + 1) * rows]
        key = np.zeros(n, np.uint64)
        for c in range(rows):
            key = _mix(key ^ cols[:, c])
        order = np.argsort(key, kind="stable")
        sorted_keys = key[order]
        bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
        for group in np.split(order, bounds):
            if len(group) < 2:
                continue
            group = np.sort(group)
            for x in range(len(group)):
                i = int(group[x])
                others = group[x + 1:] if len(group) <= 64 else group[x + 1:x + 2]
                for j in others.tolist():
                    if (i, j) in checked or uf.find(i) == uf.find(j):
                        continue
                    checked.add((i, j))
                    if int((sig[i] == sig[j]).sum()) >= need:
                        uf.union(i, j)
    return np.array([uf.find(i) for i in range(n)], np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float((sig_a == sig_b).mean())


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle-hash arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0

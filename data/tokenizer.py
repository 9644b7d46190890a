"""Tokenizers: byte-level (default, fixed 256 + specials) and character-level (built from text).

Every tokenizer reserves the same special tokens after its base vocabulary, so later stages
(MLM, SFT chat templates, ...) find them. A tokenizer is saved as JSON with the run
(`WORKDIR/tokenizer.json`) and loaded back from it.
"""

from __future__ import annotations

import json

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "<sep>", "<cls>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer:
    """Base vocabulary ids [0, base_size), then SPECIALS."""
    kind: str
    base_size: int

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(SPECIALS)

    def special_id(self, token: str) -> int:
        return self.base_size + SPECIALS.index(token)

    @property
    def eos_id(self) -> int:
        return self.special_id("<eos>")

    @property
    def pad_id(self) -> int:
        return self.special_id("<pad>")

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_json(self) -> dict:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    kind = "byte"
    base_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a char tokenizer needs at least one character")
        self.chars = "".join(sorted(set(chars)))
        self.base_size = len(self.chars)
        self._codepoints = np.array([ord(c) for c in self.chars], np.int64)

    @classmethod
    def from_texts(cls, texts) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(seen))

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        idx = np.searchsorted(self._codepoints, cps)
        idx = np.minimum(idx, self.base_size - 1)
        known = self._codepoints[idx] == cps
        return np.where(known, idx, self.special_id("<unk>")).astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if 0 <= int(i) < self.base_size)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


def tokenizer_from_json(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in tokenizer spec (expected 'byte' or 'char')")


def build_tokenizer(kind: str, train_texts) -> Tokenizer:
    """data.tokenizer -> a tokenizer; 'char' builds its vocabulary from the training texts."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_texts(train_texts)
    raise ValueError(f"data.tokenizer={kind!r}: expected 'byte' or 'char'")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    with open(path, "w") as f:
        json.dump(tok.to_json(), f)


def load_tokenizer(path: str) -> Tokenizer:
    with open(path) as f:
        return tokenizer_from_json(json.load(f))

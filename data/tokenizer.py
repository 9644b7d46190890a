"""Tokenizers: byte-level (default, fixed 256 + specials), character-level (built from text) and
byte-level BPE (trained by scripts/prepare_data.py with Hugging Face `tokenizers`).

Why `tokenizers` byte-level BPE rather than SentencePiece: byte-level BPE is lossless by
construction (decode(encode(x)) == x for every Unicode string; SentencePiece maps a literal
U+2581 to a space and needs byte fallback plus five normalization options to get close), and
its pre-tokenizer keeps runs of spaces and newlines together, which on source code gives fewer
tokens than a SentencePiece BPE of the same vocabulary, for the same training time (README, Data
preparation).

Every tokenizer reserves the same special tokens after its base vocabulary, so later stages
(MLM, SFT chat templates, ...) find them. A tokenizer is saved as JSON with the run
(`WORKDIR/tokenizer.json`) and loaded back from it.
"""

from __future__ import annotations

import json

import numpy as np
import tokenizers as hf

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

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], char offsets [N, 2]): token i stands for text[start:end] (extractive QA). A token
        holding part of a multi-byte character covers that whole character."""
        raise NotImplementedError

    def to_json(self) -> dict:
        raise NotImplementedError

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for ([vocab_size] int; specials 0): bits-per-byte accounting."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    kind = "byte"
    base_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(text)
        char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
        return ids, np.stack([char_of_byte, char_of_byte + 1], axis=1).astype(np.int32).reshape(-1, 2)

    def to_json(self) -> dict:
        return {"kind": "byte"}

    def byte_lengths(self) -> np.ndarray:
        return np.concatenate([np.ones(256, np.int64), np.zeros(len(SPECIALS), np.int64)])


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

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(len(text), dtype=np.int32)
        return self.encode(text), np.stack([i, i + 1], axis=1).reshape(-1, 2)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    def byte_lengths(self) -> np.ndarray:
        lengths = [len(c.encode("utf-8", "surrogatepass")) for c in self.chars]
        return np.array(lengths + [0] * len(SPECIALS), np.int64)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalizer): ids [0, base_size) are the 256
    byte symbols and the learned merges; SPECIALS follow and are never produced from text (a
    literal "<eos>" in a document is encoded as ordinary bytes)."""
    kind = "bpe"

    def __init__(self, hf_tokenizer: "hf.Tokenizer"):
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True  # not serialized by `tokenizers`: set on every load
        self.base_size = hf_tokenizer.get_vocab_size(with_added_tokens=False)
        ids = [hf_tokenizer.token_to_id(t) for t in SPECIALS]
        expected = list(range(self.base_size, self.base_size + len(SPECIALS)))
        if ids != expected:
            raise ValueError(f"BPE tokenizer: special tokens {SPECIALS} have ids {ids}, expected {expected}")

    @classmethod
    def train(cls, texts, vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges on `texts` until vocab_size ids in all (including SPECIALS) or no pair
        occurs `min_frequency` times. Deterministic for the same texts."""
        base = vocab_size - len(SPECIALS)
        if base < 256:
            raise ValueError(f"tokenizer.vocab_size={vocab_size} leaves {base} ids for bytes and merges; "
                             f"it must be at least {256 + len(SPECIALS)}")
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(vocab_size=base, min_frequency=min_frequency, show_progress=False,
                                         initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        tok.add_special_tokens(list(SPECIALS))
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many documents at once (parallel in Rust)."""
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int32).reshape(-1, 2)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.base_size])

    def to_json(self) -> dict:
        return {"kind": "bpe", "tokenizers": json.loads(self._tok.to_str())}

    def byte_lengths(self) -> np.ndarray:
        # byte-level tokens spell each byte with one printable character
        lengths = np.zeros(self.vocab_size, np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            lengths[i] = len(token)
        return lengths


def tokenizer_from_json(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "bpe":
        return BPETokenizer(hf.Tokenizer.from_str(json.dumps(spec["tokenizers"])))
    raise ValueError(f"unknown tokenizer kind {kind!r} in tokenizer spec (expected 'byte', 'char' or 'bpe')")


def build_tokenizer(kind: str, train_texts) -> Tokenizer:
    """data.tokenizer -> a tokenizer; 'char' builds its vocabulary from the training texts."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_texts(train_texts)
    raise ValueError(f"data.tokenizer={kind!r}: expected 'byte' or 'char'")


def tokenizer_json_bytes(tok: Tokenizer) -> bytes:
    """The saved form: canonical JSON (same tokenizer, same bytes)."""
    return json.dumps(tok.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    with open(path, "wb") as f:
        f.write(tokenizer_json_bytes(tok))


def load_tokenizer(path: str) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_json(json.load(f))

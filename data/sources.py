"""Where documents come from: text files, JSONL, directories, or the embedded default corpus.

The embedded default is the running Python's own standard-library source (one document per
`.py` file): real text nobody here wrote, present on every machine, so training needs no
download. Unreadable files (binary, not UTF-8) are skipped and counted, never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from typing import Iterator

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".tex")


class DataError(ValueError):
    """Bad data input: the message names the path (and line) at fault."""


@dataclasses.dataclass
class Document:
    source: str  # file path (with :line for JSONL records)
    text: str


@dataclasses.dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.documents} documents ({self.chars / 1e6:.1f}M chars) from {self.files} files; skipped: {skipped}"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> Iterator[str]:
    root = stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _read_text(path: str, stats: ReadStats) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        stats.skip(f"unreadable ({type(e).__name__})")
        return None
    if b"\x00" in raw:
        stats.skip("binary")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not utf-8")
        return None


def _documents_from_file(path: str, text_field: str, stats: ReadStats) -> Iterator[Document]:
    text = _read_text(path, stats)
    if text is None:
        return
    stats.files += 1
    if not path.endswith(".jsonl"):
        if text.strip():
            yield Document(path, text)
        else:
            stats.skip("empty")
        return
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.skip("malformed json")
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            stats.skip(f"no '{text_field}' string")
            continue
        yield Document(f"{path}:{lineno}", value)


def iter_files(path: str) -> Iterator[str]:
    """A file, or the text files under a directory (sorted, recursive)."""
    if os.path.isfile(path):
        yield path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(TEXT_EXTENSIONS):
                yield os.path.join(dirpath, name)


def read_documents(path: str, text_field: str = "text") -> tuple[list[Document], ReadStats]:
    """All documents under `path` ('' = the embedded standard-library corpus)."""
    stats = ReadStats()
    if path:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise DataError(f"data.path {path!r} does not exist")
        files = iter_files(path)
    else:
        path = stdlib_dir()
        files = _stdlib_files()
    docs = []
    for file in files:
        for doc in _documents_from_file(file, text_field, stats):
            docs.append(doc)
            stats.documents += 1
            stats.chars += len(doc.text)
    if not docs:
        raise DataError(f"data.path {path!r} holds no usable text documents ({stats.summary()})")
    return docs, stats

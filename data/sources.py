"""Where documents come from: text files, JSONL, Parquet, Arrow, gzip, TFDS, or the embedded default corpus.

The embedded default is the running Python's own standard-library source (one document per
`.py` file): real text nobody here wrote, present on every machine, so training needs no
download.

A source is a `Source` (kind 'files' | 'stdlib' | 'tfds'). 'files' takes a file, a directory (recursive,
sorted, by extension) or a glob; each file is read by its extension: `.jsonl` (one JSON object a line),
`.parquet` and `.arrow` (rows), `.csv` and `.tsv` (a header row naming the fields, then one record a
row, every value a string; TSV unquoted as GLUE's files are), anything else as one text document, and
any of these with a trailing `.gz`. A directory written by Hugging Face `Dataset.save_to_disk` (its
`state.json` + `dataset_info.json`) is read as its Arrow shards only, in the order state.json lists
them; a saved `DatasetDict` (`dataset_dict.json`) is refused: it holds several splits, so name one.
'tfds' reads a prepared TFDS dataset through `tfds.data_source` (ArrayRecord random access; no
TensorFlow). Records (JSONL lines, Parquet / Arrow rows, TFDS examples) give their `text_field` as the
document text, or are handed whole to data/formats.py.

Bad input is never a crash and never silently dropped: every unusable file or record is
counted in `ReadStats.skipped` under a named reason ('binary', 'not utf-8', 'empty',
'truncated gzip', 'corrupt gzip', 'file too large', 'malformed json', 'not a json object',
"no 'text' string", 'bad parquet', ...). With `strict=True` a malformed record raises a
`DataError` naming the file and line instead.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
import zlib
from typing import Any, Iterator

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".tex")
COLUMNAR_EXTENSIONS = (".parquet", ".arrow")  # files of rows read with pyarrow
TABLE_EXTENSIONS = (".csv", ".tsv")  # a header row, then a record a row
RECORD_EXTENSIONS = (".jsonl",) + COLUMNAR_EXTENSIONS + TABLE_EXTENSIONS
READ_EXTENSIONS = TEXT_EXTENSIONS + COLUMNAR_EXTENSIONS + TABLE_EXTENSIONS  # what a directory walk reads
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON may spell lone UTF-16 surrogates


class DataError(ValueError):
    """Bad data input: the message names the path (and line) at fault."""


@dataclasses.dataclass
class Document:
    source: str  # file path (with :line for JSONL records, :row for Parquet, tfds:name/split:index)
    text: str


@dataclasses.dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    bytes: int = 0  # raw (decompressed) bytes read
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    truncated: int = 0  # records kept but cut to fit the context (SFT / preference too_long='truncate')

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _skipped(self) -> list[str]:
        return [f"{v} {k}" for k, v in sorted(self.skipped.items())]

    def left_out(self) -> str:
        """What a log line says of the records not used whole: the skipped ones by reason, then the cut ones."""
        cut = [f"{self.truncated} kept but cut to fit"] if self.truncated else []
        return ", ".join(self._skipped() + cut) or "none"

    def summary(self) -> str:
        skipped = ", ".join(self._skipped()) or "none"
        cut = f"; {self.truncated} kept but cut to fit" if self.truncated else ""
        return (f"{self.documents} documents ({self.chars / 1e6:.1f}M chars) from {self.files} files; "
                f"skipped: {skipped}{cut}")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input. kind: 'files' (path = file, directory or glob) | 'stdlib' | 'tfds' (path = dataset name)."""
    kind: str = "files"
    path: str = ""
    text_field: str = "text"  # record field holding the document text
    extensions: tuple[str, ...] = READ_EXTENSIONS  # directory walks: these (and + '.gz')
    tfds_split: str = "train"  # 'tfds': split to read
    data_dir: str = ""  # 'tfds': TFDS data_dir ('' = TFDS default)
    max_file_mb: float = 256.0  # larger files (after decompression) are skipped as 'file too large'


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> Iterator[str]:
    root = stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _inner_name(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def _read_bytes(path: str, max_bytes: int, stats: ReadStats) -> bytes | None:
    """The file's bytes (gunzipped for .gz), or None after counting why not."""
    try:
        if path.endswith(".gz"):
            chunks, size = [], 0
            with gzip.open(path, "rb") as f:
                while size <= max_bytes and (chunk := f.read(1 << 24)):
                    chunks.append(chunk)
                    size += len(chunk)
            raw = b"".join(chunks)
        else:
            if os.path.getsize(path) > max_bytes:
                stats.skip("file too large")
                return None
            with open(path, "rb") as f:
                raw = f.read()
    except EOFError:
        stats.skip("truncated gzip")
        return None
    except (gzip.BadGzipFile, zlib.error):
        stats.skip("corrupt gzip")
        return None
    except OSError as e:
        stats.skip(f"unreadable ({type(e).__name__})")
        return None
    if len(raw) > max_bytes:
        stats.skip("file too large")
        return None
    stats.bytes += len(raw)
    return raw


def _decode(raw: bytes, stats: ReadStats) -> str | None:
    if b"\x00" in raw:
        stats.skip("binary")
        return None
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is encoding, not text (JSONL's first record)
    except UnicodeDecodeError:
        stats.skip("not utf-8")
        return None


def _read_text(path: str, max_bytes: int, stats: ReadStats) -> str | None:
    """A whole file as text, counted in stats.files; None (skip counted under its reason) otherwise."""
    raw = _read_bytes(path, max_bytes, stats)
    text = None if raw is None else _decode(raw, stats)
    if text is not None:
        stats.files += 1
    return text


def _encodable(record: Any) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _jsonl_records(path: str, text: str, stats: ReadStats, strict: bool) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if strict:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e})") from None
            stats.skip("malformed json")
            continue
        if _SURROGATE_ESCAPE.search(line) and not _encodable(record):
            if strict:
                raise DataError(f"{path}:{lineno}: a lone UTF-16 surrogate (not valid Unicode text)")
            stats.skip("lone surrogate")
            continue
        yield f"{path}:{lineno}", record


def _table_records(path: str, text: str, stats: ReadStats, strict: bool, columns) -> Iterator[tuple[str, Any]]:
    """Records of a CSV / TSV file: {header field: value string} for each row after the header (`columns`: the file
    skipped whole when its header lacks one, as a Parquet file's schema). A row with another number of fields than
    the header, or text the csv module cannot parse, raises (strict) naming its line, or is counted ('malformed
    csv'; a parse error ends the file, whose rows after it cannot be told apart)."""
    tsv = _inner_name(path).endswith(".tsv")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header, line = None, 1
    try:
        for row in reader:
            where, line = f"{path}:{line}", reader.line_num + 1
            if not any(field.strip() for field in row):
                continue
            if header is None:
                header = row
                if columns is not None and any(c not in header for c in columns):
                    stats.skip(f"csv without column {columns[0]!r}")
                    return
                continue
            if len(row) != len(header):
                if strict:
                    raise DataError(f"{where}: {len(row)} fields, but the header row names {len(header)}")
                stats.skip("malformed csv")
                continue
            yield where, dict(zip(header, row))
    except csv.Error as e:
        if strict:
            raise DataError(f"{path}:{line}: not CSV the csv module can read ({e})") from None
        stats.skip("malformed csv")


def _arrow_table(path: str):
    """An Arrow IPC file's table: the stream format (what Hugging Face `save_to_disk` writes), else the file format."""
    import pyarrow as pa
    try:
        with pa.OSFile(path) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.OSFile(path) as source:
            return pa.ipc.open_file(source).read_all()


def _columnar_records(path: str, stats: ReadStats, columns) -> Iterator[tuple[str, Any]]:
    """Rows of a .parquet or .arrow file (`columns`: only these, and the file skipped when one is missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    kind = "arrow" if _inner_name(path).endswith(".arrow") else "parquet"
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
        else:
            table = _arrow_table(path)
            names = table.schema.names
        if columns is not None and any(c not in names for c in columns):
            stats.skip(f"{kind} without column {columns[0]!r}")
            return
        if kind == "parquet":
            rows = pf.read(columns=columns).to_pylist()  # one file's rows; files are shard-sized
        else:
            rows = (table.select(columns) if columns is not None else table).to_pylist()
    except (pa.ArrowException, OSError, ValueError):
        stats.skip(f"bad {kind}")
        return
    for i, row in enumerate(rows):
        yield f"{path}:{i}", row


def json_file_records(path: str, stats: ReadStats, *, max_bytes: int, strict: bool = False
                      ) -> Iterator[tuple[str, Any]]:
    """(where, record) of a .json file: a JSON array of records (Alpaca-style files; where = FILE:[i]), the
    SQuAD layout {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]} as one record per question
    ({"id", "title", "context", "question", "answers", and "is_impossible" where given}), any other single
    object as one record, and JSON Lines named .json (as Hugging Face's `Dataset.to_json` writes them) line
    by line."""
    text = _read_text(path, max_bytes, stats)
    if text is None:
        return
    try:
        doc = json.loads(text)
    except RecursionError:
        if strict:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        stats.skip("malformed json")
        return
    except json.JSONDecodeError:  # several values: JSON Lines
        yield from _jsonl_records(path, text, stats, strict)
        return
    if isinstance(doc, list):
        for i, record in enumerate(doc):
            yield f"{path}:[{i}]", record
    elif isinstance(doc, dict) and isinstance(doc.get("data"), list) and doc["data"] \
            and all(isinstance(a, dict) and "paragraphs" in a for a in doc["data"]):
        yield from _squad_records(path, doc["data"])
    else:
        yield f"{path}:1", doc


def _squad_records(path: str, articles: list) -> Iterator[tuple[str, Any]]:
    for i, article in enumerate(articles):
        paragraphs = article["paragraphs"] if isinstance(article["paragraphs"], list) else [article["paragraphs"]]
        for j, paragraph in enumerate(paragraphs):
            where = f"{path}:data[{i}].paragraphs[{j}]"
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                yield where, {"paragraph": paragraph}  # no questions: validation names what is missing
                continue
            for k, qa in enumerate(qas):
                record = dict(qa) if isinstance(qa, dict) else {"qa": qa}
                record.setdefault("context", paragraph.get("context"))
                if "title" in article:
                    record.setdefault("title", article["title"])
                yield f"{where}.qas[{k}]", record


def file_records(path: str, stats: ReadStats, *, max_bytes: int, strict: bool = False,
                 columns=None) -> Iterator[tuple[str, Any]]:
    """(where, record) from one .jsonl, .csv or .tsv file (or any of them .gz), or a .parquet or .arrow file
    (`columns`: a table or columnar file without one of them is skipped whole; Parquet / Arrow read only them)."""
    if _inner_name(path).endswith(COLUMNAR_EXTENSIONS):
        if os.path.getsize(path) > max_bytes:
            stats.skip("file too large")
            return
        stats.files += 1
        stats.bytes += os.path.getsize(path)
        yield from _columnar_records(path, stats, columns)
        return
    text = _read_text(path, max_bytes, stats)
    if text is not None and _inner_name(path).endswith(TABLE_EXTENSIONS):
        yield from _table_records(path, text, stats, strict, columns)
    elif text is not None:
        yield from _jsonl_records(path, text, stats, strict)


def _record_text(record: Any, text_field: str, stats: ReadStats) -> str | None:
    value = record.get(text_field) if isinstance(record, dict) else None
    if isinstance(value, bytes):  # TFDS Text features come back as UTF-8 bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("not utf-8")
            return None
    if not isinstance(value, str) or not value.strip():
        stats.skip(f"no '{text_field}' string")
        return None
    return value


def _documents_from_file(path: str, text_field: str, stats: ReadStats, max_bytes: int = 1 << 62,
                         strict: bool = False) -> Iterator[Document]:
    if _inner_name(path).endswith(RECORD_EXTENSIONS):
        columns = None if _inner_name(path).endswith(".jsonl") else [text_field]
        for where, record in file_records(path, stats, max_bytes=max_bytes, strict=strict, columns=columns):
            text = _record_text(record, text_field, stats)
            if text is not None:
                yield Document(where, text)
        return
    text = _read_text(path, max_bytes, stats)
    if text is None:
        return
    if text.strip():
        yield Document(path, text)
    else:
        stats.skip("empty")


def saved_dataset_shards(directory: str, filenames) -> list[str] | None:
    """The Arrow shards of a directory written by Hugging Face `Dataset.save_to_disk` (in state.json's order),
    None for any other directory; a saved DatasetDict (several splits) is an error naming them."""
    if "dataset_dict.json" in filenames:
        try:
            with open(os.path.join(directory, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits")
        except (OSError, ValueError, AttributeError):
            splits = None
        names = ", ".join(os.path.join(directory, str(s)) for s in splits) if isinstance(splits, list) else \
            "its split directories"
        raise DataError(f"{directory!r} is a Hugging Face DatasetDict (dataset_dict.json): it holds several splits, "
                        f"and reading them together would mix them; name one: {names}")
    if "state.json" not in filenames or "dataset_info.json" not in filenames:
        return None
    try:
        with open(os.path.join(directory, "state.json")) as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{directory!r} looks like a Hugging Face save_to_disk directory, but its state.json does "
                        f"not list its Arrow files: {type(e).__name__}: {e}") from None
    return [os.path.join(directory, name) for name in files]


def iter_files(path: str, extensions=READ_EXTENSIONS) -> Iterator[str]:
    """A file, the files under a directory with these extensions (or + '.gz'; sorted, recursive; a Hugging Face
    save_to_disk directory: its Arrow shards, saved_dataset_shards), or the files matching a glob (sorted)."""
    if os.path.isfile(path):
        yield path
        return
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            shards = saved_dataset_shards(dirpath, filenames)
            if shards is not None:
                yield from shards
                continue
            for name in sorted(filenames):
                if _inner_name(name).endswith(tuple(extensions)):
                    yield os.path.join(dirpath, name)
        return
    for match in sorted(glob.glob(path, recursive=True)):
        if os.path.isfile(match):
            yield match


def files_fingerprint(path: str) -> dict:
    """{'files', 'bytes', 'digest'} of what a run reads under `path` (a file, a directory walked as the
    readers walk it: their extensions, no hidden files or folders; or a glob): each file's relative path and
    size, hashed. Stat only, no reading, so it is cheap on a large corpus; it changes when such a file is
    added, removed, renamed or changes size (a prepared dataset: its manifest.json, which sizes the shards)."""
    path = os.path.expanduser(path)
    is_dir = os.path.isdir(path)
    h, n, total = hashlib.sha256(), 0, 0
    for file in iter_files(path):
        if os.path.basename(file).startswith("."):
            continue
        size = os.path.getsize(file)
        rel = os.path.relpath(file, path) if is_dir else os.path.basename(file)
        h.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
        n, total = n + 1, total + size
    return {"files": n, "bytes": total, "digest": h.hexdigest()[:16]}


def is_within(path: str, directory: str) -> bool:
    """`path` is `directory` or lies under it, links resolved (a workdir or output inside an input tree)."""
    path, directory = (os.path.realpath(os.path.expanduser(p)) for p in (path, directory))
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def in_cwd(path: str) -> str:
    """' in DIR' for a relative path (read from the current directory, which a saved run's config does not
    record: a script run from another directory misses the run's relative data paths), else ''."""
    return "" if os.path.isabs(os.path.expanduser(path)) else f" in {os.getcwd()}"


def _check_exists(path: str) -> None:
    if not os.path.exists(path) and not glob.has_magic(path):
        raise DataError(f"data path {path!r} does not exist{in_cwd(path)}")


def _plain(value: Any) -> Any:
    """TFDS example values (numpy scalars/arrays, UTF-8 bytes) -> JSON-like Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def tfds_records(name: str, split: str, data_dir: str) -> Iterator[tuple[str, Any]]:
    """Examples of a prepared (array_record) TFDS dataset, in index order; no TensorFlow needed."""
    import tensorflow_datasets as tfds
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises a variety of types for a missing/unbuilt dataset
        raise DataError(f"TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}) cannot be read: "
                        f"{type(e).__name__}: {e}") from None
    for i in range(len(ds)):
        yield f"tfds:{name}/{split}:{i}", _plain(ds[i])


def source_records(src: Source, stats: ReadStats, strict: bool = False) -> Iterator[tuple[str, Any]]:
    """Whole records (dicts) of a record source: .jsonl/.parquet/.json files (json_file_records) or TFDS
    examples. Text files under a 'files' source are counted as 'not a record file'."""
    max_bytes = int(src.max_file_mb * 2**20)
    if src.kind == "tfds":
        yield from tfds_records(src.path, src.tfds_split, src.data_dir)
        return
    if src.kind != "files":
        raise DataError(f"source kind {src.kind!r} holds no records (expected 'files' or 'tfds')")
    path = os.path.expanduser(src.path)
    _check_exists(path)
    for file in iter_files(path, src.extensions):
        if _inner_name(file).endswith(RECORD_EXTENSIONS):
            yield from file_records(file, stats, max_bytes=max_bytes, strict=strict)
        elif _inner_name(file).endswith(".json"):
            yield from json_file_records(file, stats, max_bytes=max_bytes, strict=strict)
        else:
            stats.skip("not a record file")


def source_documents(src: Source, stats: ReadStats, strict: bool = False) -> Iterator[Document]:
    """Text documents of a source, in a deterministic order; stats count files, documents, skips."""
    if src.kind == "stdlib":
        files = _stdlib_files()
    elif src.kind == "files":
        path = os.path.expanduser(src.path)
        _check_exists(path)
        files = iter_files(path, src.extensions)
    elif src.kind == "tfds":
        for where, record in tfds_records(src.path, src.tfds_split, src.data_dir):
            text = _record_text(record, src.text_field, stats)
            if text is not None:
                stats.documents += 1
                stats.chars += len(text)
                yield Document(where, text)
        return
    else:
        raise DataError(f"source kind {src.kind!r}: expected 'files', 'stdlib' or 'tfds'")
    max_bytes = int(src.max_file_mb * 2**20)
    for file in files:
        for doc in _documents_from_file(file, src.text_field, stats, max_bytes, strict):
            stats.documents += 1
            stats.chars += len(doc.text)
            yield doc


def read_documents(path: str, text_field: str = "text") -> tuple[list[Document], ReadStats]:
    """All documents under `path` ('' = the embedded standard-library corpus)."""
    stats = ReadStats()
    if path:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise DataError(f"data.path {path!r} does not exist{in_cwd(path)}")
        src = Source(kind="files", path=path, text_field=text_field)
    else:
        path = stdlib_dir()
        src = Source(kind="stdlib")
    docs = list(source_documents(src, stats))
    if not docs:
        raise DataError(f"data.path {path!r} holds no usable text documents ({stats.summary()}; files are read "
                        f"by extension: {', '.join(READ_EXTENSIONS)}, any of them .gz; a record's text is its "
                        f"data.text_field={text_field!r})")
    return docs, stats

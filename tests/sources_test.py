"""Collection: directories, globs, gzip, Parquet, JSONL fields, TFDS (no TensorFlow), bad files by name."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from data import sources
from data.sources import DataError, ReadStats, Source


def test_gzip_parquet_glob_and_jsonl_fields(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped text")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped record"}) + "\n")
    pq.write_table(pa.table({"body": ["row one", "row two", None], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "d.md").write_text("markdown")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    stats = ReadStats()
    docs = list(sources.source_documents(Source(path=str(tmp_path), text_field="body"), stats))
    assert [d.text for d in docs] == ["zipped text", "zipped record", "row one", "row two", "markdown"]
    assert docs[3].source.endswith("c.parquet:1")
    assert stats.skipped == {"no 'body' string": 1} and stats.files == 4
    globbed = list(sources.source_documents(Source(path=str(tmp_path / "*.parquet"), text_field="body"), ReadStats()))
    assert [d.text for d in globbed] == ["row one", "row two"]
    stats = ReadStats()
    assert not list(sources.source_documents(Source(path=str(tmp_path / "c.parquet")), stats))
    assert stats.skipped == {"parquet without column 'text'": 1}
    with pytest.raises(DataError, match="does not exist"):
        list(sources.source_documents(Source(path=str(tmp_path / "missing")), ReadStats()))


def _save_to_disk_layout(directory, shards):
    """What Hugging Face `Dataset.save_to_disk` writes: Arrow stream shards, state.json listing them, dataset_info."""
    directory.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, rows in zip(names, shards):
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                      "_split": None}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_hugging_face_save_to_disk_and_arrow_files(tmp_path):
    """A `Dataset.save_to_disk` directory is read as its Arrow shards in state.json's order (its JSON metadata is
    not taken for records); a saved DatasetDict is refused naming its splits (reading it whole would mix them);
    a single .arrow file in either IPC format is rows like a Parquet file."""
    shards = [[{"text": "first", "label": 1}, {"text": "second", "label": 0}], [{"text": "third", "label": 1}]]
    _save_to_disk_layout(tmp_path / "ds", shards)
    stats = ReadStats()
    records = list(sources.source_records(Source(path=str(tmp_path / "ds")), stats, strict=True))
    assert [r for _, r in records] == shards[0] + shards[1] and not stats.skipped
    assert records[2][0].endswith("data-00001-of-00002.arrow:0")
    docs = list(sources.source_documents(Source(path=str(tmp_path / "ds")), ReadStats()))
    assert [d.text for d in docs] == ["first", "second", "third"]
    assert sources.files_fingerprint(str(tmp_path / "ds"))["files"] == 2  # the shards, not the metadata
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    _save_to_disk_layout(tmp_path / "dd" / "train", shards[:1])
    _save_to_disk_layout(tmp_path / "dd" / "validation", shards[1:])
    with pytest.raises(DataError, match=r"DatasetDict .*mix them; name one: .*dd/train, .*dd/validation"):
        list(sources.source_records(Source(path=str(tmp_path / "dd")), ReadStats()))
    (tmp_path / "ds" / "state.json").write_text(json.dumps({"_split": None}))  # no list of its shards
    with pytest.raises(DataError, match=r"ds' looks like a Hugging Face save_to_disk directory, but its state\.json "
                                        r"does not list its Arrow files: KeyError: '_data_files'"):
        list(sources.source_records(Source(path=str(tmp_path / "ds")), ReadStats()))
    table = pa.table({"text": ["x", "y"]})
    with pa.OSFile(str(tmp_path / "file_format.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert [d.text for d in sources.source_documents(Source(path=str(tmp_path / "file_format.arrow")),
                                                     ReadStats())] == ["x", "y"]
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    stats = ReadStats()
    assert not list(sources.source_records(Source(path=str(tmp_path / "bad.arrow")), stats))
    assert stats.skipped == {"bad arrow": 1}


def test_the_real_save_to_disk_is_read(tmp_path):
    """The same with the `datasets` library itself (a dev extra): its layout is the one read above."""
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r in sources.source_records(Source(path=str(tmp_path / "ds")), ReadStats(), strict=True)] == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict .*name one: .*dd/train"):
        list(sources.source_records(Source(path=str(tmp_path / "dd")), ReadStats()))


def test_csv_and_tsv_records(tmp_path):
    """A header row names the fields, each row is a record of strings: CSV quoted (a field may hold commas,
    quotes and a newline, and the next record is named by its own line), TSV unquoted as GLUE's files are (a
    sentence may start with a quote); a row with another number of fields is counted or, strict, named."""
    (tmp_path / "a.csv").write_text('text,label\n"one, with a comma",pos\n"two ""quoted""\nover two lines",neg\n'
                                    '\nthree,pos\nfour,neg,extra\n', encoding="utf-8")
    stats = ReadStats()
    records = list(sources.source_records(Source(path=str(tmp_path / "a.csv")), stats))
    assert [r for _, r in records] == [{"text": "one, with a comma", "label": "pos"},
                                       {"text": 'two "quoted"\nover two lines', "label": "neg"},
                                       {"text": "three", "label": "pos"}]
    assert [w.rsplit(":", 1)[1] for w, _ in records] == ["2", "3", "6"] and stats.skipped == {"malformed csv": 1}
    with pytest.raises(DataError, match=r"a\.csv:7: 3 fields, but the header row names 2"):
        list(sources.source_records(Source(path=str(tmp_path / "a.csv")), ReadStats(), strict=True))
    with gzip.open(tmp_path / "b.tsv.gz", "wt", encoding="utf-8") as f:
        f.write('sentence\tlabel\n"a quote that never closes\t1\nplain\t0\n')
    docs = list(sources.source_documents(Source(path=str(tmp_path / "b.tsv.gz"), text_field="sentence"), ReadStats()))
    assert [d.text for d in docs] == ['"a quote that never closes', "plain"]
    walked = list(sources.source_records(Source(path=str(tmp_path)), ReadStats()))
    assert len(walked) == 5  # a directory walk reads both
    stats = ReadStats()  # as text documents, a table without the text column is skipped whole, as Parquet
    assert [d.text for d in sources.source_documents(Source(path=str(tmp_path)), stats)] == \
        ["one, with a comma", 'two "quoted"\nover two lines', "three"]
    assert stats.skipped == {"malformed csv": 1, "csv without column 'text'": 1}


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Files saved with a UTF-8 byte-order mark (Windows editors): a JSONL file keeps its first record
    (json.loads refuses a line that starts with one) and a text file does not start with U+FEFF."""
    bom = "\ufeff".encode("utf-8")
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    (tmp_path / "b.txt").write_bytes(bom + "plain".encode("utf-8"))
    stats = ReadStats()
    docs = list(sources.source_documents(Source(path=str(tmp_path)), stats))
    assert [d.text for d in docs] == ["first", "second", "plain"] and not stats.skipped


def test_bad_files_are_counted_by_name(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\x00\x00data")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    good = gzip.compress(("hello world " * 1000).encode())
    (tmp_path / "truncated.txt.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    (tmp_path / "notgzip.txt.gz").write_bytes(b"plain text, not gzip")
    (tmp_path / "big.txt").write_text("y" * 3000)
    (tmp_path / "bomb.txt.gz").write_bytes(gzip.compress(b"z" * 3_000_000))
    (tmp_path / "records.jsonl").write_text('{"text": "ok"}\n{"text": "\\ud800"}\n{nope\n')
    stats = ReadStats()
    docs = list(sources.source_documents(Source(path=str(tmp_path), max_file_mb=0.002), stats))
    assert [d.text for d in docs] == ["ok"]
    assert stats.skipped == {"binary": 1, "not utf-8": 1, "empty": 1, "truncated gzip": 1, "corrupt gzip": 2,
                             "file too large": 2, "lone surrogate": 1, "malformed json": 1}


class LmstackTinyText(tfds.core.GeneratorBasedBuilder):
    """A 7-example text dataset the test builds itself (TFDS can download nothing here)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "label": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"tfds document {i} ü", "label": i % 2}


def test_tfds_source_without_tensorflow(tmp_path):
    LmstackTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = Source(kind="tfds", path="lmstack_tiny_text", tfds_split="train", data_dir=str(tmp_path))
    stats = ReadStats()
    docs = list(sources.source_documents(src, stats))
    assert sorted(d.text for d in docs) == [f"tfds document {i} ü" for i in range(5)]
    assert docs[0].source.startswith("tfds:lmstack_tiny_text/train:")
    records = list(sources.source_records(Source(kind="tfds", path="lmstack_tiny_text", tfds_split="test",
                                                 data_dir=str(tmp_path)), ReadStats()))
    assert sorted((r["text"], r["label"]) for _, r in records) == [("tfds document 0 ü", 0), ("tfds document 1 ü", 1)]
    with pytest.raises(DataError, match="no_such_dataset"):
        list(sources.source_documents(Source(kind="tfds", path="no_such_dataset", data_dir=str(tmp_path)),
                                      ReadStats()))

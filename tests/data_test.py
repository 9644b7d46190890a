"""Data: sources, tokenizers, splitting, packing and the grain iterators."""

import json

import numpy as np
import pytest

from data import pipeline, sources, tokenizer
from data.pipeline import TokenStream
from data.sources import DataError


# ---------------------------------------------------------------- sources

def test_txt_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello\nworld\n")
    docs, stats = sources.read_documents(str(p))
    assert [d.text for d in docs] == ["hello\nworld\n"]
    assert (stats.files, stats.documents, stats.chars) == (1, 1, 12)


def test_jsonl_skips_bad_records(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "first"}), "{not json", json.dumps({"other": "x"}),
             json.dumps({"text": "second", "id": 2}), json.dumps(["a list"]), "", json.dumps({"text": 3})]
    p.write_text("\n".join(lines) + "\n")
    docs, stats = sources.read_documents(str(p))
    assert [d.text for d in docs] == ["first", "second"]
    assert docs[1].source.endswith("d.jsonl:4")
    assert stats.skipped == {"malformed json": 1, "no 'text' string": 3}
    docs, stats = sources.read_documents(str(p), text_field="other")
    assert [d.text for d in docs] == ["x"] and stats.skipped["no 'other' string"] == 4


def test_directory_skips_unusable_files(tmp_path):
    (tmp_path / "good.txt").write_text("good text ü", encoding="utf-8")
    (tmp_path / "x.txt").write_bytes(b"abc\x00def")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\t\n")
    (tmp_path / "ignored.bin").write_text("not a text extension")
    docs, stats = sources.read_documents(str(tmp_path))
    assert [d.text for d in docs] == ["good text ü"]
    assert stats.skipped == {"binary": 1, "not utf-8": 1, "empty": 2}
    assert stats.documents == 1


def test_missing_path_is_a_data_error(tmp_path):
    missing = str(tmp_path / "nope" / "corpus.txt")
    with pytest.raises(DataError, match="nope/corpus.txt"):
        sources.read_documents(missing)


def test_directory_without_text_is_a_data_error(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\x00\x01")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError) as e:
        sources.read_documents(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_default_corpus_is_the_stdlib():
    docs, stats = sources.read_documents("")
    assert len(docs) > 500 and stats.documents == len(docs)
    assert stats.chars > 10_000_000
    assert all(d.source.endswith(".py") for d in docs)


# ---------------------------------------------------------------- tokenizers

TEXT = "Hello, world! Grüße — 日本語 🙂\ttabs\nnewlines"


def test_byte_tokenizer_round_trip():
    tok = tokenizer.ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 256 + len(tokenizer.SPECIALS)
    assert tok.eos_id == 256 + tokenizer.SPECIALS.index("<eos>")
    assert tok.decode(list(ids) + [tok.eos_id]) == TEXT  # specials are dropped


def test_char_tokenizer_round_trip_and_unknown():
    tok = tokenizer.build_tokenizer("char", [TEXT[:20], TEXT[20:]])
    assert isinstance(tok, tokenizer.CharTokenizer)
    n_chars = len(set(TEXT))
    assert tok.vocab_size == n_chars + len(tokenizer.SPECIALS)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and ids.max() < n_chars
    assert tok.decode(ids) == TEXT
    unk = tok.special_id("<unk>")
    assert unk == n_chars + tokenizer.SPECIALS.index("<unk>")
    np.testing.assert_array_equal(tok.encode("H\u00a7Z"), [tok.encode("H")[0], unk, unk])


@pytest.mark.parametrize("tok", [tokenizer.ByteTokenizer(), tokenizer.CharTokenizer(TEXT)])
def test_tokenizer_save_load(tmp_path, tok):
    path = str(tmp_path / "tokenizer.json")
    tokenizer.save_tokenizer(tok, path)
    back = tokenizer.load_tokenizer(path)
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(back.encode(TEXT + "?"), tok.encode(TEXT + "?"))
    assert back.decode(back.encode(TEXT)) == TEXT


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="sentencepiece"):
        tokenizer.build_tokenizer("sentencepiece", ["x"])


# ---------------------------------------------------------------- splitting

DOCS = [f"document number {i}: " + "abc" * (i % 7) for i in range(2000)]


def test_hash_split_is_deterministic_and_complete():
    train, val = pipeline.split_documents(DOCS, "hash", 0.1)
    assert (train, val) == pipeline.split_documents(DOCS, "hash", 0.1)
    assert sorted(train + val) == sorted(DOCS)
    assert abs(len(val) / len(DOCS) - 0.1) < 0.03
    r_train, r_val = pipeline.split_documents(DOCS[::-1], "hash", 0.1)
    assert set(r_val) == set(val) and set(r_train) == set(train)
    # stable across processes and machines (a content hash, not Python's salted hash())
    assert len(val) == 188 and [DOCS.index(t) for t in val[:6]] == [5, 6, 16, 35, 39, 47]


def test_hash_split_keeps_duplicates_together():
    docs = DOCS[:200] + DOCS[:200]
    train, val = pipeline.split_documents(docs, "hash", 0.2)
    assert not set(train) & set(val)
    assert all(val.count(t) == 2 for t in val)


def test_tail_split():
    docs = ["0123456789", "abcdefghijklmnopqrst"]
    train, val = pipeline.split_documents(docs, "tail", 0.2)
    assert train == ["01234567", "abcdefghijklmnop"]
    assert val == ["89", "qrst"]
    train, val = pipeline.split_documents(["only one document here"], "tail", 0.5)
    assert len(train) == len(val) == 1


@pytest.mark.parametrize("mode,frac", [("random", 0.1), ("hash", 0.0), ("hash", 1.0), ("tail", -0.1)])
def test_bad_split_arguments(mode, frac):
    with pytest.raises(DataError):
        pipeline.split_documents(DOCS[:50], mode, frac)


def test_single_document_hash_split_suggests_tail():
    with pytest.raises(DataError, match="tail"):
        pipeline.split_documents(["just one document"], "hash", 0.1)


# ---------------------------------------------------------------- packing

def test_stream_and_windows():
    tok = tokenizer.ByteTokenizer()
    texts = ["abcde", "fg", "hijklmn"]
    stream = pipeline.tokenize_stream(texts, tok)
    assert len(stream) == sum(len(t) + 1 for t in texts) == 17
    ends = np.cumsum([len(t) + 1 for t in texts]) - 1
    assert (stream.tokens[ends] == tok.eos_id).all() and (stream.tokens == tok.eos_id).sum() == 3
    np.testing.assert_array_equal(stream.segments, [1] * 6 + [2] * 3 + [3] * 8)

    src = pipeline.WindowSource(stream, seq_len=4)
    assert len(src) == (17 - 1) // 4 == 4
    w = src[1]  # tokens 4..8: "e", eos | "f", "g", eos
    np.testing.assert_array_equal(w["inputs"], stream.tokens[4:8])
    np.testing.assert_array_equal(w["targets"], stream.tokens[5:9])
    np.testing.assert_array_equal(w["segment_ids"], [1, 1, 2, 2])
    np.testing.assert_array_equal(w["positions"], [0, 1, 0, 1])
    np.testing.assert_array_equal(w["weights"], [1, 0, 1, 1])  # eos -> "f" crosses the boundary
    assert w["inputs"][1] == tok.eos_id and w["targets"][1] == ord("f")
    assert all(v.shape == (4,) for i in range(len(src)) for v in src[i].values())
    with pytest.raises(IndexError):
        src[len(src)]


def test_window_positions_restart_at_every_document():
    stream = TokenStream(np.arange(10, dtype=np.int32), np.array([1, 1, 1, 2, 3, 3, 3, 3, 4, 4], np.int32))
    w = pipeline.WindowSource(stream, seq_len=9)[0]
    np.testing.assert_array_equal(w["positions"], [0, 1, 2, 0, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(w["weights"], [1, 1, 0, 0, 1, 1, 1, 0, 1])


# ---------------------------------------------------------------- iterators

def _stream(n):
    """A stream whose windows are all distinct; ~100 tokens per document."""
    return TokenStream(np.arange(n, dtype=np.int32), (np.arange(n) // 100 + 1).astype(np.int32))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_iterator_shapes_and_seeds():
    stream = _stream(40 * 16 + 1)
    make = lambda seed: pipeline.train_iterator(stream, seq_len=16, global_batch=8, seed=seed)
    a, b, c = _take(make(0), 3), _take(make(0), 3), _take(make(1), 3)
    for batch in a:
        assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "weights"}
        assert all(v.shape == (8, 16) for v in batch.values())
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
    # one epoch (5 batches) visits every window exactly once
    seen = np.concatenate([b["inputs"][:, 0] for b in _take(make(0), 5)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(40) * 16)


def test_train_iterator_state_resume():
    stream = _stream(12 * 8 + 1)  # 12 windows, batch 4: the resume crosses an epoch
    make = lambda: pipeline.train_iterator(stream, seq_len=8, global_batch=4, seed=3)
    it = make()
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    fresh = make()
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 2)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_process_sharding():
    stream = _stream(64 * 8 + 1)
    kw = dict(seq_len=8, global_batch=8, seed=0, process_count=2)
    b0 = next(pipeline.train_iterator(stream, process_index=0, **kw))
    b1 = next(pipeline.train_iterator(stream, process_index=1, **kw))
    assert b0["inputs"].shape == b1["inputs"].shape == (4, 8)
    rows0, rows1 = set(b0["inputs"][:, 0].tolist()), set(b1["inputs"][:, 0].tolist())
    assert len(rows0) == len(rows1) == 4 and not rows0 & rows1


def test_train_iterator_too_few_windows():
    with pytest.raises(DataError, match="data.batch_size"):
        pipeline.train_iterator(_stream(7 * 8 + 1), seq_len=8, global_batch=8, seed=0)
    with pytest.raises(DataError, match="divisible"):
        pipeline.train_iterator(_stream(64 * 8 + 1), seq_len=8, global_batch=8, seed=0, process_count=3)


def test_eval_batches():
    stream = _stream(10 * 8 + 1)  # 10 windows
    batches = pipeline.eval_batches(stream, seq_len=8, batch_size=4, max_batches=5)
    again = pipeline.eval_batches(stream, seq_len=8, batch_size=4, max_batches=5)
    assert len(batches) == 3
    for x, y in zip(batches, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    first_cols = np.concatenate([b["inputs"][:, 0] for b in batches])
    np.testing.assert_array_equal(first_cols[:10], np.arange(10) * 8)  # in order
    last = batches[-1]
    assert all(v.shape == (4, 8) for v in last.values())
    assert last["weights"][:2].sum() > 0 and not last["weights"][2:].any()
    assert len(pipeline.eval_batches(stream, seq_len=8, batch_size=4, max_batches=1)) == 1


def test_eval_batches_too_short():
    with pytest.raises(DataError, match="data.seq_len=8"):
        pipeline.eval_batches(_stream(8), seq_len=8, batch_size=4, max_batches=2)


def test_jsonl_keeps_records_with_unicode_line_separators(tmp_path):
    path = tmp_path / "x.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": "nel\x85x"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": "ok"}) + "\n")
    docs, stats = sources.read_documents(str(path))
    assert [d.text for d in docs] == ["a\u2028b", "nel\x85x", "ok"]
    assert docs[2].source.endswith(":3") and stats.skipped == {}

"""Fuzzing the data preparation stage: random bytes and random JSON lines go through collection,
cleaning, format validation and tokenization; the only exceptions are the documented ones
(DataError / FormatError, and those only where strict=True asks for them)."""

import gzip
import json
import os
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from configs.data import common
from data import clean, formats, sources, tokenizer
from data.formats import FormatError
from data.sources import DataError, ReadStats, Source

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAN = common.base().clean
EXTS = [".txt", ".md", ".jsonl", ".txt.gz", ".jsonl.gz", ".parquet", ".py"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
record_like = st.fixed_dictionaries({}, optional={
    "text": st.one_of(st.text(max_size=40), json_values), "label": json_values, "text_pair": json_values,
    "context": st.text(max_size=40), "question": json_values, "prompt": json_values, "response": json_values,
    "chosen": json_values, "rejected": json_values,
    "answers": st.fixed_dictionaries({}, optional={"text": st.lists(json_values, max_size=2),
                                                   "answer_start": st.lists(json_values, max_size=2)}),
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["system", "user", "assistant", "bot", 3]), "content": json_values}), max_size=3),
})


def _write_all(d, blobs, gz):
    for i, (blob, ext) in enumerate(blobs):
        with open(os.path.join(d, f"f{i}{ext}"), "wb") as f:
            f.write(gzip.compress(blob) if gz and ext.endswith(".gz") else blob)


@FUZZ
@given(blobs=st.lists(st.tuples(st.binary(max_size=400), st.sampled_from(EXTS)), min_size=1, max_size=5),
       gz=st.booleans())
def test_random_bytes_through_collection_and_cleaning(blobs, gz):
    with tempfile.TemporaryDirectory() as d:
        _write_all(d, blobs, gz)
        stats = ReadStats()
        docs = list(sources.source_documents(Source(path=d), stats))  # never raises without strict
        assert stats.documents == len(docs)
        for doc in docs:
            text, reason, _ = clean.clean_document(doc.text, CLEAN)
            assert (text is None) != (reason is None)
            if text is not None:
                assert clean.normalize(text) == text  # cleaning is idempotent


@FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=60), json_values.map(json.dumps), record_like.map(json.dumps),
                                st.just('{"text": "lone \\udc80 surrogate", "label": 1}')), min_size=1, max_size=8),
       fmt=st.sampled_from(formats.FORMATS), strict=st.booleans())
def test_random_json_lines_through_format_validation(lines, fmt, strict):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "x.jsonl"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write("\n".join(lines) + "\n")
        stats = ReadStats()
        try:
            got = list(formats.read_records(Source(path=d), fmt, stats, strict=strict))
        except FormatError as e:
            assert strict and "x.jsonl:" in str(e)
            return
        except DataError as e:
            assert strict and "x.jsonl" in str(e)
            return
        for _, record in got:
            assert formats.validate(record, fmt) is record
            assert isinstance(formats.record_text(record, fmt), str)
        assert stats.documents == len(got)


@FUZZ
@given(record=st.one_of(record_like, json_values), fmt=st.sampled_from(formats.FORMATS))
def test_validate_raises_only_format_errors(record, fmt):
    try:
        formats.validate(record, fmt)
    except FormatError as e:
        assert e.reason and e.detail


_BPE = tokenizer.BPETokenizer.train(["def f(x):\n    return x + 1\n" * 20, "naïve café 日本語 🙂"], vocab_size=300)


@FUZZ
@given(text=st.text(max_size=200))
def test_tokenizers_round_trip_cleaned_text(text):
    text = clean.normalize(text)
    for tok in (_BPE, tokenizer.ByteTokenizer()):
        assert tok.decode(tok.encode(text)) == text

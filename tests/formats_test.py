"""Task record formats: valid records pass; every malformed kind is named (strict: with file:line)."""

import json

import pytest

from data import formats
from data.formats import FormatError
from data.sources import ReadStats, Source

CONTEXT = "The quick brown fox jumps over the lazy dog."

VALID = {
    "classification": [{"text": "great film", "label": "pos"}, {"text": "a", "label": 3, "text_pair": "b"}],
    "qa": [{"context": CONTEXT, "question": "Who jumps?", "answers": {"text": ["brown fox"], "answer_start": [10]}},
           {"context": CONTEXT, "question": "Unanswerable?", "answers": {"text": [], "answer_start": []}}],
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]},
             {"prompt": "2+2?", "response": "4"}],
    "preference": [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away.", "id": 7}],
}

INVALID = [
    ("classification", {"label": "pos"}, "missing field"),
    ("classification", {"text": "x"}, "missing field"),
    ("classification", {"text": 5, "label": "pos"}, "wrong type"),
    ("classification", {"text": "x", "label": True}, "wrong type"),
    ("classification", {"text": "x", "label": [1]}, "wrong type"),
    ("classification", {"text": "  ", "label": 1}, "empty text"),
    ("classification", {"text": "x", "label": 1, "text_pair": 2}, "wrong type"),
    ("qa", {"context": CONTEXT, "question": "q"}, "missing field"),
    ("qa", {"context": CONTEXT, "question": "q", "answers": ["fox"]}, "wrong type"),
    ("qa", {"context": CONTEXT, "question": "q", "answers": {"text": ["fox"], "answer_start": [1, 2]}},
     "answer count mismatch"),
    ("qa", {"context": CONTEXT, "question": "q", "answers": {"text": ["fox"], "answer_start": [11]}},
     "answer_start mismatch"),
    ("qa", {"context": CONTEXT, "question": "q", "answers": {"text": ["fox"], "answer_start": [-1]}},
     "answer_start mismatch"),
    ("qa", {"context": CONTEXT, "question": "q", "answers": {"text": ["dog."], "answer_start": [41]}},
     "answer_start mismatch"),
    ("qa", {"context": CONTEXT, "question": "q", "answers": {"text": ["fox"], "answer_start": ["16"]}},
     "wrong type"),
    ("chat", {"messages": []}, "wrong type"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "incomplete chat"),
    ("chat", {"messages": [{"role": "human", "content": "hi"}]}, "bad role"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                           {"role": "assistant", "content": "y"}]}, "bad role"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "wrong type"),
    ("chat", {"messages": ["hi"]}, "wrong type"),
    ("chat", {"prompt": "only a prompt"}, "missing field"),
    ("chat", {"text": "neither"}, "missing field"),
    ("preference", {"prompt": "p", "chosen": "a"}, "missing field"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen equals rejected"),
    ("preference", ["not", "an", "object"], "not an object"),
]


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_valid_records(fmt):
    for r in VALID[fmt]:
        assert formats.validate(r, fmt) is r
        assert formats.record_text(r, fmt)


@pytest.mark.parametrize("fmt,record,reason", INVALID)
def test_invalid_records_name_the_reason(fmt, record, reason):
    with pytest.raises(FormatError) as e:
        formats.validate(record, fmt)
    assert e.value.reason == reason
    assert reason in str(e.value)


def test_qa_record_text_and_unknown_format():
    assert formats.record_text(VALID["qa"][0], "qa") == CONTEXT + "\nWho jumps?"
    with pytest.raises(ValueError, match="format='ner'"):
        formats.validate({}, "ner")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Source(kind="files", path=str(path))


def test_read_records_counts_and_skips(tmp_path):
    lines = [json.dumps(VALID["preference"][0]), "{broken", json.dumps({"prompt": "p", "chosen": "a"}),
             json.dumps(VALID["preference"][0] | {"rejected": "Hi!"}), "", json.dumps([1])]
    src = _write(tmp_path / "prefs.jsonl", lines)
    stats = ReadStats()
    got = list(formats.read_records(src, "preference", stats))
    assert [w.rsplit(":", 1)[1] for w, _ in got] == ["1"]
    assert stats.skipped == {"malformed json": 1, "preference: missing field": 1,
                             "preference: chosen equals rejected": 1, "preference: not an object": 1}
    assert stats.documents == 1


def test_read_records_strict_names_file_and_line(tmp_path):
    src = _write(tmp_path / "qa.jsonl", [json.dumps(VALID["qa"][0]),
                                         json.dumps(VALID["qa"][0] | {"answers": {"text": ["fox"],
                                                                                  "answer_start": [3]}})])
    with pytest.raises(FormatError, match=r"qa\.jsonl:2: answer_start mismatch"):
        list(formats.read_records(src, "qa", ReadStats(), strict=True))
    bad_json = _write(tmp_path / "b.jsonl", [json.dumps(VALID["qa"][0]), "{", "{}"])
    with pytest.raises(formats.DataError, match=r"b\.jsonl:2: malformed JSON"):
        list(formats.read_records(bad_json, "qa", ReadStats(), strict=True))

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
    ("chat", {"messages": [{"role": "human", "content": "hi"}]}, "unknown role"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                           {"role": "assistant", "content": "y"}]}, "misplaced system"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "wrong type"),
    ("chat", {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
     "empty content"),
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


def test_other_common_sft_shapes_read_as_conversations(tmp_path):
    """ShareGPT's {"conversations": [{"from", "value"}]}, TRL's {"prompt", "completion"} (text or messages) and
    Alpaca's {"instruction", "input", "output"} are chat records (other fields kept); so they train, hold out
    and serve as RL prompts like "messages"."""
    from data import prompts, sft
    from data.tokenizer import ByteTokenizer
    user, reply = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}
    for record in ({"prompt": "What is 2+2?", "completion": "4", "kind": "add"},
                   {"prompt": [user], "completion": [reply], "kind": "add"},
                   {"instruction": "What is 2+2?", "output": "4", "kind": "add"},
                   {"instruction": "What is 2+2?", "input": "  ", "output": "4", "kind": "add"},
                   {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}],
                    "kind": "add"},
                   {"conversations": [user, reply], "kind": "add"}):
        assert formats.validate(record, "chat") == {"messages": [user, reply], "kind": "add"}, record
    alpaca = {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"}
    assert formats.validate(alpaca, "chat")["messages"][0]["content"] == "Add the numbers.\n\n2, 2"
    for bad, message in (({"instruction": 3, "output": "4"}, "'instruction' is int"),
                         ({"prompt": "p", "completion": ""}, r"messages\[1\]\.content is empty"),
                         ({"instruction": "x"}, r"'instruction' \+ 'output'"),
                         ({"conversations": [{"from": "bard", "value": "x"}]}, r"conversations\[0\]\.from='bard'"),
                         ({"conversations": ["hi"]}, r"conversations\[0\] is 'hi'")):
        with pytest.raises(FormatError, match=message):
            formats.validate(bad, "chat")
    path = tmp_path / "trl.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+2?", "completion": "4"}) + "\n")
    (problem,), _ = prompts.read_prompts(str(path), ByteTokenizer(), max_prompt_len=64, strict=True)
    assert list(problem.messages) == [user] and problem.reference == "4"  # the completion is the answer
    records, _ = sft.read_split(str(path), strict=True)
    assert [r for _, r in records] == [{"messages": [user, reply]}]


def test_json_files_are_record_files(tmp_path):
    """A .json file holds records as a JSON array (Alpaca's files), as JSON Lines (Hugging Face's `to_json`
    names them .json), or in SQuAD's layout (one QA record per question, the paragraph's context and the
    article's title added); each record is named by its place in the file."""
    records = [VALID["chat"][0], VALID["chat"][0] | {"id": 2}]
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, wheres in (("array.json", ["[0]", "[1]"]), ("lines.json", ["1", "2"])):
        got = list(formats.read_records(Source(kind="files", path=str(tmp_path / name)), "chat", ReadStats()))
        assert [r for _, r in got] == records and [w.rsplit(":", 1)[1] for w, _ in got] == wheres
    (tmp_path / "null.json").write_text("null")  # one value that is no record: named as such, even under strict
    with pytest.raises(FormatError, match=r"null\.json:1: not an object"):
        list(formats.read_records(Source(kind="files", path=str(tmp_path / "null.json")), "chat", ReadStats(),
                                  strict=True))
    context = "The quick brown fox jumps."
    squad = {"version": "1.1", "data": [{"title": "Foxes", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "Which animal?", "answers": [{"text": "fox", "answer_start": 16}]},
        {"id": "q2", "question": "What does it do?", "answers": [{"text": "jumps", "answer_start": 20}]}]}]}]}
    (tmp_path / "train-v1.1.json").write_text(json.dumps(squad))
    from data import qa
    examples, stats = qa.read_split(str(tmp_path / "train-v1.1.json"), strict=True)
    assert [(e.id, e.question, e.context, e.answers) for e in examples] == [
        ("q1", "Which animal?", context, (("fox", 16),)), ("q2", "What does it do?", context, (("jumps", 20),))]
    squad["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(squad))
    with pytest.raises(FormatError, match=r"bad\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\]: answer_start mismatch"):
        qa.read_split(str(tmp_path / "bad.json"), strict=True)

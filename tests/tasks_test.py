"""data/tasks.py + scripts/make_tasks.py: determinism, disjoint splits, independently checked answers."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from data import chat, formats, sft as sft_data, tasks
from data.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _solve(question: str) -> str:
    """An independent solver that reads only the question text."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\? .*", question):
        return str(sum(int(g) for g in m.groups()))
    if m := re.fullmatch(r"Reverse the word '(\w+)'\. .*", question):
        return "".join(reversed(list(m.group(1))))
    if m := re.fullmatch(r"Sort the letters of '(\w+)' alphabetically\. .*", question):
        letters = list(m.group(1))
        letters.sort(key=ord)
        return "".join(letters)
    if m := re.fullmatch(r"How many times does the letter '(\w)' appear in '(\w+)'\? .*", question):
        return str(sum(1 for ch in m.group(2) if ch == m.group(1)))
    raise AssertionError(f"unparsed question {question!r}")


def _run(out, seed):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tasks.py"), f"--out={out}", f"--seed={seed}",
                    "--n_train=300", "--n_val=40", "--n_test=40"], check=True, capture_output=True, cwd=ROOT)
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_script_is_deterministic_and_outputs_validate(tmp_path):
    a, b, c = _run(tmp_path / "a", 0), _run(tmp_path / "b", 0), _run(tmp_path / "c", 1)
    assert sorted(a) == ["test.jsonl", "test_pref.jsonl", "train.jsonl", "train_pref.jsonl", "val.jsonl",
                         "val_pref.jsonl"]
    assert a == b and a != c
    keys = {}
    for split in ("train", "val", "test"):
        sft = [json.loads(x) for x in a[f"{split}.jsonl"].decode().splitlines()]
        pref = [json.loads(x) for x in a[f"{split}_pref.jsonl"].decode().splitlines()]
        assert len(sft) == len(pref) == {"train": 300, "val": 40, "test": 40}[split]
        for s, p in zip(sft, pref):
            formats.validate(s, "chat")
            formats.validate(p, "preference")
            question, answer = s["messages"][0]["content"], s["messages"][1]["content"]
            assert answer == _solve(question) == s["answer"] == p["chosen"]
            assert p["prompt"] == question and p["rejected"] != p["chosen"]
            assert not tasks.exact_match(p["rejected"], answer) and tasks.exact_match(f" {answer}\n", answer)
            chat.render(s, ByteTokenizer())
        keys[split] = {s["messages"][0]["content"] for s in sft}
        assert len(keys[split]) == len(sft)  # unique problems within a split
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    kinds = {json.loads(x)["kind"] for x in a["train.jsonl"].decode().splitlines()}
    assert kinds == set(tasks.KINDS)


def test_wrong_answers_are_plausible_and_wrong():
    rng = random.Random(0)
    for kind in tasks.KINDS:
        for _ in range(200):
            p = tasks.make_problem(kind, rng)
            wrong = tasks.wrong_answers(p)
            assert wrong and p["answer"] not in wrong and len(set(wrong)) == len(wrong)
            assert all(_solve(p["question"]) != w for w in wrong)
    p = {"kind": "add", "question": "", "answer": "105", "key": "", "args": [57, 48]}
    assert "95" in tasks.wrong_answers(p)  # 57 + 48 with the carry dropped
    p = tasks.make_problem("reverse", random.Random(3))
    w = p["args"][0]
    partial = w[: len(w) // 2][::-1] + w[len(w) // 2:]  # only the first half reversed
    assert partial == p["answer"] or partial in tasks.wrong_answers(p)


def test_a_held_out_set_disjoint_from_an_existing_dataset(tmp_path):
    _run(tmp_path / "a", 0)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tasks.py"), f"--out={tmp_path / 'b'}",
                    "--seed=0", "--n_train=0", "--n_val=0", "--n_test=500", f"--exclude={tmp_path / 'a'}"],
                   check=True, capture_output=True, cwd=ROOT)
    assert sorted(os.listdir(tmp_path / "b")) == ["test.jsonl", "test_pref.jsonl"]  # empty splits not written
    question = lambda path: [json.loads(x)["messages"][0]["content"] for x in open(path)]  # noqa: E731
    new = question(tmp_path / "b" / "test.jsonl")
    old = {q for split in ("train", "val", "test") for q in question(tmp_path / "a" / f"{split}.jsonl")}
    assert len(new) == len(set(new)) == 500 and old.isdisjoint(new)
    # the same seed without the exclusion draws the existing problems first (so the exclusion did something)
    assert len(old & {p["question"] for p in tasks.make_splits(0, {"test": 500})["test"]}) > 100
    assert not old & {p["question"] for p in tasks.make_splits(0, {"test": 500}, exclude=old)["test"]}
    # a missing path or a record with no question: an error naming it, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 3}\n')
    for exclude, message in ((tmp_path / "nope", f"data path '{tmp_path / 'nope'}' does not exist"),
                             (bad, f"{bad}:1: wrong type: 'messages' must be a non-empty list")):
        run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tasks.py"),
                              f"--out={tmp_path / 'c'}", "--n_test=5", f"--exclude={exclude}"],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode != 0 and message in run.stderr and not (tmp_path / "c").exists()


def test_excluded_questions_of_every_record_shape(tmp_path):
    """--exclude reads the question of a preference record (its prompt text, a conversational prompt's or an
    implicit-prompt pair's first user turn), a chat record and a prompt/response record."""
    first = [p["question"] for p in tasks.make_splits(0, {"test": 5})["test"]]
    assert set(first) <= {p["question"] for p in tasks.make_splits(0, {"test": 50})["test"]}  # drawn unless excluded
    records = [{"prompt": first[0], "chosen": "a", "rejected": "b"},
               {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": first[1]},
                           {"role": "assistant", "content": "x"}, {"role": "user", "content": "more?"}],
                "chosen": "a", "rejected": "b"},
               {"messages": [{"role": "user", "content": first[2]}, {"role": "assistant", "content": "a"}]},
               {"prompt": first[3], "response": "a"},
               {"chosen": [{"role": "user", "content": first[4]}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": first[4]}, {"role": "assistant", "content": "b"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tasks.py"), f"--out={tmp_path / 'b'}",
                    "--seed=0", "--n_train=0", "--n_val=0", "--n_test=50", f"--exclude={path}"],
                   check=True, capture_output=True, cwd=ROOT)
    drawn = [json.loads(x)["messages"][0]["content"] for x in open(tmp_path / "b" / "test.jsonl")]
    assert len(drawn) == 50 and not set(first) & set(drawn)


def test_exact_match_and_errors():
    assert tasks.exact_match("42", "42") and tasks.exact_match(" 42 \n", "42")
    assert not tasks.exact_match("042", "42") and not tasks.exact_match("Abc", "abc") and not tasks.exact_match(None, "1")
    assert not tasks.exact_match("", "") and not tasks.exact_match("  ", "")  # no answer: nothing matches it
    with pytest.raises(ValueError, match="expected one of"):
        tasks.make_splits(0, {"train": 2}, kinds=("divide",))
    for bad in (-5, 2.5, True):  # -5 gave every split nothing, silently
        with pytest.raises(ValueError, match=f"split 'train' of {bad!r} problems: expected a whole number >= 0"):
            tasks.make_splits(0, {"train": bad, "val": 2})
    a, b = tasks.make_splits(7, {"train": 20, "test": 5}), tasks.make_splits(7, {"train": 20, "test": 5})
    assert a == b and {p["key"] for p in a["train"]}.isdisjoint(p["key"] for p in a["test"])


def _turns(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def test_generation_problems_take_the_reference_from_the_answer_field():
    """A task record's "answer" is the reference exact match checks (the reply may say more); without a usable
    one, the last assistant turn is; `of` counts every record that could be a problem."""
    records = [("f:1", {"messages": _turns("What is 2 + 2?", "The answer is 4."), "kind": "add", "answer": "4"}),
               ("f:2", {"messages": _turns("copy x", "x")}),  # no answer field: the reply
               ("f:3", {"prompt": "How many?", "response": "Seven.", "answer": 7}),  # a number, as text
               ("f:4", {"messages": _turns("q", "reply"), "answer": ["a"]}),  # not a string or number: the reply
               ("f:5", {"messages": _turns("q", "reply"), "answer": " "}),  # blank: the reply
               ("f:6", {"messages": [{"role": "user", "content": "no reply"}], "answer": "1"})]  # not a problem
    tok = ByteTokenizer()
    problems = sft_data.generation_problems(records, tok, limit=10)
    assert [p.reference for p in problems] == ["4", "x", "7", "reply", "reply"] and problems.of == 5
    assert problems[0].messages == (_turns("What is 2 + 2?", "")[0],) and problems[0].kind == "add"
    assert problems[2].messages == ({"role": "user", "content": "How many?"},)
    first = sft_data.generation_problems(records, tok, limit=2)
    assert [p.reference for p in first] == ["4", "x"] and first.of == 5  # scored 2 of 5
    p = tasks.make_problem("add", random.Random(0))
    (made,) = sft_data.generation_problems([("t:1", tasks.sft_record(p))], tok, limit=1)
    assert (made.reference, made.kind) == (p["answer"], "add")


def test_each_task_configs_tiny_variant_takes_make_tasks_data_whole(tmp_path, caplog):
    """`--config=configs/<mode>.py:tiny` on the files its docstring's make_tasks command writes: no conversation,
    pair or prompt is cut away (sft/reward/dpo's :tiny once kept common.tiny's seq_len 32, which left nothing)."""
    import modes
    from configs import dpo, grpo, ppo, reward, sft
    out = tmp_path / "tasks"
    _run(out, 0)
    caplog.set_level("INFO", logger="lmstack")
    for module in (sft, reward, dpo, grpo, ppo):
        config = module.get_config("tiny")
        for section in ("sft", "pref", "rl"):
            if config.get(section) and config[section].get("val_path", "").startswith("datasets/tasks/"):
                config[section].val_path = str(out / os.path.basename(config[section].val_path))
        config.data.path = str(out / os.path.basename(config.data.path))
        caplog.clear()
        os.makedirs(tmp_path / config.mode)
        modes.get(config).inputs(config, str(tmp_path / config.mode), config.data.batch_size)
        line = next(r.getMessage() for r in caplog.records if "validation" in r.getMessage())
        assert line.count("not used whole: none") + line.count("skipped: none") == 2, (config.mode, line)

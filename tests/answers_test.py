"""data.answer_check: final answers of worked solutions (GSM8K '#### N', MATH \\boxed{}, the last number)
compared by value, the 'final_answer' reward, the question/answer record shapes of public reasoning
datasets as chats and RL prompts, and the check reaching every place a decoded answer is scored."""

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from conftest import tiny_config

import feedback_inputs
import task_eval
import train
from configs import grpo as grpo_config, sft as sft_config
from data import answers, chat, formats, prompts as prompts_data
from data.sft import Problem
from data.tokenizer import ByteTokenizer
from rl import rewards

GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                     "May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"}


@pytest.mark.parametrize("text,want", [
    (GSM8K["answer"], "72"),
    ("so 3 + 4 = 7 #### 1,000", "1,000"),
    ("#### 72 apples in all", "72"),
    ("#### seventy-two", "seventy-two"),
    ("We get $\\boxed{\\frac{1}{2}}$, and 3 more.", "\\frac{1}{2}"),
    ("a {brace} then \\boxed{x^{2}} and \\boxed{42}", "42"),
    ("She has 5 apples, then 12.5 pears, so 17.5.", "17.5"),
    ("It costs $1,250 in total.", "$1,250"),
    ("no number here", ""),
    ("\\boxed{unclosed", ""),
])
def test_final_answer_of_a_text(text, want):
    assert answers.final_answer(text) == want


@pytest.mark.parametrize("prediction,reference,ok", [
    ("The answer is 72.", GSM8K["answer"], True),
    ("48 + 24 = 72 #### 72", "#### 72", True),
    ("So 71", GSM8K["answer"], False),
    ("#### 1000", "#### 1,000", True),
    ("Total: $1000.00", "1000", True),
    ("0.75", "\\boxed{3/4}", True),
    ("half: \\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}", True),
    ("\\boxed{\\frac{1}{3}}", "\\boxed{\\frac{1}{2}}", False),
    ("-5", "#### -5", True),
    ("it falls to \u22125 degrees", "#### -5", True),
    ("5", "#### -5", False),
    ("\\boxed{\\dfrac{1}{2}}", "\\boxed{0.5}", True),  # LaTeX spellings (normal_form)
    ("\\boxed{\\left( 1, 2 \\right)}", "so \\boxed{(1,2)}.", True),
    ("\\boxed{5\\text{ cm}}", "\\boxed{5}", True),
    ("\\boxed{90^\\circ}", "\\boxed{90}", True),
    ("\\boxed{\\text{(A)}}", "\\boxed{\\text{(C)}}", False),  # a text answer is not dropped as units
    ("\\boxed{\\text{(C)}}", "\\boxed{\\text{ (C)}}", True),
    ("72", "", False),  # no reference answer: never right
    ("", "72", False),
])
def test_final_match_compares_final_answers_by_value(prediction, reference, ok):
    assert answers.final_match(prediction, reference) is ok
    assert answers.check("final")(prediction, reference) is ok


_PIECES = st.lists(st.sampled_from(list("0123456789.,-$%/ {}#\n\u2212") + ["\\boxed{", "\\frac", "\\text{",
                                                                       "\\left(", "####", "^\\circ"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _PIECES.map("".join)), st.one_of(st.text(), _PIECES.map("".join)))
def test_final_match_never_raises_on_any_text(a, b):
    """A reward runs on whatever a policy samples: the check must answer, never raise (a raise ends the run)."""
    assert isinstance(answers.final_match(a, b), bool)
    if answers.as_number(answers.normal_form(answers.final_answer(a))) is not None:
        assert answers.final_match(a, a)  # a numeric final answer matches itself


def test_the_exact_check_is_the_tasks_one_and_an_unknown_check_is_named():
    assert answers.check("exact")(" 72 ", "72") and not answers.check("exact")("The answer is 72.", "72")
    with pytest.raises(ValueError, match=r"data.answer_check='fuzzy': expected one of \['exact', 'final'\]"):
        answers.check("fuzzy")


def test_the_final_answer_reward():
    got = rewards.programmatic(["final_answer"], ["so 72", "#### 71", "72 apples"], [GSM8K["answer"]] * 3,
                               ["stop"] * 3, [2, 2, 3])
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0])


@pytest.mark.parametrize("record,user,assistant", [
    (GSM8K, GSM8K["question"], GSM8K["answer"]),
    ({"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 1"},
     "What is $1+1$?", "It is $\\boxed{2}$."),
    ({"query": "2 + 3?", "response": "2 + 3 = 5. The answer is: 5", "type": "GSM_Rephrased"}, "2 + 3?",
     "2 + 3 = 5. The answer is: 5"),
    ({"question": "6 x 7?", "answer": 42}, "6 x 7?", "42"),  # a number answer is its text
])
def test_question_answer_records_are_chats(record, user, assistant):
    got = chat.chat_record(record)
    assert got["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    assert formats.validate(record, "chat")  # SFT reads them


@pytest.mark.parametrize("record", [
    {"context": "The sky is blue.", "question": "What colour?", "answer": "blue"},  # its passage would be lost
    {"question": "Is water wet?", "answer": True, "passage": "..."},  # BoolQ: a label, not a reply
    {"question": "", "answer": "x"},
])
def test_records_that_are_not_question_answer_chats_are_refused_naming_the_shapes(record):
    with pytest.raises(formats.FormatError, match="'question' \\+ 'answer', 'problem' \\+ 'solution'"):
        formats.validate(record, "chat")


def test_gsm8k_records_are_rl_prompts_with_their_solution_as_the_reference(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(GSM8K) + "\n" + json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    problems, _ = prompts_data.read_prompts(str(path), ByteTokenizer(), max_prompt_len=256, strict=True)
    assert [list(p.messages) for p in problems] == [[{"role": "user", "content": GSM8K["question"]}],
                                                    [{"role": "user", "content": "1 + 1?"}]]
    assert problems[0].reference == GSM8K["answer"]
    assert answers.final_match("Altogether 72", problems[0].reference)


def test_prompts_all_too_long_say_how_long_and_what_to_raise(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(GSM8K) + "\n")
    with pytest.raises(prompts_data.DataError, match=r"skipped: 1 prompt too long\); the prompts skipped as too long "
                                                     r"have up to \d+ tokens, more than max_prompt_len=96 "
                                                     r"\(rl.max_prompt_len"):
        prompts_data.read_prompts(str(path), ByteTokenizer(), max_prompt_len=96, strict=False)


def test_the_eval_and_its_predictions_score_with_the_configured_check(monkeypatch):
    problems = [Problem(np.array([1, 2], np.int32), GSM8K["answer"], "gsm8k", ()),
                Problem(np.array([1, 2], np.int32), "#### 5", "gsm8k", ())]
    monkeypatch.setattr(task_eval, "answers_and_finishes",
                        lambda *a, **k: [("48 + 24 = 72", "stop"), ("it is 4", "length")])
    scores = {}
    for check in ("exact", "final"):
        ev = task_eval.exact_match_eval(problems, ByteTokenizer(), width=8, max_new_tokens=4, batch_size=2,
                                        check=check)
        ev._decoder = lambda model: None  # the answers are the patched ones: no model decodes them
        scores[check] = ev(object(), object())
        assert [p["correct"] for p in ev.predictions(object(), object())] == [check == "final", False]
        assert ev.coverage()["exact_match_check"] == check
    assert scores["exact"]["eval/exact_match"] == 0.0
    assert scores["final"] == {"eval/exact_match": 0.5, "eval/exact_match/gsm8k": 0.5, "eval/exact_match_cut": 0.5}


def test_a_reward_that_checks_otherwise_than_the_accuracy_is_warned_about(tmp_path, caplog):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(8)))
    config = tiny_config(str(path), grpo_config, rl__val_path=str(path), rl__rewards=("final_answer",),
                         rl__max_prompt_len=64, rl__eval_generate=0)
    for check, warned in (("exact", True), ("final", False)):
        config.data.answer_check = check
        (tmp_path / check).mkdir()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmstack"):
            feedback_inputs.rl_inputs(config, str(tmp_path / check), 4)
        assert ("rl.rewards has 'final_answer' but data.answer_check='exact'" in caplog.text) is warned


def test_an_unknown_check_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(GSM8K) + "\n")
    work = tmp_path / "run"
    with pytest.raises(ValueError, match="data.answer_check='numeric'"):
        train.train_and_evaluate(tiny_config(str(path), sft_config, data__answer_check="numeric", sft__val_path=""),
                                 str(work))
    assert not (work / "checkpoints").exists()

"""scripts/make_qa_data.py: SQuAD-style records from the stdlib, and its SQuAD 2.0 unanswerable questions."""

import json
import os
import re
import subprocess
import sys

from data import qa as qa_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parameters(text: str, i: int) -> str:
    """The text of the balanced parentheses opening at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    raise AssertionError(f"unbalanced parameters: {text[i:i + 80]!r}")


def test_unanswerable_questions_ask_for_a_default_that_is_not_there(tmp_path):
    out = tmp_path / "qa"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_qa_data.py"), f"--out={out}",
                          "--unanswerable"], capture_output=True, text=True, check=True)
    counts = {s: [int(x) for x in re.search(rf"{s}: \d+ files, (\d+) default-value and (\d+) return questions, "
                                            rf"(\d+) unanswerable", run.stdout).groups()] for s in ("train", "val")}
    assert all(n > 0 for c in counts.values() for n in c), run.stdout
    for split in ("train", "val"):
        examples, stats = qa_data.read_split(str(out / f"{split}.jsonl"), strict=True, unanswerable=True)
        assert not stats.skipped and len({ex.id for ex in examples}) == len(examples) == sum(counts[split])
        none = [ex for ex in examples if not ex.answers]
        assert len(none) == counts[split][2]
        for ex in none:
            asked = re.fullmatch(r"What is the default value of parameter `(\w+)` of `(\w+)`\?", ex.question)
            param, fn = asked.groups()
            # the def is in the context, names the parameter, and gives it no default
            signature = _parameters(ex.context, ex.context.index(f"def {fn}(") + len(f"def {fn}"))
            assert re.search(rf"\b{param}\b", signature), (ex.id, signature)
            assert not re.search(rf"\b{param}\s*(:[^,=)]*)?=", signature), (ex.id, signature)
    # without the flag the same answerable records, none unanswerable
    with open(out / "val.jsonl") as f:
        answerable = [line for line in f if json.loads(line)["answers"]["text"]]
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_qa_data.py"), f"--out={tmp_path / 'v1'}",
                    "--val_fraction=0.1", "--test_fraction=0.1"], capture_output=True, check=True)
    with open(tmp_path / "v1" / "val.jsonl") as f:
        assert f.readlines() == answerable

"""A real extractive QA set from the Python standard library's source (text nobody here wrote).

    python scripts/make_qa_data.py --out=datasets/stdlib_qa

Every non-test .py file of this Python's stdlib is cut into consecutive line-aligned contexts of
at most `--chars` characters. Questions are generated with `ast` about the functions whose `def`
line lies in a context, answered by a span of that same context:
- "What is the default value of parameter `x` of `f`?" -> the default's source text (`None`,
  `'utf-8'`, `sys.maxsize`, ...), for every positional or keyword-only parameter with a default;
- "What does `f` return?" -> the expression of `f`'s only `return <expr>` (nested functions and
  lambdas excluded), when it lies in the same context.
With `--unanswerable` (SQuAD 2.0), also the default-value question about one parameter of `f` that has no
default (the first such, `self` / `cls` excepted), whose `def` lies whole in the context: the question is
as plausible as the others, and the context holds no answer to it (`"answers": {"text": [], ...}`).
Only answers written on one line and at most `--max_answer_chars` long are kept; a function name
defined twice in one context is skipped (ambiguous). Whole files go to train / val / test by a hash
of their stdlib-relative path (`--val_fraction`, `--test_fraction`), so no context, function or
file is shared between splits. Deterministic for a given Python version. Writes
OUT/{train,val,test}.jsonl as SQuAD-style records
{"id", "question", "context", "answers": {"text": [..], "answer_start": [..]}} and prints counts.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import overrides  # noqa: E402
from data import sources  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("chars", 600, "Most characters per context (cut at line ends).", lower_bound=1)
flags.DEFINE_integer("max_answer_chars", 40, "Longest answer kept, in characters.", lower_bound=1)
flags.DEFINE_float("val_fraction", 0.1, "Share of files for validation.")
flags.DEFINE_float("test_fraction", 0.1, "Share of files for test.")
flags.DEFINE_bool("unanswerable", False, "Also ask for the default of a parameter that has none (SQuAD 2.0).")
flags.mark_flags_as_required(["out"])

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(out)


def _returns(fn) -> list[ast.Return]:
    """`return <expr>` statements of fn itself (not of nested functions, classes or lambdas)."""
    found, todo = [], list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def _defaults(fn):
    a = fn.args
    positional = a.posonlyargs + a.args
    yield from zip(positional[len(positional) - len(a.defaults):], a.defaults)
    yield from ((arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)


def _without_default(fn):
    """The first parameter of fn (positional or keyword-only, not self / cls) that has no default, or None."""
    a = fn.args
    positional = a.posonlyargs + a.args
    bare = positional[:len(positional) - len(a.defaults)]
    bare += [arg for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return next((arg for arg in bare if arg.arg not in ("self", "cls")), None)


def unanswerable_records(text: str, rel: str, chunks, line_start: list[int]) -> list[dict]:
    """A default-value question about a parameter with no default, for each function whose def line(s) lie
    whole in one context (so the parameter is there to be asked about) and whose name that context defines once.
    `line_start`: each line's first character offset (make_records')."""
    records = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arg = _without_default(fn)
        if arg is None:
            continue
        d0 = line_start[fn.lineno - 1]
        d1 = line_start[fn.body[0].lineno - 1]  # the def's lines end where its body's first line starts
        for c0, c1 in chunks:
            if c0 <= d0 < c1:
                context = text[c0:c1]
                if d1 <= c1 and context.count(f"def {fn.name}(") == 1:
                    records.append({"id": f"{rel}:{fn.lineno}:{arg.arg}:{fn.name}:none",
                                    "question": f"What is the default value of parameter `{arg.arg}` of `{fn.name}`?",
                                    "context": context, "answers": {"text": [], "answer_start": []}})
                break
    return records


def questions(text: str):
    """(char offset of the def line, function name, question, answer node) for a file's functions."""
    tree = ast.parse(text)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for arg, default in _defaults(fn):
            yield fn, f"What is the default value of parameter `{arg.arg}` of `{fn.name}`?", default
        rets = _returns(fn)
        if len(rets) == 1:
            yield fn, f"What does `{fn.name}` return?", rets[0].value


def make_records(text: str, rel: str, chars: int, max_answer_chars: int, unanswerable: bool = False) -> list[dict]:
    lines = text.splitlines(keepends=True)
    line_start = [0]
    for line in lines:
        line_start.append(line_start[-1] + len(line))

    def char_pos(lineno: int, col_bytes: int) -> int:  # ast columns count UTF-8 bytes
        line = lines[lineno - 1]
        return line_start[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))

    chunks, start = [], 0  # [start, end) character ranges, line-aligned
    while start < len(text):
        end = start
        for ls in line_start:
            if start < ls <= start + chars:
                end = ls
        end = max(end, min(len(text), start + chars))  # a single very long line
        chunks.append((start, end))
        start = end
    records = []
    for fn, question, node in questions(text):
        if node.lineno != node.end_lineno:
            continue
        a0 = char_pos(node.lineno, node.col_offset)
        a1 = char_pos(node.end_lineno, node.end_col_offset)
        answer = text[a0:a1]
        d0 = char_pos(fn.lineno, fn.col_offset)
        if not answer.strip() or len(answer) > max_answer_chars:
            continue
        for c0, c1 in chunks:
            if c0 <= d0 < c1 and c0 <= a0 and a1 <= c1:
                context = text[c0:c1]
                if context.count(f"def {fn.name}(") != 1:
                    break
                records.append({"id": f"{rel}:{node.lineno}:{node.col_offset}:{fn.name}", "question": question,
                                "context": context, "answers": {"text": [answer], "answer_start": [a0 - c0]}})
                break
    return records + (unanswerable_records(text, rel, chunks, line_start) if unanswerable else [])


def main(argv):
    del argv
    root = sources.stdlib_dir()
    os.makedirs(FLAGS.out, exist_ok=True)
    outs = {s: open(os.path.join(FLAGS.out, f"{s}.jsonl"), "w") for s in ("train", "val", "test")}
    counts, files = collections.Counter(), collections.Counter()
    for path in stdlib_files(root):
        rel = os.path.relpath(path, root)
        try:
            text = open(path, encoding="utf-8").read()
            recs = make_records(text, rel, FLAGS.chars, FLAGS.max_answer_chars, FLAGS.unanswerable)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        h = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little") / 2.0**64
        split = "val" if h < FLAGS.val_fraction else "test" if h < FLAGS.val_fraction + FLAGS.test_fraction \
            else "train"
        for r in recs:
            answers = r["answers"]
            assert not answers["text"] or r["context"][answers["answer_start"][0]:][:len(answers["text"][0])] == \
                answers["text"][0], r["id"]
            outs[split].write(json.dumps(r) + "\n")
            counts[(split, r["question"].split()[1] if answers["text"] else "none")] += 1
        files[split] += bool(recs)
    for f in outs.values():
        f.close()
    for split in ("train", "val", "test"):
        print(f"{split}: {files[split]} files, {counts[(split, 'is')]} default-value and "
              f"{counts[(split, 'does')]} return questions" +
              (f", {counts[(split, 'none')]} unanswerable" if FLAGS.unanswerable else ""))


if __name__ == "__main__":
    overrides.run(main, 'make_qa_data.py')

"""Score responses with a trained reward model (a mode 'reward' run); one JSON line per record.

    python scripts/score.py --workdir=runs/rm --data=pairs.jsonl [--out=scored.jsonl] [--batch_size=16] [--step=N]

Records (JSONL, any other fields kept as they are):
- {"prompt", "response"}: "reward" is added;
- a chat record {"messages": [..., user turn, assistant turn]} (an SFT file): its last assistant turn is the
  response to the conversation before it; "reward" is added;
- {"prompt", "chosen", "rejected"}: "reward_chosen" and "reward_rejected" are added, and the summary
  gives the file's pairwise accuracy (r_chosen > r_rejected, as the training eval counts it).
Each response is rendered exactly as training rendered a pair's side (data/preference.py): the chat
`<|user|> prompt <|end|> <|assistant|> response <|end|>` of data/chat.py, its first data.seq_len tokens
the inputs (a longer one is counted as 'truncated', as training counts it; the reward is then read at
the last kept input token),
and scored at its last token by the run's RewardModel (model/build.reward_model, the saved config, the
latest checkpoint or --step). Batches of --batch_size rows, the last one padded: one compile.

Output: the records with their rewards, in input order, to --out (written whole at the end through a
temporary file) or stdout; then one JSON summary line on stderr: records, pairs, responses (scored
alone), scores (rewards computed), mean and std of all of them, accuracy (pairs only, else null),
truncated (responses cut). Errors (no workdir or checkpoint, a run of another mode, a missing data
file, a line that is not JSON or a record of neither shape, named file:line) print one
`score.py: error: ...` line and exit 1; nothing is written to --out.
Runtime: a second or two of compilation, then thousands of responses a second for the default model.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
from data import chat, formats, preference, tokenizer as tokenizer_lib  # noqa: E402
from data.pipeline import pack_window  # noqa: E402
from model import build  # noqa: E402

FLAGS = flags.FLAGS
ROW_KEYS = ("inputs", "positions", "segment_ids")


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The flags, into `fv` (tests pass a fresh FlagValues and patch FLAGS)."""
    flags.DEFINE_string("workdir", None, "A reward-model run (mode 'reward': checkpoints/, tokenizer.json).",
                        flag_values=fv)
    flags.DEFINE_string("data", None, "JSONL of {prompt, response} or {prompt, chosen, rejected} records.",
                        flag_values=fv)
    flags.DEFINE_string("out", "", "Write the scored records here (default: stdout).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "Responses per forward pass.", flag_values=fv)
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.", flag_values=fv)


def load(workdir: str, step: int | None = None):
    """(config, model, params, tokenizer, step) of a reward-model run; another mode is an error naming it."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir}: no such directory")
    mngr = checkpoint.open_read_only(workdir)
    try:
        steps = sorted(mngr.all_steps())
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise FileNotFoundError(f"--workdir={workdir}: no checkpoint for step {step}; available: {steps}")
        mode = checkpoint.saved_config(mngr, step).get("mode")
    finally:
        mngr.close()
    if mode != "reward":
        raise ValueError(f"--workdir={workdir} is a run of mode {mode!r}; score.py needs a reward model "
                         f"(mode 'reward', configs/reward.py)")
    config_dict, params, step = checkpoint.load_for_inference(workdir, step)
    config = ml_collections.ConfigDict(config_dict)
    tok_path = os.path.join(workdir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} not found: the run's tokenizer is needed to render the records")
    tok = tokenizer_lib.load_tokenizer(tok_path)
    template = os.path.join(workdir, "chat_template.json")
    if os.path.exists(template):  # the run rendered pairs with this template: so must we
        with open(template) as f:
            chat.check_template_spec(json.load(f))
    return config, build.reward_model(config, tok.vocab_size), params, tok, step


def read_records(path: str) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(where, record, the fields to score: ('response',) or ('chosen', 'rejected')) of every line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data={path}: no such file")
    out = []
    with open(path, encoding="utf-8-sig") as f:  # a leading byte-order mark is not part of record 1
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a {type(record).__name__}, expected a JSON object")
            try:
                record = formats.explicit_prompt(record)  # an implicit-prompt pair: its shared turns are the prompt
            except formats.FormatError as e:
                raise ValueError(f"{where}: {e}") from None
            if "chosen" in record or "rejected" in record:
                fields = ("chosen", "rejected")
            elif "response" in record:
                fields = ("response",)
            elif "messages" in record and "prompt" not in record:
                record, fields = _chat_response(record, where), ("response",)
            else:
                fields = ()
            if "prompt" not in record or any(k not in record for k in fields) or not fields:
                raise ValueError(f"{where}: expected {{\"prompt\", \"response\"}}, {{\"prompt\", \"chosen\", "
                                 f"\"rejected\"}} or {{\"messages\"}}, got the fields {sorted(record)}")
            out.append((where, record, fields))
    if not out:
        raise ValueError(f"--data={path}: no records")
    return out


def _chat_response(record: dict, where: str) -> dict:
    """A chat record as {"prompt": the turns before its last one, "response": that assistant turn's text}
    (other fields kept, "messages" dropped: the output line carries prompt and response instead)."""
    try:
        messages = chat.messages_of(record)
    except chat.ChatError as e:
        raise ValueError(f"{where}: {e}") from None
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise ValueError(f"{where}: a chat record to score must end with a user turn and the assistant's reply, "
                         f"got the roles {[m['role'] for m in messages]}")
    rest = {k: v for k, v in record.items() if k != "messages"}
    return {**rest, "prompt": messages[:-1], "response": messages[-1]["content"]}


def render(record: dict, field: str, tok, seq_len: int) -> tuple[dict[str, np.ndarray], bool]:
    """One response as a training row (data/preference.py's side of a pair) and whether it was cut."""
    ids, _ = chat.render(preference.conversation(record, field), tok)
    width = seq_len + 1
    cut = len(ids) > seq_len  # as training counts a side: its last token is then no input, the reward is read before it
    ids = ids[:width]
    tokens = np.concatenate([ids, np.full(width - len(ids), tok.pad_id, np.int32)]).astype(np.int32)
    segments = np.concatenate([np.ones(len(ids), np.int32), np.zeros(width - len(ids), np.int32)])
    row = pack_window(tokens, segments)
    return {k: row[k] for k in ROW_KEYS}, cut


def rewards(model, params, rows: list[dict], batch_size: int) -> np.ndarray:
    """Rewards [len(rows)], batch by batch; the last batch padded with empty rows (a fixed shape)."""
    fn = jax.jit(lambda p, tokens, positions, segments: model.apply({"params": p}, tokens, positions, segments))
    out = np.zeros(len(rows), np.float32)
    for lo in range(0, len(rows), batch_size):
        group = rows[lo:lo + batch_size]
        pad = [{k: np.zeros_like(v) for k, v in group[0].items()}] * (batch_size - len(group))
        batch = [np.stack([r[k] for r in group + pad]) for k in ROW_KEYS]
        out[lo:lo + len(group)] = np.asarray(fn(params, *batch))[:len(group)]
    return out


def score(workdir: str, data: str, *, batch_size: int = 16, step: int = -1) -> tuple[list[dict], dict]:
    """(the scored records, the summary): the script without the command line."""
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} must be >= 1")
    config, model, params, tok, _ = load(workdir, None if step < 0 else step)
    records = read_records(data)
    rows, truncated = [], 0
    for where, record, fields in records:
        for field in fields:
            try:
                row, cut = render(record, field, tok, int(config.data.seq_len))
            except chat.ChatError as e:
                raise ValueError(f"{where}: {field}: {e}") from None
            rows.append(row)
            truncated += cut
    r = rewards(model, params, rows, batch_size)
    scored, i, correct, pairs = [], 0, 0, 0
    for _, record, fields in records:
        if fields == ("response",):
            scored.append({**record, "reward": float(r[i])})
        else:
            scored.append({**record, "reward_chosen": float(r[i]), "reward_rejected": float(r[i + 1])})
            correct += int(r[i] > r[i + 1])
            pairs += 1
        i += len(fields)
    summary = {"records": len(records), "pairs": pairs, "responses": len(records) - pairs, "scores": len(r),
               "mean": float(np.mean(r)), "std": float(np.std(r)),
               "accuracy": correct / pairs if pairs else None, "truncated": truncated}
    return scored, summary


def write(scored: list[dict], out: str) -> None:
    """JSON lines to `out` (whole or not at all: a temporary file renamed at the end) or stdout."""
    lines = "".join(json.dumps(row) + "\n" for row in scored)
    if not out:
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(lines)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        if not FLAGS.workdir or not FLAGS.data:
            raise ValueError("--workdir and --data are required")
        scored, summary = score(FLAGS.workdir, FLAGS.data, batch_size=FLAGS.batch_size, step=FLAGS.step)
        write(scored, FLAGS.out)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"score.py: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'score.py')

"""Sample text from a trained run, streamed to the terminal as it is generated.

    python scripts/generate.py --workdir=runs/default --prompt="def " --max_new_tokens=300 \
        --temperature=0.8 --top_k=40 [--top_p=0.95] [--min_p=0.05] [--repetition_penalty=1.1] \
        [--num_samples=2] [--seed=0] [--stop="\n\n"]
    echo "class " | python scripts/generate.py --workdir=runs/default        # prompt from stdin
    python scripts/generate.py --workdir=runs/sft --chat --prompt="What is 2+3?"   # SFT runs

Loads the latest checkpoint (or --step), its saved config and the run's tokenizer, and decodes
with the project's KV-cache decoder (model/decode.py): prefill once, then one compiled decode
loop, chunk by chunk, each chunk's text printed as it comes. LoRA runs decode with their
adapters as trained. --chat renders the prompt as a user turn in the run's chat template and
stops at <|end|>; otherwise generation stops at <eos>, --stop strings or --max_new_tokens.
The context (prompt + new tokens) may exceed the training window for RoPE models (positions
the model never saw: quality degrades); learned positions stop at model.max_len.
Runtime: about 2-3 s of compilation, then ~500 tokens/s on the default model (2 CPU cores).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402
import serving  # noqa: E402
from data import chat  # noqa: E402
from model import decode  # noqa: E402
from model.sampling import Sampling  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The flags, into `fv` (tests pass a fresh FlagValues and patch FLAGS)."""
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tokenizer.json).", flag_values=fv)
    flags.DEFINE_string("prompt", None, "Text to continue; '-' or absent with a piped stdin: read stdin.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to sample.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.", flag_values=fv)
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus: the smallest set of most likely tokens holding this mass.", flag_values=fv)
    flags.DEFINE_float("min_p", 0.0, "Keep tokens at least this fraction as likely as the most likely one.", flag_values=fv)
    flags.DEFINE_float("repetition_penalty", 1.0, "> 1 discourages tokens already in the prompt or output.", flag_values=fv)
    flags.DEFINE_float("presence_penalty", 0.0, "Subtracted from tokens already in the output.", flag_values=fv)
    flags.DEFINE_float("frequency_penalty", 0.0, "Subtracted per occurrence in the output.", flag_values=fv)
    flags.DEFINE_multi_string("stop", [], "Stop strings (repeatable); the text ends before the first one.", flag_values=fv)
    flags.DEFINE_integer("num_samples", 1, "Independent samples (seeds seed, seed+1, ...).", flag_values=fv,
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same text.", flag_values=fv)
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.", flag_values=fv)
    flags.DEFINE_bool("kv_int8", False, "Cache keys/values as int8 (+ a scale per token and head).", flag_values=fv)
    flags.DEFINE_integer("context", 0, "Cache length in tokens; 0 = max(data.seq_len, prompt + max_new_tokens).", flag_values=fv)
    flags.DEFINE_bool("chat", False, "Send the prompt as a user turn in the run's chat template (SFT runs) and "
                      "stop at <|end|>.", flag_values=fv)


def load(workdir: str, step: int | None = None):
    """(config, model, params, tokenizer, step) of a run, the model LoRA-wrapped when the run used LoRA; the
    server's loader (serving.load_run): a PPO run's policy is its backbone, a non-LM run is refused by name."""
    run = serving.load_run(workdir, step)
    return run.config, run.model, run.params, run.tokenizer, run.step


def chat_prompt(workdir: str, text: str, tok) -> np.ndarray:
    template = os.path.join(workdir, "chat_template.json")
    if not os.path.exists(template):
        raise ValueError(f"--chat: {template} not found (is {workdir} an SFT run?)")
    with open(template) as f:
        chat.check_template_spec(json.load(f))
    return chat.render_prompt([{"role": "user", "content": text}], tok)


MAX_AUTO_CONTEXT = 65_536


def _setup():
    """(decoder, prompt ids, stop ids, text shown first, sampling, params, tokenizer) from the flags."""
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    if not os.path.isdir(FLAGS.workdir):
        raise ValueError(f"--workdir={FLAGS.workdir}: no such directory")
    if not 0 <= FLAGS.seed <= 2**32 - max(FLAGS.num_samples, 1):  # sample i draws with seed + i, a uint32
        raise ValueError(f"--seed={FLAGS.seed} must be in [0, 2**32 - num_samples]")
    text = FLAGS.prompt
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    text = text or ""
    config, model, params, tok, step = load(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
    if FLAGS.chat:
        # the server's chat stop ids (openai_api.py): the turn's end, or <eos>
        prompt, stop_ids, shown = chat_prompt(FLAGS.workdir, text, tok), [tok.special_id(chat.END_TOKEN), tok.eos_id], ""
    else:
        prompt = tok.encode(text) if text else np.array([tok.eos_id], np.int32)
        stop_ids, shown = [tok.eos_id], text
    context = FLAGS.context or max(int(config.data.seq_len), len(prompt) + FLAGS.max_new_tokens)
    if not FLAGS.context and context > MAX_AUTO_CONTEXT:  # the KV cache is allocated for the whole context
        raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens} with a {len(prompt)}-token prompt needs a KV cache "
                         f"of {context} tokens (more than {MAX_AUTO_CONTEXT} is never chosen for you): give --context "
                         f"to set it, or fewer new tokens")
    settings = Sampling(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
                        repetition_penalty=FLAGS.repetition_penalty, presence_penalty=FLAGS.presence_penalty,
                        frequency_penalty=FLAGS.frequency_penalty)
    decoder = decode.Decoder(model, batch=1, cache_len=context, kv_int8=FLAGS.kv_int8)
    decoder.check_prompt(prompt, FLAGS.max_new_tokens)
    print(f"# {FLAGS.workdir} step {step}, prompt {text!r} ({len(prompt)} tokens), context {context}",
          file=sys.stderr)
    if not FLAGS.chat and os.path.exists(os.path.join(FLAGS.workdir, "chat_template.json")):
        print("# note: this run was trained on chat turns: add --chat to send the prompt as a user turn (it is "
              "continued as plain text now)",
              file=sys.stderr)
    unknown = int(np.count_nonzero(np.asarray(prompt) == tok.special_id("<unk>")))
    if unknown:  # a char vocabulary (the training data's characters) lacks some of the prompt's
        print(f"# warning: {unknown} of the prompt's {len(prompt)} tokens are <unk>: characters the run's "
              f"{tok.kind} tokenizer does not have", file=sys.stderr)
    return decoder, prompt, stop_ids, shown, settings, params, tok


class Printer:
    """Prints a sample's new text as its tokens arrive. Held back: a partial UTF-8 character (a byte-level
    token can end inside one) and, with stop strings, the last characters that could begin one; text
    from a stop string on is never printed."""

    def __init__(self, tok, stop_ids, stop_strings=(), out=None):
        self.tok, self.stop_ids, self.stops = tok, set(stop_ids), [s for s in stop_strings if s]
        self.out = out or sys.stdout
        self.ids, self.shown = [], 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def text(self, ids) -> str:
        return self.tok.decode([t for t in ids if t not in self.stop_ids])

    def __call__(self, row: int, ids: list[int]) -> None:
        self.ids += ids
        text = self.text(self.ids)
        if text.endswith("\ufffd"):
            return
        hits = [text.find(s) for s in self.stops if s in text]
        self._show(text[:min(hits)] if hits else text[:len(text) - self.hold])

    def finish(self, completion) -> None:
        self._show(completion.text)

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    decoder, prompt, stop_ids, shown, settings, params, tok = _setup()  # bad flags or workdir: one line
    for i in range(FLAGS.num_samples):
        sys.stdout.write(shown)
        printer = Printer(tok, stop_ids, FLAGS.stop)
        out = decoder.generate(params, [prompt], max_new_tokens=FLAGS.max_new_tokens, sampling=settings,
                               seeds=[FLAGS.seed + i], stop_ids=stop_ids, stop_strings=FLAGS.stop,
                               detokenize=printer.text, on_tokens=printer)[0]
        printer.finish(out)
        print()
        print(f"# {len(out.tokens)} tokens, finish: {out.finish_reason}", file=sys.stderr)
        if i + 1 < FLAGS.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'generate.py')

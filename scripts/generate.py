"""Sample text from a trained run: see what the model learned.

    python scripts/generate.py --workdir=runs/default --prompt="def " --max_new_tokens=300 \
        --temperature=0.8 --top_k=40 [--num_samples=2] [--seed=0]

Loads the latest checkpoint, its saved config and the run's tokenizer. Decoding recomputes
the full window each token (simple and exact; the KV-cache engine is model/decode.py's job
later). Windows longer than data.seq_len keep the most recent tokens.
"""

from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import checkpoint  # noqa: E402
from data import chat, tokenizer as tokenizer_lib  # noqa: E402
from model import build, lora  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tokenizer.json).")
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to sample.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
    flags.DEFINE_integer("num_samples", 1, "Independent samples.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
    flags.DEFINE_bool("chat", False, "Send --prompt as a user turn in the run's chat template (SFT runs) and "
                      "stop at <|end|>.")


@functools.partial(jax.jit, static_argnames="model")
def next_logits(model, params, buf_1xW, n):
    """Logits after the window's first n tokens. Compiled once per (model, window size) in a process,
    shared by every sample (a jit inside `sample` had traced and compiled it again for each)."""
    window = buf_1xW.shape[1]
    seg_1xW = (jnp.arange(window) < n).astype(jnp.int32)[None, :]
    pos_1xW = jnp.arange(window, dtype=jnp.int32)[None, :]
    logits_1xWxV = model.apply({"params": params}, buf_1xW, pos_1xW, seg_1xW)
    return logits_1xWxV[0, n - 1]


def sample(model, params, prompt_ids: np.ndarray, *, window: int, max_new_tokens: int, temperature: float,
           top_k: int, seed: int, stop_id: int | None = None) -> list[int]:
    """Autoregressive sampling with a fixed-size window (one compiled forward: next_logits)."""
    key = jax.random.key(seed)
    ids = list(int(i) for i in prompt_ids)
    for _ in range(max_new_tokens):
        ctx = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, :len(ctx)] = ctx
        logits_V = next_logits(model, params, jnp.asarray(buf), len(ctx))
        if temperature <= 0:
            nxt = int(jnp.argmax(logits_V))
        else:
            logits_V = logits_V / temperature
            if top_k > 0:
                kth = jnp.sort(logits_V)[-min(top_k, logits_V.shape[0])]
                logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits_V))
        ids.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return ids[len(prompt_ids):]


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    config_dict, params, step = checkpoint.load_for_inference(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
    config = ml_collections.ConfigDict(config_dict)
    tok = tokenizer_lib.load_tokenizer(os.path.join(FLAGS.workdir, "tokenizer.json"))
    model = build.transformer(config, tok.vocab_size)
    if "lora" in config and config.lora.rank > 0:  # fold the adapters in: a plain model
        params = lora.merged_params(dict(params), alpha=config.lora.alpha, rank=config.lora.rank)
    if FLAGS.chat:
        template = os.path.join(FLAGS.workdir, "chat_template.json")
        if not os.path.exists(template):
            raise app.UsageError(f"--chat: {template} not found (is {FLAGS.workdir} an SFT run?)")
        with open(template) as f:
            chat.check_template_spec(json.load(f))
        prompt = chat.render_prompt([{"role": "user", "content": FLAGS.prompt}], tok)
        stop_id, shown = tok.special_id(chat.END_TOKEN), ""
    else:
        prompt = tok.encode(FLAGS.prompt) if FLAGS.prompt else np.array([tok.eos_id], np.int32)
        stop_id, shown = tok.eos_id, FLAGS.prompt
    print(f"# {FLAGS.workdir} step {step}, prompt {FLAGS.prompt!r}", file=sys.stderr)
    for i in range(FLAGS.num_samples):
        out = sample(model, params, prompt, window=config.data.seq_len, max_new_tokens=FLAGS.max_new_tokens,
                     temperature=FLAGS.temperature, top_k=FLAGS.top_k, seed=FLAGS.seed + i, stop_id=stop_id)
        print(shown + tok.decode(out))
        if i + 1 < FLAGS.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Serve a trained run over an OpenAI-compatible HTTP API, with continuous batching.

    python scripts/serve.py --workdir=runs/sft [--step=-1] [--host=127.0.0.1] [--port=8000] [--slots=8] \\
        [--context=<data.seq_len>] [--max_queue=64] [--api_key=KEY] [--insecure] [--model_name=NAME] \
        [--max_body_bytes=1048576] [--chunk=4] [--warmup] [--compile_cache=DIR]

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sft", "prompt": "def ", "max_tokens": 32, "temperature": 0}'
    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sft", "messages": [{"role": "user", "content": "reverse abc"}], "stream": true}'

    from openai import OpenAI          # the official client, unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "sort 3 1 2"}],
                                   temperature=0).choices[0].message.content

The model id is the workdir's name (or --model_name). /v1/chat/completions needs a run with a chat
template (an SFT run); /v1/completions works on any causal run. `--slots` requests decode together;
a new one joins the running batch at the next decode step, and a finished or abandoned one frees its
slot at once. GET /health shows slots in use and the queue. It listens on 127.0.0.1 only unless
--host says otherwise, and then it needs --api_key (or LMSTACK_API_KEY; clients send
`Authorization: Bearer KEY`) or --insecure.

Speed: without --warmup, the first use of each prefill shape (prompt-length bucket x group size) and
decode loop (attention window x busy-slot bucket) compiles it (seconds); --warmup compiles them all
before /health answers. Measured (README, Inference speed; 2-core AMD Zen 2, default
configs/pretrain_causal.py model, random weights, 32 slots, context 256): one request at a time
about 700 tokens/s, 32 concurrent requests about 2,600 tokens/s in all; on a 2-core AVX512-BF16
Zen 5 about 1,600 and 6,500 tokens/s. Not yet measured on a GPU.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tokenizer.json, chat_template.json).")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; beyond loopback needs --api_key or --insecure.")
    flags.DEFINE_integer("port", 8000, "TCP port.")
    flags.DEFINE_integer("slots", 8, "Decode slots: requests generated together.")
    flags.DEFINE_integer("context", 0, "Tokens per request, prompt + completion; 0 = the run's data.seq_len.")
    flags.DEFINE_bool("kv_int8", False, "Cache keys/values as int8 (+ a scale per token and head): ~half the "
                      "memory of a bf16 cache.")
    flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; more get HTTP 429.")
    flags.DEFINE_string("api_key", os.environ.get("LMSTACK_API_KEY"),
                        "Require 'Authorization: Bearer KEY' on /v1/* (default: $LMSTACK_API_KEY).")
    flags.DEFINE_alias("api-key", "api_key")
    flags.DEFINE_bool("insecure", False, "Allow a non-loopback --host without an API key.")
    flags.DEFINE_string("model_name", None, "Model id clients ask for; default: the workdir's name.")
    flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body; larger gets HTTP 413.")
    flags.DEFINE_integer("chunk", 4, "Decode steps between admissions (1-4 keeps a new request's wait short).")
    flags.DEFINE_bool("warmup", False, "Compile every prefill and decode loop before answering /health (about "
                      "70 s for 32 slots, context 256, 2 CPU cores); without it each compiles on first use (a few "
                      "seconds' stall for the request that needs it).")
    flags.DEFINE_string("compile_cache", "", "JAX persistent compilation cache directory: a restart loads the "
                        "compiled programs instead of compiling them again ('' = off).")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    import openai_api
    if not FLAGS.workdir:  # these errors: one `serve.py: error:` line (overrides.run)
        raise ValueError("--workdir is required")
    openai_api.check_bind(FLAGS.host, FLAGS.api_key, FLAGS.insecure)
    for name in ("slots", "max_queue", "chunk", "max_body_bytes"):
        if getattr(FLAGS, name) < 1:
            raise ValueError(f"--{name}={getattr(FLAGS, name)} must be >= 1")

    import uvicorn

    import hostenv
    import serving
    from model import decode
    hostenv.compile_cache(FLAGS.compile_cache)
    run = serving.load_run(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
    context = FLAGS.context or int(run.config.data.seq_len)
    try:
        decoder = decode.Decoder(run.model, batch=FLAGS.slots, cache_len=context, n_top=20, chunk=FLAGS.chunk,
                                 kv_int8=FLAGS.kv_int8)
    except ValueError as e:  # e.g. --context beyond a learned-position table
        raise ValueError(f"{FLAGS.workdir}: {e}") from None
    engine = serving.Engine(decoder, run.params, detokenize=run.tokenizer.decode, max_queue=FLAGS.max_queue)
    if FLAGS.warmup:
        start = time.perf_counter()
        engine.warm_up()
        print(f"# compiled {len(decoder.loop_variants(engine.chunk))} decode loops and the prefills in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    engine.start()
    name = FLAGS.model_name or run.name
    api = openai_api.make_app(engine, run.tokenizer, model_name=name, chat=run.chat, api_key=FLAGS.api_key,
                              max_body_bytes=FLAGS.max_body_bytes)
    print(f"# serving {FLAGS.workdir} step {run.step} as {name!r} on http://{FLAGS.host}:{FLAGS.port}/v1 "
          f"({FLAGS.slots} slots, context {context}, chat {'on' if run.chat else 'off: no chat template'})",
          file=sys.stderr)
    try:
        uvicorn.run(api, host=FLAGS.host, port=FLAGS.port, log_level="warning")
    finally:
        engine.stop()


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'serve.py')

"""Server throughput: N concurrent requests vs the same requests one at a time (continuous batching).

    python scripts/bench_serve.py [--workdir=RUN] [--requests=32] [--max_tokens=64] [--slots=32] [--rounds=3]

Starts scripts/serve.py as its own process on a free loopback port (the real server: uvicorn,
the engine thread, HTTP), then, from this process with the official `openai` client, alternates
rounds: all requests sent one after another (each waits for the previous answer), then all at
once from as many client threads (started, with their connections, before the timed rounds).
Prompts are distinct 16-token snippets; temperature 0. Reports per mode: aggregate completion
tokens/s, p50 / p95 request latency, the share of a core this client process used (it runs on the
server's cores), and the median over rounds of the per-round throughput ratio (concurrent /
sequential). Without --workdir it saves the default configs/pretrain_causal.py model with random
weights in a temporary run (speed does not depend on the weights; a request may end early at
<eos>, and only generated tokens count).
Runtime: about 2 minutes at the defaults on 2 CPU cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

import overrides  # noqa: E402

flags.DEFINE_string("workdir", None, "Run to serve; default: a random-weight default model.")
flags.DEFINE_integer("requests", 32, "Requests per round.")
flags.DEFINE_integer("max_tokens", 64, "New tokens per request.")
flags.DEFINE_integer("slots", 32, "Server decode slots.")
flags.DEFINE_integer("rounds", 3, "Alternating (sequential, concurrent) rounds.")
flags.DEFINE_integer("context", 256, "Server context (prompt + new tokens).")
flags.DEFINE_integer("chunk", 0, "Server --chunk (decode steps between admissions); 0 = the server's default.")
FLAGS = flags.FLAGS


def random_run(directory: str) -> str:
    """The default config's model with random weights, saved as a run scripts/serve.py can load."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import checkpoint
    from configs import pretrain_causal
    from data import tokenizer as tokenizer_lib
    from model import build
    config = pretrain_causal.get_config()
    tok = tokenizer_lib.ByteTokenizer()
    model = build.transformer(config, tok.vocab_size)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    workdir = os.path.join(directory, "default")
    checkpoint.save_params(workdir, 0, params, config.to_dict())
    tokenizer_lib.save_tokenizer(tok, os.path.join(workdir, "tokenizer.json"))
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), f"--workdir={workdir}", f"--port={port}",
           f"--slots={FLAGS.slots}", f"--context={FLAGS.context}", f"--max_queue={4 * FLAGS.requests}", "--warmup"]
    cmd += [f"--chunk={FLAGS.chunk}"] if FLAGS.chunk else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("serve.py did not answer /health within 300 s")


def main(argv):
    del argv
    import logging
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one log line per request otherwise
    from openai import OpenAI
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    workdir = FLAGS.workdir or random_run(tmp)
    model = os.path.basename(os.path.normpath(workdir))
    port = free_port()
    proc = start_server(workdir, port)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    words = "the cat sat on a mat while dogs ran past old red barns and green fields".split()
    prompts = [" ".join(words[i % len(words):] + words[:i % len(words)])[:16 + i % 7] for i in range(FLAGS.requests)]

    def ask(prompt):
        t = time.perf_counter()
        r = client.completions.create(model=model, prompt=prompt, max_tokens=FLAGS.max_tokens, temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens

    def sequential():
        t = time.perf_counter()
        out = [ask(p) for p in prompts]
        return time.perf_counter() - t, out

    # one client thread per request, started once (and their connections kept) before the timed rounds
    pool = concurrent.futures.ThreadPoolExecutor(len(prompts))

    def concurrent_():
        t = time.perf_counter()
        out = list(pool.map(ask, prompts))
        return time.perf_counter() - t, out

    try:
        concurrent_()  # warm-up: compiles the prefill buckets and the decode windows
        sequential()
        rounds = []
        for r in range(FLAGS.rounds):
            row = {}
            for name, fn in (("sequential", sequential), ("concurrent", concurrent_)):
                cpu0 = time.process_time()
                wall, out = fn()
                client_cpu = time.process_time() - cpu0  # this client's own CPU time: it shares the cores
                lat = sorted(x[0] for x in out)
                row[name] = {"tokens_per_s": sum(x[1] for x in out) / wall, "wall_s": wall,
                             "client_cpu_share": client_cpu / wall,
                             "p50_s": statistics.median(lat), "p95_s": lat[int(0.95 * (len(lat) - 1))],
                             "tokens": sum(x[1] for x in out)}
                time.sleep(0.5)
            row["ratio"] = row["concurrent"]["tokens_per_s"] / row["sequential"]["tokens_per_s"]
            print(f"round {r}: sequential {row['sequential']['tokens_per_s']:.0f} tok/s, concurrent "
                  f"{row['concurrent']['tokens_per_s']:.0f} tok/s, ratio {row['ratio']:.2f}; client CPU "
                  f"{row['sequential']['client_cpu_share']:.2f} / {row['concurrent']['client_cpu_share']:.2f} "
                  f"of a core", file=sys.stderr)
            rounds.append(row)
    finally:
        pool.shutdown()
        proc.terminate()
        proc.wait(timeout=30)
    med = lambda mode, key: statistics.median(r[mode][key] for r in rounds)  # noqa: E731
    import bench_decode  # its cpu_model(): name, family/model and vector extensions (scripts/ is on the path)
    cpu = bench_decode.cpu_model()
    print(json.dumps({"what": "serve", "requests": FLAGS.requests, "max_tokens": FLAGS.max_tokens,
                      "slots": FLAGS.slots, "ratio_median": statistics.median(r["ratio"] for r in rounds),
                      **{f"{m}_{k}": med(m, k) for m in ("sequential", "concurrent")
                         for k in ("tokens_per_s", "p50_s", "p95_s", "client_cpu_share")}, "cpu": cpu}))


if __name__ == "__main__":
    overrides.run(main, 'bench_serve.py')

"""Training throughput of a config on this machine, optionally side by side with PyTorch.

    python scripts/benchmark.py --config=configs/shakespeare_char.py            # JSON line
    python scripts/benchmark.py --config=configs/shakespeare_char.py --vs-torch \
        [--torch-variants=f32,bf16,bf16_compile] [--torch-arch=gpt2|llama]       # bench_torch.py
    python scripts/benchmark.py --measure-peak [--peak-torch]                   # matmul peaks (and PyTorch's)
    python scripts/benchmark.py --config=configs/pretrain_mini.py --vs-peak     # MFU, interleaved
    python scripts/benchmark.py --config=... --what=eval|data                    # other paths
    python scripts/benchmark.py --config=... --what=decode [--vs-hf]             # KV decoding (bench_decode.py)
    python scripts/benchmark.py --config=... --what=compile [--layers=24]        # scan / remat
    python scripts/benchmark.py --config=configs/pretrain_mlm.py --what=mode     # a mode vs causal (bench_modes.py)

Prints JSON: tokens_per_s, step_ms, model_flops_per_token, achieved_gflops, mfu (against
--peak_gflops, default config.train.peak_flops). Timing: compile once, warm up, then
timed blocks of steps run back to back (see `timed`). These 2-core machines switch between
fast and slow states every few seconds, so --vs-torch alternates short blocks of our steps (here)
and PyTorch's (its own persistent process per variant) and reports the median of per-round ratios
(torch extras: requirements-dev.txt).

--gpt2 makes our model GPT-2 shaped (GELU MLP with d_ff = 4 d, LayerNorm, learned positions,
biases) so a comparison is at exactly the same parameter count; --vs-torch implies it unless
--torch-arch=llama (then the config's own RoPE/RMSNorm/SwiGLU model against HF Llama).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import bench_decode  # noqa: E402  (scripts/: --what=decode)
import bench_torch  # noqa: E402  (scripts/: --vs-torch)
import hostenv  # noqa: E402
import objectives  # noqa: E402
import optim  # noqa: E402
import overrides  # noqa: E402
import sharding  # noqa: E402
import steps  # noqa: E402
from model import build, layers  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "Config to benchmark.", lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed steps (per round with --vs-torch).")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_integer("rounds", 8, "--vs-torch, --vs-peak, --what=decode|compile: alternating rounds.")
flags.DEFINE_integer("num_tokens", 0, "Vocabulary size; 0 = the tokenizer's (byte 267, char 76 for Shakespeare).")
flags.DEFINE_bool("vs_torch", False, "Alternate with PyTorch + HF GPT-2 (or Llama) of the same size, each in its "
                  "own process (bench_torch.py).")
flags.DEFINE_bool("torch_bf16", False, "--vs-torch / --vs-hf: run PyTorch under bf16 autocast.")
flags.DEFINE_bool("gpt2", False, "Use a GPT-2 shaped model (exact parameter parity with HF GPT-2).")
flags.DEFINE_bool("measure_peak", False, "Measure bf16->f32 and f32 matmul peak GFLOP/s and exit.")
flags.DEFINE_bool("peak_torch", False, "--measure-peak: also PyTorch's 2048^3 matmuls (its own process, "
                  "--torch-threads threads), rounds alternating with XLA's.")
flags.DEFINE_bool("vs_peak", False, "Alternate train-step blocks with 2048^3 matmuls; MFU = median per-round "
                  "ratio of the step's model GFLOP/s to the peak measured in the same round.")
flags.DEFINE_enum("peak_dtype", "auto", ["auto", "bf16", "f32"], "--vs-peak: the peak's operand dtype; auto = "
                  "the dtype the step's dots run in (f32 for a float32 model, and for bf16 models on CPUs "
                  "without bf16 hardware, where layers.lowp hands bf16 dots over as f32).")
flags.DEFINE_float("peak_gflops", 0.0, "Peak for MFU; 0 = config.train.peak_flops.")
flags.DEFINE_enum("what", "train", ["train", "eval", "data", "decode", "compile", "mode"],
                  "train step | eval step | the grain input pipeline alone (real corpus) | "
                  "KV-cache decoding against the old recompute loop or HF generate (bench_decode.py) | "
                  "compile time, temporary memory and step time for layer loop / nn.scan x remat policies | "
                  "the config's mode's real train step against the causal step of its model (bench_modes.py)")
flags.DEFINE_integer("layers", 0, "--what=compile: model.n_layers to compare at; 0 = the config's.")
bench_decode.define_flags()
bench_torch.define_flags()

# --what=compile: (model.scan_layers, model.remat) pairs, the layer loop without remat first.
COMPILE_VARIANTS = ((False, "none"), (True, "none"), (False, "full"), (True, "full"), (True, "dots"))


def peak_matmul(dtype, n: int = 2048):
    """(run, flops): one n^3 matmul with `dtype` operands and float32 output, compiled and warm."""
    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    return (lambda: f(a, b)), 2 * n ** 3


TORCH_PEAK = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
mats = {n: (torch.randn(2048, 2048).to(d), torch.randn(2048, 2048).to(d))
        for n, d in (("f32", torch.float32), ("bf16", torch.bfloat16))}
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    a, b = mats[json.loads(line)["dtype"]]
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b)
    print(json.dumps({"s": (time.perf_counter() - t) / 3}), flush=True)
"""


def measure_peak(reps: int = 10) -> dict:
    """XLA's 2048^3 matmul GFLOP/s (bf16 operands with f32 output, and f32); with --peak-torch PyTorch's
    too, in its own process, rounds alternating (median and best of each; its bf16 only where the CPU has
    bf16 hardware: without it PyTorch's bf16 matmul takes about a minute per 2048^3 product).)"""
    out, torch_peer = {}, None
    if FLAGS.peak_torch:
        from peer_process import PeerProcess
        torch_peer = PeerProcess("PyTorch", [sys.executable, "-c", TORCH_PEAK, str(FLAGS.torch_threads)],
                                 omp_wait=FLAGS.torch_omp_wait)
        out["torch"] = torch_peer.wait_ready()
    for name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
        run, flops = peak_matmul(dtype)
        times, torch_times = [], []
        for _ in range(reps):
            times.append(timed(run, 1))
            if torch_peer is not None and (name == "f32" or layers.native_lowp_dots()):
                torch_times.append(torch_peer.ask({"dtype": name})["s"])
        out[f"{name}_gflops_median"] = flops / statistics.median(times) / 1e9
        out[f"{name}_gflops_best"] = flops / min(times) / 1e9
        if torch_times:
            out[f"torch_{name}_gflops_median"] = flops / statistics.median(torch_times) / 1e9
            out[f"torch_{name}_gflops_best"] = flops / min(torch_times) / 1e9
    if torch_peer is not None:
        torch_peer.close()
    out["cpu"] = bench_decode.cpu_model()
    return out


def peak_dtype(config):
    """The operand dtype of the step's dots (--peak-dtype auto): bf16 only where they run as bf16."""
    if FLAGS.peak_dtype != "auto":
        return jnp.bfloat16 if FLAGS.peak_dtype == "bf16" else jnp.float32
    lowp = jnp.dtype(config.model.dtype) != jnp.float32
    return jnp.bfloat16 if lowp and layers.native_lowp_dots() else jnp.float32


def mfu_vs_peak(run, tokens: int, flops_per_token: float, rounds: int, steps: int, dtype=jnp.bfloat16) -> dict:
    """Model FLOPs utilisation against the `dtype` matmul peak measured in the same rounds (the machine's
    fast/slow states cancel out of each round's ratio)."""
    peak_run, peak_flops = peak_matmul(dtype)
    achieved, peaks, ratios = [], [], []
    for _ in range(rounds):
        a = flops_per_token * tokens / timed(run, steps)
        p = peak_flops / timed(peak_run, 5)
        achieved.append(a)
        peaks.append(p)
        ratios.append(a / p)
        print(f"step {a / 1e9:.0f} GFLOP/s, peak {p / 1e9:.0f} GFLOP/s, MFU {a / p:.1%}", file=sys.stderr)
    return {"what": "mfu_vs_peak", "mfu_median": statistics.median(ratios), "mfu_min": min(ratios),
            "mfu_max": max(ratios), "step_gflops_median": statistics.median(achieved) / 1e9,
            "peak_gflops_median": statistics.median(peaks) / 1e9, "peak_dtype": jnp.dtype(dtype).name,
            "cpu": bench_decode.cpu_model(),
            "tokens_per_s_median": statistics.median(achieved) / flops_per_token}


def default_num_tokens(config) -> int:
    """The tokenizer's vocabulary without building it: byte 267, char 76 (Tiny Shakespeare)."""
    return {"byte": 267, "char": 76}[config.data.tokenizer]


def gpt2_shape(config) -> None:
    m = config.model
    m.mlp, m.norm, m.pos, m.use_bias, m.norm_eps = "gelu", "layer", "learned", True, 1e-5
    m.d_ff, m.max_len, m.n_kv_heads = 4 * m.d_model, config.data.seq_len, m.n_heads


def _random_batch(config, num_tokens: int, mesh):
    b, length = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, num_tokens, (b, length), dtype=np.int32),
             "targets": rng.integers(0, num_tokens, (b, length), dtype=np.int32),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
             "segment_ids": np.ones((b, length), np.int32), "weights": np.ones((b, length), np.float32)}
    return sharding.put_batch(batch, sharding.batch_sharding(mesh))


def _train_setup(config, num_tokens: int):
    """-> (model, mesh, rules, state, state_shardings, jitted train step, random batch) for `config`."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding)
    model = build.transformer(config, num_tokens)
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    state, sh = steps.init_state(model, tx, mesh, rules, config.seed, config.data.seq_len)
    step = steps.make_train_step(model=model, tx=tx, objective=objectives.causal_lm,
                                 schedule=schedule, accum=1, mesh=mesh, rules=rules, state_shardings=sh)
    return model, mesh, rules, state, sh, step, _random_batch(config, num_tokens, mesh)


def _stepper(step, state, batch):
    """A no-argument run of `step` that carries the (donated) state from call to call."""
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]  # not fetched: train.py never waits on a step's metrics either
    return run


def make_jax_step(config, num_tokens: int, eval_only: bool = False):
    """-> (run_one_step, tokens_per_step, n_params, flops_per_token); eval: forward only (1/3 the FLOPs)."""
    model, mesh, rules, state, sh, step, batch = _train_setup(config, num_tokens)
    b, length = config.data.batch_size, config.data.seq_len
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    if eval_only:
        evaluate = steps.make_eval_step(model=model, objective=objectives.causal_lm, mesh=mesh,
                                        rules=rules, state_shardings=sh)
        return (lambda: evaluate(state.params, batch)["loss_sum"], b * length, n_params,
                model.cfg.flops_per_token(length) / 3)
    return _stepper(step, state, batch), b * length, n_params, model.cfg.flops_per_token(length)


def bench_compile(config, num_tokens: int, n_layers: int, steps_timed: int, rounds: int) -> dict:
    """Per COMPILE_VARIANTS: seconds to trace + compile the train step (never served by JAX's persistent
    compilation cache: main turns it off), XLA's temporary buffer
    bytes (where activations kept for the backward pass live) and ms per step (the variants'
    steps timed in alternating blocks, median over `rounds`)."""
    import copy
    rows, runs = [], []
    for scan, remat in COMPILE_VARIANTS:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.model.n_layers = n_layers or c.model.n_layers
            c.model.scan_layers, c.model.remat = scan, remat
        _, mesh, rules, state, _, step, batch = _train_setup(c, num_tokens)
        t = time.perf_counter()
        with sharding.activate(mesh, rules):
            compiled = step.jitted.lower(state, batch).compile()
        rows.append({"scan_layers": scan, "remat": remat, "compile_s": time.perf_counter() - t,
                     "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20})
        run = _stepper(compiled, state, batch)
        for _ in range(2):
            jax.block_until_ready(run())
        runs.append(run)
    times = [[] for _ in runs]
    for _ in range(rounds):
        for t_list, run in zip(times, runs):
            t_list.append(timed(run, steps_timed))
    for row, t_list in zip(rows, times):
        row["step_ms"] = 1000 * statistics.median(t_list)
        print(json.dumps(row), file=sys.stderr)
    return {"what": "compile", "n_layers": n_layers or config.model.n_layers, "rows": rows}


def bench_data(config) -> dict:
    """Tokens/s of the input pipeline alone on the config's real corpus (must never be the bottleneck)."""
    from data import pipeline, sources, tokenizer as tokenizer_lib
    t0 = time.perf_counter()
    docs, _ = sources.read_documents(config.data.path, config.data.text_field)
    texts = [d.text for d in docs]
    tok = tokenizer_lib.build_tokenizer(config.data.tokenizer, texts)
    t1 = time.perf_counter()
    stream = pipeline.tokenize_stream(texts, tok)
    t2 = time.perf_counter()
    it = pipeline.train_iterator(stream, seq_len=config.data.seq_len, global_batch=config.data.batch_size, seed=0)
    next(it)
    n = max(FLAGS.steps, 200)
    t3 = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t3
    return {"what": "data", "batches_per_s": n / dt,
            "tokens_per_s": n * config.data.batch_size * config.data.seq_len / dt,
            "read_s": t1 - t0, "tokenize_mb_per_s": sum(map(len, texts)) / 1e6 / (t2 - t1), "tokens": len(stream)}


def timed(run, n: int) -> float:
    """Seconds per call: n calls back to back, one wait at the end.

    This is how train.py runs steps (metrics are fetched a log period late, so the host
    dispatches step t+1 while step t computes); PyTorch's eager CPU steps are synchronous
    anyway. Waiting on every step would add JAX's ~2-3 ms host dispatch to each step.
    """
    t = time.perf_counter()
    out = None
    for _ in range(n):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def main(argv):
    del argv
    hostenv.tune_malloc()
    if FLAGS.measure_peak:
        print(json.dumps(measure_peak()))
        return
    config = FLAGS.config
    variants = ["bf16"] if FLAGS.torch_bf16 and FLAGS.torch_variants == ["f32"] else FLAGS.torch_variants
    if FLAGS.vs_torch:
        bench_torch.check_settings(config, variants, FLAGS.torch_arch)  # before minutes of building and compiling
    if FLAGS.gpt2 or (FLAGS.vs_torch and FLAGS.torch_arch == "gpt2") or (FLAGS.what == "decode" and FLAGS.vs_hf):
        gpt2_shape(config)
    num_tokens = FLAGS.num_tokens or default_num_tokens(config)
    if FLAGS.what == "data":
        print(json.dumps(bench_data(config)))
        return
    if FLAGS.what == "compile":
        # compile_s must time XLA compiling, not a load from JAX's persistent compilation cache (which
        # JAX_COMPILATION_CACHE_DIR in the environment turns on): off before this process compiles anything
        jax.config.update("jax_enable_compilation_cache", False)
        print(json.dumps(bench_compile(config, num_tokens, FLAGS.layers, FLAGS.steps, FLAGS.rounds)))
        return
    if FLAGS.what == "decode":
        print(json.dumps(bench_decode.main(config, num_tokens)))
        return
    if FLAGS.what == "mode":
        import bench_modes
        print(json.dumps(bench_modes.bench_mode(config, rounds=FLAGS.rounds, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                                timed=timed, make_causal_step=make_jax_step)))
        return
    run, tokens, n_params, fpt = make_jax_step(config, num_tokens, eval_only=FLAGS.what == "eval")
    # waited on (timed blocks at its end): steps run asynchronously, and warm-up steps still executing
    # (with the heap's first growth to hold several steps in flight) were timed in the first timed block
    timed(run, FLAGS.warmup + 1)
    peak = (FLAGS.peak_gflops * 1e9) or config.train.peak_flops
    if FLAGS.vs_peak:
        print(json.dumps(mfu_vs_peak(run, tokens, fpt, FLAGS.rounds, FLAGS.steps, peak_dtype(config))))
        return
    if not FLAGS.vs_torch:
        s = timed(run, FLAGS.steps)
        print(json.dumps({"what": FLAGS.what, "tokens_per_s": tokens / s, "step_ms": 1000 * s, "n_params": n_params,
                          "model_flops_per_token": fpt, "achieved_gflops": fpt * tokens / s / 1e9,
                          "mfu": fpt * tokens / s / peak}))
        return
    model_cfg = build.transformer(config, num_tokens).cfg
    print(json.dumps(bench_torch.vs_torch(
        config, model_cfg, run, tokens, n_params, variants=variants, arch=FLAGS.torch_arch, rounds=FLAGS.rounds,
        steps=FLAGS.steps, threads=FLAGS.torch_threads, gap_s=FLAGS.gap_s, omp_wait=FLAGS.torch_omp_wait,
        timed=timed)))


if __name__ == "__main__":
    # accept --vs-torch / --vs-peak / --measure-peak / --torch-bf16 spellings as well as underscores
    sys.argv = [sys.argv[0]] + ["--" + a[2:].split("=")[0].replace("-", "_") + a[2:][len(a[2:].split("=")[0]):]
                                if a.startswith("--") else a for a in sys.argv[1:]]
    overrides.run(main, 'benchmark.py')

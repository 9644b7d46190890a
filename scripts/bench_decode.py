"""Decoding throughput: `scripts/benchmark.py --what=decode [--vs-hf]` (this file holds its code).

    python scripts/benchmark.py --config=configs/pretrain_causal.py --what=decode            # KV vs recompute
    python scripts/benchmark.py --config=configs/pretrain_causal.py --what=decode --vs-hf    # vs HF generate

--what=decode: model/decode.Decoder (KV cache) against the recompute loop the repo had before it
(`recompute_greedy`, a copy of the old scripts/generate.py `sample`: one jitted forward over a sliding
window of data.seq_len tokens per new token), both greedy on the same random-init params, batch 1, in
one process, rounds alternating KV / recompute; the speedup is the median of the per-round ratios.
The KV cache holds prompt + new tokens (64 + 512 by default: past data.seq_len, positions the model never
trained at; RoPE extrapolates, at the same cost, so a speed test does not mind), while the recompute loop
drops its oldest tokens. `agree_tokens` counts
the leading tokens both chose alike out of `comparable_tokens` (those whose context fits the window).

--vs-hf: the Decoder on a GPT-2 shaped model (benchmark.gpt2_shape: exactly HF's parameter count,
vocabulary padding included; our matmuls in model.dtype, bfloat16 unless --config.model.dtype=float32)
against Hugging Face `GPT2LMHeadModel.generate` (greedy, its KV cache, float32 eager, or bf16 autocast
with --torch-bf16). Default: prompt 64 + 192 new tokens = 256, the learned-position table of both (a
longer context grows both tables to prompt + new tokens). PyTorch in its own persistent process
(scripts/torch_decode_worker.py) with torch.set_num_threads(--torch-threads) and JAX in this one,
rounds alternating JAX / PyTorch at each batch size with a --gap-s pause before each. Per side and
round: generate_s (prompt -> N new tokens), ttft_s (the same with N = 1) and prefill_s (one forward
over the prompt filling the cache, plus the first token's choice); reported as generate tokens/s,
decode-phase tokens/s (N - 1 tokens over generate_s - ttft_s), prefill tokens/s and TTFT ms. Ratios
are ours over HF's speed (> 1: ours faster; for TTFT: HF's time over ours), per round, then medians.
Prompts are random ids, the same length in every row; neither side can stop early (no stop ids here,
min_new_tokens there). On a machine other jobs share, torch's default OpenMP wait (libgomp spins
before sleeping) can slow it several-fold: --torch-omp-wait=passive measures it without that.
JSON on stdout (with the 1-minute load average before and after), one line per round on stderr.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from model import build, decode, sampling
from peer_process import PeerProcess

FLAGS = flags.FLAGS
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_decode_worker.py")


def define_flags() -> None:
    flags.DEFINE_bool("vs_hf", False, "--what=decode: against Hugging Face GPT-2 generate (PyTorch process).")
    flags.DEFINE_integer("new_tokens", 0, "--what=decode: tokens per completion; 0 = 512 (192 with --vs-hf).")
    flags.DEFINE_integer("prompt_len", 64, "--what=decode: prompt tokens (random ids).")
    flags.DEFINE_list("hf_batches", ["1", "16"], "--vs-hf: batch sizes, each timed every round.")
    flags.DEFINE_integer("torch_threads", 2, "--vs-hf: torch.set_num_threads (XLA:CPU uses every core).")
    flags.DEFINE_float("gap_s", 0.5, "--vs-hf: pause before each side's turn (lets the other's threads settle).")
    flags.DEFINE_enum("torch_omp_wait", "", ["", "passive", "active"],
                      "--vs-hf: OMP_WAIT_POLICY for the PyTorch process; '' = torch's default (libgomp spins "
                      "before sleeping, which on a loaded machine leaves threads waiting on descheduled peers).")


def cpu_model() -> str:
    """/proc/cpuinfo's model name, family/model numbers and vector extensions: the name alone ('AMD EPYC')
    does not tell an AVX2-only Zen 2 (bf16 matmuls emulated, slower than f32) from a Zen 4 with AVX-512 BF16."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        import platform
        return platform.processor() or "unknown"
    ext = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in info.get("flags", "").split()]
    return (f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}; {' '.join(ext) or 'no AVX2'})")


def model_and_params(config, num_tokens: int, seed: int = 0):
    model = build.transformer(config, num_tokens)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, nn.meta.unbox(params)


def random_prompts(batch: int, length: int, num_tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, num_tokens, (batch, length), dtype=np.int32))


# --- the recompute loop the KV decoder replaced (scripts/generate.py before f5998f3), greedy branch ---

@functools.partial(jax.jit, static_argnames="model")
def next_logits(model, params, buf_1xW, n):
    """Logits after the window's first n tokens (one compiled forward per window size)."""
    window = buf_1xW.shape[1]
    seg_1xW = (jnp.arange(window) < n).astype(jnp.int32)[None, :]
    pos_1xW = jnp.arange(window, dtype=jnp.int32)[None, :]
    logits_1xWxV = model.apply({"params": params}, buf_1xW, pos_1xW, seg_1xW)
    return logits_1xWxV[0, n - 1]


def recompute_greedy(model, params, prompt_ids, *, window: int, max_new_tokens: int) -> list[int]:
    """The old `sample(..., temperature=0)`: the last `window` tokens through the model for every token."""
    ids = list(int(i) for i in prompt_ids)
    for _ in range(max_new_tokens):
        ctx = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, :len(ctx)] = ctx
        logits_V = next_logits(model, params, jnp.asarray(buf), len(ctx))
        ids.append(int(jnp.argmax(logits_V)))
    return ids[len(prompt_ids):]


def kv_greedy(dec: decode.Decoder, params, prompts, n: int) -> list[list[int]]:
    outs = dec.generate(params, prompts, max_new_tokens=n, sampling=sampling.GREEDY)
    if any(len(o.tokens) != n for o in outs):
        raise RuntimeError(f"the decoder stopped early: {[len(o.tokens) for o in outs]} tokens, expected {n}")
    return [o.tokens for o in outs]


def _seconds(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _leading_agreement(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def kv_vs_recompute(config, num_tokens: int, *, prompt_len: int, new_tokens: int, rounds: int, log=sys.stderr) -> dict:
    """Batch 1, greedy: rounds of (KV decoder, recompute loop), one untimed run of each first."""
    model, params = model_and_params(config, num_tokens)
    load_start = os.getloadavg()
    window = config.data.seq_len
    prompt = random_prompts(1, prompt_len, num_tokens)[0]
    dec = decode.Decoder(model, batch=1, cache_len=prompt_len + new_tokens)
    kv = lambda: kv_greedy(dec, params, [prompt], new_tokens)[0]  # noqa: E731
    rc = lambda: recompute_greedy(model, params, prompt, window=window, max_new_tokens=new_tokens)  # noqa: E731
    kv_tokens, rc_tokens = kv(), rc()
    kv_s, rc_s, ratios = [], [], []
    for r in range(rounds):
        a, _ = _seconds(kv)
        b, _ = _seconds(rc)
        kv_s.append(a)
        rc_s.append(b)
        ratios.append(b / a)
        print(f"round {r}: kv {new_tokens / a:,.0f} tok/s, recompute {new_tokens / b:,.1f} tok/s, "
              f"speedup {b / a:.1f}x", file=log)
    kv_med, rc_med = statistics.median(kv_s), statistics.median(rc_s)
    comparable = max(0, min(new_tokens, window - prompt_len + 1))
    return {"what": "decode", "batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "cache_len": prompt_len + new_tokens, "window": window, "rounds": rounds, "dtype": model.cfg.dtype,
            "n_params": sum(x.size for x in jax.tree.leaves(params)),
            "tokens_per_s": new_tokens / kv_med, "ms_per_token": 1000 * kv_med / new_tokens,
            "kv_tokens_per_s": new_tokens / kv_med, "kv_ms_per_token": 1000 * kv_med / new_tokens,
            "recompute_tokens_per_s": new_tokens / rc_med, "recompute_ms_per_token": 1000 * rc_med / new_tokens,
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "agree_tokens": _leading_agreement(kv_tokens[:comparable], rc_tokens[:comparable]),
            "comparable_tokens": comparable, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "loadavg_1m": [load_start[0], os.getloadavg()[0]]}


# --- against Hugging Face generate ---

class JaxSide:
    """The Decoder at each batch size, timed as scripts/torch_decode_worker.py times HF: TTFT and prefill
    (medians of 3), then one generate."""

    def __init__(self, model, params, batches, prompt_len: int, new_tokens: int, num_tokens: int):
        self.params, self.new_tokens = params, new_tokens
        self.decoders = {b: decode.Decoder(model, batch=b, cache_len=prompt_len + new_tokens) for b in batches}
        self.prompts = {b: random_prompts(b, prompt_len, num_tokens) for b in batches}

    def _prefill(self, b: int):
        dec, n = self.decoders[b], self.new_tokens
        dparams = dec.prepare(self.params)
        jax.block_until_ready(dparams)
        return lambda: dec.prefill(dparams, dec.empty(dparams), self.prompts[b], list(range(b)), [sampling.GREEDY] * b,
                                   [0] * b, [n] * b, [()] * b)

    def round(self, b: int) -> dict:
        dec, prompts = self.decoders[b], self.prompts[b]
        ttft = statistics.median(_seconds(lambda: kv_greedy(dec, self.params, prompts, 1))[0] for _ in range(3))
        prefill = self._prefill(b)
        prefill_s = statistics.median(_seconds(prefill)[0] for _ in range(3))
        gen, _ = _seconds(lambda: kv_greedy(dec, self.params, prompts, self.new_tokens))
        return {"generate_s": gen, "ttft_s": ttft, "prefill_s": prefill_s}


def _rates(t: dict, b: int, prompt_len: int, n: int) -> dict:
    """Seconds -> rates: generate (prompt to n tokens), prefill tokens/s, TTFT ms, and the decode phase's
    tokens/s: the n - 1 tokens after the first over generate_s - ttft_s (None where that is not > 0)."""
    decode_s = t["generate_s"] - t["ttft_s"]
    return {"generate_tokens_per_s": b * n / t["generate_s"],
            "decode_tokens_per_s": b * (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "prefill_tokens_per_s": b * prompt_len / t["prefill_s"], "ttft_ms": 1000 * t["ttft_s"]}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _summary(jax_rows: list[dict], torch_rows: list[dict]) -> dict:
    """Per key: each side's median and the per-round speed ratios' median/min/max (> 1: ours faster;
    for ttft_ms that is torch's time over ours)."""
    res = {}
    for key in jax_rows[0]:
        res[f"jax_{key}"] = _median(x[key] for x in jax_rows)
        res[f"torch_{key}"] = _median(x[key] for x in torch_rows)
        ratios = [x[key] / y[key] for x, y in zip(jax_rows, torch_rows) if x[key] and y[key]]
        if key == "ttft_ms":
            ratios = [1 / q for q in ratios]
        res[f"ratio_{key}_median"] = statistics.median(ratios) if ratios else None
        res[f"ratio_{key}_min"], res[f"ratio_{key}_max"] = (min(ratios), max(ratios)) if ratios else (None, None)
    return res


def vs_hf(config, num_tokens: int, *, batches, prompt_len: int, new_tokens: int, rounds: int, threads: int,
          bf16: bool, gap_s: float, omp_wait: str = "", log=sys.stderr) -> dict:
    m = config.model
    m.max_len = max(m.max_len, prompt_len + new_tokens)  # learned positions: the table must hold the context
    model, params = model_and_params(config, num_tokens)
    torch_side = PeerProcess("PyTorch", [sys.executable, WORKER, f"--layers={m.n_layers}", f"--heads={m.n_heads}",
                                         f"--dim={m.d_model}", f"--positions={m.max_len}",
                                         f"--vocab={model.cfg.vocab_size}", f"--prompt-len={prompt_len}",
                                         f"--new-tokens={new_tokens}", f"--batches={','.join(map(str, batches))}",
                                         f"--threads={threads}"] + (["--bf16"] if bf16 else []),
                             omp_wait=omp_wait)  # starts and warms up meanwhile
    rows = {b: {"jax": [], "torch": []} for b in batches}
    try:
        jax_side = JaxSide(model, params, batches, prompt_len, new_tokens, num_tokens)
        for b in batches:  # compile + warm up
            for _ in range(2):
                jax_side.round(b)
        torch_side.wait_ready()  # both warm before the first timed round
        load_start = os.getloadavg()
        for r in range(rounds):
            for b in batches:
                for side, runner in (("jax", jax_side.round), ("torch", lambda b: torch_side.ask({"batch": b}))):
                    time.sleep(gap_s)
                    rows[b][side].append(_rates(runner(b), b, prompt_len, new_tokens))
                j, t = rows[b]["jax"][-1], rows[b]["torch"][-1]
                jg, tg = j["generate_tokens_per_s"], t["generate_tokens_per_s"]
                print(f"round {r} batch {b}: jax {jg:,.0f} tok/s (ttft {j['ttft_ms']:.1f} ms), "
                      f"torch {tg:,.0f} tok/s (ttft {t['ttft_ms']:.1f} ms), ratio {jg / tg:.2f}", file=log)
    finally:
        torch_side.close()
    out = {"what": "decode_vs_hf", "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
           "jax_params": sum(x.size for x in jax.tree.leaves(params)), "torch_params": torch_side.info["n_params"],
           "jax_dtype": model.cfg.dtype, "torch_bf16": bf16, "torch_threads": torch_side.info["threads"],
           "torch": torch_side.info["torch"], "transformers": torch_side.info["transformers"],
           "torch_attn": torch_side.info["attn_implementation"], "torch_omp_wait": omp_wait or "default",
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "loadavg_1m": [load_start[0], os.getloadavg()[0]]}
    for b in batches:
        out[f"batch_{b}"] = _summary(rows[b]["jax"], rows[b]["torch"])
    return out


def main(config, num_tokens: int) -> dict:
    if FLAGS.prompt_len < 1:
        raise ValueError(f"--prompt_len={FLAGS.prompt_len} must be >= 1")
    if FLAGS.vs_hf:
        return vs_hf(config, num_tokens, batches=[int(b) for b in FLAGS.hf_batches], prompt_len=FLAGS.prompt_len,
                     new_tokens=FLAGS.new_tokens or 192, rounds=FLAGS.rounds, threads=FLAGS.torch_threads,
                     bf16=FLAGS.torch_bf16, gap_s=FLAGS.gap_s, omp_wait=FLAGS.torch_omp_wait)
    return kv_vs_recompute(config, num_tokens, prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens or 512,
                           rounds=FLAGS.rounds)

"""Training throughput against PyTorch, each side in its own process: `scripts/benchmark.py --vs-torch`.

    python scripts/benchmark.py --config=configs/shakespeare_char.py --vs-torch [--torch-variants=f32,bf16,bf16_compile]
    python scripts/benchmark.py --config=configs/pretrain_mini.py --vs-torch --torch-arch=llama --steps=4

--torch-arch=gpt2 (default): our model made GPT-2 shaped (benchmark.gpt2_shape) against Hugging Face
GPT2LMHeadModel; --torch-arch=llama: the config's own architecture (must be lmstack's default block:
RoPE, RMSNorm, SwiGLU, no biases; any head grouping) against LlamaForCausalLM of the same shape. Both
sides get the same vocabulary (ours padded, theirs given the padded size), so parameter counts match
exactly (reported). PyTorch runs scripts/torch_train_worker.py, one persistent process per variant
(f32 eager, bf16 autocast, bf16 autocast + torch.compile), with --torch-threads threads; lmstack runs
its compiled train step here. Each round: a --gap-s pause, --steps lmstack steps, then for each
variant a pause and --steps of its steps; per variant the ratio is its seconds per step over ours in
that round (> 1: lmstack faster), reported as the median over rounds with min and max, with the CPU
model and the load average. Why separate processes: PyTorch under bf16 autocast ran 1.4-2.4x slower
inside a process that also ran XLA (issue 15), so one-process comparisons favoured us.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

import bench_decode
from peer_process import PeerProcess

FLAGS = flags.FLAGS
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_train_worker.py")
VARIANTS = ("f32", "bf16", "bf16_compile")


def define_flags() -> None:
    flags.DEFINE_list("torch_variants", ["f32"], f"--vs-torch: PyTorch variants, each in its own process: "
                      f"{', '.join(VARIANTS)} (--torch-bf16 alone means bf16).")
    flags.DEFINE_enum("torch_arch", "gpt2", ["gpt2", "llama"], "--vs-torch: HF GPT-2 against our GPT-2-shaped "
                      "model, or HF Llama against the config's own (RoPE/RMSNorm/SwiGLU) architecture.")


def check_llama_like(model_cfg) -> None:
    """The config's block must be the one LlamaForCausalLM builds, else the comparison is of other models."""
    want = {"mlp": "swiglu", "norm": "rms", "pos": "rope", "use_bias": False}
    for name, value in want.items():
        if getattr(model_cfg, name) != value:
            raise ValueError(f"--torch-arch=llama needs model.{name}={value!r} (LlamaForCausalLM's block), "
                             f"got {getattr(model_cfg, name)!r}")


def worker_args(cfg, arch: str, seq_len: int, batch: int, threads: int, variant: str) -> list[str]:
    """scripts/torch_train_worker.py's command line for our model config `cfg` (a ModelConfig)."""
    args = [f"--arch={arch}", f"--variant={variant}", f"--layers={cfg.n_layers}", f"--heads={cfg.n_heads}",
            f"--dim={cfg.d_model}", f"--block={seq_len}", f"--batch={batch}", f"--vocab={cfg.vocab_size}",
            f"--threads={threads}"]
    if arch == "llama":
        args += [f"--kv-heads={cfg.n_kv_heads}", f"--ff={cfg.d_ff}", f"--norm-eps={cfg.norm_eps}",
                 f"--rope-theta={cfg.rope_theta}"] + ([] if cfg.tie_embeddings else ["--untied"])
    return args


def check_settings(config, variants, arch: str) -> None:
    """The --vs-torch flags against the config: benchmark.py asks before it builds and compiles anything."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--torch-variants={','.join(variants)}: expected some of {', '.join(VARIANTS)}")
    if arch == "llama":
        check_llama_like(config.model)


def vs_torch(config, model_cfg, run, tokens: int, n_params: int, *, variants, arch: str, rounds: int, steps: int,
             threads: int, gap_s: float, omp_wait: str, timed, log=sys.stderr) -> dict:
    """`run` is lmstack's warmed-up step (a no-argument call), `timed(run, n)` its seconds per step."""
    check_settings(config, variants, arch)
    peers = {v: PeerProcess(f"PyTorch-{v}", [sys.executable, WORKER, *worker_args(
        model_cfg, arch, config.data.seq_len, config.data.batch_size, threads, v)], omp_wait=omp_wait)
        for v in variants}
    jax_s, torch_s = [], {v: [] for v in variants}
    try:
        infos = {}
        for v, peer in peers.items():  # one at a time: a compiling peer must not share the cores with another
            infos[v] = peer.wait_ready()
        load_start = os.getloadavg()
        for r in range(rounds):
            time.sleep(gap_s)
            jax_s.append(timed(run, steps))
            line = [f"round {r}: lmstack {tokens / jax_s[-1]:,.0f} tok/s"]
            for v, peer in peers.items():
                time.sleep(gap_s)
                torch_s[v].append(peer.ask({"steps": steps})["seconds"] / steps)
                line.append(f"{v} {tokens / torch_s[v][-1]:,.0f} ({torch_s[v][-1] / jax_s[-1]:.2f}x)")
            print(", ".join(line), file=log)
    finally:
        for peer in peers.values():
            peer.close()
    out = {"what": "train_vs_torch", "arch": arch, "cpu": bench_decode.cpu_model(), "cpu_count": os.cpu_count(),
           "rounds": rounds, "steps": steps, "gap_s": gap_s, "jax_params": n_params,
           "jax_tokens_per_s": tokens / statistics.median(jax_s), "torch_threads": threads,
           "torch_omp_wait": omp_wait or "default", "loadavg_1m": [load_start[0], os.getloadavg()[0]]}
    for v in variants:
        ratios = [t / j for t, j in zip(torch_s[v], jax_s)]
        info = infos[v]
        out[v] = {"torch_tokens_per_s": tokens / statistics.median(torch_s[v]), "ratio_median": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios), "torch_params": info["n_params"],
                  "warmup_s": info["warmup_s"], "optimizer": info["optimizer"],
                  "attn_implementation": info["attn_implementation"]}
        out["torch"], out["transformers"] = info["torch"], info["transformers"]
    return out

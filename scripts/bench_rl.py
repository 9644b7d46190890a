"""GRPO iterations and DPO steps: lmstack against Hugging Face TRL (GRPOTrainer / DPOTrainer), interleaved.

    python scripts/bench_rl.py --what=grpo --rounds=4 --iters=2     # GRPO iteration tokens/s vs TRL
    python scripts/bench_rl.py --what=dpo --rounds=4 --iters=4      # DPO steps/s vs TRL (reference precomputed)
    python scripts/bench_rl.py --what=dpo --trl-ref=live ...        # TRL running its reference model every step

Each framework in its own persistent process, both running their own unmodified training loops, paused
between steps on the parent's command: lmstack is `train.train_and_evaluate` (mode grpo: rl/loop.iterate;
mode dpo: the supervised loop) in a child process of this script (`--role=lmstack`) whose `harness.Run.write`
(called once per iteration / logged step) waits for the parent after every K-th call, once the state is
computed (jax.block_until_ready); TRL is scripts/trl_worker.py, whose TrainerCallback waits at the start of
every K-th step. After --warmup untimed iterations each (compilation, allocator warm-up), --rounds rounds
alternate: lmstack --iters iterations, --gap-s pause, TRL --iters iterations, --gap-s pause. A round's time is
wall time from the command to the pause: everything in the loop (rollout, rewards, reference, update,
metrics) is in it. Figures: per framework and round, tokens/s = real tokens (prompt + completion, padding
excluded) of the rows trained on / seconds, and iterations (steps) per second; the speedup is the median of
the per-round ratios (min and max too). The 1-minute load average before and after and the CPU are recorded.

Same work on both sides: the same GPT-2 shape (GELU MLP with d_ff = 4 d, LayerNorm, learned positions, biases,
tied embeddings; lmstack's byte-tokenizer vocabulary padded to 320 rows on both: lmstack masks the padded
logits, HF samples over all 320), random init, float32 (--dtype=bfloat16 for lmstack's default compute,
--trl-bf16 for TRL under the Trainer's bf16 autocast; a CPU without AVX512-BF16/AMX emulates bf16: say
which), the same token ids (lmstack's tokenizer and chat template render the prompts; trl_worker.py's
tokenizer maps those ids 1:1), one optimizer update per iteration over all rows
(--minibatch to split), AdamW, clip 1, constant LR, no dropout, no activation checkpointing (TRL's default
is gradient_checkpointing=True, which would slow it), no checkpoint saving, metrics logged every step.
GRPO: --prompts prompts x --group completions of exactly --new-tokens tokens on TRL's side (min_new_tokens);
lmstack's decoder stops a completion at <|end|> (rare with random weights: counted, see lengths), sampled at
temperature 1, KL to the reference (beta = --kl-coef; the reference runs each iteration on both sides),
exact-match reward against the task's answer (0 for every completion of a random model, so advantages are 0
and the policy does not move: neither framework skips any work for that), GRPO's sequence-mean loss. With one
update per generation neither side runs a separate forward for the old log-probs (lmstack checks the sampler's
against its update's own forward, rl/loop.py). TRL's fused LM head projects only the positions whose label is
scored (completion tokens), lmstack's objectives every position of its rows. lmstack computes each prompt
once for its G completions, in the decoder's prefill and in the trainer's and reference's passes (one model
row per prompt: rl.share_prompts, rl/groups.py; --no-share-prompts: one row per completion, cut to the
longest real row rounded up to 32 tokens), TRL every row whole, padded to the batch's longest (DPO: lmstack
data.seq_len wide).
DPO: the same --pairs pairs every step, sigmoid loss, beta --beta; lmstack caches the reference log-probs
before training (its only way), TRL precomputes them with --trl-ref=precomputed (default: the same work) or
runs its reference model every step with --trl-ref=live (TRL's default). lmstack's DPO reference is a 1-step
SFT run of the same shape (init_from, made first).

Output: one JSON line on stdout (every round, both sides' splits and token counts) and a markdown table row;
one line per round on stderr. The workers' logs are in WORKDIR (kept with --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from peer_process import PeerProcess  # noqa: E402

TRL_WORKER = os.path.join(HERE, "trl_worker.py")
BIG = 10 ** 9  # train.steps, eval_every, checkpoint_every of the lmstack runs: never reached
SIZES = {"tiny": (32, 2, 2), "nano": (128, 4, 4), "small": (256, 4, 4)}  # GPT-2: d_model, layers, heads; d_ff = 4 d


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=("grpo", "dpo"), default="grpo")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=2, help="GRPO iterations (DPO steps) per framework per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations (steps) per framework first")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="GPT-2 shape (configs/grpo.py's width)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="lmstack model.dtype")
    p.add_argument("--trl-bf16", action="store_true",
                   help="TRL under the Trainer's bf16 autocast (TrainingArguments(bf16=True)); default float32")
    p.add_argument("--prompts", type=int, default=16, help="GRPO: prompts per iteration (data.batch_size)")
    p.add_argument("--group", type=int, default=8, help="GRPO: completions per prompt (rl.group_size)")
    p.add_argument("--new-tokens", type=int, default=16, help="GRPO: completion length (rl.max_new_tokens)")
    p.add_argument("--max-prompt-len", type=int, default=96, help="GRPO: lmstack rl.max_prompt_len (row width)")
    p.add_argument("--minibatch", type=int, default=0, help="GRPO: rows per update; 0 = all rows in one")
    p.add_argument("--no-share-prompts", action="store_true",
                   help="GRPO: lmstack rl.share_prompts=False (one model row per completion, as before it)")
    p.add_argument("--kl-coef", type=float, default=0.04, help="GRPO: KL coefficient (TRL's beta)")
    p.add_argument("--pairs", type=int, default=16, help="DPO: preference pairs per step (data.batch_size)")
    p.add_argument("--seq-len", type=int, default=128, help="DPO: lmstack data.seq_len (row width)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO: beta")
    p.add_argument("--trl-ref", choices=("precomputed", "live"), default="precomputed",
                   help="DPO: TRL's precompute_ref_log_probs True (as lmstack) or False (its default)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (XLA:CPU uses every core)")
    p.add_argument("--torch-omp-wait", choices=("", "passive", "active"), default="",
                   help="OMP_WAIT_POLICY of the TRL process; '' = torch's default")
    p.add_argument("--gap-s", type=float, default=1.0, help="pause before each framework's turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="data, runs and worker logs; '' = a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep --workdir's temporary directory")
    p.add_argument("--role", choices=("parent", "lmstack"), default="parent", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- data and the shared spec (parent) ---------------------------------------------------------------

def write_data(a, workdir: str) -> dict:
    """The task files both sides read (scripts/make_tasks.py's records, first --prompts/--pairs problems):
    exactly one batch, so every iteration (step) trains on the same prompts (pairs) on both sides."""
    from data import tasks
    import random
    n = a.prompts if a.what == "grpo" else a.pairs
    problems = tasks.make_splits(a.seed, {"train": n})["train"]
    rng = random.Random(a.seed)
    files = {"chat": [tasks.sft_record(p) for p in problems],
             "pref": [tasks.preference_record(p, rng) for p in problems]}
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return paths


def make_spec(a, workdir: str) -> dict:
    """Shape, hyper-parameters and the data as lmstack's token ids (read with lmstack's own functions)."""
    from data import chat, preference, prompts as prompts_data
    from data.tokenizer import ByteTokenizer
    paths = write_data(a, workdir)
    tok = ByteTokenizer()
    vocab = -(-tok.vocab_size // 64) * 64  # model.vocab_multiple
    dim, layers, heads = SIZES[a.size]
    spec = {"algo": a.what, "layers": layers, "heads": heads, "dim": dim, "vocab": vocab, "seed": a.seed,
            "pad_id": tok.pad_id, "end_id": tok.special_id(chat.END_TOKEN), "dtype": a.dtype, "trl_bf16": a.trl_bf16,
            "paths": paths, "workdir": workdir}
    if a.what == "grpo":
        problems, _ = prompts_data.read_prompts(paths["chat"], tok, max_prompt_len=a.max_prompt_len, strict=True)
        spec.update(positions=a.max_prompt_len + a.new_tokens, prompts=[[int(i) for i in p.prompt] for p in problems],
                    answers=[str(p.reference) for p in problems], group=a.group, new_tokens=a.new_tokens,
                    minibatch=a.minibatch, share_prompts=not a.no_share_prompts, kl_coef=a.kl_coef, lr=1e-5,
                    temperature=1.0, max_prompt_len=a.max_prompt_len, prompts_per_iteration=a.prompts)
        spec["prompt_tokens_per_iteration"] = a.group * sum(len(p) for p in spec["prompts"])
    else:
        pairs, tokens = [], 0
        with open(paths["pref"]) as f:
            for line in f:
                record = json.loads(line)
                head = [int(i) for i in preference.prompt_ids(record, tok)]
                pair = {"prompt": head}
                for side in preference.SIDES:
                    ids = [int(i) for i in chat.render(preference.conversation(record, side), tok)[0]]
                    if ids[:len(head)] != head or len(ids) > a.seq_len:
                        raise ValueError(f"pair {len(pairs)}: {side} is not prompt + response within {a.seq_len}")
                    pair[side] = ids[len(head):]
                    tokens += len(ids)
                pairs.append(pair)
        spec.update(positions=a.seq_len, pairs=pairs, batch=a.pairs, beta=a.beta, lr=5e-6, seq_len=a.seq_len,
                    precompute_ref=a.trl_ref == "precomputed", tokens_per_step=tokens)
    return spec


# ---- the lmstack worker (--role=lmstack) ---------------------------------------------------------------

def gpt2_model(c, spec: dict) -> None:
    """GPT-2 blocks at the spec's size (scripts/benchmark.gpt2_shape's choices), float32 unless asked."""
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim = spec["dim"], spec["layers"], spec["heads"], \
        spec["heads"], 0
    m.mlp, m.norm, m.pos, m.use_bias, m.norm_eps, m.tie_embeddings = "gelu", "layer", "learned", True, 1e-5, True
    m.d_ff, m.max_len, m.dtype, m.dropout = 4 * spec["dim"], spec["positions"], spec["dtype"], 0.0


def quiet_run(c) -> None:
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = BIG, 1, BIG, BIG
    c.optim.schedule, c.optim.warmup_steps, c.optim.weight_decay, c.optim.clip_norm = "constant", 0, 0.0, 1.0


def lmstack_config(spec: dict):
    from configs import dpo as dpo_config, grpo as grpo_config
    if spec["algo"] == "grpo":
        c = grpo_config.get_config()
        c.init_from = ""
        c.data.path = c.rl.val_path = spec["paths"]["chat"]
        c.data.batch_size = spec["prompts_per_iteration"]
        r = c.rl
        r.group_size, r.max_new_tokens, r.max_prompt_len = spec["group"], spec["new_tokens"], spec["max_prompt_len"]
        r.minibatch, r.kl_coef, r.temperature, r.top_p, r.epochs = spec["minibatch"], spec["kl_coef"], 1.0, 1.0, 1
        r.share_prompts = spec.get("share_prompts", True)
        r.eval_generate, r.rewards = 0, ("exact_match",)
    else:
        c = dpo_config.get_config()
        c.init_from = os.path.join(spec["workdir"], "lmstack_sft_ref")
        c.data.path = c.pref.val_path = spec["paths"]["pref"]
        c.data.batch_size, c.data.seq_len = spec["batch"], spec["seq_len"]
        c.pref.eval_generate, c.dpo.loss, c.dpo.beta = 0, "sigmoid", spec["beta"]
    gpt2_model(c, spec)
    quiet_run(c)
    c.seed, c.optim.lr = spec["seed"], spec["lr"]
    return c


def make_sft_reference(spec: dict, train) -> None:
    """DPO's init_from: a 1-step SFT run of the same shape on the same problems (its model is the reference)."""
    from configs import sft as sft_config
    c = sft_config.get_config()
    c.data.path = c.sft.val_path = spec["paths"]["chat"]
    c.data.seq_len, c.data.batch_size, c.sft.eval_generate = spec["seq_len"], 1, 0  # packed rows: >= 1
    gpt2_model(c, spec)
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 1, 1, 1
    c.train.eval_batches, c.optim.warmup_steps, c.seed = 1, 0, spec["seed"]
    train.train_and_evaluate(c, os.path.join(spec["workdir"], "lmstack_sft_ref"))


class Stop(Exception):
    """EOF or an empty command: leave the training loop."""


def lmstack_worker(a) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol lines only; fd 1 (progress lines) -> stderr
    os.dup2(2, 1)
    import jax
    import harness
    import hostenv
    import train
    with open(a.spec) as f:
        spec = json.load(f)
    train.quiet_logs()
    hostenv.tune_malloc()
    if spec["algo"] == "dpo":
        make_sft_reference(spec, train)
    config = lmstack_config(spec)
    grpo = spec["algo"] == "grpo"
    rows = spec["prompts_per_iteration"] * spec["group"] if grpo else 2 * spec["batch"]
    state = {"left": a.warmup, "started": False}

    def reset():
        state.update(t0=time.perf_counter(), n=0, iteration_s=0.0, rollout_s=0.0, update_s=0.0, completion_tokens=0.0,
                     length_min=float("inf"), length_max=0.0)

    reset()
    original_write = harness.Run.write

    def write(run, step, scalars):
        original_write(run, step, scalars)
        if grpo:
            comp = scalars["rl/length_mean"] * rows
            state["n"] += 1
            state["iteration_s"] += scalars["perf/iteration_s"]
            state["rollout_s"] += comp / scalars["perf/rollout_tokens_per_s"]
            state["update_s"] += comp / scalars["perf/update_tokens_per_s"]
            state["completion_tokens"] += comp
            state["length_min"] = min(state["length_min"], scalars["rl/length_min"])
            state["length_max"] = max(state["length_max"], scalars["rl/length_max"])
        elif "train/loss" in scalars:
            state["n"] += 1
        else:
            return
        state["left"] -= 1
        if state["left"] > 0:
            return
        jax.block_until_ready(run.state)  # the DPO loop keeps one step in flight: finish it inside the round
        if not state["started"]:
            state["started"] = True
            info = {"ready": True, "n_params": int(sum(x.size for x in jax.tree.leaves(run.state.params))),
                    "jax": jax.__version__, "devices": jax.device_count(), "dtype": config.model.dtype,
                    "step": int(step)}
            proto.write(json.dumps(info) + "\n")
        else:
            keys = ("n", "iteration_s", "rollout_s", "update_s", "completion_tokens", "length_min", "length_max")
            out = {k: state[k] for k in (keys if grpo else keys[:1])}
            proto.write(json.dumps(dict(out, seconds=time.perf_counter() - state["t0"], step=int(step))) + "\n")
        proto.flush()
        line = sys.stdin.readline()
        if not line.strip():
            raise Stop
        state["left"] = int(json.loads(line)["steps"])
        reset()

    harness.Run.write = write
    try:
        train.train_and_evaluate(config, os.path.join(spec["workdir"], f"lmstack_{spec['algo']}"))
    except Stop:
        pass


# ---- the parent: two workers, rounds ---------------------------------------------------------------

def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_bench(a, log=sys.stderr) -> dict:
    import bench_decode  # cpu_model()
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench_rl_")
    os.makedirs(workdir, exist_ok=True)
    spec = make_spec(a, workdir)
    spec_path = os.path.join(workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    grpo = a.what == "grpo"
    rows = a.prompts * a.group if grpo else 2 * a.pairs
    trl_steps_per_iter = rows // (a.minibatch or rows) if grpo else 1
    max_steps = (a.warmup + a.rounds * a.iters + 2) * trl_steps_per_iter
    ours = PeerProcess("lmstack", [sys.executable, os.path.abspath(__file__), "--role=lmstack", f"--spec={spec_path}",
                                   f"--warmup={a.warmup}"], log_path=os.path.join(workdir, "lmstack.log"), cwd=ROOT,
                       omp_wait=os.environ.get("OMP_WAIT_POLICY", ""))
    theirs = PeerProcess("TRL", [sys.executable, TRL_WORKER, f"--spec={spec_path}", f"--threads={a.threads}",
                                 f"--warmup={a.warmup * trl_steps_per_iter}", f"--max-steps={max_steps}"],
                         log_path=os.path.join(workdir, "trl.log"), cwd=ROOT, omp_wait=a.torch_omp_wait)
    rounds = []
    try:
        ours.wait_ready()
        theirs.wait_ready()
        load_start = os.getloadavg()
        for r in range(a.rounds):
            time.sleep(a.gap_s)
            o = ours.ask({"steps": a.iters})
            time.sleep(a.gap_s)
            t = theirs.ask({"steps": a.iters * trl_steps_per_iter})
            if grpo:
                o_tokens = a.iters * spec["prompt_tokens_per_iteration"] + o["completion_tokens"]
                o_gen = o["completion_tokens"]
            else:
                o_tokens, o_gen = a.iters * spec["tokens_per_step"], 0
            t_tokens, t_gen = t["prompt_tokens"] + t["completion_tokens"], t["completion_tokens"] if grpo else 0
            row = {"lmstack": dict(o, tokens=o_tokens, tokens_per_s=o_tokens / o["seconds"],
                                   iters_per_s=a.iters / o["seconds"]),
                   "trl": dict(t, tokens=t_tokens, tokens_per_s=t_tokens / t["seconds"],
                               iters_per_s=a.iters / t["seconds"])}
            if grpo:
                row["lmstack"]["generated_per_s"] = o_gen / o["seconds"]
                row["trl"]["generated_per_s"] = t_gen / t["seconds"]
            row["ratio_tokens"] = row["lmstack"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
            row["ratio_iters"] = row["lmstack"]["iters_per_s"] / row["trl"]["iters_per_s"]
            rounds.append(row)
            unit = "iter" if grpo else "step"
            print(f"round {r}: lmstack {row['lmstack']['tokens_per_s']:,.0f} tok/s ({row['lmstack']['iters_per_s']:.3f} "
                  f"{unit}/s), TRL {row['trl']['tokens_per_s']:,.0f} tok/s ({row['trl']['iters_per_s']:.3f} {unit}/s), "
                  f"ratio {row['ratio_tokens']:.2f} (per {unit} {row['ratio_iters']:.2f})", file=log, flush=True)
        load_end = os.getloadavg()
    finally:
        ours.close()
        theirs.close()
        if not a.workdir and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return summarise(a, spec, rounds, ours.info, theirs.info, [load_start[0], load_end[0]], bench_decode.cpu_model(),
                     workdir if (a.workdir or a.keep) else None)


def summarise(a, spec, rounds, ours_info, theirs_info, load, cpu, workdir) -> dict:
    grpo = a.what == "grpo"
    med = lambda side, key: statistics.median(r[side][key] for r in rounds)  # noqa: E731
    out = {"what": f"rl_{a.what}_vs_trl", "rounds": a.rounds, "iters_per_round": a.iters, "warmup": a.warmup,
           "size": a.size, "d_model": spec["dim"], "n_layers": spec["layers"], "n_heads": spec["heads"],
           "d_ff": 4 * spec["dim"], "vocab": spec["vocab"], "positions": spec["positions"],
           "lmstack_params": ours_info["n_params"], "trl_params": theirs_info["n_params"],
           "lmstack_dtype": ours_info["dtype"], "trl_dtype": theirs_info["dtype"], "trl_bf16_autocast": a.trl_bf16,
           "lmstack_share_prompts": grpo and not a.no_share_prompts,
           "jax": ours_info["jax"], "torch": theirs_info["torch"], "transformers": theirs_info["transformers"],
           "trl": theirs_info["trl"],
           "torch_threads": theirs_info["threads"], "torch_omp_wait": a.torch_omp_wait or "default",
           "trl_attn": theirs_info["attn_implementation"], "trl_optimizer": theirs_info["optimizer"],
           "trl_reference": theirs_info["reference"], "cpu": cpu, "cpu_count": os.cpu_count(), "loadavg_1m": load,
           "ratio_tokens_per_s": _stats([r["ratio_tokens"] for r in rounds]),
           "ratio_iters_per_s": _stats([r["ratio_iters"] for r in rounds]),
           "lmstack_tokens_per_s": med("lmstack", "tokens_per_s"), "trl_tokens_per_s": med("trl", "tokens_per_s"),
           "lmstack_iters_per_s": med("lmstack", "iters_per_s"), "trl_iters_per_s": med("trl", "iters_per_s"),
           "rounds_detail": rounds, "workdir": workdir}
    if grpo:
        n_iters = a.iters * a.rounds
        o_gen = sum(r["lmstack"]["completion_tokens"] for r in rounds) / n_iters
        t_gen = sum(r["trl"]["completion_tokens"] for r in rounds) / n_iters
        t_prompt = sum(r["trl"]["prompt_tokens"] for r in rounds) / n_iters
        out.update(prompts=a.prompts, group=a.group, rows=a.prompts * a.group, new_tokens=a.new_tokens,
                   minibatch=a.minibatch or a.prompts * a.group, kl_coef=a.kl_coef, max_prompt_len=a.max_prompt_len,
                   prompt_lengths=_stats([len(p) for p in spec["prompts"]]),
                   prompt_tokens_per_iteration={"lmstack": spec["prompt_tokens_per_iteration"], "trl": t_prompt},
                   completion_tokens_per_iteration={"lmstack": o_gen, "trl": t_gen},
                   lmstack_completion_length={"min": min(r["lmstack"]["length_min"] for r in rounds),
                                              "max": max(r["lmstack"]["length_max"] for r in rounds)},
                   ratio_generated_per_s=_stats([r["lmstack"]["generated_per_s"] / r["trl"]["generated_per_s"]
                                                 for r in rounds]))
        o_secs = sum(r["lmstack"]["seconds"] for r in rounds)
        t_secs = sum(r["trl"]["seconds"] for r in rounds)
        o_it = sum(r["lmstack"]["iteration_s"] for r in rounds)
        o_ro = sum(r["lmstack"]["rollout_s"] for r in rounds)
        o_up = sum(r["lmstack"]["update_s"] for r in rounds)
        t_gen_s = sum(r["trl"]["generate_s"] for r in rounds)
        t_ro = sum(r["trl"]["rollout_s"] for r in rounds)
        out["split_s_per_iteration"] = {
            "lmstack": {"total": o_secs / n_iters, "rollout (decoder)": o_ro / n_iters,
                        "log-probs, rewards, advantages": (o_it - o_ro - o_up) / n_iters, "update": o_up / n_iters,
                        "outside perf/iteration_s (metrics, loop)": (o_secs - o_it) / n_iters},
            "trl": {"total": t_secs / n_iters, "generate": t_gen_s / n_iters,
                    "reference log-probs, rewards, advantages": (t_ro - t_gen_s) / n_iters,
                    "update (loss, backward, optimizer, logging)": (t_secs - t_ro) / n_iters}}
    else:
        out.update(pairs=a.pairs, rows=2 * a.pairs, seq_len=a.seq_len, beta=a.beta,
                   tokens_per_step={"lmstack": spec["tokens_per_step"],
                                    "trl": sum(r["trl"]["tokens"] for r in rounds) / (a.iters * a.rounds)})
        n_steps = a.iters * a.rounds
        t_secs = sum(r["trl"]["seconds"] for r in rounds)
        t_step = sum(r["trl"]["train_step_s"] for r in rounds)
        out["split_s_per_step"] = {
            "lmstack": {"total": sum(r["lmstack"]["seconds"] for r in rounds) / n_steps},
            "trl": {"total": t_secs / n_steps, "training_step (forward(s), loss, backward)": t_step / n_steps,
                    "optimizer, logging, batch loading": (t_secs - t_step) / n_steps}}
    return out


def markdown_row(out: dict, command: str) -> str:
    q = out["ratio_tokens_per_s"]
    shape = (f"GPT-2 {out['n_layers']}L/{out['d_model']}d ({out['lmstack_params']:,} vs {out['trl_params']:,} params), "
             f"lmstack {out['lmstack_dtype']} vs TRL {out['trl']} {out['trl_dtype']}")
    if out["what"] == "rl_grpo_vs_trl":
        what = (f"GRPO iteration vs TRL GRPOTrainer: {out['prompts']} prompts x G={out['group']}, "
                f"{out['new_tokens']} new tokens, {out['rows'] // out['minibatch']} update(s), {shape}")
        fig = (f"**{q['median']:.2f}x** tokens/s ({out['lmstack_tokens_per_s']:,.0f} vs {out['trl_tokens_per_s']:,.0f}; "
               f"rounds {q['min']:.2f}-{q['max']:.2f})")
    else:
        i = out["ratio_iters_per_s"]
        what = (f"DPO step vs TRL DPOTrainer (reference {out['trl_reference']}): {out['pairs']} pairs, {shape}")
        fig = (f"**{i['median']:.2f}x** steps/s ({out['lmstack_iters_per_s']:.2f} vs {out['trl_iters_per_s']:.2f}; "
               f"rounds {i['min']:.2f}-{i['max']:.2f})")
    return f"| {what} | `{command}` | {fig}; load {out['loadavg_1m'][0]:.1f}-{out['loadavg_1m'][1]:.1f} |"


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.role == "lmstack":
        lmstack_worker(a)
        return
    for name in ("rounds", "iters"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name}={getattr(a, name)} must be >= 1")
    out = run_bench(a)
    print(json.dumps(out))
    print(markdown_row(out, "python scripts/bench_rl.py " + " ".join(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()

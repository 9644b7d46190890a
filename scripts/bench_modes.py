"""A mode's real training step against the causal one of the same model: `scripts/benchmark.py --what=mode`.

    python scripts/benchmark.py --what=mode --config=configs/pretrain_mlm.py --steps=4
    python scripts/benchmark.py --what=mode --config=configs/finetune_classify.py \
        --config.data.path=datasets/cls/train.jsonl --steps=4
    python scripts/benchmark.py --what=mode --config=configs/sft.py --config.lora.rank=8 --steps=4

The mode side is what train.py runs: `harness.open_run` in a temporary workdir builds the mode's
inputs, model (heads, LoRA wrapper), optimizer (frozen subtrees) and state; the step is
`steps.make_train_step` with the mode's objective, on one real batch of its training data (trimmed as
train.py trims it). The reference is the causal LM step (`make_jax_step`) of the same config (model,
sequence length, micro-batch, optimizer) with mode=causal and no adapters, on random tokens of the
mode's vocabulary. Rounds alternate the two, --steps each; tokens/s counts micro-batch x seq_len
positions on both sides (what train.py reports), and the ratio is the median of per-round mode/causal
speed. Supervised modes only (RL: scripts/bench_rl.py).
"""
from __future__ import annotations

import statistics
import sys
import tempfile

import jax
import ml_collections

import harness
import sharding
import steps as steps_lib


def bench_mode(config, *, rounds: int, steps: int, warmup: int, timed, make_causal_step, log=sys.stderr) -> dict:
    """`make_causal_step(config, num_tokens)` is benchmark.make_jax_step; `timed(run, n)` seconds per call."""
    import modes
    mode = modes.get(config)
    if mode.on_policy:
        raise ValueError(f"--what=mode times supervised steps; mode={config.mode!r} is on-policy "
                         f"(scripts/bench_rl.py measures it)")
    config = ml_collections.ConfigDict(config.to_dict())
    config.optim.grad_accum_steps = 1  # one call = one update on both sides
    config.train.eval_every = config.train.checkpoint_every = config.train.log_every = 10 ** 9
    with tempfile.TemporaryDirectory(prefix="bench_mode_") as workdir, harness.open_run(config, workdir) as run:
        train_step = steps_lib.make_train_step(model=run.model, tx=run.tx, objective=run.mode.loss(config),
                                               schedule=run.schedule, accum=1, mesh=run.mesh, rules=run.rules,
                                               state_shardings=run.state_sh)
        batch = next(run.inputs.train_iter)
        if run.mode.trim is not None:
            batch = run.mode.trim(batch)
        batch = sharding.put_batch(batch, run.batch_sharding)
        holder = {"state": run.state}

        def mode_step():
            holder["state"], m = train_step(holder["state"], batch)
            return m["loss"]

        vocab = run.inputs.tokenizer.vocab_size
        causal = ml_collections.ConfigDict(config.to_dict())
        causal.mode, causal.lora.rank = "causal", 0
        causal_step, tokens, _, _ = make_causal_step(causal, vocab)
        for _ in range(warmup + 1):
            timed(mode_step, 1)
            timed(causal_step, 1)
        mode_s, causal_s = [], []
        for r in range(rounds):
            mode_s.append(timed(mode_step, steps))
            causal_s.append(timed(causal_step, steps))
            print(f"round {r}: {config.mode} {tokens / mode_s[-1]:,.0f} tok/s, causal {tokens / causal_s[-1]:,.0f} "
                  f"tok/s, ratio {causal_s[-1] / mode_s[-1]:.2f}", file=log)
        n_params = sum(x.size for x in jax.tree.leaves(run.state.params))
    ratios = [c / m for m, c in zip(mode_s, causal_s)]
    return {"what": "mode", "mode": config.mode, "lora_rank": int(config.lora.rank), "params": n_params,
            "tokens_per_step": tokens, "mode_tokens_per_s": tokens / statistics.median(mode_s),
            "causal_tokens_per_s": tokens / statistics.median(causal_s), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds, "steps": steps}

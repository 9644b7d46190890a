"""The on-policy iteration loop of modes 'grpo' and 'ppo', run inside the shared harness (harness.Run).

One iteration (= one `step` of the run: checkpoints, logs, evals and train.steps count these):
1. rollout: the next `data.batch_size` prompts of the checkpointed prompt iterator, `rl.group_size`
   completions each from THE decoder (rl/rollout.py) with per-token sampler log-probs;
2. rewards (rl/rewards.py: programmatic, or a reward model) on each completion's last token;
3. the trainer's log-probs of the rollout (`old_logp`, and the critic's values for PPO) and the
   reference's; their gap to the sampler's is logged (`rl/logp_diff_max`, `_mean`): before any update
   they are the same policy, so it must be ~0. With `rl.share_prompts` (shares_prompts) the trainer,
   reference and update see one model row per prompt holding its group's completions (rl/groups.py),
   per-token arrays [P, G, T], minibatches of whole groups; otherwise one row per completion;
4. advantages: GRPO's group-normalised ones; PPO's GAE over per-token rewards (the sequence reward on
   the last token minus kl_coef * KL per token), whitened;
5. `rl.epochs` passes of shuffled minibatches of `rl.minibatch` rows through the jitted train step
   (steps.make_train_step with the mode's loss: rl/objectives.py); with `rl.ptx_coef` each update also
   gets `rl.ptx_rows` SFT rows of `rl.ptx_path` for the PPO-ptx term;
6. metrics (JSONL + TensorBoard), guardrails (rl/guardrails.py), PPO's adaptive KL coefficient
   (Ziegler et al. 2019), evaluation and checkpoints (with the KL coefficient as JSON `extra`).
Everything random derives from (seed, iteration), so N iterations + resume + N more = 2N straight.
Several processes (multi-host): each reads its block of the prompt iterator, the blocks are gathered
(`global_prompts`), the rollouts run on the global mesh, and every process computes steps 2-6's host-side
parts over all rows identically, placing only its own devices' rows (`put_rows`); one process: unchanged.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

import checkpoint
import inputs as inputs_lib
import modes
import sharding
import steps
import warmstart
from data import answers as answers_lib, chat
from model import build, decode
from model import lora as lora_lib
from rl import advantages as adv_lib
from rl import groups, guardrails, losses, rewards as rewards_lib, rollout as rollout_lib
from rl import objectives as rl_objectives
from rl import reference as reference_lib

log = logging.getLogger("lmstack")


def _forward(model, mesh, rules):
    """(params, batch) -> (token log-probs [N, L], values or None), jitted, under the mesh."""
    fn = jax.jit(functools.partial(rl_objectives.token_logps, model))

    def run(params, batch):
        with sharding.activate(mesh, rules):
            return fn(params, batch)
    return run


def _scores(fn, params, rows: dict, size: int, batch_sharding) -> tuple[np.ndarray, np.ndarray | None]:
    """fn(params, batch) over the rows in batches of `size`: (log-probs [N, L], values [N, L] or None)."""
    return reference_lib.in_batches(lambda batch: fn(params, batch), rows, size,
                                    put=lambda batch: put_rows(batch, batch_sharding))


def put_rows(batch: dict, batch_sharding) -> dict:
    """Rows of the iteration -> global arrays. One process: sharding.put_batch. Several (multi-host): every
    process holds all rows (it computed the whole iteration: `global_prompts`) and places those of its devices."""
    if jax.process_count() == 1:
        return sharding.put_batch(batch, batch_sharding)
    return sharding.put_global_batch(batch, batch_sharding)


def global_prompts(index, block: dict):
    """The global batch's prompt indices, on every process: each reads only its block of the checkpointed prompt
    iterator (inputs.host_block: `process_index` of `process_count` blocks); the blocks are gathered in block
    order, so every process holds the one-process batch and computes the iteration's host-side parts (decoded
    texts, rewards, advantages, metrics, guardrails) identically. One process: `index` as it is."""
    if jax.process_count() == 1:
        return np.asarray(index)
    blocks = multihost_utils.process_allgather(np.int32(block["process_index"]))  # [P] (replicas share a block)
    parts = multihost_utils.process_allgather(np.asarray(index))  # [P, rows per block]
    owner = {int(b): p for p, b in reversed(list(enumerate(blocks)))}
    return np.concatenate([parts[owner[b]] for b in range(int(block["process_count"]))])


def initial_params(run):
    """The policy's params before any RL update (the fresh init + init_from's weights): a new run's
    starting point, recomputed identically on resume for the frozen reference (no optimizer state)."""
    config = run.config
    params = steps.init_params(run.model, run.mesh, run.rules, config.seed, config.data.seq_len, run.state_sh.params)
    if config.init_from:
        params = warmstart.warm_start_params(params, run.state_sh.params, config.init_from)
    return params


def reference(run):
    """(reference model, live params -> its params) or None when the loss needs no reference (kl_coef 0, no
    target). A LoRA policy's reference is its LoRA-disabled base: the live state's frozen 'base' itself, read
    at each use (the train step donates the state's buffers; no copy is kept, none is made). Otherwise the
    initial policy's language model (params only, no optimizer state)."""
    r = run.config.rl
    if float(r.kl_coef) <= 0 and float(r.kl_target) <= 0:
        return None
    lm, _ = build.language_model(run.model, run.state.params)
    if isinstance(lm, lora_lib.LoraModel):
        return lm.inner, lambda params: build.language_model(run.model, params)[1]["base"]
    model, ref_params = build.language_model(run.model, initial_params(run))
    return model, lambda params: ref_params


def iterate(run) -> int:
    """Runs the RL iterations from run.start_step to train.steps (or stop_after); returns the last step."""
    config, r = run.config, run.config.rl
    tok, problems = run.inputs.tokenizer, run.inputs.prompts
    end_id = tok.special_id(chat.END_TOKEN)
    group, n_prompts = int(r.group_size), int(config.data.batch_size)
    n_rows = n_prompts * group
    minibatch, _ = run.mode.device_batch(config)  # rollout rows per optimizer update
    width = int(r.max_prompt_len) + int(r.max_new_tokens) - 1
    is_ppo = config.mode == "ppo"
    single = not is_ppo and run.mode.updates_per_step(config) == 1  # GRPO, one update: no separate old-logp pass
    grouped = shares_prompts(config, run.mesh)
    unit = group if grouped else 1  # rollout rows per batch entry
    log.info("rl: %s", f"one model row per prompt for its {group} completions (rl.share_prompts)" if grouped
             else "one model row per completion")
    policy_model, _ = build.language_model(run.model, run.state.params)
    decoder = decode.Decoder(policy_model, batch=n_rows, cache_len=width + 1, mesh=run.mesh, rules=run.rules)
    sampling = rollout_lib.sampling_of(r)
    scorer = rewards_lib.RewardModelScorer(r.reward_model, tok) if r.reward_model else None
    answer_ok = answers_lib.check(config.data.answer_check)  # rl/accuracy: the check eval/exact_match uses
    train_step = steps.make_train_step(model=run.model, tx=run.tx, objective=run.mode.loss(config),
                                       schedule=run.schedule, accum=run.accum, mesh=run.mesh, rules=run.rules,
                                       state_shardings=run.state_sh)
    forward = _forward(run.model, run.mesh, run.rules)
    ref = reference(run)
    ref_forward = _forward(ref[0], run.mesh, run.rules) if ref else None
    ptx = run.inputs.ptx_rows  # the PPO-ptx term's SFT rows (rl.ptx_coef > 0), else None
    kl_coef = float(r.kl_coef)
    if run.start_step:
        kl_coef = float(checkpoint.restore_extra(run.mngr, run.start_step)["kl_coef"])
    step, stop_at = run.start_step, min(config.train.steps, int(config.train.stop_after) or config.train.steps)
    block = inputs_lib.host_block(config, n_prompts)  # this process's block of each prompt batch (rl_inputs')
    while step < stop_at:
        step += 1
        t0 = time.time()
        # ---- 1. rollout ----------------------------------------------------------------------------
        batch_problems = [problems[int(i)] for i in global_prompts(next(run.inputs.train_iter)["index"], block)]
        policy_params = build.language_model(run.model, run.state.params)[1]
        outs = rollout_lib.sample(decoder, policy_params, batch_problems, group=group, sampling=sampling,
                                  seeds=rollout_lib.seeds_for(config.seed, step, n_rows),
                                  max_new_tokens=int(r.max_new_tokens), stop_ids=[end_id])
        ro = rollout_lib.to_rows(batch_problems, outs, group=group, width=width, pad_id=tok.pad_id,
                                 stop_ids=[end_id], detokenize=tok.decode, mask_truncated=bool(r.mask_truncated))
        t_rollout = time.time() - t0
        # ---- 2. rewards ----------------------------------------------------------------------------
        answers = [p.reference for p in ro.problem]
        finishes = ro.finishes
        scalars = {}
        if scorer is not None:
            rewards_N = scorer(*rewards_lib.completion_rows(batch_problems, [o.tokens for o in outs], group,
                                                            width + 1, tok.pad_id))
        else:
            each = rewards_lib.each_reward(r.rewards, ro.texts, answers, finishes, ro.lengths,
                                           records=[p.record for p in ro.problem])
            rewards_N = rewards_lib.weighted_sum(each, tuple(r.get("reward_weights", ())), ro.lengths,
                                                 length_penalty=float(r.length_penalty),
                                                 length_target=int(r.length_target))
            scalars.update({f"rl/reward/{key}": float(np.mean(v))
                            for key, v in zip(rewards_lib.metric_names(r.rewards), each)})
        if scorer is not None and float(r.length_penalty):
            rewards_N = rewards_N - float(r.length_penalty) * np.maximum(0, ro.lengths - int(r.length_target))
        # ---- 3. the trainer's and the reference's log-probs ------------------------------------------
        if grouped:  # one model row per prompt; per-token arrays [P, G, T], seen here as rows [N, T]
            batch = groups.pack(ro.rows, [len(p.prompt) for p in ro.problem], group,
                                max_prompt_len=int(r.max_prompt_len), max_new_tokens=int(r.max_new_tokens))
            toks = {k: groups.per_row(batch[k]) for k in groups.TOKEN_KEYS}
        else:
            keep = _trimmed_width(ro.rows["segment_ids"], width)  # rows cut to the longest real one, in steps of 32
            batch = {k: ro.rows[k][:, :keep] for k in ("inputs", "targets", "positions", "segment_ids", "mask",
                                                       "completion", "sampler_logp")}
            toks = batch
        as_batch = (lambda x: groups.per_group(x, group)) if grouped else (lambda x: x)  # noqa: E731
        as_rows = groups.per_row if grouped else (lambda x: x)  # noqa: E731
        per_update = minibatch // unit  # batch entries (rows, or groups) per optimizer update
        comp = toks["completion"]
        if not single:  # the ratios' denominators, and (PPO) the critic's values, before any update
            old_logp, old_values = _scores(forward, run.state.params, batch, per_update, run.batch_sharding)
            old_logp = as_rows(old_logp)
            old_values = None if old_values is None else as_rows(old_values)
            gap = np.abs(old_logp - toks["sampler_logp"])[comp > 0]
            scalars.update({"rl/logp_diff_max": float(gap.max()) if gap.size else 0.0,
                            "rl/logp_diff_mean": float(gap.mean()) if gap.size else 0.0})
            batch["old_logp"] = as_batch(old_logp.astype(np.float32))
        if ref_forward is not None:
            ref_logp, _ = _scores(ref_forward, ref[1](run.state.params), batch, per_update, run.batch_sharding)
            ref_logp = as_rows(ref_logp)
            batch["ref_logp"] = as_batch(ref_logp.astype(np.float32))
            if not single:  # the penalty's estimator; the logged KL is k3's (non-negative: negative = a bug)
                kl_tok = np.asarray(losses.kl_estimate(old_logp, ref_logp, r.kl_estimator))
                k3_tok = np.asarray(losses.kl_estimate(old_logp, ref_logp, "k3"))
                scalars["rl/kl"] = float((k3_tok * comp).sum() / max(comp.sum(), 1))
        # ---- 4. advantages ---------------------------------------------------------------------------
        if is_ppo:
            token_rewards = rewards_lib.place_on_last_token(rewards_N, comp)
            if ref_forward is not None:
                token_rewards = token_rewards - kl_coef * kl_tok * comp
            adv, returns = adv_lib.gae(token_rewards, old_values * comp, comp, float(r.gamma), float(r.lam))
            if r.whiten_advantages:
                adv = adv_lib.whiten(adv, toks["mask"])
            batch.update(advantages=as_batch(np.asarray(adv, np.float32)),
                         returns=as_batch(np.asarray(returns, np.float32)),
                         old_values=as_batch((old_values * comp).astype(np.float32)))
            resid = (np.asarray(returns) - old_values)[comp > 0]
            var_r = float(np.var(np.asarray(returns)[comp > 0])) if comp.any() else 0.0
            scalars["rl/explained_variance"] = 1.0 - float(np.var(resid)) / var_r if var_r > 0 else 0.0
            scalars["rl/value_mean"] = float(old_values[comp > 0].mean()) if comp.any() else 0.0
        else:
            batch["advantages"] = as_batch(np.asarray(
                adv_lib.group_advantages(rewards_N, group, r.scale_rewards, r.baseline), np.float32))
            scalars["rl/zero_variance_groups"] = float(adv_lib.zero_variance_groups(rewards_N, group))
        # ---- 5. epochs of minibatch updates ---------------------------------------------------------
        t1 = time.time()
        collected = []
        for epoch in range(int(r.epochs)):
            order = np.random.default_rng([int(config.seed), step, epoch]).permutation(n_rows // unit)
            for lo in range(0, n_rows // unit, per_update):
                idx = order[lo:lo + per_update]
                rows = {k: v[idx] for k, v in batch.items()}
                if ptx is not None:  # the update's SFT rows, drawn by (seed, iteration, epoch, update): resumable
                    pick = np.random.default_rng([int(config.seed), step, epoch, lo, 1]).integers(
                        0, len(ptx["inputs"]), int(r.ptx_rows))
                    rows.update({rl_objectives.PTX + k: v[pick] for k, v in ptx.items()})
                mb = put_rows(rows, run.batch_sharding)
                run.state, m = train_step(run.state, mb)
                collected.append(m)
        collected = decode.to_host(collected)
        t_update = time.time() - t1
        # ---- 6. metrics, guardrails, KL controller, eval, checkpoint ----------------------------------
        mean = lambda key: float(np.mean([c[key] for c in collected]))  # noqa: E731
        if single:  # one update: its own forward ran on the sampling params (the check before any update)
            first = collected[0]
            scalars.update({"rl/logp_diff_max": float(first["logp_gap_max"]),
                            "rl/logp_diff_mean": float(first["logp_gap_sum"]) / max(float(first["completion_tokens"]), 1.0)})
            if "kl" in first:
                scalars["rl/kl"] = float(first["kl"])
        right = [answer_ok(t, a) for t, a in zip(ro.texts, answers)]
        scalars.update({
            "train/loss": mean("loss"), "train/grad_norm": mean("grad_norm"), "train/lr": float(collected[-1]["lr"]),
            "rl/pg_loss": mean("pg_loss"), "rl/entropy": mean("entropy"), "rl/clip_low": mean("clip_low"),
            "rl/clip_high": mean("clip_high"), "rl/approx_kl": mean("approx_kl"), "rl/kl_coef": kl_coef,
            "rl/reward_mean": float(np.mean(rewards_N)), "rl/reward_std": float(np.std(rewards_N)),
            "rl/accuracy": float(np.mean(right)), "rl/length_mean": float(ro.lengths.mean()),
            "rl/length_min": float(ro.lengths.min()), "rl/length_max": float(ro.lengths.max()),
            "rl/truncated": float(np.mean([f == "length" for f in finishes])),
            "perf/rollout_tokens_per_s": float(ro.lengths.sum()) / max(t_rollout, 1e-9),
            "perf/update_tokens_per_s": int(r.epochs) * float(comp.sum()) / max(t_update, 1e-9),
            "perf/iteration_s": time.time() - t0})
        if is_ppo:
            scalars["rl/value_loss"] = mean("value_loss")
        if ptx is not None:
            scalars["rl/ptx_loss"] = mean("ptx_loss")
        action = run.nonfinite.check(step, int(collected[-1]["dropped"]), int(collected[-1]["last_dropped"]))
        run.write(step, scalars)
        guardrails.apply(guardrails.check(step, scalars, r), r.on_anomaly)
        if is_ppo and float(r.kl_target) > 0 and "rl/kl" in scalars:
            kl_coef = adaptive_kl(kl_coef, scalars["rl/kl"], float(r.kl_target), float(r.kl_horizon), n_rows)
        if action == "rollback" and (back := run.rollback(step)) is not None:
            step = back
            kl_coef = float(checkpoint.restore_extra(run.mngr, back)["kl_coef"])
            continue
        if step % config.train.eval_every == 0 or step == stop_at:
            run.evaluate(step, None)
        if run.guard.received:
            run.save(step, force=True, extra={"kl_coef": kl_coef})
            break
        if step % config.train.checkpoint_every == 0 or step == stop_at:
            run.save(step, force=step == stop_at, extra={"kl_coef": kl_coef})
    return step


def shares_prompts(config, mesh) -> bool:
    """Whether the trainer computes each prompt once for its group (rl/groups.py): rl.share_prompts, a group of
    2 or more, and updates of whole groups that split evenly over the mesh's data-parallel devices."""
    group = int(config.rl.group_size)
    rows, _ = modes.get(config).device_batch(config)  # rollout rows per optimizer update
    return (bool(config.rl.share_prompts) and group > 1 and rows % group == 0
            and (rows // group) % sharding.data_parallel_size(mesh) == 0)


def _trimmed_width(segment_ids_NxL: np.ndarray, width: int) -> int:
    """The rows' longest real length rounded up to a multiple of 32 (at most `width`): padding nobody reads
    is not computed, and few distinct widths are compiled."""
    longest = int(np.max(np.sum(segment_ids_NxL > 0, axis=1)))
    return min(width, -(-longest // 32) * 32)


def adaptive_kl(coef: float, kl: float, target: float, horizon: float, n: int) -> float:
    """Ziegler et al. (2019): coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n / horizon)

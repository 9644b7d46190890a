"""The post-training modes' inputs: preference pairs (modes 'reward' and 'dpo', with DPO's cached reference
log-probs) and RL prompts (modes 'grpo' and 'ppo'), with their config checks. The shared pieces (the run's
tokenizer, per-host batches, `Inputs`) are in inputs.py, the train/validation records in task_inputs.py.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

import bounds
import checkpoint
import inputs
import task_inputs
import sharding
import task_eval
from data import formats, pipeline, preference as preference_data, prompts as prompts_data, sft as sft_data, sources
from model import build
from rl import advantages as rl_advantages, guardrails, losses as rl_losses, reference, rewards as rl_rewards
from rl import rollout as rl_rollout

log = logging.getLogger("lmstack")


def _preference_split(config, workdir: str, eval_only: bool):
    """(tokenizer, train examples, their ReadStats, validation examples, validation records) of a preference
    mode; eval_only: no train examples (task_inputs.train_val_records)."""
    p = config.pref
    train_recs, stats, val_recs, val_stats = task_inputs.train_val_records(config, p, "preference", eval_only)
    tok = inputs.run_tokenizer(config, workdir, [formats.record_text(r, "preference") for _, r in train_recs])
    task_inputs.chat_template(workdir)
    render = functools.partial(preference_data.render_split, tok=tok, seq_len=config.data.seq_len, too_long=p.too_long)
    train, val = render(train_recs, stats=stats), render(val_recs, stats=val_stats)  # eval_only: no train records
    log.info("%s: %svalidation %d pairs (not used whole: %s)", config.mode, "" if eval_only else
             f"train {len(train)} pairs (not used whole: {stats.left_out()}); ", len(val), val_stats.left_out())
    if not val:
        raise sources.DataError(f"{config.mode}: no validation pair left to evaluate ({val_stats.summary()}"
                                f"{task_inputs.cut_note(val_stats, config.data.seq_len)})")
    return tok, train, stats, val, val_recs


def _pair_iterator(config, train: list[dict], stats, micro_batch: int, eval_only: bool):
    if eval_only:
        return None
    what = task_inputs.too_few("preference pairs", stats, config.data.seq_len)
    return pipeline.shuffled_batches(train, global_batch=micro_batch, seed=config.seed, what=what,
                                     **inputs.host_block(config, micro_batch))


def reward_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> inputs.Inputs:
    bounds.check("reward.center_coef", config.reward.center_coef)  # a NaN or negative one trained on
    tok, train, stats, val, _ = _preference_split(config, workdir, eval_only)
    eval_data = pipeline.padded_batches(val, batch_size=micro_batch, max_batches=config.train.eval_batches)
    return inputs.Inputs(tok, _pair_iterator(config, train, stats, micro_batch, eval_only), eval_data)


def check_dpo(config) -> None:
    """dpo.* values, and a reference for the losses that need one; errors name the value."""
    d = config.dpo
    if d.loss not in rl_losses.PREFERENCE_LOSSES:
        raise ValueError(f"dpo.loss={d.loss!r}: expected one of {rl_losses.PREFERENCE_LOSSES}")
    if not float(d.beta) > 0:
        raise ValueError(f"dpo.beta={d.beta!r} must be > 0")
    if not 0.0 <= float(d.label_smoothing) < 0.5:
        raise ValueError(f"dpo.label_smoothing={d.label_smoothing!r} must be in [0, 0.5)")
    if not float(d.get("nll_coef", 0.0)) >= 0:
        raise ValueError(f"dpo.nll_coef={d.nll_coef!r} must be >= 0 (0 = no NLL term)")
    bounds.check("dpo.simpo_gamma", d.simpo_gamma)
    if d.loss == "ipo" and float(d.label_smoothing):
        raise ValueError(f"dpo.label_smoothing={d.label_smoothing!r} does not apply to dpo.loss='ipo' (set it to 0)")
    if not config.init_from and d.loss != "simpo":
        raise ValueError(f"dpo.loss={d.loss!r} compares the policy with a reference model: set init_from=<an SFT run> "
                         f"(its model is the reference and the policy's start), or use dpo.loss='simpo' (reference-free)")


def dpo_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> inputs.Inputs:
    """Preference pairs + the reference's log-probs of both responses (computed once, cached in the workdir:
    rl/reference.py); without init_from (SimPO only) they are 0 and `ref_known` is 0. eval_only: the validation
    pairs' only."""
    check_dpo(config)
    tok, train, stats, val, val_recs = _preference_split(config, workdir, eval_only)
    for split, examples in (("train", train), ("val", val)):
        if config.init_from and examples:
            reference.add_reference_logps(examples, init_from=config.init_from, tok=tok, workdir=workdir, split=split,
                                          batch_size=micro_batch)
        for ex in examples:
            ex.setdefault("ref_chosen_logp", np.float32(0.0))
            ex.setdefault("ref_rejected_logp", np.float32(0.0))
            ex["ref_known"] = np.float32(1.0 if config.init_from else 0.0)
    eval_data = pipeline.padded_batches(val, batch_size=micro_batch, max_batches=config.train.eval_batches)
    extra = None
    if config.pref.eval_generate > 0:
        chats = [(w, preference_data.as_chat_record(r)) for w, r in val_recs]
        problems = sft_data.generation_problems(chats, tok, int(config.pref.eval_generate))
        extra = task_eval.exact_match_eval(problems, tok, width=config.data.seq_len,
                                           max_new_tokens=int(config.pref.max_new_tokens), batch_size=micro_batch,
                                           check=config.data.answer_check, limit_name="pref.max_new_tokens")
    return inputs.Inputs(tok, _pair_iterator(config, train, stats, micro_batch, eval_only), eval_data, extra_eval=extra)

# rl.* numbers: (lowest, highest, whether the lowest itself is allowed). Out of range or NaN they trained on
# (a negative kl_coef rewards drifting from the reference) or silenced a guardrail (NaN compares False).
RL_RANGES = {
    "kl_coef": (0, math.inf, True), "kl_target": (0, math.inf, True), "kl_horizon": (0, math.inf, False),
    "eps_low": (0, math.inf, True), "eps_high": (0, math.inf, True), "value_clip": (0, math.inf, True),
    "vf_coef": (0, math.inf, True), "entropy_coef": (0, math.inf, True), "length_penalty": (0, math.inf, True),
    "gamma": (0, 1, True), "lam": (0, 1, True), "kl_max": (0, math.inf, False), "min_length": (0, math.inf, True),
    "entropy_floor": (0, math.inf, True), "value_loss_max": (0, math.inf, False),
    "logp_diff_warn": (0, math.inf, True),
}


def _check_ranges(r) -> None:
    for name, (low, high, low_ok) in RL_RANGES.items():
        bounds.check(f"rl.{name}", r[name], low, high, low_ok=low_ok)
    if not (float(r.dual_clip) == 0 or (math.isfinite(float(r.dual_clip)) and float(r.dual_clip) > 1)):
        raise ValueError(f"rl.dual_clip={r.dual_clip!r} must be 0 (off) or a finite value > 1")
    if int(r.length_target) < 0:
        raise ValueError(f"rl.length_target={r.length_target!r} must be >= 0")


def check_rl(config) -> None:
    """rl.* values of modes 'grpo' and 'ppo'; errors name the field and value."""
    r = config.rl
    _check_ranges(r)
    choices = {"kl_estimator": rl_losses.KL_ESTIMATORS, "aggregation": rl_losses.AGGREGATIONS,
               "scale_rewards": rl_advantages.SCALE_REWARDS, "baseline": rl_advantages.BASELINES,
               "on_anomaly": guardrails.ON_ANOMALY, "critic": ("shared", "separate")}
    for name, allowed in choices.items():
        if r[name] not in allowed:
            raise ValueError(f"rl.{name}={r[name]!r}: expected one of {tuple(allowed)}")
    if not r.reward_model:
        if not r.rewards:
            raise ValueError("rl.rewards is empty and rl.reward_model is '': name a programmatic reward or a reward-model run")
        rl_rewards.check_names(r.rewards)
        rl_rewards.check_weights(r.rewards, tuple(r.get("reward_weights", ())))
    elif tuple(r.get("reward_weights", ())):
        raise ValueError(f"rl.reward_weights={tuple(r.reward_weights)!r} weighs rl.rewards, but rl.reward_model="
                         f"{r.reward_model!r} gives the reward (set one or the other)")
    else:  # its mode, before anything is written (a run of another mode failed only after set-up and model loads)
        mngr = checkpoint.open_read_only(r.reward_model)
        try:
            mode = checkpoint.saved_config(mngr, mngr.latest_step()).get("mode")
        finally:
            mngr.close()
        if mode != "reward":
            raise ValueError(f"rl.reward_model={r.reward_model!r} is a mode={mode!r} run, not a reward model "
                             f"(train one with configs/reward.py)")
    for name in ("group_size", "max_prompt_len", "max_new_tokens", "epochs"):
        if int(r[name]) < 1:
            raise ValueError(f"rl.{name}={r[name]!r} must be >= 1")
    if config.mode == "grpo" and int(r.group_size) < 2:
        raise ValueError(f"rl.group_size={r.group_size}: GRPO's advantage is a completion's reward minus its "
                         f"group's mean, 0 for a group of one (use >= 2)")
    if r.baseline == "rloo" and int(r.group_size) < 2:
        raise ValueError(f"rl.baseline='rloo' needs rl.group_size >= 2, got {r.group_size}")
    if not float(r.temperature) > 0:
        raise ValueError(f"rl.temperature={r.temperature!r} must be > 0 (RL samples; greedy rollouts do not explore)")
    rl_rollout.sampling_of(r)  # top_k, top_p, min_p in range
    rows = int(config.data.batch_size) * int(r.group_size)
    if int(r.minibatch) < 0 or (int(r.minibatch) and rows % int(r.minibatch)):
        raise ValueError(f"rl.minibatch={r.minibatch} must divide data.batch_size x rl.group_size = {rows} rows")
    if not float(r.ptx_coef) >= 0 or (float(r.ptx_coef) > 0 and not r.ptx_path):
        raise ValueError(f"rl.ptx_coef={r.ptx_coef!r} must be >= 0, and > 0 needs rl.ptx_path (SFT chat records); "
                         f"rl.ptx_path={r.ptx_path!r}")
    if float(r.ptx_coef) > 0 and int(r.ptx_rows) < 1:
        raise ValueError(f"rl.ptx_rows={r.ptx_rows!r} must be >= 1 with rl.ptx_coef > 0")
    if int(config.optim.grad_accum_steps) != 1:
        raise ValueError(f"optim.grad_accum_steps={config.optim.grad_accum_steps}: RL modes update on rl.minibatch "
                         f"rows (set rl.minibatch instead; grad_accum_steps must be 1)")


def _prompt_texts(path: str) -> list[str]:
    with_files = list(sources.iter_files(path))
    return [open(f, encoding="utf-8", errors="replace").read() for f in with_files if not f.endswith(".gz")]


def rl_inputs(config, workdir: str, micro_batch: int, eval_only: bool = False) -> inputs.Inputs:
    """Prompts (data/prompts.py) for modes 'grpo' and 'ppo': an endless shuffled iterator of prompt indices
    (checkpointed like every mode's), and the exact match of greedy answers to held-out prompts. eval_only: no
    iterator or PPO-ptx rows, and data.path not read when rl.val_path is given."""
    check_rl(config)
    r = config.rl
    if float(r.ptx_coef) > 0 and not eval_only:  # the ptx rows are a batch of their own: split over the mesh
        sharding.check_batch_size(int(r.ptx_rows), sharding.make_mesh(config.mesh), "rl.ptx_rows")
    texts = _prompt_texts(config.data.path) if not (config.init_from or eval_only) else None  # eval: the saved one
    tok = inputs.run_tokenizer(config, workdir, texts)
    task_inputs.chat_template(workdir)
    read = functools.partial(prompts_data.read_prompts, tok=tok, max_prompt_len=int(r.max_prompt_len), strict=r.strict,
                             answer_field=r.answer_field)
    if eval_only and r.val_path:
        train, stats = [], sources.ReadStats()
    else:
        train, stats = read(config.data.path)
    if r.val_path:
        val, val_stats = read(r.val_path)
    else:
        train, val = task_inputs.hash_held_out(train, lambda p: repr(p.messages), config)
        train = [] if eval_only else train
        val_stats = sources.ReadStats()
    log.info("%s: %s%d validation prompts (skipped: %s)", config.mode, "" if eval_only else
             f"{len(train)} train prompts (skipped: {stats.left_out()}), ", len(val), val_stats.left_out())
    unanswered = sum(not p.reference.strip() for p in train)
    checked = [name for name in ("exact_match", "final_answer") if name in r.rewards and not r.reward_model]
    if unanswered and checked:
        log.warning("%d of %d training prompts have no answer (field %r, nor a final assistant turn or 'chosen'): "
                    "%s rewards them 0 (set rl.answer_field to the field your data keeps it in)",
                    unanswered, len(train), r.answer_field, " and ".join(checked))
    other = {"exact": "final_answer", "final": "exact_match"}.get(config.data.answer_check)
    if other in checked and len(checked) == 1:
        log.warning("rl.rewards has %r but data.answer_check=%r: rl/accuracy and eval/exact_match check answers "
                    "another way than the reward does (set data.answer_check=%r to match it)", other,
                    config.data.answer_check, "final" if other == "final_answer" else "exact")
    data_iter = None if eval_only else pipeline.shuffled_batches(
        prompts_data.PromptSource(len(train)), global_batch=micro_batch, seed=config.seed, what="RL prompts",
        **inputs.host_block(config, micro_batch))
    extra = None
    if int(r.eval_generate) > 0:
        em = task_eval.exact_match_eval(prompts_data.limited(val, int(r.eval_generate)), tok,
                                        width=int(r.max_prompt_len) + int(r.max_new_tokens),
                                        max_new_tokens=int(r.max_new_tokens), batch_size=micro_batch,
                                        check=config.data.answer_check, limit_name="rl.max_new_tokens")
        extra = _on_language_model(em)
    return inputs.Inputs(tok, data_iter, [], extra_eval=extra, prompts=train,
                         ptx_rows=None if eval_only else _ptx_rows(config, tok))


def _ptx_rows(config, tok) -> dict | None:
    """rl.ptx_path's chat records as mode 'sft' trains on them (assistant turns weighted, packed into
    data.seq_len windows), stacked [M, seq_len]; None without the PPO-ptx term."""
    r = config.rl
    if not float(r.ptx_coef) > 0:
        return None
    records, stats = sft_data.read_split(r.ptx_path, strict=r.strict)
    rendered = sft_data.render_split(records, tok, stats, seq_len=int(config.data.seq_len), too_long="truncate",
                                     train_on="assistant", strict=r.strict)
    rows = sft_data.make_rows(rendered, seq_len=int(config.data.seq_len), pad_id=tok.pad_id, pack=True, fit="first")
    if not rows:
        raise sources.DataError(f"rl.ptx_path={r.ptx_path!r}: no SFT conversation to train on ({stats.summary()})")
    log.info("rl: PPO-ptx term x %s on %d SFT rows (%d conversations) from %s", r.ptx_coef, len(rows),
             len(rendered), r.ptx_path)
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


class _on_language_model:
    """An (model, params) evaluation applied to the language model inside (a PPO policy-value's backbone, or
    its LoRA trunk: build.language_model)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, model, params):
        return self.inner(*build.language_model(model, params))

    def predictions(self, model, params):
        return self.inner.predictions(*build.language_model(model, params))

    def coverage(self):
        return self.inner.coverage()

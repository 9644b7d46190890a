"""RL guardrails: the failures an RL run shows in its metrics before it wastes hours, named early.

`check(iteration, metrics, cfg)` returns one sentence per anomaly, naming the iteration and the
values; `apply(messages, on_anomaly)` logs them (`rl.on_anomaly='warn'`) or raises `RLAnomalyError`
('halt': checkpoints stay intact; rerun after changing the config). The checks:
- reward or value non-finite;
- KL estimate negative (a non-negative estimator below zero: a sampler/trainer mismatch or a bug) or
  above `rl.kl_max` (the policy ran away from the reference);
- mean response length below `rl.min_length` tokens (collapse) or nearly every response truncated;
- mean entropy below `rl.entropy_floor` (the policy became deterministic: no exploration left);
- every group with zero reward variance (GRPO: no learning signal this iteration);
- value loss non-finite or above `rl.value_loss_max` (a diverging critic);
- sampler and trainer log-probs further apart than `rl.logp_diff_warn` on average (before any update they
  are the same policy: only bf16 rounding separates them, ~1e-3 on average, a few 1e-2 at most).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("lmstack")
ON_ANOMALY = ("warn", "halt")
TRUNCATED_MAX = 0.95  # share of truncated responses that counts as 'nearly all'


class RLAnomalyError(ValueError):
    """An RL guardrail fired under rl.on_anomaly='halt'."""


def check(iteration: int, m: dict, cfg) -> list[str]:
    out = []
    at = f"iteration {iteration}"
    for key in ("rl/reward_mean", "rl/value_mean"):
        if key in m and not math.isfinite(m[key]):
            out.append(f"{at}: {key} is {m[key]} (non-finite)")
    if "rl/kl" in m:
        kl = m["rl/kl"]
        if not math.isfinite(kl) or kl < -1e-4:
            out.append(f"{at}: KL estimate {kl:.4g} is negative or non-finite (estimator {cfg.kl_estimator}): the "
                       f"trainer's and reference's log-probs disagree about the sampled tokens")
        elif kl > cfg.kl_max:
            out.append(f"{at}: KL to the reference {kl:.4g} exceeds rl.kl_max={cfg.kl_max}: the policy is running "
                       f"away (raise the KL coefficient or lower optim.lr)")
    if m.get("rl/length_mean", math.inf) < cfg.min_length:
        out.append(f"{at}: mean response length {m['rl/length_mean']:.2f} tokens is below rl.min_length="
                   f"{cfg.min_length}: responses are collapsing")
    if m.get("rl/truncated", 0.0) >= TRUNCATED_MAX:
        out.append(f"{at}: {m['rl/truncated']:.0%} of responses hit rl.max_new_tokens={cfg.max_new_tokens} "
                   f"(truncated): raise the limit or penalise length")
    if m.get("rl/entropy", math.inf) < cfg.entropy_floor:
        out.append(f"{at}: policy entropy {m['rl/entropy']:.4g} fell below rl.entropy_floor={cfg.entropy_floor}: "
                   f"the policy stopped exploring")
    if m.get("rl/zero_variance_groups", 0.0) >= 1.0:
        out.append(f"{at}: every group's rewards are equal (reward mean {m.get('rl/reward_mean', float('nan')):.3g}):"
                   f" no learning signal (make the task easier/harder or raise rl.group_size)")
    if "rl/value_loss" in m and (not math.isfinite(m["rl/value_loss"]) or m["rl/value_loss"] > cfg.value_loss_max):
        out.append(f"{at}: value loss {m['rl/value_loss']:.4g} exceeds rl.value_loss_max={cfg.value_loss_max} or is "
                   f"non-finite: the critic is diverging")
    if m.get("rl/logp_diff_mean", 0.0) > cfg.logp_diff_warn:
        out.append(f"{at}: sampler and trainer log-probs differ by {m['rl/logp_diff_mean']:.3g} on average (up to "
                   f"{m.get('rl/logp_diff_max', float('nan')):.3g}; rl.logp_diff_warn={cfg.logp_diff_warn}): "
                   f"importance ratios are biased")
    return out


def apply(messages: list[str], on_anomaly: str) -> None:
    if on_anomaly not in ON_ANOMALY:
        raise ValueError(f"rl.on_anomaly={on_anomaly!r}: expected one of {ON_ANOMALY}")
    for msg in messages:
        if on_anomaly == "halt":
            raise RLAnomalyError(f"{msg}; halting (rl.on_anomaly='halt'). Checkpoints are intact.")
        log.warning("rl guardrail: %s", msg)

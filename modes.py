"""Training modes: ONE record per `config.mode`, saying everything that makes the mode.

A `Mode` names its input builder (inputs.py), its model (model/build.py), its loss and eval
summary (objectives.py), how other data replaces its validation split (scripts/evaluate.py
--data), the eval scalars the console shows, the parameter subtrees it freezes, the config
fields a resume must match beyond the common ones (checkpoint.MUST_MATCH), and its per-item
predictions for error analysis (predictions.py). Adding a mode is one
record here, a config file, and its objective (and head, if it needs one). `MODES` is the only
table keyed by mode name.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import checkpoint
import feedback_inputs
import inputs as inputs_lib
import objectives
import optim
import predictions
import task_inputs
from rl import objectives as rl_objectives, rewards as rl_rewards
from data import preference as preference_data, prepared as prepared_data, sources
from inputs import Inputs
from model import build, lora


@dataclasses.dataclass(frozen=True)
class Mode:
    # (config, workdir, micro_batch, eval_only=False) -> Inputs; eval_only (scripts/evaluate.py): no training
    # iterator, and no training file read where the validation data is a file of its own
    inputs: Callable[..., Inputs]
    model: Callable  # (config, Inputs) -> the Flax module
    objective: Callable  # (params, batch, rng, *, model, **options) -> (loss, metrics)
    summary: Callable[[dict], dict]  # eval metric sums over all eval batches -> eval scalars
    other_eval_data: Callable[..., Inputs]  # (config, workdir, micro_batch, path, split) -> Inputs evaluating `path`
    headline: tuple[str, ...] = ()  # eval scalars the console line shows beside the loss
    must_match: tuple[str, ...] = ()  # config fields (a prefix ending in '.' covers a sub-config) a resume must match
    added_defaults: dict = dataclasses.field(default_factory=dict)  # fields added later: their meaning when absent
    frozen: Callable[..., tuple[str, ...]] = lambda config: ()  # top-level param subtrees the optimizer never updates
    lora: bool = False  # lora.rank > 0 allowed (adapters on the language model)
    paths: tuple[str, ...] = ("data.path",)  # config fields naming input files/directories that must exist
    text_corpus: bool = False  # data.path is text (files or a prepared dataset) split by data.split, not records
    example_unit: str = "windows"  # what an eval example is (scripts/evaluate.py reports their count)
    predictions: Callable | None = None  # per-item predictions for error analysis (predictions.py); None: none
    # why a mode without `predictions` has none (scripts/evaluate.py --out_predictions says it)
    no_predictions: str = "its eval rows are windows of a token stream, not items with a reference"
    options: Callable[..., dict] = lambda config: {}  # config -> the objective's keyword options (dpo.beta, ...)
    on_policy: bool = False  # runs rl/loop.iterate (rollouts, then updates) instead of the supervised loop
    updates_per_step: Callable[..., int] = lambda config: 1  # optimizer updates per step (RL: per iteration)
    trim: Callable[[dict], dict] | None = None  # a train batch -> the same batch without its all-padding columns
    # (rows of one device batch, what sets it): the size split over the data-parallel devices; None: the micro-batch
    device_batch: Callable[..., tuple[int, str]] | None = None

    def loss(self, config) -> Callable:
        """The objective with this run's options bound: (params, batch, rng, *, model) -> (loss, metrics)."""
        return functools.partial(self.objective, **self.options(config))

    def all_must_match(self) -> tuple[str, ...]:
        return checkpoint.MUST_MATCH + self.must_match

    def all_added_defaults(self) -> dict:
        return dict(checkpoint.ADDED_DEFAULTS, **self.added_defaults)


def _causal_model(config, inputs: Inputs):
    return build.causal_lm(config, inputs.tokenizer.vocab_size, inputs.tokenizer.base_size)


def _classify_frozen(config) -> tuple[str, ...]:
    return ("backbone",) if config.classify.freeze_backbone else ()


MODES = {
    "causal": Mode(
        inputs=inputs_lib.causal_inputs, model=_causal_model, objective=objectives.causal_lm,
        summary=objectives.causal_summary, other_eval_data=inputs_lib.whole_text(inputs_lib.causal_eval_batches),
        headline=("eval/accuracy",), lora=True, text_corpus=True),
    "mlm": Mode(
        inputs=inputs_lib.mlm_inputs, model=lambda config, inputs: build.masked_lm(config, inputs.tokenizer.vocab_size),
        objective=objectives.masked_lm, summary=objectives.mlm_summary,
        other_eval_data=inputs_lib.whole_text(inputs_lib.mlm_eval_batches),
        headline=("eval/mlm_accuracy", "eval/nsp_accuracy"), must_match=("mlm.",),
        added_defaults={"mlm.nsp": True, "mlm.mask_prob": 0.15, "mlm.mask_token_frac": 0.8,
                        "mlm.random_token_frac": 0.1, "mlm.nsp_pool": "first"},
        text_corpus=True),
    "classify": Mode(
        inputs=task_inputs.classify_inputs,
        model=lambda config, inputs: build.classifier(config, inputs.tokenizer.vocab_size, inputs.num_classes),
        objective=objectives.classify, summary=objectives.classify_summary,
        other_eval_data=inputs_lib.as_val_path("classify", task_inputs.classify_inputs),
        headline=("eval/accuracy", "eval/macro_f1"),
        must_match=("classify.val_path", "classify.freeze_backbone", "classify.text_field", "classify.text_pair_field",
                    "classify.label_field"),
        added_defaults={"classify.val_path": "", "classify.strict": True, "classify.freeze_backbone": False,
                        "classify.text_field": "text", "classify.text_pair_field": "text_pair",
                        "classify.label_field": "label"},
        frozen=_classify_frozen, paths=("data.path", "classify.val_path"), example_unit="records",
        predictions=predictions.classify),
    "qa": Mode(
        inputs=task_inputs.qa_inputs, model=lambda config, inputs: build.span_qa(config, inputs.tokenizer.vocab_size),
        objective=objectives.qa, summary=objectives.qa_summary,
        other_eval_data=inputs_lib.as_val_path("qa", task_inputs.qa_inputs),  # span loss, exact match and F1
        headline=("eval/exact_match", "eval/f1"), must_match=("qa.val_path",),
        paths=("data.path", "qa.val_path"), predictions=predictions.qa),
    "sft": Mode(
        inputs=task_inputs.sft_inputs, model=_causal_model,
        objective=objectives.causal_lm,  # packed chat rows: weights = the assistant-token loss mask
        summary=objectives.causal_summary,  # loss / perplexity / accuracy over the trained (assistant) tokens
        other_eval_data=inputs_lib.as_val_path("sft", task_inputs.sft_inputs),  # held-out loss + exact match
        headline=("eval/accuracy", "eval/exact_match"),
        must_match=("sft.val_path", "sft.train_on", "sft.too_long", "sft.pack", "sft.fit"),
        added_defaults={"sft.val_path": "", "sft.train_on": "assistant", "sft.too_long": "truncate",
                        "sft.pack": True, "sft.fit": "first"},
        lora=True, paths=("data.path", "sft.val_path"), example_unit="conversations", predictions=predictions.sft),
}


def _dpo_options(config) -> dict:
    d = config.dpo
    return {"loss": d.loss, "beta": float(d.beta), "label_smoothing": float(d.label_smoothing),
            "simpo_gamma": float(d.simpo_gamma), "nll_coef": float(d.get("nll_coef", 0.0))}


_PREF_DEFAULTS = {"pref.val_path": "", "pref.too_long": "truncate", "pref.strict": True}
MODES.update({
    "reward": Mode(
        inputs=feedback_inputs.reward_inputs,
        model=lambda config, inputs: build.reward_model(config, inputs.tokenizer.vocab_size),
        objective=objectives.reward, options=lambda config: {"center_coef": float(config.reward.center_coef)},
        summary=objectives.reward_summary, other_eval_data=inputs_lib.as_val_path("pref", feedback_inputs.reward_inputs),
        headline=("eval/accuracy", "eval/margin"), must_match=("pref.val_path", "pref.too_long"),
        added_defaults=_PREF_DEFAULTS, paths=("data.path", "pref.val_path"), example_unit="pairs",
        trim=preference_data.trim_pairs, no_predictions="its items are pairs: score them with scripts/score.py"),
    "dpo": Mode(
        inputs=feedback_inputs.dpo_inputs, model=_causal_model, objective=objectives.dpo, options=_dpo_options,
        summary=objectives.dpo_summary, other_eval_data=inputs_lib.as_val_path("pref", feedback_inputs.dpo_inputs),
        headline=("eval/accuracy", "eval/margin", "eval/exact_match"),
        must_match=("pref.val_path", "pref.too_long", "dpo.loss"), added_defaults=_PREF_DEFAULTS,
        lora=True, paths=("data.path", "pref.val_path"), example_unit="pairs", trim=preference_data.trim_pairs,
        predictions=predictions.preference),
})


def _rl_clip(config) -> dict:
    r = config.rl
    return {"eps_low": float(r.eps_low), "eps_high": float(r.eps_high), "dual_clip": float(r.dual_clip),
            "aggregation": r.aggregation, "max_len": int(r.max_new_tokens), "ptx_coef": float(r.get("ptx_coef", 0.0))}


def _rl_rows(config) -> tuple[int, str]:
    if int(config.rl.minibatch):
        return int(config.rl.minibatch), "rl.minibatch"
    return int(config.data.batch_size) * int(config.rl.group_size), "data.batch_size x rl.group_size (rl.minibatch=0)"


def _rl_updates(config) -> int:
    rows = int(config.data.batch_size) * int(config.rl.group_size)
    return int(config.rl.epochs) * (rows // (int(config.rl.minibatch) or rows))


def _ppo_model(config, inputs: Inputs):
    """The policy + value head (build.policy_value); with lora.rank > 0 the policy's trunk is the LoRA model
    (params 'base' frozen, 'lora' trained) and the value head (a separate critic too) is trained whole."""
    policy_value = build.policy_value(config, inputs.tokenizer.vocab_size)
    lm = _causal_model(config, inputs)
    return lora.LoraTrunk(policy_value, lm) if isinstance(lm, lora.LoraModel) else policy_value


_RL_COMMON = dict(
    inputs=feedback_inputs.rl_inputs, summary=objectives.no_summary,
    other_eval_data=inputs_lib.as_val_path("rl", feedback_inputs.rl_inputs),
    headline=("rl/reward_mean", "rl/kl", "eval/exact_match"),
    must_match=("rl.group_size", "rl.max_prompt_len", "rl.max_new_tokens", "rl.minibatch", "rl.epochs", "rl.val_path",
                "rl.share_prompts"),
    # runs before these fields: one model row per completion, no SFT term
    added_defaults={"rl.share_prompts": False, "rl.ptx_coef": 0.0, "rl.ptx_path": "", "rl.ptx_rows": 8,
                    "rl.answer_field": "answer", "rl.reward_weights": (), "rl.top_k": 0,
                    "rl.min_p": 0.0},
    paths=("data.path", "rl.val_path", "rl.reward_model", "rl.ptx_path"), example_unit="prompts", on_policy=True,
    updates_per_step=_rl_updates, device_batch=_rl_rows, predictions=predictions.rl)
MODES.update({
    "grpo": Mode(model=_causal_model, objective=rl_objectives.grpo, lora=True,
                 options=lambda config: dict(_rl_clip(config), beta=float(config.rl.kl_coef),
                                             kl_estimator=config.rl.kl_estimator,
                                             single_update=_rl_updates(config) == 1), **_RL_COMMON),
    # frozen: nothing; with lora.rank > 0 the policy trunk's 'base' (frozen_params), the value head and a separate
    # critic still trained
    "ppo": Mode(model=_ppo_model, objective=rl_objectives.ppo, lora=True,
                options=lambda config: dict(_rl_clip(config), value_clip=float(config.rl.value_clip),
                                            vf_coef=float(config.rl.vf_coef),
                                            entropy_coef=float(config.rl.entropy_coef)), **_RL_COMMON),
})


def device_rows(config, mode: Mode, micro_batch: int) -> tuple[int, str]:
    """(rows a device step's batch holds, what sets it): the micro-batch, or the mode's own (RL: rollout rows per
    update), for sharding.check_batch_size in training and evaluation alike."""
    if mode.device_batch:
        return mode.device_batch(config)
    return micro_batch, "data.batch_size / optim.grad_accum_steps"


def get(config) -> Mode:
    """The record of `config.mode`, or an error naming the field and the modes there are."""
    if config.mode not in MODES:
        raise ValueError(f"mode={config.mode!r}: expected one of {sorted(MODES)}")
    return MODES[config.mode]


def frozen_params(config) -> tuple[str, ...]:
    """Top-level param subtrees the optimizer must not update (and keeps no state for)."""
    mode = get(config)
    if int(config.lora.rank) < 0:
        raise ValueError(f"lora.rank={config.lora.rank} must be >= 0 (0 = no adapters)")
    if int(config.lora.rank) > 0:
        if not mode.lora:
            allowed = " and ".join(repr(name) for name, m in MODES.items() if m.lora)
            raise ValueError(f"lora.rank={config.lora.rank} is supported for mode {allowed}, "
                             f"not mode={config.mode!r}")
        return ("base",)
    return mode.frozen(config)


def optimizer(config):
    """(tx, schedule, frozen subtrees) of a run: config.optim's rule and schedule over every optimizer update
    of train.steps (RL: iterations x the mode's updates per iteration), the `prune` block's masks, and zero
    updates (no state) for the frozen subtrees (frozen_params)."""
    updates = int(config.train.steps) * get(config).updates_per_step(config)
    tx, schedule = optim.make_optimizer(config.optim, updates, config.prune)
    frozen = frozen_params(config)
    return (optim.freeze(tx, frozen) if frozen else tx), schedule, frozen


def _field(config, name: str):
    node = config
    for part in name.split("."):
        node = node[part]
    return node


def _data_paths(config) -> tuple[str, ...]:
    """The mode's input fields that name data read file by file (not rl.reward_model: a run, read by its
    checkpoint), and continual.replay_path."""
    return tuple(n for n in get(config).paths if n != "rl.reward_model") + ("continual.replay_path",)


def check_workdir_outside_inputs(config, workdir: str) -> None:
    """A workdir inside an input directory that is walked for files (data.path as a directory of text or
    records, continual.replay_path) would have the run's own files (tokenizer.json, metrics.jsonl, the
    checkpoints' JSON) read as data when it resumes: another token stream, so neither exact nor clean.
    Refused naming both; a prepared dataset's directory is not walked and is allowed."""
    for name in _data_paths(config):
        value = _field(config, name)
        if not value or not os.path.isdir(os.path.expanduser(value)) or prepared_data.is_prepared(value):
            continue
        if sources.is_within(workdir, value):
            raise ValueError(f"--workdir={workdir!r} is inside {name}={value!r}: every file under {name} is read as "
                             f"data, so the run's own files (checkpoints, metrics.jsonl, tokenizer.json) would "
                             f"become training data when it resumes; put the workdir outside it")


def input_fingerprint(config) -> dict:
    """field -> what each input the run reads holds (harness.check_inputs_unchanged): an input path's
    sources.files_fingerprint; a reward-model run (rl.reward_model, read at its latest checkpoint at every
    start) its latest step, so a resume after that run trained on would not score with another model."""
    out = {}
    for name in _data_paths(config):
        value = _field(config, name)
        if value and os.path.exists(os.path.expanduser(value)):
            out[name] = dict(path=value, **sources.files_fingerprint(value))
    if get(config).on_policy:
        if config.rl.reward_model:
            step = checkpoint.latest_step(config.rl.reward_model)
            out["rl.reward_model"] = {"path": config.rl.reward_model, "step": step, "digest": f"step {step}"}
        for name in config.rl.rewards:  # reward functions of one's own: FILE.py:FUNCTION, module:FUNCTION's file
            where = rl_rewards.reward_source(name)
            if where and os.path.isfile(os.path.expanduser(where)):
                out[f"rl.rewards[{name}]"] = dict(path=where, **sources.files_fingerprint(where))
    return out


def check_paths(config) -> None:
    """Every input file/directory the mode reads exists; else an error naming the config field (before any
    file is written). data.path '' is the embedded corpus of the text modes (an error for the others);
    other empty fields mean 'not given'."""
    mode = get(config)
    if not mode.text_corpus and not config.data.path:
        raise sources.DataError(f"data.path is empty: mode={config.mode!r} reads task records from a JSONL file "
                                f"(set --config.data.path=FILE)")
    for name in mode.paths + (("init_from",) if config.init_from else ()):
        value = _field(config, name)
        if value and "://" in value:
            raise sources.DataError(f"{name}={value!r} is a URL: inputs are read through the local filesystem; "
                                    f"mount the bucket (gcsfuse: /mnt/BUCKET/...) or copy the data, and give its path")
        if value and not os.path.exists(os.path.expanduser(value)):
            empty = (f", or --config.{name}= to hold out data.val_fraction of data.path instead"
                     if name.endswith(".val_path") else "")
            raise sources.DataError(f"{name}={value!r} does not exist{sources.in_cwd(value)} "
                                    f"(set --config.{name}=PATH{empty})")

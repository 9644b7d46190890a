"""Hugging Face TRL side of `scripts/bench_rl.py`: GRPOTrainer or DPOTrainer on a GPT-2, one persistent
process, run a given number of training steps at a time on the parent's command.

    python scripts/trl_worker.py --spec SPEC.json [--threads 2] [--warmup 2] [--max-steps N]

SPEC.json (written by bench_rl.py) holds the algorithm, the GPT-2 shape and the data as token ids:
  {"algo": "grpo", "layers", "heads", "dim", "positions", "vocab", "pad_id", "end_id", "seed",
   "prompts": [[ids], ...], "answers": [str, ...], "group", "new_tokens", "minibatch", "kl_coef", "lr",
   "temperature"}
  {"algo": "dpo", ... the shape ..., "pairs": [{"prompt": [ids], "chosen": [ids], "rejected": [ids]}, ...],
   "batch", "beta", "lr", "precompute_ref": bool}
Ids are lmstack's own (its byte tokenizer and chat template), so both frameworks see the same tokens: the
processing class here is a one-character-per-id tokenizer (id i <-> chr(0x4E00 + i)), checked to
round-trip every sequence. The model is torch_gpt2.make_model (dropout off, tied head, sdpa), random init,
saved to a temporary directory and passed to the trainer by path, as TRL expects: it then loads the
reference model the same way (TRL builds the reference from the policy's path).

The trainer runs its own unmodified `train()` loop (max_steps large, no saving, no reporting, float32,
gradient checkpointing off, its default optimizer); a TrainerCallback pauses it at the start of a step:
after --warmup steps it prints {"ready": true, ...}, then each stdin line {"steps": K} runs K more
steps and answers one JSON line:
  seconds      wall time of the K steps (from the command to the start of the next step: logging, the
               optimizer step and the next batch's loading included)
  generate_s   GRPO: time in GRPOTrainer._generate (tokenizing, model.generate, decoding)
  rollout_s    GRPO: time in _generate_and_score_completions (generation, reference log-probs, rewards,
               advantages); the rest of `seconds` is the policy update
  train_step_s DPO: time in Trainer.training_step (forward(s), loss, backward; not the optimizer step)
  prompt_tokens, completion_tokens   real (unpadded) tokens of the K steps' rows (GRPO: from the rollouts'
               masks; DPO: the batches' attention and completion masks)
  rows         sequences trained on
An empty line or EOF ends the process. Only protocol lines go to stdout (everything else to stderr).

GRPO: generation_batch_size = prompts x group; one optimizer step per `minibatch` rows (steps_per_generation
= rows / minibatch), so one lmstack iteration = rows / minibatch trainer steps; completions are forced to
`new_tokens` (min_new_tokens = max_completion_length) and the dataset repeats the same prompts in order
(shuffle off) so every step samples for exactly the same prompts. DPO: the same `batch` pairs every step
(sequential sampler over the pairs repeated); precompute_ref=True precomputes the reference log-probs before
training (as lmstack caches them), False runs the reference model in every step (TRL's default).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402

import torch_gpt2  # noqa: E402

CHAR_BASE = 0x4E00  # id i <-> chr(CHAR_BASE + i): single code points, no normalisation or whitespace


class Stop(Exception):
    """EOF or an empty command: leave trainer.train()."""


_PROTOCOL = sys.stdout  # main(): a copy of fd 1, which then points to stderr (library prints stay off it)


def send(obj: dict) -> None:
    _PROTOCOL.write(json.dumps(obj) + "\n")
    _PROTOCOL.flush()


def as_text(ids) -> str:
    return "".join(chr(CHAR_BASE + int(i)) for i in ids)


def make_tokenizer(vocab: int, pad_id: int, end_id: int):
    """A fast tokenizer mapping each character chr(CHAR_BASE + i) to id i (a BPE without merges)."""
    import tokenizers
    model = tokenizers.models.BPE(vocab={chr(CHAR_BASE + i): i for i in range(vocab)}, merges=[])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model),
                                               pad_token=chr(CHAR_BASE + pad_id), eos_token=chr(CHAR_BASE + end_id))
    tok.padding_side = "left"
    return tok


def check_round_trip(tok, seqs) -> None:
    for ids in seqs:
        got = tok(as_text(ids))["input_ids"]
        if list(got) != list(ids):
            raise RuntimeError(f"the tokenizer does not reproduce lmstack's ids: {list(ids)[:12]}... -> {got[:12]}...")


def save_model(spec: dict, out_dir: str) -> int:
    torch.manual_seed(spec.get("seed", 0))
    model = torch_gpt2.make_model(n_layer=spec["layers"], n_head=spec["heads"], n_embd=spec["dim"],
                                  block_size=spec["positions"], vocab_size=spec["vocab"])
    model.config.pad_token_id, model.config.eos_token_id = spec["pad_id"], spec["end_id"]
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = spec["pad_id"], spec["end_id"]
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def common_args(spec: dict, out_dir: str, max_steps: int) -> dict:
    """TrainingArguments shared by both trainers: CPU, float32, no checkpointing of activations, no saving,
    no reporting, a constant LR without warmup or weight decay, gradient clipping at 1 (as lmstack's configs).
    spec["trl_bf16"]: float32 weights under the Trainer's bf16 autocast (TrainingArguments(bf16=True)) instead."""
    return dict(output_dir=out_dir, use_cpu=True, bf16=bool(spec.get("trl_bf16")), fp16=False,
                gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                disable_tqdm=True, max_steps=max_steps,
                learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, gradient_accumulation_steps=1, dataloader_num_workers=0, seed=spec.get("seed", 0),
                model_init_kwargs={"dtype": torch.float32, "attn_implementation": torch_gpt2._attn_implementation()})


class Counters:
    """Time and tokens accumulated since the last reset (the parent's command)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.generate_s = self.rollout_s = self.train_step_s = 0.0
        self.prompt_tokens = self.completion_tokens = self.rows = 0

    def timed(self, fn, field: str, count=None):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            setattr(self, field, getattr(self, field) + time.perf_counter() - t)
            if count is not None:
                count(args, out)
            return out
        return wrapper


def build_grpo(spec: dict, tok, model_dir: str, out_dir: str, max_steps: int, counters: Counters):
    import datasets
    import trl
    prompts, answers, group = spec["prompts"], spec["answers"], spec["group"]
    rows = len(prompts) * group
    minibatch = spec["minibatch"] or rows
    if rows % minibatch:
        raise ValueError(f"minibatch {minibatch} does not divide {len(prompts)} prompts x group {group} = {rows} rows")
    check_round_trip(tok, prompts)
    steps_per_gen = rows // minibatch
    repeats = max_steps // steps_per_gen + 2  # the same prompts, in order, for every generation batch
    data = datasets.Dataset.from_dict({"prompt": [as_text(p) for p in prompts] * repeats,
                                       "answer": list(answers) * repeats})

    def exact_match(completions, answer, **_):
        return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

    n = spec["new_tokens"]
    args = trl.GRPOConfig(**common_args(spec, out_dir, max_steps), per_device_train_batch_size=minibatch,
                          steps_per_generation=steps_per_gen, num_generations=group, max_completion_length=n,
                          generation_kwargs={"min_new_tokens": n}, temperature=spec["temperature"], top_p=1.0,
                          top_k=0, beta=spec["kl_coef"], num_iterations=1, loss_type="grpo", shuffle_dataset=False,
                          log_completions=False, use_vllm=False)
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=exact_match, args=args, train_dataset=data,
                              processing_class=tok)

    def count(_args, out):
        counters.prompt_tokens += int(out["prompt_mask"].sum())
        counters.completion_tokens += int(out["completion_mask"].sum())
        counters.rows += int(out["completion_mask"].shape[0])

    trainer._generate = counters.timed(trainer._generate, "generate_s")
    trainer._generate_and_score_completions = counters.timed(trainer._generate_and_score_completions, "rollout_s",
                                                             count)
    return trainer, steps_per_gen


def build_dpo(spec: dict, tok, model_dir: str, out_dir: str, max_steps: int, counters: Counters):
    import datasets
    import trl
    pairs, batch = spec["pairs"], spec["batch"]
    if len(pairs) != batch:
        raise ValueError(f"{len(pairs)} pairs for a batch of {batch}: give exactly one batch")
    check_round_trip(tok, [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")])
    repeats = max_steps + 2
    data = datasets.Dataset.from_dict({k: [as_text(p[k]) for p in pairs] * repeats
                                       for k in ("prompt", "chosen", "rejected")})
    args = trl.DPOConfig(**common_args(spec, out_dir, max_steps), per_device_train_batch_size=batch,
                         beta=spec["beta"], loss_type=["sigmoid"], max_length=None,
                         precompute_ref_log_probs=spec["precompute_ref"], train_sampling_strategy="sequential")
    trainer = trl.DPOTrainer(model=model_dir, args=args, train_dataset=data, processing_class=tok)

    def count(args_, _out):
        inputs = args_[1]
        mask, comp = inputs["attention_mask"], inputs["completion_mask"]
        counters.prompt_tokens += int(mask.sum() - comp.sum())
        counters.completion_tokens += int(comp.sum())
        counters.rows += int(mask.shape[0])

    trainer.training_step = counters.timed(trainer.training_step, "train_step_s", count)
    return trainer, 1


class Pause(transformers.TrainerCallback):
    """Stops the loop at the start of a step: after `warmup` steps (ready line), then after each command's K."""

    def __init__(self, counters: Counters, warmup: int, info: dict):
        self.counters, self.left, self.info, self.started = counters, warmup, info, False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.left > 0:
            self.left -= 1
            return
        c = self.counters
        if not self.started:
            self.started = True
            send(dict(self.info, ready=True, warmup_step=state.global_step))
        else:
            send({"seconds": time.perf_counter() - c.t0, "generate_s": c.generate_s, "rollout_s": c.rollout_s,
                  "train_step_s": c.train_step_s, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "rows": c.rows,
                  "global_step": state.global_step})
        line = sys.stdin.readline()
        if not line.strip():
            raise Stop
        self.left = int(json.loads(line)["steps"]) - 1  # this step is the first of them
        c.reset()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed trainer steps before the ready line")
    p.add_argument("--max-steps", type=int, default=1000, help="trainer.train's max_steps (more than will be run)")
    a = p.parse_args(argv)
    global _PROTOCOL
    _PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    with open(a.spec) as f:
        spec = json.load(f)
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    tok = make_tokenizer(spec["vocab"], spec["pad_id"], spec["end_id"])
    counters = Counters()
    with tempfile.TemporaryDirectory(prefix="trl_worker_") as tmp:
        model_dir, out_dir = os.path.join(tmp, "model"), os.path.join(tmp, "out")
        n_params = save_model(spec, model_dir)
        build = {"grpo": build_grpo, "dpo": build_dpo}[spec["algo"]]
        trainer, steps_per_iteration = build(spec, tok, model_dir, out_dir, a.max_steps, counters)
        import trl
        info = {"n_params": n_params, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "trl": trl.__version__,
                "attn_implementation": trainer.model.config._attn_implementation,
                "dtype": str(trainer.model.dtype), "steps_per_iteration": steps_per_iteration,
                "optimizer": type(trainer.optimizer).__name__ if trainer.optimizer else trainer.args.optim,
                "reference": ("precomputed" if spec.get("precompute_ref") else
                              "model each step" if getattr(trainer, "ref_model", None) is not None else "none")}
        trainer.add_callback(Pause(counters, a.warmup, info))
        try:
            trainer.train()
        except Stop:
            pass


if __name__ == "__main__":
    main()

"""PyTorch side of `scripts/benchmark.py --what=decode --vs-hf`: Hugging Face GPT-2 `generate`, one
persistent process, timed one round at a time on the parent's command.

    python scripts/torch_decode_worker.py --layers 4 --heads 4 --dim 256 --positions 256 --vocab 320 \
        --prompt-len 64 --new-tokens 192 --batches 1,16 [--threads 2] [--bf16]

Builds the model once (scripts/torch_gpt2.make_model: dropout off, tied head, sdpa attention), makes
one random prompt batch per batch size, warms every measurement up, then prints one JSON line
{"ready": true, "n_params", "threads", ...} on stdout. After that each stdin line {"batch": B} runs one
round at batch B and answers one JSON line (seconds):
  generate_s  `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True)`: greedy
              with HF's default (dynamic) KV cache; min_new_tokens makes sure it never stops early
  ttft_s      the same call with max_new_tokens=1: prompt in -> first generated token out (median of 3)
  prefill_s   one forward over the prompt filling a cache (logits at the last position only, as
              generate's prefill does) and its argmax (median of 3)
An empty line or EOF ends the process. Nothing else is written to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402

import torch_gpt2  # noqa: E402


def _timed(fn, reps: int = 1) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Rounds:
    """The model, one prompt batch per batch size, and the three timed calls."""

    def __init__(self, a):
        torch.manual_seed(a.seed)
        self.model = torch_gpt2.make_model(n_layer=a.layers, n_head=a.heads, n_embd=a.dim,
                                           block_size=a.positions, vocab_size=a.vocab).eval()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.new_tokens, self.bf16 = a.new_tokens, a.bf16
        gen = torch.Generator().manual_seed(a.seed)
        self.prompts = {b: torch.randint(0, a.vocab, (b, a.prompt_len), generator=gen) for b in a.batches}

    def _generate(self, ids, n: int):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        if out.shape != (ids.shape[0], ids.shape[1] + n):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(ids.shape[0], ids.shape[1] + n)}")
        return out

    def _prefill(self, ids):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].argmax(-1)

    def round(self, batch: int) -> dict:
        ids = self.prompts[batch]
        ttft = _timed(lambda: self._generate(ids, 1), 3)
        prefill = _timed(lambda: self._prefill(ids), 3)
        gen = _timed(lambda: self._generate(ids, self.new_tokens))
        return {"generate_s": gen, "ttft_s": ttft, "prefill_s": prefill}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("heads", 4), ("dim", 256), ("positions", 256), ("vocab", 320),
                          ("prompt-len", 64), ("new-tokens", 192), ("threads", 2), ("seed", 0), ("warmup", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--bf16", action="store_true", help="run under CPU bf16 autocast (default: float32)")
    a = p.parse_args(argv)
    if a.prompt_len + a.new_tokens > a.positions:
        p.error(f"--prompt-len {a.prompt_len} + --new-tokens {a.new_tokens} exceeds --positions {a.positions}")
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    rounds = Rounds(a)
    for _ in range(a.warmup):
        for b in a.batches:
            rounds.round(b)
    print(json.dumps({"ready": True, "n_params": rounds.n_params, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "attn_implementation": rounds.model.config._attn_implementation, "bf16": a.bf16}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(rounds.round(int(json.loads(line)["batch"]))), flush=True)


if __name__ == "__main__":
    main()

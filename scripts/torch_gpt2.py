"""PyTorch reference baseline: one training step of Hugging Face's GPT-2 on the CPU.

Used only by ``scripts/benchmark.py --vs-torch`` to put lmstack's JAX throughput next to an
equivalent PyTorch model; it is never imported by the library. Needs the extras pinned in
requirements-dev.txt (torch, transformers).

    python scripts/torch_gpt2.py --layers 4 --heads 4 --dim 128 --block 64 --batch 12 \
        --vocab 65 --steps 30 [--bf16] [--threads N]

prints ``{"tokens_per_s": ..., "step_ms": ..., "n_params": ...}`` (median step time after
5 warm-up steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import transformers


def _attn_implementation() -> str:
    """'sdpa' (torch's fused scaled_dot_product_attention) when torch and transformers' GPT-2
    support it, otherwise 'eager' (transformers' plain matmul/softmax attention)."""
    sdpa_ok = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    return "sdpa" if sdpa_ok and getattr(transformers.GPT2LMHeadModel, "_supports_sdpa", False) else "eager"


def make_model(*, n_layer: int, n_head: int, n_embd: int, block_size: int,
               vocab_size: int) -> transformers.GPT2LMHeadModel:
    """A freshly initialised GPT2LMHeadModel (from torch's global RNG): dropout off everywhere,
    LM head tied to the token embedding, attention via ``_attn_implementation()``."""
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        attn_implementation=_attn_implementation())
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # the shifted next-token cross-entropy (silences a warning)
    return model


def make_train_step(*, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int,
                    batch_size: int, lr: float = 1e-3, bf16: bool = False, seed: int = 0,
                    threads: int | None = None) -> tuple[Callable[[], float], int, int]:
    """Build a GPT2LMHeadModel + AdamW and return ``(step, tokens_per_step, n_params)``.

    ``step()`` runs one full training step (forward, loss, backward, AdamW update) on a fixed
    random batch whose labels are its own input ids (transformers shifts them internally) and
    returns the loss as a float, which forces the step to finish. Dropout is off everywhere and
    the LM head is tied to the token embedding, as in GPT-2; ``n_params`` counts the tied matrix
    once. Attention uses ``_attn_implementation()`` ('sdpa' if available, else 'eager').
    With ``bf16`` the forward pass (and loss) runs under CPU autocast to bfloat16; parameters,
    gradients and optimizer state stay float32.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = make_model(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                       vocab_size=vocab_size)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, block_size), generator=gen)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, batch_size * block_size, n_params


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    step, tokens_per_step, n_params = make_train_step(
        n_layer=a.layers, n_head=a.heads, n_embd=a.dim, block_size=a.block, vocab_size=a.vocab,
        batch_size=a.batch, lr=a.lr, bf16=a.bf16, seed=a.seed, threads=a.threads)
    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(json.dumps({"tokens_per_s": tokens_per_step / median, "step_ms": 1e3 * median,
                      "n_params": n_params}))


if __name__ == "__main__":
    main()

"""PyTorch reference run of nanoGPT's Shakespeare-char CPU recipe, for wall-time comparison.

    python scripts/nanogpt_torch.py [--data PATH] [--max_iters 2000] [--eval_interval 250]
        [--eval_iters 20] [--threads N] [--target 1.88]

Reproduces nanoGPT's ``train_shakespeare_char`` config with its documented CPU overrides
(block 64, batch 12, 4 layers, 4 heads, 128 dims, no dropout, 2000 iters, lr decayed to 1e-4
at iter 2000, eval_iters 20) on Hugging Face's GPT2LMHeadModel (``torch_gpt2.make_model``):
character vocabulary of the whole file, first 90% train / last 10% validation, random
windows; AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on 2-D tensors only, grad clip
1.0; 100 warm-up iters then cosine decay. It is the PyTorch side of a comparison with

    python train.py --config=configs/shakespeare_char.py --workdir=DIR

Each eval (iter 0, every ``--eval_interval`` iters and the last) prints
``iter N: train L val L (T s)`` to stderr; the end prints one JSON line on stdout with the wall
time, when validation loss first fell below ``--target`` (nanoGPT's reported 1.88), the final
losses and the training throughput. The losses are nanoGPT's estimate (mean over
``--eval_iters`` random batches), not a full pass over the validation split.

``wall_s`` runs from the start of ``run()`` (before the data is read; torch already imported),
``wall_s_since_import`` from the top of this module (torch/transformers import included);
``tokens_per_s_train`` counts only the training iterations (batch sampling included, evals not).

Runtime: about 2.5 minutes for 2000 iters with ``--threads 1`` (66 ms/iter and ~1 s per eval,
measured over 100 iters on a 2-core machine that was also running another job). Threads
oversubscribed by another process slow torch badly (2 threads on that busy machine: 190 ms/iter).
"""
from __future__ import annotations

import time

_IMPORT_T0 = time.perf_counter()  # before torch/transformers are imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt2  # noqa: E402

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(_REPO_ROOT, "..", "shared", "data", "tinyshakespeare.txt")

BLOCK_SIZE = 64
BATCH_SIZE = 12
N_LAYER, N_HEAD, N_EMBD = 4, 4, 128
LR, MIN_LR, WARMUP_ITERS = 1e-3, 1e-4, 100
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
SEED = 1337


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="text file (default: shared Tiny Shakespeare)")
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--eval_interval", type=int, default=250)
    p.add_argument("--eval_iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--target", type=float, default=1.88, help="validation loss to time reaching")
    a = p.parse_args(argv)
    if a.max_iters < 1 or a.eval_interval < 1 or a.eval_iters < 1:
        p.error("--max_iters, --eval_interval and --eval_iters must be >= 1")
    return a


def load_splits(path: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Encode ``path`` with its sorted character set; return ``(train, val, vocab_size)`` with the
    first 90% of characters as train and the last 10% as validation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    if len(val) <= BLOCK_SIZE:
        raise ValueError(f"{path}: {len(text)} characters is too short; the validation split "
                         f"needs more than {BLOCK_SIZE} (block size)")
    return train, val, len(chars)


def get_batch(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``BATCH_SIZE`` random windows ``x = data[i:i+64]`` with targets ``y = data[i+1:i+65]``."""
    starts = torch.randint(len(data) - BLOCK_SIZE, (BATCH_SIZE,))
    x = torch.stack([data[i:i + BLOCK_SIZE] for i in starts])
    y = torch.stack([data[i + 1:i + 1 + BLOCK_SIZE] for i in starts])
    return x, y


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``y`` at every one of the block's positions."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def lr_at(it: int, max_iters: int) -> float:
    """Linear warm-up over ``WARMUP_ITERS``, then cosine from ``LR`` to ``MIN_LR`` at ``max_iters``."""
    if it < WARMUP_ITERS:
        return LR * (it + 1) / (WARMUP_ITERS + 1)
    progress = min(1.0, (it - WARMUP_ITERS) / max(1, max_iters - WARMUP_ITERS))
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D tensors (matrices, embeddings) only, none on biases and
    LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


@torch.no_grad()
def estimate_losses(model: torch.nn.Module, splits: dict[str, torch.Tensor],
                    eval_iters: int) -> dict[str, float]:
    """Mean loss over ``eval_iters`` random batches of each split, in eval mode."""
    model.eval()
    out = {name: sum(next_token_loss(model, *get_batch(data)).item() for _ in range(eval_iters)) / eval_iters
           for name, data in splits.items()}
    model.train()
    return out


def run(args: argparse.Namespace) -> dict:
    """Train per the recipe and return the summary (plus ``evals``, one entry per evaluation)."""
    t0 = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    train, val, vocab_size = load_splits(args.data)
    model = torch_gpt2.make_model(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD,
                                  block_size=BLOCK_SIZE, vocab_size=vocab_size)
    model.train()
    optimizer = make_optimizer(model)
    splits = {"train": train, "val": val}

    evals: list[dict] = []
    hit: dict | None = None
    train_s = 0.0

    def evaluate(it: int) -> None:
        nonlocal hit
        losses = estimate_losses(model, splits, args.eval_iters)
        s = time.perf_counter() - t0
        evals.append({"iter": it, **losses, "s": s})
        print(f"iter {it}: train {losses['train']:.4f} val {losses['val']:.4f} ({s:.1f} s)", file=sys.stderr)
        if hit is None and losses["val"] < args.target:
            hit = evals[-1]

    evaluate(0)
    for it in range(args.max_iters):
        step_t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, args.max_iters)
        x, y = get_batch(train)
        loss = next_token_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        train_s += time.perf_counter() - step_t0
        done = it + 1
        if done % args.eval_interval == 0 or done == args.max_iters:
            evaluate(done)

    end = time.perf_counter()
    return {"wall_s": end - t0, "wall_s_since_import": end - _IMPORT_T0,
            "first_val_below_target_iter": hit["iter"] if hit else None,
            "first_val_below_target_s": hit["s"] if hit else None,
            "final_val": evals[-1]["val"], "final_train": evals[-1]["train"],
            "iters": args.max_iters,
            "tokens_per_s_train": args.max_iters * BATCH_SIZE * BLOCK_SIZE / train_s,
            "evals": evals}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
    main()

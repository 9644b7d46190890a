"""PyTorch side of `scripts/benchmark.py --vs-torch`: Hugging Face GPT-2 or Llama training steps in one
persistent process, timed one block at a time on the parent's command.

    python scripts/torch_train_worker.py --arch gpt2 --layers 4 --heads 4 --dim 128 --ff 512 --block 64 \
        --batch 12 --vocab 128 [--kv-heads 4] [--variant f32|bf16|bf16_compile] [--threads 2]

--arch gpt2: `GPT2LMHeadModel` (scripts/torch_gpt2.make_model: GELU MLP of 4 x dim, LayerNorm, learned
positions, biases, tied head, dropout off). --arch llama: `LlamaForCausalLM` with lmstack's default block
(RoPE, RMSNorm, SwiGLU of --ff, grouped-query heads --kv-heads, no biases, tied head unless --untied).
Attention through torch's fused `scaled_dot_product_attention` (transformers' 'sdpa').
A step: zero grads, forward + loss (labels = the inputs, shifted inside transformers), backward, AdamW
(fused CPU kernel where this torch has one, else foreach). Variants (PyTorch's CPU paths, best last):
  f32            everything float32, eager
  bf16           the forward (and loss) under `torch.autocast("cpu", torch.bfloat16)`; parameters,
                 gradients and AdamW state float32 (the same recipe as lmstack's bf16 matmuls)
  bf16_compile   bf16 with the model wrapped in `torch.compile` (inductor; compiled at start-up)
After building and warming up it prints one JSON line {"ready": true, "n_params", "threads", "variant",
"compile_s", ...}. Then each stdin line {"steps": N} runs N steps back to back and answers
{"seconds": total, "loss": last loss}. An empty line or EOF ends it. Nothing else goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402

import torch_gpt2  # noqa: E402

VARIANTS = ("f32", "bf16", "bf16_compile")


def make_llama(a) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.ff, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=a.block,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, tie_word_embeddings=not a.untied, attention_bias=False,
        mlp_bias=False, attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    model.loss_type = "ForCausalLM"
    return model


def adamw(params, lr: float):
    """AdamW with torch's fused CPU kernel when this build has one (its fastest), else foreach."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.1, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.1), "foreach"


class Trainer:
    def __init__(self, a):
        torch.manual_seed(a.seed)
        if a.arch == "gpt2":
            self.model = torch_gpt2.make_model(n_layer=a.layers, n_head=a.heads, n_embd=a.dim, block_size=a.block,
                                               vocab_size=a.vocab)
        else:
            self.model = make_llama(a)
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())  # tied matrices once
        self.optimizer, self.optimizer_kind = adamw(self.model.parameters(), a.lr)
        self.bf16 = a.variant != "f32"
        self.forward = torch.compile(self.model) if a.variant == "bf16_compile" else self.model
        gen = torch.Generator().manual_seed(a.seed)
        self.ids = torch.randint(0, a.vocab, (a.batch, a.block), generator=gen)

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.forward(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        return loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--variant", choices=VARIANTS, default="f32")
    for name, default in (("layers", 4), ("heads", 4), ("kv-heads", 0), ("dim", 128), ("ff", 0), ("block", 64),
                          ("batch", 12), ("vocab", 128), ("threads", 2), ("seed", 0), ("warmup", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--norm-eps", type=float, default=1e-6)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--untied", action="store_true", help="llama: an LM head of its own")
    a = p.parse_args(argv)
    a.kv_heads = a.kv_heads or a.heads
    a.ff = a.ff or 4 * a.dim
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    trainer = Trainer(a)
    start = time.perf_counter()
    for _ in range(a.warmup):  # the compiled variant compiles here
        trainer.step().item()
    print(json.dumps({"ready": True, "n_params": trainer.n_params, "threads": torch.get_num_threads(),
                      "variant": a.variant, "arch": a.arch, "optimizer": trainer.optimizer_kind,
                      "warmup_s": time.perf_counter() - start, "torch": torch.__version__,
                      "transformers": transformers.__version__,
                      "attn_implementation": trainer.model.config._attn_implementation}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        n = int(json.loads(line)["steps"])
        t = time.perf_counter()
        for _ in range(n):
            loss = trainer.step()
        loss = loss.item()  # eager CPU steps are synchronous; this only reads the value
        print(json.dumps({"seconds": time.perf_counter() - t, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()

"""Llama-style 7b preset (configs/presets.py): RoPE, RMSNorm, SwiGLU, scanned layers, 2048-token windows.

Commands (data: a prepared dataset with a 32k BPE tokenizer, e.g.
  python scripts/prepare_data.py --config=configs/data/stdlib.py --out=datasets/stdlib32k \
      --config.tokenizer.vocab_size=32000):
  python scripts/estimate_memory.py --config=configs/llama_7b.py:v4-8 --devices=4 --device=tpu-v4 --vocab=32000
  python train.py --config=configs/llama_7b.py:gpu8 --config.data.path=datasets/stdlib32k --workdir=runs/llama_7b
  bash scripts/launch_tpu_vm.sh NAME ZONE configs/llama_7b.py:v5e-16 --config.data.path=/mnt/BUCKET/data
Targets: v4-8, v5e-16, gpu8, local (this machine, FSDP over all devices), tiny (CPU smoke run).
Runtime and result: not measured here (no accelerator); README Scale has the memory preflight of
every target; `:tiny` runs in seconds on a CPU (loss falls from about 5.6).
"""

from configs import presets


def get_config(arg=None):
    return presets.llama("7b", arg)

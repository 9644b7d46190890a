"""nanoGPT's CPU recipe on Tiny Shakespeare, character level (its `train_shakespeare_char` CPU line).

Command:   python train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare
Recipe:    char tokenizer; 4 layers, 4 heads, 128 dims; block 64; batch 12; 2000 iters;
           AdamW lr 1e-3, beta2 0.99, warmup 100, cosine to 1e-4; no dropout. Architecture is
           ours (RoPE + RMSNorm + SwiGLU, d_ff 512) at about nanoGPT's parameter count.
Split:     the last 10% of the text is validation (nanoGPT's split).
Runtime:   under 1 minute on 2 CPU cores (50 s measured end to end, data and compile included).
Result:    val loss 1.67 over the whole validation split (nanoGPT's figure: 1.88); val is 1.823
           at iteration 1000, about 29 s after start (README Performance: the same recipe in
           PyTorch, scripts/nanogpt_torch.py, takes 79-89 s to reach 1.8855).
"""

import os

from configs import common

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data", "tinyshakespeare.txt"))


def get_config(arg=None):
    c = common.base()
    common.model_size(c, "nano")
    c.data.path = DEFAULT_PATH
    c.data.tokenizer = "char"
    c.data.split = "tail"
    c.data.val_fraction = 0.1
    c.data.seq_len = 64
    c.data.batch_size = 12
    c.optim.lr = 1e-3
    c.optim.b2 = 0.99
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.model.dropout = 0.0
    c.train.steps = 2000
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.eval_batches = 200
    c.train.checkpoint_every = 1000
    return common.apply_arg(c, arg)

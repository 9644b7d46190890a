"""Continual learning, worked example, step 1: pretrain on the Python standard library (the old domain).

Data (once, from the repo root; about 1 minute):
    python scripts/prepare_data.py --config=configs/data/stdlib.py --config.tokenizer.kind=byte \
        --out=runs/continual/stdlib
    python scripts/continual_data.py --text=../shared/data/tinyshakespeare.txt --out=runs/continual
Command:   python train.py --config=configs/continual_base.py --workdir=runs/continual/base
Model:     'nano' (4 layers, 128 dims), bytes, windows of 128, batch 16, 1000 steps at lr 2e-3.
Runtime:   10.4 min on 2 shared AMD EPYC cores (load average 7-8; about 0.5 s/step); data: 25 s.
Result:    val loss 1.30 (stdlib 'val' split: 1.335 over the report's 50 batches); the source run of
           configs/continual.py (README, Continual learning).
The prepared dataset gives the old domain a held-out 'val' split (the report's old-domain eval) and a
'train' split (what replay and EWC's Fisher read).
"""

from configs import common

STDLIB = "runs/continual/stdlib"  # the prepared (byte-level) standard library


def get_config(arg=None):
    c = common.base()
    common.model_size(c, "nano")
    c.data.path = STDLIB
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.train.steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    return common.apply_arg(c, arg)

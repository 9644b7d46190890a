"""Continual learning, worked example, step 2: continue the stdlib model on Shakespeare, four ways.

Command (after configs/continual_base.py's data and run; from the repo root):
    python train.py --config=configs/continual.py:VARIANT --workdir=runs/continual/VARIANT
    VARIANT: plain (continued training alone) | replay (20% of every batch from the old domain) |
             l2sp (L2-SP toward the starting weights) | ewc (EWC, Fisher from 8 batches of old rows)
    python scripts/continual_report.py --workdir=runs/continual/plain --workdir=runs/continual/replay \
        --workdir=runs/continual/l2sp --workdir=runs/continual/ewc \
        --eval=old=runs/continual/stdlib --eval=new=runs/continual/new_val.txt --out=runs/continual/report
Model:     the base run's (init_from; its byte tokenizer), 300 steps of 16 x 128 bytes, lr 1e-3 re-warmed
           over 30 steps, cosine; the same data order in every variant.
Runtime:   3.0-3.4 min per variant on 2 shared AMD EPYC cores (EWC's Fisher: 16 s of it); report 3.6 min.
Result:    old-domain loss increase (forgetting) / new-domain loss decrease (gain), nats per byte, from
           1.335 / 2.820 before: plain +2.12 / +1.01, replay +0.15 / +0.99, l2sp +1.05 / +0.92,
           ewc +1.00 / +0.97 (README, Continual learning: every checkpoint).
`:VARIANT,tiny` (e.g. `:replay,tiny`) shrinks any variant to a seconds-long smoke run.
"""

from configs import common

VARIANTS = ("plain", "replay", "l2sp", "ewc")


def get_config(arg=None):
    variant, _, size = (arg or "plain").partition(",")
    if variant not in VARIANTS:
        raise ValueError(f"config arg {arg!r}: expected a variant in {VARIANTS} (optionally ',tiny')")
    c = common.base()
    common.model_size(c, "nano")
    c.init_from = "runs/continual/base"
    c.data.path = "runs/continual/new_train.txt"  # scripts/continual_data.py: Shakespeare without its last 10%
    c.data.tokenizer = "byte"
    c.data.split = "tail"
    c.data.val_fraction = 0.1
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.train.steps = 300
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 4
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 30
    n = c.continual
    n.replay_path = "runs/continual/stdlib"  # the base run's prepared data: its 'train' split is replayed
    if variant == "replay":
        n.replay_ratio = 0.2
    elif variant == "l2sp":
        n.l2sp = 1e-2
    elif variant == "ewc":
        n.ewc = 1e3
        n.fisher_batches = 8
    return common.apply_arg(c, size)

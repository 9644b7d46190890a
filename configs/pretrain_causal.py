"""Default causal-LM pretraining run: the Python standard library, byte tokenizer, 4L/256d.

Command:   python train.py --config=configs/pretrain_causal.py --workdir=runs/causal
           (`make train` runs exactly this; `:tiny` gives a seconds-long smoke run)
Runtime:   about 4-5 minutes on 2 CPU cores (600 steps x 16 x 256 tokens = 2.5M tokens)
Result:    val loss about 1.3 nats/byte (from 5.6); samples from scripts/generate.py look like
           Python: indented defs, imports, docstrings, `self.` attributes.
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    common.model_size(c, "small")
    c.data.path = ""  # embedded corpus: this Python's standard library
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.train.steps = 600
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    if arg == "tiny":
        common.tiny(c)
    elif arg:
        raise ValueError(f"config arg {arg!r}: expected nothing or 'tiny'")
    return c

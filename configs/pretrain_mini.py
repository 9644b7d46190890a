"""A 6-layer, 384-wide causal LM on the standard-library corpus (the performance benchmark size).

Command:   python train.py --config=configs/pretrain_mini.py --workdir=runs/mini
Benchmark: python scripts/benchmark.py --config=configs/pretrain_mini.py [--vs-torch]
Runtime:   see README (Performance) for tokens/s on 2 CPU cores; 2000 steps x 8 x 256 tokens.
Result:    a stronger version of the default run (val loss below the default's 1.41 nats/byte).
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    common.model_size(c, "mini")
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.train.steps = 2000
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    return common.apply_arg(c, arg)

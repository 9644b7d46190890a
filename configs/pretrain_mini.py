"""A 6-layer, 384-wide causal LM on the standard-library corpus (the performance benchmark size).

Command:   python train.py --config=configs/pretrain_mini.py --workdir=runs/mini
Benchmark: python scripts/benchmark.py --config=configs/pretrain_mini.py [--vs-torch]
Runtime:   about 10 minutes on 2 CPU cores (568 s measured end to end: 2000 steps x 8 x 256
           tokens at 5-7k tokens/s, evals included; README Performance).
Result:    val loss 1.264 nats/byte after 4.1M tokens (the 4L/256d default: 1.409 after 2.5M).
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

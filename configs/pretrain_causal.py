"""Default causal-LM pretraining run: the Python standard library, byte tokenizer, 4L/256d.

Command:   python train.py --config=configs/pretrain_causal.py --workdir=runs/causal
           (`make train` runs exactly this; `:tiny` gives a seconds-long smoke run;
           `:125m`, `:1b`, ... pick a size from configs/common.MODEL_SIZES)
Runtime:   about 2.2 minutes on 2 idle CPU cores with AVX512-BF16 (600 steps x 16 x 256 = 2.5M
           tokens at ~20k tokens/s; 132 s measured end to end, start-up and evals included); about
           10 minutes on a 2-core AMD Zen 2 or Zen 3 without bf16 instructions (~4.5k tokens/s; 9 min
           50 s on the Zen 2; ~4.2k tokens/s, 10 min 24 s via `make train` on the Zen 3)
Result:    val loss 1.41 nats/byte (1.409; seeds 1 and 2: 1.411, 1.403; 1.414 on the Zen 2 and the Zen 3) (from
           5.6 at init), the same to 4 digits on every rerun on one machine;
           samples from scripts/generate.py look like Python: indented defs, `self.` calls,
           decorators, string literals.
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
    return common.apply_arg(c, arg)

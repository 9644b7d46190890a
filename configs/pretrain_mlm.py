"""Masked-LM + next-sentence-prediction pretraining (BERT recipe) on the Python standard library.

The same Transformer with `model.causal=False` (bidirectional) and 2 token types (sentence A/B);
data/mlm.py builds `<cls> A <sep> B <sep>` pairs (50% true next segment) and masks 15% of the
non-special tokens (80% <mask>, 10% random, 10% kept). Loss = MLM + NSP (`mlm.nsp`).

Command:   python train.py --config=configs/pretrain_mlm.py --workdir=runs/mlm
           (`:tiny` gives a seconds-long smoke run; `:125m`, ... pick a size from configs/common.MODEL_SIZES)
Runtime:   about 4.5 minutes on 2 CPU cores (600 steps x 32 x 128 tokens at ~9.2k tokens/s; 277 s
           wall measured 2026-12-02 on an AMD EPYC, 2 cores shared, 3.6M parameters)
Result:    val masked-token accuracy 0.62 (MLM loss 1.44 nats, from 5.6 at init); NSP accuracy
           0.49 = chance (loss 0.694). The stdlib pairs' main NSP signal is local to the A/B cut
           (B's first bytes continuing A's last: a byte trigram tells 86% of the pairs) and <cls>
           does not learn to fetch it at this size; --config.mlm.nsp_pool=boundary does (0.68 at
           600 steps, 0.70 at 1,200) but costs MLM accuracy (0.52 / 0.60). With <cls>, NSP leaves chance
           after ~1,500 steps: --config.train.steps=3000 (18 min) gives NSP 0.65, MLM 0.78.
           README: Why NSP stays at chance.
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.mode = "mlm"
    common.model_size(c, "small")
    c.model.causal = False  # bidirectional encoder
    c.model.type_vocab_size = 2  # sentence A / B embeddings for NSP pairs
    c.data.path = ""  # embedded corpus: this Python's standard library
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.mlm.nsp = True
    c.train.steps = 600
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    return common.apply_arg(c, arg)

"""Extractive question answering (SQuAD style): start/end logits over `<cls> question <sep> context <sep>`.

The encoder of configs/pretrain_mlm.py (bidirectional, 2 token types) with a per-token Dense(2)
head (model/heads.SpanQA). Long contexts are split into windows sharing `qa.doc_stride` tokens;
eval decodes each validation question's best span over all its windows (at most
`qa.max_answer_len` tokens) and reports SQuAD exact match and F1 in percent (`eval/exact_match`,
`eval/f1`) besides the per-window loss and start/end token accuracy. Validation is
`qa.val_path` (or a hash-held-out share of data.path, split by context).
`--config.init_from=runs/mlm` warm starts the backbone (the head is re-initialised; the log says so).

Command:   python scripts/make_qa_data.py --out=datasets/stdlib_qa
           python train.py --config=configs/finetune_qa.py --workdir=runs/qa \
               --config.data.path=datasets/stdlib_qa/train.jsonl \
               --config.qa.val_path=datasets/stdlib_qa/val.jsonl [--config.init_from=runs/mlm]
           (`:tiny` gives a seconds-long smoke run)
Runtime:   400 steps x 32 windows x 256 tokens (3.5M parameters): 15-30 min wall measured on 2 CPU
           cores shared with other jobs (1.5-5 s/step); less on an idle machine.
Result:    on stdlib_qa (617 val questions from unseen files, 2,847 windows; answering `None`
           everywhere scores EM 26.7 / F1 27.0): EM 55.6 / F1 60.3 from scratch; EM 56.9 / F1 58.3
           with init_from=runs/mlm (configs/pretrain_mlm.py's run), which leads at step 200 (55.4 vs 47.8).
           Unanswerable questions too (`make_qa_data.py --unanswerable`, `--config.qa.unanswerable=True`;
           30 min idle on a 2-core Zen 3): val EM 55.7 at qa.null_threshold=0 (nearly always no answer),
           69.2 at its best threshold 2.51; test EM 66.3 / F1 67.8 with that threshold (nothing: 48.9).
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.mode = "qa"
    common.model_size(c, "small")
    c.model.causal = False  # as configs/pretrain_mlm.py, so init_from=an mlm run loads every backbone param
    c.model.type_vocab_size = 2  # question / context
    c.data.path = ""  # training JSONL (required)
    c.data.seq_len = 256
    c.data.batch_size = 32
    c.qa.val_path = ""
    c.qa.doc_stride = 64
    c.qa.max_query_len = 96  # the longest stdlib_qa question is 93 bytes
    c.qa.max_answer_len = 40
    c.train.steps = 400
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.eval_batches = 0  # 0 = the whole validation split
    c.train.checkpoint_every = 200
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 40
    common.apply_arg(c, arg)
    if arg == "tiny":
        c.data.seq_len = 64
        c.qa.doc_stride = 8
        c.qa.max_query_len = 16
        c.qa.max_answer_len = 8
        c.train.eval_batches = 0
    return c

"""Reward model: the SFT model + a scalar head, Bradley-Terry loss on preference pairs.

Data: `{"prompt", "chosen", "rejected"}` JSONL (optional numeric "margin"), each side rendered as the
chat `user: prompt -> assistant: response` of the SFT template; the reward is read at the
response's closing <|end|>. Eval: pairwise accuracy, mean margin, reward mean/std.
`scripts/score.py --workdir=RUN --data=FILE` scores (prompt, response) pairs with the trained model.

Command:   python scripts/make_tasks.py --out=datasets/tasks
           python train.py --config=configs/sft.py --workdir=runs/sft
           python train.py --config=configs/reward.py --workdir=runs/rm --config.init_from=runs/sft
           (`:tiny` gives a seconds-long smoke run)
Runtime:   1 min 5 s idle on a 2-core AVX512-BF16 Zen 5 (2026-12-06); 35 min with other jobs loading a
           Zen 2's 2 cores (load 5-9; 400 steps x 16 pairs x 2 x 128 tokens)
Result:    pairwise accuracy 0.665 val / 0.73 test from the 526-step SFT model (sort 0.84, reverse 0.81,
           count 0.68, add 0.60); README, Post-training, has the table
"""

from configs import common


def get_config(arg=None):
    c = common.base()
    c.mode = "reward"
    common.model_size(c, "small")  # as configs/sft.py, so init_from loads every backbone weight
    c.init_from = "runs/sft"
    c.data.path = "datasets/tasks/train_pref.jsonl"
    c.pref.val_path = "datasets/tasks/val_pref.jsonl"
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.train.steps = 400
    c.train.log_every = 25
    c.train.eval_every = 200
    c.train.eval_batches = 0  # 0 = every validation pair
    c.train.checkpoint_every = 200
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    common.apply_arg(c, arg)
    if arg == "tiny":
        c.init_from = ""
    return c

"""Reward model: the SFT model + a scalar head, Bradley-Terry loss on preference pairs.

Data: `{"prompt", "chosen", "rejected"}` JSONL (optional numeric "margin"), each side rendered as the
chat `user: prompt -> assistant: response` of the SFT template; the reward is read at the
response's closing <|end|>. Eval: pairwise accuracy, mean margin, reward mean/std.
`scripts/score.py --workdir=RUN --data=FILE` scores (prompt, response) pairs with the trained model.

Command:   python scripts/make_tasks.py --out=datasets/tasks
           python train.py --config=configs/sft.py --workdir=runs/sft
           python train.py --config=configs/reward.py --workdir=runs/rm --config.init_from=runs/sft
           (`:tiny` gives a seconds-long smoke run)
Runtime:   2 min 31 s idle on a 2-core AVX512-BF16 Zen 5 (2026-12-06; 1,000 steps x 16 pairs x 2 x 128
           tokens); the earlier 400-step recipe took 1 min 5 s there and 35 min on a loaded Zen 2
Result:    pairwise accuracy 0.795 val / 0.795 test from the 1,000-step SFT model (test: sort 0.98,
           reverse 1.00, count 0.73, add 0.50 = chance); 400 steps stopped underfitted (train loss 0.67,
           0.66 / 0.685); 2,000 steps, every wrong answer as a pair (25k pairs) or 10x the problems (40k,
           4,000 steps: 0.8145 on 2,000 test pairs) plateau at 0.78-0.82: count is ranked by its prior.
           README, Post-training, has the table
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
    c.train.steps = 1000
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.eval_batches = 0  # 0 = every validation pair
    c.train.checkpoint_every = 500
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    common.apply_arg(c, arg)
    if arg == "tiny":
        c.init_from = ""
        c.data.seq_len = 128  # :tiny's 32 would cut every task pair's response away
    return c

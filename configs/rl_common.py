"""What configs/grpo.py and configs/ppo.py share: the SFT model, the verifiable tasks, the iteration counts,
the prompt/completion lengths and the optimizer settings of a post-training run from runs/sft."""

from configs import common


def base(mode: str):
    """A `mode` ('grpo' or 'ppo') run from runs/sft on datasets/tasks; each config sets its own group size,
    minibatch, epochs, KL and reward."""
    c = common.base()
    c.mode = mode
    common.model_size(c, "small")  # as configs/sft.py
    c.init_from = "runs/sft"
    c.data.path = "datasets/tasks/train.jsonl"
    c.rl.val_path = "datasets/tasks/val.jsonl"
    c.data.batch_size = 16  # prompts per iteration
    c.rl.max_prompt_len = 96
    c.rl.max_new_tokens = 16
    c.train.steps = 60  # iterations
    c.train.log_every = 1
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.optim.lr = 1e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    return c

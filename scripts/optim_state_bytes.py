"""Optimizer-state bytes of every `optim.name` for a config's model: eval_shape only, nothing allocated.

  python scripts/optim_state_bytes.py --config=configs/pretrain_mini.py
  python scripts/optim_state_bytes.py --config=configs/llama_1b.py --vocab=32000

Prints a markdown table: each optimizer's state in MB and in bytes per parameter (the other optim.* fields
as the config sets them; adafactor factors tensors whose two largest dims are >= optim.adafactor_min_dim).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import modes  # noqa: E402
import optim  # noqa: E402
import overrides  # noqa: E402
import preflight  # noqa: E402
import sharding  # noqa: E402
from data import tokenizer as tokenizer_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=False)
flags.DEFINE_integer("vocab", 0, "tokenizer size (0: the byte tokenizer's)", lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = _CONFIG.value
    mode = modes.get(config)
    vocab = FLAGS.vocab or tokenizer_lib.ByteTokenizer().vocab_size
    model = mode.model(config, preflight.sized_inputs(vocab))
    rules = sharding.logical_rules(config.sharding)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    print("| optim.name | optimizer state | bytes per parameter |\n|---|---|---|")
    for name in optim.OPTIMIZERS:
        config.optim.name = name
        _, state, params = preflight.state_bytes(model, modes.optimizer(config)[0], sizes, rules,
                                                 int(config.data.seq_len))
        print(f"| {name} | {state / 1e6:.2f} MB | {state / (params / 4):.3f} |")
    print(f"(parameters: {params / 4 / 1e6:.2f}M, {params / 1e6:.1f} MB in float32)")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    overrides.run(main, 'optim_state_bytes.py')

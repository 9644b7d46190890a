"""Bytes per device of a training config on a mesh, before anything is allocated (preflight.py).

  python scripts/estimate_memory.py --config=configs/llama_1b.py:v4-8
  python scripts/estimate_memory.py --config=configs/llama_7b.py:gpu8 --devices=8 --device=h100
  python scripts/estimate_memory.py --config=configs/pretrain_causal.py --measure   # vs XLA, this machine

--devices (default: this machine's) and --device / --device_gb (default: this machine's memory per
device) describe the target, so a laptop sizes a pod. --vocab is the tokenizer's size (default: the
config's byte/char tokenizer; give it for a prepared BPE dataset, e.g. 32000). --measure also compiles
the real train step here and prints XLA's own bytes per device (arguments + temporaries) beside the
estimate. Exit status 1 when the estimate does not fit, with the changes that would.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jax  # noqa: E402

import modes  # noqa: E402
import overrides  # noqa: E402
import preflight  # noqa: E402
import sharding  # noqa: E402
from data import tokenizer as tokenizer_lib  # noqa: E402

# Memory per device of common accelerators, GiB (vendor figures; a TPU v4/v5p chip shows as one device).
DEVICE_GIB = {"tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32, "a100-40": 40, "a100-80": 80,
              "h100": 80, "h200": 141, "l4": 24, "t4": 16}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
flags.DEFINE_integer("devices", 0, "devices in the mesh (0: this machine's)", lower_bound=0)
flags.DEFINE_string("device", "", f"target accelerator: one of {sorted(DEVICE_GIB)}")
flags.DEFINE_float("device_gb", 0.0, "memory per device in GiB (overrides --device; 0: this machine's)",
                  lower_bound=0.0)
flags.DEFINE_integer("vocab", 0, "tokenizer size (0: the config's byte/char tokenizer)", lower_bound=0)
flags.DEFINE_bool("measure", False, "also compile the train step here and print XLA's bytes per device")
FLAGS = flags.FLAGS


def default_vocab(config) -> int:
    if config.data.tokenizer == "byte":
        return tokenizer_lib.ByteTokenizer().vocab_size
    raise ValueError(f"data.tokenizer={config.data.tokenizer!r}: its size depends on the data; pass --vocab")


def main(argv):
    del argv
    config = _CONFIG.value
    n = FLAGS.devices or jax.device_count()
    if FLAGS.device and FLAGS.device not in DEVICE_GIB:
        raise app.UsageError(f"--device={FLAGS.device!r}: expected one of {sorted(DEVICE_GIB)}")
    gib = FLAGS.device_gb or DEVICE_GIB.get(FLAGS.device, 0)
    limit = int(gib * 2**30) if gib else preflight.device_memory()
    platform = "tpu" if FLAGS.device.startswith("tpu") else ("gpu" if FLAGS.device else jax.default_backend())
    mode, measured = modes.get(config), 0
    if FLAGS.measure:  # the real inputs' tokenizer sets the vocabulary of both
        measured, vocab = preflight.measure(config, mode)
    else:
        vocab = FLAGS.vocab or default_vocab(config)
    plan = lambda c: preflight.estimate(c, mode, preflight.sized_inputs(vocab), n_devices=n, limit=limit,  # noqa: E731
                                        platform=platform)
    est = plan(config)
    sizes = sharding.mesh_sizes(config.mesh, n)
    print(f"{config.mode}: {est.total_params / 4 / 1e6:.1f}M f32-equivalent parameters, vocab {vocab}, mesh {sizes}, "
          f"micro-batch {preflight.micro_rows(config, mode)} x {config.data.seq_len}, "
          f"remat {config.model.remat!r}, scan_layers {config.model.scan_layers}")
    print("\n".join(est.lines()))
    if measured:
        print(f"  {'XLA (this machine)':<20}{measured / 2**30:8.3f} GiB  (estimate / measured = "
              f"{est.total / measured:.2f})")
    if not est.fits:
        print("does not fit; changes that would:\n  " + "\n  ".join(
            preflight.suggestions(plan, config)))
        sys.exit(1)


if __name__ == "__main__":
    overrides.run(main, 'estimate_memory.py')

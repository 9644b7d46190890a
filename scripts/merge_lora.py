"""Fold a LoRA run's adapters into its base weights: a plain checkpoint for export and inference.

    python scripts/merge_lora.py --workdir=runs/sft_lora --out=runs/sft_lora_merged [--step=N]

OUT gets checkpoints/<step>/ with params = base + alpha/rank * A @ B (float32) and the run's
config with lora.rank=0 (a PPO run's value head and critic kept beside the merged 'backbone'), plus
the run's tokenizer.json / chat_template.json / labels.json, so scripts/generate.py,
scripts/evaluate.py and `--config.init_from=OUT` use it like any run. The merged model's logits equal the adapted model's (tests/sft_test.py).
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
from model import lora  # noqa: E402

FLAGS = flags.FLAGS


def merge_run(workdir: str, out: str, step: int | None = None) -> str:
    """Writes the merged checkpoint under `out`; returns its path."""
    config, params, at = checkpoint.load_for_inference(workdir, step)
    r = config.get("lora", {})
    if int(r.get("rank", 0)) <= 0 or "lora" not in params:
        raise ValueError(f"{workdir!r} (step {at}) is not a LoRA run: lora.rank={r.get('rank', 0)}")
    heads = {k: v for k, v in params.items() if k not in ("base", "lora")}
    merged = lora.merged_params({k: params[k] for k in ("base", "lora")}, alpha=float(r["alpha"]), rank=int(r["rank"]))
    if heads:  # a LoRA trunk under heads (PPO's policy + value head): the merged trunk is its backbone again
        merged = dict(heads, backbone=merged)
    config = dict(config, lora=dict(r, rank=0, base_dtype="float32"), init_from="")
    path = checkpoint.save_params(out, at, merged, config)
    for name in checkpoint.RUN_FILES:
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
    return path


def main(argv):
    del argv
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    path = merge_run(FLAGS.workdir, FLAGS.out, None if FLAGS.step < 0 else FLAGS.step)
    print(f"merged adapters of {FLAGS.workdir} into {path}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A LoRA run's directory.")
    flags.DEFINE_string("out", None, "New directory for the merged checkpoint.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
    overrides.run(main, 'merge_lora.py')

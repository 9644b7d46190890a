"""Validation bits per byte of a run trained on a prepared dataset: comparable across tokenizers.

    python scripts/bits_per_byte.py --workdir=runs/bpe [--workdir=runs/byte ...]

bits/byte = loss_nats * tokens / (bytes * ln 2), where loss is the run's last `eval/loss`
(metrics.jsonl), tokens the weighted targets that evaluation scored and bytes the UTF-8 bytes
those targets stand for (`Tokenizer.byte_lengths`; <eos> targets count as tokens, 0 bytes).
The evaluated windows are recomputed from the run's saved config exactly as train.py picks
them (the first `train.eval_batches` batches of the val split), so a run that evaluated only
part of the split gets the bits per byte of that part, and the coverage is printed.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
from data import pipeline, prepared, sources  # noqa: E402
from metrics import read_jsonl  # noqa: E402

FLAGS = flags.FLAGS


def bits_per_byte(workdir: str) -> dict:
    mngr = checkpoint.open_read_only(workdir)  # never cleans: the run may still be training
    try:
        cfg = checkpoint.saved_config(mngr, mngr.latest_step())
    finally:
        mngr.close()
    data = cfg["data"]
    if not prepared.is_prepared(data["path"]):
        raise ValueError(f"{workdir}: data.path={data['path']!r} is not a prepared dataset"
                         f"{sources.in_cwd(data['path']) if data['path'] else ''}")
    evals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/loss" in r]
    loss = evals[-1]["eval/loss"]
    tok, _, val = prepared.load_prepared(data["path"])
    micro = data["batch_size"] // cfg["optim"]["grad_accum_steps"]
    source = pipeline.WindowSource(val, data["seq_len"])
    n = min(len(source), cfg["train"]["eval_batches"] * micro)
    lengths = tok.byte_lengths()
    tokens = nbytes = 0.0
    for i in range(n):
        w = source[i]
        tokens += float(w["weights"].sum())
        nbytes += float((w["weights"] * lengths[w["targets"]]).sum())
    return {"workdir": workdir, "step": evals[-1]["step"], "tokenizer": tok.kind, "vocab": tok.vocab_size,
            "eval_loss": loss, "tokens": tokens, "bytes": nbytes, "coverage": n / max(len(source), 1),
            "bits_per_byte": loss * tokens / (nbytes * math.log(2))}


def main(argv):
    del argv
    for workdir in FLAGS.workdir:
        r = bits_per_byte(workdir)
        print(f"{r['workdir']}: step {r['step']}, {r['tokenizer']} ({r['vocab']} ids), val loss {r['eval_loss']:.4f} "
              f"nats/token over {r['tokens']:.0f} tokens = {r['bytes']:.0f} bytes ({100 * r['coverage']:.0f}% of "
              f"the val split): {r['bits_per_byte']:.4f} bits/byte")


if __name__ == "__main__":  # flags defined here: tests import this module beside other scripts
    flags.DEFINE_multi_string("workdir", None, "Run directory (trained with data.path = a prepared dataset).")
    flags.mark_flags_as_required(["workdir"])
    overrides.run(main, 'bits_per_byte.py')

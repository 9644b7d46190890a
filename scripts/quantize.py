"""Quantize a run's checkpoint (weights only): int8 per output channel or int4 per group.

    python scripts/quantize.py --workdir=runs/mini --out=runs/mini_int4_gptq --method=gptq --bits=4 \
        --group=64 [--embed_bits=8] [--calib=128] [--act_order] [--step=N]

Methods: rtn (round-to-nearest, absmax scales), gptq and awq (calibrated on --calib sequences of the
run's own training data; model/quantize.py says how). Every dense kernel of the transformer is
quantized; the embedding / LM head at --embed_bits (0 keeps it float), always round-to-nearest.

OUT is a run directory: checkpoints/<step>/ holding int8 (int4: two per uint8) values + bfloat16
scales (model/quantize.SCALE_DTYPE), the run's config with quant.stored=True (so scripts/evaluate.py,
generate.py, serve.py and the decoder build the quantized model from it), the run's tokenizer / chat
template / labels, and compression.json: what was quantized how, bytes on disk and in memory before
and after. On any error (bad method, bits, group, an already quantized run, OUT not empty) nothing is
written to OUT.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import modes  # noqa: E402
import sharding  # noqa: E402
import steps  # noqa: E402
from model import build, ptq, quantize  # noqa: E402

FLAGS = flags.FLAGS


def param_bytes(params) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))


def calibration_tokens(batches: list[dict], mode: str) -> list[np.ndarray]:
    """The token ids ('inputs' of every kind: a pair's chosen and rejected too) of calibration batches."""
    ids = [v for batch in batches for k, v in batch.items() if k.endswith("inputs") and np.ndim(v) == 2]
    if not ids:
        raise ValueError(f"mode={mode!r} batches carry no token 'inputs' ({sorted(batches[0])})")
    return ids


def quantize_run(workdir: str, out: str, *, method: str, bits: int, group: int = 0, embed_bits: int = 8,
                 calib: int = 128, step: int | None = None, act_order: bool = False) -> dict:
    """Writes OUT (see the module docstring); returns the manifest."""
    if method not in ptq.METHODS:
        raise ValueError(f"--method={method!r}: expected one of {', '.join(ptq.METHODS)}")
    if bits not in (4, 8):
        raise ValueError(f"--bits={bits}: expected 8 or 4")
    checkpoint.check_new_dir(out)
    config, at = evaluation.load_run(workdir, step)
    if config.get("quant") is not None and bool(config.quant.stored):
        raise ValueError(f"{workdir!r} is already quantized (quant.bits={config.quant.bits}): quantize the float run")
    if config.get("lora") is not None and int(config.lora.rank) > 0:
        raise ValueError(f"{workdir!r} is a LoRA run (lora.rank={config.lora.rank}): merge it first "
                         f"(scripts/merge_lora.py), then quantize the merged run")
    qconfig = config.copy_and_resolve_references()
    qconfig.quant.update(bits=bits, group=group, embed_bits=embed_bits, stored=True, act_scale=method == "awq")
    quantize.spec_from_config(qconfig)  # bits / group / embed_bits checked, naming the value
    _, params, at = checkpoint.load_for_inference(workdir, at)
    if config.mode == "ppo" and "backbone" not in params:
        raise ValueError(f"{workdir!r}: a ppo checkpoint without a 'backbone' subtree")
    mode = modes.get(config)
    tok_path = os.path.join(workdir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} not found: is {workdir!r} a training run's workdir?")
    if method == "rtn":
        inputs, batches = evaluation.eval_inputs(qconfig, workdir, int(config.data.batch_size), "", "val"), None
    else:  # the training data is read once: for calibration and for what the model needs to know of it
        inputs, batches = evaluation.training_rows(config, workdir, calib)
    model = mode.model(qconfig, inputs)
    mesh = sharding.make_mesh(qconfig.mesh)
    abstract, _ = steps.abstract_params(model, mesh, sharding.logical_rules(qconfig.sharding), config.data.seq_len)
    grams = None
    if batches is not None:
        model_cfg = build.model_config(config, inputs.tokenizer.vocab_size)
        grams = ptq.calibrate(model_cfg, params, calibration_tokens(batches, config.mode))
    qparams, kernels = ptq.quantize_params(params, abstract, method, grams, group, act_order and method == "gptq")
    manifest = {
        "source": os.path.abspath(workdir), "source_step": at, "method": method, "bits": bits, "group": group,
        "embed_bits": embed_bits, "calibration_sequences": calib if method != "rtn" else 0,
        "act_order": act_order and method == "gptq",
        "param_bytes_before": param_bytes(params), "param_bytes_after": param_bytes(qparams),
        "disk_bytes_before": checkpoint.dir_bytes(os.path.join(workdir, "checkpoints", str(at))), "kernels": kernels}
    earlier = os.path.join(workdir, "compression.json")
    if os.path.exists(earlier):  # a pruned run quantized: its pruning record travels with it (GPTQ keeps its zeros)
        with open(earlier) as f:
            manifest["source_compression"] = json.load(f)

    def files(run_dir: str) -> dict:
        manifest["disk_bytes_after"] = checkpoint.dir_bytes(os.path.join(run_dir, "checkpoints", str(at)))
        return {"compression.json": manifest}
    checkpoint.save_run(out, at, qparams, qconfig.to_dict(), workdir, files)
    return manifest


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run to quantize.")
    flags.DEFINE_string("out", None, "New run directory for the quantized checkpoint.")
    flags.DEFINE_string("method", "rtn", "rtn | gptq | awq")
    flags.DEFINE_integer("bits", 8, "8 or 4")
    flags.DEFINE_integer("group", 0, "Inputs per scale; 0 = one scale per output channel.")
    flags.DEFINE_integer("embed_bits", 8, "Embedding / LM head: 8, 4, or 0 to keep it float.")
    flags.DEFINE_integer("calib", 128, "Calibration sequences (gptq, awq).")
    flags.DEFINE_bool("act_order", False, "gptq: quantize inputs in decreasing order of activation.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    absl_logging.set_verbosity(absl_logging.WARNING)
    manifest = quantize_run(FLAGS.workdir, FLAGS.out, method=FLAGS.method, bits=FLAGS.bits, group=FLAGS.group,
                            embed_bits=FLAGS.embed_bits, calib=FLAGS.calib, act_order=FLAGS.act_order,
                            step=None if FLAGS.step < 0 else FLAGS.step)  # errors: one line (overrides.run)
    summary = {k: v for k, v in manifest.items() if k != "kernels"}
    print(json.dumps({**summary, "kernels": len(manifest["kernels"]), "out": FLAGS.out}, indent=1))


if __name__ == "__main__":
    define_flags()
    overrides.run(main, 'quantize.py')

"""How much of each pruned layer's output a one-shot mask removes, on the run's own training rows.

    python scripts/prune_error.py --workdir=runs/mini [--sparsity=0.5] [--calib=32] [--json=OUT]
    python scripts/prune_error.py --workdir=runs/causal --mixed [--max_batches=16]

For every Dense kernel W of the blocks, and the masks of one-shot magnitude (per kernel) and Wanda (per
output column), the squared error the removed weights D put on the layer's output over the calibration
inputs X: ||X D||^2 = tr(D^T G D), G = X^T X (scripts/prune.py's calibration, Gram statistic). Wanda's score is
each weight's own term of that error, so it should be lower there; README (Compression) compares this
with what the validation loss says.

`--mixed` asks where the loss disagrees: the validation loss (`--max_batches` batches) with magnitude's
masks everywhere, Wanda's everywhere, and Wanda's on one kernel group at a time (attention query/key,
attention value/out, MLP gate/up, MLP down) with magnitude's elsewhere; and per kernel the share of its
input rows (input channels, e.g. an MLP hidden unit for the down projection) that lose >= 90% of their
weights under each method, i.e. inputs the mask all but cuts off. The pruned models are written to a
temporary directory and evaluated like any run (scripts/evaluate.py's path), then deleted.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import prune as prune_script  # noqa: E402  (scripts/prune.py: the calibration Wanda uses)
from model import prune  # noqa: E402

FLAGS = flags.FLAGS


def removed_error(w_KxM, keep_KxM, gram_KxK) -> float:
    """||X D||^2 for D = the weights `keep` drops, from G = X^T X: tr(D^T G D), float64."""
    import numpy as np
    removed_KxM = np.where(np.asarray(keep_KxM), 0.0, np.asarray(w_KxM)).astype(np.float64)
    return float(np.trace(removed_KxM.T @ np.asarray(gram_KxK, np.float64) @ removed_KxM))


def _per_layer_run(workdir: str):
    """(saved config, params as numpy, step, prunable kernels by name) of an unscanned run; a scanned run
    (kernels stacked over layers) is refused by name."""
    import jax
    import numpy as np

    config_dict, params, step = checkpoint.load_for_inference(workdir)
    if evaluation.config_from_saved(config_dict).model.scan_layers:
        raise ValueError(f"--workdir={workdir!r} has model.scan_layers=True: this script reads per-layer kernels")
    params = jax.tree.map(np.asarray, params)
    return config_dict, params, step, prune.prunable_tensors(params, False, False)


def layer_errors(workdir: str, sparsity: float, calib: int) -> dict:
    """name -> {'magnitude': error, 'wanda': error} (float64), plus 'total'."""
    import numpy as np

    config_dict, params, _, weights = _per_layer_run(workdir)
    grams = prune_script.calibration_stats(workdir, config_dict, params, calib, "gram")
    norms = {name: np.sqrt(np.diag(gram_KxK)) for name, gram_KxK in grams.items()}  # ||x_k|| from G's diagonal
    # scripts/prune.py's one-shot masks at each method's default comparison group
    masks = {m: prune.oneshot_masks(weights, method=m, sparsity=sparsity, norms=norms) for m in ("magnitude", "wanda")}
    out = {name: {m: removed_error(w, masks[m][name], grams[name]) for m in masks} for name, w in weights.items()}
    out["total"] = {m: sum(out[name][m] for name in weights) for m in masks}
    return out


GROUPS = {"attention query/key": ("query", "key"), "attention value/out": ("value", "out"),
          "MLP gate/up": ("gate", "up"), "MLP down": ("down",)}


def group_of(name: str) -> str:
    """The kernel group of a prunable kernel's path name ('layer_0/attn/query/kernel' -> 'attention query/key')."""
    module = name.split("/")[-2]
    return next((g for g, modules in GROUPS.items() if module in modules), "other")


def cut_rows(keep_KxM, share: float = 0.9) -> float:
    """Share of input rows of a kernel [K, M] that lose >= `share` of their weights under the mask."""
    import numpy as np
    return float(np.mean(1.0 - np.asarray(keep_KxM, np.float64).mean(axis=1) >= share - 1e-9))


def mixed_losses(workdir: str, sparsity: float, calib: int, max_batches: int) -> dict:
    """{'loss': {variant: validation loss}, 'cut_rows': {kernel: {method: share}}} for the dense run, magnitude
    and Wanda everywhere, and 'wanda on <group>' (magnitude's masks on every other kernel)."""
    import shutil
    import tempfile

    import numpy as np

    config_dict, params, step, weights = _per_layer_run(workdir)
    norms = prune_script.calibration_norms(workdir, config_dict, params, calib)
    # scripts/prune.py's one-shot masks at each method's default comparison group
    masks = {m: prune.oneshot_masks(weights, method=m, sparsity=sparsity, norms=norms)
             for m in ("magnitude", "wanda")}
    # variant -> the kernels that take Wanda's masks (magnitude's on the rest)
    variants = {"magnitude": set(), "wanda": set(weights)}
    for g in GROUPS:
        if any(group_of(n) == g for n in weights):
            variants[f"wanda on {g}"] = {n for n in weights if group_of(n) == g}
    losses = {"dense": float(evaluation.evaluate_run(workdir, max_batches=max_batches)["eval/loss"])}
    tmp = tempfile.mkdtemp(prefix="prune_mixed_")
    try:
        for i, (variant, wanda_kernels) in enumerate(variants.items()):
            pruned = {n: np.where(np.asarray(masks["wanda" if n in wanda_kernels else "magnitude"][n]), w, 0.0)
                      .astype(w.dtype) for n, w in weights.items()}
            run = os.path.join(tmp, str(i))
            checkpoint.save_run(run, step, prune_script.with_tensors(params, pruned), config_dict, workdir)
            losses[variant] = float(evaluation.evaluate_run(run, max_batches=max_batches)["eval/loss"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cut = {n: {m: cut_rows(masks[m][n]) for m in masks} for n in weights}
    return {"loss": losses, "cut_rows": cut}


def main(argv):
    del argv
    if not 0.0 <= FLAGS.sparsity < 1.0:
        raise ValueError(f"--sparsity={FLAGS.sparsity}: expected a value in [0, 1)")
    if FLAGS.mixed:
        out = mixed_losses(FLAGS.workdir, FLAGS.sparsity, FLAGS.calib, FLAGS.max_batches)
        dense = out["loss"]["dense"]
        for variant, loss in out["loss"].items():
            print(f"{variant:36s} val loss {loss:.4f}  {100 * (loss / dense - 1):+.2f}%")
        for name, share in out["cut_rows"].items():
            print(f"{name:48s} input rows >= 90% removed: magnitude {share['magnitude']:.3f}  "
                  f"wanda {share['wanda']:.3f}")
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    errors = layer_errors(FLAGS.workdir, FLAGS.sparsity, FLAGS.calib)
    for name, e in errors.items():
        print(f"{name:48s} magnitude {e['magnitude']:11.4g}  wanda {e['wanda']:11.4g}  "
              f"wanda/magnitude {e['wanda'] / max(e['magnitude'], 1e-30):.3f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(errors, f, indent=1)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The float run.", required=True)
    flags.DEFINE_float("sparsity", 0.5, "Share of each kernel's weights removed.")
    flags.DEFINE_integer("calib", 32, "Calibration sequences (training rows).", lower_bound=1)
    flags.DEFINE_string("json", "", "Also write the errors (or --mixed's figures) here.")
    flags.DEFINE_bool("mixed", False, "Validation loss with Wanda's masks on one kernel group at a time.")
    flags.DEFINE_integer("max_batches", 16, "--mixed: validation batches per loss.", lower_bound=1)
    overrides.run(main, 'prune_error.py')

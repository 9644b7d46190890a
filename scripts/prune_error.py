"""How much of each pruned layer's output a one-shot mask removes, on the run's own training rows.

    python scripts/prune_error.py --workdir=runs/mini [--sparsity=0.5] [--calib=32] [--json=OUT]

For every Dense kernel W of the blocks, and the masks of one-shot magnitude (per kernel) and Wanda (per
output column), the squared error the removed weights D put on the layer's output over the calibration
inputs X: ||X D||^2 = tr(D^T G D), G = X^T X (scripts/prune.py's calibration, Gram statistic). Wanda's score is
each weight's own term of that error, so it should be lower there; README (Compression) compares this
with what the validation loss says.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

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


def layer_errors(workdir: str, sparsity: float, calib: int) -> dict:
    """name -> {'magnitude': error, 'wanda': error} (float64), plus 'total'."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    config_dict, params, _ = checkpoint.load_for_inference(workdir)
    params = jax.tree.map(np.asarray, params)
    config = evaluation.config_from_saved(config_dict)
    if config.model.scan_layers:
        raise ValueError(f"--workdir={workdir!r} has model.scan_layers=True: this script reads per-layer kernels")
    weights = prune.prunable_tensors(params, False, False)
    grams = prune_script.calibration_stats(workdir, config_dict, params, calib, "gram")
    out, total = {}, {"magnitude": 0.0, "wanda": 0.0}
    for name, w in weights.items():
        gram_KxK = grams[name]
        norm_K = np.sqrt(np.diag(gram_KxK))
        masks = {"magnitude": prune.magnitude_masks({name: jnp.abs(w)}, sparsity, "layer")[name],
                 "wanda": prune.column_mask(prune.wanda_scores(jnp.asarray(w), jnp.asarray(norm_K)), sparsity)}
        out[name] = {}
        for method, keep in masks.items():
            out[name][method] = removed_error(w, keep, gram_KxK)
            total[method] += out[name][method]
    out["total"] = total
    return out


def main(argv):
    del argv
    if not 0.0 <= FLAGS.sparsity < 1.0:
        raise ValueError(f"--sparsity={FLAGS.sparsity}: expected a value in [0, 1)")
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
    flags.DEFINE_integer("calib", 32, "Calibration sequences (training rows).")
    flags.DEFINE_string("json", "", "Also write the errors here.")
    app.run(main)

"""scripts/prune_error.py: the output error of a pruning mask, Wanda lowering it where it should, and the
validation loss of masks mixed per kernel group (--mixed)."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prune as prune_script  # noqa: E402
import prune_error  # noqa: E402

import evaluation  # noqa: E402
import train  # noqa: E402
from conftest import tiny_config  # noqa: E402
from model import prune  # noqa: E402


def test_removed_error_is_the_squared_output_error_and_wanda_lowers_it_for_uneven_inputs():
    rng = np.random.default_rng(0)
    x_NxK = rng.standard_normal((256, 16)) * np.geomspace(0.1, 10.0, 16)  # channels of very different scales
    w_KxM = rng.standard_normal((16, 8))
    gram = x_NxK.T @ x_NxK
    keep = rng.random((16, 8)) < 0.5
    direct = float(np.sum((x_NxK @ np.where(keep, 0.0, w_KxM)) ** 2))
    np.testing.assert_allclose(prune_error.removed_error(w_KxM, keep, gram), direct, rtol=1e-9)
    norm = jnp.asarray(np.sqrt(np.diag(gram)))
    wanda = prune.column_mask(prune.wanda_scores(jnp.asarray(w_KxM), norm), 0.5)
    magnitude = prune.magnitude_masks({"w": jnp.abs(jnp.asarray(w_KxM))}, 0.5, "layer")["w"]
    e_wanda = prune_error.removed_error(w_KxM, wanda, gram)
    e_magnitude = prune_error.removed_error(w_KxM, magnitude, gram)
    assert e_wanda < 0.5 * e_magnitude, (e_wanda, e_magnitude)


def test_mixed_masks_per_kernel_group_match_the_prune_scripts_runs(corpus_dir, tmp_path):
    assert prune_error.group_of("layer_0/attn/query/kernel") == "attention query/key"
    assert prune_error.group_of("layer_3/mlp/down/kernel") == "MLP down"
    assert prune_error.group_of("layer_1/mlp/up/kernel") == "MLP gate/up"
    keep = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1] * 10], bool)
    assert prune_error.cut_rows(keep) == 1 / 3  # the first row loses 90% of its weights, the second 60%
    run = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3, train__eval_every=3, train__eval_batches=1,
                                         model__d_model=64, model__d_ff=128), run)
    out = prune_error.mixed_losses(run, 0.5, calib=2, max_batches=1)
    assert list(out["loss"]) == ["dense", "magnitude", "wanda", "wanda on attention query/key",
                                 "wanda on attention value/out", "wanda on MLP gate/up", "wanda on MLP down"]
    assert len(set(out["loss"].values())) == len(out["loss"])  # every mixture is a different model
    # magnitude / Wanda everywhere are scripts/prune.py's one-shot runs at its default comparison groups
    for method in ("magnitude", "wanda"):
        pruned = str(tmp_path / method)
        prune_script.prune_run(run, pruned, method=method, sparsity=0.5, calib=2)
        loss = evaluation.evaluate_run(pruned, max_batches=1)["eval/loss"]
        assert loss == pytest.approx(out["loss"][method], rel=1e-6), method
    assert all(0.0 <= v <= 1.0 for shares in out["cut_rows"].values() for v in shares.values())


def test_a_scanned_model_is_refused_by_name(corpus_dir, tmp_path):
    """Both reports read per-layer kernels: a run with model.scan_layers=True is an error naming it."""
    run = str(tmp_path / "scanned")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3, train__eval_every=3, train__eval_batches=1,
                                         model__d_model=64, model__d_ff=128, model__scan_layers=True), run)
    for report in (lambda: prune_error.layer_errors(run, 0.5, calib=1),
                   lambda: prune_error.mixed_losses(run, 0.5, calib=1, max_batches=1)):
        with pytest.raises(ValueError, match="has model.scan_layers=True: this script reads per-layer kernels"):
            report()

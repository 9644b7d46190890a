"""scripts/prune_error.py: the output error of a pruning mask, and Wanda lowering it where it should."""

import os
import sys

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prune_error  # noqa: E402

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

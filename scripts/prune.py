"""One-shot pruning of a run's checkpoint into a new, compactly stored run directory.

    python scripts/prune.py --workdir=runs/mini --out=runs/mini_wanda50 --method=wanda --sparsity=0.5 \
        [--nm=2:4] [--scope=layer|global|output] [--calib=64] [--sequential] [--step=N] [--include_embedding] \
        [--include_heads]

--method=magnitude drops the smallest |w| of each kernel (--scope=layer, its default), under one
threshold over all pruned kernels (--scope=global) or in every output column (--scope=output).
--method=wanda (Sun et al. 2023) drops the entries with the smallest |W_km| * ||x_k||_2, x the
layer's inputs over --calib sequences of the run's own training data (rebuilt as training built it),
in every output column (--scope=output, its default, as its paper does) or per kernel / globally;
with --sequential block by block, each block's inputs measured with the blocks before it already
pruned (as the Wanda authors' code does).
--nm=N:M keeps the N largest scores of every M consecutive input entries instead (2:4: sparsity 1/2;
--sparsity is then not read). Pruned: the Dense kernels of the transformer blocks (and with the flags
the embedding / LM head, the heads).

OUT gets checkpoints/<step>/ (params only: each pruned kernel stored as its non-zero values + a packed
bit mask + its shape, model/prune.pack), the run's tokenizer.json / chat_template.json / labels.json,
and compression.json: method, sparsity, per-layer and global sparsity, bytes on disk of the unpruned
params alone (an Orbax params checkpoint, written to a temporary directory and measured) and of OUT's
checkpoint, and the pruned tensors' own bytes dense and packed (Orbax's per-array files dominate a tiny
model). checkpoint.load_for_inference and evaluation.evaluate_run make it dense again, so scripts/evaluate.py, generate.py, serve.py, score.py and init_from read it like any run.
Bad input (method, sparsity, N:M, a workdir that is already compressed, an OUT that is not new or empty)
exits 1 naming the value; OUT is built in a temporary directory beside it and moved into place last,
so nothing is written to OUT on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import overrides  # noqa: E402
import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import modes  # noqa: E402
from model import calibrate, prune  # noqa: E402

FLAGS = flags.FLAGS
MANIFEST = "compression.json"


def parse_nm(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--nm={text!r}: expected N:M, e.g. 2:4") from None
    prune.check_nm(n, m)
    return n, m


def check_args(method: str, sparsity: float, nm: tuple[int, int] | None, scope: str) -> float:
    """The sparsity the masks will have (N:M: 1 - N/M); errors name the bad value. scope '' = the method's."""
    if method not in ("magnitude", "wanda"):
        raise ValueError(f"--method={method!r}: expected 'magnitude' or 'wanda'")
    if scope and scope not in prune.ONESHOT_SCOPES:
        raise ValueError(f"--scope={scope!r}: expected one of {prune.ONESHOT_SCOPES}")
    if scope and nm is not None:
        raise ValueError(f"--scope={scope} applies to unstructured pruning, not --nm={nm[0]}:{nm[1]} (its groups "
                         f"are M consecutive inputs)")
    if nm is not None:
        return 1.0 - nm[0] / nm[1]
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity={sparsity}: must be in [0, 1)")
    return sparsity


def check_source(workdir: str, config: dict) -> None:
    """Refuse a run that is already compressed (pruned or quantized) or holds LoRA adapters."""
    if os.path.exists(os.path.join(workdir, MANIFEST)):
        raise ValueError(f"--workdir={workdir!r} is already a compressed run ({MANIFEST} is there): prune the "
                         f"original run instead")
    if config.get("quant", {}).get("stored", False):
        raise ValueError(f"--workdir={workdir!r} holds quantized weights (quant.stored=True): prune before quantizing")
    if int(config.get("lora", {}).get("rank", 0)) > 0:
        raise ValueError(f"--workdir={workdir!r} is a LoRA run (lora.rank={config['lora']['rank']}): merge its "
                         f"adapters first (scripts/merge_lora.py), then prune the merged run")
    mngr = checkpoint.open_read_only(workdir)
    try:
        if checkpoint.has_packed_params(mngr, mngr.latest_step()):
            raise ValueError(f"--workdir={workdir!r} stores pruned tensors compactly: it is already pruned")
    finally:
        mngr.close()


def calibration_norms(workdir: str, config_dict: dict, params, n_sequences: int) -> dict:
    """name -> ||x_k||_2 [.., K] over `n_sequences` rows of the run's own training batches."""
    return {k: v ** 0.5 for k, v in calibration_stats(workdir, config_dict, params, n_sequences).items()}


def calibration_stats(workdir: str, config_dict: dict, params, n_sequences: int, stat: str = "sq") -> dict:
    """name -> float64 statistic of each Dense kernel's inputs x over `n_sequences` rows of the run's own
    training batches: 'sq' = sum of x_k^2 [.., K], 'gram' = sum of x x^T [.., K, K] (model/calibrate.py)."""
    config = evaluation.config_from_saved(config_dict)
    mode = modes.get(config)
    scanned = bool(config.model.scan_layers)
    config.model.scan_layers = False  # traced values cannot leave nn.scan: calibrate the unscanned twin
    inputs, batches = evaluation.training_rows(config, workdir, n_sequences)
    model = mode.model(config, inputs)
    loss = mode.loss(config)
    plain = calibrate.unstack_layers(params) if scanned else params
    sums = calibrate.dense_input_stats(lambda p, b: loss(p, b, None, model=model), plain, batches, stat)
    return calibrate.stack_layers(sums, int(config.model.n_layers)) if scanned else sums


def _layer_of(name: str) -> int | None:
    """The block index in an unscanned kernel's name ('layer_3/mlp/up/kernel' -> 3), else None."""
    parts = name.split("/")
    at = calibrate.layer_part(parts)
    return None if at is None else int(parts[at][6:])


def sequential_wanda(workdir: str, config_dict: dict, params, weights: dict, calib: int, sparsity: float,
                     nm_pair, scope: str = "output") -> dict:
    """name -> pruned weight by Wanda block by block: block l's masks from input norms measured with blocks
    < l already pruned (scanned kernels: slice l of the stacked kernel), then the kernels outside the blocks."""
    import numpy as np

    scanned = {k for k in weights if "layers/block/" in k}
    pruned = dict(weights)
    for layer in list(range(int(config_dict["model"]["n_layers"]))) + [None]:
        todo = [k for k in weights if k not in scanned and _layer_of(k) == layer]
        if not todo and (layer is None or not scanned):
            continue
        norms = calibration_norms(workdir, config_dict, with_tensors(params, pruned), calib)
        masks = prune.oneshot_masks(weights, method="wanda", sparsity=sparsity, scope=scope, nm=nm_pair,
                                    norms={k: norms[k] for k in weights if k in norms})
        for k in todo:
            pruned[k] = np.where(np.asarray(masks[k]), weights[k], 0).astype(weights[k].dtype)
        if layer is not None:
            for k in scanned:
                pruned[k] = np.array(pruned[k])
                pruned[k][layer] = np.where(np.asarray(masks[k][layer]), weights[k][layer], 0)
    return pruned


def with_tensors(params, tensors: dict):
    """params with the named tensors replaced (dense)."""
    import jax
    return jax.tree_util.tree_map_with_path(
        lambda path, x: tensors.get(prune.path_name(prune.key_names(path)), x), params)


def prune_run(workdir: str, out: str, *, method: str, sparsity: float = 0.5, nm: str = "", scope: str = "",
              calib: int = 64, step: int | None = None, include_embedding: bool = False,
              include_heads: bool = False, sequential: bool = False) -> dict:
    """Writes the pruned run to `out` (built beside it, moved into place last); returns the manifest."""
    import jax
    import numpy as np

    nm_pair = parse_nm(nm)
    target = check_args(method, sparsity, nm_pair, scope)
    scope = scope or prune.default_scope(method)
    if method == "wanda" and calib < 1:
        raise ValueError(f"--calib={calib}: wanda needs at least 1 calibration sequence")
    if sequential and method != "wanda":
        raise ValueError(f"--sequential: only for --method=wanda (got {method!r})")
    out = os.path.abspath(out)
    checkpoint.check_new_dir(out)
    config, params, at = checkpoint.load_for_inference(workdir, step)
    check_source(workdir, config)
    params = jax.tree.map(np.asarray, params)
    weights = prune.prunable_tensors(params, include_embedding, include_heads)
    if not weights:
        raise ValueError(f"{workdir!r}: no prunable kernel found")
    if nm_pair is not None:
        for k, w in weights.items():
            if w.shape[prune.input_axis(k)] % nm_pair[1]:
                raise ValueError(f"--nm={nm}: {k} has input dim {w.shape[prune.input_axis(k)]} (shape {w.shape}), "
                                 f"not divisible by M={nm_pair[1]}")
    norms = calibration_norms(workdir, config, params, calib) if method == "wanda" and not sequential else None
    if sequential:
        pruned = sequential_wanda(workdir, config, params, weights, calib, target, nm_pair, scope)
    else:
        masks = prune.oneshot_masks(weights, method=method, sparsity=target, scope=scope, nm=nm_pair,
                                    norms=None if norms is None else {k: norms[k] for k in weights if k in norms})
        pruned = {k: np.where(np.asarray(masks[k]), w, np.zeros_like(w)) for k, w in weights.items()}
    report = prune.sparsity_report(pruned)
    compact = _packed(params, pruned)

    scratch = tempfile.mkdtemp(prefix=".prune_dense_")
    try:  # the unpruned params alone, written the same way: the fair "before" size
        checkpoint.save_params(scratch, at, params, config)
        dense_bytes = checkpoint.dir_bytes(os.path.join(scratch, "checkpoints"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest = {}

    def files(run_dir: str) -> dict:
        compact_bytes = checkpoint.dir_bytes(os.path.join(run_dir, "checkpoints"))
        manifest.update({"source": os.path.abspath(workdir), "step": at, "method": method,
                         "nm": f"{nm_pair[0]}:{nm_pair[1]}" if nm_pair else None,
                         "scope": scope if nm_pair is None else "group", "target_sparsity": target,
                         "calibration_sequences": calib if method == "wanda" else 0, "sequential": sequential,
                         "sparsity": report["global"],
                         "per_layer_sparsity": {k: v for k, v in report.items() if k != "global"},
                         "storage": "pruned kernels as non-zero values + np.packbits mask + shape (model/prune.pack)",
                         "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
                         "pruned_params": int(sum(np.size(w) for w in weights.values())),
                         "bytes_unpruned_params_checkpoint": dense_bytes, "bytes_on_disk": compact_bytes,
                         "bytes_ratio": dense_bytes / max(compact_bytes, 1),
                         "pruned_tensor_bytes_dense": int(sum(w.nbytes for w in pruned.values())),
                         "pruned_tensor_bytes_packed": int(sum(sum(np.asarray(a).nbytes for a in prune.pack(w).values())
                                                               for w in pruned.values()))})
        return {MANIFEST: manifest}
    checkpoint.save_run(out, at, compact, config, workdir, files)
    return manifest


def _packed(params, pruned: dict):
    """params with the pruned tensors in place, packed (model/prune.pack)."""
    import jax

    def one(path, x):
        name = prune.path_name(prune.key_names(path))
        return prune.pack(pruned[name]) if name in pruned else x
    return jax.tree_util.tree_map_with_path(one, params)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        manifest = prune_run(FLAGS.workdir, FLAGS.out, method=FLAGS.method, sparsity=FLAGS.sparsity, nm=FLAGS.nm,
                             scope=FLAGS.scope, calib=FLAGS.calib, step=None if FLAGS.step < 0 else FLAGS.step,
                             include_embedding=FLAGS.include_embedding, include_heads=FLAGS.include_heads,
                             sequential=FLAGS.sequential)
    except (ValueError, FileNotFoundError, checkpoint.IncompatibleCheckpointError) as e:
        print(f"prune.py: error: {e}", file=sys.stderr)
        return 1
    brief = {k: v for k, v in manifest.items() if k != "per_layer_sparsity"}
    print(json.dumps(brief, indent=1))
    print(f"wrote {FLAGS.out}")
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The run to prune (its latest checkpoint unless --step).")
    flags.DEFINE_string("out", None, "New (or empty) directory for the pruned run.")
    flags.DEFINE_string("method", "magnitude", "'magnitude' | 'wanda'.")
    flags.DEFINE_float("sparsity", 0.5, "Share of zeros in the pruned kernels, in [0, 1) (not read with --nm).")
    flags.DEFINE_string("nm", "", "N:M structured sparsity, e.g. 2:4 (N kept of every M input entries).")
    flags.DEFINE_string("scope", "", "Comparison group: 'layer' (each kernel; magnitude's default) | 'global' (one "
                                     "threshold) | 'output' (each output column; wanda's default).")
    flags.DEFINE_integer("calib", 64, "wanda: calibration sequences from the run's training data.")
    flags.DEFINE_bool("sequential", False, "wanda: block by block, on the inputs of the blocks before pruned.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
    flags.DEFINE_bool("include_embedding", False, "Also prune the token embedding / an untied LM head.")
    flags.DEFINE_bool("include_heads", False, "Also prune the output-side heads' kernels.")
    overrides.run(main, 'prune.py')

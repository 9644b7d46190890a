"""Export a run's decoder as StableHLO: prefill and a chunk of decode steps, symbolic in batch and prompt length.

    python scripts/export.py --workdir=runs/default --out=exported/default [--step=N] [--context=256] \
        [--chunk=16] [--n_top=0] [--platforms=cpu,cuda,tpu]
    python scripts/run_exported.py --artifact=exported/default --prompt="def " --max_new_tokens=100

The artifact (a directory) is the model's decoding as data, for runtimes that compile StableHLO with
XLA (PJRT from C++/Python/Rust, GPU/TPU serving stacks), with no Python model code:
- prefill.stablehlo.bin, step.stablehlo.bin: serialized `jax.export.Exported` modules (StableHLO +
  calling convention; `jax.export.deserialize` reads them, scripts/run_exported.py runs them).
- prefill.mlir.bc, step.mlir.bc: the same modules as bare StableHLO portable-artifact bytecode for
  non-JAX loaders: `main` takes the arrays in manifest order, b and t as dynamic dims (with several
  --platforms, first an i32 index into manifest 'platforms'). A module traced on CPU carries XLA
  LayoutConstraint hints (model/layers.row_major), which a non-XLA compiler (e.g. IREE) would not know.
- params.npz: the weights as decoding uses them (a LoRA run's adapters applied, dense kernels already
  in the matmul dtype), one array per '/'-joined parameter path. bfloat16 arrays are stored as raw
  2-byte values (numpy has no bfloat16): manifest.json gives every array's dtype to view them as.
- manifest.json: every input and output of both functions in call order (name, shape, dtype), the
  context length, vocabulary, eos / stop ids, finish codes; tokenizer.json: the run's tokenizer.

Calling convention: flat positional arrays (params first, in the manifest's order).
    prefill(*params, tokens_BxT, lengths_B, <7 sampling rows>_B, seed_B, max_new_B, stop_BxK)
        -> (*state, token_B, logp_B, finish_B[, top_logp_BxN, top_ids_BxN])
    step(*params, *state, n) -> (*state, tokens_BxC, logp_BxC[, top_logp_BxCxN, top_ids_BxCxN])
`prefill` starts B requests (prompts right-padded to T, any lengths 1..T) in a fresh state of B
decode slots and picks each one's first token; `step` runs up to min(n, C) one-token steps (C = the
chunk) for every running row, ending early when all are done; tokens are -1 where a row produced
nothing. A row is done when state 'finish_B' > 0 (1 stop, 2 length). This is model/kv_decode.py's
prefill and decode_steps, unchanged: the artifact's tokens are the in-process Decoder's.
Symbolic dims: b (batch: requests decoded together) in both, t (padded prompt length, t <= S) in
prefill. Fixed at export time: the context S (KV-cache slots = prompt + generated tokens), the
chunk C, the vocabulary, n_top N, the stop-id width K (model/kv_decode.MAX_STOP_IDS).

A LoRA run needs no merge first: its adapters are applied as its training forward applies them.
`--platforms=cpu,cuda,tpu` lowers one artifact for several backends (works on a CPU-only machine; run
here on CPU only); the default is this machine's backend.

Runtime (2 CPU cores): about 3 s for a tiny model plus start-up (tracing and lowering to StableHLO;
nothing is compiled until a runtime loads it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax import export  # noqa: E402

import overrides  # noqa: E402
import serving  # noqa: E402
from model import kv_decode, sampling  # noqa: E402
from model.transformer import Transformer  # noqa: E402

FLAGS = flags.FLAGS
FORMAT = "lmstack-decoder-export/1"
ROW_NAMES = tuple(f.name for f in dataclasses.fields(sampling.Rows))  # temperature_B, top_k_B, ...
PREFILL_INPUTS = ("tokens_BxT", "lengths_B") + ROW_NAMES + ("seed_B", "max_new_B", "stop_BxK")
RUN_FILES = ("tokenizer.json", "chat_template.json")


def path_name(path) -> str:
    """A pytree key path -> 'a/b/c' (dict keys and dataclass fields alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            raise TypeError(f"cannot name pytree key {k!r} in path {path!r}")
    return "/".join(parts)


def flatten_named(tree) -> tuple[list[str], list, object]:
    """(names, leaves, treedef) of a pytree, names '/'-joined key paths."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_name(p) for p, _ in with_path], [x for _, x in with_path], treedef


def fresh_state(dec_model: Transformer, batch, cache_len: int) -> kv_decode.State:
    """kv_decode.empty_state for a batch that may be symbolic: empty_state builds its sampling rows with
    a Python list of `batch` settings, so it is made for one slot and broadcast to `batch` here."""
    one = kv_decode.empty_state(dec_model, 1, cache_len)
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), one.replace(cache={}))
    return state.replace(cache=kv_decode.init_cache(dec_model, batch, cache_len))


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def _describe(names, avals) -> list[dict]:
    if len(names) != len(avals):
        raise AssertionError(f"{len(names)} names for {len(avals)} arrays")
    dims = lambda shape: [d if isinstance(d, int) else str(d) for d in shape]  # noqa: E731
    return [{"name": n, "shape": dims(a.shape), "dtype": str(a.dtype)} for n, a in zip(names, avals)]


def export_decoder(model, params, *, cache_len: int, chunk: int = 16, n_top: int = 0, platforms=None):
    """(prefill Exported, step Exported, param names, prepared param arrays, manifest dict) for a
    Transformer (or LoraModel) and its params. Nothing is written."""
    inner, _ = kv_decode.unwrap(model)
    cfg = inner.cfg
    if not cfg.causal:
        raise ValueError("export needs a causal model (model.causal=True)")
    if cache_len < 2:
        raise ValueError(f"context {cache_len} must be >= 2 (a prompt token and a generated one)")
    if cfg.pos == "learned" and cache_len > cfg.max_len:
        raise ValueError(f"context {cache_len} exceeds model.max_len={cfg.max_len} (learned positions)")
    if chunk < 1 or n_top < 0:
        raise ValueError(f"chunk={chunk} must be >= 1 and n_top={n_top} >= 0")
    dec_model = Transformer(cfg, decode=True)
    params = nn.meta.unbox(params)
    dparams = jax.jit(functools.partial(kv_decode.prepare, model))(params)
    param_names, param_leaves, param_def = flatten_named(dparams)
    n_params = len(param_leaves)
    abstract_state = jax.eval_shape(functools.partial(fresh_state, dec_model, 1, cache_len))
    state_names, _, state_def = flatten_named(abstract_state)
    n_state = len(state_names)

    def prefill_flat(*args):
        params = param_def.unflatten(args[:n_params])
        tokens_BxT, lengths_B, *row_arrays = args[n_params:n_params + 2 + len(ROW_NAMES)]
        seed_B, max_new_B, stop_BxK = args[n_params + 2 + len(ROW_NAMES):]
        b = tokens_BxT.shape[0]  # every slot of the fresh state gets a request: slots = 0..b-1
        state, token_B, logp_B, top, finish_B = kv_decode.prefill(
            dec_model, cache_len, n_top, params, fresh_state(dec_model, b, cache_len), tokens_BxT, lengths_B,
            jnp.arange(b, dtype=jnp.int32), sampling.Rows(*row_arrays), seed_B, max_new_B, stop_BxK)
        return tuple(jax.tree.leaves(state)) + (token_B, logp_B, finish_B) + (tuple(top) if n_top else ())

    def step_flat(*args):
        params = param_def.unflatten(args[:n_params])
        state = state_def.unflatten(args[n_params:n_params + n_state])
        state, tokens_BxC, logp_BxC, top = kv_decode.decode_steps(  # window = the whole context
            dec_model, cache_len, n_top, chunk, cache_len, params, state, args[-1])
        return tuple(jax.tree.leaves(state)) + (tokens_BxC, logp_BxC) + (tuple(top) if n_top else ())

    b, t = export.symbolic_shape("b, t", constraints=[f"t <= {cache_len}"])
    i32 = jnp.int32
    row_specs = [jax.ShapeDtypeStruct((b,), x.dtype) for x in jax.tree.leaves(sampling.stack([sampling.Sampling()]))]
    param_specs = [_spec(x) for x in param_leaves]
    prefill_specs = param_specs + [jax.ShapeDtypeStruct((b, t), i32), jax.ShapeDtypeStruct((b,), i32)] + row_specs + [
        jax.ShapeDtypeStruct((b,), jnp.uint32), jax.ShapeDtypeStruct((b,), i32),
        jax.ShapeDtypeStruct((b, kv_decode.MAX_STOP_IDS), i32)]
    # model/layers.row_major pins some bf16 dot operands row-major on CPU (it decides by the backend at
    # trace time) with XLA's LayoutConstraint custom call: a layout hint for XLA's layout assignment, no
    # kernel, but outside jax.export's list of custom calls with compatibility guarantees, so it is
    # allowed here by name. A non-XLA consumer of the StableHLO (e.g. IREE) would not know it.
    kw = dict(disabled_checks=[export.DisabledSafetyCheck.custom_call("LayoutConstraint")])
    if platforms:
        kw["platforms"] = tuple(platforms)
    prefill_exp = export.export(jax.jit(prefill_flat), **kw)(*prefill_specs)
    (b_step,) = export.symbolic_shape("b")  # a scope of its own: prefill's constrains t, absent here
    state_specs = [jax.ShapeDtypeStruct(tuple(d if isinstance(d, int) else b_step for d in a.shape), a.dtype)
                   for a in prefill_exp.out_avals[:n_state]]
    step_exp = export.export(jax.jit(step_flat), **kw)(*param_specs, *state_specs, jax.ShapeDtypeStruct((), i32))

    top_out = lambda suffix: [f"top_logp_{suffix}", f"top_ids_{suffix}"] if n_top else []  # noqa: E731
    manifest = {
        "format": FORMAT,
        "context": cache_len, "chunk": chunk, "n_top": n_top, "vocab_size": cfg.vocab_size,
        "num_tokens": cfg.num_tokens, "max_stop_ids": kv_decode.MAX_STOP_IDS,
        "symbolic_dims": {"b": "batch: requests decoded together (both functions)",
                          "t": f"padded prompt length, 1 <= t <= context {cache_len} (prefill)"},
        "finish_codes": {"0": "running", **{str(k): v for k, v in kv_decode.FINISH.items()}},
        "platforms": list(prefill_exp.platforms),
        "params": {"file": "params.npz", "names": param_names,
                   "dtypes": [str(jnp.result_type(x)) for x in param_leaves]},
        "state": state_names,
        "prefill": {"file": "prefill.stablehlo.bin", "stablehlo": "prefill.mlir.bc",
                    "inputs": _describe(param_names + list(PREFILL_INPUTS), prefill_exp.in_avals),
                    "outputs": _describe(state_names + ["token_B", "logp_B", "finish_B"] + top_out("BxN"),
                                         prefill_exp.out_avals)},
        "step": {"file": "step.stablehlo.bin", "stablehlo": "step.mlir.bc",
                 "inputs": _describe(param_names + state_names + ["n"], step_exp.in_avals),
                 "outputs": _describe(state_names + ["tokens_BxC", "logp_BxC"] + top_out("BxCxN"),
                                      step_exp.out_avals)},
        "how_to_call": ("prefill(*params, *prefill inputs) -> (*state, first tokens...); then "
                        "step(*params, *state, n) -> (*state, tokens_BxC (-1 = none), ...) until every "
                        "state 'finish_B' > 0. Params from params.npz in 'params.names' order, viewed as "
                        "'params.dtypes'. See scripts/run_exported.py."),
    }
    return prefill_exp, step_exp, param_names, [np.asarray(x) for x in jax.device_get(param_leaves)], manifest


def write_artifact(out: str, prefill_exp, step_exp, param_names, param_arrays, manifest, *, eos_id=None,
                   stop_ids=(), run_dir: str | None = None) -> str:
    """Writes the artifact directory (must not exist or be empty); returns its manifest path."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out!r} exists and is not an empty directory; export into a new one")
    os.makedirs(out, exist_ok=True)
    for exp, key in ((prefill_exp, "prefill"), (step_exp, "step")):
        with open(os.path.join(out, manifest[key]["file"]), "wb") as f:
            f.write(exp.serialize())
        with open(os.path.join(out, manifest[key]["stablehlo"]), "wb") as f:
            f.write(exp.mlir_module_serialized)
    np.savez(os.path.join(out, manifest["params"]["file"]), **dict(zip(param_names, param_arrays)))
    manifest = dict(manifest, eos_id=eos_id, stop_ids=[int(x) for x in stop_ids], files=[])
    for name in RUN_FILES:
        if run_dir and os.path.exists(os.path.join(run_dir, name)):
            shutil.copy(os.path.join(run_dir, name), os.path.join(out, name))
            manifest["files"].append(name)
    manifest["tokenizer"] = "tokenizer.json" if "tokenizer.json" in manifest["files"] else None
    path = os.path.join(out, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return path


def export_run(workdir: str, out: str, *, step: int | None = None, context: int = 0, chunk: int = 16,
               n_top: int = 0, platforms=None) -> str:
    """A training run's latest (or `step`) checkpoint -> the artifact in `out`; returns the manifest path."""
    if context < 0 or chunk < 1 or n_top < 0:
        raise ValueError(f"context={context} (0 = the run's data.seq_len), chunk={chunk} and n_top={n_top}: expected "
                         f"context >= 0, chunk >= 1, n_top >= 0")
    run = serving.load_run(workdir, step)  # as the server and generate.py load it (a PPO run: its policy)
    config, params, at, tok, model = run.config, run.params, run.step, run.tokenizer, run.model
    cache_len = context or int(config.data.seq_len)
    prefill_exp, step_exp, names, arrays, manifest = export_decoder(
        model, params, cache_len=cache_len, chunk=chunk, n_top=n_top, platforms=platforms)
    manifest["run"] = {"workdir": os.path.abspath(workdir), "step": at}
    return write_artifact(out, prefill_exp, step_exp, names, arrays, manifest, eos_id=tok.eos_id,
                          stop_ids=[tok.eos_id], run_dir=workdir)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    platforms = [p for p in FLAGS.platforms.split(",") if p] or None
    path = export_run(FLAGS.workdir, FLAGS.out, step=None if FLAGS.step < 0 else FLAGS.step,
                      context=FLAGS.context, chunk=FLAGS.chunk, n_top=FLAGS.n_top, platforms=platforms)
    with open(path) as f:
        m = json.load(f)
    print(f"exported {FLAGS.workdir} (step {m['run']['step']}) to {FLAGS.out}: context {m['context']}, "
          f"chunk {m['chunk']}, platforms {m['platforms']}, {len(m['params']['names'])} param arrays")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Training run directory (checkpoints/, tokenizer.json).")
    flags.DEFINE_string("out", None, "New directory for the artifact.")
    flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = latest.")
    flags.DEFINE_integer("context", 0, "KV-cache slots (prompt + generated tokens), fixed in the artifact; "
                         "0 = the run's data.seq_len.")
    flags.DEFINE_integer("chunk", 16, "Decode steps per `step` call (fixed in the artifact).")
    flags.DEFINE_integer("n_top", 0, "Also return the n_top most likely alternatives' log-probs.")
    flags.DEFINE_string("platforms", "", "Comma-separated lowering platforms (cpu, cuda, rocm, tpu); "
                        "empty = this machine's.")
    overrides.run(main, 'export.py')

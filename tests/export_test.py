"""scripts/export.py + scripts/run_exported.py: the exported StableHLO decoder gives the in-process
Decoder's tokens (greedy, sampled, mixed settings, ragged prompts, batch sizes 1 and 3), without
lmstack's model code on the running side."""

import ast
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

import checkpoint
from data import tokenizer as tokenizer_lib
from model import build, decode
from model.sampling import Sampling
from model.transformer import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export  # noqa: E402
import run_exported  # noqa: E402

CONTEXT = 16
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]  # ragged: lengths 3, 7, 1
STOP = 29
MIXED = [Sampling(temperature=0.0), Sampling(temperature=0.9, top_k=5),
         Sampling(temperature=1.2, top_p=0.8, repetition_penalty=1.3)]


def _runner_settings(s: Sampling) -> run_exported.Settings:
    return run_exported.Settings(**{f: getattr(s, f) for f in run_exported.Settings.__dataclass_fields__})


def _random_params(model, seed: int):
    """Params of the model's shapes drawn with numpy, N(0, 0.3) (logits spread enough for varied text),
    norm scales 1: no model.init to run or compile (tens of seconds on a busy 2-core machine)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        return np.ones(s.shape, s.dtype) if path[-1].key == "scale" else rng.normal(0, 0.3, s.shape).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


@pytest.fixture(scope="module")
def tiny():
    """A random tiny LM (grouped-query attention, bf16 matmuls) with spread-out logits, and its artifact."""
    model = Transformer(ModelConfig(vocab_size=32, num_tokens=30, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    d_ff=64))
    return model, _random_params(model, 0)


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    model, params = tiny
    out = str(tmp_path_factory.mktemp("art") / "decoder")
    export.write_artifact(out, *export.export_decoder(model, params, cache_len=CONTEXT, chunk=4, n_top=2),
                          eos_id=STOP, stop_ids=[STOP])
    return run_exported.load(out)


def _assert_same(ref, got):
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        assert g.tokens == r.tokens, f"prompt {i}: exported {g.tokens} != in-process {r.tokens}"
        assert g.finish_reason == r.finish_reason, i
        np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=1e-5, atol=1e-5)
        assert [[t for t, _ in step] for step in g.top_logprobs] == [[t for t, _ in step] for step in r.top_logprobs]


def test_exported_tokens_equal_in_process_decoder(tiny, artifact):
    """Greedy, seeded sampling and one batch mixing settings, on ragged prompts: the exported modules
    (symbolic b and t: run here at b = 3 with t = 7, and at b = 1 with t = 3 and 7) give Decoder.generate's
    tokens, log-probs, top alternatives and finish reasons (max_new 12 runs the 7-token prompt into the
    context's end). The Decoder's text depends on a request's seed, not its batch: one reference serves both."""
    model, params = tiny
    dec = decode.Decoder(model, batch=3, cache_len=CONTEXT, n_top=2)
    cases = [(Sampling(temperature=0.0), 0), (Sampling(temperature=1.0, top_k=8), 7), (MIXED, [3, 4, 5])]
    for sampling, seeds in cases:
        ref = dec.generate(params, PROMPTS, max_new_tokens=12, sampling=sampling, seeds=seeds, stop_ids=[STOP])
        settings = [_runner_settings(s) for s in sampling] if isinstance(sampling, list) else _runner_settings(sampling)
        _assert_same(ref, run_exported.generate(artifact, PROMPTS, max_new_tokens=12, settings=settings,
                                                seeds=seeds, batch=3))
        first_two = lambda x: x[:2] if isinstance(x, list) else x  # noqa: E731
        _assert_same(ref[:2], run_exported.generate(artifact, PROMPTS[:2], max_new_tokens=12,
                                                    settings=first_two(settings), seeds=first_two(seeds), batch=1))
        assert len({len(r.tokens) for r in ref}) > 1, [r.tokens for r in ref]
    assert "length" in {r.finish_reason for r in ref}


def test_manifest_names_symbolic_dims_and_the_calling_convention(artifact):
    m = artifact.manifest
    tokens = next(x for x in m["prefill"]["inputs"] if x["name"] == "tokens_BxT")
    assert tokens["shape"] == ["b", "t"] and tokens["dtype"] == "int32"
    assert m["prefill"]["outputs"][:len(m["state"])] == m["step"]["inputs"][len(m["params"]["names"]):-1]
    assert [x["name"] for x in m["step"]["outputs"][len(m["state"]):]] == ["tokens_BxC", "logp_BxC",
                                                                          "top_logp_BxCxN", "top_ids_BxCxN"]
    cached_key = next(x for x in m["step"]["inputs"] if x["name"].endswith("layer_0/attn/cached_key"))
    assert cached_key["shape"] == ["b", 2, CONTEXT, 8]
    assert m["context"] == CONTEXT and m["stop_ids"] == [STOP] and "bfloat16" in m["params"]["dtypes"]
    for fn in ("prefill", "step"):  # bare StableHLO bytecode next to each jax.export module
        with open(os.path.join(artifact.path, m[fn]["stablehlo"]), "rb") as f:
            assert f.read(4) == b"ML\xefR"


def test_runner_imports_no_model_code():
    tree = ast.parse(open(os.path.join(ROOT, "scripts", "run_exported.py")).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    lmstack = [x for x in names if x.split(".")[0] not in ("__future__", "dataclasses", "json", "os", "sys", "jax",
                                                            "numpy", "absl")]
    assert lmstack == ["data.tokenizer"], lmstack


def test_bad_inputs_fail_with_clear_errors(tiny, artifact, tmp_path):
    missing = str(tmp_path / "no_such_artifact")
    with pytest.raises(FileNotFoundError, match="no_such_artifact"):
        run_exported.load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        run_exported.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="context of 16"):
        run_exported.generate(artifact, [list(range(1, 17))], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        run_exported.generate(artifact, [[1], []], max_new_tokens=2)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export.write_artifact(artifact.path, None, None, [], [], {})
    with pytest.raises(FileNotFoundError, match="no_run"):
        export.export_run(str(tmp_path / "no_run"), str(tmp_path / "out"))
    for kw in (dict(chunk=0), dict(context=-5), dict(n_top=-1)):  # named before the run is read
        with pytest.raises(ValueError, match=f"{next(iter(kw))}={next(iter(kw.values()))}"):
            export.export_run(str(tmp_path / "no_run"), str(tmp_path / "out"), **kw)
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_exported.py"), f"--artifact={missing}"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert cli.returncode == 1 and cli.stderr.strip().startswith("run_exported.py: error: artifact directory")
    assert "Traceback" not in cli.stderr
    with pytest.raises(ValueError, match="exceeds model.max_len"):
        model = Transformer(ModelConfig(vocab_size=32, num_tokens=30, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2,
                                        d_ff=16, pos="learned", max_len=8))
        export.export_decoder(model, {}, cache_len=CONTEXT)


def test_script_on_a_lora_run_prints_the_in_process_text(tmp_path):
    """A run directory as training leaves it (checkpoint + saved config + tokenizer.json), here a LoRA run
    with scanned layers and random nonzero adapters saved directly (training it would only add minutes of
    compiling): export_run, then the CLI in a fresh process prints the in-process Decoder's text (sampled,
    two seeds as one batch), and the artifact's weights carry the adapters."""
    tok = tokenizer_lib.CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    config = tiny_config("unused", lora__rank=2, model__scan_layers=True, model__n_layers=1)
    params = _random_params(build.causal_lm(config, tok.vocab_size, tok.base_size), 1)
    run, out = str(tmp_path / "run"), str(tmp_path / "exported")
    checkpoint.save_params(run, 5, params, config.to_dict())
    tokenizer_lib.save_tokenizer(tok, os.path.join(run, "tokenizer.json"))

    manifest = json.load(open(export.export_run(run, out)))
    assert manifest["run"]["step"] == 5 and manifest["context"] == config.data.seq_len
    assert manifest["stop_ids"] == [tok.eos_id] and os.path.exists(os.path.join(out, "tokenizer.json"))
    weights = np.load(os.path.join(out, "params.npz"))
    query = weights["layers/block/attn/query/kernel"].view(jnp.bfloat16).astype(np.float32)
    assert not np.allclose(query, params["base"]["layers"]["block"]["attn"]["query"]["kernel"], atol=0.05)

    saved, loaded, _ = checkpoint.load_for_inference(run)
    model = build.causal_lm(ml_collections.ConfigDict(saved), tok.vocab_size, tok.base_size)
    ref = decode.Decoder(model, batch=2, cache_len=config.data.seq_len).generate(
        loaded, [[int(x) for x in tok.encode("cafe")]] * 2, max_new_tokens=20,
        sampling=Sampling(temperature=1.0, top_k=4), seeds=1, stop_ids=[tok.eos_id])
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "run_exported.py"), f"--artifact={out}", "--prompt=cafe",
         "--max_new_tokens=20", "--temperature=1.0", "--top_k=4", "--seed=1", "--num_samples=2"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = ["cafe" + tok.decode(r.tokens) for r in ref]
    assert proc.stdout == texts[0] + "\n" + "-" * 40 + "\n" + texts[1] + "\n"
    assert texts[0] != texts[1] and min(len(r.tokens) for r in ref) >= 5, texts

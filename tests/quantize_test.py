"""model/quantize.py, model/ptq.py and scripts/quantize.py: grids within their bounds, int4 packing,
GPTQ/AWQ beating round-to-nearest on their calibration inputs, QAT == PTQ forward, and quantized runs
that evaluate, generate and refuse bad input without writing anything."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import checkpoint
import evaluation
import serving
import train
from model import decode, quantize, ptq
from model.transformer import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import quantize as quantize_script  # noqa: E402


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16), (8, 32)])
def test_round_trip_error_within_half_a_step(bits, group):
    w_KxM = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    q, scale_GxM = quantize.rtn(w_KxM, bits, group)
    assert q.dtype == np.int8 and np.abs(q).max() <= quantize.qmax(bits)
    assert scale_GxM.shape == ((64 // group) if group else 1, 24)
    err_KxM = np.abs(quantize.dequantize(q, scale_GxM) - w_KxM)
    bound_KxM = np.repeat(scale_GxM, 64 // scale_GxM.shape[0], axis=0) / 2
    assert np.all(err_KxM <= bound_KxM * (1 + 1e-6))
    # the largest |w| of a group lands on the grid's end, up to the scale's 16-bit rounding (<= 2^-9 relative)
    assert np.allclose(np.abs(quantize.dequantize(q, scale_GxM)).max(0), np.abs(w_KxM).max(0), rtol=2 ** -8)
    np.testing.assert_array_equal(scale_GxM, np.asarray(scale_GxM).astype(quantize.SCALE_DTYPE).astype(np.float32))


def test_int4_packing_round_trips():
    q = np.random.default_rng(1).integers(-8, 8, size=(3, 10, 7)).astype(np.int8)
    packed = quantize.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 7)
    np.testing.assert_array_equal(quantize.unpack_int4(packed), q)
    np.testing.assert_array_equal(np.asarray(quantize.unpack_int4(jnp.asarray(packed))), q)


def _correlated_inputs(n=512, k=64, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    x_NxK = rng.normal(size=(n, k)) @ mix * np.exp(rng.normal(size=k))  # correlated, uneven channels
    return x_NxK


@pytest.mark.parametrize("method", ["gptq", "gptq_act_order", "awq"])
def test_calibrated_methods_beat_round_to_nearest(method):
    x_NxK = _correlated_inputs()
    w_KxM = np.random.default_rng(2).normal(size=(64, 32)) * 0.05
    h_KxK = x_NxK.T @ x_NxK
    q, scale = quantize.rtn(w_KxM, 4, 16)
    rtn_err = quantize.output_error(w_KxM, quantize.dequantize(q, scale), h_KxK)
    if method.startswith("gptq"):
        q, scale = quantize.gptq(w_KxM, h_KxK, 4, 16, act_order=method == "gptq_act_order")
        w_hat = quantize.dequantize(q, scale)
    else:
        q, scale, s_K = quantize.awq(w_KxM, h_KxK, 4, 16)
        w_hat = quantize.dequantize(q, scale) / s_K[:, None]
    assert np.abs(q).max() <= 7
    err = quantize.output_error(w_KxM, w_hat, h_KxK)
    assert err < 0.8 * rtn_err, (err, rtn_err)
    assert err == pytest.approx(np.sum((x_NxK @ (w_KxM - w_hat)) ** 2), rel=1e-6)  # what output_error means


def test_gptq_act_order_keeps_the_stored_groups():
    """Quantized in another order, each stored group of 16 inputs still has one scale that its values use:
    dequantizing with the returned scales reproduces w within each group's grid (half a cell after the
    error updates, which only GPTQ's order changes), and the codes sit at their inputs' original places."""
    x_NxK = _correlated_inputs()
    h_KxK = x_NxK.T @ x_NxK
    w_KxM = np.random.default_rng(3).normal(size=(64, 8)) * 0.05
    q, scale = quantize.gptq(w_KxM, h_KxK, 4, 16, act_order=True)
    assert scale.shape == (4, 8) and np.abs(q).max() <= 7
    np.testing.assert_allclose(scale, np.max(np.abs(w_KxM.reshape(4, 16, 8)), axis=1) / 7, rtol=0.5)
    identity = np.eye(64) * np.linspace(1, 64, 64)  # diagonal H: no error to spread, act order = RTN per input
    q_diag, scale_diag = quantize.gptq(w_KxM, identity, 4, 16, damp=0.0, act_order=True)
    q_rtn, scale_rtn = quantize.rtn(w_KxM, 4, 16)
    np.testing.assert_array_equal(q_diag, q_rtn)
    np.testing.assert_allclose(scale_diag, scale_rtn, rtol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_a_pruned_kernels_zeros(act_order):
    """A 50%-pruned kernel quantized by GPTQ: every pruned weight is still zero (the error updates used to
    fill some), and the output error on the calibration inputs still beats round-to-nearest."""
    x_NxK = _correlated_inputs()
    h_KxK = x_NxK.T @ x_NxK
    w_KxM = np.random.default_rng(4).normal(size=(64, 8)) * 0.05
    w_KxM = np.where(np.abs(w_KxM) >= np.median(np.abs(w_KxM), axis=0), w_KxM, 0.0)  # magnitude, per column
    q, scale = quantize.gptq(w_KxM, h_KxK, 4, 16, act_order=act_order)
    assert np.all(q[w_KxM == 0] == 0) and np.mean(w_KxM == 0) == 0.5
    q_rtn, scale_rtn = quantize.rtn(w_KxM, 4, 16)
    assert quantize.output_error(w_KxM, quantize.dequantize(q, scale), h_KxK) < \
        quantize.output_error(w_KxM, quantize.dequantize(q_rtn, scale_rtn), h_KxK)


def test_bad_specs_are_named():
    with pytest.raises(ValueError, match="quant.bits=3"):
        quantize.QuantSpec(bits=3)
    with pytest.raises(ValueError, match="quant.group=7"):
        quantize.QuantSpec(bits=4, group=7)
    cfg = ModelConfig(vocab_size=64, num_tokens=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=48,
                      quant=quantize.QuantSpec(bits=4, group=32))
    with pytest.raises(ValueError, match="group 32 does not divide its input dim 48"):
        jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))  # raised while tracing


def _tiny_cfg(scan):
    return ModelConfig(vocab_size=64, num_tokens=60, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                       scan_layers=scan)


@pytest.mark.parametrize("scan", [False, True])
def test_qat_forward_equals_ptq_forward(scan):
    """A QAT model (fake-quantized float kernels) and the checkpoint PTQ makes from the same weights give the
    same logits: QAT trains exactly what will be deployed."""
    cfg = _tiny_cfg(scan)
    tokens_BxL = jnp.arange(24).reshape(2, 12) % 60
    params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens_BxL)["params"])
    spec = quantize.QuantSpec(bits=4, group=16, embed_bits=8)
    fake = Transformer(dataclasses.replace(cfg, quant=spec))
    stored = Transformer(dataclasses.replace(cfg, quant=dataclasses.replace(spec, stored=True)))
    abstract = jax.eval_shape(stored.init, jax.random.key(0), tokens_BxL)["params"]
    qparams, report = ptq.quantize_params(params, abstract, "rtn", group=16)
    assert len(report) == (7 if scan else 2 * 7) + 1  # 7 kernels a layer (scan: one stacked node each) + embedding
    forward = lambda model, p: jax.jit(model.apply)({"params": p}, tokens_BxL)  # noqa: E731 (one compile, not one per op)
    logits_fake = forward(fake, params)
    logits_ptq = forward(stored, qparams)
    np.testing.assert_allclose(logits_fake, logits_ptq, atol=1e-5)
    logits_float = forward(Transformer(cfg), params)
    assert float(jnp.abs(logits_float - logits_ptq).max()) > 1e-4  # it did quantize
    # straight-through: the QAT gradient reaches every float kernel
    grads = jax.jit(jax.grad(lambda p: fake.apply({"params": p}, tokens_BxL)[..., :60].sum()))(params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@pytest.fixture(scope="module")
def trained_run(corpus_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("float_run"))
    config = tiny_config(corpus_dir, train__steps=40, train__eval_every=40, train__eval_batches=2,
                         optim__lr=3e-3, model__d_model=64, model__d_ff=128)
    train.train_and_evaluate(config, workdir)
    return workdir


def test_quantized_runs_evaluate_and_generate(trained_run, tmp_path):
    base = evaluation.evaluate_run(trained_run, max_batches=4)
    losses, manifests = {}, {}
    for name, kw in {"int8": dict(method="rtn", bits=8), "rtn4": dict(method="rtn", bits=4, group=16),
                     "gptq4": dict(method="gptq", bits=4, group=16, calib=8),
                     "awq4": dict(method="awq", bits=4, group=16, calib=8)}.items():
        out = str(tmp_path / name)
        manifests[name] = quantize_script.quantize_run(trained_run, out, embed_bits=8, **kw)
        losses[name] = evaluation.evaluate_run(out, max_batches=4)["eval/loss"]
        saved = json.load(open(os.path.join(out, "compression.json")))
        assert saved["method"] == kw["method"] and saved["bits"] == kw["bits"]
    assert abs(losses["int8"] - base["eval/loss"]) < 0.01 * base["eval/loss"]
    assert manifests["int8"]["param_bytes_after"] < manifests["int8"]["param_bytes_before"] / 3.5
    assert manifests["rtn4"]["param_bytes_after"] < manifests["int8"]["param_bytes_after"]
    assert all(np.isfinite(v) for v in losses.values()), losses
    # the calibrated int4 models stay closer to the float model's logits than round-to-nearest does
    float_run = serving.load_run(trained_run)
    tokens_BxL = jnp.asarray([float_run.tokenizer.encode(t)[:48] for t in (
        "import json\nimport os\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n",
        "class Message(object):\n    def __init__(self, policy=None):\n        self._headers = []\n")])
    reference_BxLxV = float_run.model.apply({"params": float_run.params}, tokens_BxL)
    gap = {}
    for name in ("rtn4", "gptq4", "awq4"):
        run = serving.load_run(str(tmp_path / name))
        gap[name] = float(jnp.mean(jnp.square(run.model.apply({"params": run.params}, tokens_BxL) - reference_BxLxV)))
    assert gap["gptq4"] < gap["rtn4"] and gap["awq4"] < gap["rtn4"], gap
    # the decoder and the server's loader take the quantized run as it is
    run = serving.load_run(str(tmp_path / "int8"))
    assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(run.params))
    scales = [x for p, x in jax.tree_util.tree_flatten_with_path(run.params)[0] if "scale" in str(p[-1].key)
              and str(p[-1].key) != "scale"]  # kernel_scale / embedding_scale, not the norms' scale
    assert scales and all(x.dtype == quantize.SCALE_DTYPE for x in scales)
    dec = decode.Decoder(run.model, batch=1, cache_len=32)
    out = dec.generate(run.params, [run.tokenizer.encode("def ")], max_new_tokens=8)
    assert len(out[0].tokens) == 8


def test_calibration_reads_the_run_with_its_own_tokenizer(corpus_dir, tmp_path, caplog):
    """Calibration rows (quantize.py / prune.py) are the run's training rows tokenized by the run's own
    tokenizer, even when its data would now build another one (a char vocabulary, a new character since):
    not a tokenizer rebuilt from the data, under a warning about a failed start. Nothing is written into
    the run."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    workdir = str(tmp_path / "run")
    config = tiny_config(str(data), data__tokenizer="char", train__steps=3, train__eval_every=3,
                         train__eval_batches=1)
    train.train_and_evaluate(config, workdir)
    with open(data / sorted(os.listdir(data))[0], "a") as f:
        f.write("# \u00a7 a character the run never saw\n")
    before = sorted(os.listdir(workdir))
    saved, _, _ = checkpoint.load_for_inference(workdir)
    import ml_collections
    with caplog.at_level("WARNING"):
        inputs, batches = evaluation.training_rows(ml_collections.ConfigDict(saved), workdir, 4)
    run_tok = open(os.path.join(workdir, "tokenizer.json")).read()
    assert "\u00a7" not in run_tok and inputs.tokenizer.to_json() == json.loads(run_tok)
    assert sum(len(next(iter(b.values()))) for b in batches) == 4 and "no checkpoint" not in caplog.text
    assert sorted(os.listdir(workdir)) == before


def test_bad_input_names_the_value_and_writes_nothing(trained_run, tmp_path):
    out = tmp_path / "never"
    cases = [(dict(method="smooth", bits=8), "--method='smooth'"), (dict(method="rtn", bits=3), "--bits=3"),
             (dict(method="rtn", bits=4, group=24), "group 24 does not divide"),
             (dict(method="rtn", bits=4, group=7), "quant.group=7"),
             (dict(method="gptq", bits=4, calib=0), "--calib=0")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            quantize_script.quantize_run(trained_run, str(out), **kw)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    done = str(tmp_path / "int8")
    quantize_script.quantize_run(trained_run, done, method="rtn", bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_script.quantize_run(done, str(out), method="rtn", bits=4)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        quantize_script.quantize_run(trained_run, done, method="rtn", bits=8)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "quantize.py"), f"--workdir={trained_run}",
                        f"--out={out}", "--method=nope"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--method='nope'" in r.stderr and not out.exists()
    assert checkpoint.load_for_inference(done)[2] == 40


def test_qat_run_trains_and_deploys_as_it_trained(trained_run, corpus_dir, tmp_path):
    """quant.bits in a training config: a warm-started QAT run trains (straight-through gradients) and the
    checkpoint scripts/quantize.py makes of it at the same bits/group evaluates exactly as the run did."""
    workdir = str(tmp_path / "qat")
    config = tiny_config(corpus_dir, train__steps=6, train__eval_every=6, train__eval_batches=2, optim__lr=1e-3,
                         model__d_model=64, model__d_ff=128, init_from=trained_run, quant__bits=4, quant__group=16)
    last = train.train_and_evaluate(config, workdir)
    out = str(tmp_path / "qat_int4")
    quantize_script.quantize_run(workdir, out, method="rtn", bits=4, group=16, embed_bits=8)
    deployed = evaluation.evaluate_run(out, max_batches=2)
    assert deployed["eval/loss"] == pytest.approx(last["eval/loss"], abs=2e-5)
    with pytest.raises(ValueError, match="LoRA on quantized weights"):
        train.train_and_evaluate(tiny_config(corpus_dir, quant__bits=8, lora__rank=4), str(tmp_path / "lora"))


def test_compress_report_table(trained_run, corpus_dir, tmp_path):
    """scripts/compress_report.py on a fixture run: a row per variant (built under OUT), sizes that shrink
    where they must, finite losses, decode speeds, and the markdown / JSON / PNG written."""
    import compress_report
    qat = str(tmp_path / "qat")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3, train__eval_every=3, train__eval_batches=1,
                                         model__d_model=64, model__d_ff=128, init_from=trained_run, quant__bits=4,
                                         quant__group=16), qat)
    gradual = str(tmp_path / "gradual")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3, train__eval_every=3, train__eval_batches=1,
                                         model__d_model=64, model__d_ff=128, init_from=trained_run,
                                         prune__method="magnitude", prune__sparsity=0.5, prune__end_step=2,
                                         prune__frequency=1), gradual)
    out = str(tmp_path / "report")
    rows = compress_report.report(trained_run, out, group=16, calib=4, trained={"qat_int4": qat, "gradual_50": gradual},
                                  max_batches=2, decode_tokens=4, only=["bf16", "int8", "oneshot_50_wanda"])
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["f32", "bf16", "int8", "oneshot_50_wanda", "qat_int4", "gradual_50"]
    assert by["gradual_50"]["disk_bytes"] < 0.7 * by["f32"]["disk_bytes"]  # exported compactly
    exported = json.load(open(os.path.join(out, "gradual_50", "compression.json")))
    assert exported["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert by["int8"]["param_bytes"] < by["f32"]["param_bytes"] / 3.5
    assert by["qat_int4"]["param_bytes"] < by["int8"]["param_bytes"]
    assert by["bf16"]["disk_bytes"] < by["f32"]["disk_bytes"]
    assert by["oneshot_50_wanda"]["disk_bytes"] < by["f32"]["disk_bytes"]
    assert all(np.isfinite(r["val_loss"]) and r["decode_tokens_per_s"] > 0 for r in rows)
    assert by["f32"]["bits_per_byte"] == pytest.approx(by["f32"]["val_loss"] / np.log(2))
    md = open(os.path.join(out, "report.md")).read()
    assert md.count("\n") == 2 + len(rows) and "| qat_int4 |" in md
    assert json.load(open(os.path.join(out, "report.json")))["rows"] == json.loads(json.dumps(rows))
    assert open(os.path.join(out, "report.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'int3'"):
        compress_report.report(trained_run, out, only=["int3"])
    # a variant under OUT is reused only if built from the same run, step and settings: another calibration
    # count or another source run is refused before anything is built (it was reported as this one's)
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"oneshot_50_wanda' was built from .*'calib': 4.*'calib': 2"):
        compress_report.report(trained_run, out, calib=2, only=["oneshot_50_wanda"])
    with pytest.raises(ValueError, match=r"f32' was built from .*this report's \{'source': '.*qat'"):
        compress_report.report(qat, out, only=["int8"])
    assert sorted(os.listdir(out)) == before


def test_compress_report_on_an_encoder_run(corpus_dir, tmp_path):
    """A run that does not generate text (MLM) gets the size and eval-loss columns, no decode speed or bits per
    byte (it failed after building its variants before)."""
    import compress_report
    from configs import pretrain_mlm
    run = str(tmp_path / "mlm")
    train.train_and_evaluate(tiny_config(corpus_dir, pretrain_mlm, train__steps=3, train__eval_every=3,
                                         train__eval_batches=1), run)
    rows = compress_report.report(run, str(tmp_path / "out"), group=16, calib=2, max_batches=1, decode_tokens=4,
                                  only=["int8"])
    assert [r["variant"] for r in rows] == ["f32", "int8"]
    assert all(r["decode_tokens_per_s"] is None and r["bits_per_byte"] is None and np.isfinite(r["val_loss"])
               for r in rows)
    assert rows[1]["param_bytes"] < rows[0]["param_bytes"] / 2


def test_calibration_of_a_scanned_model_stacks_the_layers_grams():
    """ptq.calibrate sums x x^T of every kernel's inputs; under nn.scan the layers' matrices come stacked,
    equal to the unscanned twin's per layer, and equal to the Gram matrix of the inputs computed by hand."""
    tokens_BxL = jnp.arange(40).reshape(2, 20) % 60
    loop_cfg, scan_cfg = _tiny_cfg(False), _tiny_cfg(True)
    scan_params = nn.meta.unbox(jax.jit(Transformer(scan_cfg).init)(jax.random.key(3), tokens_BxL)["params"])
    loop_params = {k: v for k, v in scan_params.items() if k != "layers"}
    for i in range(2):
        loop_params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], scan_params["layers"]["block"])
    scan_grams = ptq.calibrate(scan_cfg, scan_params, [tokens_BxL])[()]
    loop_grams = ptq.calibrate(loop_cfg, loop_params, [tokens_BxL])[()]
    for i in range(2):
        for name in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/down"):
            np.testing.assert_allclose(scan_grams[f"layers/block/{name}/kernel"][i],
                                       loop_grams[f"layer_{i}/{name}/kernel"], rtol=1e-5, atol=1e-4)
    # layer 0's query projection reads the first norm of the embeddings
    x_NxD = jnp.take(loop_params["embed"]["embedding"], tokens_BxL.reshape(-1), axis=0)
    x_NxD = x_NxD * jax.lax.rsqrt(jnp.mean(jnp.square(x_NxD), -1, keepdims=True) + 1e-6) * loop_params[
        "layer_0"]["attn_norm"]["scale"][None, :]
    np.testing.assert_allclose(loop_grams["layer_0/attn/query/kernel"], x_NxD.T @ x_NxD, rtol=1e-4, atol=1e-4)
    # GPTQ through the scanned tree: one stacked kernel node per projection, quantized layer by layer
    stored = Transformer(dataclasses.replace(scan_cfg, quant=quantize.QuantSpec(bits=4, group=16, stored=True)))
    abstract = jax.eval_shape(stored.init, jax.random.key(0), tokens_BxL)["params"]
    qparams, report = ptq.quantize_params(scan_params, abstract, "gptq", {(): scan_grams}, group=16)
    assert report["layers/block/mlp/down"]["method"] == "gptq" and qparams["layers"]["block"]["mlp"]["down"][
        "kernel_q"].shape == (2, 32, 32)


def test_int8_kv_cache_decodes_close_to_the_float_cache(trained_run):
    run = serving.load_run(trained_run)
    prompts = [run.tokenizer.encode("import json\n\ndef "), run.tokenizer.encode("class Header:\n    ")]
    outs = {}
    for kv_int8 in (False, True):
        dec = decode.Decoder(run.model, batch=2, cache_len=64, kv_int8=kv_int8)
        outs[kv_int8] = dec.generate(run.params, prompts, max_new_tokens=24)
        dtypes = {x.dtype for x in jax.tree.leaves(dec.empty().cache)}
        assert (jnp.dtype(jnp.int8) in dtypes) == kv_int8
    for a, b in zip(outs[False], outs[True]):
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        assert n >= 8, (a.tokens, b.tokens)  # greedy paths agree at least this far
        assert np.max(np.abs(np.subtract(a.logprobs[:n], b.logprobs[:n]))) < 0.05

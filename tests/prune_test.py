"""Pruning: schedule, masks (magnitude, N:M, Wanda), compact storage, masks through the optimizer and a
resumed run, and scripts/prune.py end to end (evaluate and generate on its output)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

import checkpoint
import evaluation
import optim
import train
from configs import common
from metrics import read_jsonl
from model import calibrate, prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prune as prune_script  # noqa: E402  (scripts/prune.py)


# ---- schedule and masks ----------------------------------------------------------------------------

def test_cubic_schedule_values():
    s = lambda t: float(prune.cubic_sparsity(t, initial=0.1, final=0.5, start=10, end=40))  # noqa: E731
    assert s(0) == 0.0 and s(9) == 0.0
    assert s(10) == pytest.approx(0.1)
    assert s(25) == pytest.approx(0.5 + (0.1 - 0.5) * 0.5 ** 3)  # half way: 1/8 of the gap left
    assert s(40) == 0.5 and s(1000) == 0.5  # the target at end_step, fixed after
    steps = [t for t in range(60) if bool(prune.is_prune_step(t, start=10, end=35, frequency=10))]
    assert steps == [10, 20, 30, 35]  # every `frequency` from start, and end_step itself


def test_nm_mask_two_of_four():
    w_LxKxM = jax.random.normal(jax.random.key(0), (3, 16, 5))
    keep = np.asarray(prune.nm_mask(jnp.abs(w_LxKxM), 2, 4))
    groups = keep.reshape(3, 4, 4, 5)  # [layers, K/4 groups, 4, out]
    assert (groups.sum(axis=2) == 2).all()
    a = np.abs(np.asarray(w_LxKxM)).reshape(3, 4, 4, 5)
    kept_min = np.where(groups, a, np.inf).min(axis=2)
    dropped_max = np.where(groups, -np.inf, a).max(axis=2)
    assert (kept_min >= dropped_max).all()  # the two largest of each group


def test_wanda_keeps_largest_weight_times_input_norm():
    rng = np.random.default_rng(0)
    w_KxM = rng.normal(size=(8, 3)).astype(np.float32)
    x_NxK = (rng.normal(size=(50, 8)) * np.arange(1, 9)).astype(np.float32)  # very different channel norms
    norm_K = np.sqrt((x_NxK.astype(np.float64) ** 2).sum(axis=0))
    keep = np.asarray(prune.oneshot_masks({"k": w_KxM}, method="wanda", sparsity=0.5, norms={"k": norm_K})["k"])
    for m in range(3):  # by hand: per output column, the 4 largest |w| * ||x||
        score_K = np.abs(w_KxM[:, m]) * norm_K
        assert set(np.flatnonzero(keep[:, m])) == set(np.argsort(score_K)[4:])
    by_magnitude = np.asarray(prune.oneshot_masks({"k": w_KxM}, method="magnitude", sparsity=0.5)["k"])
    assert keep.sum() == by_magnitude.sum() == 12 and not (keep == by_magnitude).all()
    nm = np.asarray(prune.oneshot_masks({"k": w_KxM}, method="wanda", sparsity=0.5, nm=(2, 4),
                                        norms={"k": norm_K})["k"])
    for g in range(2):
        for m in range(3):
            score = np.abs(w_KxM[4 * g:4 * g + 4, m]) * norm_K[4 * g:4 * g + 4]
            assert set(np.flatnonzero(nm[4 * g:4 * g + 4, m])) == set(np.argsort(score)[2:])


def test_oneshot_comparison_groups_per_kernel_global_and_per_output_column():
    rng = np.random.default_rng(1)
    w = {"a": rng.normal(size=(8, 4)).astype(np.float32), "b": 3 * rng.normal(size=(8, 4)).astype(np.float32)}
    norms = {"a": np.arange(1.0, 9.0, dtype=np.float32), "b": np.ones(8, np.float32)}
    score = {k: np.abs(w[k]) * norms[k][:, None] for k in w}
    for method, s in (("magnitude", {k: np.abs(x) for k, x in w.items()}), ("wanda", score)):
        masks = {scope: {k: np.asarray(m) for k, m in prune.oneshot_masks(w, method=method, sparsity=0.5, scope=scope,
                                                                          norms=norms).items()}
                 for scope in prune.ONESHOT_SCOPES}
        for k in w:  # per kernel: its 16 highest scores; per column: each column's 4 highest
            assert set(np.flatnonzero(masks["layer"][k])) == set(np.argsort(s[k].ravel())[16:])
            for m in range(4):
                assert set(np.flatnonzero(masks["output"][k][:, m])) == set(np.argsort(s[k][:, m])[4:])
        both = np.concatenate([s["a"].ravel(), s["b"].ravel()])
        kept = np.concatenate([masks["global"]["a"].ravel(), masks["global"]["b"].ravel()])
        assert set(np.flatnonzero(kept)) == set(np.argsort(both)[32:])  # one threshold over both kernels
    assert prune.default_scope("wanda") == "output" and prune.default_scope("magnitude") == "layer"
    with pytest.raises(ValueError, match="scope='row'"):
        prune.oneshot_masks(w, method="magnitude", sparsity=0.5, scope="row")


def test_calibration_sums_match_inputs():
    from model import layers
    import flax.linen as nn

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.Dense(4, (None, None), dtype=jnp.float32, name="b")(
                layers.Dense(6, (None, None), dtype=jnp.float32, name="a")(x))

    model = Two()
    x = jax.random.normal(jax.random.key(1), (2, 3, 5))
    params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
    sums = calibrate.dense_input_sq_sums(lambda p, b: model.apply({"params": p}, b), params, [x, 2 * x])
    np.testing.assert_allclose(sums["a/kernel"], 5 * (np.asarray(x) ** 2).sum(axis=(0, 1)), rtol=1e-5)
    h = np.asarray(x) @ np.asarray(params["a"]["kernel"])  # what Dense b sees
    np.testing.assert_allclose(sums["b/kernel"], 5 * (h ** 2).sum(axis=(0, 1)), rtol=1e-4)
    stacked = calibrate.stack_layers({"layer_0/q/kernel": np.ones(3), "layer_1/q/kernel": np.zeros(3), "x": 1}, 2)
    assert stacked["layers/block/q/kernel"].shape == (2, 3) and stacked["x"] == 1


def test_global_vs_per_layer():
    big = jnp.arange(1.0, 101.0).reshape(10, 10)  # all larger than `small`
    small = jnp.arange(1.0, 101.0).reshape(10, 10) / 1000.0
    per = prune.magnitude_masks({"big": big, "small": small}, 0.5, "layer")
    assert float(per["big"].mean()) == float(per["small"].mean()) == 0.5
    glob = prune.magnitude_masks({"big": big, "small": small}, 0.5, "global")
    assert bool(glob["big"].all()) and not bool(glob["small"].any())  # one threshold: `small` goes entirely
    stacked = jnp.stack([big, small])  # scan kernels [n_layers, K, M]: each layer's matrix on its own
    assert np.asarray(prune.magnitude_masks({"s": stacked}, 0.3, "layer")["s"]).reshape(2, -1).sum(1).tolist() == [70, 70]


def test_pack_unpack_bit_exact():
    rng = np.random.default_rng(0)
    for shape, dtype in (((7, 13), np.float32), ((2, 8, 6), np.float32), ((5, 3), np.float16)):
        w = rng.normal(size=shape).astype(dtype)
        w[rng.random(shape) < 0.6] = 0
        w.flat[3] = -0.0
        packed = prune.pack(w)
        assert packed["sparse_bits"].dtype == np.uint8 and packed["sparse_values"].dtype == dtype
        back = prune.unpack(packed)
        assert back.dtype == w.dtype and back.shape == w.shape
        assert back.tobytes() == np.where(w == 0, np.zeros_like(w), w).tobytes()  # -0.0 stored as a zero
    tree = prune.unpack_tree({"a": {"kernel": prune.pack(w)}, "b": np.ones(2)})
    assert np.array_equal(tree["a"]["kernel"], w) and np.array_equal(tree["b"], np.ones(2))


# ---- masks through the optimizer ---------------------------------------------------------------------

def _ocfg(**kw):
    """The default optim block (every field optim.py reads) with a constant lr 1e-2 and `kw`."""
    o = common.base().optim.to_dict()
    o.update(lr=1e-2, schedule="constant", warmup_steps=0, grad_accum_steps=1)
    o.update(kw)
    return ml_collections.ConfigDict(o)


def _pcfg(**kw):
    from configs import common
    p = common.base().prune
    p.update(kw)
    return p


def _toy_params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"layer_0": {"attn": {"query": {"kernel": jax.random.normal(k[0], (8, 8))}},
                        "attn_norm": {"scale": jnp.ones(8)}},
            "layer_1": {"mlp": {"up": {"kernel": jax.random.normal(k[1], (8, 12))}}},
            "embed": {"embedding": jax.random.normal(k[2], (16, 8))}}


@pytest.mark.parametrize("method", ["magnitude", "nm"])
def test_masks_survive_adamw_steps(method):
    total = 12
    tx, _ = optim.make_optimizer(_ocfg(), total, _pcfg(method=method, sparsity=0.5, start_step=2, end_step=6,
                                                       frequency=2))
    params = _toy_params()
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))  # noqa: E731
    step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
        tx.update(jax.grad(loss)(p), s, p)))
    history = []
    for t in range(1, total + 1):
        params, state = step(params, state)
        ks = prune.prunable_tensors(params)
        assert set(ks) == {"layer_0/attn/query/kernel", "layer_1/mlp/up/kernel"}  # blocks only by default
        masks = prune.prunable_tensors(prune.find_masks(state))
        for name, w in ks.items():  # exactly zero wherever the mask is off, after every AdamW step
            assert (np.asarray(w)[~np.asarray(masks[name])] == 0).all()
        history.append(prune.sparsity_report(ks)["global"])
        if t >= 6:  # target reached at end_step, and kept through the later steps (weight decay included)
            assert history[-1] == pytest.approx(0.5)
            for name, w in ks.items():
                if method == "nm":
                    groups = (np.asarray(w) != 0).reshape(-1, 4, w.shape[-1]).sum(axis=1)
                    assert (groups <= 2).all()
    assert history[:3] == [0.0] * 3 and history[3] == pytest.approx(0.4375)  # s(4) = .5 - .5 (1 - 2/4)^3
    assert int(np.count_nonzero(np.asarray(params["embed"]["embedding"]) == 0)) == 0


def test_masks_inside_multisteps_and_freeze():
    tx, _ = optim.make_optimizer(_ocfg(grad_accum_steps=2), 4, _pcfg(method="magnitude", sparsity=0.5,
                                                                     start_step=1, end_step=1))
    tx = optim.freeze(tx, ("layer_1",))
    params = _toy_params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(grads, state, params)  # micro-step 1 of 2: no update, no pruning yet
    params = optax.apply_updates(params, u)
    assert prune.sparsity_report(prune.prunable_tensors(params))["global"] == 0.0
    u, state = tx.update(grads, state, params)  # the first real update: step 1 = end_step
    params = optax.apply_updates(params, u)
    report = prune.sparsity_report(prune.prunable_tensors(params))
    assert report["layer_0/attn/query/kernel"] == 0.5 and report["layer_1/mlp/up/kernel"] == 0.0  # frozen: untouched


def test_prune_config_errors():
    cases = [(dict(method="prune_all"), "prune.method='prune_all'"),
             (dict(method="magnitude", sparsity=1.0), "prune.sparsity=1.0"),
             (dict(method="magnitude", sparsity=-0.1), "prune.sparsity=-0.1"),
             (dict(method="nm", n=4, m=4), "prune.n=4, prune.m=4"),
             (dict(method="magnitude", start_step=50, end_step=10), "prune.end_step=10"),
             (dict(method="magnitude", start_step=500), "prune.start_step=500"),
             (dict(method="magnitude", frequency=0), "prune.frequency=0"),
             (dict(method="magnitude", scope="row"), "prune.scope='row'")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            optim.make_optimizer(_ocfg(), 100, _pcfg(**kw))
    tx, _ = optim.make_optimizer(_ocfg(), 100, _pcfg(method="nm", n=2, m=3))
    with pytest.raises(ValueError, match=r"layer_0/attn/query/kernel has input dim 8 .* not divisible by M=3"):
        tx.init(_toy_params())
    tx, _ = optim.make_optimizer(_ocfg(), 100, None)  # a config without a prune block: no pruning
    assert not isinstance(tx.init(_toy_params()), prune.MaskedState)


# ---- a real run: resume, old configs ----------------------------------------------------------------

def _state(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.parametrize("method", ["magnitude", "nm"])
def test_resume_with_pruning_is_exact(corpus_dir, tmp_path, method):
    kw = dict(train__steps=8, train__log_every=1, train__eval_every=4, train__checkpoint_every=100,
              prune__method=method, prune__sparsity=0.5, prune__start_step=1, prune__end_step=6,
              prune__frequency=2, prune__scope="global" if method == "magnitude" else "layer")
    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    train.train_and_evaluate(tiny_config(corpus_dir, **kw), straight)
    train.train_and_evaluate(tiny_config(corpus_dir, train__stop_after=4, **kw), stopped)
    train.train_and_evaluate(tiny_config(corpus_dir, **kw), stopped)  # resumes at 4
    a, b = _state(straight, 8), _state(stopped, 8)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # params, moments AND masks
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    masks = prune.prunable_tensors(prune.find_masks(_masked_state(a["opt_state"])))
    assert masks and all(np.asarray(m).dtype == bool for m in masks.values())
    kernels = prune.prunable_tensors(a["params"])
    assert prune.sparsity_report(kernels)["global"] == 0.5  # the target, exactly
    for name, w in kernels.items():
        assert (np.asarray(w)[~np.asarray(masks[name])] == 0).all()
    rows = read_jsonl(os.path.join(straight, "metrics.jsonl"))
    logged = [r for r in rows if "prune/sparsity" in r]
    assert [r["step"] for r in logged] == [4, 8] and logged[-1]["prune/sparsity"] == 0.5
    assert 0 < logged[0]["prune/sparsity"] < 0.5 and "prune/sparsity/layer_0/mlp/up/kernel" in logged[-1]


def _masked_state(opt_state):
    """The restored (plain-dict) optimizer state as a MaskedState (StandardRestore without a target gives
    its fields as a dict)."""
    if isinstance(opt_state, dict) and "masks" in opt_state:
        return prune.MaskedState(inner=opt_state["inner"], masks=opt_state["masks"], count=opt_state["count"])
    if isinstance(opt_state, (list, tuple)):
        for part in opt_state:
            found = _masked_state(part)
            if found is not None:
                return found
    return opt_state if isinstance(opt_state, prune.MaskedState) else None


def test_old_config_without_prune_block_is_compatible():
    from configs import pretrain_causal
    current = json.loads(pretrain_causal.get_config("tiny").to_json())
    old = {k: v for k, v in current.items() if k != "prune"}
    assert checkpoint.config_differences(old, current) == ([], [])
    changed = json.loads(json.dumps(current))
    changed["prune"]["method"] = "magnitude"
    bad, _ = checkpoint.config_differences(current, changed)
    assert bad == ["prune.method: 'none' -> 'magnitude'"]
    assert evaluation.config_from_saved(old).prune.method == "none"


# ---- scripts/prune.py ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(corpus_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=20, train__eval_every=20, optim__lr=3e-3), workdir)
    return workdir


def test_sequential_wanda_prunes_block_by_block(trained_run, tmp_path):
    """--sequential: block 0 sees the dense model (its masks equal one-pass Wanda's), later blocks are
    calibrated on the inputs of the pruned blocks before them; every kernel ends at the target sparsity."""
    one = prune_script.prune_run(trained_run, str(tmp_path / "one"), method="wanda", sparsity=0.5, calib=8)
    seq = prune_script.prune_run(trained_run, str(tmp_path / "seq"), method="wanda", sparsity=0.5, calib=8,
                                 sequential=True)
    assert seq["sequential"] and not one["sequential"] and seq["sparsity"] == pytest.approx(0.5, abs=1e-6)
    a = prune.prunable_tensors(checkpoint.load_for_inference(str(tmp_path / "one"))[1])
    b = prune.prunable_tensors(checkpoint.load_for_inference(str(tmp_path / "seq"))[1])
    assert sorted(a) == sorted(b)
    first = [k for k in a if k.startswith("layer_0/")]
    later = [k for k in a if not k.startswith("layer_0/")]
    assert first and later
    for k in first:
        np.testing.assert_array_equal(np.asarray(a[k]) != 0, np.asarray(b[k]) != 0)
    assert any((np.asarray(a[k]) != 0).tolist() != (np.asarray(b[k]) != 0).tolist() for k in later)
    with pytest.raises(ValueError, match="--sequential: only for --method=wanda"):
        prune_script.prune_run(trained_run, str(tmp_path / "bad"), method="magnitude", sequential=True)
    assert not os.path.exists(tmp_path / "bad")


def test_prune_script_end_to_end(trained_run, tmp_path):
    base = evaluation.evaluate_run(trained_run, max_batches=2)
    results = {}
    for name, kw in (("mag", dict(method="magnitude", sparsity=0.5)),
                     ("glob", dict(method="magnitude", sparsity=0.5, scope="global")),
                     ("wanda", dict(method="wanda", sparsity=0.5, calib=8)),
                     ("nm", dict(method="wanda", nm="2:4", calib=8))):
        out = str(tmp_path / name)
        manifest = prune_script.prune_run(trained_run, out, **kw)
        assert manifest["sparsity"] == pytest.approx(0.5, abs=1e-6)
        assert manifest["pruned_tensor_bytes_packed"] < 0.55 * manifest["pruned_tensor_bytes_dense"]  # 1/2 + 1/32
        assert sorted(os.listdir(out)) == ["checkpoints", "compression.json", "tokenizer.json"]
        _, params, _ = checkpoint.load_for_inference(out)  # dense again
        kernels = prune.prunable_tensors(params)
        assert prune.sparsity_report(kernels)["global"] == pytest.approx(0.5, abs=1e-6)
        if name == "nm":
            for w in kernels.values():
                assert ((np.asarray(w) != 0).reshape(-1, 4, w.shape[-1]).sum(axis=1) <= 2).all()
        results[name] = evaluation.evaluate_run(out, max_batches=2)["eval/loss"]
    assert all(np.isfinite(v) and v > base["eval/loss"] - 1e-3 for v in results.values())
    # the CLIs on the pruned run: evaluate.py and generate.py read it like any run
    out = str(tmp_path / "wanda")
    cli = subprocess.run([sys.executable, "scripts/evaluate.py", f"--workdir={out}", "--max_batches=2"], cwd=ROOT,
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout[cli.stdout.index("{"):])["eval/loss"] == pytest.approx(results["wanda"], rel=1e-5)
    gen = subprocess.run([sys.executable, "scripts/generate.py", f"--workdir={out}", "--prompt=def ",
                          "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    # quantized by GPTQ, the pruned run keeps its zeros, and its pruning record travels in compression.json
    import quantize as quantize_script  # scripts/quantize.py
    both = str(tmp_path / "wanda_gptq")
    manifest = quantize_script.quantize_run(out, both, method="gptq", bits=8, calib=4)
    assert manifest["source_compression"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    _, pruned, _ = checkpoint.load_for_inference(out)
    _, quantized, _ = checkpoint.load_for_inference(both)
    kernel = lambda tree: tree["layer_0"]["mlp"]["up"]  # noqa: E731
    zeros = np.asarray(kernel(pruned)["kernel"]) == 0
    assert zeros.mean() == pytest.approx(0.5, abs=0.05) and np.all(np.asarray(kernel(quantized)["kernel_q"])[zeros] == 0)


def test_prune_script_bad_input(trained_run, tmp_path):
    out = str(tmp_path / "out")
    cases = [(dict(method="obd"), "--method='obd'"), (dict(method="magnitude", sparsity=1.0), "--sparsity=1.0"),
             (dict(method="magnitude", sparsity=-0.5), "--sparsity=-0.5"),
             (dict(method="magnitude", nm="4:4"), "4:4"), (dict(method="magnitude", nm="2:3"), "not divisible by M=3"),
             (dict(method="magnitude", nm="x"), "--nm='x'"),
             (dict(method="wanda", scope="row"), "--scope='row'"),
             (dict(method="magnitude", nm="2:4", scope="layer"), "--scope=layer applies to unstructured")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            prune_script.prune_run(trained_run, out, **kw)
        assert not os.path.exists(out)
    pruned = str(tmp_path / "pruned")
    prune_script.prune_run(trained_run, pruned, method="magnitude", sparsity=0.3)
    with pytest.raises(ValueError, match="already a compressed run"):
        prune_script.prune_run(pruned, out, method="magnitude")
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        prune_script.prune_run(trained_run, pruned, method="magnitude")
    cli = subprocess.run([sys.executable, "scripts/prune.py", f"--workdir={trained_run}", f"--out={out}",
                          "--sparsity=1.5"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 1 and "--sparsity=1.5" in cli.stderr and not os.path.exists(out)


def test_apply_masks_guards_a_scaled_update():
    """The train step multiplies updates by lr_scale (< 1 after a rollback): p + s * (-p) is not 0, so it
    re-applies the state's masks (steps._train_step)."""
    tx, _ = optim.make_optimizer(_ocfg(), 4, _pcfg(method="magnitude", sparsity=0.5, start_step=1, end_step=1))
    params = _toy_params()
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    scaled = optax.apply_updates(params, jax.tree.map(lambda u: 0.5 * u, updates))
    assert prune.sparsity_report(prune.prunable_tensors(scaled))["global"] == 0.0  # half of each pruned weight left
    fixed = prune.apply_masks(scaled, state)
    assert prune.sparsity_report(prune.prunable_tensors(fixed))["global"] == 0.5
    np.testing.assert_array_equal(fixed["embed"]["embedding"], scaled["embed"]["embedding"])  # others untouched
    assert prune.apply_masks(params, optax.adam(1e-3).init(params)) is params  # no masks: nothing to do

"""Optimizer: LR schedules, the weight-decay mask, gradient accumulation and clipping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from configs import common

LR, MIN_RATIO = 1e-3, 0.1


def ocfg(**overrides):
    o = common.base().optim
    o.lr, o.min_lr_ratio = LR, MIN_RATIO
    for k, v in overrides.items():
        o[k] = v
    return o


def lr_at(schedule, step):
    return float(schedule(step))


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_warmup(name):
    s = optim.make_schedule(ocfg(schedule=name, warmup_steps=10), 100)
    assert lr_at(s, 0) == 0.0
    np.testing.assert_allclose(lr_at(s, 5), LR / 2, rtol=1e-5)
    np.testing.assert_allclose(lr_at(s, 10), LR, rtol=1e-5)
    values = [lr_at(s, i) for i in range(11)]
    assert values == sorted(values)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_decay_ends_at_min_lr(name, warmup):
    s = optim.make_schedule(ocfg(schedule=name, warmup_steps=warmup), 100)
    np.testing.assert_allclose(lr_at(s, 100), LR * MIN_RATIO, rtol=1e-5)
    after = [lr_at(s, i) for i in range(warmup, 101)]
    assert all(a >= b - 1e-9 for a, b in zip(after, after[1:]))  # non-increasing after warmup
    assert after[0] == pytest.approx(LR, rel=1e-5)
    if name != "wsd":
        assert LR * MIN_RATIO < lr_at(s, 55) < LR


def test_cosine_midpoint():
    s = optim.make_schedule(ocfg(schedule="cosine", warmup_steps=10), 110)
    np.testing.assert_allclose(lr_at(s, 60), LR * (MIN_RATIO + 1) / 2, rtol=1e-5)


def test_linear_midpoint():
    s = optim.make_schedule(ocfg(schedule="linear", warmup_steps=10), 110)
    np.testing.assert_allclose(lr_at(s, 60), LR * (MIN_RATIO + 1) / 2, rtol=1e-5)


def test_constant_holds():
    s = optim.make_schedule(ocfg(schedule="constant", warmup_steps=10), 100)
    for step in (10, 50, 100, 1000):
        np.testing.assert_allclose(lr_at(s, step), LR, rtol=1e-6)


def test_wsd_holds_then_decays():
    # 10 warmup + 90 post-warmup steps, the last 20% (18 steps) decaying: decay starts at step 82
    s = optim.make_schedule(ocfg(schedule="wsd", warmup_steps=10, wsd_decay_fraction=0.2), 100)
    for step in range(10, 83):
        np.testing.assert_allclose(lr_at(s, step), LR, rtol=1e-6, err_msg=f"step {step}")
    assert lr_at(s, 83) < LR
    np.testing.assert_allclose(lr_at(s, 91), LR * (1 + MIN_RATIO) / 2, rtol=1e-5)
    np.testing.assert_allclose(lr_at(s, 100), LR * MIN_RATIO, rtol=1e-5)


def test_schedule_errors():
    with pytest.raises(ValueError, match="inverse_sqrt"):
        optim.make_schedule(ocfg(schedule="inverse_sqrt"), 100)
    for warmup in (100, 150):
        with pytest.raises(ValueError, match="warmup_steps"):
            optim.make_schedule(ocfg(schedule="cosine", warmup_steps=warmup), 100)
    for field, value in (("lr", -1e-3), ("lr", float("nan")), ("min_lr_ratio", -0.1), ("warmup_steps", -2)):
        with pytest.raises(ValueError, match=rf"optim.{field}={value} must be a finite value >= 0"):
            optim.make_schedule(ocfg(schedule="cosine", **{field: value}), 100)
    for fraction in (0.0, -1.0, float("nan"), 1.5):  # the decay's share: was used as it was
        with pytest.raises(ValueError, match=rf"optim.wsd_decay_fraction={fraction} must be in \(0, 1\]"):
            optim.make_schedule(ocfg(schedule="wsd", wsd_decay_fraction=fraction), 100)


# ---------------------------------------------------------------- decay mask

def _params():
    return {
        "embed": {"embedding": jnp.ones((5, 4))},
        "layer": {"attn_norm": {"scale": jnp.ones((4,))},
                  "mlp": {"up": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))}}},
    }


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask(decay_embeddings):
    mask = optim.decay_mask(_params(), decay_embeddings)
    assert mask == {
        "embed": {"embedding": decay_embeddings},
        "layer": {"attn_norm": {"scale": False}, "mlp": {"up": {"kernel": True, "bias": False}}},
    }


def test_weight_decay_only_touches_masked_leaves():
    o = ocfg(schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    tx, _ = optim.make_optimizer(o, 10)
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["layer"]["mlp"]["up"]["kernel"]).min()) > 0
    for leaf in (updates["embed"]["embedding"], updates["layer"]["mlp"]["up"]["bias"],
                 updates["layer"]["attn_norm"]["scale"]):
        assert not jnp.any(leaf)


# ---------------------------------------------------------------- make_optimizer

def _grads(seed, scale=1.0):
    leaves, treedef = jax.tree.flatten(_params())
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _apply(tx, params, grads_seq):
    """Run the optimizer over a gradient sequence; return the params after every call."""
    state, history, update = tx.init(params), [], jax.jit(tx.update)
    for g in grads_seq:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


def _assert_trees_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_grad_accumulation_matches_mean_gradient(clip_norm):
    kw = dict(schedule="cosine", warmup_steps=1, clip_norm=clip_norm, weight_decay=0.1)
    tx4, _ = optim.make_optimizer(ocfg(grad_accum_steps=4, **kw), 10)
    tx1, _ = optim.make_optimizer(ocfg(grad_accum_steps=1, **kw), 10)
    params = _params()
    micro = [[_grads(10 * step + i) for i in range(4)] for step in range(3)]
    accum = _apply(tx4, params, [g for step in micro for g in step])
    mean = [jax.tree.map(lambda *gs: sum(gs) / 4, *step) for step in micro]
    single = _apply(tx1, params, mean)
    for step in range(3):
        before = params if step == 0 else single[step - 1]
        for i in range(3):  # no update until the 4th micro-batch
            _assert_trees_close(accum[4 * step + i], before, atol=0)
        _assert_trees_close(accum[4 * step + 3], single[step])
    # the second update (warmup done) really moved the params
    kernel = lambda p: p["layer"]["mlp"]["up"]["kernel"]
    assert float(jnp.abs(kernel(single[1]) - kernel(single[0])).max()) > 1e-4


def test_grad_accum_steps_must_be_positive():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        optim.make_optimizer(ocfg(grad_accum_steps=0, warmup_steps=1), 10)


def test_clip_norm_limits_huge_gradients():
    # Adam is (nearly) scale invariant on one step, so clipping shows in the following steps:
    # a huge first gradient must leave the same moments as that gradient scaled to norm clip_norm.
    kw = dict(schedule="constant", warmup_steps=0, weight_decay=0.0)
    g0, small = _grads(0), [_grads(s, scale=0.01) for s in (1, 2)]
    huge = jax.tree.map(lambda x: 1e6 * x, g0)
    at_clip = jax.tree.map(lambda x: 0.5 * x / optax.tree.norm(g0), g0)  # norm 0.5 = clip_norm
    tx, _ = optim.make_optimizer(ocfg(clip_norm=0.5, **kw), 10)
    _assert_trees_close(_apply(tx, _params(), [huge] + small), _apply(tx, _params(), [at_clip] + small))
    tx_off, _ = optim.make_optimizer(ocfg(clip_norm=0.0, **kw), 10)
    off = _apply(tx_off, _params(), [huge] + small)[-1]
    on = _apply(tx, _params(), [huge] + small)[-1]
    diff = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), off, on)
    assert max(float(d) for d in jax.tree.leaves(diff)) > 1e-4


# ---------------------------------------------------------------- optim.name

def test_unknown_optimizer_and_bad_fields_named():
    with pytest.raises(ValueError, match=r"optim.name='adam'.*'adamw', 'adafactor', 'lion', 'sgd', 'muon'"):
        optim.make_optimizer(ocfg(name="adam", warmup_steps=1), 10)
    with pytest.raises(ValueError, match=r"optim.momentum=1.5 must be in \[0, 1\)"):
        optim.make_optimizer(ocfg(name="sgd", momentum=1.5, warmup_steps=1), 10)
    with pytest.raises(ValueError, match="optim.adafactor_min_dim=0"):
        optim.make_optimizer(ocfg(name="adafactor", adafactor_min_dim=0, warmup_steps=1), 10)
    with pytest.raises(ValueError, match=r"optim.weight_decay=-0.1 must be a finite value >= 0"):
        optim.make_optimizer(ocfg(weight_decay=-0.1, warmup_steps=1), 10)


def _block_params():
    """A block's kernels (as the model names them), an embedding, a norm scale and a bias."""
    return {"embed": {"embedding": jnp.ones((6, 4))},
            "layer_0": {"attn_norm": {"scale": jnp.ones((4,))},
                        "mlp": {"up": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))}}}}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_keeps_the_decay_mask(name):
    """Zero gradients: each update is the decoupled decay alone, on kernels only."""
    tx, _ = optim.make_optimizer(ocfg(name=name, schedule="constant", warmup_steps=0, weight_decay=0.5,
                                      clip_norm=1.0), 10)
    params = _block_params()
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["layer_0"]["mlp"]["up"]["kernel"], -LR * 0.5, rtol=1e-5)
    for leaf in (updates["embed"]["embedding"], updates["layer_0"]["mlp"]["up"]["bias"],
                 updates["layer_0"]["attn_norm"]["scale"]):
        assert not jnp.any(leaf)


def _state_bytes(tx, params):
    return sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))


def test_adafactor_factors_large_matrices():
    params = {"layer_0": {"kernel": jnp.ones((256, 512))}, "norm": {"scale": jnp.ones((512,))}}
    adamw, _ = optim.make_optimizer(ocfg(warmup_steps=1), 10)
    fact, _ = optim.make_optimizer(ocfg(name="adafactor", adafactor_min_dim=128, warmup_steps=1), 10)
    full, _ = optim.make_optimizer(ocfg(name="adafactor", adafactor_min_dim=1024, warmup_steps=1), 10)
    n = 256 * 512 + 512
    assert _state_bytes(adamw, params) >= 2 * 4 * n  # two moments
    assert _state_bytes(full, params) < 4 * n + 64  # one unfactored second moment
    assert _state_bytes(fact, params) < 4 * (256 + 512 + 512) + 64  # a row and a column for the matrix


@pytest.mark.parametrize("scan", [False, True])
def test_muon_takes_the_block_matrices_only(corpus_dir, scan):
    """The blocks' kernels (3-D when scanned) get Muon's momentum alone; the embedding, norms and (untied)
    LM head get AdamW's two moments; a Muon update of a kernel is orthogonalised (flat singular values)."""
    from conftest import tiny_config
    from model import build
    config = tiny_config(corpus_dir, model__scan_layers=scan, model__tie_embeddings=False)
    model = build.transformer(config, 267)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.key(0))
    labels = jax.tree_util.tree_leaves_with_path(optim.muon_labels(params))
    muon = sorted("/".join(str(k.key) for k in path) for path, label in labels if label == "muon")
    assert muon and all(p.split("/")[-1] == "kernel" and ("layers" in p or "layer_" in p) for p in muon)
    assert len(muon) == 7 * (1 if scan else config.model.n_layers)  # q, k, v, out, gate, up, down
    assert {"lm_head/kernel", "embed/embedding"} <= {"/".join(str(k.key) for k in p) for p, lab in labels
                                                     if lab == "adamw"}
    tx, _ = optim.make_optimizer(ocfg(name="muon", schedule="constant", warmup_steps=0, clip_norm=0.0,
                                      weight_decay=0.0), 10)
    state = jax.eval_shape(tx.init, params)  # sizes only
    n_muon = sum(x.size for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(optim.muon_labels(params)))
                 if lab == "muon")
    n_all = sum(x.size for x in jax.tree.leaves(params))
    ns_coeffs = 3  # Muon's Newton-Schulz coefficients live in its state
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == n_muon + 2 * (n_all - n_muon) + ns_coeffs
    # gradients with columns scaled 0.05..1: singular values spread far apart
    grads = jax.jit(lambda p: jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) * jnp.linspace(
        0.05, 1.0, x.shape[-1]).reshape((1,) * (x.ndim - 1) + (-1,)), p))(params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    def pick(tree):
        return tree["layers"]["block"]["mlp"]["up"]["kernel"][0] if scan else tree["layer_0"]["mlp"]["up"]["kernel"]
    sv_in, sv_out = (np.linalg.svd(np.asarray(pick(t)), compute_uv=False) for t in (grads, updates))
    assert sv_in.min() < 0.3 * sv_in.max() and sv_out.min() > 0.5 * sv_out.max()  # orthogonalised by Newton-Schulz


# ---------------------------------------------------------------- end to end

def train_resumed(config_fn, tmp_path, steps: int, stop: int):
    """A straight run of `steps` and a run stopped after `stop` then resumed: (straight workdir, resumed
    workdir, straight result) after checking both end with identical states and per-step losses."""
    import os

    import orbax.checkpoint as ocp

    import train
    from metrics import read_jsonl
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    out = train.train_and_evaluate(config_fn(train__steps=steps), straight)
    train.train_and_evaluate(config_fn(train__steps=steps, train__stop_after=stop), stopped)
    assert sorted(os.listdir(os.path.join(stopped, "checkpoints"))) == [str(stop)]
    train.train_and_evaluate(config_fn(train__steps=steps), stopped)

    def state(workdir):
        mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
        return mngr.restore(steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    a, b = state(straight), state(stopped)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = [{r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(w, "metrics.jsonl")) if "train/loss" in r}
              for w in (straight, stopped)]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, steps + 1))
    return straight, stopped, out


# lr per optimizer: Lion's sign updates want a smaller one, SGD a much larger one
LRS = {"adamw": 1e-2, "adafactor": 1e-2, "lion": 3e-3, "sgd": 1.0, "muon": 1e-2}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(corpus_dir, tmp_path, name):
    from conftest import tiny_config

    import checkpoint
    import train
    from metrics import read_jsonl

    def config_fn(**kw):
        return tiny_config(corpus_dir, optim__name=name, optim__lr=LRS[name], optim__adafactor_min_dim=16,
                           model__dropout=0.1, train__log_every=1, train__eval_every=100,
                           train__checkpoint_every=100, **kw)
    straight, _, out = train_resumed(config_fn, tmp_path, steps=8, stop=4)
    first = read_jsonl(f"{straight}/metrics.jsonl")[0]["train/loss"]  # ~ln(267) = 5.59 at init
    assert first > 5.3 and out["train/loss"] < 5.2 and out["eval/loss"] < 5.2, (first, out)  # measured 4.0-5.0
    if name == "adamw":  # another optimizer's state does not fit this checkpoint: refused, naming the field
        with pytest.raises(checkpoint.IncompatibleCheckpointError, match="optim.name: 'adamw' -> 'lion'"):
            train.train_and_evaluate(tiny_config(corpus_dir, optim__name="lion", train__steps=9), straight)


def test_old_checkpoints_resume_as_adamw():
    """A config saved before optim.name existed means AdamW: it resumes under 'adamw', not under another name."""
    import json

    import checkpoint
    current = json.loads(common.base().to_json())
    saved = json.loads(common.base().to_json())
    for field in ("name", "momentum", "nesterov", "adafactor_min_dim", "muon_beta", "muon_rms", "loss_scale_init",
                  "loss_scale_period"):
        del saved["optim"][field]
    assert checkpoint.config_differences(saved, current) == ([], [])
    current["optim"]["name"] = "muon"
    bad, _ = checkpoint.config_differences(saved, current)
    assert bad == ["optim.name: 'adamw' -> 'muon'"]

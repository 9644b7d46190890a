"""Continual learning: penalties, the Fisher, replay mixing, exact resume, forgetting, bad input."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import continual
import evaluation
import modes
import train
from conftest import tiny_config
from data import mixture, pipeline
from model import build

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import continual_report  # noqa: E402

WORDS = ("the king said that his daughter would marry a brave knight before the summer came to the old castle "
         "where every servant and every horse waited for news from the far northern hills").split()


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    """A directory of English-like text (a fixed RNG over a small word list): a domain far from Python source."""
    out = tmp_path_factory.mktemp("english")
    rng = np.random.default_rng(0)
    for i in range(12):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(6, 14))).capitalize() + "." for _ in range(120)]
        (out / f"story{i}.txt").write_text(" ".join(sentences) + "\n")
    return str(out)


@pytest.fixture(scope="module")
def base_run(corpus_dir, tmp_path_factory):
    """A tiny causal run pretrained on Python source (the old domain)."""
    workdir = str(tmp_path_factory.mktemp("base"))
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=60, train__checkpoint_every=60,
                                         train__eval_every=60, optim__lr=3e-3), workdir)
    return workdir


def _continued(base, english, corpus_dir, **overrides):
    return tiny_config(english, **dict(dict(init_from=base, train__steps=8, optim__lr=3e-3,
                                            continual__replay_path=corpus_dir), **overrides))


def _tree(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"a": {"kernel": jax.random.normal(k1, (3, 4))}, "b": jax.random.normal(k2, (5,))}


# ---- Penalties and the Fisher -------------------------------------------------------------------------

def test_penalties_are_zero_at_the_anchor_and_have_the_analytic_gradient():
    theta0, theta = _tree(0), _tree(1)
    fisher = jax.tree.map(jnp.abs, _tree(2))
    w = 0.7
    assert float(continual.l2sp_penalty(theta0, theta0)) == 0.0
    assert float(continual.ewc_penalty(theta0, theta0, fisher)) == 0.0
    g_l2 = jax.grad(lambda p: w * continual.l2sp_penalty(p, theta0))(theta)
    g_ewc = jax.grad(lambda p: w * continual.ewc_penalty(p, theta0, fisher))(theta)
    for got, want in ((g_l2, jax.tree.map(lambda t, a: 2 * w * (t - a), theta, theta0)),
                      (g_ewc, jax.tree.map(lambda t, a, f: 2 * w * f * (t - a), theta, theta0, fisher))):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-6)
    # the wrapper adds them to the task loss and reports them apart; the task loss stays metrics['loss']
    task = lambda p, batch, rng, *, model: (jnp.zeros(()), {"loss": jnp.zeros(())})  # noqa: E731
    loss, metrics = continual.penalized(task, l2sp=w, ewc=2.0)(theta, None, None, model=None,
                                                                consts={"params": theta0, "fisher": fisher})
    want = w * continual.l2sp_penalty(theta, theta0) + 2.0 * continual.ewc_penalty(theta, theta0, fisher)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert set(metrics) == {"loss", "l2sp_loss", "ewc_loss"} and float(metrics["loss"]) == 0.0


def test_fisher_equals_a_direct_per_example_computation(corpus_dir):
    config = tiny_config(corpus_dir, model__dtype="float32")  # f32 matmuls: jit and eager round alike
    from data import tokenizer as tokenizer_lib
    tok = tokenizer_lib.build_tokenizer("byte", [])
    model = build.causal_lm(config, tok.vocab_size, tok.base_size)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 32), jnp.int32))["params"]))(jax.random.key(0))
    stream = pipeline.tokenize_stream(["def f(x):\n    return x * 2\n" * 20, "import os\nprint(os.sep)\n" * 20], tok)
    rows = [pipeline.WindowSource(stream, 32)[i] for i in range(6)]
    objective = modes.get(config).loss(config)
    got = continual.diagonal_fisher(objective, model, params, mixture.stack(rows, 3))
    row_grad = jax.jit(jax.grad(lambda p, r: objective(p, {k: v[None] for k, v in r.items()}, None, model=model)[0]))
    grads = [row_grad(params, r) for r in rows]  # one row at a time, outside any scan
    want = jax.tree.map(lambda *g: sum(np.square(np.asarray(x, np.float64)) for x in g) / len(g), *grads)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-12)
    assert max(float(jnp.max(x)) for x in jax.tree.leaves(got)) > 0


# ---- Replay mixing ------------------------------------------------------------------------------------

class _Rows:
    def __init__(self, start, n):
        self.start, self.n = start, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.array([self.start + i], np.int32)}


@pytest.mark.parametrize("ratio", [0.125, 0.5])
def test_mixing_ratio_holds_and_resumes_bit_exactly(ratio):
    new, old = _Rows(0, 37), _Rows(1000, 23)
    replay = mixture.Replay(old, ratio, seed=3)
    it = pipeline.shuffled_batches(new, global_batch=8, seed=1, what="rows", replay=replay)
    batches = [next(it)["x"][:, 0] for _ in range(150)]
    olds = np.array([int((b >= 1000).sum()) for b in batches])
    assert abs(olds.sum() / (150 * 8) - ratio) < 0.005
    assert olds.min() >= np.floor(8 * ratio) - 1 and olds.max() <= np.ceil(8 * ratio) + 1
    assert set(np.concatenate(batches)[np.concatenate(batches) >= 1000]) == set(range(1000, 1023))  # every old row
    it2 = pipeline.shuffled_batches(new, global_batch=8, seed=1, what="rows", replay=replay)
    for _ in range(17):
        next(it2)
    state = it2.get_state()
    it3 = pipeline.shuffled_batches(new, global_batch=8, seed=1, what="rows", replay=replay)
    it3.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for b in batches[17:40]:
        np.testing.assert_array_equal(next(it3)["x"][:, 0], b)
    # two processes each feed their block of the same global batches
    halves = [pipeline.shuffled_batches(new, global_batch=8, seed=1, what="rows", replay=replay, process_index=p,
                                        process_count=2) for p in range(2)]
    for b in batches[:10]:
        np.testing.assert_array_equal(np.concatenate([next(h)["x"][:, 0] for h in halves]), b)


def test_ratio_zero_is_the_plain_iterator():
    new = _Rows(0, 37)
    a = pipeline.shuffled_batches(new, global_batch=8, seed=1, what="rows")
    b = pipeline.shuffled_batches(new, global_batch=8, seed=1, what="rows", replay=None)
    for _ in range(10):
        np.testing.assert_array_equal(next(a)["x"], next(b)["x"])


# ---- Runs -----------------------------------------------------------------------------------------------

def _params(workdir):
    from checkpoint import load_for_inference
    return load_for_inference(workdir)[1]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_with_replay_ewc_l2sp_full_state_is_exact(base_run, english, corpus_dir, tmp_path):
    over = dict(continual__replay_ratio=0.25, continual__ewc=50.0, continual__l2sp=0.01, continual__init_state="full",
                continual__fisher_batches=2)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(_continued(base_run, english, corpus_dir, **over), straight)
    train.train_and_evaluate(_continued(base_run, english, corpus_dir, train__stop_after=4, **over), resumed)
    train.train_and_evaluate(_continued(base_run, english, corpus_dir, **over), resumed)
    for x, y in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(x, y)
    logged = [m for m in _metrics(straight) if "train/ewc_loss" in m]
    pens = [(m["train/ewc_loss"], m["train/l2sp_loss"]) for m in logged]
    # step 2's loss is at the params after step 1, whose LR is 0 (the re-warmed schedule starts at 0): the anchor
    assert len(pens) == 4 and pens[0] == (0.0, 0.0) and all(e > 0 and l2 > 0 for e, l2 in pens[1:]), pens
    resumed_logs = {m["step"]: m for m in _metrics(resumed) if "train/loss" in m}
    for m in _metrics(straight):
        if "train/loss" in m:
            assert resumed_logs[m["step"]]["train/loss"] == m["train/loss"]
    assert os.path.exists(os.path.join(straight, continual.ANCHOR_JSON))


def test_zero_weights_and_ratio_are_todays_run(base_run, english, corpus_dir, tmp_path):
    """continual.* at their defaults (with a replay path given but unused) = a plain warm start, exactly."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.train_and_evaluate(_continued(base_run, english, corpus_dir, train__steps=4, continual__replay_path=""), a)
    train.train_and_evaluate(_continued(base_run, english, corpus_dir, train__steps=4), b)
    for x, y in zip(jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))):
        np.testing.assert_array_equal(x, y)
    assert not os.path.exists(os.path.join(b, continual.ANCHOR_JSON))


def test_replay_forgets_less_than_plain_continued_training_and_the_report_says_so(base_run, english, corpus_dir,
                                                                                     tmp_path):
    workdirs = []
    for name, ratio in (("plain", 0.0), ("replay", 0.5)):
        workdirs.append(str(tmp_path / name))
        train.train_and_evaluate(_continued(base_run, english, corpus_dir, train__steps=40, train__eval_every=40,
                                            train__checkpoint_every=20, continual__replay_ratio=ratio), workdirs[-1])
    evals = continual_report.parse_evals([f"old={corpus_dir}", english])
    result = continual_report.report(workdirs, evals, max_batches=8)
    plain, replay = result["runs"]
    assert result["old"] == "old" and result["new"] == os.path.basename(english)
    assert [c["step"] for c in plain["checkpoints"]] == [20, 40]
    assert plain["forgetting"] > 0.05, result
    assert replay["forgetting"] < 0.5 * plain["forgetting"], result  # replay forgets less than half as much
    assert replay["gain"] > 0.5 * plain["gain"] > 0, result  # and keeps most of the new-domain gain
    # the numbers are scripts/evaluate.py's: the source's final checkpoint is "before"
    before = evaluation.evaluate_run(base_run, data=corpus_dir, max_batches=8)["eval/loss"]
    assert result["before"][base_run]["loss"]["old"] == pytest.approx(before, rel=1e-6)
    paths = continual_report.write(result, str(tmp_path / "report"))
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert "| forgetting | gain |" in open(paths[0]).read()
    with pytest.raises(ValueError, match="init_from=''"):
        continual_report.report([base_run], evals)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        continual_report.parse_evals(["old=nope.txt", english])


def test_replay_mixes_old_rows_into_mlm_and_sft_batches(english, corpus_dir, tmp_path):
    """mlm and sft build the old domain's rows with their own row builders; a batch holds both kinds."""
    from configs import pretrain_mlm, sft as sft_config
    for name, (config, old_path) in {
        "mlm": (tiny_config(english, pretrain_mlm, continual__replay_ratio=0.5, continual__replay_path=corpus_dir),
                corpus_dir),
        "sft": (None, None)}.items():
        if name == "sft":
            new_path, old_path = _chat(tmp_path / "new.jsonl", "abcdef"), _chat(tmp_path / "old.jsonl", "0123456789")
            config = tiny_config(new_path, sft_config, data__seq_len=64, sft__eval_generate=0, sft__val_path="",
                                 continual__replay_ratio=0.5, continual__replay_path=old_path)
        workdir = str(tmp_path / name)
        os.makedirs(workdir)
        inputs = modes.get(config).inputs(config, workdir, 8)
        old = {np.asarray(inputs.old_rows[i]["inputs"]).tobytes() for i in range(len(inputs.old_rows))}
        for _ in range(3):
            batch = next(inputs.train_iter)
            from_old = [np.asarray(r).tobytes() in old for r in batch["inputs"]]
            assert sum(from_old) == 4, (name, from_old)


def _chat(path, alphabet):
    rng = np.random.default_rng(len(alphabet))
    with open(path, "w") as f:
        for _ in range(200):
            w = "".join(rng.choice(list(alphabet), size=3))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"copy {w}"},
                                             {"role": "assistant", "content": w}]}) + "\n")
    return str(path)


# ---- Bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (dict(continual__replay_ratio=1.0), "continual.replay_ratio=1.0"),
    (dict(continual__replay_ratio=-0.1), "continual.replay_ratio=-0.1"),
    (dict(continual__replay_ratio=0.2, continual__replay_path="/nonexistent/old.txt"), "/nonexistent/old.txt"),
    (dict(continual__replay_ratio=0.2, continual__replay_path=""), "continual.replay_path"),
    (dict(continual__ewc=-1.0), "continual.ewc=-1.0"),
    (dict(continual__init_state="optimizer"), "continual.init_state='optimizer'"),
    (dict(continual__init_state="full", model__d_model=64), "model.d_model: 32 -> 64"),
    (dict(continual__init_state="full", optim__name="lion"), "optim.name: 'adamw' -> 'lion'"),
])
def test_bad_input_names_the_value_before_writing(base_run, english, corpus_dir, tmp_path, overrides, message):
    config = _continued(base_run, english, corpus_dir, **overrides)
    workdir = str(tmp_path / "w")
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir) or not os.listdir(workdir)


def test_full_state_from_another_mode_and_replay_in_a_mode_without_rows(base_run, english, corpus_dir, tmp_path):
    from configs import pretrain_mlm
    config = tiny_config(english, pretrain_mlm, init_from=base_run, continual__init_state="full")
    with pytest.raises(ValueError, match=r"mode: 'causal' -> 'mlm'"):
        train.train_and_evaluate(config, str(tmp_path / "mlm"))
    from configs import finetune_classify
    config = tiny_config(english, finetune_classify, init_from=base_run, continual__replay_ratio=0.2,
                         continual__replay_path=corpus_dir)
    with pytest.raises(ValueError, match=r"mode='classify' cannot read old-domain rows"):
        train.train_and_evaluate(config, str(tmp_path / "cls"))


def test_full_state_restarts_only_the_schedule_count():
    """init_state='full': the LR schedule's step count restarts at 0; Adam's moments and count carry on."""
    import optax
    import warmstart
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(0.0, 1.0, 10)))
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update({"w": jnp.full((3,), 0.5)}, state, params)
    reset = warmstart._reset_schedule_counts(state)
    has_count = lambda x: "count" in getattr(x, "_fields", ())  # noqa: E731
    counts = [(type(s).__name__, int(s.count)) for s in jax.tree.leaves(reset, is_leaf=has_count) if has_count(s)]
    assert ("ScaleByScheduleState", 0) in counts and ("ScaleByAdamState", 5) in counts, counts
    np.testing.assert_array_equal(optax.tree.get(reset, "mu")["w"], optax.tree.get(state, "mu")["w"])


def test_continual_data_splits_the_tail_and_names_bad_flags(tmp_path):
    import continual_data
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 10)
    train_path, val_path = continual_data.split(str(text), str(tmp_path / "out"), 0.1)
    assert open(train_path).read() + open(val_path).read() == "abcdefghij" * 10
    assert len(open(val_path).read()) == 10
    with pytest.raises(ValueError, match="--val_fraction=1.5"):
        continual_data.split(str(text), str(tmp_path / "out"), 1.5)

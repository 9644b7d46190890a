"""Masked-LM + NSP: masking statistics, pair construction, bidirectional heads, end-to-end training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import train
from configs import pretrain_mlm
from data import mlm as mlm_data
from data.sources import DataError
from metrics import read_jsonl
from model import heads
from model.transformer import ModelConfig

BASE, PAD, MASK, SEP, CLS = 256, 256, 260, 261, 262


def _source(docs=None, **kw):
    rng = np.random.default_rng(0)
    docs = docs if docs is not None else [rng.integers(0, BASE, size=n) for n in (300, 500, 90, 1000, 40)]
    args = dict(seed=7, base_size=BASE, cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD)
    args.update(kw)
    return mlm_data.MlmSource(docs, 64, **args), docs


def test_masking_statistics_and_specials_never_masked():
    src, _ = _source()
    chosen = candidates = masked = randomised = kept = 0
    for i in range(len(src)):
        ex = src[i]
        special = (ex["targets"] >= BASE) | (ex["segment_ids"] == 0)
        w = ex["mlm_weights"] > 0
        assert not np.any(w & special), "a special or pad token was chosen"
        np.testing.assert_array_equal(ex["inputs"][special], ex["targets"][special])  # specials untouched
        np.testing.assert_array_equal(ex["inputs"][~w], ex["targets"][~w])  # only chosen tokens change
        candidates += int(np.sum(~special))
        chosen += int(np.sum(w))
        masked += int(np.sum(ex["inputs"][w] == MASK))
        changed = (ex["inputs"][w] != MASK) & (ex["inputs"][w] != ex["targets"][w])
        randomised += int(np.sum(changed))
        kept += int(np.sum(ex["inputs"][w] == ex["targets"][w]))
    assert abs(chosen / candidates - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.05
    # a random replacement equals the original 1/256 of the time: it then counts as kept
    assert abs(randomised / chosen - 0.1) < 0.03 and abs(kept / chosen - 0.1) < 0.03


def test_masking_statistics_over_many_samples():
    tokens = np.arange(200, dtype=np.int32) % BASE
    seg = np.ones(200, np.int32)
    tokens[[0, 50, 199]] = [CLS, SEP, SEP]
    counts = np.zeros(3)
    n_chosen = 0
    for s in range(400):
        inputs, w = mlm_data.mask_tokens(tokens, seg, np.random.default_rng(s), base_size=BASE, mask_id=MASK,
                                         mask_prob=0.15)
        assert w[[0, 50, 199]].sum() == 0
        ch = w > 0
        n_chosen += ch.sum()
        assert ch.sum() == round(0.15 * 197)
        counts += [np.sum(inputs[ch] == MASK), np.sum((inputs[ch] != MASK) & (inputs[ch] != tokens[ch])),
                   np.sum(inputs[ch] == tokens[ch])]
    frac = counts / n_chosen
    np.testing.assert_allclose(frac, [0.8, 0.1 * 255 / 256, 0.1 + 0.1 / 256], atol=0.015)


def test_nsp_pairs_fifty_fifty_and_segments_respected():
    src, docs = _source()
    labels = []
    for i in range(len(src)):
        ex = src[i]
        n = int(ex["segment_ids"].sum())
        t, types = ex["targets"][:n], ex["token_types"][:n]
        assert t[0] == CLS and t[n - 1] == SEP
        seps = np.flatnonzero(t == SEP)
        assert len(seps) == 2
        a, b = t[1:seps[0]], t[seps[0] + 1:n - 1]
        assert len(a) >= 1 and len(b) >= 1
        np.testing.assert_array_equal(types, np.r_[np.zeros(len(a) + 2), np.ones(len(b) + 1)])
        assert np.all(ex["targets"][n:] == PAD) and np.all(ex["token_types"][n:] == 0)
        d, start = src.anchors[i]
        doc = docs[d]
        np.testing.assert_array_equal(a, doc[start:start + len(a)])
        if ex["nsp_label"] == 1:
            np.testing.assert_array_equal(b, doc[start + len(a):start + len(a) + len(b)])
        else:  # a segment of some other document
            found = [j for j, o in enumerate(docs) if j != d and
                     any(np.array_equal(o[s:s + len(b)], b) for s in range(len(o) - len(b) + 1))]
            assert found
        labels.append(int(ex["nsp_label"]))
    # 50/50 over many examples (a bigger source)
    big, _ = _source([np.random.default_rng(k).integers(0, BASE, 2000) for k in range(20)])
    frac = np.mean([big[i]["nsp_label"] for i in range(len(big))])
    assert abs(frac - 0.5) < 0.06, frac
    assert 0 < np.mean(labels) < 1


def test_nsp_label_not_readable_from_the_example_length():
    """A negative's B is as long as the true continuation would have been: at a document's last anchor
    (fewer tokens left than the budget) a full-length random B gave the label away through the padding."""
    src, docs = _source([np.random.default_rng(k).integers(0, BASE, n) for k, n in enumerate((150, 200, 170, 230))])
    lengths = {0: set(), 1: set()}
    for i in range(len(src)):
        ex = src[i]
        d, start = src.anchors[i]
        room = min(src.budget, len(docs[d]) - start)
        n = int(ex["segment_ids"].sum())
        assert n == room + 3, (i, int(ex["nsp_label"]), n, room + 3)  # <cls> A <sep> B <sep>: set by the anchor
        if room < src.budget:
            lengths[int(ex["nsp_label"])].add(n)
    assert lengths[0] and lengths[1]  # both labels occur at short (document-final) anchors


def test_examples_are_deterministic_per_index_and_seed():
    src, docs = _source()
    again, _ = _source(docs)
    other, _ = _source(docs, seed=8)
    for i in (0, 3, len(src) - 1):
        for k in src[i]:
            np.testing.assert_array_equal(src[i][k], again[i][k])
    assert any(not np.array_equal(src[i]["inputs"], other[i]["inputs"]) for i in range(len(src)))


def test_without_nsp_single_segment():
    src, _ = _source(nsp=False)
    ex = src[0]
    n = int(ex["segment_ids"].sum())
    assert n == 64 and ex["targets"][0] == CLS and ex["targets"][n - 1] == SEP
    assert np.sum(ex["targets"] == SEP) == 1 and ex["nsp_weight"] == 0.0 and ex["token_types"].sum() == 0


def test_bad_source_inputs():
    with pytest.raises(DataError, match="at least 2 documents"):
        _source([np.arange(100) % BASE])
    with pytest.raises(DataError, match="mask_prob"):
        _source(mask_prob=1.5)
    with pytest.raises(DataError, match="mlm.mask_token_frac=nan .* must be non-negative"):  # was accepted
        _source(mask_token_frac=float("nan"))
    with pytest.raises(DataError, match="seq_len=4"):
        mlm_data.MlmSource([np.arange(10)] * 2, 4, seed=0, base_size=BASE, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                           pad_id=PAD)
    # a validation split of one document: the error says it is the validation text, and what to change
    import inputs
    from data import pipeline
    from data.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    one_doc = pipeline.tokenize_stream(["just one validation document"], tok)
    with pytest.raises(DataError, match=r"^the validation text: NSP needs at least 2 documents.*data.val_fraction.*"
                                        r"data.split='tail'.*mlm.nsp=False"):
        inputs.mlm_eval_batches(tiny_config("unused", pretrain_mlm), tok, one_doc, 8)


def _encoder(**kw):
    cfg = ModelConfig(vocab_size=320, num_tokens=267, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      causal=False, type_vocab_size=2, dtype="float32", **kw)
    model = heads.MaskedLM(cfg, nsp=True)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))["params"])
    return model, params


def test_encoder_heads_see_the_future_and_token_types():
    model, params = _encoder()
    assert set(params) == {"backbone", "mlm_head", "nsp_head"} and "type_embed" in params["backbone"]
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 256)
    x = params["backbone"]["embed"]["embedding"][tokens]

    # jitted: one compile per program instead of one per op (eager)
    g = jax.jit(jax.grad(lambda x_in: model.apply({"params": params}, x_in, method=_mlm_from_embeddings)[0, 2].sum()))(x)
    assert float(jnp.abs(g[0, 3:]).sum()) > 0.0  # position 2 depends on later positions
    apply = jax.jit(model.apply)
    mlm, nsp = apply({"params": params}, tokens)
    types = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32)], axis=1)
    mlm_t, nsp_t = apply({"params": params}, tokens, None, None, types)
    assert mlm.shape == (1, 10, 320) and nsp.shape == (1, 2)
    assert not np.allclose(nsp, nsp_t)  # token types change the representation


@pytest.mark.parametrize("how", ["first", "boundary"])
def test_nsp_head_reads_cls_or_the_pair_boundary(how):
    """NSP logits are a function of the final state of <cls> (default) or, with nsp_pool='boundary',
    of the <sep> closing segment A (where a stdlib pair's signal is: does B's start continue A's end?)."""
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1], [0] * 8])
    np.testing.assert_array_equal(heads.pair_boundary_index(jnp.asarray(types)), [3, 1, 0])
    model, params = _encoder()
    model = model.clone(nsp_pool=how)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
    read = {"first": [0, 0], "boundary": [3, 1]}[how]

    def head_on(h_BxLxD, i_B):
        pooled_BxD = jnp.take_along_axis(h_BxLxD, jnp.asarray(i_B)[:, None, None], axis=1)[:, 0]
        return heads.PooledHead(2, model.cfg).apply({"params": params["nsp_head"]}, pooled_BxD)

    h = model.apply({"params": params}, tokens, None, None, jnp.asarray(types[:2]),
                    method=lambda m, *a: m.backbone.encode(a[0], a[1], a[2], True, a[3]))
    _, nsp = model.apply({"params": params}, tokens, None, None, jnp.asarray(types[:2]))
    np.testing.assert_allclose(nsp, head_on(h, read), rtol=1e-5, atol=1e-6)
    other = {"first": [3, 1], "boundary": [0, 0]}[how]
    assert not np.allclose(nsp, head_on(h, other), rtol=1e-3)  # the position read matters
    with pytest.raises(ValueError, match="nsp_pool='middle'"):
        model.clone(nsp_pool="middle").apply({"params": params}, tokens)


def _mlm_from_embeddings(self, x_BxLxD):
    """MaskedLM forward from token embeddings (the gradient test's input)."""
    bb = self.backbone
    b, length, _ = x_BxLxD.shape
    pos = jnp.broadcast_to(jnp.arange(length)[None, :], (b, length))
    seg = jnp.ones((b, length), jnp.int32)
    x = x_BxLxD + bb.type_embed(jnp.zeros((b, length), jnp.int32))
    for layer in bb.layers:
        x = layer(x, pos, seg, True)
    return self.mlm_head(bb.final_norm(x), bb)


def test_causal_model_unchanged_by_type_vocab_default():
    from model.transformer import Transformer
    cfg = ModelConfig(vocab_size=320, num_tokens=267, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert "type_embed" not in params


def test_mlm_training_learns(corpus_dir, tmp_path):
    config = tiny_config(corpus_dir, pretrain_mlm, train__steps=40, train__log_every=5, train__eval_every=20,
                         optim__lr=3e-3)
    out = train.train_and_evaluate(config, str(tmp_path))
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    evals = [r for r in rows if "eval/mlm_loss" in r]
    assert rows[0]["train/mlm_loss"] > 5.0 and "train/nsp_loss" in rows[0]
    assert evals[-1]["eval/mlm_loss"] < rows[0]["train/mlm_loss"] - 1.0
    assert 0.0 <= out["eval/nsp_accuracy"] <= 1.0 and out["eval/mlm_accuracy"] > 0.02  # chance: 1/267
    assert out["step"] == 40


def test_mlm_needs_bidirectional_and_types(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="model.causal=False"):
        train.train_and_evaluate(tiny_config(corpus_dir, pretrain_mlm, model__causal=True), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="type_vocab_size >= 2"):
        train.train_and_evaluate(tiny_config(corpus_dir, pretrain_mlm, model__type_vocab_size=0), str(tmp_path / "b"))


def test_checkpoints_from_before_the_new_fields_still_resume():
    import json

    import checkpoint
    from configs import pretrain_causal
    current = json.loads(pretrain_causal.get_config("tiny").to_json())
    saved = json.loads(json.dumps(current))
    del saved["model"]["type_vocab_size"], saved["mlm"]
    assert checkpoint.config_differences(saved, current)[0] == []
    current["model"]["type_vocab_size"] = 2
    assert checkpoint.config_differences(saved, current)[0] == ["model.type_vocab_size: 0 -> 2"]


def test_nsp_pool_is_a_config_field():
    from configs import pretrain_mlm
    from model import build
    c = pretrain_mlm.get_config("tiny")
    assert build.masked_lm(c, 267).nsp_pool == "first"  # BERT's <cls>, the default
    c.mlm.nsp_pool = "boundary"
    assert build.masked_lm(c, 267).nsp_pool == "boundary"


def test_nsp_learns_where_the_pair_signal_is_global(tmp_path):
    """The same code (data, <cls> head, loss) learns NSP well above chance on an easy pair task: each
    document is mostly one letter, so a random negative's B (another document: mostly another letter) differs
    from A everywhere, not only at the cut.
    On the stdlib pairs NSP stays at chance (README: Why NSP stays at chance)."""
    rng = np.random.default_rng(0)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):  # 12 letters, 5 documents each: every letter also occurs in training documents
        letter = "abcdefghijkl"[i % 12]
        words = ["".join(rng.choice([letter] * 6 + list("xyz "), size=int(rng.integers(3, 8)))) for _ in range(100)]
        (docs / f"{i:02d}.txt").write_text(" ".join(words) + "\n")
    config = tiny_config(str(docs), pretrain_mlm, train__steps=400, train__log_every=100, train__eval_every=400,
                         train__eval_batches=8, train__checkpoint_every=400, data__batch_size=32, optim__lr=3e-3,
                         optim__warmup_steps=10, optim__schedule="constant")
    out = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert out["eval/nsp_accuracy"] >= 0.75, out  # chance 0.5; a negative can share its letter: ~0.9 at most

"""Classification fine-tuning: data encoding and labels, learning a separable task, warm start, bad input."""

import json
import logging
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import checkpoint
import objectives
import train
from configs import finetune_classify, pretrain_mlm
from data import classify as classify_data
from data.sources import DataError
from data.tokenizer import ByteTokenizer

ALPHABETS = {"low": "abcdefgh", "high": "qrstuvwx", "digit": "01234567"}


def _write_task(path, n, seed, pair=False, extra=()):
    """A separable 3-class task: each text is drawn from its label's alphabet."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = list(ALPHABETS)[i % 3]
            text = "".join(rng.choice(list(ALPHABETS[label]), size=int(rng.integers(5, 20))))
            rec = {"text": text, "label": label}
            if pair:
                rec["text_pair"] = "".join(rng.choice(list("abcdefghqrstuvwx01234567"), size=6))
            f.write(json.dumps(rec) + "\n")
        for line in extra:
            f.write(line + "\n")
    return str(path)


def _cfg(train_path, val_path, **kw):
    args = dict(train__steps=60, train__log_every=10, train__eval_every=30, optim__lr=3e-3, data__seq_len=32)
    args.update(kw)
    return tiny_config(train_path, finetune_classify, classify__val_path=val_path, **args)


def test_encoding_pairs_types_and_pooling():
    tok = ByteTokenizer()
    ex = classify_data.encode_example(tok, "hello", "abc", 16, "first")
    n = int(ex["segment_ids"].sum())
    assert n == 11 and ex["inputs"][0] == tok.special_id("<cls>")
    assert list(ex["token_types"][:n]) == [0] * 7 + [1] * 4
    long = classify_data.encode_example(tok, "x" * 50, "y" * 5, 16, "first")  # longest-first truncation
    assert int(long["segment_ids"].sum()) == 16 and list(long["inputs"][-6:-1]) == [ord("y")] * 5
    dec = classify_data.encode_example(tok, "hi", None, 8, "last")
    assert list(dec["inputs"][:3]) == [ord("h"), ord("i"), tok.eos_id] and dec["segment_ids"].sum() == 3


def test_labels_left_by_a_failed_start_do_not_block_the_next(tmp_path, caplog):
    """A start refused for its data (one label) leaves no labels.json that the corrected run trips on; and
    text a char vocabulary lacks (here a warm start's, or the train split's) is counted per split."""
    import task_inputs
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"text {i}", "label": "pos"}) + "\n" for i in range(8)))
    workdir = tmp_path / "run"
    workdir.mkdir()
    classify_data.save_labels(["pos"], str(workdir / "labels.json"))  # as an earlier version left it
    with pytest.raises(DataError, match="needs >= 2 labels"):
        task_inputs.classify_inputs(_cfg(str(one), ""), str(workdir), 8)
    good = _write_task(tmp_path / "train.jsonl", 48, 0)
    val = _write_task(tmp_path / "val.jsonl", 12, 1, extra=[json.dumps({"text": "ZZZ", "label": "low"})])
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        out = task_inputs.classify_inputs(_cfg(good, val, data__tokenizer="char"), str(workdir), 8)
    assert out.num_classes == 3 and classify_data.load_labels(str(workdir / "labels.json")) == ["digit", "high", "low"]
    assert re.search(r"classify: 3 of \d+ validation tokens", caplog.text) and "training tokens" not in caplog.text
    # once the workdir holds a checkpoint its labels.json is the head's: never rebuilt from data.path
    checkpoint.save_params(str(workdir), 1, {"w": np.zeros(2, np.float32)}, {"mode": "classify"})
    os.remove(workdir / "labels.json")
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="labels.json is missing"):
        task_inputs.classify_inputs(_cfg(good, val, data__tokenizer="char"), str(workdir), 8)
    assert not (workdir / "labels.json").exists()


def test_a_label_only_the_held_out_share_has_is_explained(tmp_path):
    """Without classify.val_path a hash share of data.path is validation: a label that only a held-out record
    has is refused saying so (the user gave one file; 'unknown label' alone did not explain it)."""
    import task_inputs
    from data import pipeline
    rare = next(f"rare text {i}" for i in range(1000) if pipeline.hash_unit(f"rare text {i}") < 0.2)
    path = _write_task(tmp_path / "train.jsonl", 60, 0, extra=[json.dumps({"text": rare, "label": "rare"})])
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(DataError, match=r"unknown label 'rare'.*held out of data.path for validation "
                                        r"\(data.val_fraction=0.2\).*classify.val_path"):
        task_inputs.classify_inputs(_cfg(path, ""), str(workdir), 8)


def test_labels_sorted_and_macro_f1():
    recs = [("f:1", {"label": "b"}), ("f:2", {"label": 2}), ("f:3", {"label": "a"}), ("f:4", {"label": 10})]
    assert classify_data.build_labels(recs) == [2, 10, "a", "b"]
    # class 0: tp 1, pred 2, act 1 -> 2/3; class 1: tp 0, pred 0, act 1 -> 0; class 2 absent
    assert objectives.macro_f1([1, 0, 0], [2, 0, 0], [1, 1, 0]) == pytest.approx((2 / 3 + 0) / 2)


def test_learns_separable_task(tmp_path):
    tr = _write_task(tmp_path / "train.jsonl", 240, 0, pair=True)
    va = _write_task(tmp_path / "val.jsonl", 60, 1, pair=True)
    out = train.train_and_evaluate(_cfg(tr, va), str(tmp_path / "run"))
    assert out["eval/accuracy"] >= 0.95 and out["eval/macro_f1"] >= 0.95, out
    assert json.load(open(tmp_path / "run" / "labels.json"))["labels"] == ["digit", "high", "low"]


def test_records_with_their_own_field_names(tmp_path):
    """classify.text_field / text_pair_field / label_field read data that names its fields otherwise (GLUE's
    MNLI: premise, hypothesis, label; SST-2: sentence); a record lacking one is named by the data's name."""
    import task_inputs
    ours = [json.loads(line) for line in open(_write_task(tmp_path / "ours.jsonl", 30, 0, pair=True))]
    theirs = [{"premise": r["text"], "hypothesis": r["text_pair"], "gold": r["label"], "idx": i}
              for i, r in enumerate(ours)]
    path = tmp_path / "mnli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in theirs))
    cfg = _cfg(str(path), str(path), classify__text_field="premise", classify__text_pair_field="hypothesis",
               classify__label_field="gold")
    train_recs, _, val_recs, _ = task_inputs.train_val_records(cfg, cfg.classify, "classification")
    assert [(r["text"], r["text_pair"], r["label"]) for _, r in train_recs] == \
        [(r["text"], r["text_pair"], r["label"]) for r in ours] and len(val_recs) == 30
    single = _cfg(str(path), str(path), classify__text_field="premise", classify__label_field="gold")
    assert "text_pair" not in task_inputs.train_val_records(single, single.classify, "classification")[0][0][1]
    path.write_text("".join(json.dumps(r) + "\n" for r in theirs[:3] + [{"sentence": "x", "gold": "low"}]))
    with pytest.raises(DataError, match=r"mnli\.jsonl:4: missing field: no 'premise' \(read as 'text'\)"):
        task_inputs.train_val_records(cfg, cfg.classify, "classification")


def test_label_minus_one_is_unlabelled(tmp_path, caplog):
    """Hugging Face's label -1 ("no label": SNLI's unlabelled pairs, every GLUE test split) is left out and
    counted, not trained as a class of its own; a split of nothing else is refused saying so; the option
    keeps -1 as a class (sentiment -1 / 0 / 1); a run that trained it as a class is named on resume."""
    import task_inputs
    rows = [{"premise": f"p {i}", "hypothesis": f"h {i}", "label": [0, 1, 2, -1][i % 4]} for i in range(40)]
    path = tmp_path / "snli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(dict(r, label=-1)) + "\n" for r in rows[:5]))
    names = dict(classify__text_field="premise", classify__text_pair_field="hypothesis")
    workdir = tmp_path / "run"
    workdir.mkdir()
    with caplog.at_level(logging.WARNING, logger="lmstack"):
        out = task_inputs.classify_inputs(_cfg(str(path), str(path), **names), str(workdir), 8)
    assert out.num_classes == 3 and classify_data.load_labels(str(workdir / "labels.json")) == [0, 1, 2]
    assert "10 training records labelled -1 left out as unlabelled" in caplog.text
    assert "10 validation records not scored: {'unlabelled (label -1)': 10}" in caplog.text
    with pytest.raises(DataError, match=r"test\.jsonl': every record has label -1.*minus_one_unlabelled=False"):
        task_inputs.classify_inputs(_cfg(str(path), str(test), **names), str(workdir), 8)
    tsv = tmp_path / "snli.tsv"  # the same as a TSV (every value a string): "-1" is no label there too
    tsv.write_text("premise\thypothesis\tlabel\n" + "".join(f"{r['premise']}\t{r['hypothesis']}\t{r['label']}\n"
                                                            for r in rows))
    cfg = _cfg(str(tsv), str(tsv), **names)
    train_recs, stats, _, _ = task_inputs.train_val_records(cfg, cfg.classify, "classification")
    assert classify_data.build_labels(train_recs) == ["0", "1", "2"] and stats.skipped == {"unlabelled (label -1)": 10}
    keep = _cfg(str(path), str(path), classify__minus_one_unlabelled=False, **names)
    train_recs, stats, _, _ = task_inputs.train_val_records(keep, keep.classify, "classification")
    assert classify_data.build_labels(train_recs) == [-1, 0, 1, 2] and not stats.skipped
    checkpoint.save_params(str(workdir), 1, {"w": np.zeros(2, np.float32)}, {"mode": "classify"})
    classify_data.save_labels([-1, 0, 1, 2], str(workdir / "labels.json"))  # a run started with -1 as a class
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"holds labels \[-1, 0, 1, 2\] but the "
                       r"training split has \[0, 1, 2\]; label -1 is now left out.*minus_one_unlabelled=False"):
        task_inputs.classify_inputs(_cfg(str(path), str(path), **names), str(workdir), 8)


def test_bad_inputs_named_or_counted(tmp_path, caplog):
    tr = _write_task(tmp_path / "train.jsonl", 48, 0, extra=['{"text": "abc"}'])
    va = _write_task(tmp_path / "val.jsonl", 24, 1, extra=['{"text": "abc", "label": "nope"}'])
    with pytest.raises(DataError, match=r"train.jsonl:49: missing field: no 'label'"):
        train.train_and_evaluate(_cfg(tr, va, train__steps=3), str(tmp_path / "a"))
    tr_ok = _write_task(tmp_path / "train_ok.jsonl", 48, 0)
    with pytest.raises(DataError, match=r"val.jsonl:25: unknown label 'nope'"):
        train.train_and_evaluate(_cfg(tr_ok, va, train__steps=3), str(tmp_path / "b"))
    with caplog.at_level(logging.INFO, logger="lmstack"):
        out = train.train_and_evaluate(_cfg(tr, va, train__steps=3, classify__strict=False), str(tmp_path / "c"))
    assert out["step"] == 3
    text = caplog.text
    assert "skipped: 1 classification: missing field" in text and "'unknown label': 1" in text
    # a warning (what scripts/evaluate.py prints): the scores leave that record out
    assert any(r.levelname == "WARNING" and "1 validation records not scored" in r.getMessage() for r in caplog.records)


def test_a_label_of_another_type_than_training_s_is_explained():
    """1 against a CSV's '1': different classes by design, and the error says why (the value's text matches)."""
    from data.sources import ReadStats
    records = [("val.jsonl:1", {"text": "abc", "label": 1})]
    with pytest.raises(DataError, match=r"val.jsonl:1: unknown label 1 \(training labels: \['0', '1'\]\): the "
                                        r"training data's label '1' is a str, this one a int \(a CSV"):
        classify_data.make_source(records, ByteTokenizer(), ["0", "1"], 16, "first", strict=True, stats=ReadStats())
    with pytest.raises(DataError, match=r"unknown label 7 \(training labels: \['0', '1'\]\)$"):
        classify_data.make_source([("val.jsonl:1", {"text": "abc", "label": 7})], ByteTokenizer(), ["0", "1"], 16,
                                  "first", strict=True, stats=ReadStats())


def test_a_causal_warm_start_zeroes_the_new_token_type_table(tmp_path):
    """A causal LM under a sentence-pair classifier: the token-type table it lacks starts at zero (a random one
    was added to every embedding, and under freeze_backbone stayed as fixed noise)."""
    import optax
    import sharding
    import steps
    import warmstart
    from model import build
    src_cfg = tiny_config("unused", model__n_layers=1)
    source = build.transformer(src_cfg, ByteTokenizer().vocab_size)
    src_params = nn.meta.unbox(jax.device_get(source.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]))
    checkpoint.save_params(str(tmp_path / "src"), 1, src_params, json.loads(src_cfg.to_json()))
    cfg = _cfg("unused", "", model__causal=True, model__n_layers=1, classify__freeze_backbone=True)
    model = build.classifier(cfg, ByteTokenizer().vocab_size, 3)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.sharding)
    state, state_sh = steps.init_state(model, optax.sgd(0.1), mesh, rules, 0, 8)
    assert float(jnp.abs(state.params["backbone"]["type_embed"]["embedding"]).max()) > 0  # its fresh init
    params = warmstart.warm_start_params(state.params, state_sh.params, str(tmp_path / "src"))
    assert not np.asarray(params["backbone"]["type_embed"]["embedding"]).any()
    np.testing.assert_array_equal(params["backbone"]["embed"]["embedding"], src_params["embed"]["embedding"])


def test_warm_start_from_mlm_and_freeze(corpus_dir, tmp_path):
    mlm_dir = str(tmp_path / "mlm")
    one = dict(model__n_layers=1)  # every run one layer: loading/freezing is per parameter, not per depth
    train.train_and_evaluate(tiny_config(corpus_dir, pretrain_mlm, train__steps=3, **one), mlm_dir)
    _, mlm_params, _ = checkpoint.load_for_inference(mlm_dir)
    tr = _write_task(tmp_path / "train.jsonl", 96, 0)
    va = _write_task(tmp_path / "val.jsonl", 24, 1)
    run = str(tmp_path / "cls")
    train.train_and_evaluate(_cfg(tr, va, train__steps=4, init_from=mlm_dir, classify__freeze_backbone=True, **one),
                             run)
    _, cls_params, step = checkpoint.load_for_inference(run)
    assert step == 4 and set(cls_params) == {"backbone", "cls_head"}
    import jax
    for a, b in zip(jax.tree.leaves(mlm_params["backbone"]), jax.tree.leaves(cls_params["backbone"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # loaded, then frozen
    assert open(os.path.join(run, "tokenizer.json")).read() == open(os.path.join(mlm_dir, "tokenizer.json")).read()
    # unfrozen: the backbone moves away from the checkpoint
    run2 = str(tmp_path / "cls2")
    train.train_and_evaluate(_cfg(tr, va, train__steps=3, init_from=mlm_dir, **one), run2)
    _, p2, _ = checkpoint.load_for_inference(run2)
    assert not np.array_equal(np.asarray(p2["backbone"]["embed"]["embedding"]),
                              np.asarray(mlm_params["backbone"]["embed"]["embedding"]))
    # mismatched shapes: an error naming the parameters
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"embed/embedding: checkpoint \(320, 32\)"):
        train.train_and_evaluate(_cfg(tr, va, train__steps=3, init_from=mlm_dir, model__d_model=64, **one),
                                 str(tmp_path / "cls3"))


def test_decoder_classifier_warm_starts_from_a_causal_run(corpus_dir, tmp_path, caplog):
    causal_dir = str(tmp_path / "causal")
    train.train_and_evaluate(tiny_config(corpus_dir, train__steps=3), causal_dir)  # pretrain_causal:tiny
    tr = _write_task(tmp_path / "train.jsonl", 96, 0)
    va = _write_task(tmp_path / "val.jsonl", 24, 1)
    with caplog.at_level(logging.INFO, logger="lmstack"):
        out = train.train_and_evaluate(_cfg(tr, va, train__steps=3, init_from=causal_dir, model__causal=True,
                                            model__type_vocab_size=0), str(tmp_path / "cls"))
    assert out["step"] == 3 and 0.0 <= out["eval/accuracy"] <= 1.0
    assert "re-initialised: cls_head" in caplog.text and "unused: none" in caplog.text
    _, causal_params, _ = checkpoint.load_for_inference(causal_dir)
    assert "backbone" not in causal_params and "embed" in causal_params


def test_truncation_is_logged_per_split(tmp_path, caplog):
    """Records longer than data.seq_len are cut; the log says how many per split and how long they were."""
    tr = _write_task(tmp_path / "train.jsonl", 48, 0)  # texts of 5-19 characters: + <cls> <sep> = 7-21 tokens
    va = _write_task(tmp_path / "val.jsonl", 12, 1)
    lengths = {name: [len(json.loads(line)["text"]) + 2 for line in open(path)] for name, path in
               (("train", tr), ("validation", va))}
    with caplog.at_level(logging.INFO, logger="lmstack"):
        train.train_and_evaluate(_cfg(tr, va, train__steps=3, data__seq_len=16, model__n_layers=1),
                                 str(tmp_path / "run"))
    for name, ns in lengths.items():
        cut = [n for n in ns if n > 16]
        assert f"{name}: {len(cut)} of {len(ns)} records truncated to 16 tokens (median {int(np.median(cut))} " \
               f"tokens, max {max(cut)})" in caplog.text

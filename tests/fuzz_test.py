"""Fuzzing: random bytes, JSON lines and config values only ever raise the documented errors."""

import json
import os
import tempfile

import hypothesis.strategies as st
import ml_collections
from hypothesis import HealthCheck, given, settings

import optim
import sharding
from configs import common
from data import pipeline, sources, tokenizer as tokenizer_lib
from data.sources import DataError
from model.transformer import ModelConfig

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(files=st.lists(st.binary(max_size=300), min_size=1, max_size=4), ext=st.sampled_from([".txt", ".jsonl", ".py"]))
def test_random_bytes_files(files, ext):
    with tempfile.TemporaryDirectory() as d:
        for i, blob in enumerate(files):
            with open(os.path.join(d, f"f{i}{ext}"), "wb") as f:
                f.write(blob)
        try:
            docs, stats = sources.read_documents(d)
        except DataError as e:
            assert d in str(e)
            return
        assert stats.documents == len(docs) > 0
        tok = tokenizer_lib.ByteTokenizer()
        for doc in docs:
            assert tok.decode(tok.encode(doc.text)) == doc.text


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=8)


@FUZZ
@given(records=st.lists(st.one_of(json_values, st.fixed_dictionaries({"text": st.text()}), st.text()), max_size=12))
def test_random_json_lines(records):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write((json.dumps(r) if not isinstance(r, str) else r) + "\n")
        try:
            docs, stats = sources.read_documents(path)
        except DataError:
            return
        assert all(d.text.strip() for d in docs)
        assert stats.documents == len(docs)


@FUZZ
@given(texts=st.lists(st.text(min_size=1), min_size=1, max_size=20), frac=st.floats(-1, 2),
       mode=st.sampled_from(["hash", "tail", "bogus"]), seq_len=st.integers(1, 64), batch=st.integers(1, 16))
def test_random_split_and_packing(texts, frac, mode, seq_len, batch):
    try:
        train, val = pipeline.split_documents(texts, mode, frac)
        tok = tokenizer_lib.build_tokenizer("char", train)
        stream = pipeline.tokenize_stream(train, tok)
        it = pipeline.train_iterator(stream, seq_len=seq_len, global_batch=batch, seed=0)
        b = next(it)
    except DataError:
        return
    assert b["inputs"].shape == (batch, seq_len)
    assert ((b["weights"] == 0) | (b["weights"] == 1)).all()


@FUZZ
@given(d_model=st.integers(-4, 96), n_heads=st.integers(-2, 9), n_kv=st.integers(-2, 9),
       pos=st.sampled_from(["rope", "learned", "alibi"]), remat=st.sampled_from(["none", "full", "dots", "x"]),
       vocab=st.integers(0, 300))
def test_random_model_configs(d_model, n_heads, n_kv, pos, remat, vocab):
    try:
        ModelConfig(vocab_size=256, num_tokens=vocab, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, pos=pos,
                    remat=remat)
    except ValueError as e:
        assert str(e).startswith(("model.", "num_tokens"))


@FUZZ
@given(sizes=st.tuples(st.integers(-3, 9), st.integers(-3, 9), st.integers(-3, 9)))
def test_random_mesh_sizes(sizes):
    try:
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), sizes)))
    except ValueError as e:
        assert str(sizes[0]) in str(e) or "devices" in str(e)
        return
    assert mesh.devices.size == 8


@FUZZ
@given(schedule=st.sampled_from(["cosine", "linear", "constant", "wsd", "step"]), lr=st.floats(0, 1),
       warmup=st.integers(0, 50), total=st.integers(1, 50), accum=st.integers(-1, 4))
def test_random_optimizer_configs(schedule, lr, warmup, total, accum):
    o = common.base().optim
    o.schedule, o.lr, o.warmup_steps, o.grad_accum_steps = schedule, lr, warmup, accum
    try:
        optim.make_optimizer(ml_collections.ConfigDict(o), total)
    except ValueError as e:
        assert any(s in str(e) for s in ("optim.schedule", "optim.warmup_steps", "optim.grad_accum_steps"))

"""scripts/generate.py: sampling from a trained checkpoint produces the learned pattern."""

import os
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from conftest import tiny_config

import checkpoint
import train
from model import build
from data import tokenizer as tokenizer_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import generate  # noqa: E402


def test_greedy_sampling_continues_a_memorised_pattern(tmp_path):
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abcdefgh" * 400)
    config = tiny_config(str(corpus), data__tokenizer="char", data__split="tail", train__steps=60,
                         optim__lr=1e-2, train__eval_every=60, train__checkpoint_every=60)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    saved, params, step = checkpoint.load_for_inference(str(tmp_path / "run"))
    assert step == 60
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "run" / "tokenizer.json"))
    model = build.transformer(ml_collections.ConfigDict(saved), tok.vocab_size)
    out = generate.sample(model, params, tok.encode("cdef"), window=saved["data"]["seq_len"], max_new_tokens=40,
                          temperature=0.0, top_k=0, seed=0)
    assert tok.decode(out) == ("ghabcdef" * 5)
    # sampling with temperature is seeded: same seed, same text
    a = generate.sample(model, params, tok.encode("ab"), window=32, max_new_tokens=10, temperature=1.0, top_k=3, seed=1)
    b = generate.sample(model, params, tok.encode("ab"), window=32, max_new_tokens=10, temperature=1.0, top_k=3, seed=1)
    assert a == b and len(a) == 10 and np.all(np.asarray(a) < tok.vocab_size)


class _CountingLM(nn.Module):
    """A tiny LM that records every trace of its forward (Python side effects run only while tracing)."""
    vocab: int = 16

    @nn.compact
    def __call__(self, ids_BxL, positions_BxL=None, segment_ids_BxL=None):
        TRACES.append(ids_BxL.shape)
        return nn.Dense(self.vocab)(nn.Embed(self.vocab, 8)(ids_BxL))


TRACES = []


def test_samples_share_one_compiled_step():
    model = _CountingLM()
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    TRACES.clear()
    outs = [generate.sample(model, params, np.array([1, 2, 3]), window=8, max_new_tokens=4, temperature=1.0,
                            top_k=0, seed=seed) for seed in (0, 1)]
    assert len(TRACES) == 1, f"{len(TRACES)} traces for two samples"
    assert [len(o) for o in outs] == [4, 4]

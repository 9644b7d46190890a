"""task_eval: one evaluator serves different models (each its own compiled function); predictions agree with
the scores they explain."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import task_eval
from data import qa as qa_data, sft as sft_data
from data.tokenizer import ByteTokenizer
from model import decode, heads
from model.transformer import ModelConfig, Transformer

TOK = ByteTokenizer()


def _cfg(n_layers: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=320, num_tokens=TOK.vocab_size, d_model=32, n_layers=n_layers, n_heads=4,
                       n_kv_heads=2, d_ff=64, dtype="float32", init_std=0.5, **kw)


def _init(model, seed: int, *args):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), *args)["params"])


def _problems():
    records = [(f"f:{i}", {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}],
                           "kind": k}) for i, (q, k) in enumerate([("ab", "p"), ("cde", "q"), ("f", "p")])]
    return sft_data.generation_problems(records, TOK, 10)


def test_exact_match_compiles_per_model_and_scores_the_model_it_is_given():
    a, b = Transformer(_cfg(1)), Transformer(_cfg(2))  # different structure: A's function cannot run B
    params_a, params_b = _init(a, 0, jnp.zeros((1, 8), jnp.int32)), _init(b, 1, jnp.zeros((1, 8), jnp.int32))
    problems = _problems()
    answers_b = [text for text, _ in task_eval.answers_and_finishes(decode.Decoder(b, batch=4, cache_len=32),
                                                                    params_b, problems, TOK, width=32,
                                                                    max_new_tokens=4)]
    as_b = [dataclasses.replace(p, reference=ans) for p, ans in zip(problems, answers_b)]  # B is always right
    shared = task_eval.exact_match_eval(as_b, TOK, width=32, max_new_tokens=4, batch_size=4)
    shared(a, params_a)  # the first model compiles its function ...
    out = shared(b, params_b)  # ... the second gets its own
    cut = out.pop("eval/exact_match_cut")
    assert out == {"eval/exact_match": 1.0, "eval/exact_match/p": 1.0, "eval/exact_match/q": 1.0}
    rows = shared.predictions(b, params_b)
    assert cut == np.mean([r["finish"] == "length" for r in rows])  # answers max_new_tokens cut, as predictions say
    assert [r["prediction"] for r in rows] == answers_b and all(r["correct"] for r in rows)
    assert rows[0]["prompt"] == [{"role": "user", "content": "ab"}] and [r["kind"] for r in rows] == ["p", "q", "p"]
    assert shared.coverage() == {"exact_match_scored": 3, "exact_match_of": 3, "exact_match_unit": "problems",
                                 "exact_match_prompts_cut": 0, "exact_match_check": "exact"}
    # a context that cannot hold a prompt whole: it is answered from its tail, and counted
    lengths = [len(p.prompt) for p in problems]
    narrow = task_eval.exact_match_eval(problems, TOK, width=max(lengths), max_new_tokens=4, batch_size=4)
    assert narrow.coverage()["exact_match_prompts_cut"] == lengths.count(max(lengths))


def _qa_features():
    ctx = "the cat sat on the mat while the dog slept"
    examples = [qa_data.QAExample(str(i), q, ctx, ((ans, ctx.index(ans)),))
                for i, (q, ans) in enumerate([("who sat?", "cat"), ("who slept?", "dog"), ("where?", "mat")])]
    return qa_data.make_features(examples, TOK, seq_len=32, max_query_len=8, doc_stride=4)


def test_span_qa_compiles_per_model_and_predictions_explain_the_scores():
    features = _qa_features()
    a, b = heads.SpanQA(_cfg(1, causal=False)), heads.SpanQA(_cfg(2, causal=False))
    batch = features[0]
    args = [jnp.asarray(batch[k])[None] for k in ("inputs", "positions", "segment_ids", "token_types")]
    params_a, params_b = _init(a, 0, *args), _init(b, 1, *args)
    shared = task_eval.span_qa_eval(features, 4, max_answer_len=5)
    shared(a, params_a)
    got = shared(b, params_b)
    want = task_eval.span_qa_eval(features, 4, max_answer_len=5)(b, params_b)
    assert got == want
    rows = shared.predictions(b, params_b)
    assert [r["id"] for r in rows] == ["0", "1", "2"] and rows[1]["answers"] == ["dog"]
    assert 100 * np.mean([r["exact_match"] for r in rows]) == pytest.approx(got["eval/exact_match"])
    assert 100 * np.mean([r["f1"] for r in rows]) == pytest.approx(got["eval/f1"])
    assert shared.coverage()["exact_match_scored"] == 3


def test_per_model_keys_by_module_fields():
    built = []
    get = task_eval.per_model(lambda m: built.append(m) or len(built))
    assert get(Transformer(_cfg(1))) == get(Transformer(_cfg(1))) == 1  # equal modules: one function
    assert get(Transformer(_cfg(2))) == 2 and len(built) == 2

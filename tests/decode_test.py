"""model/decode + model/sampling: the KV-cache decoder gives the full forward pass's distributions, samples
exactly the support it should, is seeded per request, stops where told, and is the same on a mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import decode, kv_decode, lora, sampling
from model.sampling import Sampling
from model.transformer import ModelConfig, Transformer

V = 64


def _model(**kw):
    fields = dict(vocab_size=V, num_tokens=60, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  init_std=0.3)
    return Transformer(ModelConfig(**{**fields, **kw}))


def _params(model, seed=0):
    return nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


PROMPTS = [np.array([5, 9, 3]), np.array([7]), np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), np.array([40, 2])]


def _check_against_full_forward(model, params, outs, prompts, tol, apply=None, length=64):
    """Every returned log-prob (and the full top-V distribution) equals log_softmax of a full forward
    over prompt + completion at that position; greedy tokens are its argmax."""
    forward = jax.jit(apply or (lambda ids: model.apply({"params": params}, ids)))
    for p, o in zip(prompts, outs):
        ids = np.concatenate([p, o.tokens]).astype(np.int32)
        padded = np.zeros((1, length), np.int32)  # one compiled forward; causal: the padding changes nothing before it
        padded[0, :len(ids)] = ids
        logp_LxV = np.asarray(jax.nn.log_softmax(forward(jnp.asarray(padded))[0], axis=-1))
        rows = logp_LxV[len(p) - 1: len(p) - 1 + len(o.tokens)]
        np.testing.assert_allclose(o.logprobs, rows[np.arange(len(o.tokens)), o.tokens], atol=tol, rtol=0)
        if o.top_logprobs is not None:
            for row, top in zip(rows, o.top_logprobs):
                ids_k = [i for i, _ in top]
                np.testing.assert_allclose([lp for _, lp in top], row[ids_k], atol=tol, rtol=0)


@pytest.mark.parametrize("variant", [
    dict(n_kv_heads=4, pos="learned", max_len=64, norm="layer", mlp="gelu", use_bias=True,
         tie_embeddings=False),  # MHA, GPT-2 style
    dict(n_kv_heads=2, scan_layers=True),  # GQA, RoPE, layers under nn.scan
    dict(n_kv_heads=1, dtype="float32"),  # MQA, float32 matmuls
])
def test_cached_decoding_gives_the_full_forward_distribution(variant):
    model = _model(**variant)
    params = _params(model)
    dec = decode.Decoder(model, batch=4, cache_len=32, n_top=V)
    outs = dec.generate(params, PROMPTS, max_new_tokens=12, sampling=sampling.GREEDY)
    tol = 3e-5 if variant.get("dtype") == "float32" else 2e-3  # f32: other kernels, other summation order
    for p, o in zip(PROMPTS, outs):
        assert len(o.tokens) == 12 and o.finish_reason == "length" and o.prompt_tokens == len(p)
        # greedy: each token is the argmax of the top-V list, i.e. of the full forward's row (checked below)
        assert o.tokens == [top[0][0] for top in o.top_logprobs]
    _check_against_full_forward(model, params, outs, PROMPTS, tol)


def test_sampled_log_probs_are_the_forward_log_softmax_at_the_chosen_tokens():
    model = _model()
    params = _params(model)
    dec = decode.Decoder(model, batch=4, cache_len=40)
    outs = dec.generate(params, PROMPTS, max_new_tokens=20, sampling=Sampling(temperature=1.3, top_p=0.9),
                        seeds=[3, 4, 5, 6])
    _check_against_full_forward(model, params, outs, PROMPTS, 2e-3)


def test_lora_adapters_are_decoded_unmerged_as_the_training_forward_applies_them():
    inner = _model()
    model = lora.LoraModel(inner, rank=4, alpha=8.0, targets=("attn/query", "attn/value", "mlp/up"), new_rows=4)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params["lora"] = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), params["lora"])
    dec = decode.Decoder(model, batch=2, cache_len=24, n_top=8)
    outs = dec.generate(params, PROMPTS[:2], max_new_tokens=8, sampling=sampling.GREEDY)
    _check_against_full_forward(model, params, outs, PROMPTS[:2], 2e-3,
                                apply=lambda ids: model.apply({"params": params}, ids))
    plain = decode.Decoder(inner, batch=2, cache_len=24).generate(_params(inner), PROMPTS[:2], max_new_tokens=8,
                                                                  sampling=sampling.GREEDY)
    assert [o.tokens for o in outs] != [o.tokens for o in plain]  # the adapters do change the text


def test_equal_decoders_share_their_compiled_programs_and_different_ones_do_not():
    """A second decoder of equal settings (another module object, equal config) reuses the first one's
    traced programs: it generates the same tokens without tracing anything again. Any difference the
    programs depend on (config, n_top, the int8 cache, logical rules) gets programs of its own."""
    model = _model(n_layers=1)
    params = _params(model)
    a = decode.Decoder(model, batch=2, cache_len=24)
    first = a.generate(params, PROMPTS[:2], max_new_tokens=6, sampling=sampling.GREEDY)
    traced = (a._prefill_rows._cache_size(), {k: f._cache_size() for k, f in a._steps.items()})
    b = decode.Decoder(_model(n_layers=1), batch=2, cache_len=24)
    assert b._prefill_rows is a._prefill_rows and b._steps is a._steps
    again = b.generate(params, PROMPTS[:2], max_new_tokens=6, sampling=sampling.GREEDY)
    assert [o.tokens for o in again] == [o.tokens for o in first]
    assert (b._prefill_rows._cache_size(), {k: f._cache_size() for k, f in b._steps.items()}) == traced
    for other in (decode.Decoder(_model(n_layers=1, norm="layer"), batch=2, cache_len=24),
                  decode.Decoder(model, batch=2, cache_len=24, n_top=3),
                  decode.Decoder(model, batch=2, cache_len=24, kv_int8=True),
                  decode.Decoder(model, batch=2, cache_len=32),
                  decode.Decoder(model, batch=2, cache_len=24, mesh=jax.make_mesh((1,), ("data",)),
                                 rules=(("batch", "data"),))):
        assert other._prefill_rows is not a._prefill_rows and other._steps is not a._steps


def _probs_support(probs, **kw):
    logits_1xV = jnp.log(jnp.asarray([probs], jnp.float32))
    rows = jax.tree.map(jnp.asarray, sampling.stack([Sampling(**kw)]))
    return [i for i, keep in enumerate(np.asarray(sampling.support(logits_1xV, rows))[0]) if keep]


def test_top_k_top_p_min_p_keep_exactly_their_support():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]  # ranks: 1, 3, 4, 0, 2
    assert _probs_support(probs) == [0, 1, 2, 3, 4]
    assert _probs_support(probs, top_k=2) == [1, 3]
    assert _probs_support(probs, top_p=0.5) == [1, 3]  # mass before token 3 is 0.4 < 0.5; before 4: 0.7
    assert _probs_support(probs, top_p=0.7) == [1, 3]  # 0.7 is not < 0.7
    assert _probs_support(probs, top_p=0.71) == [1, 3, 4]
    assert _probs_support(probs, top_p=0.01) == [1]  # the most likely token always stays
    assert _probs_support(probs, min_p=0.3) == [1, 3, 4]  # p >= 0.3 x 0.4 = 0.12
    assert _probs_support(probs, min_p=1.0) == [1]
    # top-p acts on the top-k distribution renormalised: 0.4/0.7 = 0.571 of the mass comes first
    assert _probs_support(probs, top_k=2, top_p=0.55) == [1]
    assert _probs_support(probs, top_k=2, top_p=0.58) == [1, 3]
    # temperature reshapes the distribution top-p sees: at T=0.5 token 1 holds 0.16/0.285 = 0.561 of the mass
    assert _probs_support(probs, top_p=0.55, temperature=0.5) == [1]
    assert _probs_support(probs, top_p=0.57, temperature=0.5) == [1, 3]


def test_draws_follow_the_renormalised_support():
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15], np.float32)
    n = 4000
    logits = jnp.log(jnp.tile(jnp.asarray(probs)[None], (n, 1)))
    rows = jax.tree.map(jnp.asarray, sampling.stack([Sampling(top_k=3)] * n))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
    zero = jnp.zeros((n, 5), jnp.int32)
    drawn = np.asarray(sampling.choose(logits, rows, keys, zero, zero > 0))
    freq = np.bincount(drawn, minlength=5) / n
    assert freq[0] == 0 and freq[2] == 0  # outside the top 3
    np.testing.assert_allclose(freq[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)


def test_penalties_change_only_the_tokens_they_name():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 1.0]])
    counts = jnp.asarray([[0, 2, 0, 1]], jnp.int32)  # output: token 1 twice, token 3 once
    prompt = jnp.asarray([[True, False, False, False]])
    rows = jax.tree.map(jnp.asarray, sampling.stack([Sampling(repetition_penalty=2.0, presence_penalty=0.5,
                                                              frequency_penalty=0.25)]))
    got = np.asarray(sampling.penalize(logits, rows, counts, prompt))[0]
    np.testing.assert_allclose(got, [1.0, -2.0 - 0.5 - 0.5, 0.5, 0.5 - 0.5 - 0.25])


def test_a_seed_gives_the_same_text_in_any_batch_and_other_seeds_differ():
    model = _model()
    params = _params(model)
    s = Sampling(temperature=1.0)
    dec4 = decode.Decoder(model, batch=4, cache_len=32)
    alone = decode.Decoder(model, batch=1, cache_len=32).generate(params, [PROMPTS[0]], max_new_tokens=16,
                                                                  sampling=s, seeds=[7])[0]
    batch = dec4.generate(params, [PROMPTS[2], PROMPTS[1], PROMPTS[0]], max_new_tokens=16, sampling=s,
                          seeds=[1, 2, 7])
    assert batch[2].tokens == alone.tokens  # same prompt and seed, third row of another batch
    again = dec4.generate(params, [PROMPTS[0]] * 4, max_new_tokens=16, sampling=s, seeds=[7, 8, 9, 10])
    assert again[0].tokens == alone.tokens
    assert len({tuple(o.tokens) for o in again}) == 4  # other seeds, other texts


@pytest.mark.parametrize("scan", [False, True])
def test_only_busy_slots_are_computed_and_they_decode_as_in_a_full_batch(scan):
    model = _model(scan_layers=scan)
    params = _params(model)
    s = Sampling(temperature=1.0)
    full = decode.Decoder(model, batch=3, cache_len=32).generate(params, PROMPTS[:3], max_new_tokens=10, sampling=s,
                                                                 seeds=[1, 2, 3])
    dec = decode.Decoder(model, batch=8, cache_len=32)
    dec._steps = {}  # a loop table of its own (not the one equal decoders share): the loops this test runs
    dparams = dec.prepare(params)
    state, *_ = dec.prefill(dparams, dec.empty(dparams), [PROMPTS[3]], [0], [sampling.GREEDY], [0], [1], [()])
    axis = kv_decode.batch_axis(dec.dec_model)
    row0 = lambda st: [np.take(np.asarray(c), 0, axis=axis) for c in jax.tree.leaves(st.cache)]  # noqa: E731
    finished = row0(state)  # slot 0 holds a finished request: nothing may touch it
    slots = [2, 5, 7]
    state, token, logp, _, _ = dec.prefill(dparams, state, PROMPTS[:3], slots, [s] * 3, [1, 2, 3], [10] * 3,
                                           [()] * 3)
    got = {j: ([int(token[i])], [float(logp[i])]) for i, j in enumerate(slots)}
    while not np.all(np.asarray(state.finish_B)[slots] > 0):
        state, tokens, logps, _ = dec.steps(dparams, state, 10, 4)
        for j in slots:
            keep = tokens[j] >= 0
            got[j][0].extend(tokens[j][keep].tolist())
            got[j][1].extend(logps[j][keep].tolist())
    assert {k for _, _, k in dec._steps} == {4}  # 3 busy slots of 8: a 4-row loop, never the full batch
    assert [got[j][0] for j in slots] == [o.tokens for o in full]
    np.testing.assert_allclose([got[j][1] for j in slots], [o.logprobs for o in full], atol=1e-5)
    for a, b in zip(finished, row0(state)):
        np.testing.assert_array_equal(a, b)


def test_prepared_weights_are_reused_only_for_the_same_arrays():
    model = _model()
    params = _params(model)
    dec = decode.Decoder(model, batch=1, cache_len=16)
    first = dec.prepare(params)
    assert dec.prepare(params) is first  # the same arrays: cast once
    assert dec.prepare(jax.tree.map(lambda x: x, params)) is first  # a new tree of the same arrays
    other = jax.tree.map(lambda x: x + 1, params)
    assert dec.prepare(other) is not first
    host = jax.tree.map(np.array, params)  # numpy leaves may change in place: never reused
    assert dec.prepare(host) is not dec.prepare(host)


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [1, 2]])
def test_the_cache_holds_the_window_its_rows_need_and_decodes_as_the_full_forward(slots):
    """The state's cache grows with its rows (64 -> 128 -> 160 slots) and, for a full batch, shrinks
    back when new short rows start; a few busy rows (a sub-batch) only ever grow it. Every token's
    log-prob stays the full forward's."""
    model = _model()
    params = _params(model)
    dec = decode.Decoder(model, batch=4, cache_len=160, chunk=8)
    dparams = dec.prepare(params)
    state = dec.empty(dparams)
    assert kv_decode.cache_extent(dec.dec_model, state) == 64
    extents = []
    for prompts, max_new in (([PROMPTS[0], PROMPTS[2]] * 2, 140), ([PROMPTS[1], PROMPTS[3]] * 2, 20)):
        prompts = prompts[:len(slots)]
        state, token, logp, _, _ = dec.prefill(dparams, state, prompts, slots, [sampling.GREEDY] * len(slots),
                                               [0] * len(slots), [max_new] * len(slots), [()] * len(slots))
        got = [([int(token[i])], [float(logp[i])]) for i in range(len(slots))]
        while not np.all(np.asarray(state.finish_B)[slots] > 0):
            state, tokens, logps, _ = dec.steps(dparams, state, max_new, 8)
            extents.append(kv_decode.cache_extent(dec.dec_model, state))
            for (toks, lps), j in zip(got, slots):
                keep = tokens[j] >= 0
                toks.extend(tokens[j][keep].tolist())
                lps.extend(logps[j][keep].tolist())
        outs = [decode.Completion(toks, lps, "length", len(p)) for (toks, lps), p in zip(got, prompts)]
        assert all(len(o.tokens) == max_new for o in outs)
        _check_against_full_forward(model, params, outs, prompts, 2e-3, length=160)
    grown = extents[:extents.index(160) + 1]
    assert sorted(set(grown)) == [64, 128, 160] and grown == sorted(grown)
    if len(slots) == dec.batch:  # the short rows that follow run in a cache cut back to 64 slots
        assert extents[-1] == 64
    else:
        assert extents[-1] == 160 and extents == sorted(extents)


def test_warm_up_compiles_every_loop_and_prefill_a_server_needs_and_changes_no_slot():
    model = _model()
    params = _params(model)
    dec = decode.Decoder(model, batch=4, cache_len=32, chunk=2)
    dparams = dec.prepare(params)
    state = dec.warm_up(dparams, dec.empty(dparams), prompt_lengths=range(1, 32))
    # the loops (shared with equal decoders made earlier in this process, which may have compiled others)
    assert set(dec.loop_variants()) == {(2, 32, k) for k in (1, 2, 4)} and set(dec.loop_variants()) <= set(dec._steps)
    loops = set(dec._steps)
    assert np.all(np.asarray(state.done_B)) and not np.any(np.asarray(state.generated_B))
    assert all(not np.any(np.asarray(c)) for c in jax.tree.leaves(state.cache))  # no slot written
    jits = (dec._prefill_rows, dec._insert, dec._resize)
    compiled = [f._cache_size() for f in jits]
    state, *_ = dec.prefill(dparams, state, [PROMPTS[2]], [1], [sampling.GREEDY], [0], [6], [()])
    while not np.asarray(state.finish_B)[1]:
        state, *_ = dec.steps(dparams, state, 6, 2)
    assert [f._cache_size() for f in jits] == compiled and set(dec._steps) == loops  # nothing new compiled
    with pytest.raises(ValueError, match="without running rows .* this one has 1"):  # it may cut their cache
        dec.warm_up(dparams, dec.prefill(dparams, state, [PROMPTS[2]], [2], [sampling.GREEDY], [0], [6], [()])[0])


def test_alternatives_are_computed_only_when_wanted_and_change_nothing_else():
    model = _model()
    params = _params(model)
    dec = decode.Decoder(model, batch=2, cache_len=32, n_top=5)
    dparams = dec.prepare(params)
    runs = {}
    for want in (True, False):
        state, *_ = dec.prefill(dparams, dec.empty(dparams), PROMPTS[:2], [0, 1], [Sampling(temperature=1.0)] * 2,
                                [3, 4], [9, 9], [()] * 2)
        runs[want] = dec.steps(dparams, state, 8, 8, want_top=want)[1:]
    (tok_a, lp_a, top_a), (tok_b, lp_b, top_b) = runs[True], runs[False]
    np.testing.assert_array_equal(tok_a, tok_b)
    np.testing.assert_array_equal(lp_a, lp_b)
    assert np.all(top_a[0] < 0) and np.all(top_b[0] == 0) and np.all(top_b[1] == 0)


def test_stop_ids_and_stop_strings_end_a_row_exactly():
    model = _model()
    params = _params(model)
    dec = decode.Decoder(model, batch=2, cache_len=40, chunk=4)
    text = lambda ids: "".join(chr(65 + i) for i in ids)  # noqa: E731  one character per token
    free = dec.generate(params, PROMPTS[:2], max_new_tokens=20, sampling=sampling.GREEDY, detokenize=text)
    stop_id = free[0].tokens[5]
    first = free[0].tokens.index(stop_id)
    by_id = dec.generate(params, PROMPTS[:1], max_new_tokens=20, sampling=sampling.GREEDY, stop_ids=[stop_id])[0]
    assert by_id.tokens == free[0].tokens[:first + 1] and by_id.finish_reason == "stop"
    assert free[0].finish_reason == "length"
    # a stop string spanning two tokens: the text stops just before it, the tokens end with the one completing it
    s = text(free[1].tokens[6:8])
    at = free[1].text.index(s)
    cut = dec.generate(params, PROMPTS[1:2], max_new_tokens=20, sampling=sampling.GREEDY, stop_strings=["@@", s],
                       detokenize=text)[0]
    assert cut.text == free[1].text[:at] and cut.finish_reason == "stop"
    assert cut.tokens == free[1].tokens[:at + 2] and len(cut.logprobs) == len(cut.tokens)
    streamed = []
    dec.generate(params, PROMPTS[1:2], max_new_tokens=20, sampling=sampling.GREEDY, stop_strings=[s],
                 detokenize=text, on_tokens=lambda i, ids: streamed.extend(ids))
    assert streamed[:len(cut.tokens)] == cut.tokens


def test_a_full_cache_ends_the_row_with_length():
    model = _model()
    dec = decode.Decoder(model, batch=2, cache_len=16)
    outs = dec.generate(_params(model), [PROMPTS[2], PROMPTS[0]], max_new_tokens=50, sampling=sampling.GREEDY)
    assert [len(o.tokens) for o in outs] == [16 - 11 + 1, 16 - 3 + 1]  # the last token is never fed back
    assert all(o.finish_reason == "length" for o in outs)


def test_bad_requests_are_named():
    model = _model()
    dec = decode.Decoder(model, batch=1, cache_len=16)
    params = _params(model)
    with pytest.raises(ValueError, match="empty prompt"):
        dec.generate(params, [np.array([], np.int32)], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt of 16 tokens.*context of 16"):
        dec.generate(params, [np.arange(16)], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        dec.generate(params, [np.arange(3)], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        Sampling(top_p=1.5)
    for field, value in (("top_k", 2**31), ("frequency_penalty", float("nan")), ("presence_penalty", float("inf")),
                         ("temperature", float("inf"))):  # would overflow the int32 rows / make the logits NaN
        with pytest.raises(ValueError, match=f"sampling {field}="):
            Sampling(**{field: value})
    with pytest.raises(ValueError, match="seed=-1"):
        dec.generate(params, [np.arange(3)], max_new_tokens=2, seeds=[-1])
    with pytest.raises(ValueError, match="cache_len=100 exceeds model.max_len=64"):
        decode.Decoder(_model(pos="learned", max_len=64), batch=1, cache_len=100)


@pytest.mark.parametrize("cache_len,new,dtype", [(32, 10, "bfloat16"), (160, 80, "float32")])
def test_sharded_decoding_gives_the_unsharded_tokens(cache_len, new, dtype):
    """(160, 80): 80 new tokens in 32-step chunks, so the state's cache grows from 64 to 128 slots on the
    mesh too; in float32, as over 80 tokens bf16's other summation order on the mesh moves log-probs ~1e-2."""
    import sharding
    from configs import common
    model = _model(n_heads=4, n_kv_heads=2, dtype=dtype)
    params = _params(model)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    rules = sharding.logical_rules(common.base().sharding)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    placed = jax.device_put(params, sharding.state_shardings(abstract, mesh, rules))
    assert len(placed["layer_0"]["attn"]["query"]["kernel"].sharding.device_set) > 1
    prompts = PROMPTS * 2
    settings = [sampling.GREEDY] * 4 + [Sampling(temperature=1.0)] * 4
    dec = decode.Decoder(model, batch=8, cache_len=cache_len, mesh=mesh, rules=rules)
    on_mesh = dec.generate(placed, prompts, max_new_tokens=new, sampling=settings, seeds=list(range(8)))
    assert (dec._resize._cache_size() > 0) == (cache_len == 160)  # it did resize (there is one window at 32)
    single = decode.Decoder(model, batch=8, cache_len=cache_len).generate(params, prompts, max_new_tokens=new,
                                                                          sampling=settings, seeds=list(range(8)))
    assert [o.tokens for o in on_mesh] == [o.tokens for o in single]
    np.testing.assert_allclose([o.logprobs for o in on_mesh], [o.logprobs for o in single], atol=1e-4)



def test_samples_of_one_prompt_share_its_prefill_and_sample_as_alone():
    # generate runs equal prompts through the model once (prefill_rows' src_N: RL's G samples of a prompt) and
    # copies their cache rows; each row then samples by its own seed, exactly as it would alone. Layers under
    # nn.scan (the cache's batch axis is 1); the RL tests' rollouts take this path with a layer list
    model = _model(dtype="float32", scan_layers=True)
    params = _params(model)
    dec = decode.Decoder(model, batch=4, cache_len=32)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0]]
    s = Sampling(temperature=1.0)
    shared = dec.generate(params, prompts, max_new_tokens=10, sampling=s, seeds=[1, 2, 3, 4])
    alone = [dec.generate(params, [p], max_new_tokens=10, sampling=s, seeds=[seed])[0]
             for p, seed in zip(prompts, [1, 2, 3, 4])]
    for a, b in zip(shared, alone):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=3e-5, rtol=0)
    assert shared[0].tokens != shared[2].tokens  # one prompt, different seeds: different samples
    _check_against_full_forward(model, params, shared, prompts, 3e-5)

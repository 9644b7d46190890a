"""Model: shapes/finiteness, causality, packed-document isolation, bf16 matmul gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model.layers import matmul
from model.transformer import ModelConfig, Transformer


def make(**kw):
    base = dict(vocab_size=64, num_tokens=60, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    base.update(kw)
    model = Transformer(ModelConfig(**base))
    # jitted: one compile instead of one per op of an eager init (each new shape compiles every op)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return model, params


@pytest.mark.parametrize("kw", [
    {}, {"pos": "learned", "norm": "layer", "mlp": "gelu", "use_bias": True, "tie_embeddings": False},
    {"scan_layers": True, "remat": "full"}, {"dtype": "float32", "n_kv_heads": 1},
])
def test_shapes_and_finite(kw):
    model, params = make(**kw)
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, 60)
    logits = jax.jit(model.apply)({"params": params}, tokens)
    chex.assert_shape(logits, (3, 16, 64))
    chex.assert_tree_all_finite(logits)
    # padded vocabulary rows are never predicted
    assert float(logits[..., 60:].max()) < -1e8


def test_causal_gradient_is_zero_for_future_tokens():
    model, params = make()
    emb = params["embed"]["embedding"]
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, 60)
    x = emb[tokens]  # differentiate w.r.t. input embeddings

    @jax.jit  # t is traced: one compile serves every position
    def logit_sum_at(t, x_in):
        def f(x_in):
            params2 = params
            # feed embeddings directly: replace the lookup by an identity table trick
            h = x_in
            return model.apply({"params": params2}, h, method=_encode_from_embeddings)[0, t].sum()
        return jax.grad(f)(x_in)

    for t in (0, 5, 11):
        g = logit_sum_at(jnp.int32(t), x)[0]  # [L, D]
        norms = jnp.abs(g).sum(-1)
        assert float(norms[t + 1:].max(initial=0.0)) == 0.0, f"position {t} sees the future"
        assert float(norms[: t + 1].min()) > 0.0, f"position {t} ignores its past"


def _encode_from_embeddings(self, x_BxLxD):
    """Run the stack on given input embeddings (test helper bound as a method)."""
    b, length, _ = x_BxLxD.shape
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    seg = jnp.ones((b, length), jnp.int32)
    for layer in self.layers:
        x_BxLxD = layer(x_BxLxD, pos, seg, True)
    return self.logits(self.final_norm(x_BxLxD))


def test_bidirectional_sees_the_future():
    model, params = make(causal=False)
    tokens = jax.random.randint(jax.random.key(3), (1, 10), 0, 60)
    x = params["embed"]["embedding"][tokens]
    g = jax.jit(jax.grad(lambda x_in: model.apply({"params": params}, x_in, method=_encode_from_embeddings)[0, 2].sum()))(x)
    assert float(jnp.abs(g[0, 3:]).sum()) > 0.0


def test_packed_documents_do_not_attend_to_each_other():
    model, params = make()
    a = jax.random.randint(jax.random.key(4), (1, 7), 0, 60)
    b = jax.random.randint(jax.random.key(5), (1, 9), 0, 60)
    apply = jax.jit(model.apply)  # one compile per shape instead of one per op and shape
    alone_a = apply({"params": params}, a)
    alone_b = apply({"params": params}, b)
    packed = jnp.concatenate([a, b], axis=1)
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
    seg = jnp.concatenate([jnp.ones(7, jnp.int32), 2 * jnp.ones(9, jnp.int32)])[None]
    out = apply({"params": params}, packed, pos, seg)
    np.testing.assert_allclose(out[:, :7], alone_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 7:], alone_b, atol=1e-5, rtol=1e-5)


def test_bf16_matmul_gradients_match_f32():
    x = jax.random.normal(jax.random.key(6), (4, 5, 32))
    w = jax.random.normal(jax.random.key(7), (32, 16)) * 0.1

    def loss(x, w, dtype):
        return jnp.sum(jnp.tanh(matmul(x, w, dtype)))

    gx32, gw32 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.float32)
    gx16, gw16 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
    assert gx16.dtype == jnp.float32 and gw16.dtype == jnp.float32
    np.testing.assert_allclose(gx16, gx32, atol=0.05, rtol=0.05)
    np.testing.assert_allclose(gw16, gw32, atol=0.1, rtol=0.05)
    assert not np.allclose(gw16, gw32, atol=1e-7)  # really computed in bf16


def test_bf16_dots_handed_over_as_f32_give_the_bf16_products(monkeypatch):
    # without bf16 hardware the operands are rounded to bf16 and multiplied as f32: the same products
    from model import attention, layers
    x = jax.random.normal(jax.random.key(6), (4, 5, 32))
    w = jax.random.normal(jax.random.key(7), (32, 16)) * 0.1
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 2, 9, 8)) for i in range(3))
    mask = attention.attention_mask(jnp.ones((2, 9), jnp.int32), causal=True)

    def run():
        f = lambda x, w, q, k, v: (jnp.sum(jnp.tanh(matmul(x, w, jnp.bfloat16)))  # noqa: E731
                                   + jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask, jnp.bfloat16))))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(x, w, q, k, v)

    monkeypatch.setattr(layers, "native_lowp_dots", lambda: True)
    native = run()
    monkeypatch.setattr(layers, "native_lowp_dots", lambda: False)
    emulated = run()
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(emulated)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_swiglu_custom_backward_matches_autodiff():
    from model.layers import swiglu
    gate, up = (jax.random.normal(jax.random.key(i), (3, 7, 16)) * 3 for i in (8, 9))

    def loss(f, gate, up):
        return jnp.sum(jnp.sin(f(gate, up)))

    ref = jax.grad(lambda g, u: loss(lambda a, b: jax.nn.silu(a) * b, g, u), argnums=(0, 1))(gate, up)
    got = jax.grad(lambda g, u: loss(swiglu, g, u), argnums=(0, 1))(gate, up)
    np.testing.assert_allclose(swiglu(gate, up), jax.nn.silu(gate) * up, rtol=1e-6)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_model_config_errors_name_values():
    with pytest.raises(ValueError, match="n_heads=3"):
        ModelConfig(vocab_size=64, num_tokens=60, d_model=32, n_heads=3)
    with pytest.raises(ValueError, match="'sinusoid'"):
        ModelConfig(vocab_size=64, num_tokens=60, pos="sinusoid")
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        ModelConfig(vocab_size=64, num_tokens=60, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("causal", [False, True])
def test_f32_custom_backward_equals_autodiff(monkeypatch, causal):
    """A float32 model on CPU runs the mixed-precision path's custom VJPs (row-major weight-gradient dots,
    blocked causal attention, batch slices) at float32: forward and gradients equal XLA's autodiff of
    the plain formulas (LMSTACK_F32_AUTODIFF=1 selects those) to float32 rounding."""
    from model import layers
    from model.attention import attention_mask, dot_product_attention
    x = jax.random.normal(jax.random.key(6), (4, 40, 32))
    w = jax.random.normal(jax.random.key(7), (32, 16)) * 0.1
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 3, 40, 8)) for i in range(3))
    seg = jnp.concatenate([jnp.ones((4, 25), jnp.int32), 2 * jnp.ones((4, 15), jnp.int32)], axis=1)
    mask = attention_mask(seg, causal=True)

    def loss(x, w, q, k, v):
        y = jnp.tanh(matmul(x, w, jnp.float32))
        a = dot_product_attention(q, k, v, mask, jnp.float32, causal=causal)
        return jnp.sum(y ** 2) + jnp.sum(jnp.sin(a))

    def run():  # fresh functions: the branch is taken at trace time, and JAX caches traces per function
        fresh = lambda *a: loss(*a)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(lambda *a: loss(*a))(x, w, q, k, v))
        return jax.jit(jax.value_and_grad(fresh, argnums=(0, 1, 2, 3, 4)))(x, w, q, k, v), jaxpr
    monkeypatch.setattr(layers, "F32_AUTODIFF", [True])
    (ref_val, ref), jaxpr = run()
    assert "custom_vjp" not in jaxpr
    monkeypatch.setattr(layers, "F32_AUTODIFF", [False])
    (val, got), jaxpr = run()
    assert "custom_vjp" in jaxpr  # really the other implementation
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for r, g in zip(ref, got):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()), rtol=1e-4)


def test_bf16_attention_core_gradients_match_f32():
    from model.attention import attention_mask, dot_product_attention
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 16, 8)) for i in range(3))
    seg = jnp.concatenate([jnp.ones((2, 10), jnp.int32), 2 * jnp.ones((2, 6), jnp.int32)], axis=1)
    mask = attention_mask(seg, causal=True)

    def loss(q, k, v, dtype):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask, dtype)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    ref = grads(q, k, v, jnp.float32)
    low = grads(q, k, v, jnp.bfloat16)
    for r, lo in zip(ref, low):
        assert lo.dtype == jnp.float32
        np.testing.assert_allclose(lo, r, atol=0.03 * float(jnp.abs(r).max()))
    # causality survives the custom VJP: query 3's output ignores keys 4+
    g = jax.jit(jax.grad(lambda k: dot_product_attention(q, k, v, mask, jnp.bfloat16)[:, :, 3].sum()))(k)
    assert float(jnp.abs(g[:, :, 4:]).max()) == 0.0


def test_causal_block_skipping_matches_full_attention(monkeypatch):
    from model import attention
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)  # 10 rows -> blocks of 4, 4, 2 (ragged)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 10, 8)) for i in range(3))
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 10], jnp.int32)
    mask = attention.attention_mask(seg, causal=True)

    def run(causal):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, jnp.bfloat16, causal=causal)  # noqa
        out = jax.jit(f)(q, k, v)  # a fresh function per call: traced with this call's settings
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))(q, k, v)
        return out, grads

    (out_b, grads_b), (out_f, grads_f) = run(True), run(False)
    np.testing.assert_allclose(out_b, out_f, atol=1e-6)
    for gb, gf in zip(grads_b, grads_f):
        np.testing.assert_allclose(gb, gf, atol=1e-5)


@pytest.mark.parametrize("batch,mask_batch", [(4, 4), (4, 1), (3, 3)])
def test_cpu_batch_slices_match_one_batch(monkeypatch, batch, mask_batch):
    # the CPU path cuts the batch into independent slices; a broadcast (batch-1) mask and a batch
    # the slices don't divide must work, with the same values and gradients as one slice
    from model import attention
    q, k, v = (jax.random.normal(jax.random.key(i), (batch, 2, 9, 8)) for i in range(3))
    seg = jnp.tile(jnp.array([[1] * 5 + [2] * 4], jnp.int32), (mask_batch, 1))
    mask = attention.attention_mask(seg, causal=True)

    def run(slices):
        monkeypatch.setattr(attention, "batch_slices", lambda: slices)
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, jnp.bfloat16, causal=True)  # noqa
        # jitted fresh functions: traced after the monkeypatch above, one compile instead of one per op
        return jax.jit(f)(q, k, v), jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))(q, k, v)

    (out2, grads2), (out1, grads1) = run(2), run(1)
    np.testing.assert_allclose(out2, out1, atol=1e-6)
    for a, b in zip(grads2, grads1):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_batch_slices_only_on_a_single_cpu_device():
    from model import attention
    assert jax.device_count() == 8  # tests run 8 fake CPU devices (conftest)
    assert attention.batch_slices() == 1  # slicing a device-sharded batch would reshard it


@pytest.fixture
def native_bf16_dots(monkeypatch):
    """Real bf16 dots even where the CPU lacks bf16 hardware (layers.lowp would hand them over as f32):
    the layout tests below are about what XLA:CPU's bf16 dot library takes."""
    from model import layers
    monkeypatch.setattr(layers, "native_lowp_dots", lambda: True)


@pytest.mark.parametrize("n_kv_heads,batch,length", [(1, 1, 16), (1, 3, 129), (2, 1, 16), (4, 2, 33)])
def test_bf16_gradients_run_for_every_head_grouping(n_kv_heads, batch, length, native_bf16_dots):
    # XLA:CPU folded multi-query attention's head sum (batch 1) into the value projection's backward
    # dot as a transposed operand, which its bf16 dot library does not take: a run-time error
    # ("Unsupported element type for DotThunk") until layers.row_major constrained that operand
    model, params = make(n_kv_heads=n_kv_heads, d_model=64)
    tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, 60)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 0])))(params)
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 5, 7), (1, 2, 130, 16)])
def test_bf16_attention_odd_shapes_run_and_match_f32(shape, native_bf16_dots):
    # XLA:CPU rejects some bf16 dot layouts at run time; every shape must compile and run
    from model.attention import attention_mask, dot_product_attention
    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    mask = attention_mask(jnp.ones(shape[:1] + shape[2:3], jnp.int32), causal=True)

    def loss(q, k, v, dtype):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask, dtype, causal=True)))

    ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, jnp.float32)
    low = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, jnp.bfloat16)
    for r, lo in zip(ref, low):
        np.testing.assert_allclose(lo, r, atol=0.05 * float(jnp.abs(r).max()))


def test_platform_attention_path_matches_cpu_core(monkeypatch):
    # GPU/TPU use jax.nn.dot_product_attention; check that path (forced here on CPU) against ours,
    # with grouped-query heads and packed segments
    from model import attention
    model, params = make(n_kv_heads=2)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 60)
    seg = jnp.array([[1] * 9 + [2] * 7, [1] * 16], jnp.int32)
    pos = jnp.where(seg == 2, jnp.arange(16) - 9, jnp.arange(16))

    def loss_and_grads():
        f = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens, positions_BxL=pos, segment_ids_BxL=seg)))  # noqa
        return jax.jit(jax.value_and_grad(f))(params)  # a fresh function: traced with the current path

    ours = loss_and_grads()
    monkeypatch.setattr(attention, "use_platform_attention", lambda: True)
    theirs = loss_and_grads()
    np.testing.assert_allclose(theirs[0], ours[0], rtol=2e-2)
    for a, b in zip(jax.tree.leaves(theirs[1]), jax.tree.leaves(ours[1])):
        np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(b).max()) + 1e-6)

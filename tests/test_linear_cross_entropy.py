"""Fused linear + cross-entropy: equal to the unfused definition, chunk by chunk."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from leaks import checking_leaks

import jsoftmax
from jsoftmax._linear_cross_entropy import default_chunk_size
from jsoftmax.testing import (
    reference_softmax_cross_entropy_with_integer_labels as ref_int_ce,
)

B, D, V = 6, 5, 37


def _data(seed=0, b=B, d=D, v=V):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (b, d))
    w = jax.random.normal(k[1], (d, v))
    bias = jax.random.normal(k[2], (v,))
    labels = jax.random.randint(k[3], (b,), 0, v)
    return x, w, bias, labels


def reference(x, w, bias, labels, where=None, reduction="mean", **opts):
    """The unfused definition: full logits, then the per-example loss."""
    logits = x @ w + (0.0 if bias is None else bias[None])
    loss = ref_int_ce(logits, labels, **opts)
    if where is not None:
        loss = jnp.where(where, loss, 0.0)
    if reduction == "none":
        return loss
    count = x.shape[0] if where is None else jnp.sum(where, dtype=jnp.float32)
    return jnp.sum(loss) / (count if reduction == "mean" else 1.0)


OPTIONS = [
    {},
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(soft_cap=2.0),
    dict(label_smoothing=0.2, z_loss=0.1, soft_cap=3.0),
]


CASES = [
    # (options, reduction, chunk_size); V = 37 = 7 * 5 + 2 = 4 * 8 + 5.
    *[(opts, "mean", 5) for opts in OPTIONS],
    *[(opts, "none", 8) for opts in OPTIONS],
    ({}, "sum", 37),
    ({}, "mean", 100),
    (dict(label_smoothing=0.2, z_loss=0.1, soft_cap=3.0), "sum", 16),
]


@pytest.mark.parametrize(
    "opts,reduction,chunk_size", CASES, ids=lambda c: str(c).replace(" ", "")
)
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_grads_match_unfused(opts, reduction, chunk_size, masked):
    x, w, bias, labels = _data()
    where = jnp.array([1, 1, 0, 1, 1, 0], bool) if masked else None

    def ours(x, w, bias):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, bias=bias, where=where, reduction=reduction,
            chunk_size=chunk_size, **opts,
        )  # fmt: skip

    ref = partial(reference, labels=labels, where=where, reduction=reduction, **opts)
    chex.assert_trees_all_close(
        jax.jit(ours)(x, w, bias), ref(x, w, bias), atol=1e-5, rtol=1e-5
    )
    got = jax.jit(jax.jacrev(ours, (0, 1, 2)))(x, w, bias)
    want = jax.jacrev(ref, (0, 1, 2))(x, w, bias)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)


def test_without_bias_and_matches_optax():
    x, w, _, labels = _data(1, b=16, d=8, v=300)
    ours = jax.value_and_grad(
        lambda x, w: jsoftmax.linear_softmax_cross_entropy(x, w, labels, chunk_size=64),
        (0, 1),
    )
    theirs = jax.value_and_grad(
        lambda x, w: optax.softmax_cross_entropy_with_integer_labels(
            x @ w, labels
        ).mean(),
        (0, 1),
    )
    chex.assert_trees_all_close(ours(x, w), theirs(x, w), atol=1e-5, rtol=1e-5)


def test_finite_differences_float64_second_order():
    with jax.enable_x64(True):
        x, w, bias, labels = (
            a.astype(jnp.float64) if a.dtype == jnp.float32 else a
            for a in _data(2, b=3, d=4, v=11)
        )
        f = partial(
            jsoftmax.linear_softmax_cross_entropy,
            labels=labels,
            chunk_size=4,
            label_smoothing=0.1,
            z_loss=0.01,
            soft_cap=5.0,
        )
        where = jnp.array([True, False, True])
        jax.test_util.check_grads(
            lambda x, w, b: f(x, w, bias=b, where=where),
            (x, w, bias),
            order=1,
            modes=["rev"],
        )


def test_vmap_checkpoint_scan():
    x, w, bias, labels = _data(3)
    xs = jnp.stack([x, 2 * x, -x])

    def loss(fn, x):
        return fn(x, w, labels, bias=bias)

    ours = partial(jsoftmax.linear_softmax_cross_entropy, chunk_size=8)
    ref = partial(reference)
    got = jax.vmap(jax.grad(partial(loss, ours)))(xs)
    want = jax.vmap(jax.grad(lambda x: ref(x, w, bias, labels)))(xs)
    chex.assert_trees_all_close(got, want, atol=1e-5)

    def scan_loss(fn, xs):
        return jax.lax.scan(lambda c, x: (c + loss(fn, x), None), 0.0, xs)[0]

    with checking_leaks():
        got = jax.jit(jax.grad(jax.checkpoint(partial(scan_loss, ours))))(xs)
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_masked_tokens_count_zero_even_with_bad_labels():
    x, w, bias, labels = _data(4)
    where = jnp.array([True, True, False, True, False, True])
    labels = jnp.where(where, labels, -100)  # padding ids, as in many pipelines
    loss, grads = jax.value_and_grad(
        lambda x, w: jsoftmax.linear_softmax_cross_entropy(x, w, labels, where=where),
        (0, 1),
    )(x, w)
    assert bool(jnp.isfinite(loss))
    assert bool(jnp.all(jnp.isfinite(grads[1])))
    chex.assert_trees_all_equal(grads[0][2], jnp.zeros(D))
    want = reference(x, w, None, jnp.where(where, labels, 0), where=where)
    chex.assert_trees_all_close(loss, want, atol=1e-6)
    none_counted = jsoftmax.linear_softmax_cross_entropy(
        x, w, labels, where=jnp.zeros(B, bool)
    )
    assert float(none_counted) == 0.0


def test_counted_label_out_of_range_is_nan():
    x, w, _, labels = _data(5)
    per_token = jsoftmax.linear_softmax_cross_entropy(
        x, w, labels.at[1].set(V), reduction="none"
    )
    assert bool(jnp.isnan(per_token[1]))
    assert bool(jnp.all(jnp.isfinite(jnp.delete(per_token, 1))))


# chunk sizes of several chunks, one chunk (= V, and past V) and the default
# (one chunk here): with one chunk, XLA:CPU unrolled the loop and folded x's
# transpose into the dW matmul, a bfloat16 x bfloat16 -> float32 dot its
# runtime does not implement ("Unsupported element type for DotThunk").
@pytest.mark.parametrize("chunk_size", [64, 500, 1024, None])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype, chunk_size):
    x, w, bias, labels = _data(6, b=32, d=16, v=500)
    x16, w16 = x.astype(dtype), w.astype(dtype)
    loss, (dx, dw) = jax.jit(
        jax.value_and_grad(
            lambda x, w: jsoftmax.linear_softmax_cross_entropy(
                x, w, labels, chunk_size=chunk_size
            ),
            (0, 1),
        )
    )(x16, w16)
    chex.assert_type((loss, dx, dw), dtype)
    want, (dx32, dw32) = jax.value_and_grad(
        lambda x, w: reference(x, w, None, labels), (0, 1)
    )(x16.astype(jnp.float32), w16.astype(jnp.float32))
    chex.assert_trees_all_close(loss.astype(jnp.float32), want, rtol=1e-2)
    scale = jnp.max(jnp.abs(dw32))
    chex.assert_trees_all_close(dw.astype(jnp.float32) / scale, dw32 / scale, atol=1e-2)
    scale = jnp.max(jnp.abs(dx32))
    chex.assert_trees_all_close(dx.astype(jnp.float32) / scale, dx32 / scale, atol=1e-2)


def test_never_materialises_the_logits():
    b, d, v = 1024, 64, 65536
    shapes = (
        jax.ShapeDtypeStruct((b, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    fused = jax.jit(
        jax.value_and_grad(jsoftmax.linear_softmax_cross_entropy, (0, 1))
    ).lower(*shapes)
    unfused = jax.jit(
        jax.value_and_grad(lambda x, w, y: reference(x, w, None, y), (0, 1))
    ).lower(*shapes)
    logits_bytes = b * v * 4
    fused_temp = fused.compile().memory_analysis().temp_size_in_bytes
    unfused_temp = unfused.compile().memory_analysis().temp_size_in_bytes
    assert unfused_temp >= logits_bytes
    assert fused_temp < logits_bytes / 4


@pytest.mark.parametrize("mode", ["jvp", "linearize"])
def test_forward_mode_never_materialises_the_logits(mode):
    # The tangent map derived from the backward pass (its transpose) stacked
    # every chunk's probabilities: 1.6x the [B, V] logits at this size.
    b, d, v = 1024, 64, 65536
    shapes = (
        jax.ShapeDtypeStruct((b, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )

    def forward(x, w, y):
        def loss(x, w):
            return jsoftmax.linear_softmax_cross_entropy(x, w, y, reduction="none")

        if mode == "jvp":
            return jax.jvp(loss, (x, w), (x, w))
        return jax.linearize(loss, x, w)[1](x, w)

    temp = jax.jit(forward).lower(*shapes).compile().memory_analysis()
    assert temp.temp_size_in_bytes < b * v * 4 / 4


def test_forward_mode_of_masked_and_out_of_range_tokens():
    # A masked token's tangent is 0; an out-of-range label's is NaN (loud, as
    # its gradient is) unless its tangent is 0; the others equal jax.jvp of
    # the reference.
    x, w, bias, _ = _data(3)
    labels = jnp.array([0, -100, 36, 37, 5, -1])
    keep = jnp.array([True, False, True, False, True, True])

    def ours(x, w, bias):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, bias=bias, where=keep, reduction="none", chunk_size=8
        )

    def theirs(x, w, bias):
        safe = jnp.where((labels >= 0) & (labels < 37), labels, 0)
        return jnp.where(keep, reference(x, w, bias, safe, reduction="none"), 0)

    primals = (x, w, bias)
    tangents = tuple(jnp.cos(a) for a in primals)
    loss, t = jax.jvp(ours, primals, tangents)
    want_loss, want_t = jax.jvp(theirs, primals, tangents)
    ok = keep & (labels >= 0) & (labels < 37)
    assert np.array_equal(np.isnan(t), np.asarray(keep & ~ok))
    assert np.array_equal(np.isnan(loss), np.asarray(keep & ~ok))
    chex.assert_trees_all_close(t[ok], want_t[ok], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(t[~keep]) == 0)
    zero = tuple(jnp.zeros_like(a) for a in primals)
    assert not np.any(np.isnan(jax.jvp(ours, primals, zero)[1]))


def test_default_chunk_size():
    assert default_chunk_size(4096, 32768) == 1024
    assert default_chunk_size(8192, 262144) == 512
    assert default_chunk_size(8, 32768) == 8192
    assert default_chunk_size(10**6, 32768) == 128
    assert default_chunk_size(4096, 100) == 100


def test_errors_name_shapes():
    x, w, bias, labels = _data()
    f = jsoftmax.linear_softmax_cross_entropy
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(4, 37\)"):
        f(x, w[:4], labels)
    with pytest.raises(ValueError, match=r"\(7,\).*\(6,\)"):
        f(x, w, jnp.zeros(7, jnp.int32))
    with pytest.raises(ValueError, match=r"bias of shape \(36,\)"):
        f(x, w, labels, bias=bias[:36])
    with pytest.raises(ValueError, match=r"where of shape \(6, 37\)"):
        f(x, w, labels, where=jnp.ones((6, 37), bool))
    with pytest.raises(ValueError, match="reduction"):
        f(x, w, labels, reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        f(x, w, labels, chunk_size=0)
    with pytest.raises(TypeError, match="integer"):
        f(x, w, labels.astype(jnp.float32))


# Hardening: label dtypes, masking idioms, precision, sign, options, export.


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "uint32"])
def test_labels_of_every_integer_dtype_match_int32(dtype):
    x, w, bias, labels = _data(7, b=300, v=200)
    labels = labels % min(200, int(jnp.iinfo(dtype).max) + 1)
    f = jax.value_and_grad(
        lambda x, w, y: jsoftmax.linear_softmax_cross_entropy(x, w, y, chunk_size=64),
        (0, 1),
    )
    chex.assert_trees_all_close(f(x, w, labels.astype(dtype)), f(x, w, labels))


@pytest.mark.parametrize("reduce", ["where", "multiply"])
def test_minus_100_padding_masked_after_the_loss_has_zero_gradient(reduce):
    # jnp.where(keep, per_token_loss, 0) made every entry of dW NaN.
    x, w, bias, labels = _data(8)
    labels = labels.at[jnp.array([1, 4])].set(-100)
    keep = labels != -100

    def loss(x, w, bias):
        per_token = jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, bias=bias, reduction="none", chunk_size=8
        )
        kept = jnp.where(keep, per_token, 0) if reduce == "where" else per_token
        return jnp.sum(kept if reduce == "where" else jnp.where(keep, kept, 0) * 1.0)

    got = jax.grad(loss, (0, 1, 2))(x, w, bias)
    want = jax.grad(
        lambda x, w, b: reference(
            x, w, b, jnp.where(keep, labels, 0), where=keep, reduction="sum"
        ),
        (0, 1, 2),
    )(x, w, bias)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_minus_100_padding_masked_with_where_raises_no_debug_nans_alarm():
    # Outside jit, jax_debug_nans stopped at the NaN cotangent that the label
    # check gave the masked -100 tokens, which the backward then zeroed.
    x, w, bias, labels = _data(9)
    labels = labels.at[jnp.array([1, 4])].set(-100)
    keep = labels != -100

    def loss(x, w, labels, where):
        return jsoftmax.linear_softmax_cross_entropy(x, w, labels, where=where)

    with jax.debug_nans(True):
        got = jax.grad(loss, (0, 1))(x, w, labels, keep)
    want = jax.grad(
        lambda x, w: reference(x, w, None, jnp.where(keep, labels, 0), where=keep),
        (0, 1),
    )(x, w)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    # A counted token's out-of-range label still makes the gradient NaN.
    dx, dw = jax.grad(loss, (0, 1))(x, w, labels, jnp.ones(B, bool))
    assert bool(jnp.all(jnp.isnan(dx[1]))) and bool(jnp.any(jnp.isnan(dw)))
    assert bool(jnp.all(jnp.isfinite(jnp.delete(dx, jnp.array([1, 4]), axis=0))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1), dict(soft_cap=3.0)])
def test_loss_is_never_negative_when_the_target_is_the_max(dtype, opts):
    # The target logit came from a different matmul than the logsumexp:
    # -7.6e-6 (float32) and -7.6e-5 (bfloat16).
    x, w, _, _ = _data(9, b=256, d=32, v=100)
    x = 3.0 * x
    labels = jnp.argmax(x @ w, axis=-1)
    loss = jsoftmax.linear_softmax_cross_entropy(
        x.astype(dtype), w.astype(dtype), labels, reduction="none", chunk_size=16,
        **opts,
    )  # fmt: skip
    assert jnp.all(loss >= 0), jnp.min(loss)


@pytest.mark.parametrize("offset", [0.0, 1e4, -3e4])
def test_precision_at_large_logits_no_worse_than_twice_optax(offset):
    # exp(z - L) with a large L: dx error 5.8e-5 at offset 1e4, optax 8.7e-6.
    x, w, bias, labels = _data(10, b=16, d=8, v=64)
    bias = bias + offset

    def ours(x):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, bias=bias, chunk_size=16, reduction="sum"
        )

    def theirs(x, w=w, bias=bias):
        return optax.softmax_cross_entropy_with_integer_labels(
            x @ w + bias[None], labels
        ).sum()

    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        v64, g64 = jax.value_and_grad(theirs)(
            x64, w.astype(jnp.float64), bias.astype(jnp.float64)
        )
        v64, g64 = np.asarray(v64), np.asarray(g64)
    errors = {}
    for name, fn in (("ours", ours), ("optax", theirs)):
        v, g = jax.value_and_grad(fn)(x)
        errors[name] = (
            float(np.max(np.abs(np.asarray(g, np.float64) - g64))),
            float(np.abs(np.asarray(v, np.float64) - v64)),
        )
    eps = float(jnp.finfo(jnp.float32).eps)
    (our_g, our_v), (optax_g, optax_v) = errors["ours"], errors["optax"]
    assert our_g <= 2 * optax_g + eps * float(np.max(np.abs(g64))), errors
    assert our_v <= 2 * optax_v + eps * float(np.abs(v64)), errors


def test_empty_vocabulary_and_empty_batch():
    with pytest.raises(ValueError, match=r"no classes \(V = 0\)"):
        jsoftmax.linear_softmax_cross_entropy(
            jnp.ones((2, 3)), jnp.ones((3, 0)), jnp.zeros(2, jnp.int32)
        )
    with pytest.raises(ValueError, match=r"no classes \(V = 0\)"):
        jsoftmax.linear_softmax_cross_entropy(
            jnp.ones((2, 3)), jnp.ones((3, 0)), jnp.zeros(2, jnp.int32), chunk_size=4
        )
    x, w = jnp.ones((0, 3)), jnp.ones((3, 5))
    loss, (dx, dw) = jax.value_and_grad(
        lambda x, w: jsoftmax.linear_softmax_cross_entropy(
            x, w, jnp.zeros(0, jnp.int32)
        ),
        (0, 1),
    )(x, w)
    assert loss == 0 and dx.shape == (0, 3) and not jnp.any(dw)


def test_chunk_size_true_is_refused_not_taken_as_one():
    # chunk_size=True passed the isinstance(int) check and ran chunks of 1.
    x, w, _, labels = _data()
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        jsoftmax.linear_softmax_cross_entropy(x, w, labels, chunk_size=True)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        jsoftmax.linear_softmax_cross_entropy(x, w, labels, chunk_size=-2)


def test_chunk_size_accepts_numpy_and_concrete_jax_integers():
    x, w, _, labels = _data()
    f = partial(jsoftmax.linear_softmax_cross_entropy, x, w, labels)
    want = f(chunk_size=4)
    for size in (np.int64(4), np.uint8(4), jnp.array(4)):
        chex.assert_trees_all_equal(f(chunk_size=size), want)


def test_non_boolean_token_mask_is_refused():
    x, w, _, labels = _data()
    with pytest.raises(TypeError, match="boolean.*bias"):
        jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, where=jnp.ones(B, jnp.float32)
        )


def test_export_with_a_symbolic_batch():
    # The default chunk size divided by the batch: floordiv(4194304, b).
    from jax import export

    (b,) = export.symbolic_shape("b")

    def loss(x, w, y):
        return jsoftmax.linear_softmax_cross_entropy(x, w, y)

    args = (
        jax.ShapeDtypeStruct((b, D), jnp.float32),
        jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    exported = export.export(jax.jit(jax.value_and_grad(loss, (0, 1))))(*args)
    restored = export.deserialize(exported.serialize())
    x, w, _, labels = _data(11)
    chex.assert_trees_all_close(
        restored.call(x, w, labels),
        jax.value_and_grad(loss, (0, 1))(x, w, labels),
        atol=1e-6,
    )
    assert default_chunk_size(b, 4096) == 1024


def test_export_with_a_symbolic_vocabulary_is_refused_by_name():
    # The chunks are a static loop: a symbolic V raised an inconclusive
    # dimension comparison from inside the chunk-size default.
    b, v = jax.export.symbolic_shape("b, v")
    args = (
        jax.ShapeDtypeStruct((b, D), jnp.float32),
        jax.ShapeDtypeStruct((D, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    for chunk_size in (None, 4):
        with pytest.raises(ValueError, match="vocabulary V .* is symbolic"):
            jax.export.export(
                jax.jit(
                    partial(
                        jsoftmax.linear_softmax_cross_entropy, chunk_size=chunk_size
                    )
                )
            )(*args)


@pytest.mark.parametrize("jit", [False, True])
def test_no_features_gives_the_loss_of_the_bias_alone(jit):
    # D = 0 raised an IndexError (a carry built from x's first column).
    _, _, bias, labels = _data(10)
    x, w = jnp.ones((B, 0)), jnp.ones((0, V))

    def ours(x, w, bias):
        return jsoftmax.linear_softmax_cross_entropy(x, w, labels, bias=bias)

    def theirs(x, w, bias):
        logits = jnp.broadcast_to(bias, (B, V))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    f = jax.value_and_grad(ours, (0, 1, 2))
    got = (jax.jit(f) if jit else f)(x, w, bias)
    chex.assert_trees_all_close(got, jax.value_and_grad(theirs, (0, 1, 2))(x, w, bias))
    assert got[1][0].shape == (B, 0) and got[1][1].shape == (0, V)


@pytest.mark.parametrize("opts", [{}, dict(z_loss=1e-2), dict(soft_cap=2.0)])
@pytest.mark.parametrize("chunk_size", [1, 2, 4, None])
def test_columns_of_minus_inf_bias_filling_the_first_chunk_or_a_shard(chunk_size, opts):
    # Padding a vocabulary with -inf bias columns. A first chunk of them (or a
    # vocab shard holding only them) left the running max at -inf, and every
    # loss and gradient was NaN from -inf - -inf; chunk sizes that mixed them
    # with finite columns were right.
    x, w, bias, labels = _data(v=8)
    bias = bias.at[:4].set(-jnp.inf)
    labels = 4 + labels % 4

    def fused(x, w, bias):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, bias=bias, chunk_size=chunk_size, reduction="sum", **opts
        )

    def want(x, w, bias):  # the unfused op takes -inf logits (the reference NaN)
        loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
            x @ w + bias[None], labels, **opts
        )
        return jnp.sum(loss)

    args = (x, w, bias)
    got, want_value = fused(*args), want(*args)
    assert jnp.isfinite(got), got
    np.testing.assert_allclose(got, want_value, rtol=1e-6)
    grads, want_grads = (
        jax.grad(fused, (0, 1, 2))(*args),
        jax.grad(want, (0, 1, 2))(*args),
    )
    for g, wg in zip(grads, want_grads, strict=True):
        assert jnp.all(jnp.isfinite(g))
        np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-6 * jnp.max(jnp.abs(wg)))
    # Forward mode (derived from the rule) against the reference's gradient:
    # plain autodiff's own tangent is NaN there (0 * inf).
    tangent = jax.jvp(fused, args, (x, w, jnp.zeros_like(bias)))[1]
    want_tangent = jnp.vdot(want_grads[0], x) + jnp.vdot(want_grads[1], w)
    # A sum of terms that cancel: held to the size of the terms.
    terms = jnp.vdot(jnp.abs(want_grads[0]), jnp.abs(x))
    terms += jnp.vdot(jnp.abs(want_grads[1]), jnp.abs(w))
    assert jnp.abs(tangent - want_tangent) <= 1e-5 * terms, (tangent, want_tangent)

    # Vocab parallel over 2 shards (vmap's named axis stands in for devices):
    # the first shard holds only the -inf columns.
    def sharded(x, w, bias):
        halves = (jnp.stack(jnp.split(w, 2, axis=1)), jnp.stack(jnp.split(bias, 2)))
        loss = jax.vmap(
            lambda w, b: jsoftmax.linear_softmax_cross_entropy(
                x,
                w,
                labels,
                bias=b,
                chunk_size=chunk_size,
                reduction="sum",
                axis_name="v",
                **opts,
            ),
            axis_name="v",
        )(*halves)
        return loss[0]

    np.testing.assert_allclose(sharded(*args), want_value, rtol=1e-6)
    for g, wg in zip(jax.grad(sharded, (0, 1, 2))(*args), want_grads, strict=True):
        np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-6 * jnp.max(jnp.abs(wg)))


@pytest.mark.parametrize(
    "opts",
    [{}, dict(z_loss=1e-2), dict(label_smoothing=0.5), dict(label_smoothing=1.0)],
)
@pytest.mark.parametrize("chunk_size", [3, None])
def test_tokens_with_every_logit_minus_inf_have_loss_and_gradient_zero(
    chunk_size, opts
):
    # A -inf bias on every column leaves no finite logit: the loss and every
    # gradient are 0, whatever the label (out of range or -100 padding
    # included), as in the unfused op; they were NaN from -inf - -inf.
    x, w, bias, labels = _data(v=8)
    bias = jnp.full_like(bias, -jnp.inf)
    labels = labels.at[0].set(255).at[1].set(-100)
    where = jnp.arange(B) != 2

    def fused(x, w, bias, axis_name=None):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, labels, bias=bias, where=where, chunk_size=chunk_size,
            reduction="none", axis_name=axis_name, **opts,
        )  # fmt: skip

    def unfused(x, w, bias):
        loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
            x @ w + bias[None], labels, **opts
        )
        return jnp.where(where, loss, 0)

    def sharded(x, w, bias):  # 2 vocab shards, vmap's named axis for devices
        halves = (jnp.stack(jnp.split(w, 2, axis=1)), jnp.stack(jnp.split(bias, 2)))
        loss = jax.vmap(partial(fused, x, axis_name="v"), axis_name="v")(*halves)
        return loss[0]

    args = (x, w, bias)
    cotangent = jnp.linspace(1.0, 2.0, B)
    for f in (fused, jax.jit(fused), sharded, unfused):
        loss, vjp = jax.vjp(f, *args)
        assert jnp.array_equal(loss, jnp.zeros(B)), (f, loss)
        for g in vjp(cotangent):
            assert jnp.array_equal(g, jnp.zeros_like(g)), (f, g)
    tangent = jax.jvp(fused, args, (x, w, jnp.zeros_like(bias)))[1]
    assert jnp.array_equal(tangent, jnp.zeros(B)), tangent
    # The same call with a finite bias column is the unfused op's, labels and
    # all: the zeros above come from the empty rows, not from a dead loss.
    args = (x, w, bias.at[5].set(0.0))
    np.testing.assert_allclose(fused(*args), unfused(*args), rtol=1e-6)


def test_full_label_smoothing_ignores_a_minus_inf_target_logit():
    # The target's weight 1 - label_smoothing is 0: the loss is the unfused
    # op's (+inf from the -inf column's smoothing mass, finite without it),
    # not NaN from 0 * -inf.
    x, w, bias, labels = _data(v=8)
    labels = labels.at[0].set(2)
    for ban in (2, 5):  # the target column; another column
        b = bias.at[ban].set(-jnp.inf)
        for a in (1.0, 0.5):
            got = jsoftmax.linear_softmax_cross_entropy(
                x, w, labels, bias=b, chunk_size=3, label_smoothing=a, reduction="none"
            )
            want = jsoftmax.softmax_cross_entropy_with_integer_labels(
                x @ w + b[None], labels, label_smoothing=a
            )
            np.testing.assert_allclose(got, want, rtol=1e-6)

"""Per-example cross-entropy: values and gradients against the plain definition."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src.ad_checkpoint import saved_residuals
from leaks import checking_leaks

import jsoftmax
from jsoftmax import testing
from jsoftmax.testing import reference_softmax_cross_entropy as ref_ce
from jsoftmax.testing import (
    reference_softmax_cross_entropy_with_integer_labels as ref_int_ce,
)

OPTIONS = [
    {},
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(soft_cap=2.0),
    dict(label_smoothing=0.2, z_loss=0.05, soft_cap=3.0),
]
options = pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")


def _data(shape=(4, 9), seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    logits = 3.0 * jax.random.normal(k1, shape)
    probs = jax.nn.softmax(jax.random.normal(k2, shape))
    ids = jax.random.randint(k3, shape[:-1], 0, shape[-1])
    return logits, probs, ids


def _class_mask(n):
    return jnp.arange(n) % 4 != 2


@options
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_probability_labels_value_and_grads_match_definition(opts, masked, jit):
    logits, probs, _ = _data()
    where = _class_mask(9) if masked else None
    if masked:
        probs = jnp.where(where, probs, 0.0)

    def ours(z, q):
        return jsoftmax.softmax_cross_entropy(z, q, where=where, **opts)

    def ref(z, q):
        return ref_ce(z, q, where=where, **opts)

    f = jax.jit(ours) if jit else ours
    chex.assert_trees_all_close(f(logits, probs), ref(logits, probs), atol=1e-5)
    # Gradients w.r.t. the logits and the labels (distillation).
    got = jax.jacrev(f, (0, 1))(logits, probs)
    want = jax.jacrev(ref, (0, 1))(logits, probs)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=2e-3)


@options
@pytest.mark.parametrize("masked", [False, True])
def test_integer_labels_match_definition(opts, masked):
    logits, _, ids = _data()
    where = _class_mask(9) if masked else None
    if masked:
        ids = jnp.where(where[ids], ids, 0)
    testing.assert_vjp_matches(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, ids, where=where, **opts
        ),
        lambda z: ref_int_ce(z, ids, where=where, **opts),
        logits,
        transforms=("none", "jit"),
    )

    # vmap over examples, with the labels batched too.
    def per_example(fn, z, y):
        return fn(z, y, where=where, **opts)

    ours = jsoftmax.softmax_cross_entropy_with_integer_labels
    got = jax.vmap(jax.grad(partial(per_example, ours)))(logits, ids)
    want = jax.vmap(jax.grad(partial(per_example, ref_int_ce)))(logits, ids)
    chex.assert_trees_all_close(got, want, atol=1e-6)


def test_matches_optax():
    logits, probs, ids = _data((8, 33), seed=1)
    chex.assert_trees_all_close(
        jsoftmax.softmax_cross_entropy(logits, probs),
        optax.softmax_cross_entropy(logits, probs),
        atol=1e-5,
    )
    chex.assert_trees_all_close(
        jsoftmax.softmax_cross_entropy_with_integer_labels(logits, ids),
        optax.softmax_cross_entropy_with_integer_labels(logits, ids),
        atol=1e-5,
    )
    # optax wants the mask at the full logits shape. The labels put no mass
    # on masked classes, which optax drops and jsoftmax makes +inf.
    where = jnp.broadcast_to(_class_mask(33), logits.shape)
    valid_probs = jnp.where(where, probs, 0.0)
    chex.assert_trees_all_close(
        jsoftmax.softmax_cross_entropy(logits, valid_probs, where=where),
        optax.softmax_cross_entropy(logits, valid_probs, where=where),
        atol=1e-5,
    )
    smoothed = optax.smooth_labels(jax.nn.one_hot(ids, 33), 0.1)
    chex.assert_trees_all_close(
        jsoftmax.softmax_cross_entropy_with_integer_labels(
            logits, ids, label_smoothing=0.1
        ),
        optax.softmax_cross_entropy(logits, smoothed),
        atol=1e-5,
    )
    grad = jax.grad(lambda z: jnp.sum(jsoftmax.softmax_cross_entropy(z, probs)))
    grad_optax = jax.grad(lambda z: jnp.sum(optax.softmax_cross_entropy(z, probs)))
    chex.assert_trees_all_close(grad(logits), grad_optax(logits), atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_other_class_axes(axis):
    logits, _, _ = _data((5, 6, 7), seed=2)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(9), logits.shape), axis)
    testing.assert_vjp_matches(
        lambda z: jsoftmax.softmax_cross_entropy(z, probs, axis=axis),
        # The labels in z's dtype: under strict promotion the reference takes
        # no float32 labels with float64 logits (its float64 comparison).
        lambda z: ref_ce(z, probs.astype(z.dtype), axis=axis),
        logits,
        transforms=("jit",),
    )
    shape = list(logits.shape)
    del shape[axis]
    ids = jax.random.randint(jax.random.key(3), shape, 0, logits.shape[axis])
    testing.assert_vjp_matches(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids, axis=axis),
        lambda z: ref_int_ce(z, ids, axis=axis),
        logits,
        transforms=("jit",),
    )


def test_second_order_and_finite_differences_float64():
    with jax.enable_x64(True):
        logits, probs, ids = _data((3, 5), seed=4)
        logits, probs = logits.astype(jnp.float64), probs.astype(jnp.float64)
        opts = dict(label_smoothing=0.1, z_loss=0.01, soft_cap=4.0)
        testing.assert_finite_differences(
            lambda z, q: jsoftmax.softmax_cross_entropy(z, q, **opts),
            logits,
            probs,
            order=2,
        )
        testing.assert_finite_differences(
            lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(
                z, ids, **opts
            ),
            logits,
            order=2,
        )


def test_saves_logits_labels_and_per_row_values_only():
    logits, probs, ids = _data((8, 16))
    res = saved_residuals(jsoftmax.softmax_cross_entropy, logits, probs)
    # logits, labels, and per row: the max, log of the shifted sum (the two
    # halves of the logsumexp, kept apart for precision) and the label sum.
    assert sorted(a.shape for a, _ in res) == [(8,), (8,), (8,), (8, 16), (8, 16)]
    res = saved_residuals(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids), logits
    )
    # logits, and per row: the two halves of the logsumexp and the label.
    assert sorted(a.shape for a, _ in res) == [(8,), (8,), (8,), (8, 16)]


def test_masked_classes_get_zero_grad_and_no_nan_even_huge():  # JAX issue 19490
    logits, probs, ids = _data((3, 6))
    where = jnp.array([True, False, True, True, False, True])
    logits = jnp.where(where, logits, 1e30)
    ids = jnp.array([0, 2, 5])
    for opts in OPTIONS:
        grad = jax.grad(
            lambda z, opts=opts: jnp.sum(
                jsoftmax.softmax_cross_entropy_with_integer_labels(
                    z, ids, where=where, **opts
                )
            )
        )(logits)
        assert bool(jnp.all(jnp.isfinite(grad)))
        assert bool(jnp.all(jnp.where(where, True, grad == 0)))


def test_row_with_no_valid_class_has_zero_loss_and_grad():
    logits, probs, _ = _data((2, 4))
    where = jnp.array([[True, True, False, True], [False] * 4])
    probs = probs.at[0, 2].set(0.0)  # the last row keeps its labels
    loss, grads = jax.value_and_grad(
        lambda z, q: jnp.sum(jsoftmax.softmax_cross_entropy(z, q, where=where)), (0, 1)
    )(logits, probs)
    assert bool(jnp.isfinite(loss))
    chex.assert_trees_all_equal(grads[0][1], jnp.zeros(4))
    chex.assert_trees_all_equal(grads[1][1], jnp.zeros(4))


@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, z_loss=1e-2)])
@pytest.mark.parametrize("jit", [False, True])
def test_a_row_of_all_minus_inf_has_zero_label_gradient(jit, opts):
    # A row with no valid class through its logits (all -inf, no mask): the
    # loss and the logits' gradient were 0, but the labels' gradient was NaN
    # (L - z = -inf - -inf), where the README promises 0 whatever the label.
    logits, probs, _ = _data((2, 4))
    logits = logits.at[1].set(-jnp.inf)

    def loss(z, q):
        return jnp.sum(jsoftmax.softmax_cross_entropy(z, q, **opts))

    f = jax.value_and_grad(loss, (0, 1))
    value, (d_z, d_q) = (jax.jit(f) if jit else f)(logits, probs)
    assert bool(jnp.isfinite(value))
    chex.assert_trees_all_equal(d_z[1], jnp.zeros(4))
    chex.assert_trees_all_equal(d_q[1], jnp.zeros(4))
    # The other row is optax's.
    want = jax.grad(lambda q: jnp.sum(optax.softmax_cross_entropy(logits[:1], q)))
    if not opts:
        chex.assert_trees_all_close(d_q[:1], want(probs[:1]), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_integer_labels_row_with_no_valid_class_has_zero_grad(jit):
    # Under jit, XLA shares the forward's exponentials with the backward pass.
    logits, _, _ = _data((2, 4))
    where = jnp.array([[True, True, False, True], [False] * 4])
    ids = jnp.array([1, 2])
    grad_fn = jax.grad(
        lambda z: jnp.sum(
            jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids, where=where)
        )
    )
    grad = (jax.jit(grad_fn) if jit else grad_fn)(logits)
    chex.assert_trees_all_equal(grad[1], jnp.zeros(4))
    p = jax.nn.softmax(logits[0], where=where[0])
    expected = jnp.where(where[0], p - jax.nn.one_hot(1, 4), 0)
    chex.assert_trees_all_close(grad[0], expected, atol=1e-6)


def test_label_out_of_range_is_nan_and_masked_target_is_inf():
    logits, _, _ = _data((3, 4))
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.array([0, 4, -1])
    )
    assert bool(jnp.isfinite(loss[0]))
    assert bool(jnp.all(jnp.isnan(loss[1:])))
    grad = jax.grad(
        lambda z: jnp.sum(
            jsoftmax.softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 4, 1]))
        )
    )(logits)
    assert bool(jnp.all(jnp.isnan(grad[1])))
    assert bool(jnp.all(jnp.isfinite(grad[0])))
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.array([1, 0, 0]), where=jnp.array([True, False, True, True])
    )
    assert float(loss[0]) == jnp.inf


def test_probability_label_on_a_masked_class_is_inf_as_an_integer_label():
    # Issue 18: softmax_cross_entropy gave 0 and a zero gradient (the label's
    # mass silently dropped) where the integer-label loss gave +inf.
    logits, _, _ = _data((2, 4))
    where = jnp.array([True, False, True, True])
    ids = jnp.array([1, 2])  # row 0's label is on the masked class
    onehot = jax.nn.one_hot(ids, 4)
    loss, (dz, dq) = jax.value_and_grad(
        lambda z, q: jsoftmax.softmax_cross_entropy(z, q, where=where)[0], (0, 1)
    )(logits, onehot)
    int_loss, int_dz = jax.value_and_grad(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, ids, where=where
        )[0]
    )(logits)
    assert loss == jnp.inf and int_loss == jnp.inf
    # The finite part's gradient: softmax over the valid classes.
    p = jax.nn.softmax(logits[0], where=where)
    chex.assert_trees_all_close(dz[0], p, atol=1e-6)
    chex.assert_trees_all_close(dz, int_dz, atol=1e-6)
    assert dq[0, 1] == 0 and bool(jnp.all(jnp.isfinite(dq)))


def _labels_on_masked_classes(where, n=9):
    """Row 0: all the label mass on masked classes; row 1: half of it; row 2:
    none; row 3: one-hot on masked class 2."""
    q = jax.nn.softmax(jax.random.normal(jax.random.key(7), (4, n)))
    valid = jnp.where(where, q, 0.0)
    valid = valid / jnp.sum(valid, -1, keepdims=True)
    off = jnp.where(where, 0.0, q)
    off = off / jnp.sum(off, -1, keepdims=True)
    share = jnp.array([1.0, 0.5, 0.0])[:, None]
    q = share * off[:3] + (1 - share) * valid[:3]
    return jnp.concatenate([q, jax.nn.one_hot(jnp.array([2]), n)])


@pytest.mark.parametrize(
    "opts", OPTIONS + [dict(label_smoothing=1.0)], ids=lambda o: "-".join(o) or "plain"
)
@pytest.mark.parametrize("transform", ["none", "jit", "vmap"])
def test_label_mass_on_masked_classes_sweep(opts, transform):
    logits, _, _ = _data((4, 9), seed=5)
    where = _class_mask(9)
    labels = _labels_on_masked_classes(where)

    def ours(z, q):
        if transform == "vmap":
            return jax.vmap(
                lambda z, q: jsoftmax.softmax_cross_entropy(z, q, where=where, **opts)
            )(z, q)
        return jsoftmax.softmax_cross_entropy(z, q, where=where, **opts)

    f = jax.jit(ours) if transform == "jit" else ours
    loss = f(logits, labels)
    # +inf with any (smoothed) mass on a masked class; label_smoothing 1 puts
    # all of it on the valid classes.
    some_off = opts.get("label_smoothing", 0.0) < 1
    inf_rows = jnp.array([some_off, some_off, False, some_off])
    chex.assert_trees_all_equal(jnp.isposinf(loss), inf_rows)
    want = ref_ce(logits, labels, where=where, **opts)
    chex.assert_trees_all_close(loss, want, atol=1e-5)
    # Gradients w.r.t. the logits and the labels, finite: the masked mass's
    # L term counts in the logits', the masked classes' are 0.
    got = jax.jacrev(f, (0, 1))(logits, labels)
    ref = partial(ref_ce, where=where, **opts)
    chex.assert_trees_all_close(got, jax.jacrev(ref, (0, 1))(logits, labels), atol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)
    assert not jnp.any(jnp.where(where, 0.0, got[0])) and not jnp.any(
        jnp.where(where, 0.0, got[1])
    )
    # The one-hot row is the integer-label loss, value and gradient.
    int_loss, int_grad = jax.value_and_grad(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, jnp.array([2]), where=where, **opts
        )[0]
    )(logits[3:])
    chex.assert_trees_all_close(loss[3], int_loss)
    chex.assert_trees_all_close(got[0][3, 3], int_grad[0], atol=1e-6)
    # Forward mode: the tangent of each loss is J t, also where it is +inf.
    t = (jnp.cos(logits), jnp.sin(labels))
    _, tangent = jax.jvp(f, (logits, labels), t)
    chex.assert_trees_all_close(
        tangent,
        jnp.einsum("bij,ij->b", got[0], t[0]) + jnp.einsum("bij,ij->b", got[1], t[1]),
        atol=1e-5,
    )


def test_label_mass_on_masked_classes_second_derivatives_are_the_references():
    # Masked classes' labels are constants for autodiff in every order, so
    # the Hessian in (logits, labels) is symmetric.
    with jax.enable_x64(True):
        logits, _, _ = _data((4, 9), seed=5)
        logits = logits.astype(jnp.float64)
        where = _class_mask(9)
        labels = _labels_on_masked_classes(where).astype(jnp.float64)
        opts = dict(label_smoothing=0.1, z_loss=0.01, soft_cap=4.0)

        weights = jnp.arange(1.0, 5.0)  # constants: the losses hold +inf

        def total(op):
            return lambda z, q: jnp.sum(weights * op(z, q, where=where, **opts))

        got = jax.jit(jax.hessian(total(jsoftmax.softmax_cross_entropy), (0, 1)))(
            logits, labels
        )
        want = jax.jit(jax.hessian(total(ref_ce), (0, 1)))(logits, labels)
        chex.assert_trees_all_close(got, want, atol=1e-9)
        assert all(bool(jnp.all(jnp.isfinite(h))) for h in jax.tree.leaves(got))
        assert not jnp.any(got[0][1][..., ~where])  # d2/dz dq at masked classes
        chex.assert_trees_all_close(got[0][1], jnp.moveaxis(got[1][0], (0, 1), (2, 3)))
        assert not jnp.any(jnp.where(where, 0.0, got[0][1]))  # d2/dz dq_masked


def test_label_smoothing_1_ignores_the_target_also_on_a_masked_or_neg_inf_class():
    # 0 * -inf made the integer-label loss NaN at label_smoothing=1.
    logits, _, _ = _data((2, 4))
    logits = logits.at[1, 1].set(-jnp.inf)
    where = jnp.array([False, True, True, True])
    ids = jnp.array([0, 1])  # a masked target; a -inf target
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, jax.nn.one_hot(ids, 4)),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, ids),
    ):
        loss = op(logits, labels, where=where, label_smoothing=1.0)
        # Row 0: the uniform target over the valid classes. Row 1: that
        # target puts mass on the -inf logit (huge or +inf, never NaN).
        uniform = jnp.where(where, 1 / 3, 0.0)
        want = ref_ce(logits[:1], uniform[None], where=where)
        chex.assert_trees_all_close(loss[0], want[0], atol=1e-6)
        assert loss[1] > 1e38


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    logits, probs, ids = _data((4, 40))
    z = logits.astype(dtype)
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids)
    chex.assert_type(loss, dtype)
    want = ref_int_ce(z.astype(jnp.float32), ids)
    chex.assert_trees_all_close(loss.astype(jnp.float32), want, atol=1e-2, rtol=1e-2)
    grad = jax.grad(
        lambda z: jnp.sum(jsoftmax.softmax_cross_entropy(z, probs.astype(dtype)))
    )(z)
    chex.assert_type(grad, dtype)
    want = jax.grad(lambda z: jnp.sum(ref_ce(z, probs)))(z.astype(jnp.float32))
    chex.assert_trees_all_close(grad.astype(jnp.float32), want, atol=1e-2, rtol=1e-1)


def test_checkpoint_scan_and_no_leaks():
    logits, probs, ids = _data((6, 8))

    def scan_loss(fn, z):
        def step(c, row):
            return c + jnp.sum(fn(row[None] + c)), None

        return jax.lax.scan(step, 0.0, z)[0]

    ours = partial(jsoftmax.softmax_cross_entropy_with_integer_labels, labels=ids[:1])
    ref = partial(ref_int_ce, labels=ids[:1])
    with checking_leaks():
        got = jax.jit(jax.grad(jax.checkpoint(partial(scan_loss, ours))))(logits)
    chex.assert_trees_all_close(
        got, jax.grad(partial(scan_loss, ref))(logits), atol=1e-5
    )


def test_errors_name_shapes_and_options():
    logits, probs, ids = _data((3, 4))
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 4\)"):
        jsoftmax.softmax_cross_entropy(logits, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(4, int))
    with pytest.raises(TypeError, match="integer"):
        jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(3))
    with pytest.raises(TypeError, match="single int"):
        jsoftmax.softmax_cross_entropy_with_integer_labels(logits, ids, axis=(0, 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        jsoftmax.softmax_cross_entropy(logits, probs, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        jsoftmax.softmax_cross_entropy(logits, probs, z_loss=-1.0)
    with pytest.raises(ValueError, match="soft_cap"):
        jsoftmax.softmax_cross_entropy(logits, probs, soft_cap=0.0)
    with pytest.raises(ValueError, match="out of range"):
        jsoftmax.softmax_cross_entropy(logits, probs, axis=2)
    with pytest.raises(TypeError, match="complex"):
        jsoftmax.softmax_cross_entropy(logits.astype(jnp.complex64), probs)


def test_positive_label_on_neg_inf_logit_is_huge_not_nan():
    logits = jnp.array([[0.0, -jnp.inf, 1.0]])
    zero_label = jnp.array([[0.5, 0.0, 0.5]])
    positive_label = jnp.array([[0.5, 0.5, 0.0]])
    ok = jsoftmax.softmax_cross_entropy(logits, zero_label)
    ref = -jnp.sum(jnp.array([0.5, 0.5]) * jax.nn.log_softmax(jnp.array([0.0, 1.0])))
    chex.assert_trees_all_close(ok, ref[None], atol=1e-6)
    bad = jsoftmax.softmax_cross_entropy(logits, positive_label)
    assert jnp.isfinite(bad).all() and float(bad[0]) > 1e38


# Hardening: integer labels, masking idioms, precision, options.

INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32"]


def _optax_int(z, ids):
    return optax.softmax_cross_entropy_with_integer_labels(z, ids.astype(jnp.int32))


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("rows,classes", [(4, 256), (300, 5), (70_000, 3)])
def test_integer_labels_of_every_dtype_match_optax(dtype, rows, classes):
    # uint8 with 256 classes gave NaN; uint8 on 300 rows and uint16 on 70,000
    # rows gave silently wrong gradients; int8 on 200 rows raised.
    info = jnp.iinfo(dtype)
    classes = min(classes, int(info.max) + 1)
    z = jax.random.normal(jax.random.key(rows), (rows, classes))
    ids = (jnp.arange(rows) * 7 + 3) % classes
    ids = ids.at[0].set(classes - 1).astype(dtype)

    def ours(z):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids)

    def theirs(z):
        return _optax_int(z, ids)

    chex.assert_trees_all_close(ours(z), theirs(z), atol=1e-5, rtol=1e-5)
    g = jax.jit(jax.grad(lambda z: jnp.sum(ours(z) * jnp.cos(ids.astype(float)))))
    want = jax.grad(lambda z: jnp.sum(theirs(z) * jnp.cos(ids.astype(float))))(z)
    chex.assert_trees_all_close(g(z), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["int64", "uint64", "uint32", "int16"])
def test_out_of_range_labels_never_wrap_into_range(dtype):
    # Under x64 an int64 label 2**32 + 1 must not become class 1.
    with jax.enable_x64(True):
        info = jnp.iinfo(dtype)
        bad = [int(info.max), 2**32 + 1 if info.bits == 64 else int(info.max) - 1]
        if info.min < 0:
            bad.append(int(info.min))
        ids = jnp.array(bad, dtype)
        z = jnp.zeros((len(bad), 3), jnp.float32)
        loss = jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids)
        assert jnp.all(jnp.isnan(loss)), loss
        x, w = jnp.ones((len(bad), 2)), jnp.ones((2, 3))
        fused = jsoftmax.linear_softmax_cross_entropy(x, w, ids, reduction="none")
        assert jnp.all(jnp.isnan(fused)), fused


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_numpy_64_bit_labels_past_int32_never_wrap_with_x64_off(dtype):
    # With 64-bit types off (the default), JAX converts a NumPy int64 array
    # to int32 by wrapping: the label 2**32 + 1 read as class 1, silently (as
    # in optax). Such values are clamped to int32's range on the host first:
    # out of range either way, a NaN loss.
    bad = [2**32 + 1, 2**63 - 1 if dtype == np.int64 else 2**64 - 1]
    if dtype == np.int64:
        bad.append(-(2**32) + 1)
    ids = np.array(bad + [1], dtype)
    z = jax.random.normal(jax.random.key(0), (len(ids), 3))
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids)
    assert jnp.all(jnp.isnan(loss[:-1])), loss
    want = optax.softmax_cross_entropy_with_integer_labels(z[-1:], jnp.array([1]))
    np.testing.assert_allclose(loss[-1:], want, rtol=1e-5)
    x, w = jnp.ones((len(ids), 2)), jnp.ones((2, 3))
    fused = jsoftmax.linear_softmax_cross_entropy(x, w, ids, reduction="none")
    assert jnp.all(jnp.isnan(fused[:-1])) and jnp.isfinite(fused[-1]), fused
    # The control: JAX's own conversion wraps (what the ops saw before).
    assert jnp.asarray(ids)[0] == 1


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_export_with_a_symbolic_class_count(dtype):
    # jax.export with V symbolic raised InconclusiveDimensionOperation in the
    # labels' range test (V - 1 >= the dtype's max). Called at several V, the
    # export equals the static op, an out-of-range label's NaN included (the
    # labels' dtype's max, V itself, -1 where signed).
    b, v = jax.export.symbolic_shape("b, v")

    def loss(z, ids):
        out = jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids)
        return jnp.sum(jnp.where(jnp.isnan(out), 0, out)), out

    f = jax.value_and_grad(loss, has_aux=True)
    shapes = (
        jax.ShapeDtypeStruct((b, v), jnp.float32),
        jax.ShapeDtypeStruct((b,), dtype),
    )
    restored = jax.export.deserialize(
        jax.export.export(jax.jit(f))(*shapes).serialize()
    )
    info = jnp.iinfo(dtype)
    for classes in (3, 200, 300):
        ids = [0, classes - 1, classes, int(info.max), 1] + (
            [-1] if info.min < 0 else []
        )
        ids = np.array([i for i in ids if info.min <= i <= info.max], dtype)
        z = jax.random.normal(jax.random.key(classes), (len(ids), classes))
        got, want = restored.call(z, ids), jax.jit(f)(z, ids)
        chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
        nan = np.isnan(np.asarray(want[0][1]))
        assert np.array_equal(nan, (ids.astype(np.int64) < 0) | (ids >= classes))


@pytest.mark.parametrize("jit", [False, True])
def test_minus_100_padding_masked_with_where_has_zero_gradient(jit):
    # jnp.where(keep, loss, 0) on -100 padding gave NaN gradients.
    z, _, ids = _data((6, 7))
    ids = ids.at[jnp.array([1, 4])].set(-100)
    keep = ids != -100

    def masked_mean(z):
        loss = jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids)
        return jnp.sum(jnp.where(keep, loss, 0)) / jnp.sum(keep, dtype=jnp.float32)

    f = (
        jax.jit(jax.value_and_grad(masked_mean))
        if jit
        else jax.value_and_grad(masked_mean)
    )
    value, grad = f(z)
    safe = jnp.where(keep, ids, 0)
    want = jax.value_and_grad(
        lambda z: (
            jnp.sum(jnp.where(keep, _optax_int(z, safe), 0))
            / jnp.sum(keep, dtype=jnp.float32)
        )
    )(z)
    chex.assert_trees_all_close((value, grad), want, atol=1e-6)
    assert not jnp.any(grad[~keep])
    # A cotangent that does reach an out-of-range label stays loud.
    g = jax.grad(
        lambda z: jnp.sum(jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids))
    )(z)
    assert jnp.all(jnp.isnan(g[~keep])) and not jnp.any(jnp.isnan(g[keep]))


@pytest.mark.parametrize("jit", [False, True])
def test_example_mask_of_shape_b1_gives_zero_loss_and_gradient_in_both_losses(jit):
    # An optax-style [B, 1] mask made the integer loss +inf on masked rows
    # while the probability loss gave 0.
    z, q, ids = _data((4, 5))
    keep = jnp.array([[True], [False], [True], [False]])
    rows = keep[:, 0]
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, q),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, ids),
    ):
        for opts in ({}, dict(label_smoothing=0.1, z_loss=0.01, soft_cap=3.0)):

            def f(z, op=op, labels=labels, opts=opts):
                return op(z, labels, where=keep, **opts)

            f = jax.jit(f) if jit else f
            loss = f(z)
            g = jax.grad(lambda z, f=f: jnp.sum(f(z)))(z)
            assert jnp.all(loss[~rows] == 0) and jnp.all(jnp.isfinite(loss))
            assert not jnp.any(g[~rows]) and jnp.all(jnp.isfinite(g))
            unmasked = op(z[rows], labels[rows], **opts)
            chex.assert_trees_all_close(loss[rows], unmasked, atol=1e-6)


def test_all_neg_inf_row_gives_zero_loss_and_gradient_in_both_losses():
    z, q, ids = _data((3, 4))
    z = z.at[1].set(-jnp.inf)
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, q),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, ids),
    ):
        loss, g = jax.value_and_grad(lambda z, op=op, y=labels: op(z, y)[1])(z)
        assert loss == 0 and not jnp.any(g)


@pytest.mark.parametrize(
    "op",
    [
        jsoftmax.softmax_cross_entropy,
        jsoftmax.softmax_cross_entropy_with_integer_labels,
    ],
)
@pytest.mark.parametrize(
    "where",
    [[0.0, 0.0, -1e9, -jnp.inf, 0.0], [1.0, 0.5, 1.0, 1.0, 1.0], [1, 0, 1, 1, 1]],
)
def test_non_boolean_where_is_refused(op, where):
    # An additive mask was read as truth values (inverted), float weights as
    # all-True.
    z, q, ids = _data((2, 5))
    labels = q if op is jsoftmax.softmax_cross_entropy else ids
    with pytest.raises(TypeError, match="boolean.*bias"):
        op(z, labels, where=jnp.array(where))


def _float64_errors(fn, ref64, z32):
    """Largest |gradient - float64 gradient| and |loss - float64 loss|."""
    with jax.enable_x64(True):
        z64 = z32.astype(jnp.float64)
        g64 = np.asarray(jax.grad(lambda z: jnp.sum(ref64(z)))(z64))
        v64 = np.asarray(ref64(z64))
    v, g = fn(z32), jax.grad(lambda z: jnp.sum(fn(z)))(z32)
    return (
        float(np.max(np.abs(np.asarray(g, np.float64) - g64))),
        float(np.max(np.abs(np.asarray(v, np.float64) - v64))),
    )


@pytest.mark.parametrize(
    "scale,offset", [(1.0, 0.0), (1.0, 1e4), (30.0, -3e4), (3.0, 1e6)]
)
@pytest.mark.parametrize("kind", ["probability", "integer"])
def test_precision_at_large_logits_no_worse_than_twice_optax(scale, offset, kind):
    # L * sum(q) - sum(q * z) and exp(z - L) with a large L lost precision:
    # 6.8e-6 gradient error at offset 1e4, against optax's 2.5e-9.
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    z = scale * jax.random.normal(k1, (16, 64)) + offset
    q = jax.nn.softmax(jax.random.normal(k2, (16, 64)))
    ids = jax.random.randint(k3, (16,), 0, 64)
    if kind == "probability":
        ours = partial(jsoftmax.softmax_cross_entropy, labels=q)
        theirs = partial(optax.softmax_cross_entropy, labels=q)
    else:
        ours = partial(jsoftmax.softmax_cross_entropy_with_integer_labels, labels=ids)
        theirs = partial(optax.softmax_cross_entropy_with_integer_labels, labels=ids)

    def ref64(z):
        return (
            theirs(z, labels=jnp.asarray(q, jnp.float64))
            if kind == "probability"
            else theirs(z)
        )

    ours_g, ours_v = _float64_errors(ours, ref64, z)
    optax_g, optax_v = _float64_errors(theirs, ref64, z)
    # A float32 ulp of the compared magnitudes is the floor: gradients are
    # <= 1, losses about log(64) + the spread of the logits.
    eps = float(jnp.finfo(jnp.float32).eps)
    assert ours_g <= 2 * optax_g + eps, (ours_g, optax_g)
    assert ours_v <= 2 * optax_v + eps * (4 + 10 * scale), (ours_v, optax_v)


@pytest.mark.parametrize("kind", ["probability", "integer"])
def test_second_derivatives_with_where_and_soft_cap_have_no_nan(kind):
    # 48 of 64 Hessian entries were NaN: 0 * (1 - inf**2) before masking.
    z, q, ids = _data((2, 4))
    where = jnp.array([True, False, True, True])
    opts = dict(where=where, soft_cap=2.0, label_smoothing=0.1, z_loss=0.01)
    if kind == "probability":
        q = jnp.where(where, q, 0.0)
        ours, ref = (
            partial(jsoftmax.softmax_cross_entropy, labels=q),
            partial(ref_ce, labels=q),
        )
    else:
        ours = partial(jsoftmax.softmax_cross_entropy_with_integer_labels, labels=ids)
        ref = partial(ref_int_ce, labels=ids)
    hess = jax.jacrev(jax.jacrev(lambda z: jnp.sum(ours(z, **opts))))(z)
    want = jax.hessian(lambda z: jnp.sum(ref(z, **opts)))(z)
    assert not jnp.any(jnp.isnan(hess))
    chex.assert_trees_all_close(hess, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["probability", "integer"])
def test_valid_input_computes_no_nan_intermediate(kind):
    # jax_debug_nans and checkify flagged where + soft_cap on valid input.
    from jax.experimental import checkify

    z, q, ids = _data((3, 5))
    where = jnp.array([True, False, True, True, False])
    # Valid labels: none on a masked class.
    labels = jnp.where(where, q, 0.0) if kind == "probability" else jnp.array([0, 2, 3])
    op = (
        jsoftmax.softmax_cross_entropy
        if kind == "probability"
        else jsoftmax.softmax_cross_entropy_with_integer_labels
    )

    def f(z):
        return jnp.sum(op(z, labels, where=where, soft_cap=2.0, label_smoothing=0.1))

    with jax.debug_nans(True):
        jax.grad(f)(z)
        jax.jit(jax.grad(f))(z)
    err, _ = checkify.checkify(jax.jit(jax.grad(f)), errors=checkify.nan_checks)(z)
    assert err.get() is None, err.get()


@pytest.mark.parametrize(
    "dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
)
def test_float8_with_where_is_computed_in_float32(dtype):
    # -inf has no float8_e4m3fn encoding: the mask fill turned every entry NaN.
    z, q, ids = _data((3, 5))
    where = jnp.array([True, False, True, True, True])
    z8 = z.astype(dtype)
    z32 = z8.astype(jnp.float32)
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, q),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, ids),
    ):
        got = op(z8, labels, where=where)
        assert got.dtype == jnp.dtype(dtype)
        want = op(z32, labels, where=where).astype(dtype)
        chex.assert_trees_all_close(got.astype(float), want.astype(float))
        g = jax.grad(lambda z, op=op, y=labels: jnp.sum(op(z, y, where=where)))(z8)
        assert g.dtype == jnp.dtype(dtype) and not jnp.any(jnp.isnan(g.astype(float)))


BAD_OPTIONS = [
    (dict(soft_cap=jnp.inf), ValueError, "soft_cap must be finite"),
    (dict(soft_cap=float("nan")), ValueError, "soft_cap must be finite"),
    (dict(soft_cap=0.0), ValueError, "soft_cap must be > 0"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be finite"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be finite"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be >= 0"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a real"),
    (dict(label_smoothing=True), TypeError, "label_smoothing must be a real"),
    (dict(label_smoothing=[0.1]), TypeError, "label_smoothing must be a real"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(z_loss=None), TypeError, "z_loss must be a real"),
    (dict(soft_cap="2"), TypeError, "soft_cap must be a real"),
]


@pytest.mark.parametrize("opts,error,match", BAD_OPTIONS, ids=str)
def test_bad_options_are_refused_by_name_in_every_loss(opts, error, match):
    z, q, ids = _data((2, 5))
    x, w = jnp.ones((2, 3)), jnp.ones((3, 5))
    calls = [
        lambda: jsoftmax.softmax_cross_entropy(z, q, **opts),
        lambda: jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids, **opts),
        lambda: jsoftmax.linear_softmax_cross_entropy(x, w, ids, **opts),
    ]
    for call in calls:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("arg", ["label_smoothing", "z_loss", "soft_cap"])
def test_traced_options_name_the_argument(arg):
    z, q, ids = _data((2, 5))
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, q),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, ids),
    ):
        f = jax.jit(lambda v, op=op, y=labels: op(z, y, **{arg: v}))
        with pytest.raises(TypeError, match=f"{arg} must be a static number"):
            f(0.1)


@pytest.mark.parametrize(
    "dtype",
    [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64],
    ids=lambda d: jnp.dtype(d).name,
)
@pytest.mark.parametrize("array", [np.array, jnp.array])
def test_zero_d_options_of_every_float_dtype_are_accepted_in_every_loss(dtype, array):
    # A 0-d bfloat16 option was refused (not a numpy number), float16 not.
    z, q, ids = _data((2, 5))
    x, w = jnp.ones((2, 3)), jnp.ones((3, 5))
    with jax.enable_x64(dtype == jnp.float64):
        opts = {
            name: array(value, dtype=dtype)
            for name, value in (
                ("label_smoothing", 0.1),
                ("z_loss", 0.3),
                ("soft_cap", 2.0),
            )
        }
        same = {name: float(value) for name, value in opts.items()}
        for op, args in (
            (jsoftmax.softmax_cross_entropy, (z, q)),
            (jsoftmax.softmax_cross_entropy_with_integer_labels, (z, ids)),
            (jsoftmax.linear_softmax_cross_entropy, (x, w, ids)),
        ):
            np.testing.assert_array_equal(op(*args, **opts), op(*args, **same))


def test_numpy_and_concrete_jax_scalars_are_accepted_as_options_and_axis():
    z, q, ids = _data((2, 5))
    want = jsoftmax.softmax_cross_entropy_with_integer_labels(
        z, ids, label_smoothing=0.1, soft_cap=3.0
    )
    got = jsoftmax.softmax_cross_entropy_with_integer_labels(
        z, ids, axis=jnp.array(-1), label_smoothing=jnp.float32(0.1),
        soft_cap=jnp.array(3.0),
    )  # fmt: skip
    chex.assert_trees_all_close(got, want)

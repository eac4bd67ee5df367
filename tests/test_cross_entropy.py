"""Per-example cross-entropy: values and gradients against the plain definition."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax._src.ad_checkpoint import saved_residuals

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
    # optax wants the mask at the full logits shape.
    where = jnp.broadcast_to(_class_mask(33), logits.shape)
    chex.assert_trees_all_close(
        jsoftmax.softmax_cross_entropy(logits, probs, where=where),
        optax.softmax_cross_entropy(logits, probs, where=where),
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
        lambda z: ref_ce(z, probs, axis=axis),
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


def test_saves_logits_labels_and_row_logsumexp_only():
    logits, probs, ids = _data((8, 16))
    res = saved_residuals(jsoftmax.softmax_cross_entropy, logits, probs)
    # logits, labels, and per row: logsumexp and the label sum.
    assert sorted(a.shape for a, _ in res) == [(8, 1), (8, 1), (8, 16), (8, 16)]
    res = saved_residuals(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids), logits
    )
    assert sum(a.size for a, _ in res) <= logits.size + 2 * 8


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
    loss, grads = jax.value_and_grad(
        lambda z, q: jnp.sum(jsoftmax.softmax_cross_entropy(z, q, where=where)), (0, 1)
    )(logits, probs)
    assert bool(jnp.isfinite(loss))
    chex.assert_trees_all_equal(grads[0][1], jnp.zeros(4))
    chex.assert_trees_all_equal(grads[1][1], jnp.zeros(4))


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
    with jax.checking_leaks():
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

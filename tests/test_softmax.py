"""softmax and log_softmax: values, VJPs, masks, dtypes, errors, transforms."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax._src.ad_checkpoint import saved_residuals
from leaks import checking_leaks

import jsoftmax
from jsoftmax import testing
from jsoftmax.testing import reference_log_softmax as ref_log_softmax
from jsoftmax.testing import reference_softmax as ref_softmax

OPS = {
    "softmax": (jsoftmax.softmax, ref_softmax, jax.nn.softmax),
    "log_softmax": (jsoftmax.log_softmax, ref_log_softmax, jax.nn.log_softmax),
}
op_names = pytest.mark.parametrize("name", list(OPS))

SHAPES_AXES = [
    ((7,), -1),
    ((7,), 0),
    ((3, 5), -1),
    ((3, 5), 0),
    ((2, 3, 4), 1),
    ((2, 3, 4), -2),
    ((2, 3, 4), (0, 2)),
    ((2, 3, 4), (-1, 0)),
    ((2, 3, 4), None),
    ((1, 1), -1),
]


def _normal(shape, seed=0, scale=3.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


@op_names
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("jit", [False, True])
def test_value_matches_jax_nn(name, shape, axis, jit):
    op, _, nn_op = OPS[name]
    x = _normal(shape)
    f = partial(op, axis=axis)
    got = (jax.jit(f) if jit else f)(x)
    chex.assert_shape(got, shape)
    chex.assert_type(got, jnp.float32)
    chex.assert_trees_all_close(got, nn_op(x, axis=axis), atol=1e-6, rtol=1e-6)


@op_names
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_jacobian_matches_reference_and_jax_nn(name, shape, axis):
    op, ref, nn_op = OPS[name]
    x = _normal(shape, seed=1)
    testing.assert_vjp_matches(
        partial(op, axis=axis), partial(ref, axis=axis), x, transforms=("none", "jit")
    )
    testing.assert_vjp_matches(
        partial(op, axis=axis), partial(nn_op, axis=axis), x, transforms=("none",)
    )


@op_names
@pytest.mark.parametrize(
    "shape,axis", [((4, 6), -1), ((3, 2, 5), 1), ((3, 2, 5), None)]
)
def test_vmap_matches_reference(name, shape, axis):
    op, ref, _ = OPS[name]
    x = _normal(shape, seed=2)
    testing.assert_vjp_matches(
        partial(op, axis=axis), partial(ref, axis=axis), x, transforms=("vmap",)
    )


MASK_CASES = [
    # (shape, axis, mask shape): masks broadcast against x.
    ((4, 6), -1, (4, 6)),
    ((4, 6), -1, (6,)),
    ((4, 6), 0, (4, 1)),
    ((2, 3, 5), (1, 2), (2, 3, 5)),
]


def _mask(shape, seed):
    mask = jax.random.bernoulli(jax.random.key(seed), 0.6, shape)
    # Keep at least one valid entry in every row: rows with none are tested apart.
    return mask.at[..., 0].set(True)


@op_names
@pytest.mark.parametrize("shape,axis,mask_shape", MASK_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_masked_value_and_jacobian(name, shape, axis, mask_shape, jit):
    op, ref, nn_op = OPS[name]
    x = _normal(shape, seed=3)
    where = _mask(mask_shape, seed=4)
    f = partial(op, axis=axis, where=where)
    got = (jax.jit(f) if jit else f)(x)
    chex.assert_trees_all_close(got, nn_op(x, axis=axis, where=where), atol=1e-6)
    masked_value = 0.0 if name == "softmax" else -jnp.inf
    full_where = jnp.broadcast_to(where, shape)
    assert bool(jnp.all(jnp.where(full_where, True, got == masked_value)))
    testing.assert_vjp_matches(
        f, partial(ref, axis=axis, where=where), x, transforms=("none", "jit")
    )


@op_names
def test_vmap_batched_where_and_in_axes(name):
    op, ref, _ = OPS[name]
    x = _normal((5, 3, 6), seed=5)
    where = _mask((3, 5, 6), seed=6)  # batch axis of the mask is axis 1

    def loss(fn, x, where):
        return jnp.sum(jnp.where(where, fn(x, where=where), 0.0) @ jnp.arange(6.0))

    got = jax.vmap(jax.grad(partial(loss, op)), in_axes=(0, 1))(x, where)
    want = jax.vmap(jax.grad(partial(loss, ref)), in_axes=(0, 1))(x, where)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    # in_axes on a non-leading axis of x, and nested vmap.
    xt = jnp.moveaxis(x, 0, 2)  # (3, 6, 5)
    nested = jax.vmap(jax.vmap(jax.grad(partial(loss, op))), in_axes=(2, 1))
    got = nested(xt, where)
    chex.assert_trees_all_close(got, want, atol=1e-6)


@op_names
def test_finite_differences_second_order_float64(name):
    op, _, _ = OPS[name]
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(7), (3, 4), jnp.float64)
        where = jnp.array([True, False, True, True])
        testing.assert_finite_differences(op, x, order=2)
        testing.assert_finite_differences(
            lambda x: jnp.where(where, op(x, where=where), 0.0), x, order=2
        )
        testing.assert_finite_differences(partial(op, axis=(0, 1)), x, order=2)


@op_names
def test_float64_matches_reference_to_float64_precision(name):
    op, ref, _ = OPS[name]
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(8), (3, 5), jnp.float64)
        got = op(x)
        chex.assert_type(got, jnp.float64)
        testing.assert_vjp_matches(op, ref, x, transforms=("none",))


@op_names
def test_reverse_over_reverse_equals_hessian_of_reference(name):
    op, ref, _ = OPS[name]
    x = _normal((6,), seed=9, scale=1.0)
    weights = jnp.linspace(-1.0, 2.0, 6)

    def scalar(fn):
        return lambda x: jnp.sum(weights * jnp.tanh(fn(x)))

    got = jax.jacrev(jax.jacrev(scalar(op)))(x)
    want = jax.hessian(scalar(ref))(x)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=2e-3)
    # Vector-valued: the full second derivative tensor.
    got = jax.jacrev(jax.jacrev(op))(x)
    want = jax.jacfwd(jax.jacrev(ref))(x)
    chex.assert_shape(got, (6, 6, 6))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=2e-3)


@op_names
def test_reverse_over_reverse_of_masked_rows_is_finite(name):
    # A loss that is NaN-free only where the mask is set (sin of -inf is NaN):
    # the jnp.where idiom. A row with no valid entry, one half masked, one
    # whole. Reverse over reverse differentiates fwd itself, whose masked
    # outputs must be constants there, as jax.nn's are.
    op, _, nn_op = OPS[name]
    with jax.enable_x64(True):
        x = _normal((3, 5), seed=4, scale=1.0).astype(jnp.float64)
        mask = jnp.arange(5)[None] < jnp.array([0, 3, 5])[:, None]

        def scalar(fn):
            return lambda x: jnp.sum(jnp.where(mask, jnp.sin(fn(x, where=mask)), 0.0))

        got = jax.jacrev(jax.jacrev(scalar(op)))(x)
        want = jax.jacrev(jax.jacrev(scalar(nn_op)))(x)
        assert jnp.isfinite(want).all()
        chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-9)


def _residual_elements(fn, *args):
    return sum(int(np.prod(aval.shape)) for aval, _ in saved_residuals(fn, *args))


@op_names
def test_saves_only_the_output(name):
    op, _, nn_op = OPS[name]
    x = _normal((8, 16))
    residuals = saved_residuals(op, x)
    assert len(residuals) == 1
    assert residuals[0][0].shape == x.shape
    assert _residual_elements(op, x) == x.size
    # jax.nn's default rule saves more than the output.
    assert _residual_elements(nn_op, x) > x.size


def test_softmax_saves_only_the_output_and_the_mask():
    x = _normal((8, 16))
    where = _mask((16,), seed=10)
    # The mask is saved as given, unbroadcast, whether closed over or an input.
    f = jsoftmax.softmax
    assert _residual_elements(lambda x: f(x, where=where), x) == x.size + 16
    assert _residual_elements(lambda x, w: f(x, where=w), x, where) == x.size + 16


def test_log_softmax_saves_the_output_and_the_unbroadcast_mask():
    # The mask tells masked -inf outputs (no cotangent) from -inf inputs (the
    # cotangent passes), so it is saved as given; without one, only the output.
    x = _normal((8, 16))
    where = _mask((16,), seed=10)
    f = jsoftmax.log_softmax
    assert _residual_elements(f, x) == x.size
    assert _residual_elements(lambda x: f(x, where=where), x) == x.size + 16
    assert _residual_elements(lambda x, w: f(x, where=w), x, where) == x.size + 16


@op_names
@pytest.mark.parametrize("fill", [1e30, 3e38, jnp.inf, jnp.nan])
def test_masked_huge_logit_grad_is_zero(name, fill):  # JAX issues 19490 and 17117
    op, _, _ = OPS[name]
    x = jnp.array([[1.0, fill, 2.0, fill], [fill, 0.5, -1.0, 3.0]])
    where = jnp.array([[True, False, True, False], [False, True, True, True]])
    y = op(x, where=where)
    assert bool(jnp.all(jnp.isfinite(jnp.where(where, y, 0.0))))
    cotangent = jnp.array([[1.0, 5.0, -2.0, 7.0], [3.0, 1.0, 2.0, -1.0]])
    _, vjp = jax.vjp(lambda x: op(x, where=where), x)
    (dx,) = vjp(cotangent)
    assert bool(jnp.all(jnp.isfinite(dx)))
    assert bool(jnp.all(jnp.where(where, True, dx == 0.0)))
    # Valid entries get the gradient of the softmax over valid entries only.
    _, ref, _ = OPS[name]
    x_valid = jnp.where(where, x, 0.0)
    _, ref_vjp = jax.vjp(lambda x: ref(x, where=where), x_valid)
    (want,) = ref_vjp(jnp.where(where, cotangent, 0.0))
    chex.assert_trees_all_close(jnp.where(where, dx, 0.0), want, atol=1e-6)


@op_names
@pytest.mark.parametrize("how", ["masked", "neg_inf"])
@pytest.mark.parametrize("jit", [False, True])
def test_row_with_no_valid_entry_is_zero_or_neg_inf_with_zero_grad(name, how, jit):
    op, _, _ = OPS[name]
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 1.0, -1.0]])
    if how == "masked":
        where = jnp.array([[True, True, True], [False, False, False], [True] * 3])
    else:
        where = None
        x = x.at[1].set(-jnp.inf)
    f = jax.jit(partial(op, where=where)) if jit else partial(op, where=where)
    y = f(x)
    empty_value = 0.0 if name == "softmax" else -jnp.inf
    chex.assert_trees_all_equal(y[1], jnp.full((3,), empty_value))
    assert not bool(jnp.any(jnp.isnan(y)))
    chex.assert_trees_all_close(y[0], OPS[name][2](x[0]), atol=1e-6)
    _, vjp = jax.vjp(f, x)
    (dx,) = vjp(jnp.ones_like(x) * jnp.array([[1.0], [2.0], [3.0]]))
    chex.assert_trees_all_equal(dx[1], jnp.zeros(3))
    assert bool(jnp.all(jnp.isfinite(dx)))
    jac = jax.jacrev(f)(x)
    assert not bool(jnp.any(jnp.isnan(jac)))
    chex.assert_trees_all_equal(jac[1], jnp.zeros((3, 3, 3)))


def test_jax_nn_softmax_is_nan_on_all_neg_inf_row_and_we_are_not():
    x = jnp.full((3,), -jnp.inf)
    assert bool(jnp.all(jnp.isnan(jax.nn.softmax(x))))
    chex.assert_trees_all_equal(jsoftmax.softmax(x), jnp.zeros(3))


@op_names
def test_partial_neg_inf_row_behaves_like_jax_nn(name):
    op, _, nn_op = OPS[name]
    x = jnp.array([[0.5, -jnp.inf, 2.0, -1.0], [-jnp.inf, 1.0, -jnp.inf, 0.0]])
    chex.assert_trees_all_close(op(x), nn_op(x), atol=1e-6)
    cotangent = jnp.array([[1.0, 2.0, -3.0, 0.5], [0.25, -1.0, 4.0, 2.0]])
    got = jax.vjp(op, x)[1](cotangent)[0]
    want = jax.vjp(nn_op, x)[1](cotangent)[0]
    chex.assert_trees_all_close(got, want, atol=1e-6)


@op_names
def test_pos_inf_makes_the_row_nan_like_jax_nn(name):
    op, _, nn_op = OPS[name]
    x = jnp.array([[1.0, jnp.inf, 0.0], [1.0, 2.0, 3.0]])
    y = op(x)
    assert bool(jnp.all(jnp.isnan(y[0])))
    assert bool(jnp.all(jnp.isnan(nn_op(x)[0])))
    chex.assert_trees_all_close(y[1], nn_op(x)[1], atol=1e-6)


@op_names
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_nan_and_pos_inf_rows_have_nan_gradients(name, masked, jit):
    # The empty-row guard must not turn a NaN row's gradient into a silent 0.
    op = OPS[name][0]
    x = jnp.array(
        [[1.0, jnp.nan, 0.0], [1.0, jnp.inf, 0.0], [1.0, 2.0, 3.0], [-jnp.inf] * 3]
    )
    where = jnp.array([True, True, False]) if masked else None
    cotangent = jnp.array([[2.0, 1.0, -1.0]] * 4)

    def vjp(x, g):
        return jax.vjp(lambda x: op(x, where=where), x)[1](g)[0]

    dx = (jax.jit(vjp) if jit else vjp)(x, cotangent)
    assert bool(jnp.all(jnp.isnan(dx[:2])))
    assert bool(jnp.all(jnp.isfinite(dx[2]))) and not bool(jnp.any(dx[3]))


def test_huge_logits_are_stable():
    chex.assert_trees_all_equal(
        jsoftmax.softmax(jnp.array([1e30, 0.0])), jnp.array([1.0, 0.0])
    )
    chex.assert_trees_all_close(
        jsoftmax.log_softmax(jnp.array([1e30, 0.0]))[0], jnp.float32(0.0)
    )
    x = jnp.array([3e38, 1e38, -3e38, 0.0])
    for op in (jsoftmax.softmax, jsoftmax.log_softmax):
        dx = jax.grad(lambda x, op=op: jnp.sum(op(x) * jnp.arange(4.0)))(x)
        assert bool(jnp.all(jnp.isfinite(dx)))
        assert bool(jnp.all(jnp.isfinite(op(x)) | (op(x) == -jnp.inf)))


@op_names
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_computes_in_float32_and_keeps_dtype(name, dtype):
    op, ref, _ = OPS[name]
    x = _normal((4, 33), seed=11, dtype=dtype)
    y = op(x)
    chex.assert_type(y, dtype)
    # Computed in float32 and rounded once: equal to the float32 result, rounded.
    chex.assert_trees_all_equal(y, op(x.astype(jnp.float32)).astype(dtype))
    cotangent = _normal((4, 33), seed=12, scale=1.0, dtype=dtype)
    (dx,) = jax.vjp(op, x)[1](cotangent)
    chex.assert_type(dx, dtype)
    y32 = y.astype(jnp.float32)
    g32 = cotangent.astype(jnp.float32)
    if name == "softmax":
        want = y32 * (g32 - jnp.sum(g32 * y32, -1, keepdims=True))
    else:
        want = g32 - jnp.exp(y32) * jnp.sum(g32, -1, keepdims=True)
    chex.assert_trees_all_equal(dx, want.astype(dtype))
    testing.assert_vjp_matches(op, ref, x, transforms=("none", "jit", "vmap"))


@op_names
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_bool_inputs_are_promoted_like_jax_nn(name, dtype):
    op, _, nn_op = OPS[name]
    x = jnp.array([[0, 1, 2], [3, 1, 0]]).astype(dtype)
    y = op(x)
    chex.assert_type(y, jnp.float32)
    chex.assert_trees_all_close(y, nn_op(x.astype(jnp.float32)), atol=1e-6)


@op_names
def test_complex_input_is_a_type_error(name):
    op, _, _ = OPS[name]
    with pytest.raises(TypeError, match="complex"):
        op(jnp.ones(3, jnp.complex64))


@op_names
@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range_names_axis_and_shape(name, axis):
    op, _, _ = OPS[name]
    with pytest.raises(ValueError, match=r"out of range.*\(3, 4\)"):
        op(jnp.ones((3, 4)), axis=axis)


@op_names
def test_duplicate_axes_are_rejected(name):
    op, _, _ = OPS[name]
    with pytest.raises(ValueError, match="twice"):
        op(jnp.ones((3, 4)), axis=(1, -1))


@op_names
def test_where_that_does_not_broadcast_names_both_shapes(name):
    op, _, _ = OPS[name]
    with pytest.raises(ValueError, match=r"\(5,\).*\(3, 4\)"):
        op(jnp.ones((3, 4)), where=jnp.ones(5, bool))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(3, 4\)"):
        op(jnp.ones((3, 4)), where=jnp.ones((2, 3, 4), bool))


@op_names
def test_errors_are_raised_at_trace_time_under_jit(name):
    op, _, _ = OPS[name]
    with pytest.raises(ValueError, match="out of range"):
        jax.jit(partial(op, axis=3))(jnp.ones((3, 4)))


@op_names
def test_value_and_grad_vjp_checkpoint_scan(name):
    op, ref, _ = OPS[name]
    x = _normal((5, 7), seed=13)
    w = jnp.linspace(-1.0, 1.0, 7)

    def loss(fn, x):
        return jnp.sum(jnp.sin(fn(x)) * w[None])

    val, grad = jax.value_and_grad(partial(loss, op))(x)
    val_ref, grad_ref = jax.value_and_grad(partial(loss, ref))(x)
    chex.assert_trees_all_close((val, grad), (val_ref, grad_ref), atol=1e-5)

    chex.assert_trees_all_close(
        jax.grad(jax.checkpoint(partial(loss, op)))(x), grad_ref, atol=1e-6
    )

    def scan_loss(fn, x):
        def step(carry, row):
            out = fn(row + carry)
            return out * 0.5, jnp.sum(out * w)

        _, per_row = jax.lax.scan(step, jnp.zeros(7), x)
        return jnp.sum(per_row)

    chex.assert_trees_all_close(
        jax.jit(jax.grad(partial(scan_loss, op)))(x),
        jax.grad(partial(scan_loss, ref))(x),
        atol=1e-5,
    )


@op_names
def test_no_tracer_leaks(name):
    op, _, _ = OPS[name]
    x = _normal((3, 4))
    with checking_leaks():
        jax.jit(jax.grad(lambda x: jnp.sum(op(x, where=x > 0) ** 2)))(x)
        jax.vmap(jax.jacrev(op))(x)


def test_checking_leaks_catches_a_tracer_kept_in_an_older_object():
    # tests/leaks.py freezes the objects made before its block: a tracer
    # leaked into one of them (a list made before, as a cache would be) is
    # still found, and so is one leaked by an op's rule under transformation.
    kept = []
    with pytest.raises(Exception, match="Leaked"):
        with checking_leaks():
            jax.jit(lambda x: kept.append(x) or x)(1.0)

    def leaky_softmax(x):
        kept.append(x)
        return jsoftmax.softmax(x)

    with pytest.raises(Exception, match="Leaked"):
        with checking_leaks():
            jax.jit(jax.grad(lambda x: leaky_softmax(x)[0]))(jnp.ones(3))


@op_names
def test_forward_mode_matches_jax_nn(name):
    # Documented in the README: with_forward_mode gives the custom_vjp a JVP
    # (tests/test_forward_mode.py checks it under every transformation).
    op, nn_op, _ = OPS[name]
    x, t = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 1.0, -2.0])
    chex.assert_trees_all_close(
        jax.jvp(op, (x,), (t,)), jax.jvp(nn_op, (x,), (t,)), atol=1e-6, rtol=1e-6
    )


# Property tests over random values. Shapes come from a small set so that each
# compiles once; the values are what hypothesis explores.
_rows = hnp.arrays(
    np.float32,
    st.sampled_from([(1,), (2,), (7,), (3, 4), (2, 3, 5)]),
    elements=st.floats(-30, 30, width=32),
)


@settings(max_examples=40, deadline=None)
@given(x=_rows, shift=st.floats(-50, 50, width=32))
def test_property_rows_sum_to_one_and_shift_invariance(x, shift):
    y = jsoftmax.softmax(x)
    chex.assert_trees_all_close(jnp.sum(y, -1), jnp.ones(x.shape[:-1]), atol=1e-5)
    assert bool(jnp.all(y >= 0))
    chex.assert_trees_all_close(jsoftmax.softmax(x + shift), y, atol=1e-5)
    chex.assert_trees_all_close(
        jnp.exp(jsoftmax.log_softmax(x)), y, atol=1e-6, rtol=1e-5
    )


@settings(max_examples=40, deadline=None)
@given(x=_rows, seed=st.integers(0, 2**31 - 1))
def test_property_gradient_sums_to_zero_along_axis(x, seed):
    g = jax.random.normal(jax.random.key(seed), x.shape)
    for op in (jsoftmax.softmax, jsoftmax.log_softmax):
        (dx,) = jax.vjp(op, jnp.asarray(x))[1](g)
        scale = 1.0 + jnp.max(jnp.abs(g))
        chex.assert_trees_all_close(
            jnp.sum(dx, -1) / scale, jnp.zeros(x.shape[:-1]), atol=1e-5
        )


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.sampled_from([(1,), (2,), (5,), (8,)]),
        elements=st.floats(-20, 20, width=32),
    )
)
def test_property_jacobian_symmetric_and_matches_jacrev(x):
    y = jsoftmax.softmax(x)
    jac = jsoftmax.softmax_jacobian(y)
    chex.assert_trees_all_close(jac, jac.T, atol=1e-7)
    chex.assert_trees_all_close(jac, jax.jacrev(jsoftmax.softmax)(x), atol=1e-6)
    chex.assert_trees_all_close(jac, jax.jacrev(ref_softmax)(x), atol=1e-6)


# Hardening: masks, 8-bit floats, axis values.


@op_names
@pytest.mark.parametrize("jit", [False, True])
def test_all_true_mask_changes_nothing_even_with_neg_inf_inputs(name, jit):
    # log_softmax(x, where=all True) gave [-.08, 0, .08] where jax.nn and the
    # unmasked op give [-.61, 2, -1.39].
    op, _, nn_op = OPS[name]
    x = jnp.array([[0.5, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, -jnp.inf], [1, 2, 3.0]])
    g = jnp.array([[1.0, 2.0, 0.0], [1.0, -1.0, 3.0], [0.5, 0.0, -2.0]])
    everywhere = jnp.ones(3, bool)

    def vjp(where):
        f = partial(op, where=where)
        f = jax.jit(f) if jit else f
        y, pullback = jax.vjp(f, x)
        return y, pullback(g)[0]

    chex.assert_trees_all_equal(vjp(everywhere), vjp(None))
    y, dx = vjp(everywhere)
    want_y, nn_pullback = jax.vjp(nn_op, x[::2])
    chex.assert_trees_all_close(y[::2], want_y, atol=1e-6)
    chex.assert_trees_all_close(dx[::2], nn_pullback(g[::2])[0], atol=1e-6)


@op_names
@pytest.mark.parametrize(
    "where", [[0.0, 0.0, -1e9, -jnp.inf], [1.0, 0.5, 1.0, 1.0], [1, 0, 1, 1]]
)
def test_non_boolean_where_is_refused(name, where):
    # An additive mask was inverted, float weights acted as all-True. jax.nn
    # refuses non-boolean where too.
    op, _, _ = OPS[name]
    with pytest.raises(TypeError, match="boolean.*bias"):
        op(jnp.zeros(4), where=jnp.array(where))


@op_names
@pytest.mark.parametrize(
    "dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
)
def test_float8_with_where_is_computed_in_float32(name, dtype):
    # -inf has no float8_e4m3fn encoding: the mask fill made every entry NaN.
    op, _, _ = OPS[name]
    x8 = _normal((3, 6), scale=1.0).astype(dtype)
    where = jnp.array([True, True, False, True, False, True])
    got = op(x8, where=where)
    assert got.dtype == jnp.dtype(dtype)
    want = op(x8.astype(jnp.float32), where=where).astype(dtype)
    # log_softmax's masked -inf is NaN in the formats that have no infinity.
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(want, np.float32)
    )
    valid = jnp.broadcast_to(where, x8.shape)
    assert not jnp.any(jnp.isnan(got.astype(jnp.float32))[valid])
    g = jax.grad(lambda x: jnp.sum(jnp.where(where, op(x, where=where), 0)))(x8)
    assert g.dtype == jnp.dtype(dtype)
    assert not jnp.any(jnp.isnan(g.astype(jnp.float32)))


@op_names
def test_axis_as_a_concrete_array_and_bad_axis_values(name):
    # axis=jnp.array(0) failed with "iteration over a 0-d array"; jax.nn
    # accepts it.
    op, _, nn_op = OPS[name]
    x = _normal((3, 4))
    chex.assert_trees_all_close(op(x, axis=jnp.array(0)), nn_op(x, axis=0), atol=1e-6)
    chex.assert_trees_all_close(op(x, axis=np.int64(-1)), nn_op(x, axis=-1), atol=1e-6)
    # A list of axes is read as the tuple (jax.nn.softmax takes one too).
    chex.assert_trees_all_equal(op(x, axis=[1, 0]), op(x, axis=(0, 1)))
    for bad in (1.0, "0", True, [0.5]):
        with pytest.raises(TypeError, match="axis must be"):
            op(x, axis=bad)
    with pytest.raises(TypeError, match="axis must be static"):
        jax.jit(lambda a: op(x, axis=a))(0)


@op_names
@pytest.mark.parametrize("shape,axis", [((3, 0), -1), ((0, 4), 0), ((2, 0, 3), (1, 2))])
@pytest.mark.parametrize("jit", [False, True])
def test_empty_axis_has_an_empty_value_and_gradient_as_in_jax_nn(
    name, shape, axis, jit
):
    # log_softmax's backward took the max of an empty axis (no identity).
    ours, _, nn = OPS[name]
    for f in (ours, nn):
        value_and_grad = jax.value_and_grad(lambda x, f=f: jnp.sum(f(x, axis)))
        total, dx = (jax.jit(value_and_grad) if jit else value_and_grad)(
            jnp.ones(shape)
        )
        assert total == 0 and dx.shape == shape


# op of (x [B, D], mask) -> per-row values; the mask's shapes besides [B, D]
WHERE_OPS = {
    "softmax": (lambda x, m: jsoftmax.softmax(x, where=m), [(1, 9)]),
    "log_softmax": (lambda x, m: jsoftmax.log_softmax(x, where=m), [(1, 9)]),
    "softmax_cross_entropy": (
        lambda x, m: jsoftmax.softmax_cross_entropy(x, jax.nn.softmax(x), where=m),
        [(1, 9)],
    ),
    "integer_labels": (
        lambda x, m: jsoftmax.softmax_cross_entropy_with_integer_labels(
            x, jnp.zeros(x.shape[:1], jnp.int32), where=m
        ),
        [(1, 9)],
    ),
    "linear_softmax_cross_entropy": (  # x [B, 9] @ w [9, 5]; where: [B] tokens
        lambda x, m: jsoftmax.linear_softmax_cross_entropy(
            x, jnp.ones((9, 5)), jnp.zeros(x.shape[:1], jnp.int32), where=m[:, 0]
        ),
        [],
    ),
}


@pytest.mark.parametrize("name", sorted(WHERE_OPS))
def test_where_under_a_symbolic_batch(name):
    # jax.export with a symbolic batch raised TypeError in the mask's shape
    # check (NumPy's broadcast_shapes takes no symbolic dimension); jax.nn
    # exports. Called at two batch sizes, the export equals jit's gradient.
    op, other_masks = WHERE_OPS[name]
    (b,) = jax.export.symbolic_shape("b")

    def f(x, m):
        out = op(x, m)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0))

    grad = jax.jit(jax.grad(f))
    for mask_shape in [(b, 9), *other_masks]:
        shapes = (
            jax.ShapeDtypeStruct((b, 9), jnp.float32),
            jax.ShapeDtypeStruct(mask_shape, jnp.bool_),
        )
        restored = jax.export.deserialize(jax.export.export(grad)(*shapes).serialize())
        for batch in (1, 3):
            x = jax.random.normal(jax.random.key(batch), (batch, 9))
            size = [batch if d is b else d for d in mask_shape]
            m = jnp.arange(np.prod(size)).reshape(size) % 3 != 0
            chex.assert_trees_all_equal(restored.call(x, m), grad(x, m))

"""softmax_jacobian: the textbook Jacobian, checked against autodiff row by row."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jsoftmax
from jsoftmax.testing import reference_softmax as ref_softmax


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_entries_follow_the_textbook_derivation(n):
    x = jax.random.normal(jax.random.key(n), (n,))
    y = jsoftmax.softmax(x)
    jac = jsoftmax.softmax_jacobian(y)
    chex.assert_shape(jac, (n, n))
    for i in range(n):
        for j in range(n):
            want = y[i] * (1 - y[i]) if i == j else -y[i] * y[j]
            chex.assert_trees_all_close(jac[i, j], want, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True])
def test_rows_equal_autodiff_row_by_row(jit):
    x = 2.0 * jax.random.normal(jax.random.key(1), (6,))
    jac_fn = jax.jit(jsoftmax.softmax_jacobian) if jit else jsoftmax.softmax_jacobian
    jac = jac_fn(jsoftmax.softmax(x))
    for i in range(6):
        # Row i is the gradient of y_i alone.
        row = jax.grad(lambda x, i=i: ref_softmax(x)[i])(x)
        chex.assert_trees_all_close(jac[i], row, atol=1e-7)
    chex.assert_trees_all_close(jac, jax.jacrev(ref_softmax)(x), atol=1e-7)


def test_batched_leading_axes_and_vmap():
    x = jax.random.normal(jax.random.key(2), (2, 3, 5))
    y = jsoftmax.softmax(x)
    jac = jsoftmax.softmax_jacobian(y)
    chex.assert_shape(jac, (2, 3, 5, 5))
    want = jax.vmap(jax.vmap(jax.jacrev(ref_softmax)))(x)
    chex.assert_trees_all_close(jac, want, atol=1e-7)
    chex.assert_trees_all_close(jax.vmap(jsoftmax.softmax_jacobian)(y), jac)


def test_rows_and_columns_sum_to_zero_and_symmetric():
    y = jsoftmax.softmax(jax.random.normal(jax.random.key(3), (4, 7)))
    jac = jsoftmax.softmax_jacobian(y)
    chex.assert_trees_all_close(jnp.sum(jac, -1), jnp.zeros((4, 7)), atol=1e-7)
    chex.assert_trees_all_close(jac, jnp.swapaxes(jac, -1, -2))


def test_jacobian_times_cotangent_is_the_vjp():
    x = jax.random.normal(jax.random.key(4), (3, 6))
    g = jax.random.normal(jax.random.key(5), (3, 6))
    y, vjp = jax.vjp(jsoftmax.softmax, x)
    jac = jsoftmax.softmax_jacobian(y)
    chex.assert_trees_all_close(jnp.einsum("bi,bij->bj", g, jac), vjp(g)[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_keeps_dtype(dtype):
    y32 = jsoftmax.softmax(jax.random.normal(jax.random.key(6), (5,)))
    jac = jsoftmax.softmax_jacobian(y32.astype(dtype))
    chex.assert_type(jac, dtype)
    want = jsoftmax.softmax_jacobian(y32.astype(dtype).astype(jnp.float32))
    chex.assert_trees_all_equal(jac, want.astype(dtype))


def test_errors():
    with pytest.raises(ValueError, match="scalar"):
        jsoftmax.softmax_jacobian(jnp.float32(1.0))
    with pytest.raises(TypeError, match="complex"):
        jsoftmax.softmax_jacobian(jnp.ones(3, jnp.complex64))

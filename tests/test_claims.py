"""What the README says about jax.nn, checked against the installed jax.

The README states these for jax 0.10.2. A failure here on another version means
that jax.nn changed and the README's comparisons need the new behaviour. Where
jax.nn and jsoftmax agree (values for every axis and mask, gradients without a
mask, partial -inf rows, dtype promotion), tests/test_softmax.py compares them.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jsoftmax

# name -> (jsoftmax op, jax.nn op, the value of a row with no valid entry)
OPS = {
    "softmax": (jsoftmax.softmax, jax.nn.softmax, 0.0),
    "log_softmax": (jsoftmax.log_softmax, jax.nn.log_softmax, -jnp.inf),
}
op_names = pytest.mark.parametrize("name", list(OPS))

X = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
G = jnp.array([[1.0, -2.0, 0.5], [2.0, 1.0, -1.0]])
T, F = True, False


def _value_and_grad(f, x, where):
    y, vjp = jax.vjp(lambda x: f(x, where=where), x)
    return y, vjp(G)[0]


@op_names
def test_fully_masked_row_is_zero_or_neg_inf_with_zero_grad_in_both(name):
    ours, nn, empty = OPS[name]
    where = jnp.array([[T, T, T], [F, F, F]])
    for f in (ours, nn):
        y, dx = _value_and_grad(f, X, where)
        chex.assert_trees_all_equal(y[1], jnp.full(3, empty))
        chex.assert_trees_all_equal(dx[1], jnp.zeros(3))


# (row 1 of x, row 1 of the mask or None): rows whose valid entries are all -inf.
NEG_INF_ROWS = {
    "no_mask": ([-jnp.inf] * 3, None),
    "all_true_mask": ([-jnp.inf] * 3, [T, T, T]),
    "valid_entries_all_neg_inf": ([-jnp.inf, 5.0, -jnp.inf], [T, F, T]),
}


@op_names
@pytest.mark.parametrize("case", list(NEG_INF_ROWS))
def test_all_neg_inf_row_is_nan_in_jax_nn_and_not_here(name, case):
    ours, nn, empty = OPS[name]
    row, where_row = NEG_INF_ROWS[case]
    x = X.at[1].set(jnp.array(row))
    where = None if where_row is None else jnp.array([[T, T, T], where_row])
    valid = jnp.ones(3, bool) if where is None else where[1]
    y, dx = _value_and_grad(nn, x, where)
    assert bool(jnp.all(jnp.isnan(y[1][valid])))
    assert bool(jnp.all(jnp.isnan(dx[1][valid])))
    y, dx = _value_and_grad(ours, x, where)
    chex.assert_trees_all_equal(y[1], jnp.full(3, empty))
    chex.assert_trees_all_equal(dx[1], jnp.zeros(3))


@op_names
def test_masked_values_with_neg_inf_logits_equal_jax_nn(name):
    # tests/test_softmax.py compares masked values on finite logits.
    ours, nn, _ = OPS[name]
    x = jnp.array([[0.5, -jnp.inf, 2.0, -1.0], [1.0, -jnp.inf, -jnp.inf, 0.0]])
    for where in (jnp.ones(x.shape, bool), jnp.array([T, T, T, F])):
        chex.assert_trees_all_close(ours(x, where=where), nn(x, where=where))


@pytest.mark.parametrize(
    "name,lib",
    [
        ("softmax", "jax.nn"),
        ("log_softmax", "jax.nn"),
        ("softmax", "jsoftmax"),
        ("log_softmax", "jsoftmax"),
    ],
)
def test_all_true_mask_is_the_same_as_no_mask(name, lib):
    ours, nn, _ = OPS[name]
    f = nn if lib == "jax.nn" else ours
    x = jnp.array([[0.5, -jnp.inf, 2.0], [1.0, -jnp.inf, -jnp.inf]])
    y, dx = _value_and_grad(f, x, None)
    y_masked, dx_masked = _value_and_grad(f, x, jnp.ones(x.shape, bool))
    chex.assert_trees_all_equal(y_masked, y)
    chex.assert_trees_all_close(dx_masked, dx, atol=1e-6)


@op_names
def test_pos_inf_or_nan_makes_the_row_and_its_gradient_nan_in_both(name):
    ours, nn, _ = OPS[name]
    x = jnp.array([[1.0, jnp.inf, 0.0], [1.0, jnp.nan, 0.0]])
    for f in (ours, nn):
        y, dx = _value_and_grad(f, x, None)
        assert bool(jnp.all(jnp.isnan(y))) and bool(jnp.all(jnp.isnan(dx)))


@op_names
@pytest.mark.parametrize("fill", [1e30, jnp.inf, jnp.nan])
def test_masked_out_huge_logits_get_zero_grad_in_both(name, fill):
    ours, nn, _ = OPS[name]
    x = X.at[:, 1].set(fill)
    where = jnp.array([T, F, T])
    for f in (ours, nn):
        y, dx = _value_and_grad(f, x, where)
        assert bool(jnp.all(jnp.isfinite(y[:, ::2])))
        assert bool(jnp.all(dx[:, 1] == 0.0))
        assert bool(jnp.all(jnp.isfinite(dx)))


def _exp_dtypes(jaxpr):
    """The output dtypes of every exp in a jaxpr, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "exp":
            yield eqn.outvars[0].aval.dtype
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _exp_dtypes(inner)


@op_names
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_jax_nn_takes_half_precision_exponentials_in_the_input_dtype(name, dtype):
    ours, nn, _ = OPS[name]
    x = X.astype(dtype)
    nn_exps = set(_exp_dtypes(jax.make_jaxpr(nn)(x).jaxpr))
    our_exps = set(_exp_dtypes(jax.make_jaxpr(ours)(x).jaxpr))
    assert nn_exps == {jnp.dtype(dtype)}
    assert our_exps == {jnp.dtype(jnp.float32)}


def _residuals(f, *args):
    """What f's backward pass keeps: sorted float shapes, and the bool shapes."""
    avals = [a for a, _ in saved_residuals(f, *args)]
    assert {a.dtype for a in avals} <= {jnp.dtype(jnp.float32), jnp.dtype(bool)}
    floats = sorted(a.shape for a in avals if a.dtype == jnp.float32)
    return floats, {a.shape for a in avals if a.dtype == bool}


@pytest.mark.parametrize("mask_shape", [(16,), (8, 16)])
def test_what_jax_nn_saves_for_the_backward_pass(mask_shape):
    x = jax.random.normal(jax.random.key(0), (8, 16))
    where = jnp.broadcast_to(jnp.arange(16) % 3 != 0, mask_shape)
    full, row = (8, 16), (8, 1)

    def masked(f):
        return lambda x: f(x, where=where)

    # Default settings: the exponentials and two per-row values; with a mask
    # four arrays of x's size, two per-row values and the mask broadcast to x.
    assert _residuals(jax.nn.softmax, x) == ([row, row, full], set())
    assert _residuals(masked(jax.nn.softmax), x) == ([row] * 2 + [full] * 4, {full})
    # jax_softmax_custom_jvp=True: the output; with a mask two arrays of x's
    # size and the mask broadcast to x.
    with jax.softmax_custom_jvp(True):
        assert _residuals(jax.nn.softmax, x) == ([full], set())
        assert _residuals(masked(jax.nn.softmax), x) == ([full] * 2, {full})
    # log_softmax: the output and a per-row value.
    assert _residuals(jax.nn.log_softmax, x) == ([row, full], set())
    # jsoftmax.softmax: the output, and the mask as given.
    assert _residuals(jsoftmax.softmax, x) == ([full], set())
    assert _residuals(masked(jsoftmax.softmax), x) == ([full], {mask_shape})
    # jsoftmax.log_softmax: the output, and the mask as given.
    assert _residuals(jsoftmax.log_softmax, x) == ([full], set())
    assert _residuals(masked(jsoftmax.log_softmax), x) == ([full], {mask_shape})


@op_names
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "hessian"])
def test_forward_mode_works_in_jax_nn_and_here(name, transform):
    ours, nn, _ = OPS[name]
    x = X[0]
    run = {
        "jvp": lambda f: jax.jvp(f, (x,), (jnp.ones_like(x),)),
        "jacfwd": lambda f: jax.jacfwd(f)(x),
        "hessian": lambda f: jax.hessian(lambda x: jnp.sum(f(x) * x))(x),
    }[transform]
    # Before with_forward_mode (jsoftmax 0.1.0, plain custom_vjp) ours raised
    # TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp.
    chex.assert_trees_all_close(run(ours), run(nn), atol=1e-5, rtol=1e-5)

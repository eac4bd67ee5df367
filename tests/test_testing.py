"""jsoftmax.testing: the helpers pass on a right rule and fail on a wrong one.

The sweep runs wrong backward passes of our own in every dtype and at several
row widths and asserts that each fails, and right rules (jsoftmax's ops and a
hand-written rule built like the wrong ones) pass at the same points. Errors
that only the float64 comparison can see (an offset that the float32
allowance for large logits hides, a wrong sign on classes of probability
below 1e-7) are swept the same way.
"""

import pathlib
import re
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax import testing
from jsoftmax.testing import reference_log_softmax as ref_log_softmax
from jsoftmax.testing import reference_softmax as ref_softmax
from jsoftmax.testing import reference_softmax_cross_entropy as ref_ce

DTYPES = ["float32", "bfloat16", "float16", "float64"]
WIDTHS = [5, 64, 1000]


def _x(shape=(3, 5), dtype="float32", seed=0):
    """Unit normal logits; float64 ones need ``jax.enable_x64`` around the call."""
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _rule(forward, backward, dtype=None):
    """An op with a hand-written VJP, built the way jsoftmax's ops are.

    Both passes run in float32 (float64 for float64 input) and round to x's
    dtype once; the backward pass saves x and recomputes what it needs.

    Args:
      forward: ``x -> y`` in the compute dtype.
      backward: ``(x, g, dtype) -> dx`` in the compute dtype; ``dtype`` is x's.
      dtype: passed to ``backward``.
    """

    @jax.custom_vjp
    def op(x):
        return forward(x.astype(_compute_dtype(x.dtype))).astype(x.dtype)

    def op_fwd(x):
        return op(x), x

    def op_bwd(x, g):
        c = _compute_dtype(x.dtype)
        return (backward(x.astype(c), g.astype(c), dtype).astype(x.dtype),)

    op.defvjp(op_fwd, op_bwd)
    return op


# dx = y * (g - <g, y>)
def _softmax_grad(x, g, dtype=None):
    y = ref_softmax(x)
    return y * (g - jnp.sum(g * y, -1, keepdims=True))


# dx = g - y * sum(g)
def _log_softmax_grad(x, g, dtype=None):
    return g - ref_softmax(x) * jnp.sum(g, -1, keepdims=True)


def _mask(x):
    return jnp.arange(x.shape[-1]) % 3 != 1


def _masked_log_softmax(x):
    return ref_log_softmax(x, where=_mask(x))


def _labels(shape, dtype):
    """Fixed soft labels, exact in every dtype: op and reference see the same."""
    z = np.cos(np.arange(np.prod(shape), dtype=np.float32)).reshape(shape)
    q = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return jnp.asarray(q.astype(jnp.bfloat16).astype(dtype))


def _ce(x):
    return ref_ce(x, _labels(x.shape, x.dtype), label_smoothing=0.1)


# dx = g * (softmax(x) sum(q) - q), with q the smoothed labels (their sum is
# 1 up to rounding)
def _ce_grad(x, g, smoothing=0.1, softmax=None):
    q = (1 - smoothing) * _labels(x.shape, x.dtype) + smoothing / x.shape[-1]
    y = jax.nn.softmax(x) if softmax is None else softmax
    return g[:, None] * (y * jnp.sum(q, -1, keepdims=True) - q)


def _scale_error(dtype):
    # 1% where the dtype resolves it. bfloat16 rounds a right gradient by up
    # to about eps = 2**-7 (0.8%), so a 1% error is within its noise: 4 eps.
    return 1 + max(1e-2, 4 * float(jnp.finfo(dtype).eps))


# name: (forward, which is also the reference; wrong backward (x, g, dtype) -> dx)
WRONG_RULES = {
    "softmax without -y<g,y>": (ref_softmax, lambda x, g, _: ref_softmax(x) * g),
    "softmax sign flipped on one class": (
        ref_softmax,
        lambda x, g, _: _softmax_grad(x, g).at[..., 2].multiply(-1),
    ),
    "softmax zero gradient": (ref_softmax, lambda x, g, _: jnp.zeros_like(g)),
    "softmax gradient scaled": (
        ref_softmax,
        lambda x, g, dtype: _softmax_grad(x, g) * _scale_error(dtype),
    ),
    "softmax gradient shifted by one class": (
        ref_softmax,
        lambda x, g, _: jnp.roll(_softmax_grad(x, g), 1, -1),
    ),
    "softmax gradient of the wrong row": (
        ref_softmax,
        lambda x, g, _: jnp.roll(_softmax_grad(x, g), 1, 0),
    ),
    "log_softmax transposed Jacobian": (
        ref_log_softmax,
        lambda x, g, _: g - jnp.sum(ref_softmax(x) * g, -1, keepdims=True),
    ),
    "log_softmax mask dropped in the backward pass": (
        _masked_log_softmax,
        lambda x, g, _: (
            g - ref_softmax(x, where=_mask(x)) * jnp.sum(g, -1, keepdims=True)
        ),
    ),
    "cross-entropy ignores the cotangent": (
        _ce,
        lambda x, g, _: _ce_grad(x, jnp.ones_like(g)),
    ),
    "cross-entropy gradient without label smoothing": (
        _ce,
        lambda x, g, _: _ce_grad(x, g, smoothing=0.0),
    ),
}


def _labels_int(x):
    return jnp.arange(x.shape[0]) * 5 % x.shape[-1]


def _int_ce(x):
    return testing.reference_softmax_cross_entropy_with_integer_labels(
        x, _labels_int(x)
    )


def _below_1e_7_times(x, factor=-1):
    """``factor`` where softmax(x) is below 1e-7, else 1."""
    return jnp.where(ref_softmax(x) < 1e-7, factor, 1)


# Wrong rules whose Jacobian rows are off by about 2e-7 of the largest row:
# within float32 rounding, caught by the float64 comparison. Swept at logits
# where every other class has a probability below 1e-7.
TINY_WRONG_RULES = {
    "softmax sign flipped below probability 1e-7": (
        ref_softmax,
        lambda x, g, _: _below_1e_7_times(x) * _softmax_grad(x, g),
    ),
    "softmax gradient doubled below probability 1e-7": (
        ref_softmax,
        lambda x, g, _: _below_1e_7_times(x, 2) * _softmax_grad(x, g),
    ),
    "log_softmax sign flipped below probability 1e-7": (
        ref_log_softmax,
        lambda x, g, _: (
            g - _below_1e_7_times(x) * ref_softmax(x) * jnp.sum(g, -1, keepdims=True)
        ),
    ),
    "cross-entropy sign flipped below probability 1e-7": (
        _ce,
        lambda x, g, _: _ce_grad(x, g, softmax=_below_1e_7_times(x) * ref_softmax(x)),
    ),
    "integer-label cross-entropy sign flipped below probability 1e-7": (
        _int_ce,
        lambda x, g, _: (
            g[:, None]
            * (
                _below_1e_7_times(x) * ref_softmax(x)
                - jax.nn.one_hot(_labels_int(x), x.shape[-1], dtype=x.dtype)
            )
        ),
    ),
}


def _offset(x):
    """3e-5 of the largest logit: 0.3 at logits near 1e4."""
    return 3e-5 * jnp.max(jnp.abs(x))


# Forward passes off by an error that grows with the logits (the float32
# allowance |J| |x| grows with them too); the backward passes are right.
WRONG_VALUES = {
    "log_softmax off by 3e-5 max|x|": (
        lambda x: ref_log_softmax(x) + _offset(x),
        _log_softmax_grad,
        ref_log_softmax,
    ),
    "softmax scaled by 1 + 3e-5 max|x|": (
        lambda x: ref_softmax(x) * (1 + _offset(x)),
        _softmax_grad,
        ref_softmax,
    ),
    "cross-entropy off by 3e-5 max|x|": (
        lambda x: _ce(x) + _offset(x),
        lambda x, g, _: _ce_grad(x, g),
        _ce,
    ),
}

# name: logits from unit normal ones. float16 holds no logit near 1e6 (its
# largest finite value is 65504).
LOGITS = {
    "unit normal": lambda x: x,
    "probabilities below 1e-7": lambda x: x.at[..., 1::2].add(-25.0),
    "near 1e2": lambda x: x + 1e2,
    "near 1e4": lambda x: x + 1e4,
    "near 1e6": lambda x: x + 1e6,
}


def _logits(kind, width, dtype):
    x = LOGITS[kind](_x((2, width), "float32", seed=width))
    return x.astype(dtype)


def _holds(kind, dtype):
    return not (kind == "near 1e6" and dtype == "float16")


LARGE = ["near 1e2", "near 1e4", "near 1e6"]
# The narrowest rows and those whose float32 allowance is the largest.
EDGE_WIDTHS = [5, 1000]
# The logits are float32 ones cast to the dtype: in float64 they are those
# that the float32 case's float64 comparison sees, so the sweeps of errors
# only float64 sees run the 16- and 32-bit dtypes.
LOWER = ["float32", "bfloat16", "float16"]
# (logits, dtype, width): every dtype at unit normal logits; float32 (which
# is compared in float64 too) at the others, in the rows whose tolerances are
# the tightest.
RIGHT_POINTS = [("unit normal", d, w) for d in DTYPES for w in WIDTHS] + [
    (kind, "float32", w)
    for kind in ["probabilities below 1e-7", *LARGE]
    for w in [5, 64]
]


# name: (op, reference)
RIGHT_RULES = {
    "hand-written softmax rule": (_rule(ref_softmax, _softmax_grad), ref_softmax),
    "hand-written log_softmax rule": (
        _rule(ref_log_softmax, _log_softmax_grad),
        ref_log_softmax,
    ),
    "jsoftmax.softmax": (jsoftmax.softmax, ref_softmax),
    "jsoftmax.log_softmax": (jsoftmax.log_softmax, ref_log_softmax),
    "jsoftmax.log_softmax masked": (
        lambda x: jsoftmax.log_softmax(x, where=_mask(x)),
        _masked_log_softmax,
    ),
    "jsoftmax.softmax_cross_entropy": (
        lambda x: jsoftmax.softmax_cross_entropy(
            x, _labels(x.shape, x.dtype), label_smoothing=0.1
        ),
        _ce,
    ),
    "jsoftmax.softmax_cross_entropy_with_integer_labels": (
        lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(x, _labels_int(x)),
        _int_ce,
    ),
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", WRONG_RULES)
def test_wrong_rule_fails(name, dtype, width):
    # Each is caught in x's dtype alone (float64 can only add failures).
    forward, backward = WRONG_RULES[name]
    wrong = _rule(forward, backward, jnp.dtype(dtype))
    with jax.enable_x64(dtype == "float64"):
        x = _x((2, width), dtype, seed=width)
        e = testing.vjp_errors(wrong, forward, x, float64=False)
    assert e.value_mismatch is None
    assert e.jacobian_mismatch, e
    assert not e.passed


@pytest.mark.parametrize("width", EDGE_WIDTHS)
@pytest.mark.parametrize("dtype", LOWER)
@pytest.mark.parametrize("name", TINY_WRONG_RULES)
def test_wrong_rule_on_tiny_probabilities_fails(name, dtype, width):
    forward, backward = TINY_WRONG_RULES[name]
    x = _logits("probabilities below 1e-7", width, dtype)
    e = testing.vjp_errors(_rule(forward, backward), forward, x)
    assert e.value_mismatch is None
    assert e.jacobian_mismatch, e
    assert not e.float64.passed, e.jacobian_mismatch


@pytest.mark.parametrize("width", EDGE_WIDTHS)
@pytest.mark.parametrize(
    "kind, dtype", [(k, d) for k in LARGE for d in LOWER if _holds(k, d)]
)
@pytest.mark.parametrize("name", WRONG_VALUES)
def test_wrong_value_at_large_logits_fails(name, kind, dtype, width):
    forward, backward, reference = WRONG_VALUES[name]
    x = _logits(kind, width, dtype)
    e = testing.vjp_errors(_rule(forward, backward), reference, x)
    assert e.jacobian_mismatch is None
    assert e.value_mismatch, e
    assert not e.float64.passed, e.value_mismatch


@pytest.mark.parametrize("kind, dtype, width", RIGHT_POINTS)
@pytest.mark.parametrize("name", RIGHT_RULES)
def test_right_rule_passes(name, kind, dtype, width):
    op, reference = RIGHT_RULES[name]
    # The float64 comparison, of float32 x at float32 points, is the same
    # check at a 16-bit dtype's rounded x: left to the float32 cases.
    float64 = None if dtype == "float32" else False
    with jax.enable_x64(dtype == "float64"):
        x = _logits(kind, width, dtype)
        e = testing.vjp_errors(op, reference, x, float64=float64)
    assert e.passed, (e.value_mismatch, e.jacobian_mismatch)
    # The rules compute in float64: float32 x is compared there too.
    assert (e.float64 is None) == (float64 is False), e.float64_skipped


# Issue 18 item 12: two wrong rules that passed the float32 comparison, whose
# allowances grow with float32's epsilon. The float64 comparison catches them.


def test_log_softmax_off_by_0_3_at_logits_near_1e4_fails_in_float64():
    x = _logits("near 1e4", 1000, "float32")

    def off(x):
        return jsoftmax.log_softmax(x) + 0.3

    alone = testing.vjp_errors(off, ref_log_softmax, x, float64=False)
    assert alone.passed and 0.4 < alone.value_ratio < 1  # 0.3 of about 0.6
    e = testing.vjp_errors(off, ref_log_softmax, x)
    assert e.value_mismatch.startswith("in float64: output[")
    assert e.float64.value_error == pytest.approx(0.3)
    with pytest.raises(AssertionError, match="value differs .* in float64"):
        testing.assert_vjp_matches(off, ref_log_softmax, x, transforms="jit")


def test_softmax_gradient_of_the_wrong_sign_below_probability_1e_7_fails_in_float64():
    x = _logits("probabilities below 1e-7", 64, "float32")
    forward, backward = TINY_WRONG_RULES["softmax sign flipped below probability 1e-7"]
    wrong = _rule(forward, backward)
    assert testing.vjp_errors(wrong, ref_softmax, x, float64=False).passed
    e = testing.vjp_errors(wrong, ref_softmax, x)
    assert e.jacobian_mismatch.startswith("in float64: d output[")
    # No Jacobian entry is off by more than twice the largest such probability.
    assert e.float64.jacobian_error < 2e-7
    with pytest.raises(AssertionError, match="jacobian differs .* in float64"):
        testing.assert_vjp_matches(wrong, ref_softmax, x, transforms="vmap")


# Which functions are compared in float64: those that compute in it.


def _float32_only(x):
    if x.dtype != jnp.float32:
        raise TypeError(f"this kernel takes float32, not {x.dtype}")
    return jsoftmax.softmax(x)


def _in_float32(x):
    """softmax computed in float32 whatever x's dtype, returned in it."""
    return jsoftmax.softmax(x.astype(jnp.float32)).astype(x.dtype)


def test_float64_comparison_is_skipped_where_fn_raises_in_float64():
    e = testing.vjp_errors(_float32_only, ref_softmax, _x())
    assert e.passed and e.float64 is None
    assert e.float64_skipped == (
        "fn raised TypeError in float64: this kernel takes float32, not float64"
    )
    with pytest.raises(TypeError, match="takes float32"):
        testing.vjp_errors(_float32_only, ref_softmax, _x(), float64=True)


def test_float64_comparison_is_skipped_where_fn_computes_in_float32():
    e = testing.vjp_errors(_in_float32, ref_softmax, _x())
    assert e.passed and e.float64 is None
    assert e.float64_skipped.startswith(
        "fn does not compute in float64: convert_element_type gives float32["
    )
    # Compared anyway, its float32 rounding fails the float64 tolerances.
    forced = testing.vjp_errors(_in_float32, ref_softmax, _x(), float64=True)
    assert forced.value_mismatch.startswith("in float64:")


def test_float64_comparison_is_skipped_where_the_reference_computes_in_float32():
    e = testing.vjp_errors(jsoftmax.softmax, _in_float32, _x(), transform="jit")
    assert e.passed and e.float64 is None
    assert e.float64_skipped.startswith("the reference does not compute in float64")


# A float32 array closed over, promoted where it meets the float64 input, is
# exact there: the float64 comparison runs. Before, any float32 constant in
# the trace skipped it, and a rule wrong below float32's resolution passed.
_SHIFT = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_a_float32_constant_only_widened_keeps_the_float64_comparison(transform):
    x = _logits("probabilities below 1e-7", 64, "float32")
    forward, backward = TINY_WRONG_RULES["softmax sign flipped below probability 1e-7"]
    wrong = _rule(forward, backward)

    def shifted(f):
        return lambda x: f(x + jnp.broadcast_to(_SHIFT, x.shape))

    with jax.numpy_dtype_promotion("standard"):
        right = testing.vjp_errors(
            shifted(jsoftmax.softmax), shifted(ref_softmax), x, transform=transform
        )
        e = testing.vjp_errors(
            shifted(wrong), shifted(ref_softmax), x, transform=transform
        )
    assert right.passed and right.float64 is not None, right
    assert right.float64_skipped is None
    assert e.jacobian_mismatch.startswith(
        "in float64 (with fn's float32[64]; the reference's float32[64] widened "
        "exactly): d output["
    ), e.jacobian_mismatch
    # The same rule jitted, checkpointed or in a shard_map: the constant is an
    # input of the call's trace (jax.checkpoint's primitive is remat2).
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))

    def in_shard_map(f):
        spec = jax.sharding.PartitionSpec()
        return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)

    for call in (jax.jit, jax.checkpoint, in_shard_map):
        with jax.numpy_dtype_promotion("standard"):
            e = testing.vjp_errors(
                call(shifted(wrong)), shifted(ref_softmax), x, transform=transform
            )
        assert e.jacobian_mismatch.startswith("in float64"), (call, e)


# Moves that copy the constant, as jnp writes them (some inside a jit).
_MOVES = {
    "take": lambda c: jnp.take(c, jnp.arange(63, -1, -1)),
    "roll": lambda c: jnp.roll(c, 5),
    "tile": lambda c: jnp.tile(c[:32], 2),
    "stop_gradient": jax.lax.stop_gradient,
    "negated": lambda c: -c,
    "sorted": jnp.sort,
}


@pytest.mark.parametrize("move", _MOVES)
def test_a_float32_constant_moved_keeps_the_float64_comparison(move):
    # Before, the moves other than broadcast, reshape, slice, gather and
    # concatenate named outside a jit skipped it.
    x = _logits("probabilities below 1e-7", 64, "float32")
    forward, backward = TINY_WRONG_RULES["softmax sign flipped below probability 1e-7"]
    wrong = _rule(forward, backward)

    def shifted(f):  # the move in the trace
        return lambda x: f(x + _MOVES[move](_SHIFT)[None])

    with jax.numpy_dtype_promotion("standard"):
        e = testing.vjp_errors(shifted(wrong), shifted(ref_softmax), x)
    assert e.jacobian_mismatch.startswith("in float64"), e


def _biased_softmax(flip):
    """softmax(x + b) with a hand-written rule that also returns b's
    cotangent, in b's dtype: float32 for a float32 b however wide x is.
    ``flip``: the gradient's sign flipped below probability 1e-7."""

    @jax.custom_vjp
    def f(x, b):
        return ref_softmax(x + b.astype(x.dtype))

    def f_fwd(x, b):
        y = f(x, b)
        return y, y

    def f_bwd(y, g):
        dz = y * (g - jnp.sum(g * y, -1, keepdims=True))
        if flip:
            dz = jnp.where(y < 1e-7, -dz, dz)
        return dz, jnp.sum(dz, 0, keepdims=True).astype(jnp.float32)

    f.defvjp(f_fwd, f_bwd)
    return f


def test_a_float32_argument_of_a_custom_vjp_keeps_the_float64_comparison():
    # jax.jacrev w.r.t. x drops b's float32 cotangent; it counted as a
    # float32 computation and skipped the comparison (so did jsoftmax's own
    # losses with closed-over float32 labels, and attention with a bias).
    x = _logits("probabilities below 1e-7", 64, "float32")
    bias = _SHIFT[None]

    def reference(x):
        return ref_softmax(x + bias.astype(x.dtype))

    right = testing.vjp_errors(lambda x: _biased_softmax(False)(x, bias), reference, x)
    assert right.passed and right.float64 is not None, right
    e = testing.vjp_errors(lambda x: _biased_softmax(True)(x, bias), reference, x)
    assert e.jacobian_mismatch.startswith("in float64"), e


_NUMPY_TWO = np.full(16, 2.0)  # float64, kept as float32 with x64 off


@pytest.mark.parametrize("transform", ["none", "jit"])
def test_a_numpy_float64_constant_skips_the_float64_comparison_without_raising(
    transform,
):
    # JAX 0.10 keeps the constant of a function jitted with x64 off as
    # float32, which the float64 program then refused: vjp_errors raised
    # (found by a red-team helper with this case).
    x = _x((4, 16))
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        e = testing.vjp_errors(
            lambda x: jsoftmax.softmax(2.0 * x),
            lambda x: ref_softmax(_NUMPY_TWO * x),
            x,
            transform=transform,
        )
    assert e.passed and e.float64 is None
    assert e.float64_skipped.startswith("the float64 comparison raised"), e


def test_a_float32_constant_computed_with_skips_the_float64_comparison():
    # sin rounds in float32 here: not a float64 computation.
    x = _logits("unit normal", 64, "float32")

    def fn(x):
        return jsoftmax.softmax(x + jnp.sin(_SHIFT)[None])

    with jax.numpy_dtype_promotion("standard"):
        e = testing.vjp_errors(fn, fn, x)
    assert e.passed and e.float64 is None
    assert e.float64_skipped == "fn does not compute in float64: sin takes float32[64]"


def test_a_reference_with_other_constants_fails_in_float64_and_says_why():
    # fn scales by a float32 array of 0.7, the reference by 0.7: equal in
    # float32, apart by float32's rounding of 0.7 in float64.
    x = _x((2, 6))
    temperature = jnp.full((2, 6), 0.7, jnp.float32)

    def fn(x):
        return jsoftmax.softmax(x * temperature)

    def reference(x):
        return ref_softmax(x * 0.7)

    with jax.numpy_dtype_promotion("standard"):
        e = testing.vjp_errors(fn, reference, x)
        assert testing.vjp_errors(fn, reference, x, float64=False).passed
    assert e.value_mismatch.startswith(
        "in float64 (with fn's float32[2,6] widened exactly): output["
    ), e.value_mismatch


@jax.custom_vjp
def _int_ce_tiny_flipped(logits, labels):
    return _int_ce_of(logits, labels)


def _int_ce_of(logits, labels):
    return testing.reference_softmax_cross_entropy_with_integer_labels(logits, labels)


def _int_ce_tiny_flipped_fwd(logits, labels):
    return _int_ce_of(logits, labels), (logits, labels)


def _int_ce_tiny_flipped_bwd(res, g):
    logits, labels = res
    y = _below_1e_7_times(logits) * jax.nn.softmax(logits)
    q = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return g[:, None] * (y - q), None


_int_ce_tiny_flipped.defvjp(_int_ce_tiny_flipped_fwd, _int_ce_tiny_flipped_bwd)


def test_float64_comparison_of_a_pytree_holds_its_integer_leaves():
    # The labels stay int32 and the logits become float64, where a wrong sign
    # below probability 1e-7 shows.
    x = {
        "logits": _logits("probabilities below 1e-7", 12, "float32"),
        "labels": jnp.array([0, 3], jnp.int32),
    }
    e = testing.vjp_errors(
        lambda t: _int_ce_tiny_flipped(t["logits"], t["labels"]),
        lambda t: _int_ce_of(t["logits"], t["labels"]),
        x,
    )
    assert e.jacobian_mismatch.startswith("in float64: d output[")
    assert "/ d ['logits']" in e.jacobian_mismatch


def test_float64_input_and_float64_false_compare_once():
    with jax.enable_x64(True):
        e = testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(dtype="float64"))
    assert e.passed and e.float64 is None and e.float64_skipped is None
    e = testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(), float64=False)
    assert e.passed and e.float64 is None and e.float64_skipped is None


# Issue item 11: the three wrong rules below passed the old absolute
# tolerances (float32 gradients 2e-3, bfloat16 0.1), which were larger than
# every Jacobian entry they got wrong.


def _assert_caught(rule, x, old_tolerance):
    """``rule`` fails in x's dtype, though no Jacobian entry is off by
    ``old_tolerance``."""
    wrong = _rule(ref_softmax, WRONG_RULES[rule][1])
    e = testing.vjp_errors(wrong, ref_softmax, x, transform="vmap", float64=False)
    assert e.jacobian_error < old_tolerance
    assert e.jacobian_mismatch
    with pytest.raises(AssertionError, match="jacobian differs"):
        testing.assert_vjp_matches(
            wrong, ref_softmax, x, transforms="vmap", float64=False
        )


def test_softmax_without_dot_product_term_fails_in_a_wide_float32_row():
    _assert_caught("softmax without -y<g,y>", _x((4, 1000)), 2e-3)


def test_sign_flip_on_one_class_fails_in_bfloat16():
    _assert_caught("softmax sign flipped on one class", _x((4, 64), "bfloat16"), 0.1)


def test_zero_gradient_fails_in_a_wide_bfloat16_row():
    _assert_caught("softmax zero gradient", _x((4, 1000), "bfloat16"), 0.1)


# A check must be able to fail just past its tolerance (in x's dtype: float64's
# is far tighter than float32's).


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_a_hundred_ulps_off_fails(dtype):
    def off(x):
        y = jsoftmax.softmax(x).astype(_compute_dtype(x.dtype))
        return (y * (1 + 100 * float(jnp.finfo(x.dtype).eps))).astype(x.dtype)

    with jax.enable_x64(dtype == "float64"):
        e = testing.vjp_errors(off, ref_softmax, _x((2, 5), dtype))
    assert e.value_mismatch


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_value_fails_just_past_its_tolerance(dtype, width):
    # Small logits keep |J| |x| negligible, so the scale is |y| and the
    # allowance rtol_n |y|, with n = width.
    rtol, _ = testing.tolerances(dtype, width)

    def scaled(factor, x):
        return jsoftmax.softmax(x) * factor

    check = partial(testing.vjp_errors, reference=ref_softmax, float64=False)
    with jax.enable_x64(dtype == "float64"):
        x = 1e-3 * _x((2, width), dtype)
        fail = check(partial(scaled, 1 + 2 * rtol), x=x)
        ok = check(partial(scaled, 1 + rtol / 2), x=x)
    assert fail.value_mismatch
    assert 1 < fail.value_ratio < 2.5
    assert ok.value_mismatch is None and ok.value_ratio < 0.6


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jacobian_fails_just_past_its_tolerance(dtype, width):
    _, grad_rtol = testing.tolerances(dtype, width)

    def scaled(factor):
        return _rule(ref_softmax, lambda x, g, _: factor * _softmax_grad(x, g))

    check = partial(testing.vjp_errors, reference=ref_softmax, float64=False)
    with jax.enable_x64(dtype == "float64"):
        x = _x((2, width), dtype)
        fail = check(scaled(1 + 2 * grad_rtol), x=x)
        ok = check(scaled(1 + grad_rtol / 2), x=x)
    assert fail.jacobian_mismatch
    assert 1.5 < fail.jacobian_ratio < 2.5
    # The worst row is a largest one, off by exactly the scale error.
    np.testing.assert_allclose(fail.jacobian_rel_error, 2 * grad_rtol, rtol=0.2)
    assert ok.passed and ok.jacobian_ratio < 0.7


def test_overrides_set_the_allowance():
    scaled = _rule(ref_softmax, lambda x, g, _: 1.01 * _softmax_grad(x, g))
    x = _x()
    assert not testing.vjp_errors(scaled, ref_softmax, x).passed
    # The overrides hold in the float64 comparison too.
    e = testing.vjp_errors(scaled, ref_softmax, x, grad_rtol=0.02)
    assert e.passed and e.float64.passed
    # grad_atol is on a row's 2-norm; the largest rows are about 0.5 here.
    assert testing.vjp_errors(scaled, ref_softmax, x, grad_atol=0.01).passed
    shifted = partial(lambda c, x: jsoftmax.softmax(x) + c, 1e-4)
    assert testing.vjp_errors(shifted, ref_softmax, x).value_mismatch
    assert testing.vjp_errors(shifted, ref_softmax, x, atol=2e-4).passed
    assert testing.vjp_errors(shifted, ref_softmax, x, rtol=1e-2).passed


@pytest.mark.parametrize("name", ["atol", "rtol", "grad_atol", "grad_rtol"])
@pytest.mark.parametrize("value", [-1e-6, float("nan"), float("inf"), True, "1e-3"])
def test_an_allowance_that_is_not_a_finite_number_at_least_0_is_refused(name, value):
    # A negative one made every ratio negative, which approved any rule.
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(), **{name: value})
    ok = testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(), **{name: 1e-2})
    assert ok.passed


def test_grad_rtol_sets_the_signed_cotangent_check_too():
    # A linear rule computing its backward pass in bfloat16 for float32
    # inputs: grad_rtol=2e-2 approved its Jacobian, but the check at signed
    # cotangents kept the float32 default and called it "not linear?".
    def bf16_backward(x, g, _):
        y, g = ref_softmax(x).astype(jnp.bfloat16), g.astype(jnp.bfloat16)
        return (y * (g - jnp.sum(g * y, -1, keepdims=True))).astype(x.dtype)

    rule = _rule(ref_softmax, bf16_backward)
    x = _x((3, 16))
    assert "not linear?" in testing.vjp_errors(rule, ref_softmax, x).jacobian_mismatch
    assert testing.vjp_errors(rule, ref_softmax, x, grad_rtol=2e-2).passed
    # The check still fails past the override: |g| is off by 2 at signed g.
    not_linear = _rule(ref_softmax, lambda x, g, _: _softmax_grad(x, jnp.abs(g)))
    e = testing.vjp_errors(not_linear, ref_softmax, x, grad_rtol=2e-2)
    assert "not linear?" in e.jacobian_mismatch


def _softmax_rule_with_cotangent_dtype(cast):
    @jax.custom_vjp
    def op(x):
        return ref_softmax(x.astype(jnp.float32)).astype(x.dtype)

    def op_bwd(x, g):
        dx = _softmax_grad(x.astype(jnp.float32), g.astype(jnp.float32))
        return (cast(dx, x.dtype),)

    op.defvjp(lambda x: (op(x), x), op_bwd)
    return op


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_cotangent_of_another_dtype_than_its_input_fails(dtype):
    # jax.grad returns what the rule returns: a float32 cotangent for a
    # 16-bit input went through, and so the gradient's dtype changed.
    x = _x(dtype=dtype)
    wide = _softmax_rule_with_cotangent_dtype(lambda dx, _: dx)
    e = testing.vjp_errors(wide, ref_softmax, x)
    if dtype == "float32":
        assert e.passed
    else:
        assert f"d x has dtype float32, its input {dtype}" in e.jacobian_mismatch
    same = _softmax_rule_with_cotangent_dtype(lambda dx, dtype: dx.astype(dtype))
    assert testing.vjp_errors(same, ref_softmax, x).passed


def test_assert_vjp_matches_warns_where_the_float64_comparison_is_skipped():
    # Checked in float32 only, the float64-only errors pass unseen: say so.
    with pytest.warns(UserWarning, match=r"skipped under none, jit, vmap \(fn does"):
        testing.assert_vjp_matches(_in_float32, ref_softmax, _x())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        testing.assert_vjp_matches(_in_float32, ref_softmax, _x(), float64=False)
        testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, _x())


def test_finite_differences_hold_integer_and_bool_leaves():
    # Integer labels failed inside check_grads: "ufunc 'conjugate' not
    # supported for the input types".
    logits = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    labels, where = jnp.array([0, 3, 1]), jnp.array([True, True, False, True])

    def loss(x, labels, where):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(
            x["logits"], labels, where=where
        )

    testing.assert_finite_differences(loss, {"logits": logits}, labels, where)

    def wrong(x, labels, where):  # a gradient 1.1 times the right one
        y = loss(x, labels, where)
        return jax.lax.stop_gradient(y) + 1.1 * (y - jax.lax.stop_gradient(y))

    with pytest.raises(AssertionError):
        testing.assert_finite_differences(
            wrong, {"logits": logits}, labels, where, order=1
        )
    with pytest.raises(TypeError, match="no float leaf"):
        testing.assert_finite_differences(lambda y: y, labels)


@pytest.mark.parametrize("transform", ["none", "jit", "vmap"])
@pytest.mark.parametrize(
    "returns",
    [lambda y: None, lambda y: (y, y), lambda y: {"y": y}],
    ids=["none", "tuple", "dict"],
)
def test_an_output_of_another_structure_fails_naming_both(transform, returns):
    # One returning None failed inside jax.jacrev: "at least one array or
    # dtype is required".
    x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
    errors = testing.vjp_errors(
        lambda x: returns(jsoftmax.softmax(x)), ref_softmax, x, transform=transform
    )
    assert errors.value_mismatch.startswith("output structure"), errors
    with pytest.raises(AssertionError, match="differs from the reference's"):
        testing.assert_vjp_matches(
            lambda x: returns(jsoftmax.softmax(x)), ref_softmax, x, transforms=transform
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerances_follow_epsilon_and_width(dtype):
    with jax.enable_x64(dtype == "float64"):
        eps = float(jnp.finfo(dtype).eps)
        sum_eps = eps if dtype in ("float32", "float64") else 2.0**-23
        value, grad = testing.TOLERANCES[dtype]
        for n in (1, 64, 1000):
            want = (value * (eps + n**0.5 * sum_eps), grad * (eps + n**0.5 * sum_eps))
            np.testing.assert_allclose(testing.tolerances(dtype, n), want)
    assert testing.tolerances(dtype) == testing.tolerances(jnp.dtype(dtype), 1)


@pytest.mark.parametrize(
    "dtype", [jnp.int32, jnp.bool_, jnp.float8_e4m3fn, jnp.complex64]
)
def test_tolerances_of_an_unknown_dtype_name_it(dtype):
    with pytest.raises(TypeError, match=f"no tolerances for dtype {jnp.dtype(dtype)}"):
        testing.tolerances(dtype)


@pytest.mark.parametrize("n", [0, -3, float("nan"), float("inf")])
def test_tolerances_refuse_a_reduction_length_below_one_or_infinite(n):
    # n=0 was taken as 1, where the docstring asks for at least 1; n=inf gave
    # a tolerance of inf, which approves any error.
    with pytest.raises(ValueError, match="at least 1 and finite"):
        testing.tolerances("float32", n=n)
    assert testing.tolerances("float32", n=1) < testing.tolerances("float32", n=2)


# Pytrees of arrays: every output leaf against every float input leaf.


def _soft_ce(t):
    return jsoftmax.softmax_cross_entropy(t["logits"], t["labels"])


def _soft_ce_reference(t):
    return ref_ce(t["logits"], t["labels"])


@jax.custom_vjp
def _ce_wrong_label_grad(logits, labels):
    return ref_ce(logits, labels)


def _ce_wrong_label_grad_fwd(logits, labels):
    return ref_ce(logits, labels), (logits, labels)


def _ce_wrong_label_grad_bwd(res, g):
    logits, labels = res
    # The labels need not sum to 1 exactly.
    total = jnp.sum(labels, -1, keepdims=True)
    dlogits = g[:, None] * (jax.nn.softmax(logits) * total - labels)
    # Drops the minus sign of dloss/dlabels = -log_softmax(logits).
    return dlogits, g[:, None] * jax.nn.log_softmax(logits)


_ce_wrong_label_grad.defvjp(_ce_wrong_label_grad_fwd, _ce_wrong_label_grad_bwd)


def _dict_input(batch=4, classes=12):
    return {
        "logits": 3 * _x((batch, classes), seed=1),
        "labels": _labels((batch, classes), jnp.float32),
    }


def test_dict_input_compares_the_jacobian_of_every_leaf():
    x = _dict_input()
    testing.assert_vjp_matches(
        _soft_ce, _soft_ce_reference, x, transforms=("jit", "vmap")
    )
    wrong = testing.vjp_errors(
        lambda t: _ce_wrong_label_grad(t["logits"], t["labels"]),
        _soft_ce_reference,
        x,
        float64=False,
    )
    assert wrong.value_mismatch is None
    assert "/ d ['labels']" in wrong.jacobian_mismatch
    assert "/ d ['logits']" not in wrong.jacobian_mismatch


def test_integer_leaves_are_held_and_mapped_under_vmap():
    logits = 3 * _x((4, 12), seed=2)
    x = {"logits": logits, "labels": jnp.array([0, 3, 11, 5])}

    def ce(t):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(
            t["logits"], t["labels"]
        )

    def reference(t):
        return testing.reference_softmax_cross_entropy_with_integer_labels(
            t["logits"], t["labels"]
        )

    errors = testing.assert_vjp_matches(ce, reference, x, transforms=("jit", "vmap"))
    # Compared in float64 too, with the labels held as they are.
    assert all(e.float64.passed for e in errors)
    # Under vmap the labels are batched with the logits: a label ignored
    # there would give the wrong loss.
    fixed = partial(
        jsoftmax.softmax_cross_entropy_with_integer_labels,
        labels=jnp.zeros((), jnp.int32),
    )
    e = testing.vjp_errors(
        lambda t: fixed(t["logits"]), reference, x, transform="vmap", float64=False
    )
    assert e.value_mismatch and e.jacobian_mismatch


def test_tuple_input_is_one_argument_not_a_stacked_batch():
    seen = []

    def fn(t):
        seen.append(len(t))
        a, b = t
        return jsoftmax.softmax(a + b[..., None])

    def reference(t):
        a, b = t
        return ref_softmax(a + b[..., None])

    x = (_x((3, 5)), _x((3,), seed=1))
    testing.assert_vjp_matches(fn, reference, x, transforms=("none", "vmap"))
    assert set(seen) == {2}


def test_pytree_output_names_the_wrong_leaf():
    wrong = _rule(ref_log_softmax, lambda x, g, _: g)  # without -y sum(g)

    def fn(x):
        return {"p": jsoftmax.softmax(x), "logp": wrong(x)}

    def reference(x):
        return {"p": ref_softmax(x), "logp": ref_log_softmax(x)}

    e = testing.vjp_errors(fn, reference, _x(), transform="jit")
    assert e.value_mismatch is None
    assert e.jacobian_mismatch.startswith("d ['logp']")
    assert "['p']" not in e.jacobian_mismatch


def _with_integer_outputs(log_softmax, off=0):
    """A loss with an argmax, a large count and a bool mask beside it; ``off``
    is added to the count of the row whose last logit is largest."""

    def fn(x):
        last = x[..., -1] == jnp.max(x, axis=-1)
        return {
            "loss": -jnp.sum(log_softmax(x), axis=-1),
            "argmax": jnp.argmax(x, axis=-1),
            "count": jnp.int32(2**24) + jnp.where(last, off, 0).astype(jnp.int32),
            "positive": x > 0,
        }

    return fn


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_integer_and_bool_outputs_are_compared_exactly_and_not_differentiated(
    transform,
):
    # jax.jacrev refuses integer outputs: these leaves are compared by value,
    # exactly (2**24 + 1 is within any relative tolerance of 2**24).
    x = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 0.0, 1.0]])
    reference = _with_integer_outputs(ref_log_softmax)
    e = testing.vjp_errors(
        _with_integer_outputs(jsoftmax.log_softmax), reference, x, transform=transform
    )
    assert e.passed, e
    assert e.float64_skipped is None
    e = testing.vjp_errors(
        _with_integer_outputs(jsoftmax.log_softmax, off=1),
        reference,
        x,
        transform=transform,
    )
    assert not e.passed and e.jacobian_mismatch is None
    assert e.value_mismatch.startswith("['count'][0]: error 1 > allowed 0"), e
    assert "2 of 3 entries fail" in e.value_mismatch  # rows 0 and 2

    def flipped(x):
        return {**reference(x), "positive": x >= 0}  # differs at x = 0

    e = testing.vjp_errors(flipped, reference, x, transform=transform)
    assert not e.passed and e.jacobian_mismatch is None
    assert e.value_mismatch.startswith("['positive'][2, 1]: error 1"), e
    # The float leaf's Jacobian is still compared beside them.
    wrong = _rule(ref_log_softmax, lambda x, g, _: g)  # without -y sum(g)
    e = testing.vjp_errors(
        _with_integer_outputs(wrong), reference, x, transform=transform
    )
    assert e.value_mismatch is None
    assert e.jacobian_mismatch.startswith("d ['loss']"), e


def test_output_structure_mismatch_fails():
    e = testing.vjp_errors(
        lambda x: (jsoftmax.softmax(x),), lambda x: [ref_softmax(x)], _x()
    )
    assert not e.passed and "structure" in e.value_mismatch


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.complex64])
def test_unsupported_float_leaf_is_refused_by_path(dtype):
    x = {"a": _x(), "b": jnp.ones(5, dtype)}
    with pytest.raises(TypeError, match=rf"\['b'\] has dtype {jnp.dtype(dtype)}"):
        testing.vjp_errors(lambda t: t["a"], lambda t: t["a"], x)


def test_input_without_a_float_leaf_is_refused():
    with pytest.raises(TypeError, match="no float64, float32, float16 or bfloat16"):
        testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, jnp.arange(5))


def test_vmap_needs_one_leading_size():
    x = {"a": _x((3, 5)), "b": _x((4, 5))}
    with pytest.raises(ValueError, match="same leading size"):
        testing.vjp_errors(lambda t: t["a"], lambda t: t["a"], x, transform="vmap")


@pytest.mark.parametrize("transform", ["none", "jit"])
def test_an_input_without_rows_is_compared(transform):
    # Shape (0, 5): vjp_errors raised from a reshape (found by a red-team
    # helper); under vmap a leading size of 0 is refused, as above.
    x = jnp.zeros((0, 5), jnp.float32)
    e = testing.vjp_errors(jsoftmax.softmax, ref_softmax, x, transform=transform)
    assert e.passed and e.float64 is not None, e
    with pytest.raises(ValueError, match="at least 1"):
        testing.vjp_errors(jsoftmax.softmax, ref_softmax, x, transform="vmap")


# Transforms.


def test_a_single_transform_name_stands_for_itself():
    errors = testing.assert_vjp_matches(
        jsoftmax.softmax, ref_softmax, _x(), transforms="jit"
    )
    assert [e.transform for e in errors] == ["jit"]


@pytest.mark.parametrize("transforms", [("jit", "pmap"), "j"])
def test_unknown_transform_is_refused_before_any_work(transforms):
    calls = []

    def fn(x):
        calls.append(x)
        return jsoftmax.softmax(x)

    with pytest.raises(ValueError, match="'none', 'jit', 'vmap'"):
        testing.assert_vjp_matches(fn, ref_softmax, _x(), transforms=transforms)
    with pytest.raises(ValueError, match="unknown transform"):
        testing.vjp_errors(fn, ref_softmax, _x(), transform="pmap")
    assert not calls


def test_no_transform_no_dtype_and_order_0_are_refused():
    # Each checked nothing and passed: transforms=() returned [], None read
    # as float64, order=0 compared no derivative.
    with pytest.raises(ValueError, match="no transform given"):
        testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, _x(), transforms=())
    with pytest.raises(TypeError, match="dtype None"):
        testing.tolerances(None)
    for order in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="order must be an int >= 1"):
            testing.assert_finite_differences(jsoftmax.softmax, _x(), order=order)


@pytest.mark.parametrize(
    "op,reference",
    [(jsoftmax.softmax, ref_softmax), (jsoftmax.log_softmax, ref_log_softmax)],
)
def test_references_take_rows_without_entries(op, reference):
    x = jnp.zeros((3, 0))
    assert reference(x).shape == (3, 0) == op(x).shape
    assert testing.vjp_errors(op, reference, x).passed


# inf and NaN: equal ones agree, misplaced ones fail.


def test_equal_infs_and_nans_agree_and_misplaced_ones_fail():
    mask = jnp.arange(5) % 2 == 0

    def with_value(v):
        return partial(lambda v, x: jnp.where(mask, 2.0 * x, v), v)

    x = _x()
    assert testing.vjp_errors(with_value(-jnp.inf), with_value(-jnp.inf), x).passed
    assert testing.vjp_errors(with_value(jnp.nan), with_value(jnp.nan), x).passed
    for got, want in [(jnp.inf, -jnp.inf), (jnp.nan, -jnp.inf), (0.0, jnp.nan)]:
        e = testing.vjp_errors(with_value(got), with_value(want), x)
        assert "inf or NaN differs from the reference" in e.value_mismatch
        assert e.value_error == np.inf


def test_masked_log_softmax_minus_inf_outputs_pass_under_jit_and_vmap():
    where = jnp.arange(12) % 3 != 1
    testing.assert_vjp_matches(
        partial(jsoftmax.log_softmax, where=where),
        partial(ref_log_softmax, where=where),
        3 * _x((4, 12)),
        transforms=("jit", "vmap"),
    )


# The earlier behaviour, kept.


def test_passes_on_a_correct_rule_and_reports_each_transform():
    errors = testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, _x())
    assert [e.transform for e in errors] == list(testing.TRANSFORMS)
    for e in errors:
        assert e.passed
        assert 0.0 <= e.value_error < 1e-6
        assert 0.0 <= e.jacobian_error < 1e-6
        assert 0.0 <= e.jacobian_ratio <= 1 and 0.0 <= e.value_ratio <= 1


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_fails_on_a_wrong_backward(transform):
    wrong = _rule(ref_softmax, WRONG_RULES["softmax without -y<g,y>"][1])
    with pytest.raises(AssertionError, match="jacobian differs"):
        testing.assert_vjp_matches(wrong, ref_softmax, _x(), transforms=(transform,))
    errors = testing.vjp_errors(wrong, ref_softmax, _x(), transform=transform)
    assert errors.value_error < 1e-6
    assert errors.jacobian_error > 1e-2
    assert errors.jacobian_rel_error > 0.1


def _softmax_vjp(x, g, dtype):
    y = jax.nn.softmax(x)
    return y * (g - jnp.sum(g * y, axis=-1, keepdims=True))


# Backward passes right at unit cotangents (what jax.jacrev feeds), wrong
# elsewhere: g -> f(g) before the right rule.
NONLINEAR = {
    "abs": jnp.abs,
    "square": jnp.square,
    "relu": lambda g: jnp.maximum(g, 0),
    "sign": jnp.sign,
}


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
@pytest.mark.parametrize("kind", sorted(NONLINEAR))
def test_a_rule_not_linear_in_its_cotangent_fails(kind, transform):
    # Every Jacobian row passed: jacrev's cotangents are 0 and 1, where
    # |g|, g**2, max(g, 0) and sign(g) equal g. grad(sum(w * softmax)) with
    # signed w was wrong by half. The VJP at signed cotangents of other sizes
    # is compared with J^T w now; the right rule is the control.
    def bwd(x, g, dtype, f=NONLINEAR[kind]):
        return _softmax_vjp(x, f(g), dtype)

    x = _x()
    for rule, fails in (
        (_rule(ref_softmax, bwd), True),
        (_rule(ref_softmax, _softmax_vjp), False),
    ):
        e = testing.vjp_errors(rule, ref_softmax, x, transform=transform)
        assert e.value_mismatch is None, e
        assert (e.jacobian_mismatch is not None) == fails, e
        if fails:
            assert "by a VJP at a signed cotangent" in e.jacobian_mismatch


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_a_scalar_loss_whose_rule_ignores_its_cotangent_fails(transform):
    # One output per example, whose rule returns the gradient at cotangent 1
    # whatever it gets: jacrev's one row passed; grad(0.5 * loss) was wrong.
    @jax.custom_vjp
    def loss(x):
        return jnp.sum(x**2)

    loss.defvjp(lambda x: (jnp.sum(x**2), x), lambda x, g: (2 * x,))
    e = testing.vjp_errors(loss, lambda x: jnp.sum(x**2), _x(), transform=transform)
    assert "by a VJP at a signed cotangent" in (e.jacobian_mismatch or ""), e


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_a_rule_not_linear_at_one_entry_is_named_by_its_index(transform):
    # The message named x[0, 7], the entry's place in a flattened row, for
    # x[1, 3] of a (3, 4) input.
    @jax.custom_vjp
    def f(x):
        return jnp.tanh(x)

    def bwd(x, g):
        d = (1 - jnp.tanh(x) ** 2) * g
        return (jnp.where(_entry(x, 1, 3), d * g, d),)  # g**2 at x[1, 3] only

    f.defvjp(lambda x: (f(x), x), bwd)
    x = _x((3, 4)) if transform != "vmap" else _x((2, 3, 4))
    e = testing.vjp_errors(f, jnp.tanh, x, transform=transform)
    want = "x[1, 3]" if transform != "vmap" else "x[0, 1, 3]"
    assert e.value_mismatch is None, e
    assert e.jacobian_mismatch.startswith(f"d {want} by a VJP at a signed"), e
    assert "1 of 12 entries" in e.jacobian_mismatch or "2 of 24" in e.jacobian_mismatch


def _entry(x, i, j):
    """A bool mask of ``x``'s last two axes, true at ``[i, j]`` only."""
    rows = jnp.arange(x.shape[-2])[:, None] == i
    return rows & (jnp.arange(x.shape[-1]) == j)[None, :]


@pytest.mark.parametrize("transform", ["none", "jit"])
def test_a_float16_vjp_that_overflows_where_its_sum_does_is_not_called_nonlinear(
    transform,
):
    # A plain matmul (no rule of its own): J^T w at the signed cotangent
    # (weights up to 3) passes float16's 65504 at two entries of dW whose
    # Jacobian entries are finite, and was reported as "not linear?".
    x = {
        "x": (1e4 * _x((2, 8))).astype(jnp.float16),
        "w": (_x((8, 7), seed=1) / 3).astype(jnp.float16),
    }

    def f(p):
        return p["x"] @ p["w"]

    e = testing.vjp_errors(f, f, x, transform=transform)
    assert e.passed, e

    # A VJP that gives inf where J^T w is well inside float16 still fails
    # (at cotangents other than jacrev's 0 and 1 only, so that the rows pass).
    @jax.custom_vjp
    def g(p):
        return f(p)

    def bwd(p, c):
        dx, dw = c @ p["w"].T, p["x"].T @ c
        broken = _entry(dx, 1, 2) & jnp.any(jnp.abs(c) > 1)
        return ({"x": jnp.where(broken, jnp.inf, dx), "w": dw},)

    g.defvjp(lambda p: (f(p), p), bwd)
    small = {"x": x["x"] / 1e4, "w": x["w"]}
    e = testing.vjp_errors(g, f, small, transform=transform)
    assert not e.passed, e
    assert e.jacobian_mismatch.startswith("d ['x'][1, 2] by a VJP at a signed"), e


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_a_python_number_output_leaf_is_compared(transform):
    # A Python float beside an array output raised AttributeError ('float'
    # object has no attribute 'dtype').
    def f(x, c=0.5):
        return jnp.tanh(x), c

    e = testing.vjp_errors(f, f, _x((3, 4)), transform=transform)
    assert e.passed, e
    e = testing.vjp_errors(partial(f, c=0.6), f, _x((3, 4)), transform=transform)
    assert not e.passed and e.jacobian_mismatch is None
    assert e.value_mismatch.startswith("[1]"), e


def test_an_allowance_that_overflows_approves_nothing():
    # A float64 Jacobian entry of 1e160 made its row norm overflow (squares
    # past 1e308): the allowance was inf, and a NaN error gave inf / inf =
    # NaN, which no "ratio > 1" test fails.
    with jax.enable_x64(True):
        x = jnp.array([1.0, 2.0, 3.0], jnp.float64)
        scale = jnp.array([1e160, 1.0, 1.0], jnp.float64)

        @jax.custom_vjp
        def f(x):
            return x * scale

        f.defvjp(lambda x: (x * scale, None), lambda _, g: (g * scale * jnp.nan,))
        e = testing.vjp_errors(f, lambda x: x * scale, x)
    assert not e.passed and not e.jacobian_ratio <= 1, e


def test_fails_on_a_wrong_value():
    with pytest.raises(AssertionError, match="value differs"):
        testing.assert_vjp_matches(
            lambda x: jsoftmax.softmax(x) + 1e-3, ref_softmax, _x(), transforms=("jit",)
        )


def test_finite_differences_catch_a_wrong_backward():
    wrong = _rule(ref_softmax, WRONG_RULES["softmax without -y<g,y>"][1])
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (4,), jnp.float64)
        testing.assert_finite_differences(jsoftmax.softmax, x, order=2)
        with pytest.raises(AssertionError):
            testing.assert_finite_differences(wrong, x, order=1)


@jax.custom_vjp
def _softmax_constant_residual(x):
    return ref_softmax(x)


def _softmax_constant_residual_fwd(x):
    y = ref_softmax(x)
    return y, y


def _softmax_constant_residual_bwd(y, g):
    # The first derivative is right; differentiating the backward pass treats
    # y as a constant, so the second derivative misses d y / d x.
    y = jax.lax.stop_gradient(y)
    return (y * (g - jnp.sum(g * y, -1, keepdims=True)),)


_softmax_constant_residual.defvjp(
    _softmax_constant_residual_fwd, _softmax_constant_residual_bwd
)


def test_finite_differences_default_order_catches_a_wrong_second_derivative():
    # Issue 18 item 13: the default order was 1, though the docs said 2.
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (4,), jnp.float64)
        testing.assert_finite_differences(_softmax_constant_residual, x, order=1)
        with pytest.raises(AssertionError, match="VJP of VJP"):
            testing.assert_finite_differences(_softmax_constant_residual, x)
        testing.assert_finite_differences(jsoftmax.softmax, x)


def test_bfloat16_compares_against_a_float32_reference():
    x = _x().astype(jnp.bfloat16)
    errors = testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, x)
    assert all(e.value_error < 1e-2 for e in errors)


def test_vjp_errors_reports_pass_and_fail():
    wrong = _rule(ref_softmax, WRONG_RULES["softmax without -y<g,y>"][1])
    good = testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(), transform="jit")
    assert good.passed
    bad = testing.vjp_errors(wrong, ref_softmax, _x(), transform="jit")
    assert not bad.passed
    assert bad.value_mismatch is None
    assert bad.jacobian_mismatch


def test_symmetric_declared_on_a_non_symmetric_jacobian_is_caught_by_jacfwd():
    # with_forward_mode(symmetric=True) cannot tell that log_softmax's
    # Jacobian is not symmetric: its forward mode gives J^T t, its reverse
    # mode stays right. Its docstring names vjp_errors as the way to catch it.
    rule = _rule(ref_log_softmax, _log_softmax_grad)
    wrong = jsoftmax.with_forward_mode(rule, symmetric=True)
    x = _x()
    np.testing.assert_allclose(jax.jacrev(wrong)(x), jax.jacrev(ref_log_softmax)(x))
    e = testing.vjp_errors(wrong, ref_log_softmax, x)
    assert e.value_mismatch is None
    assert "by jax.jacfwd" in e.jacobian_mismatch
    assert "by jax.jacfwd" in e.forward_mismatch
    with pytest.raises(AssertionError, match="by jax.jacfwd"):
        testing.assert_vjp_matches(wrong, ref_log_softmax, x, transforms="jit")
    right = jsoftmax.with_forward_mode(rule)
    assert testing.vjp_errors(right, ref_log_softmax, x).passed


# The API page documents every public name.


def _api_entries():
    """The fully qualified names docs/api.rst has an autodoc entry for."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "api.rst").read_text()
    names, module = set(), ""
    for directive, arg in re.findall(r"^\.\. (\w+):: (\S+)", text, re.M):
        if directive in ("currentmodule", "automodule"):
            module = arg
        if directive == "automodule":
            names.add(arg)
        elif directive.startswith("auto"):
            names.add(f"{module}.{arg}")
    return names


def test_every_public_name_has_an_entry_in_the_api_page():
    public = [f"jsoftmax.{name}" for name in jsoftmax.__all__]
    public += [f"jsoftmax.testing.{name}" for name in testing.__all__]
    missing = sorted(set(public) - _api_entries())
    assert not missing, f"docs/api.rst has no entry for {missing}"

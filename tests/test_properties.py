"""Property sweeps over the input classes that once gave silent wrong results.

Each sweep draws from a whole class (every integer label dtype, the masking
idioms copied from optax and jax.nn, every option value) rather than from the
one example that exposed a bug. Compiles dominate the run time, so the example
counts are small and the shapes few.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jsoftmax
from jsoftmax.testing import (
    reference_softmax_cross_entropy_with_integer_labels as ref_int_ce,
)

SWEEP = settings(max_examples=12, deadline=None, derandomize=True)
INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32"]


def _logits(seed, rows, classes):
    return 2.0 * jax.random.normal(jax.random.key(seed), (rows, classes))


@SWEEP
@given(
    dtype=st.sampled_from(INT_DTYPES),
    rows=st.sampled_from([1, 7, 130, 300]),
    classes=st.sampled_from([1, 2, 127, 128, 129, 256, 300]),
    seed=st.integers(0, 2**16),
)
def test_any_label_dtype_rows_and_classes_match_optax(dtype, rows, classes, seed):
    classes = min(classes, int(jnp.iinfo(dtype).max) + 1)
    z = _logits(seed, rows, classes)
    ids = jax.random.randint(jax.random.key(seed + 1), (rows,), 0, classes)
    weights = jnp.cos(jnp.arange(rows, dtype=jnp.float32))

    def ours(z):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids.astype(dtype))

    def theirs(z):
        return optax.softmax_cross_entropy_with_integer_labels(z, ids)

    # Under jit: one compilation per shape, not one per operation.
    got = jax.jit(jax.value_and_grad(lambda z: jnp.sum(ours(z) * weights)))(z)
    want = jax.jit(jax.value_and_grad(lambda z: jnp.sum(theirs(z) * weights)))(z)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    # The fused loss, with x the identity, gets the same labels.
    x, w = (
        jnp.eye(rows, 8),
        jnp.zeros((8, classes)).at[: min(rows, 8)].set(z[: min(rows, 8)]),
    )
    fused = jax.jit(
        lambda x, w: jsoftmax.linear_softmax_cross_entropy(
            x, w, ids.astype(dtype), reduction="none", chunk_size=64
        )
    )(x, w)
    direct = jsoftmax.softmax_cross_entropy_with_integer_labels(x @ w, ids)
    chex.assert_trees_all_close(fused, direct, atol=1e-5, rtol=1e-5)


def _bad_label(dtype, kind, classes):
    info = jnp.iinfo(dtype)
    return {
        "minus_100": -100 if info.min < 0 else int(info.max),
        "classes": min(classes, int(info.max)),
        "max": int(info.max),
    }[kind]


IDIOMS = ["where", "multiply", "fused_where_arg", "fused_after"]


@SWEEP
@given(
    idiom=st.sampled_from(IDIOMS),
    dtype=st.sampled_from(["int8", "int16", "int32", "uint8", "uint32"]),
    bad=st.sampled_from(["minus_100", "classes", "max"]),
    keep=st.lists(st.booleans(), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_masking_idioms_never_poison_gradients(idiom, dtype, bad, keep, seed):
    """Rows masked after (or inside) the loss get exactly zero gradient, the
    rest equal optax on the kept rows: a zero cotangent is a zero gradient."""
    rows, classes, d = 6, 5, 4
    keep = jnp.array(keep)
    good = jax.random.randint(jax.random.key(seed), (rows,), 0, classes)
    ids = jnp.where(
        keep, good.astype(dtype), np.array(_bad_label(dtype, bad, classes), dtype)
    )
    x = jax.random.normal(jax.random.key(seed + 1), (rows, d))
    w = jax.random.normal(jax.random.key(seed + 2), (d, classes))

    def ours(x, w):
        if idiom == "fused_where_arg":
            return jsoftmax.linear_softmax_cross_entropy(
                x, w, ids, where=keep, reduction="sum", chunk_size=2
            )
        if idiom == "fused_after":
            loss = jsoftmax.linear_softmax_cross_entropy(
                x, w, ids, reduction="none", chunk_size=2
            )
        else:
            loss = jsoftmax.softmax_cross_entropy_with_integer_labels(x @ w, ids)
        if idiom == "multiply":
            # NaN * 0 is NaN in the forward pass, so this idiom needs where
            # first; what matters is the gradient of the kept rows.
            loss = jnp.where(keep, loss, 0) * keep.astype(loss.dtype)
        else:
            loss = jnp.where(keep, loss, 0)
        return jnp.sum(loss)

    def theirs(x, w):
        loss = optax.softmax_cross_entropy_with_integer_labels(x @ w, good)
        return jnp.sum(jnp.where(keep, loss, 0))

    got = jax.value_and_grad(ours, (0, 1))(x, w)
    want = jax.value_and_grad(theirs, (0, 1))(x, w)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    assert not jnp.any(got[1][0][~keep])


@SWEEP
@given(
    label_smoothing=st.floats(0, 1),
    z_loss=st.floats(0, 1),
    soft_cap=st.one_of(st.none(), st.floats(0.05, 1e4)),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_valid_option_values_match_the_definition(
    label_smoothing, z_loss, soft_cap, masked, seed
):
    z = _logits(seed, 3, 6)
    ids = jnp.array([0, 3, 5])
    where = jnp.array([True, True, False, True, True, True]) if masked else None
    ids = jnp.where(ids == 2, 0, ids)
    opts = dict(
        where=where, label_smoothing=label_smoothing, z_loss=z_loss, soft_cap=soft_cap
    )

    def ours(z):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids, **opts)

    def ref(z):
        return ref_int_ce(z, ids, **opts)

    got = jax.value_and_grad(lambda z: jnp.sum(ours(z)))(z)
    want = jax.value_and_grad(lambda z: jnp.sum(ref(z)))(z)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
    x, w = jnp.eye(3, 3), z[:3]
    fused = jsoftmax.linear_softmax_cross_entropy(
        x, w, ids, reduction="none", chunk_size=4,
        label_smoothing=label_smoothing, z_loss=z_loss, soft_cap=soft_cap,
    )  # fmt: skip
    unfused = ref_int_ce(
        x @ w, ids, label_smoothing=label_smoothing, z_loss=z_loss, soft_cap=soft_cap
    )
    chex.assert_trees_all_close(fused, unfused, atol=1e-4, rtol=1e-4)
    assert jnp.all(fused >= 0)


BAD_VALUES = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), "0.1", True, None]),
    st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
)


@SWEEP
@given(
    arg=st.sampled_from(["label_smoothing", "z_loss", "soft_cap"]),
    value=BAD_VALUES,
    op=st.sampled_from(["probability", "integer", "linear"]),
)
def test_any_invalid_option_value_is_refused_by_name(arg, value, op):
    if arg == "soft_cap" and value is None:
        value = 0.0  # None means no cap
    z = jnp.zeros((2, 3))
    call = {
        "probability": lambda: jsoftmax.softmax_cross_entropy(z, z, **{arg: value}),
        "integer": lambda: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, jnp.zeros(2, jnp.int32), **{arg: value}
        ),
        "linear": lambda: jsoftmax.linear_softmax_cross_entropy(
            z, z.T, jnp.zeros(2, jnp.int32), **{arg: value}
        ),
    }[op]
    with pytest.raises((TypeError, ValueError), match=arg):
        call()


@SWEEP
@given(
    mask=st.lists(
        st.lists(st.booleans(), min_size=5, max_size=5), min_size=4, max_size=4
    ),
    row_mask=st.booleans(),
    neg_inf_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rows_with_no_valid_class_give_zero_loss_and_gradient(
    mask, row_mask, neg_inf_row, seed
):
    """Both losses agree on any class mask, including [B, 1] example masks
    and rows of -inf: an empty row has loss 0 and gradient 0."""
    mask = jnp.array(mask)
    if row_mask:
        mask = mask[:, :1]
    z = _logits(seed, 4, 5)
    if neg_inf_row:
        z = z.at[2].set(-jnp.inf)
    valid = jnp.broadcast_to(mask, z.shape) & (z > -jnp.inf)
    ids = jnp.argmax(valid, axis=-1)  # a valid class where the row has one
    onehot = jax.nn.one_hot(ids, 5)
    empty = ~jnp.any(valid, axis=-1)
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, onehot),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, ids),
    ):
        loss, g = jax.value_and_grad(
            lambda z, op=op, y=labels: jnp.sum(
                op(z, y, where=mask) * jnp.arange(1.0, 5.0)
            ),
        )(z)
        per_row = op(z, labels, where=mask)
        assert jnp.all(per_row[empty] == 0) and jnp.all(jnp.isfinite(per_row))
        assert not jnp.any(g[empty]) and jnp.all(jnp.isfinite(g))
    chex.assert_trees_all_close(
        jsoftmax.softmax_cross_entropy(z, onehot, where=mask),
        jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids, where=mask),
        atol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(empty).shape, (4,))


# Static integer arguments of every op but attention: each op's class axis and
# the fused loss's chunk size. Python counts bools as ints, so chunk_size=True
# once ran chunks of 1.
_Z = jnp.zeros((2, 3))
STATIC_INTS = {
    ("softmax", "axis"): lambda v: jsoftmax.softmax(_Z, axis=v),
    ("log_softmax", "axis"): lambda v: jsoftmax.log_softmax(_Z, axis=v),
    ("softmax_cross_entropy", "axis"): lambda v: jsoftmax.softmax_cross_entropy(
        _Z, _Z, axis=v
    ),
    ("softmax_cross_entropy_with_integer_labels", "axis"): lambda v: (
        jsoftmax.softmax_cross_entropy_with_integer_labels(
            _Z, jnp.zeros(2, jnp.int32), axis=v
        )
    ),
    ("linear_softmax_cross_entropy", "chunk_size"): lambda v: (
        jsoftmax.linear_softmax_cross_entropy(
            _Z, _Z.T, jnp.zeros(2, jnp.int32), chunk_size=v
        )
    ),
}
BAD_STATIC_INTS = {
    "True": True,
    "False": False,
    "np.True_": np.True_,
    "np.array(True)": np.array(True),
    "jnp.array(True)": jnp.array(True),
    "1.0": 1.0,
    "np.float32(1)": np.float32(1.0),
    "jnp.array(1.0)": jnp.array(1.0),
    "'1'": "1",
    "(0, True)": (0, True),
    "traced": None,  # the int 1, traced by jit
}


@pytest.mark.parametrize("value", BAD_STATIC_INTS, ids=str)
@pytest.mark.parametrize(
    "op,arg", STATIC_INTS, ids=[f"{o}-{a}" for o, a in STATIC_INTS]
)
def test_bad_static_int_arguments_are_refused_by_name(op, arg, value):
    call = STATIC_INTS[op, arg]
    if value == "traced":
        with pytest.raises(TypeError, match=f"^{op}: {arg} must be static"):
            jax.jit(call)(1)
        return
    with pytest.raises(TypeError, match=f"^{op}: {arg} must be"):
        call(BAD_STATIC_INTS[value])

"""jsoftmax.testing: the helpers pass on a right rule and fail on a wrong one."""

from functools import partial

import jax
import jax.numpy as jnp
import pytest

import jsoftmax
from jsoftmax import testing
from jsoftmax.testing import reference_softmax as ref_softmax


@partial(jax.custom_vjp)
def _softmax_wrong_bwd(x):
    return ref_softmax(x)


def _fwd(x):
    y = ref_softmax(x)
    return y, y


def _wrong_bwd(y, g):
    # Misses the "- <g, y>" term: a plausible bug.
    return (y * g,)


_softmax_wrong_bwd.defvjp(_fwd, _wrong_bwd)


def _x():
    return jax.random.normal(jax.random.key(0), (3, 5))


def test_passes_on_a_correct_rule_and_reports_each_transform():
    errors = testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, _x())
    assert [e.transform for e in errors] == list(testing.TRANSFORMS)
    for e in errors:
        assert 0.0 <= e.value_error < 1e-6
        assert 0.0 <= e.jacobian_error < 1e-6


@pytest.mark.parametrize("transform", testing.TRANSFORMS)
def test_fails_on_a_wrong_backward(transform):
    with pytest.raises(AssertionError, match="jacobian differs"):
        testing.assert_vjp_matches(
            _softmax_wrong_bwd, ref_softmax, _x(), transforms=(transform,)
        )
    errors = testing.vjp_errors(
        _softmax_wrong_bwd, ref_softmax, _x(), transform=transform
    )
    assert errors.value_error < 1e-6
    assert errors.jacobian_error > 1e-2


def test_fails_on_a_wrong_value():
    with pytest.raises(AssertionError, match="value differs"):
        testing.assert_vjp_matches(
            lambda x: jsoftmax.softmax(x) + 1e-3, ref_softmax, _x(), transforms=("jit",)
        )


def test_finite_differences_catch_a_wrong_backward():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (4,), jnp.float64)
        testing.assert_finite_differences(jsoftmax.softmax, x, order=2)
        with pytest.raises(AssertionError):
            testing.assert_finite_differences(_softmax_wrong_bwd, x, order=1)


def test_bfloat16_compares_against_a_float32_reference():
    x = _x().astype(jnp.bfloat16)
    errors = testing.assert_vjp_matches(jsoftmax.softmax, ref_softmax, x)
    assert all(e.value_error < 1e-2 for e in errors)


def test_tolerance_table_and_unknown_transform():
    assert testing.tolerances(jnp.float32) == (1e-6, 2e-3)
    assert testing.tolerances(jnp.bfloat16) == (1e-2, 1e-1)
    with pytest.raises(ValueError, match="transform"):
        testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(), transform="pmap")


def test_vjp_errors_reports_pass_and_fail():
    good = testing.vjp_errors(jsoftmax.softmax, ref_softmax, _x(), transform="jit")
    assert good.passed
    bad = testing.vjp_errors(_softmax_wrong_bwd, ref_softmax, _x(), transform="jit")
    assert not bad.passed
    assert bad.value_mismatch is None
    assert bad.jacobian_mismatch

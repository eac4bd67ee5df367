"""Every public name imports and is listed in __all__."""

import jsoftmax

PUBLIC = [
    "dot_product_attention",
    "linear_softmax_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "log_softmax",
    "softmax",
    "softmax_jacobian",
    "testing",
    "with_forward_mode",
]


def test_every_public_name_imports():
    for name in PUBLIC:
        assert getattr(jsoftmax, name) is not None, name
    assert sorted(jsoftmax.__all__) == sorted(PUBLIC)


def test_testing_helpers_are_public():
    from jsoftmax.testing import (  # noqa: F401
        assert_finite_differences,
        assert_vjp_matches,
        tolerances,
        vjp_errors,
    )

"""Every public name imports and is listed in __all__."""

import pathlib
import subprocess
import sys

import jsoftmax

PUBLIC = [
    "dot_product_attention",
    "flax_attention_fn",
    "from_zigzag",
    "linear_softmax_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "log_softmax",
    "softmax",
    "softmax_jacobian",
    "testing",
    "to_zigzag",
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


def test_import_does_not_import_flax():
    # flax is optional: jsoftmax.flax_attention_fn only takes flax's arguments.
    code = (
        "import sys, jsoftmax\n"
        "assert jsoftmax.__file__.startswith(sys.argv[1]), jsoftmax.__file__\n"
        "flax = sorted(m for m in sys.modules if m.split('.')[0] == 'flax')\n"
        "assert not flax, flax\n"
    )
    root = str(pathlib.Path(jsoftmax.__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]

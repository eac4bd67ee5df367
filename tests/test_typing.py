"""The public API as a type checker sees it: the package is marked typed
(PEP 561), mypy reads each public signature (not ``Any``), a user's code that
calls the ops as documented checks clean under ``--strict``, and a wrong call
is reported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsoftmax

# Every public function and class (the testing helpers too), as mypy reveals it.
_REVEALED = [f"jsoftmax.{n}" for n in jsoftmax.__all__ if n != "testing"] + [
    f"jsoftmax.testing.{n}" for n in jsoftmax.testing.__all__ if n != "TOLERANCES"
]

_USER_CODE = """\
import jax
import jax.numpy as jnp

import jsoftmax
import jsoftmax.testing

x = jnp.ones((4, 8))
labels = jnp.zeros(4, jnp.int32)
q = jnp.ones((1, 16, 2, 8))
y: jax.Array = jsoftmax.softmax(x, axis=-1, where=x > 0, axis_name=None)
ls: jax.Array = jsoftmax.log_softmax(x, axis=(0, 1))
ce: jax.Array = jsoftmax.softmax_cross_entropy(x, y, where=x > 0, z_loss=1e-4)
cei: jax.Array = jsoftmax.softmax_cross_entropy_with_integer_labels(x, labels)
w = jnp.ones((8, 10))
fused: jax.Array = jsoftmax.linear_softmax_cross_entropy(x, w, labels, chunk_size=4)
o: jax.Array = jsoftmax.dot_product_attention(q, q, q, is_causal=True)
o2, lse = jsoftmax.dot_product_attention(q, q, q, return_residual=True)
pair: tuple[jax.Array, jax.Array] = jsoftmax.dot_product_attention(
    q, q, q, implementation="xla", return_residual=True
)
flag = bool(x.sum() > 0)
either = jsoftmax.dot_product_attention(q, q, q, return_residual=flag)
fl: jax.Array = jsoftmax.flax_attention_fn(q, q, q)
jac: jax.Array = jsoftmax.softmax_jacobian(y)
zz: jax.Array = jsoftmax.from_zigzag(jsoftmax.to_zigzag(q, 2), 2)
ref: jax.Array = jsoftmax.testing.reference_softmax(x, where=x > 0)
rl: jax.Array = jsoftmax.testing.reference_log_softmax(x)
rc: jax.Array = jsoftmax.testing.reference_softmax_cross_entropy(x, y)
ri: jax.Array = jsoftmax.testing.reference_softmax_cross_entropy_with_integer_labels(
    x, labels
)
report: list[jsoftmax.testing.VjpErrors] = jsoftmax.testing.assert_vjp_matches(
    jsoftmax.softmax, jsoftmax.testing.reference_softmax, x
)
tol: tuple[float, float] = jsoftmax.testing.tolerances(jnp.float32)


@jax.custom_vjp
def sine(x: jax.Array) -> jax.Array:
    return jnp.sin(x)


def sine_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sin(x), jnp.cos(x)


def sine_bwd(cos: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (cos * g,)


sine.defvjp(sine_fwd, sine_bwd)
tangent: jax.Array = jax.jvp(jsoftmax.with_forward_mode(sine), (x,), (x,))[1]
forward: jax.Array = jsoftmax.with_forward_mode(sine)(x)
print(o.shape, o2.shape, lse.shape, pair[1].shape, either, ls, ce, cei, fused)
print(fl, jac, zz, ref, rl, rc, ri, report, tol, tangent, forward)
"""

# Each line is a mistake that mypy must report: a residual pair used as one
# array, an implementation jax.nn does not name, an axis of the wrong type,
# and the output alone taken for the (output, lse) pair.
_WRONG_CODE = """\
import jax.numpy as jnp

import jsoftmax

q = jnp.ones((1, 16, 2, 8))
print(jsoftmax.dot_product_attention(q, q, q, return_residual=True).shape)
jsoftmax.dot_product_attention(q, q, q, implementation="triton")
jsoftmax.softmax(q, axis="last")
pair: tuple[jnp.ndarray, jnp.ndarray] = jsoftmax.dot_product_attention(q, q, q)
"""


def _mypy(tmp_path, files):
    """mypy --strict on ``files`` (name -> source), with jsoftmax read as an
    installed package is (its own errors not reported): the exit status and
    the report's lines."""
    site = tmp_path / "site"
    shutil.copytree(
        Path(jsoftmax.__file__).parent,
        site / "jsoftmax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    env = dict(os.environ, MYPYPATH=str(site))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), *files],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert not run.stderr.strip(), run.stderr
    return run.returncode, run.stdout.splitlines()


def test_package_is_marked_typed():
    # Without the marker, mypy reports `import jsoftmax` as untyped and reads
    # none of the annotations below.
    assert Path(jsoftmax.__file__).with_name("py.typed").is_file()


def test_type_checkers_read_the_public_api(tmp_path):
    reveal = "import jsoftmax\nimport jsoftmax.testing\n" + "".join(
        f"reveal_type({name})\n" for name in _REVEALED
    )
    status, report = _mypy(
        tmp_path, {"user.py": _USER_CODE, "wrong.py": _WRONG_CODE, "reveal.py": reveal}
    )
    assert status == 1, report

    # Every public name has its signature: none is Any (an untyped decorator
    # made every op Any before), and each op returns arrays.
    revealed = [line for line in report if line.startswith("reveal.py:")]
    assert len(revealed) == len(_REVEALED), report
    for name, line in zip(_REVEALED, revealed, strict=True):
        assert 'Revealed type is "Any"' not in line, (name, line)
    ops = [line for name, line in zip(_REVEALED, revealed, strict=True)
           if not name.startswith("jsoftmax.testing")
           and name != "jsoftmax.with_forward_mode"]  # fmt: skip
    array = "jax._src.basearray.Array"
    for line in ops:
        assert line.endswith(f'-> {array}"') or line.endswith(
            f'-> {array} | tuple[{array}, {array}])"'  # the last of the overloads
        ), line

    # The documented calls check clean under --strict.
    assert not [line for line in report if line.startswith("user.py:")], report

    # Each mistake is reported, on its own line.
    wrong = {int(line.split(":")[1]) for line in report if line.startswith("wrong.py:")}
    assert wrong == {6, 7, 8, 9}, report

"""Helpers that check a function's hand-written VJP, built on chex asserts.

The project's own tests use them, and so can anyone writing a custom rule:

>>> import jax, jax.numpy as jnp
>>> import jsoftmax
>>> from jsoftmax import testing
>>> def reference(x):
...     e = jnp.exp(x - x.max(-1, keepdims=True))
...     return e / e.sum(-1, keepdims=True)
>>> x = jax.random.normal(jax.random.key(0), (3, 5))
>>> errors = testing.assert_vjp_matches(jsoftmax.softmax, reference, x)
>>> [e.transform for e in errors]
['none', 'jit', 'vmap']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np

__all__ = [
    "TOLERANCES",
    "TRANSFORMS",
    "VjpErrors",
    "assert_finite_differences",
    "assert_vjp_matches",
    "tolerances",
    "vjp_errors",
]

# (value tolerance, gradient tolerance) per dtype, used as both atol and rtol.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-15, 1e-5),
    "float32": (1e-6, 2e-3),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 1e-1),
}

TRANSFORMS = ("none", "jit", "vmap")


def tolerances(dtype) -> tuple[float, float]:
    """The ``(value, gradient)`` tolerances for ``dtype``, from ``TOLERANCES``."""
    return TOLERANCES[np.dtype(dtype).name]


@dataclasses.dataclass(frozen=True)
class VjpErrors:
    """Largest absolute differences between a function and its reference."""

    transform: str
    value_error: float
    jacobian_error: float


def _reference_input(x: jax.Array) -> jax.Array:
    # A 16-bit reference is itself inexact: the reference runs in float32 on the
    # same (already rounded) input.
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def _evaluate(fn, reference, x, transform):
    """Values and Jacobians (w.r.t. ``x``) of ``fn`` and ``reference``."""
    jac_fn, jac_ref = jax.jacrev(fn), jax.jacrev(reference)
    x_ref = _reference_input(x)
    if transform == "none":
        return fn(x), reference(x_ref), jac_fn(x), jac_ref(x_ref)
    if transform == "jit":
        return (
            jax.jit(fn)(x),
            reference(x_ref),
            jax.jit(jac_fn)(x),
            jac_ref(x_ref),
        )
    if transform == "vmap":
        # x carries a leading batch axis. The reference walks it with lax.map,
        # one example at a time, so it shares no batching rule with fn.
        return (
            jax.vmap(fn)(x),
            jax.lax.map(reference, x_ref),
            jax.vmap(jac_fn)(x),
            jax.lax.map(jac_ref, x_ref),
        )
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def _max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(
        lambda u, v: float(
            jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32)))
            if np.size(u)
            else 0.0
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def vjp_errors(
    fn: Callable, reference: Callable, x: jax.typing.ArrayLike, *, transform="none"
) -> VjpErrors:
    """Measures how far ``fn`` and ``jax.jacrev(fn)`` are from a reference.

    Args:
      fn: the function under test, of one array argument (close over the rest
        with ``functools.partial``).
      reference: an independent implementation of the same function, usually
        plain ``jax.numpy`` code differentiated by autodiff.
      x: the point to compare at. Under ``"vmap"`` its leading axis is a batch
        axis that ``fn`` is vmapped over.
      transform: ``"none"``, ``"jit"`` or ``"vmap"``.

    Returns:
      The largest absolute differences of the value and of the Jacobian. For
      16-bit inputs the reference runs in float32.
    """
    x = jnp.asarray(x)
    value, value_ref, jac, jac_ref = _evaluate(fn, reference, x, transform)
    return VjpErrors(
        transform, _max_abs_diff(value, value_ref), _max_abs_diff(jac, jac_ref)
    )


def assert_vjp_matches(
    fn: Callable,
    reference: Callable,
    x: jax.typing.ArrayLike,
    *,
    transforms: Sequence[str] = TRANSFORMS,
    atol: float | None = None,
    rtol: float | None = None,
    grad_atol: float | None = None,
    grad_rtol: float | None = None,
) -> list[VjpErrors]:
    """Asserts that ``fn`` and its VJP match ``reference`` under each transform.

    Values and full Jacobians (``jax.jacrev``) are compared element by element
    with ``chex.assert_trees_all_close``. Tolerances default to
    ``tolerances(x.dtype)``.

    Args:
      fn: the function under test, of one array argument.
      reference: an independent implementation of the same function.
      x: the point to compare at; under ``"vmap"`` its leading axis is a batch.
      transforms: any of ``"none"``, ``"jit"``, ``"vmap"``.
      atol, rtol: tolerances of the value.
      grad_atol, grad_rtol: tolerances of the Jacobian.

    Returns:
      The measured errors, one entry per transform.

    Raises:
      AssertionError: a value or a Jacobian is not close to the reference.
    """
    x = jnp.asarray(x)
    value_tol, grad_tol = tolerances(x.dtype)
    errors = []
    for transform in transforms:
        value, value_ref, jac, jac_ref = _evaluate(fn, reference, x, transform)
        for got, want, a, r, what in (
            (value, value_ref, atol, rtol, "value"),
            (jac, jac_ref, grad_atol, grad_rtol, "jacobian"),
        ):
            tol = value_tol if what == "value" else grad_tol
            chex.assert_trees_all_close(
                jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), got),
                jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), want),
                atol=tol if a is None else a,
                rtol=tol if r is None else r,
                custom_message=f"{what} differs from the reference under {transform}",
            )
        errors.append(
            VjpErrors(
                transform, _max_abs_diff(value, value_ref), _max_abs_diff(jac, jac_ref)
            )
        )
    return errors


def assert_finite_differences(
    fn: Callable,
    *args: jax.typing.ArrayLike,
    order: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    eps: float | None = None,
) -> None:
    """Asserts that reverse-mode derivatives of ``fn`` match finite differences.

    A thin wrapper over ``jax.test_util.check_grads(..., modes=["rev"])``: a
    ``custom_vjp`` function has no forward mode, so only reverse mode (and
    reverse-over-reverse for ``order=2``) is checked. Run it in float64
    (``with jax.enable_x64(True):``) for a meaningful comparison.

    Raises:
      AssertionError: a derivative differs from its finite-difference estimate.
    """
    jax.test_util.check_grads(
        fn, args, order, modes=["rev"], atol=atol, rtol=rtol, eps=eps
    )

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
    "reference_log_softmax",
    "reference_softmax_cross_entropy",
    "reference_softmax_cross_entropy_with_integer_labels",
    "reference_softmax",
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
    value_mismatch: str | None = None
    jacobian_mismatch: str | None = None

    @property
    def passed(self) -> bool:
        """Both the value and the Jacobian are within tolerance."""
        return self.value_mismatch is None and self.jacobian_mismatch is None


def reference_softmax(x, axis=-1, where=None):
    """Plain-autodiff softmax, independent of jsoftmax's rules."""
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True))
    e = jnp.exp(x - shift)
    y = e / jnp.sum(e, axis, keepdims=True)
    return y if where is None else jnp.where(where, y, 0.0)


def reference_log_softmax(x, axis=-1, where=None):
    """Plain-autodiff log-softmax, independent of jsoftmax's rules.

    Masked-out outputs are the constant ``-inf``, as ``jax.nn`` documents.
    """
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True))
    shifted = x - shift
    o = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis, keepdims=True))
    return o if where is None else jnp.where(where, o, -jnp.inf)


def reference_softmax_cross_entropy(
    logits, labels, axis=-1, where=None, label_smoothing=0.0, z_loss=0.0, soft_cap=None
):
    """Plain-autodiff cross-entropy with probability labels (the definition)."""
    z = logits if soft_cap is None else soft_cap * jnp.tanh(logits / soft_cap)
    valid = (
        jnp.ones(z.shape, bool) if where is None else jnp.broadcast_to(where, z.shape)
    )
    k = jnp.sum(valid, axis, keepdims=True, dtype=z.dtype)
    q = (1 - label_smoothing) * labels + label_smoothing / k
    lse = jax.nn.logsumexp(jnp.where(valid, z, -jnp.inf), axis, keepdims=True)
    # Masked classes take no part: 0 in place of their logit keeps NaN out of
    # the gradient of the masked-out terms.
    log_p = jnp.where(valid, z, 0.0) - lse
    loss = -jnp.sum(jnp.where(valid, q * log_p, 0.0), axis, keepdims=True)
    return jnp.squeeze(loss + z_loss * lse**2, axis)


def reference_softmax_cross_entropy_with_integer_labels(
    logits, labels, axis=-1, where=None, label_smoothing=0.0, z_loss=0.0, soft_cap=None
):
    """Plain-autodiff cross-entropy with integer labels, via one-hot labels."""
    onehot = jax.nn.one_hot(labels, logits.shape[axis], axis=axis, dtype=logits.dtype)
    return reference_softmax_cross_entropy(
        logits, onehot, axis, where, label_smoothing, z_loss, soft_cap
    )


def _reference_input(x: jax.Array) -> jax.Array:
    # A 16-bit reference is itself inexact: the reference runs in float32 on the
    # same (already rounded) input.
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def _evaluate(fn, reference, x, transform):
    """Values and Jacobians (w.r.t. ``x``) of ``fn`` and ``reference``."""
    jac_fn = jax.jacrev(fn)
    # The reference is plain autodiff code: jit only makes it quicker.
    ref, jac_ref = jax.jit(reference), jax.jit(jax.jacrev(reference))
    x_ref = _reference_input(x)
    if transform == "none":
        return fn(x), ref(x_ref), jac_fn(x), jac_ref(x_ref)
    if transform == "jit":
        return jax.jit(fn)(x), ref(x_ref), jax.jit(jac_fn)(x), jac_ref(x_ref)
    if transform == "vmap":
        # x carries a leading batch axis. The reference walks it with lax.map,
        # one example at a time, so it shares no batching rule with fn.
        return (
            jax.vmap(fn)(x),
            jax.lax.map(ref, x_ref),
            jax.vmap(jac_fn)(x),
            jax.lax.map(jac_ref, x_ref),
        )
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def _max_abs_diff(a, b) -> float:
    """Largest |a - b| over all leaves; equal entries (inf, -inf, NaN) count 0."""

    def leaf(u, v):
        u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
        if u.size == 0:
            return 0.0
        same = (u == v) | (jnp.isnan(u) & jnp.isnan(v))
        return float(jnp.max(jnp.where(same, 0.0, jnp.abs(u - v))))

    return max(jax.tree.leaves(jax.tree.map(leaf, a, b)), default=0.0)


def _all_close(got, want, atol, rtol) -> str | None:
    """None if every leaf is close, else chex's message."""
    try:
        chex.assert_trees_all_close(
            jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), got),
            jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), want),
            atol=atol,
            rtol=rtol,
        )
    except AssertionError as e:
        return str(e)
    return None


def vjp_errors(
    fn: Callable,
    reference: Callable,
    x: jax.typing.ArrayLike,
    *,
    transform: str = "none",
    atol: float | None = None,
    rtol: float | None = None,
    grad_atol: float | None = None,
    grad_rtol: float | None = None,
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
      atol, rtol: tolerances of the value; default ``tolerances(x.dtype)[0]``.
      grad_atol, grad_rtol: tolerances of the Jacobian; default
        ``tolerances(x.dtype)[1]``.

    Returns:
      The largest absolute differences of the value and of the Jacobian, and
      whether both are within tolerance (``|got - want| <= atol + rtol *
      |want|`` element by element). For 16-bit inputs the reference runs in
      float32.
    """
    x = jnp.asarray(x)
    value_tol, grad_tol = tolerances(x.dtype)
    value, value_ref, jac, jac_ref = _evaluate(fn, reference, x, transform)
    value_msg = _all_close(
        value, value_ref, _default(atol, value_tol), _default(rtol, value_tol)
    )
    jac_msg = _all_close(
        jac, jac_ref, _default(grad_atol, grad_tol), _default(grad_rtol, grad_tol)
    )
    return VjpErrors(
        transform,
        _max_abs_diff(value, value_ref),
        _max_abs_diff(jac, jac_ref),
        value_msg,
        jac_msg,
    )


def _default(value, fallback):
    return fallback if value is None else value


def assert_vjp_matches(
    fn: Callable,
    reference: Callable,
    x: jax.typing.ArrayLike,
    *,
    transforms: Sequence[str] = TRANSFORMS,
    **tolerances_,
) -> list[VjpErrors]:
    """Asserts that ``fn`` and its VJP match ``reference`` under each transform.

    Values and full Jacobians (``jax.jacrev``) are compared element by element
    with ``chex.assert_trees_all_close``.

    Args:
      fn: the function under test, of one array argument.
      reference: an independent implementation of the same function.
      x: the point to compare at; under ``"vmap"`` its leading axis is a batch.
      transforms: any of ``"none"``, ``"jit"``, ``"vmap"``.
      **tolerances_: ``atol``, ``rtol``, ``grad_atol``, ``grad_rtol`` as in
        :func:`vjp_errors`.

    Returns:
      The measured errors, one entry per transform.

    Raises:
      AssertionError: a value or a Jacobian is not close to the reference.
    """
    errors = []
    for transform in transforms:
        e = vjp_errors(fn, reference, x, transform=transform, **tolerances_)
        if e.value_mismatch:
            raise AssertionError(
                f"value differs from the reference under {transform}: "
                f"{e.value_mismatch}"
            )
        if e.jacobian_mismatch:
            raise AssertionError(
                f"jacobian differs from the reference under {transform}: "
                f"{e.jacobian_mismatch}"
            )
        errors.append(e)
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

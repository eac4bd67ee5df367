r"""Helpers that check a function's hand-written VJP against a reference.

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
>>> all(e.passed and e.jacobian_ratio <= 1 for e in errors)
True

A wrong rule fails even where its error is far below any fixed absolute
tolerance: the comparison is relative to the size of what it compares, a
Jacobian row to its own norm or to half the largest row of the same output,
whichever is larger (see :func:`vjp_errors`, also for what that floor lets
through).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence

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

# (value, Jacobian) factors c of the default relative tolerances
# c * (eps + sqrt(n) * eps_sum), see tolerances(). A 16-bit result is compared
# with a float32 reference, so only its own roundings count: jsoftmax's ops use
# at most 0.6 of this allowance (the softmax Jacobian's second derivatives in
# python -m jsoftmax), while a 4-eps error uses 1.7 of it. A float32 or float64
# reference rounds as much as the function under test and neither shows the
# cancellations inside it (a matmul before a logsumexp: 0.4 of this allowance),
# hence the larger factor; a 1% error still uses 300 times the allowance.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (8.0, 8.0),
    "float32": (8.0, 8.0),
    "float16": (2.5, 2.5),
    "bfloat16": (2.5, 2.5),
}
"""The factors ``c`` of :func:`tolerances`, ``(value, Jacobian)`` by dtype name.

These four dtypes are the ones :func:`vjp_errors` compares: a float leaf of
another dtype is refused.
"""

TRANSFORMS = ("none", "jit", "vmap")
"""What :func:`vjp_errors` can run ``fn`` under, all of which
:func:`assert_vjp_matches` runs by default: ``"none"`` (called as it is),
``"jit"`` and ``"vmap"`` (over the leading axis of every leaf of ``x``).
"""

# A Jacobian row is measured against its own norm or, if larger, this fraction
# of the largest row norm of the same output leaf (see vjp_errors).
_ROW_FLOOR = 0.5


def _known_dtype(dtype) -> np.dtype:
    if dtype is None:  # np.dtype(None) is float64
        raise TypeError("no tolerances for dtype None: name a dtype")
    dtype = np.dtype(dtype)
    if dtype.name not in TOLERANCES:
        raise TypeError(
            f"no tolerances for dtype {dtype.name}: jsoftmax.testing compares "
            f"{', '.join(TOLERANCES)} (cast other inputs to one of them)"
        )
    return dtype


def _sum_eps(dtype: np.dtype) -> float:
    """Epsilon of the dtype sums run in: float32 for 16-bit dtypes."""
    finfo = jnp.finfo(dtype)
    return float(jnp.finfo(jnp.float32).eps if finfo.bits < 32 else finfo.eps)


def tolerances(dtype, n: int = 1) -> tuple[float, float]:
    r"""The default ``(value, gradient)`` relative tolerances for ``dtype``.

    Each is

    .. math:: c \, (\epsilon + \sqrt{n} \, \epsilon_\Sigma)

    with ``c`` the factor in ``TOLERANCES``, :math:`\epsilon` the dtype's
    machine epsilon (the result is rounded to it), :math:`\epsilon_\Sigma` the
    epsilon of the dtype sums run in (float32 for float16 and bfloat16, which
    jsoftmax and the float32 reference compute in; the dtype itself
    otherwise) and ``n`` the number of inputs the compared entry depends on
    (the reduction length): a sum of ``n`` terms typically gathers
    :math:`\sqrt{n}` roundings.

    Args:
      dtype: float64, float32, float16 or bfloat16.
      n: the reduction length, at least 1 and finite.

    Returns:
      The relative tolerances of a value entry and of a Jacobian row.

    Raises:
      TypeError: ``dtype`` has no entry in ``TOLERANCES``.
      ValueError: ``n`` is below 1 or not finite.

    Examples:
      >>> from jsoftmax import testing
      >>> [f"{t:.2e}" for t in testing.tolerances("bfloat16", n=1000)]
      ['1.95e-02', '1.95e-02']
      >>> [f"{t:.2e}" for t in testing.tolerances("float32", n=1000)]
      ['3.11e-05', '3.11e-05']
    """
    dtype = _known_dtype(dtype)
    if not 1 <= n < np.inf:  # also refuses NaN; inf would approve anything
        raise ValueError(
            f"tolerances: n is a reduction length, at least 1 and finite, got {n!r}"
        )
    value, grad = TOLERANCES[dtype.name]
    return float(_rtol(dtype, n, value)), float(_rtol(dtype, n, grad))


def _rtol(dtype: np.dtype, n, factor: float) -> np.ndarray:
    """``c * (eps + sqrt(n) * eps_sum)`` for an array of reduction lengths."""
    eps = float(jnp.finfo(dtype).eps)
    return factor * (eps + np.sqrt(np.maximum(n, 1)) * _sum_eps(dtype))


@dataclasses.dataclass(frozen=True)
class VjpErrors:
    """How far a function and its Jacobian are from a reference.

    Attributes:
      transform: ``"none"``, ``"jit"`` or ``"vmap"``.
      value_error: the largest absolute difference of a value entry (in
        ``x``'s dtypes, as all the errors below).
      jacobian_error: the largest absolute difference of a Jacobian entry.
      value_mismatch: None if every value entry is within tolerance, else a
        message naming the worst entry (then the float64 comparison's, after
        "in float64:").
      jacobian_mismatch: None if every Jacobian row is within tolerance, else
        a message naming the worst row (and the float64 comparison's).
      value_rel_error: the largest value error relative to its scale
        (``|got - want| / scale``, see :func:`vjp_errors`).
      jacobian_rel_error: the largest Jacobian row error relative to its
        scale (``||got - want|| / scale``).
      value_ratio: the largest value error over its allowance, in either
        comparison; at most 1 when the values pass.
      jacobian_ratio: the largest row error over its allowance, in either
        comparison; at most 1 when the Jacobian passes.
      forward_error: the largest absolute difference of an entry of
        ``jax.jacfwd(fn)``'s Jacobian from the reference's (already part of
        ``jacobian_error``); None where ``fn`` has no forward mode.
      forward_mismatch: None if every row of ``jax.jacfwd(fn)``'s Jacobian is
        within tolerance (or ``fn`` has no forward mode), else a message
        naming the worst row (already part of ``jacobian_mismatch``).
      float64: the errors of the comparison in float64 (see
        :func:`vjp_errors`), the fields above measured there; None where it
        did not run.
      float64_skipped: why the float64 comparison did not run where ``x``
        has a float leaf that is not float64 and ``float64`` is None (``fn``
        or the reference raised in float64, or computes in a narrower
        float); None otherwise.
    """

    transform: str
    value_error: float
    jacobian_error: float
    value_mismatch: str | None = None
    jacobian_mismatch: str | None = None
    value_rel_error: float = 0.0
    jacobian_rel_error: float = 0.0
    value_ratio: float = 0.0
    jacobian_ratio: float = 0.0
    forward_error: float | None = None
    forward_mismatch: str | None = None
    float64: VjpErrors | None = None
    float64_skipped: str | None = None

    @property
    def passed(self) -> bool:
        """Both the value and the Jacobian are within tolerance."""
        return self.value_mismatch is None and self.jacobian_mismatch is None


def reference_softmax(
    x: jax.typing.ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Plain-autodiff softmax, independent of jsoftmax's rules.

    An unmasked row of all ``-inf`` is NaN here, as in ``jax.nn``, where
    :func:`jsoftmax.softmax` gives 0 with a zero gradient: leave such rows
    out of a comparison with it.
    """
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    # initial: rows without entries (an axis of size 0) give an empty result.
    shift = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True, initial=-jnp.inf))
    e = jnp.exp(x - shift)
    y = e / jnp.sum(e, axis, keepdims=True)
    return y if where is None else jnp.where(where, y, 0.0)


def reference_log_softmax(
    x: jax.typing.ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Plain-autodiff log-softmax, independent of jsoftmax's rules.

    Masked-out outputs are the constant ``-inf``, as ``jax.nn`` documents. An
    unmasked row of all ``-inf`` is NaN here (``jsoftmax.log_softmax``:
    ``-inf``, with a zero gradient).
    """
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True, initial=-jnp.inf))
    shifted = x - shift
    o = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis, keepdims=True))
    return o if where is None else jnp.where(where, o, -jnp.inf)


def reference_softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
) -> jax.Array:
    """Plain-autodiff cross-entropy with probability labels (the definition).

    A masked class has probability 0: label mass there, ``(1 - a) q``, gives
    ``+inf`` and adds its ``q L`` to the gradient of the logits; it is a
    constant for autodiff (zero label gradient there). A row with no valid
    class (all masked, or all ``-inf``) is NaN here, where the ops give a
    loss of 0 with zero gradients: leave such rows out of a comparison.
    """
    logits = jnp.asarray(logits)
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
    # Mass on masked classes: its terms q (L - z) with z = -inf there.
    off = jax.lax.stop_gradient(jnp.where(valid, 0.0, (1 - label_smoothing) * labels))
    inf_terms = jnp.where(off == 0, 0.0, jnp.copysign(jnp.inf, off) + off)
    loss = loss + jnp.sum(off * lse + inf_terms, axis, keepdims=True)
    return jnp.squeeze(loss + z_loss * lse**2, axis)


def reference_softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int = -1,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
) -> jax.Array:
    """Plain-autodiff cross-entropy with integer labels, via one-hot labels
    (a row with no valid class is NaN, as in
    :func:`reference_softmax_cross_entropy`)."""
    logits = jnp.asarray(logits)
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


def _transforms(transforms: str | Sequence[str]) -> tuple[str, ...]:
    """``transforms`` as a tuple; a single name stands for itself."""
    names = (transforms,) if isinstance(transforms, str) else tuple(transforms)
    if not names:  # it would check nothing, and pass
        raise ValueError(f"no transform given: name any of {', '.join(TRANSFORMS)}")
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown:
        raise ValueError(
            f"unknown transform {unknown[0]!r}: the transforms are "
            f"{', '.join(map(repr, TRANSFORMS))}"
        )
    return names


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the differentiated leaves of ``x`` sit among the held ones.

    Hashable, so that the jitted helpers below can take it as a static
    argument and reuse one compilation across calls.
    """

    treedef: jax.tree_util.PyTreeDef
    diff: tuple[int, ...]

    def join(self, diff, fixed):
        diff, fixed = iter(diff), iter(fixed)
        leaves = [
            next(diff) if i in self.diff else next(fixed)
            for i in range(self.treedef.num_leaves)
        ]
        return jax.tree.unflatten(self.treedef, leaves)


def _split_input(x, batched: bool):
    """``x``'s layout, leaf paths, float leaves and held (integer, bool) leaves.

    Raises:
      TypeError: a leaf is neither float64/32/16, bfloat16, integer nor bool,
        or no leaf is float.
      ValueError: under vmap, leaves differ in leading size or it is 0.
    """
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(x)
    paths = [jax.tree_util.keystr(p) or "x" for p, _ in with_paths]
    leaves = [jnp.asarray(v) for _, v in with_paths]
    diff = []
    for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            if leaf.dtype.name not in TOLERANCES:
                raise TypeError(
                    f"input {path} has dtype {leaf.dtype.name}: jsoftmax.testing "
                    f"differentiates {', '.join(TOLERANCES)} leaves (cast it to one)"
                )
            diff.append(i)
        elif not jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.dtype != bool:
            raise TypeError(f"input {path} has unsupported dtype {leaf.dtype.name}")
    if not diff:
        raise TypeError(
            "x has no float64, float32, float16 or bfloat16 leaf to "
            f"differentiate: {_describe(paths, leaves)}"
        )
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if batched and (len(sizes) != 1 or None in sizes or 0 in sizes):
        raise ValueError(
            "under 'vmap' every leaf of x is mapped over its leading axis, so "
            "all need one and the same leading size, at least 1: "
            f"{_describe(paths, leaves)}"
        )
    layout = _Layout(treedef, tuple(diff))
    held = tuple(leaf for i, leaf in enumerate(leaves) if i not in diff)
    return layout, paths, tuple(leaves[i] for i in diff), held


def _describe(paths, leaves) -> str:
    return ", ".join(
        f"{p} {v.dtype.name}{list(v.shape)}" for p, v in zip(paths, leaves, strict=True)
    )


def _value(f, layout, diff, held):
    return f(layout.join(diff, held))


def _differentiable(f, layout, diff, held):
    """``f`` of the float leaves, its integer and bool output leaves (an
    argmax, a count, a mask) as zeros of their shape in the first float
    leaf's dtype: ``jax.jacrev`` and ``jax.jacfwd`` take float outputs only,
    and such a leaf's derivative is zero where it is defined. They are
    compared by value, exactly."""

    def g(d):
        return jax.tree.map(
            lambda o: (
                o
                if jnp.issubdtype(jnp.result_type(o), jnp.inexact)
                else jnp.zeros(jnp.shape(o), diff[0].dtype)
            ),
            f(layout.join(d, held)),
        )

    return g


def _jacobian(f, layout, diff, held):
    """The output's tree, each leaf a tuple of blocks, one per float leaf."""
    return jax.jacrev(_differentiable(f, layout, diff, held))(diff)


def _forward_jacobian(f, layout, diff, held):
    """``_jacobian`` by forward mode (``jax.jacfwd``)."""
    return jax.jacfwd(_differentiable(f, layout, diff, held))(diff)


_WEIGHTS = (-2.5, 1.5, -0.5, 3.0, -1.75, 0.75, 2.25, -3.0)


def _signed_weights(o):
    """A fixed cotangent of ``o``'s shape: signed entries of several sizes,
    none 0 or 1, each exact in every float dtype (so that the same weights
    are fed under jit, where XLA may round a formula differently)."""
    table = jnp.asarray(_WEIGHTS, o.dtype)
    index = (3 * jnp.arange(o.size, dtype=jnp.int32)) % len(_WEIGHTS)
    return table[index].reshape(o.shape)


def _weighted_gradient(f, layout, diff, held):
    """fn's VJP at the cotangent :func:`_signed_weights` of each float output
    leaf: the gradient of their weighted sum. ``jax.jacrev`` feeds the rule
    unit cotangents only (one 1, zeros), which a rule not linear in its
    cotangent (``|g|``, ``g**2``, ``max(g, 0)``, or one that ignores its
    size) gets right."""

    def weighted(d):
        out = [jnp.asarray(o) for o in jax.tree.leaves(f(layout.join(d, held)))]
        terms = [
            jnp.vdot(_signed_weights(o), o).astype(jnp.float32)
            for o in out
            if jnp.issubdtype(o.dtype, jnp.inexact)
        ]
        return sum(terms, jnp.float32(0))

    return jax.grad(weighted)(diff)


def _batched(g):
    def mapped(f, layout, diff, held):
        return jax.vmap(functools.partial(g, f, layout))(diff, held)

    return mapped


def _per_example(g):
    def mapped(f, layout, diff, held):
        return jax.lax.map(lambda a: g(f, layout, *a), (diff, held))

    return mapped


def _static_jit(g):
    return jax.jit(g, static_argnums=(0, 1))


# fn's value, Jacobian and jax.jacfwd Jacobian, each g(fn, layout, diff, held):
# as they are, under vmap, and jitted with fn a static argument (a later call
# with the same fn, such as the float64 comparison of another dtype, reuses
# the compilation).
_OF_FN = (_value, _jacobian, _forward_jacobian, _weighted_gradient)
_EAGER = {"none": _OF_FN, "vmap": tuple(_batched(g) for g in _OF_FN)}
_JITTED = {t: tuple(_static_jit(g) for g in gs) for t, gs in _EAGER.items()}
_JITTED["jit"] = _JITTED["none"]
# The reference's, jitted: unmapped, and one example at a time (lax.map).
_REFERENCE = {
    "unmapped": (_static_jit(_value), _static_jit(_jacobian)),
    "mapped": (_static_jit(_per_example(_value)), _static_jit(_per_example(_jacobian))),
}


def _hashable(f) -> bool:
    try:
        hash(f)
    except TypeError:
        return False
    return True


def _of_fn(fn, layout, transform, jit_vmap):
    """fn's value, Jacobian and jax.jacfwd Jacobian under ``transform``, each
    a function of ``(diff, held)``; under ``"vmap"`` jitted if ``jit_vmap``.

    Eager vmap retraces and dispatches every batched operation on each call:
    several times slower than jit(vmap), which the float64 comparison runs.
    """
    if not (transform == "jit" or (transform == "vmap" and jit_vmap)):
        return tuple(functools.partial(g, fn, layout) for g in _EAGER[transform])
    jitted = _JITTED[transform]
    if _hashable(fn):
        return tuple(functools.partial(g, fn, layout) for g in jitted)
    return tuple(jax.jit(functools.partial(g.__wrapped__, fn, layout)) for g in jitted)


def _of_reference(reference, layout, transform):
    """The reference's value and Jacobian, each a function of ``(diff, held)``.

    The reference is plain autodiff code: jit only makes it quicker. Jitted
    with the function as a static argument, a reference used again (as in a
    test sweep) is compiled once. Under ``"vmap"`` every leaf carries a
    leading batch axis, which the reference walks with lax.map, one example
    at a time, so that it shares no batching rule with fn.
    """
    if not _hashable(reference):
        reference = functools.partial(reference)
    jitted = _REFERENCE["mapped" if transform == "vmap" else "unmapped"]
    return tuple(functools.partial(g, reference, layout) for g in jitted)


def _forward_jacobian_of(forward_jacobian, diff, held):
    """``forward_jacobian(diff, held)``, or None where ``fn`` has no forward
    mode (a plain ``jax.custom_vjp``)."""
    try:
        return forward_jacobian(diff, held)
    except TypeError as e:
        if "custom_vjp" in str(e):
            return None
        raise


def _evaluate(fn, reference, layout, diff, held, transform, jit_vmap):
    """Values and Jacobians (w.r.t. the float leaves) of ``fn`` and
    ``reference``, fn's jax.jacfwd Jacobian (None where it has none) and its
    VJP at signed cotangents (:func:`_weighted_gradient`)."""
    value, jacobian, forward_jacobian, weighted = _of_fn(
        fn, layout, transform, jit_vmap
    )
    want_value, want_jacobian = _of_reference(reference, layout, transform)
    diff_ref = tuple(_reference_input(a) for a in diff)
    got, want = value(diff, held), want_value(diff_ref, held)
    if jax.tree.structure(got) != jax.tree.structure(want):
        # No Jacobians: _compare reports the structures (fn returning None
        # failed inside jax.jacrev with a message naming neither).
        return got, want, None, None, None, None
    return (
        got,
        want,
        jacobian(diff, held),
        want_jacobian(diff_ref, held),
        _forward_jacobian_of(forward_jacobian, diff, held),
        weighted(diff, held),
    )


def _abs_diff(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``|got - want|``: equal infs or NaNs count 0, unequal ones inf."""
    with np.errstate(invalid="ignore"):
        d = np.abs(got - want)
    if np.isfinite(d).all():
        return d
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    return np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))


def _finite(a: np.ndarray) -> np.ndarray:
    return a if np.isfinite(a).all() else np.where(np.isfinite(a), a, 0.0)


def _row_norms(a: np.ndarray) -> np.ndarray:
    """2-norms of the rows of ``a``, inf if an entry is."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.einsum("ij,ij->i", a, a))


@dataclasses.dataclass
class _Check:
    """Errors of one output leaf's entries or Jacobian rows, and their limits."""

    error: np.ndarray
    scale: np.ndarray
    allowed: np.ndarray
    name: Callable[[int], str]  # names entry/row i in a message
    unit: str

    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(self.error == 0, 0.0, self.error / self.allowed)
        # inf / inf (an error against an allowance that overflowed) fails.
        return np.where(np.isnan(ratio), np.inf, ratio)

    def relative(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.error == 0, 0.0, self.error / self.scale)

    def message(self) -> str | None:
        ratio = self.ratio()
        if not np.any(ratio > 1):
            return None
        i = int(np.argmax(ratio))
        failing = f"{int(np.sum(ratio > 1))} of {ratio.size} {self.unit} fail"
        if not np.isfinite(self.error[i]):
            return f"{self.name(i)}: inf or NaN differs from the reference; {failing}"
        return (
            f"{self.name(i)}: error {self.error[i]:.3g} > allowed "
            f"{self.allowed[i]:.3g} (relative error {self.relative()[i]:.3g} of "
            f"scale {self.scale[i]:.3g}); {failing}"
        )


def _summary(
    checks: list[_Check], problems: Sequence[str] = ()
) -> tuple[float, float, str | None]:
    """Worst ratio, worst relative error and the failures' messages."""
    ratio = max((float(np.max(c.ratio(), initial=0.0)) for c in checks), default=0.0)
    rel = max((float(np.max(c.relative(), initial=0.0)) for c in checks), default=0.0)
    messages = [*problems, *(m for m in (c.message() for c in checks) if m)]
    if problems:
        ratio = rel = np.inf
    return ratio, rel, "; ".join(messages) or None


def _coarsest(dtypes) -> np.dtype:
    """The dtype with the largest epsilon among those ``TOLERANCES`` knows."""
    known = [np.dtype(d) for d in dtypes if np.dtype(d).name in TOLERANCES]
    return max(known, key=lambda d: float(jnp.finfo(d).eps))


def vjp_errors(
    fn: Callable,
    reference: Callable,
    x,
    *,
    transform: str = "none",
    float64: bool | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    grad_atol: float | None = None,
    grad_rtol: float | None = None,
) -> VjpErrors:
    r"""Measures how far ``fn`` and ``jax.jacrev(fn)`` are from a reference.

    The value and the full Jacobian (``jax.jacrev``) are each compared
    relative to their own size, so that a wrong rule fails however small the
    entries of a wide row are, and a right rule in float16 or bfloat16 passes.

    **Values**, entry by entry, with :math:`J` the reference Jacobian:

    .. math::

        |v - v_\mathrm{ref}| \le \mathrm{atol} + \mathrm{rtol}_n \,
        (|v_\mathrm{ref}| + (|J|\,|x|) + \mathrm{tiny}).

    :math:`|J|\,|x|` is what a relative rounding of every input could change
    (a log-softmax entry near 0 is only known to about :math:`\epsilon |x|`);
    tiny is the dtype's smallest normal number.

    **Jacobians**, row by row (a row is the gradient of one output entry with
    respect to every float leaf of ``x``), in the 2-norm:

    .. math::

        \|J_i - J_{\mathrm{ref},i}\| \le \mathrm{grad\_atol}
        + \mathrm{grad\_rtol}_n \, \max(\|J_{\mathrm{ref},i}\|,\;
        \tfrac12 \max_k \|J_{\mathrm{ref},k}\|,\; \sqrt{n}\,\mathrm{tiny}),

    the largest row :math:`k` taken over the same output leaf. A row is held
    to its own norm, so a missing term that changes every entry of a
    1000-wide softmax row by :math:`y_i y_j` (about 1e-6, but 5% of the row)
    fails, as does a sign flipped on one class. Rows smaller than half the
    largest are held to that half: their entries can be differences of larger
    terms that the rounding of a correct rule shows, such as
    :math:`1 - y_{\max}` in a saturated softmax row whose :math:`y` is kept
    in 16 bits, or :math:`(1 - 2 y_i)\,\partial y_i` in the softmax Jacobian's
    second derivatives. (A leaf of saturated rows only, with nothing larger
    to compare them with, needs ``grad_atol``.) The floor is the same for
    rows that share no input: the elements of an elementwise function, the
    rows of a batch. A softplus rule whose float32 gradient is 0 below
    :math:`x = -17` (where it is about 4e-8) passes at points that also hold
    an :math:`x` near 0, so check such a rule where its small rows are the
    largest (points below -10 on their own). A row whose reference is zero
    (a masked output) must be zero up to that floor. A row spans every float
    leaf of ``x``, so a derivative that is zero by cancellation (softmax
    w.r.t. a per-row shift) is held to the size of the others; leaves whose
    gradients differ in size by orders of magnitude are better checked one
    at a time (close over the others).

    Where ``fn`` has forward mode (plain JAX code, or a ``custom_vjp`` given
    one by :func:`jsoftmax.with_forward_mode`), ``jax.jacfwd(fn)`` is compared
    with the same reference Jacobian, row by row, under the same allowance; a
    row that fails there is named "by jax.jacfwd". A plain ``custom_vjp``
    (no forward mode) is checked in reverse mode only.

    **In float64 too.** Both allowances grow with the dtype's
    :math:`\epsilon`, and an error can hide below them in float32 however
    structural it is: a log-softmax off by 0.3 at logits near 1e4 (allowed
    about 0.6 by :math:`\mathrm{rtol}_n |J|\,|x|` over 1000 classes), or a
    softmax gradient of the wrong sign on every class of probability below
    1e-7 (rows held to half the largest row, a float32 error of 2e-7 is
    within rounding). So where a float leaf of ``x`` is not float64,
    everything above is done a second time under ``jax.enable_x64``, with
    every float leaf cast to float64 (exactly; integer and bool leaves are
    passed as they are) and float64 tolerances (:math:`\mathrm{grad\_rtol}_n`
    is 6e-14 for ``n`` = 1000) or the same overrides, and ``fn`` fails if
    either comparison fails. A message from the float64 comparison starts
    "in float64:". The second comparison needs ``fn`` and ``reference`` to
    compute in float64: with ``float64=None`` (the default) the Jacobian each
    is compared by is first traced (``jax.make_jaxpr``, nothing runs) at the
    float64 point, and the comparison is skipped, with the reason in
    ``float64_skipped``, if either raises there (a dtype check, strict dtype
    promotion against a float32 constant, a backend without float64) or
    computes any float narrower than float64 (a rule that casts what it gets
    to float32 or returns float32: its float32 rounding would fail a right
    rule at float64 tolerances). A float32 constant that is only moved or
    widened (an array closed over, broadcast, indexed or sorted, and promoted
    where it meets float64; a float32 argument of a ``custom_vjp`` whose
    cotangent ``jax.jacrev`` drops) is exact in float64 and does not skip
    it; the messages of that comparison then name the constants, since a
    reference computing with other ones (``0.7`` where ``fn`` has a float32
    array of 0.7) differs from ``fn`` by their rounding there. A comparison
    that traces but then raises is skipped too, with the error in
    ``float64_skipped``. ``float64=True`` compares in float64 whatever the
    trace holds (an error raised there is raised); ``float64=False`` never.
    Under ``"vmap"`` the float64 comparison runs ``jit(vmap(fn))``, several
    times quicker than eager vmap and with the same batching rules.

    ``n`` is the number of inputs the entry depends on (the nonzero entries
    of its reference Jacobian row), and ``rtol_n`` and ``grad_rtol_n`` are
    :func:`tolerances` of the coarsest dtype among the output leaf and the
    float input leaves. Entries that are equal but not finite (the same inf,
    both NaN) count as equal; an inf or NaN on one side only fails. Integer
    and bool output leaves (an argmax, a count, a mask) are not
    differentiated: they must equal the reference's exactly.

    The limits of what a comparison in a dtype can see: in bfloat16 a right
    rule is off by up to about :math:`\epsilon`, so a gradient scaled by
    1.01 (1.3 :math:`\epsilon`) passes there, as does a softmax rule missing
    :math:`-y\langle g, y\rangle` beyond about 7000 classes of unit-variance
    logits (that term is :math:`\|y\|_2` of the row); a rule that computes
    in float64 for float64 input shows both in its float64 comparison. In
    float64 a row whose norm is below about 1e-14 of the largest can still
    be wholly wrong (a wrong sign on classes of probability below 1e-14).
    ``jax.jacrev`` feeds the rule unit cotangents only (one 1, zeros), which
    a rule not linear in its cotangent gets right (``|g|``, ``g**2``,
    ``max(g, 0)``, or one that ignores its size): so fn's VJP at one fixed
    cotangent of signed entries of several sizes is also compared with
    :math:`J^\top w` from fn's own Jacobian, entry by entry, within
    :math:`\mathrm{grad\_rtol}_n\,|J|^\top|w|`, or ``grad_rtol`` where
    given (entries below half the leaf's largest held to that half); a
    failure there is named "by a VJP at a signed cotangent". Each gradient
    must have its input's dtype: ``jax.grad`` passes on whatever the rule
    returns (a float32 cotangent for a bfloat16 input).

    Neither allowance covers rounding that a formula amplifies by cancelling
    inside itself, as opposed to rounding of its inputs: ``1 + tanh(z)`` at
    :math:`z \approx -4` in the tanh form of GELU leaves its float32 value
    good to about 1e-3 there, and a layernorm of rows whose mean is 300
    times their spread has a float32 Jacobian good to about 2e-5 (the mean,
    rounded, does not cancel exactly). A right rule and the reference then
    differ by that much, and so can one formula compared with itself: under
    ``"none"`` and ``"vmap"`` ``fn`` runs eagerly and the reference jitted,
    and XLA rounds the two differently. Compare at such points with a
    formula that does not cancel (``jax.nn.gelu(x, approximate=False)``),
    or with ``atol`` or ``grad_atol`` of the size that rounding reaches.

    The reference, and ``fn`` under ``"jit"``, are jitted with the function
    as a static argument: passing the same object again (a sweep over rules,
    the float64 comparison of another dtype) reuses its compilation.

    Args:
      fn: the function under test, of one argument (close over the rest with
        ``functools.partial``).
      reference: an independent implementation of the same function, usually
        plain ``jax.numpy`` code differentiated by autodiff. For 16-bit inputs
        it runs in float32 on the same rounded input.
      x: the point to compare at: an array or a pytree of arrays (dict, tuple,
        list), passed to ``fn`` as its one argument. Float leaves (float64,
        float32, float16, bfloat16) are differentiated; integer and bool
        leaves (labels, masks) are passed as they are and not differentiated.
        Under ``"vmap"`` every leaf's leading axis is a batch axis that ``fn``
        is vmapped over.
      transform: ``"none"``, ``"jit"`` or ``"vmap"``.
      float64: whether to compare in float64 as well (see above): None
        (default) where ``fn`` and ``reference`` compute in float64, True
        always, False never. Ignored where every float leaf of ``x`` is
        float64 already.
      atol: absolute allowance added to every value entry's; default 0.
      rtol: relative tolerance of the values in place of ``rtol_n``.
      grad_atol: absolute allowance added to every Jacobian row's (on its
        2-norm); default 0.
      grad_rtol: relative tolerance of the Jacobian rows in place of
        ``grad_rtol_n``.

    Returns:
      The largest absolute and relative errors of the value and of the
      Jacobian in ``x``'s dtypes, the largest share of its allowance an error
      uses in either comparison (at most 1 passes), a message for each
      comparison that fails, and the float64 comparison's own errors or why
      it was skipped.

    Raises:
      ValueError: ``transform`` is unknown, a tolerance is not a finite
        number >= 0, or under ``"vmap"`` the leaves of ``x`` differ in
        leading size or it is 0.
      TypeError: ``x`` has a leaf of another dtype (float8, complex, ...) or
        no float leaf.
    """
    (transform,) = _transforms((transform,))
    allowances = dict(atol=atol, rtol=rtol, grad_atol=grad_atol, grad_rtol=grad_rtol)
    for name, value in allowances.items():
        _check_allowance(name, value)
    layout, paths, diff, held = _split_input(x, batched=transform == "vmap")
    compare = functools.partial(
        _compare, fn, reference, layout, paths, transform=transform, **allowances
    )
    errors = compare(diff, held, jit_vmap=False)
    if float64 is False or all(a.dtype == np.float64 for a in diff):
        return errors
    with jax.enable_x64(True):
        diff64 = tuple(a.astype(jnp.float64) for a in diff)
        widened = None
        if float64 is None:
            refusal, widened = _float64_refusal(
                fn, reference, layout, diff64, held, transform
            )
            if refusal is not None:
                return dataclasses.replace(errors, float64_skipped=refusal)
            try:
                errors64 = compare(diff64, held, jit_vmap=True)
            except Exception as e:  # noqa: BLE001 (reported in float64_skipped)
                # Traced, it still failed: a NumPy float64 array closed over
                # by a function jitted with x64 off is kept as a float32
                # constant that the float64 program does not take (JAX 0.10).
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                return dataclasses.replace(
                    errors,
                    float64_skipped=f"the float64 comparison raised "
                    f"{type(e).__name__}: {first}",
                )
        else:
            errors64 = compare(diff64, held, jit_vmap=True)
    return _with_float64(errors, errors64, widened)


def _check_allowance(name, value):
    """Refuses a tolerance that is not a finite real number >= 0: a negative
    one made every ratio negative, which passed any rule."""
    if value is None:
        return
    ok = (
        not isinstance(value, (bool, np.bool_))
        and np.ndim(value) == 0
        and np.issubdtype(np.asarray(value).dtype, np.number)
        and not np.iscomplexobj(value)
        and 0 <= float(value) < np.inf
    )
    if not ok:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _compare(
    fn,
    reference,
    layout,
    paths,
    diff,
    held,
    *,
    transform,
    jit_vmap,
    atol,
    rtol,
    grad_atol,
    grad_rtol,
) -> VjpErrors:
    """:func:`vjp_errors` at the float leaves ``diff``, in their dtypes; under
    ``"vmap"`` fn is jitted too if ``jit_vmap``."""
    value, want, jac, want_jac, fwd_jac, weighted = _evaluate(
        fn, reference, layout, diff, held, transform, jit_vmap
    )
    outputs, out_tree = jax.tree_util.tree_flatten_with_path(value)
    wants, want_tree = jax.tree.flatten(want)
    if out_tree != want_tree:
        message = (
            f"output structure {out_tree} differs from the reference's {want_tree}"
        )
        return VjpErrors(transform, np.inf, np.inf, message, message)
    # Each output leaf's blocks, one per float input leaf, in order.
    blocks = _chunks(jax.tree.leaves(jac), len(diff))
    fwd_blocks = (
        None if fwd_jac is None else _chunks(jax.tree.leaves(fwd_jac), len(diff))
    )
    want_blocks = _chunks(jax.tree.leaves(want_jac), len(diff))
    diff_paths = [paths[i] for i in layout.diff]
    batch = diff[0].shape[0] if transform == "vmap" else 1
    widths = [a[0].size if transform == "vmap" else a.size for a in diff]
    x_abs = [
        np.abs(_finite(_f64(a))).reshape(batch, w, 1)
        for a, w in zip(diff, widths, strict=True)
    ]

    value_checks, jac_checks, fwd_checks, problems = [], [], [], []
    # sum_k J_k^T w_k (and |J_k|^T |w_k|) per float input leaf [batch, width]:
    # what fn's VJP at the signed cotangents w is if it is linear.
    linear = [np.zeros((batch, w)) for w in widths]
    linear_scale = [np.zeros((batch, w)) for w in widths]
    linear_n = [np.zeros((batch, w)) for w in widths]
    value_error = jac_error = 0.0
    fwd_max = None if fwd_blocks is None else 0.0
    for k, ((key, got), ref) in enumerate(zip(outputs, wants, strict=True)):
        path = jax.tree_util.keystr(key) or "output"
        got, ref = jnp.asarray(got), jnp.asarray(ref)

        def name(i, shape=got.shape, path=path):
            if not shape:
                return path
            return f"{path}{list(map(int, np.unravel_index(i, shape)))}"

        if got.shape != ref.shape:
            problems.append(f"{path} has shape {got.shape}, the reference {ref.shape}")
            continue
        dtype = _coarsest([got.dtype, *(a.dtype for a in diff)])
        value_factor, grad_factor = TOLERANCES[dtype.name]
        tiny = float(jnp.finfo(dtype).smallest_normal)
        rows = got.size
        input_change = np.zeros(rows)  # |J| |x|
        n = np.zeros(rows)  # how many inputs each entry depends on
        norm2, error2 = np.zeros(rows), []  # squared row norms, by input leaf
        fwd_error2 = np.zeros(rows)
        w = None
        if jnp.issubdtype(got.dtype, jnp.inexact):
            w = _f64(_signed_weights(got)).reshape(batch, rows // batch)
            if transform == "vmap":  # one example's weights, as vmap sees them
                w = _f64(_signed_weights(got[0])).reshape(1, -1).repeat(batch, 0)
        for j, width in enumerate(widths):
            jg = _f64(blocks[k][j]).reshape(rows, width)
            jr = _f64(want_blocks[k][j]).reshape(rows, width)
            if w is not None:
                per_example = jg.reshape(batch, rows // batch, width)
                with np.errstate(invalid="ignore", over="ignore"):
                    linear[j] += np.einsum("brw,br->bw", per_example, w)
                    linear_scale[j] += np.einsum(
                        "brw,br->bw", np.abs(per_example), np.abs(w)
                    )
                linear_n[j] += np.count_nonzero(per_example, axis=1)
            d = _abs_diff(jg, jr)
            jac_error = max(jac_error, float(np.max(d, initial=0.0)))
            error2.append(_row_norms(d) ** 2)
            if fwd_blocks is not None:
                # The same row of jax.jacfwd(fn), held to the same allowance.
                jf = _f64(fwd_blocks[k][j]).reshape(rows, width)
                d = _abs_diff(jf, jr)
                fwd_max = max(fwd_max, float(np.max(d, initial=0.0)))
                jac_error = max(jac_error, fwd_max)
                fwd_error2 += _row_norms(d) ** 2
            jr = _finite(jr)
            norm2 += _row_norms(jr) ** 2
            n += np.count_nonzero(jr, axis=-1)
            input_change += (
                np.abs(jr).reshape(batch, rows // batch, width) @ x_abs[j]
            ).ravel()
        norm = np.sqrt(norm2)
        scale = np.maximum(
            np.maximum(norm, _ROW_FLOOR * np.max(norm, initial=0.0)),
            np.sqrt(np.maximum(n, 1)) * tiny,
        )
        tol = _rtol(dtype, n, grad_factor) if grad_rtol is None else grad_rtol

        rev_error = np.sqrt(np.sum(error2, axis=0))
        fwd_error = np.sqrt(fwd_error2)

        def row_name(i, name=name, error2=error2, rev=rev_error, fwd=fwd_error):
            # The input leaf with the largest share of the row's error.
            wrt = diff_paths[int(np.argmax([e[i] for e in error2]))]
            if not fwd[i] <= rev[i]:
                return f"d {name(i)} / d ({diff_paths}) by jax.jacfwd"
            return f"d {name(i)} / d {wrt}"

        allowed = (grad_atol or 0.0) + tol * scale
        fwd_error = np.where(np.isnan(fwd_error), np.inf, fwd_error)
        jac_checks.append(
            _Check(np.fmax(rev_error, fwd_error), scale, allowed, row_name, "rows")
        )
        if fwd_blocks is not None:
            fwd_checks.append(
                _Check(
                    fwd_error,
                    scale,
                    allowed,
                    lambda i, name=name: (
                        f"d {name(i)} / d ({diff_paths}) by jax.jacfwd"
                    ),
                    "rows",
                )
            )
        d = _abs_diff(_f64(got).ravel(), _f64(ref).ravel())
        value_error = max(value_error, float(np.max(d, initial=0.0)))
        scale = np.abs(_finite(_f64(ref).ravel())) + input_change + tiny
        tol = _rtol(dtype, n, value_factor) if rtol is None else rtol
        allowed = (atol or 0.0) + tol * scale
        if not any(jnp.issubdtype(o.dtype, jnp.inexact) for o in (got, ref)):
            allowed = np.zeros_like(scale)  # integers and bools: exactly
        value_checks.append(_Check(d, scale, allowed, name, "entries"))

    out_dtypes = [jnp.asarray(o).dtype for _, o in outputs]
    jac_checks += _linearity_checks(
        weighted,
        linear,
        linear_scale,
        linear_n,
        diff,
        diff_paths,
        grad_atol,
        grad_rtol,
        out_dtypes,
    )
    value_ratio, value_rel, value_msg = _summary(value_checks, problems)
    # A cotangent of another dtype than its input's passes through jax.grad.
    grad_dtypes = [
        f"d {path} has dtype {g.dtype}, its input {a.dtype}"
        for g, a, path in zip(jax.tree.leaves(weighted), diff, diff_paths, strict=True)
        if g.dtype != a.dtype
    ]
    jac_ratio, jac_rel, jac_msg = _summary(jac_checks, grad_dtypes)
    return VjpErrors(
        transform,
        value_error,
        jac_error,
        value_msg,
        jac_msg,
        value_rel,
        jac_rel,
        value_ratio,
        jac_ratio,
        fwd_max,
        _summary(fwd_checks)[2],
    )


def _linearity_checks(
    weighted, linear, scale, n, diff, diff_paths, grad_atol, grad_rtol, out_dtypes
):
    """fn's VJP at the signed cotangents w against ``J^T w`` from its own
    ``jax.jacrev`` Jacobian (compared with the reference's row by row),
    entry by entry, within the rounding of that sum: a rule not linear in
    its cotangent, right at unit cotangents, fails here. Entries where
    ``J^T w`` is not finite (inf or NaN in J) are left to the Jacobian's
    check, as are those fn gives as inf or NaN where ``|J|^T |w|`` passes
    the largest finite number of the leaf's dtype or a float output's (a
    float16 sum of finite entries overflows)."""
    gots = [
        _f64(g).reshape(w.shape)
        for g, w in zip(jax.tree.leaves(weighted), linear, strict=True)
    ]
    kept = []
    for a, got, w, s in zip(diff, gots, linear, scale, strict=True):
        floats = [d for d in (a.dtype, *out_dtypes) if jnp.issubdtype(d, jnp.inexact)]
        limit = min(float(jnp.finfo(d).max) for d in floats)
        overflows = ~np.isfinite(got) & (s > limit)
        kept.append(np.isfinite(w) & np.isfinite(s) & ~overflows)
    sizes = [np.where(k, s, 0.0) for k, s in zip(kept, scale, strict=True)]
    # Entries far below the largest of any leaf are held to half of it, as
    # Jacobian rows are: their rounding in 16 bits is a larger share, and a
    # derivative that is 0 by cancellation (softmax w.r.t. a per-row shift)
    # is only rounding of the others.
    largest = max(float(np.max(s, initial=0.0)) for s in sizes)
    checks = []
    for j, a in enumerate(diff):
        dtype = _coarsest([a.dtype])
        want = np.where(kept[j], linear[j], 0.0)
        error = np.where(kept[j], _abs_diff(gots[j], want), 0.0)
        tiny = float(jnp.finfo(dtype).smallest_normal)
        size = np.maximum(sizes[j], _ROW_FLOOR * largest) + tiny
        tol = _rtol(dtype, n[j], TOLERANCES[dtype.name][1])
        if grad_rtol is not None:
            tol = grad_rtol
        allowed = (grad_atol or 0.0) + tol * size

        # Entry i of the leaf as given (under vmap, batch axis first).
        def name(i, path=diff_paths[j], shape=a.shape):
            index = list(map(int, np.unravel_index(i, shape)))
            return f"d {path}{index} by a VJP at a signed cotangent (not linear?)"

        checks.append(
            _Check(error.ravel(), size.ravel(), allowed.ravel(), name, "entries")
        )
    return checks


def _with_float64(errors: VjpErrors, errors64: VjpErrors, widened) -> VjpErrors:
    """``errors`` failing also where the float64 comparison fails; its
    messages name the narrow constants it widened, if any."""
    where = "in float64"
    if widened is not None:
        # A reference that computes with other constants (0.7 where fn has
        # float32(0.7)) differs by their rounding.
        where += f" (with {widened} widened exactly)"

    def join(message, message64):
        if message64 is None:
            return message
        message64 = f"{where}: {message64}"
        return message64 if message is None else f"{message}; {message64}"

    return dataclasses.replace(
        errors,
        value_mismatch=join(errors.value_mismatch, errors64.value_mismatch),
        jacobian_mismatch=join(errors.jacobian_mismatch, errors64.jacobian_mismatch),
        forward_mismatch=join(errors.forward_mismatch, errors64.forward_mismatch),
        value_ratio=max(errors.value_ratio, errors64.value_ratio),
        jacobian_ratio=max(errors.jacobian_ratio, errors64.jacobian_ratio),
        float64=errors64,
    )


def _float64_refusal(fn, reference, layout, diff, held, transform):
    """Why ``fn`` or ``reference`` cannot be compared in float64 (or None),
    and the narrow constants each holds that the comparison widens (or
    None).

    Traces (without running) the value and the Jacobian each is compared by,
    at float64 ``diff``: a function that raises there, or whose trace
    computes a float narrower than float64 (a cast to float32, a float32
    output, a float32 constant used as it is) that the two need, does not
    compute in float64.
    """
    # The functions the float64 comparison runs (the traces of jitted ones are
    # reused there).
    compared = {
        "fn": _of_fn(fn, layout, transform, jit_vmap=True)[:2],
        "the reference": _of_reference(reference, layout, transform),
    }
    widened = []
    for name, (value, jacobian) in compared.items():
        try:
            closed = jax.make_jaxpr(
                lambda d, h, v=value, j=jacobian: (v(d, h), j(d, h))
            )(diff, held)
        except Exception as e:  # noqa: BLE001 (any error: fn refuses float64)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return f"{name} raised {type(e).__name__} in float64: {first}", None
        narrow = _narrow_float(closed.jaxpr)
        if narrow is not None:
            return f"{name} does not compute in float64: {narrow}", None
        if (held_narrow := _widened(closed.jaxpr)) is not None:
            widened.append(f"{name}'s {held_narrow}")
    return None, "; ".join(widened) or None


# Primitives that move, select, compare or negate values without rounding
# them: a narrow value they take gives narrow values that are exact copies.
_EXACT = frozenset(
    "broadcast_in_dim reshape squeeze expand_dims transpose rev slice "
    "dynamic_slice dynamic_update_slice concatenate pad gather scatter tile "
    "select_n stop_gradient copy copy_p device_put neg abs sign max min "
    "reduce_max reduce_min argmax argmin sort eq ne lt le gt ge is_finite".split()
)


# Primitives that only run their sub-jaxprs (calls and control flow): their
# operands and results are judged by the uses inside. Others with sub-jaxprs
# (reduce, scatter-add, select_and_scatter_add) compute outside them too.
# By their names in jax 0.10: jax.checkpoint's is remat2, and jax 0.11 calls
# closed_call eval_jaxpr.
_CALLS = frozenset(
    "jit pjit call closed_call eval_jaxpr remat2 shard_map custom_jvp_call "
    "custom_vjp_call custom_vjp_call_jaxpr cond while scan".split()
)


def _narrow(v) -> bool:
    """Whether ``v`` is held in an inexact dtype narrower than float64 or
    complex128."""
    dtype = getattr(getattr(v, "aval", None), "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        return False
    wide = 16 if jnp.issubdtype(dtype, jnp.complexfloating) else 8
    return np.dtype(dtype).itemsize < wide


def _live_eqns(jaxpr):
    """The equations of ``jaxpr`` that its outputs need (or that have
    effects), in order: a cotangent computed for a narrow argument of a
    ``custom_vjp`` and dropped by ``jax.jacrev`` is not computed."""
    live = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(
                v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)
            )
    return kept[::-1]


def _narrow_float(jaxpr, outputs: bool = False) -> str | None:
    """The first value of ``jaxpr`` (sub-jaxprs included) computed in, or
    used in, an inexact dtype narrower than float64 or complex128, named by
    what makes or uses it; None if there is none. A narrow constant that is
    only moved or widened (a float32 array closed over, broadcast and
    promoted where it meets float64) is not: what is computed from it is
    computed in float64. Narrow outputs are allowed where ``outputs`` (a
    sub-jaxpr: its caller judges them).

    Every narrow value a passing jaxpr holds is an exact copy of narrow
    constants: it is one, or made by an exact primitive from them, or comes
    out of a sub-jaxpr that passes. So a call's narrow outputs are too."""
    for eqn in _live_eqns(jaxpr):
        subs = list(_subjaxprs(eqn.params))
        name = eqn.primitive.name
        widens = name == "convert_element_type" and not any(map(_narrow, eqn.outvars))
        used = [v for v in eqn.invars if _narrow(v)]
        if name in _CALLS:
            for sub in subs:
                found = _narrow_float(sub, outputs=True)
                if found is not None:
                    return found
            continue
        if used and not (widens or name in _EXACT):
            return f"{name} takes {used[0].aval.str_short()}"
        for v in eqn.outvars:
            if _narrow(v) and not used:
                return f"{name} gives {v.aval.str_short()}"
        for sub in subs:  # a reduction's computation, in the operands' dtype
            found = _narrow_float(sub)
            if found is not None:
                return found
    if not outputs:
        for v in jaxpr.outvars:
            if _narrow(v):
                return f"an output of dtype {v.aval.dtype}"
    return None


def _widened(jaxpr) -> str | None:
    """The narrow constants or inputs of ``jaxpr`` (sub-jaxprs included)
    that the float64 comparison widens, in a few words, or None."""
    found = []

    def note(values):
        found.extend(v.aval.str_short() for v in values if _narrow(v))

    def walk(jaxpr):
        note([*jaxpr.constvars, *jaxpr.invars])
        for eqn in _live_eqns(jaxpr):
            for sub in _subjaxprs(eqn.params):
                walk(sub)

    walk(jaxpr)
    return None if not found else ", ".join(dict.fromkeys(found))


def _subjaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def assert_vjp_matches(
    fn: Callable,
    reference: Callable,
    x,
    *,
    transforms: str | Sequence[str] = TRANSFORMS,
    float64: bool | None = None,
    **tolerances_,
) -> list[VjpErrors]:
    """Asserts that ``fn`` and its VJP match ``reference`` under each transform.

    Values and full Jacobians (``jax.jacrev``, and ``jax.jacfwd`` where
    ``fn`` has forward mode) are compared as :func:`vjp_errors` describes:
    entry by entry for values, row by row for Jacobians, each relative to its
    own scale, in ``x``'s dtypes and, where ``fn`` and ``reference`` compute
    in float64, in float64 too.

    Args:
      fn: the function under test, of one argument.
      reference: an independent implementation of the same function.
      x: the point to compare at: an array or a pytree of arrays; under
        ``"vmap"`` every leaf's leading axis is a batch.
      transforms: any of ``"none"``, ``"jit"``, ``"vmap"``; a single name
        stands for itself.
      float64: whether to compare in float64 as well, as in
        :func:`vjp_errors`: None (default) where ``fn`` and ``reference``
        compute in float64, True always, False never.
      **tolerances_: ``atol``, ``rtol``, ``grad_atol``, ``grad_rtol`` as in
        :func:`vjp_errors`.

    Returns:
      The measured errors, one entry per transform.

    Raises:
      AssertionError: a value or a Jacobian is not close to the reference.
      ValueError: a transform is unknown (before anything runs).

    Warns:
      UserWarning: with ``float64=None``, where the float64 comparison was
        skipped (the message says why): the rule was then checked in ``x``'s
        dtypes only, whose tolerances can hide a structural error.
        ``float64=False`` says that this is meant.
    """
    errors, skipped = [], {}
    for transform in _transforms(transforms):
        e = vjp_errors(
            fn, reference, x, transform=transform, float64=float64, **tolerances_
        )
        if float64 is None and e.float64_skipped:
            skipped.setdefault(e.float64_skipped, []).append(transform)
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
    for reason, skipped_under in skipped.items():
        warnings.warn(
            f"{_name(fn)}: the float64 comparison was skipped under "
            f"{', '.join(skipped_under)} ({reason}); checked in {_dtypes(x)} "
            f"only (float64=False skips it on purpose)",
            stacklevel=2,
        )
    return errors


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _dtypes(x) -> str:
    names = [np.dtype(jnp.result_type(a)).name for a in jax.tree.leaves(x)]
    return ", ".join(dict.fromkeys(names))


def assert_finite_differences(
    fn: Callable,
    *args: jax.typing.ArrayLike,
    order: int = 2,
    atol: float | None = None,
    rtol: float | None = None,
    eps: float | None = None,
) -> None:
    """Asserts that reverse-mode derivatives of ``fn`` match finite differences.

    A thin wrapper over ``jax.test_util.check_grads(..., modes=["rev"])``. It
    checks reverse mode: the VJP and, at the default ``order=2``, the VJP of
    the VJP (reverse over reverse), which differentiates the backward pass
    itself and is where a hand-written rule's second derivative breaks (a
    residual used as a constant, a ``stop_gradient`` in ``bwd``). Forward
    mode is not checked here: a plain ``custom_vjp`` has none, and the one
    :func:`jsoftmax.with_forward_mode` derives from ``bwd`` is compared, by
    ``jax.jacfwd``, in :func:`vjp_errors` (or pass the function to
    ``jax.test_util.check_grads`` with ``modes=["fwd"]``). Run it in float64
    (``with jax.enable_x64(True):``) for a meaningful comparison.

    Args:
      fn: the function to differentiate.
      *args: the point to check at, one array (or pytree of arrays) per
        argument of ``fn``. Float leaves are perturbed; integer and bool
        leaves (labels, masks) are passed as they are.
      order: the highest order of derivative checked; 2 by default.
      atol: absolute tolerance; ``check_grads``' default for the dtype.
      rtol: relative tolerance; ``check_grads``' default for the dtype.
      eps: the finite-difference step; ``check_grads``' default (1e-4).

    Raises:
      AssertionError: a derivative differs from its finite-difference estimate.
      ValueError: ``order`` is below 1 (nothing would be checked).
      TypeError: ``args`` has no float leaf.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    leaves, treedef = jax.tree.flatten(args)
    floats = tuple(
        i
        for i, a in enumerate(leaves)
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    )
    if not floats:
        raise TypeError("assert_finite_differences: no float leaf in args to perturb")
    layout = _Layout(treedef, floats)
    held = [a for i, a in enumerate(leaves) if i not in floats]

    def of_floats(*diff):  # integer and bool leaves (labels, masks) held
        return fn(*layout.join(diff, held))

    diff = tuple(leaves[i] for i in floats)
    jax.test_util.check_grads(
        of_floats, diff, order, modes=["rev"], atol=atol, rtol=rtol, eps=eps
    )

"""softmax and log_softmax with hand-written backward passes."""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax._checks import (
    Axis,
    broadcast_dims,
    broadcast_like,
    compute_dtype,
    empty_rows_lifted,
    float_input,
    in_operands_mesh,
    mask_input,
    masked_fill,
    normalize_axis,
    row_max,
    share_shardings,
    traced_once,
    widen_8bit,
)
from jsoftmax._collectives import axis_names, pmax, psum, varying_like
from jsoftmax._forward_mode import _with_forward_mode


def _prepare(name, x, axis, where):
    """Checked input (8-bit floats widened), axes, mask and the output dtype."""
    x = float_input(name, x)
    axes = normalize_axis(name, axis, x.ndim, x.shape)
    where = mask_input(name, where, x.shape)
    # Split alike on an Explicit mesh (see share_shardings).
    x, where = share_shardings(
        (x, where), (broadcast_dims(x, x.shape), broadcast_dims(where, x.shape))
    )
    # x varies over every mesh axis the mask does, so that dx has x's type
    # (JAX sums dx over the axes it marked x along; see varying_like).
    return varying_like(widen_8bit(x), where), axes, where, x.dtype


def _shifted(x, where, axes, axis_name):
    """``x - max(x)`` in the compute dtype, with masked entries at -inf.

    The shift is the row max, so the largest exponent is exactly 0 and ``exp``
    cannot overflow. The max starts from the lowest finite value rather than
    -inf, so a row with no valid entry (all masked or all -inf) is shifted by a
    finite value and stays at -inf instead of turning to NaN (-inf - -inf).
    That start value sits in the reduction itself: a select or a ``maximum``
    on the row max instead splits XLA's fused max/subtract/exp kernel and
    costs about 1.3x on CPU. The max is taken in the input's own dtype (exact:
    it is one of the inputs) and only the subtraction is upcast.

    The shift is a constant for the derivative (softmax is shift invariant),
    which keeps autodiff of these lines, used for higher-order derivatives,
    free of the max's subgradient.
    """
    x = masked_fill(x, where, -jnp.inf)
    m = row_max(x, axes)
    dtype = compute_dtype(x.dtype)
    m = lax.stop_gradient(pmax(m, axis_name)).astype(dtype)
    return x.astype(dtype) - jnp.expand_dims(m, axes)


@in_operands_mesh
def softmax(
    x: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    where: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax along ``axis``, with a backward pass that reuses the output.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i)}{\sum_j \exp(x_j)}

    The backward pass needs only the output :math:`y`: the Jacobian is
    :math:`J = \mathrm{diag}(y) - y y^\top`, so the vector-Jacobian product is
    :math:`\bar x = y \odot (\bar y - \langle \bar y, y \rangle)`. Only ``y`` (and
    ``where``) is saved for it.

    Args:
      x: input array. Integers and booleans are promoted to the default float
        dtype; 16- and 8-bit floats are computed in float32 and returned in
        their own dtype, and so are their gradients.
      axis: the axis or axes the output sums to one over: an int, a tuple or
        list of ints, or ``None`` for all axes. Negative values count from the end.
      where: optional boolean mask broadcastable to ``x``; only entries where it
        is ``True`` take part. Masked-out outputs are 0 and their gradients are
        exactly 0, whatever the masked-out logits hold (huge, inf or NaN).
      axis_name: the named axis over which the softmax axis is split (vocab /
        tensor parallelism): a mesh axis inside ``jax.shard_map`` (with or
        without ``check_vma``) or ``jax.pmap``, or a ``jax.vmap`` axis. The
        local reductions are finished by one ``pmax`` and one ``psum`` in the
        forward pass and one ``psum`` in the backward pass; the result and its
        gradient, taken inside or outside, equal the unsharded op's. ``None``
        (default): no collectives.

    Returns:
      An array of the shape and (floating) dtype of ``x``.

    Rows with no valid entry (all masked out, or all ``-inf``) give 0 and a
    zero gradient instead of NaN. ``-inf`` entries in an otherwise valid row get
    probability 0. A row that holds ``+inf`` or NaN is NaN throughout, output
    and gradient, as in ``jax.nn.softmax`` (``inf / inf`` has no value).

    Raises:
      TypeError: ``x`` is complex, ``where`` is not boolean (add an additive
        mask to ``x`` instead), or ``axis`` is not an int, a tuple or list of ints or
        None (a bool, a float, a traced value).
      ValueError: ``axis`` is out of range or repeated, or ``where`` does not
        broadcast to ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.softmax(jnp.array([0.0, 1.0, 2.0])).round(4)
      Array([0.09  , 0.2447, 0.6652], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([1e30, 0.0]))
      Array([1., 0.], dtype=float32)
      >>> jsoftmax.softmax(jnp.array([1.0, 5.0, 1.0]),
      ...                  where=jnp.array([True, False, True]))
      Array([0.5, 0. , 0.5], dtype=float32)
    """
    x, axes, where, dtype = _prepare("softmax", x, axis, where)
    rule = traced_once(_softmax_forward_mode)
    return rule(x, where, axes, axis_names(axis_name)).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax(x, where, axes, axis_name):
    return _softmax_fwd(x, where, axes, axis_name)[0]


def _softmax_fwd(x, where, axes, axis_name):
    e = jnp.exp(_shifted(x, where, axes, axis_name))
    s = psum(jnp.sum(e, axes, keepdims=True), axis_name)
    # A row with no valid entry has e == 0: 0 rather than 0 / 0.
    inv = 1 / empty_rows_lifted(s)
    y = (e * inv).astype(x.dtype)
    return y, (y, where)


# dx = y * (g - sum(g * y, axis))
def _softmax_bwd(axes, axis_name, res, g):
    y, where = res
    dtype = compute_dtype(y.dtype)
    y32 = y.astype(dtype)
    g32 = masked_fill(g.astype(dtype), where, 0)
    dx = y32 * (g32 - psum(jnp.sum(g32 * y32, axes, keepdims=True), axis_name))
    return dx.astype(y.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
# J = diag(y) - y y^T is symmetric: the backward pass is also the tangent map.
_softmax_forward_mode = _with_forward_mode(_softmax, symmetric=True, keep_traces=True)


@in_operands_mesh
def log_softmax(
    x: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    where: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Log-softmax along ``axis``, with a backward pass that reuses the output.

    .. math::
        \mathrm{log\_softmax}(x)_i = x_i - \log \sum_j \exp(x_j)

    With output :math:`o`, :math:`\partial o_i / \partial x_j = \delta_{ij} -
    e^{o_j}`, so the vector-Jacobian product is
    :math:`\bar x = \bar o - e^{o} \sum_i \bar o_i`. Only ``o`` (and
    ``where``, as given) is saved for it.

    Args:
      x: input array. Integers and booleans are promoted to the default float
        dtype; 16- and 8-bit floats are computed in float32 and returned in
        their own dtype, and so are their gradients.
      axis: the axis or axes to normalise over: an int, a tuple or list of
        ints, or ``None`` for all axes. Negative values count from the end.
      where: optional boolean mask broadcastable to ``x``; only entries where it
        is ``True`` take part. Masked-out outputs are ``-inf`` and their
        gradients are exactly 0, whatever the masked-out logits hold.
      axis_name: the named axis over which the softmax axis is split (vocab /
        tensor parallelism): a mesh axis inside ``jax.shard_map`` (with or
        without ``check_vma``) or ``jax.pmap``, or a ``jax.vmap`` axis. The
        local reductions are finished by one ``pmax`` and one ``psum`` in the
        forward pass and one ``psum`` in the backward pass; the result and its
        gradient, taken inside or outside, equal the unsharded op's. ``None``
        (default): no collectives.

    Returns:
      An array of the shape and (floating) dtype of ``x``.

    Rows with no valid entry (all masked out, or all ``-inf``) give ``-inf`` and
    a zero gradient instead of NaN. ``-inf`` entries in an otherwise valid row
    behave as in ``jax.nn`` (output ``-inf``, and the cotangent passes through
    them), mask or not: an all-True mask changes nothing.
    A row that holds ``+inf`` or NaN is NaN throughout, output and gradient,
    as in ``jax.nn``.

    Raises:
      TypeError: ``x`` is complex, ``where`` is not boolean (add an additive
        mask to ``x`` instead), or ``axis`` is not an int, a tuple or list of ints or
        None (a bool, a float, a traced value).
      ValueError: ``axis`` is out of range or repeated, or ``where`` does not
        broadcast to ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.log_softmax(jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)
      >>> jsoftmax.log_softmax(jnp.array([-jnp.inf, -jnp.inf]))
      Array([-inf, -inf], dtype=float32)
    """
    x, axes, where, dtype = _prepare("log_softmax", x, axis, where)
    rule = traced_once(_log_softmax_forward_mode)
    return rule(x, where, axes, axis_names(axis_name)).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _log_softmax(x, where, axes, axis_name):
    return _log_softmax_fwd(x, where, axes, axis_name)[0]


def _log_softmax_fwd(x, where, axes, axis_name):
    shifted = _shifted(x, where, axes, axis_name)
    s = psum(jnp.sum(jnp.exp(shifted), axes, keepdims=True), axis_name)
    # Rows with no valid entry (s == 0) stay at -inf instead of NaN.
    lse = broadcast_like(jnp.log(empty_rows_lifted(s)), shifted)
    # For autodiff of these lines (reverse over reverse), masked outputs take
    # the row's lse as a constant: a cotangent there (NaN from sin(-inf) under
    # a jnp.where) cannot reach the row's valid inputs. Same values.
    lse = masked_fill(lse, where, lax.stop_gradient(lse))
    o = (shifted - lse).astype(x.dtype)
    return o, (o, where)


# dx = g - exp(o) * sum(g, axis)
def _log_softmax_bwd(axes, axis_name, res, g):
    o, where = res
    dtype = compute_dtype(o.dtype)
    o32 = o.astype(dtype)
    # Masked-out outputs are the constant -inf: their cotangents take no part.
    # Unmasked -inf outputs (-inf inputs) pass theirs through, as without a
    # mask: an all-True mask changes nothing. That distinction is why the
    # mask (boolean, unbroadcast) is saved with the output.
    g32 = masked_fill(g.astype(dtype), where, 0)
    total = jnp.sum(g32, axes, keepdims=True)
    # A row whose outputs are all -inf (no valid entry) is constant: gradient
    # 0. Its largest output tells; a max keeps XLA's reductions fused, where a
    # count of outputs would materialise a converted copy of o. Across shards,
    # the count shares the psum of the cotangent sum instead. The test is
    # "not -inf" rather than "> -inf" so that a NaN row (from +inf or NaN
    # inputs) keeps a NaN gradient instead of a silent 0. (-inf is the max
    # of an empty axis, which has no identity otherwise.)
    if axis_name is None:
        valid = jnp.max(o32, axes, keepdims=True, initial=-jnp.inf) != -jnp.inf
    else:
        count = jnp.sum(o32 != -jnp.inf, axes, keepdims=True, dtype=dtype)
        total, count = psum((total, count), axis_name)
        valid = count > 0
    dx = g32 - jnp.exp(o32) * total
    return jnp.where(valid, dx, 0).astype(o.dtype), None


# J t = t - sum(exp(o) t, axis)
def _log_softmax_tangent(statics, res, t):
    """The tangent map: jax.jvp of the forward pass recomputed at the output
    ``o``, whose Jacobian is the input's (log_softmax(o) = o, and only
    softmax(x) = exp(o) sets J). There a masked input's tangent meets a
    select, where bwd transposed took it into the row's sum as exp(o) t =
    0 * t, NaN for a NaN tangent (jax.jacfwd of log_softmax(log p,
    where=p > 0) at p = 0). A row with no valid entry, constant, gets a zero
    tangent by a select, as its gradient is 0, and so do the masked outputs;
    its sum is lifted as in the forward pass, so that the select's transpose
    (reverse over forward) meets no ``1/0`` of ``log(0)``."""
    axes, axis_name = statics
    o, where = res

    def forward(x):
        shifted = _shifted(x, where, axes, axis_name)
        s = psum(jnp.sum(jnp.exp(shifted), axes, keepdims=True), axis_name)
        return shifted - jnp.log(empty_rows_lifted(s))

    _, dy = jax.jvp(forward, (o,), (t[0].astype(o.dtype),))
    largest = jnp.max(lax.stop_gradient(o), axes, keepdims=True, initial=-jnp.inf)
    valid = pmax(largest, axis_name) != -jnp.inf
    # Masked outputs are the constant -inf: tangent 0.
    return [masked_fill(jnp.where(valid, dy, 0), where, 0).astype(o.dtype)]


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)
_log_softmax_forward_mode = _with_forward_mode(
    _log_softmax, tangent=_log_softmax_tangent, keep_traces=True
)

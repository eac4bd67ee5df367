"""Per-example softmax cross-entropy with hand-written backward passes."""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax._checks import (
    Axis,
    as_int_input,
    broadcast_dims,
    compute_dtype,
    empty_rows_lifted,
    float_input,
    in_operands_mesh,
    log_sum,
    lowest,
    mask_input,
    masked_fill,
    mesh_spec,
    normalize_axis,
    number_kind,
    row_max,
    share_shardings,
    widen_8bit,
)
from jsoftmax._collectives import (
    labels_in_range,
    loss_cotangent,
    num_shards,
    per_shard,
    pmax,
    psum,
    shard_axis,
    shard_labels,
    varying_like,
    varying_over_shards,
)
from jsoftmax._forward_mode import _with_forward_mode

# Shared by the per-example losses and the fused linear loss.


def _option(name, arg, value):
    """A static, real, finite loss option as a Python float.

    Raises:
      TypeError: a string, a bool, a non-scalar or a traced value.
      ValueError: NaN or infinite.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name}: {arg} must be a static number, got a traced value. Under "
            f"jit, close over it or pass it with static_argnames=({arg!r},)"
        )
    if number_kind(value) is None:
        raise TypeError(f"{name}: {arg} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: {arg} must be finite, got {value}")
    return value


def check_loss_options(name, label_smoothing, z_loss, soft_cap):
    """Checks the static loss options; returns them as Python floats.

    Raises:
      TypeError: an option is not a real number (a string, a bool, a traced
        value), naming the option.
      ValueError: an option is out of range or not finite, naming it.
    """
    label_smoothing = _option(name, "label_smoothing", label_smoothing)
    z_loss = _option(name, "z_loss", z_loss)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}"
        )
    if z_loss < 0.0:
        raise ValueError(f"{name}: z_loss must be >= 0, got {z_loss}")
    if soft_cap is not None:
        soft_cap = _option(name, "soft_cap", soft_cap)
        if not soft_cap > 0.0:
            raise ValueError(f"{name}: soft_cap must be > 0 or None, got {soft_cap}")
    return label_smoothing, z_loss, soft_cap


def cap(z, soft_cap):
    """``soft_cap * tanh(z / soft_cap)`` (Gemma 2), or ``z`` when None."""
    return z if soft_cap is None else soft_cap * jnp.tanh(z / soft_cap)


def cap_grad(dz, z_capped, soft_cap):
    """Chain rule through ``cap``: d/dz c tanh(z/c) = 1 - tanh^2 = 1 - (capped/c)^2.

    ``z_capped`` must be finite where ``dz`` will be kept: a masked entry's
    -inf would make ``0 * (1 - inf^2)``, a NaN even if masked out afterwards
    (and a NaN in second derivatives and under ``jax_debug_nans``).
    """
    if soft_cap is None:
        return dz
    return dz * (1 - jnp.square(z_capped / soft_cap))


def _shifted_exp(z, axes, axis_name=None):
    """The row max ``m`` (no size-1 axes, a constant for autodiff) and
    ``exp(z - m)``. The max starts from the lowest finite value (see
    _softmax._shifted): empty rows get a finite shift, and XLA keeps max ->
    exp -> sum fused. One function for the forward's logsumexp and the
    integer-label backward's softmax, so that XLA can share the two."""
    m = lax.stop_gradient(pmax(row_max(z, axes), axis_name))
    return m, jnp.exp(z - jnp.expand_dims(m, axes))


def _capped_logits(logits, where, soft_cap, dtype):
    """Soft-capped logits in ``dtype``: ``(z, z_capped)``.

    ``z`` has masked entries at -inf. ``z_capped`` is finite where ``z`` is
    finite and where the mask is off (masked entries are capped from 0), for
    :func:`cap_grad`; it is ``z`` itself when there is no cap. Masking before
    the cap keeps whatever sits behind the mask (huge, inf, NaN) away from
    tanh and its derivative, also in second derivatives.
    """
    z = logits.astype(dtype)
    if soft_cap is not None:
        z = cap(masked_fill(z, where, 0), soft_cap)
    return masked_fill(z, where, -jnp.inf), z


def row_stats(z, axes, axis_name=None):
    """Per-row max ``m`` (global, a constant for autodiff) and ``log_s``, with
    ``L = m + log_s`` the row's logsumexp; no size-1 axes.

    ``log_s = log(sum(exp(z - m)))`` lies in ``[0, log n]``: the largest entry
    contributes exp(0) = 1. Keeping ``m`` and ``log_s`` apart, rather than
    their sum ``L``, is what keeps the losses precise at large logits: the
    loss and ``p = exp((z - m) - log_s)`` then use ``z - m``, exact for
    entries near the max, where ``z - L`` would carry the rounding of a large
    ``L`` (float32 logits near 1e4: about 1e-3 absolute). A row with no
    valid entry (all masked or all -inf) has ``log_s = -inf``: the flag the
    callers turn into a loss and a gradient of 0.
    """
    m, e = _shifted_exp(z, axes, axis_name)
    s = psum(jnp.sum(e, axes), axis_name)
    return m, log_sum(s)


def split_empty(log_s):
    """``(valid, log_s)``: rows with an entry, and ``log_s`` with 0 in place of
    the -inf of empty rows, so that no -inf - -inf appears downstream. A NaN
    row stays valid and NaN."""
    valid = log_s != -jnp.inf
    return valid, jnp.where(valid, log_s, 0)


def _class_count(where, shape, axes, dtype, axis_name):
    """Number of valid classes per row (keepdims), in ``dtype``, all shards."""
    if where is None:
        local = np.prod([shape[a] for a in axes])
        return jnp.asarray(local * num_shards(axis_name), dtype)
    full = jnp.broadcast_to(where, shape)
    return psum(jnp.sum(full, axes, keepdims=True, dtype=dtype), axis_name)


def _smoothed(q, where, axes, label_smoothing, axis_name):
    """``(1 - a) q + a / K`` over the valid classes, 0 at masked classes."""
    if label_smoothing:
        k = _class_count(where, q.shape, axes, q.dtype, axis_name)
        q = (1 - label_smoothing) * q + label_smoothing / jnp.maximum(k, 1)
    return masked_fill(q, where, 0)


def _ruled_out(labels, where, label_smoothing):
    """The label mass on masked classes, ``(1 - a) q`` there and 0 at valid
    classes, as a constant for autodiff (None without a mask).

    A masked class takes no part in differentiation: the labels' gradient is 0
    there (``L - z`` would be +inf), and so are their second derivatives,
    which a differentiable sum of this mass would make ``(1 - a) p``.
    """
    if where is None:
        return None
    off = jnp.where(where, 0, (1 - label_smoothing) * labels)
    return lax.stop_gradient(off)


@in_operands_mesh
def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    *,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Cross-entropy between softmax(logits) and probability labels.

    With :math:`z = c \tanh(\mathrm{logits} / c)` when ``soft_cap`` is ``c``
    (else the logits), :math:`\tilde q = (1 - a) q + a / K` for
    ``label_smoothing`` :math:`a` over the :math:`K` valid classes, and
    :math:`L = \log \sum_j e^{z_j}`:

    .. math::
        \ell = \sum_i \tilde q_i (L - z_i) + \zeta L^2

    where :math:`\zeta` is ``z_loss`` (PaLM). The backward pass is
    hand-written: :math:`\partial \ell / \partial z = (\sum_i \tilde q_i +
    2 \zeta L) p - \tilde q` with :math:`p = e^{z - L}`, and
    :math:`\partial \ell / \partial q_i = (1 - a)(L - z_i)` for the labels
    (distillation differentiates through both). Only the logits, the labels and
    the per-row :math:`L` are saved; the probabilities are recomputed.

    Args:
      logits: unnormalised scores, any float dtype (16- and 8-bit floats are
        computed in float32).
      labels: probabilities with the shape of ``logits``.
      axis: the class axis or axes.
      where: optional boolean class mask broadcastable to ``logits``, with
        ``jax.nn.softmax``'s meaning: a masked-out class has probability 0,
        and gets zero gradient (logits and labels alike). A ``[B, 1]`` mask
        masks whole examples.
      label_smoothing: :math:`a \in [0, 1]`, a static (not traced) number.
      z_loss: :math:`\zeta \ge 0`, finite, a static number.
      soft_cap: :math:`c > 0`, finite, a static number; or None.
      axis_name: the named axis over which the class axis (logits and labels
        alike) is split: a mesh axis inside ``jax.shard_map`` or ``jax.pmap``,
        or a ``jax.vmap`` axis. The forward pass takes one ``pmax`` and one
        ``psum`` (loss terms and label sums travel together). The backward
        pass needs no collective inside ``shard_map`` with ``check_vma=True``
        (the default), where the losses and their cotangent are the same on
        every shard; elsewhere it sums the cotangent over the shards (one
        ``psum`` of the losses' shape), and under ``vmap`` the losses come out
        mapped. ``None``: no collectives.

    Returns:
      Per-example losses: the shape of ``logits`` without ``axis``, in the
      dtype of ``logits``. A row with no valid class (all masked, or all
      ``-inf``) has loss 0 and gradient 0, whatever its labels.
      Terms with a zero (smoothed) label count 0 even where the logit is
      ``-inf`` or masked. A positive label on a masked class of a row with
      valid classes gives ``+inf``, as in
      :func:`softmax_cross_entropy_with_integer_labels` (one-hot labels give
      the same losses and logit gradients there): the gradient stays finite,
      :math:`(\sum_i \tilde q_i + 2 \zeta L) p - \tilde q` with the masked
      classes' mass in the sum and 0 at the masked classes. A positive label
      on an unmasked ``-inf`` logit (a class the logits rule out) gives a loss
      of at least the label times the largest finite float (about
      ``3.4e38 q`` in float32), or ``inf``.

    Raises:
      TypeError: complex inputs, a non-boolean ``where``, an ``axis`` that
        is not an int, a tuple or list of ints or None, an option that is not a real
        number (a string, a bool, a traced value; named).
      ValueError: shapes that do not match (named in the message), an
        ``axis`` out of range or repeated, an option out of range or not
        finite (named).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[0.0, 0.0], [0.0, jnp.log(3.0)]])
      >>> labels = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> jsoftmax.softmax_cross_entropy(logits, labels).round(4)
      Array([0.6931, 0.2877], dtype=float32)
    """
    name = "softmax_cross_entropy"
    logits = float_input(name, logits)
    labels = float_input(name, labels)
    dtype = logits.dtype
    logits, labels = widen_8bit(logits), widen_8bit(labels)
    if labels.shape != logits.shape:
        raise ValueError(
            f"{name}: labels of shape {labels.shape} must have the shape of "
            f"logits {logits.shape}"
        )
    axes = normalize_axis(name, axis, logits.ndim, logits.shape)
    where = mask_input(name, where, logits.shape)
    options = check_loss_options(name, label_smoothing, z_loss, soft_cap)
    # Split alike on an Explicit mesh (see share_shardings), and each input
    # varies over the mesh axes any of them does (see varying_like).
    full = broadcast_dims(logits, logits.shape)
    logits, labels, where = share_shardings(
        (logits, labels, where), (full, full, broadcast_dims(where, logits.shape))
    )
    logits, labels = varying_like((logits, labels), logits, labels, where)
    axis_name = shard_axis(axis_name)
    logits, labels = varying_over_shards((logits, labels), axis_name)
    # Run as is, not through traced_once: outside jit its ops are dispatched
    # one by one (each compiled once by JAX), so that an option changed at
    # every call (a z_loss or smoothing schedule) compiles nothing, where a
    # program cached per option value would compile at each new value.
    loss = _softmax_cross_entropy_forward_mode(
        logits, labels, where, axes, *options, axis_name
    )
    return loss.astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _softmax_cross_entropy(
    logits, labels, where, axes, label_smoothing, z_loss, soft_cap, axis_name
):
    return _softmax_cross_entropy_fwd(
        logits, labels, where, axes, label_smoothing, z_loss, soft_cap, axis_name
    )[0]


def _softmax_cross_entropy_fwd(
    logits, labels, where, axes, label_smoothing, z_loss, soft_cap, axis_name
):
    z, _ = _capped_logits(logits, where, soft_cap, compute_dtype(logits.dtype))
    m, log_s = row_stats(z, axes, axis_name)
    valid, safe_log_s = split_empty(log_s)
    q = _smoothed(labels.astype(z.dtype), where, axes, label_smoothing, axis_name)
    # sum(q (L - z)) = log_s sum(q) - sum(q (z - m)): two plain reductions of
    # terms that are both >= 0 and free of the large m (row_stats), so there
    # is no cancellation at large logits. 0 * (z - m) must count 0 even at z =
    # -inf (as in x log x at 0): -inf is clamped to the lowest finite value; a
    # clamp, unlike a select on q == 0, stays inside XLA:CPU's fused
    # multiply/sum kernel (1.3x faster forward at (8192, 128)).
    qz = q * jnp.maximum(z - jnp.expand_dims(m, axes), lowest(z.dtype))
    off = _ruled_out(labels.astype(z.dtype), where, label_smoothing)
    if off is not None:
        # A masked class has probability 0: a label with mass there makes
        # q (L - z) = +inf, as an integer label on a masked class does, and
        # its q L term is in the gradient (sum(q) counts it). Masked classes
        # without mass count 0. Both from constants: no 0 * inf in tangents.
        # copysign rather than off * -inf, which is NaN (if unselected) at
        # every off == 0; adding off keeps a NaN label NaN.
        qz = qz + jnp.where(off == 0, 0, jnp.copysign(jnp.inf, -off) + off)
        q = q + off
    # sum(q) is also kept for the backward pass, so that it needs no collective.
    qz_sum, q_sum = psum((jnp.sum(qz, axes), jnp.sum(q, axes)), axis_name)
    loss = safe_log_s * q_sum - qz_sum
    if z_loss:
        loss = loss + z_loss * jnp.square(m + safe_log_s)
    # A row with no valid class has no loss, whatever its labels.
    loss = jnp.where(valid, loss, 0).astype(logits.dtype)
    return per_shard(loss, axis_name), (logits, labels, where, m, log_s, q_sum)


# dz = g * ((sum(q) + 2 z_loss L) * p - q);  dq = g * (1 - a) * (L - z)
def _softmax_cross_entropy_bwd(
    axes, label_smoothing, z_loss, soft_cap, axis_name, res, g
):
    logits, labels, where, m, log_s, q_sum = res
    g = loss_cotangent(g, axis_name)
    z, z_capped = _capped_logits(logits, where, soft_cap, m.dtype)
    q = _smoothed(labels.astype(z.dtype), where, axes, label_smoothing, axis_name)
    valid, log_s = split_empty(log_s)
    g = jnp.where(valid, g.astype(z.dtype), 0)  # empty rows: gradient 0
    scale = q_sum + 2 * z_loss * (m + log_s) if z_loss else q_sum
    g, scale, m, log_s, valid = (
        jnp.expand_dims(a, axes) for a in (g, scale, m, log_s, valid)
    )
    shifted = z - m
    p = jnp.exp(shifted - log_s)
    # Masked classes are 0 (cap_grad gets finite capped logits there).
    dz = masked_fill(cap_grad(g * (scale * p - q), z_capped, soft_cap), where, 0)
    # The factor L - z is +inf at masked (and -inf) logits, and NaN in a row
    # with no valid class: it is 0 at masked classes and in such rows, where
    # g is 0 (0 * inf = NaN). At an unmasked -inf logit it is the forward's
    # own derivative, L - lowest (z - m clamped there as in the forward), so
    # that a zero cotangent (the -100 padding idiom) or a zero label tangent
    # (forward mode: this function transposed) gives 0, not 0 * inf. The
    # mask is also on the product, for the tangent map: there it comes first,
    # as a select, and a NaN or inf label tangent at a masked class takes no
    # part (a product with the 0 factor would be NaN).
    clamped = jnp.maximum(shifted, lowest(z.dtype))
    factor = jnp.where(valid, masked_fill(log_s - clamped, where, 0), 0)
    dlabels = masked_fill(g * (1 - label_smoothing) * factor, where, 0)
    return dz.astype(logits.dtype), dlabels.astype(labels.dtype), None


_softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)
_softmax_cross_entropy_forward_mode = _with_forward_mode(
    _softmax_cross_entropy, keep_traces=True
)


def check_integer_labels(name, labels, want_shape):
    """Checks integer labels: an integer dtype and the expected shape."""
    labels = as_int_input(name, "labels", labels, saturate=True)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name}: labels must be integer class ids, got {labels.dtype}")
    if labels.shape != tuple(want_shape):
        raise ValueError(
            f"{name}: labels of shape {labels.shape} do not match the expected "
            f"shape {tuple(want_shape)}"
        )
    return labels


@in_operands_mesh
def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int = -1,
    *,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Cross-entropy between softmax(logits) and integer class ids.

    The same loss as :func:`softmax_cross_entropy` with one-hot labels:

    .. math::
        \ell = L - (1 - a) z_y - \frac{a}{K} \sum_{j\ \mathrm{valid}} z_j
        + \zeta L^2

    with :math:`\partial \ell / \partial z = (1 + 2 \zeta L) p - (1 - a)
    e_y - a / K`. Only the logits, labels and per-row :math:`L` are saved.

    Args:
      logits: unnormalised scores.
      labels: integer class ids with the shape of ``logits`` without ``axis``,
        of any integer dtype (the range test runs in that dtype, indices in
        int32).
      axis: the class axis (a single int).
      where: optional class mask broadcastable to ``logits`` (as in
        :func:`softmax_cross_entropy`).
      label_smoothing, z_loss, soft_cap: as in :func:`softmax_cross_entropy`.
      axis_name: the named axis over which the class axis is split (as in
        :func:`softmax_cross_entropy`, with the same collectives). Labels stay
        global class ids: each shard finds its own slice of classes from
        ``lax.axis_index``.

    Returns:
      Per-example losses of the shape of ``labels``, in the dtype of
      ``logits``. A label outside ``[0, K)`` gives a NaN loss, and NaN
      gradients for that example when its cotangent is not 0: the bug is
      loud, while ``jnp.where(labels != -100, loss, 0)`` gives the padding
      zero gradients. A label on a masked-out class of a row with valid
      classes gives ``+inf`` (its probability is 0); a row with no valid
      class gives 0, whatever its label.

    Raises:
      TypeError: labels that are not integers, complex logits, a non-boolean
        ``where``, an ``axis`` that is not one int (a bool, a float, a traced
        value), an option that is not a real number (named).
      ValueError: shapes that do not match (named in the message), an
        ``axis`` out of range, or bad options.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[0.0, 0.0], [0.0, jnp.log(3.0)]])
      >>> labels = jnp.array([0, 1])
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, labels).round(4)
      Array([0.6931, 0.2877], dtype=float32)
    """
    name = "softmax_cross_entropy_with_integer_labels"
    logits = float_input(name, logits)
    dtype = logits.dtype
    logits = widen_8bit(logits)
    if axis is None or np.ndim(axis) != 0:
        raise TypeError(f"{name}: axis must be a single int, got {axis!r}")
    (ax,) = normalize_axis(name, axis, logits.ndim, logits.shape)
    labels = check_integer_labels(
        name, labels, logits.shape[:ax] + logits.shape[ax + 1 :]
    )
    where = mask_input(name, where, logits.shape)
    options = check_loss_options(name, label_smoothing, z_loss, soft_cap)
    # Split alike on an Explicit mesh (see share_shardings), and logits vary
    # over the mesh axes the labels or mask do (see varying_like).
    full = broadcast_dims(logits, logits.shape)
    logits, labels, where = share_shardings(
        (logits, labels, where),
        (full, full[:ax] + full[ax + 1 :], broadcast_dims(where, logits.shape)),
    )
    logits = varying_like(logits, labels, where)
    axis_name = shard_axis(axis_name)
    logits = varying_over_shards(logits, axis_name)
    # Not through traced_once: see softmax_cross_entropy.
    loss = _integer_cross_entropy_forward_mode(
        logits, labels, where, ax, *options, axis_name
    )
    classes = logits.shape[ax] * num_shards(axis_name)
    return loud_labels(loss, labels, classes).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _loud_labels(losses, labels, classes):
    """``losses`` as they are; in reverse mode, a NaN cotangent for each loss
    whose label is outside ``[0, classes)`` and whose cotangent is not 0.

    The losses of such labels are already NaN; this makes their gradients NaN
    too (the bug is loud) only where they reach the result, so that
    ``jnp.where(labels != -100, loss, 0)`` still gives zero gradients. A test
    ``g == 0`` is not linear in the cotangent, so it lives here, on its own,
    rather than in the losses' backward passes, whose tangent maps are their
    linear transposes (see _forward_mode). This map is diagonal, hence its own
    transpose: with_forward_mode(symmetric=True) uses it as the tangent map.
    """
    return losses


def _loud_labels_fwd(losses, labels, classes):
    return losses, labels


# dlosses = g, or NaN where the label is out of range and g != 0
def _loud_labels_bwd(classes, labels, g):
    in_range = labels_in_range(labels, classes)
    return jnp.where(in_range | (g == 0), g, jnp.nan), None


_loud_labels.defvjp(_loud_labels_fwd, _loud_labels_bwd)
loud_labels = _with_forward_mode(_loud_labels, symmetric=True, keep_traces=True)


def _target_parts(z, labels, axis, axis_name):
    """:func:`shard_labels` for ``z``'s class axis, each keeping a size-1
    ``axis`` so that it broadcasts against ``z``."""
    return shard_labels(
        jnp.expand_dims(labels, axis), z.shape[axis], axis_name, batch_shape=z.shape
    )


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _integer_cross_entropy(
    logits, labels, where, axis, label_smoothing, z_loss, soft_cap, axis_name
):
    return _integer_cross_entropy_fwd(
        logits, labels, where, axis, label_smoothing, z_loss, soft_cap, axis_name
    )[0]


def _integer_cross_entropy_fwd(
    logits, labels, where, axis, label_smoothing, z_loss, soft_cap, axis_name
):
    axes = (axis,)
    z, _ = _capped_logits(logits, where, soft_cap, compute_dtype(logits.dtype))
    m, e = _shifted_exp(z, axes, axis_name)
    m_k = jnp.expand_dims(m, axes)
    here, holds, in_range = _target_parts(z, labels, axis, axis_name)
    # The target logit is a gather of one entry per row, not a pass over z,
    # shifted by the max like everything else (row_stats: no large L).
    safe = jnp.clip(here, 0, z.shape[axis] - 1)
    target = jnp.where(holds, _at_target(z, safe, axis) - m_k, 0)
    target = jnp.squeeze(target, axes)
    # The sum of the exponentials, the target and the logits' sum travel in
    # one psum.
    parts = [jnp.sum(e, axes), target]
    if label_smoothing:
        parts.append(jnp.sum(masked_fill(z - m_k, where, 0), axes))
    parts = psum(tuple(parts), axis_name)
    log_s = log_sum(parts[0])
    valid, safe_log_s = split_empty(log_s)
    # log_s - (z_y - m) >= 0 term by term: a cross-entropy is never negative.
    # With label_smoothing 1 the target has no weight, also where its logit
    # is masked or -inf (0 * -inf would be NaN).
    loss = safe_log_s
    if label_smoothing < 1:
        loss = loss - (1 - label_smoothing) * parts[1]
    if z_loss:
        loss = loss + z_loss * jnp.square(m + safe_log_s)
    if label_smoothing:
        k = _class_count(where, z.shape, axes, z.dtype, axis_name)
        k = jnp.squeeze(k, axes) if k.ndim else k
        loss = loss - label_smoothing * parts[2] / jnp.maximum(k, 1)
    loss = jnp.where(jnp.squeeze(in_range, axes), loss, jnp.nan)
    # A row with no valid class has no loss, whatever its label.
    loss = jnp.where(valid, loss, 0).astype(logits.dtype)
    return per_shard(loss, axis_name), (logits, labels, where, m, log_s)


def _softmax_from_logits(z, axes):
    """``softmax(z)`` over ``axes`` (masked entries already -inf), 0 in rows
    with no valid entry, with the same max and sum as :func:`row_stats`.
    Unsharded only: the sum is this shard's alone."""
    _, e = _shifted_exp(z, axes)
    return e * (1 / empty_rows_lifted(jnp.sum(e, axes, keepdims=True)))


def _target_index(target, ndim, axis):
    """The index of each row's entry at ``target`` (which keeps a size-1
    ``axis``) in an array of ``ndim`` axes; under an explicit mesh every
    index shares the target's sharding."""
    sharding = jax.typeof(target).sharding
    return tuple(
        target
        if d == axis
        else lax.broadcasted_iota(target.dtype, target.shape, d, out_sharding=sharding)
        for d in range(ndim)
    )


def _at_target(x, target, axis):
    """``x`` at each row's ``target`` class (in range), as
    ``jnp.take_along_axis``. Where the class axis is split over an explicit
    mesh axis, a gather whose output sharding is given: take_along_axis
    cannot say it, and JAX refuses to guess."""
    if mesh_spec(x)[axis] is None:
        return jnp.take_along_axis(x, target, axis)
    index = _target_index(target, x.ndim, axis)
    return x.at[index].get(
        mode="promise_in_bounds", out_sharding=jax.typeof(target).sharding
    )


def _add_at_target(x, here, holds, value, axis):
    """``x`` plus ``value`` at each row's target class, where this shard holds
    it (``here``, ``holds`` and ``value`` keep a size-1 ``axis``)."""
    # Rows whose target lives on another shard point past the end: dropped.
    target = jnp.where(holds, here, x.shape[axis])
    index = _target_index(target, x.ndim, axis)
    return x.at[index].add(value, mode="drop", out_sharding=jax.typeof(x).sharding)


# dz = g * ((1 + 2 z_loss L) * p - (1 - a) * onehot(y) - a / K)
def _integer_cross_entropy_bwd(
    axis, label_smoothing, z_loss, soft_cap, axis_name, res, g
):
    logits, labels, where, m, log_s = res
    g = loss_cotangent(g, axis_name)
    axes = (axis,)
    z, z_capped = _capped_logits(logits, where, soft_cap, m.dtype)
    here, holds, _ = _target_parts(z, labels, axis, axis_name)
    valid, log_s = split_empty(log_s)
    # An out-of-range label's cotangent arrives NaN where it is not 0 (see
    # _loud_labels). Rows with no valid class get 0 whatever the label.
    g = jnp.where(valid, g.astype(z.dtype), 0)
    scale = g * (1 + 2 * z_loss * (m + log_s)) if z_loss else g
    g, scale = jnp.expand_dims(g, axes), jnp.expand_dims(scale, axes)
    # p = softmax(z), recomputed the way the forward pass computed its sum
    # (row max, exp, sum) rather than as exp(z - L). Inside one jitted
    # value_and_grad, XLA then shares the forward's exponentials with this
    # pass, writing them straight into the gradient's buffer (no temporary:
    # measured with memory_analysis): 1.07-1.21x optax became 0.92-1.00x on
    # a 2-core CPU. A backward compiled apart from its forward pays a max and
    # a sum more than exp(z - L) would (1.1-1.4x on that pass).
    # Across shards the sum is global: exp(z - m - log_s) with the global m.
    if axis_name:
        m, log_s = jnp.expand_dims(m, axes), jnp.expand_dims(log_s, axes)
        p = jnp.exp((z - m) - log_s)
    else:
        p = _softmax_from_logits(z, axes)
    dz = scale * p
    if label_smoothing:
        k = _class_count(where, z.shape, axes, z.dtype, axis_name)
        dz = dz - g * label_smoothing / jnp.maximum(k, 1)
    # The one-hot term touches one entry per row: a scatter into dz, not a
    # compare against every class.
    dz = _add_at_target(dz, here, holds, -g * (1 - label_smoothing), axis)
    dz = cap_grad(dz, z_capped, soft_cap)
    return masked_fill(dz, where, 0).astype(logits.dtype), None, None


_integer_cross_entropy.defvjp(_integer_cross_entropy_fwd, _integer_cross_entropy_bwd)
_integer_cross_entropy_forward_mode = _with_forward_mode(
    _integer_cross_entropy, keep_traces=True
)

"""Reductions over a class axis that may be split across devices.

Inside ``jax.shard_map`` (or ``pmap``, or ``vmap`` with an ``axis_name``) the
ops take ``axis_name``: the local reduction runs first and one collective over
the named axis finishes it. With ``axis_name=None`` every helper is the
identity, so the single-device code path is unchanged.

How a backward pass must treat a loss's cotangent depends on whether JAX
tracks how values vary over the axis. ``shard_map(check_vma=True)`` (the
default) does: a loss finished by a ``psum`` is invariant, so its cotangent is
the same on every shard and the backward pass needs no collective. ``pmap``,
``shard_map(check_vma=False)`` and ``vmap`` do not: autodiff transposes the
``psum`` into another ``psum`` of the per-shard cotangents, and so must the
rule (:func:`loss_cotangent`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class ShardAxis:
    """A named axis, and what the losses' backward passes must know of it.

    Resolved where the op is called, because JAX traces a ``custom_vjp``
    backward pass under ``vmap(axis_name=...)`` without the axis in scope
    (``lax.axis_size`` raises NameError there). The collectives below take a
    ShardAxis or a plain name.
    """

    name: Hashable
    size: int
    # shard_map(check_vma=True): JAX tracks how values vary over the axis.
    tracked: bool


def axis_names(axis_name):
    """``axis_name`` with a list of names made a tuple: ``lax.psum`` takes
    either, and the ops pass it on as a static (hashable) argument."""
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def shard_axis(axis_name):
    """``axis_name`` resolved into a :class:`ShardAxis` (None stays None)."""
    if axis_name is None or isinstance(axis_name, ShardAxis):
        return axis_name
    axis_name = axis_names(axis_name)
    # axis_index varies over the axis exactly when JAX tracks variation.
    tracked = vma(lax.axis_index(axis_name)) >= set(_names(axis_name))
    return ShardAxis(axis_name, lax.axis_size(axis_name), tracked)


def _names(axis_name):
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _name(axis_name):
    return axis_name.name if isinstance(axis_name, ShardAxis) else axis_name


def pmax(x, axis_name):
    """Max over the shards of ``axis_name`` (``x`` itself when None), a
    constant for autodiff.

    The ops take a max only to shift by it before ``exp``, and every result
    is invariant to that shift, so its tangent may be zero. It must be:
    ``lax.pmax`` has no differentiation rule, and a tangent reaching it (a
    second derivative differentiates the forward pass) raises
    ``NotImplementedError``. The input is cut from autodiff before the
    collective, not after it, so that the ``pmax`` never meets a tangent.
    """
    x = lax.stop_gradient(x)
    return x if axis_name is None else lax.pmax(x, _name(axis_name))


def psum(x, axis_name):
    """Sum over the shards of ``axis_name`` (identity when None).

    ``x`` may be a tuple: its leaves travel in one all-reduce.
    """
    return x if axis_name is None else lax.psum(x, _name(axis_name))


def shard_offset(axis_name, local_size):
    """First global class id held by this shard: ``axis_index * local_size``."""
    if axis_name is None:
        return 0
    return lax.axis_index(_name(axis_name)) * local_size


def num_shards(axis_name):
    if axis_name is None:
        return 1
    if isinstance(axis_name, ShardAxis):
        return axis_name.size
    return lax.axis_size(axis_name)


def loss_cotangent(g, axis_name):
    """The cotangent of per-example losses that the forward pass finished with
    a ``psum`` over ``axis_name``, as autodiff of that ``psum`` passes it on.

    Where JAX tracks variation over the axis, the losses are invariant and
    ``g`` is the same on every shard: no collective. Elsewhere each shard may
    hold its own cotangent (pmap with the gradient outside, a per-shard
    weight), and the ``psum`` transposes into a ``psum`` of them: one
    all-reduce of ``g``'s size.
    """
    if axis_name is None or axis_name.tracked:
        return g
    return lax.psum(g, _name(axis_name))


def per_shard(losses, axis_name):
    """``losses``, made to depend on the axis index where JAX does not track
    variation (a select that keeps every value).

    For ``vmap``: losses that do not depend on the mapped axis come out
    unmapped, and ``vmap`` then hands the backward pass one cotangent already
    summed over the instances, which :func:`loss_cotangent` would sum again.
    Mapped losses get each instance's own cotangent, as under ``pmap``. (With
    ``check_vma=True`` the losses stay invariant: no-op.)
    """
    if axis_name is None or axis_name.tracked:
        return losses
    return jnp.where(lax.axis_index(_name(axis_name)) >= 0, losses, 0)


def vma(x):
    """The mesh axes ``x`` (an array, or its abstract value) varies over
    inside ``shard_map`` with ``check_vma=True``; empty elsewhere."""
    aval = x if isinstance(x, jax.core.ShapedArray) else jax.typeof(x)
    return set(aval.manual_axis_type.varying)


def varying_like(tree, *arrays):
    """Marks ``tree`` as varying over every mesh axis any of ``arrays`` (None
    skipped) varies over; a no-op where variation is not tracked.

    A ``custom_vjp`` backward pass must give each input a cotangent of the
    input's type. An input that is invariant over an axis that the others vary
    over (replicated ``w`` with batch-sharded ``x``; replicated ``x`` with
    vocab-sharded ``w``) gets a cotangent that varies, one part per shard: the
    ops mark such inputs varying before their ``custom_vjp``, and JAX
    transposes the mark into the ``psum`` of the parts, as it does for plain
    code. Also what ``lax.scan`` needs of a carry that the loop body mixes
    with ``arrays``.
    """
    axes = set().union(*(vma(a) for a in arrays if a is not None))
    return _vary_over(tree, sorted(axes, key=str))


def varying_over_shards(tree, axis):
    """Marks ``tree``, inputs split over ``axis`` (a :class:`ShardAxis`: the
    classes or the vocabulary), as varying over its mesh axes where JAX
    tracks variation and they do not already.

    An input given replicated over the axis (``in_specs=P()``) is every
    shard's slice alike: the global input is it tiled, and its gradient the
    sum of the shards'. The backward passes give each shard its own part
    (the label's class lies on one shard); marked varying, JAX transposes the
    mark into their ``psum``, as it does for plain code. Unmarked, the
    cotangent's type did not match the input's (the integer-label loss
    raised), or a rule whose parts happened to be invariant returned one
    shard's part (the probability-label loss: a quarter of the gradient over
    4 shards)."""
    if axis is None or not axis.tracked:
        return tree
    return _vary_over(tree, _names(axis.name))


def _vary_over(tree, axes):
    """``tree``, each leaf marked varying over those of ``axes`` it does not
    already vary over."""

    def cast(leaf):
        missing = tuple(a for a in axes if a not in vma(leaf))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def index_dtype(*sizes) -> np.dtype:
    """int32 when every size fits in it (always, in practice), else int64.

    Symbolic sizes (``jax.export``) are taken to fit.
    """
    known = [s for s in sizes if isinstance(s, (int, np.integer))]
    return np.dtype(np.int32 if max(known, default=0) < 2**31 else np.int64)


def labels_in_range(labels, classes: int):
    """``0 <= labels < classes``, compared in the labels' own dtype.

    No conversion happens before the test, so no label can wrap into range:
    a ``uint8`` label is never compared as ``int8``, and an ``int64`` label
    ``2**32 + 1`` is not truncated to class 1.
    """
    info = jnp.iinfo(labels.dtype)
    nonneg = labels >= np.array(0, labels.dtype)
    if not isinstance(classes, (int, np.integer)):
        # Symbolic (jax.export): the count is a traced int32 there, so the
        # labels are capped at int32's max in their own dtype, then compared
        # in int32 (no label wraps into range).
        top = np.array(min(info.max, np.iinfo(np.int32).max), labels.dtype)
        capped = jnp.minimum(labels, top).astype(np.int32)
        return nonneg & (capped < jnp.asarray(classes, np.int32))
    if classes == 0:
        return jnp.zeros(labels.shape, bool)
    if classes - 1 >= info.max:  # every non-negative label names a class
        return nonneg
    return nonneg & (labels <= np.array(classes - 1, labels.dtype))


def shard_labels(labels, local_size, axis_name, *, batch_shape=()):
    """Integer labels seen from this shard, which holds ``local_size`` classes.

    Returns each label relative to the shard's first class, in an index dtype
    wide enough for the class count and ``batch_shape`` (int32 in practice),
    whether the shard holds it, and whether it names a class at all (``0 <=
    label < local_size * shards``); the same shapes as ``labels``. Labels of
    any integer dtype work: the range test runs in their own dtype, and
    out-of-range labels are replaced by 0 before the conversion.
    """
    classes = local_size * num_shards(axis_name)
    in_range = labels_in_range(labels, classes)
    dtype = index_dtype(classes, *batch_shape)
    ids = jnp.where(in_range, labels, np.array(0, labels.dtype)).astype(dtype)
    here = ids - jnp.asarray(shard_offset(axis_name, local_size), dtype)
    holds = in_range & (here >= 0) & (here < local_size)
    return here, holds, in_range

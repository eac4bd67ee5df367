"""Reductions over a class axis that may be split across devices.

Inside ``jax.shard_map`` the ops take ``axis_name``: the local reduction runs
first and one collective over the mesh axis finishes it. With
``axis_name=None`` every helper is the identity, so the single-device code
path is unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def pmax(x, axis_name):
    """Max over the shards of ``axis_name`` (identity when None)."""
    return x if axis_name is None else lax.pmax(x, axis_name)


def psum(x, axis_name):
    """Sum over the shards of ``axis_name`` (identity when None).

    ``x`` may be a tuple: its leaves travel in one all-reduce.
    """
    return x if axis_name is None else lax.psum(x, axis_name)


def shard_offset(axis_name, local_size):
    """First global class id held by this shard: ``axis_index * local_size``."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name) * local_size


def num_shards(axis_name):
    return 1 if axis_name is None else lax.axis_size(axis_name)


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

"""Reductions over a class axis that may be split across devices.

Inside ``jax.shard_map`` the ops take ``axis_name``: the local reduction runs
first and one collective over the mesh axis finishes it. With
``axis_name=None`` every helper is the identity, so the single-device code
path is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def vma(x):
    """The mesh axes ``x`` varies over inside ``shard_map`` with
    ``check_vma=True``; empty elsewhere."""
    return set(jax.typeof(x).manual_axis_type.varying)


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

    def cast(leaf):
        missing = tuple(sorted(axes - vma(leaf), key=str))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def shard_labels(labels, local_size, axis_name):
    """Integer labels seen from this shard, which holds ``local_size`` classes.

    Returns each label relative to the shard's first class, whether the shard
    holds it, and whether it names a class at all (``0 <= label < local_size *
    shards``); the same shapes as ``labels``.
    """
    here = labels - jnp.asarray(shard_offset(axis_name, local_size), labels.dtype)
    holds = (here >= 0) & (here < local_size)
    in_range = (labels >= 0) & (labels < local_size * num_shards(axis_name))
    return here, holds, in_range

"""Reductions over a class axis that may be split across devices.

Inside ``jax.shard_map`` the ops take ``axis_name``: the local reduction runs
first and one collective over the mesh axis finishes it. With
``axis_name=None`` every helper is the identity, so the single-device code
path is unchanged.
"""

from __future__ import annotations

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

r"""Context-parallel dot_product_attention: the sequence split over a mesh axis.

Inside ``shard_map``, each of the ``n`` devices of ``axis_name`` holds a slice
of the queries and of the keys/values: one contiguous slice, or (zigzag) the
chunks ``i`` and ``2n - 1 - i`` of ``2n``. Attention runs over *pairs* (a local
query chunk, a key/value piece): each pair is one call of the block path of
:mod:`jsoftmax._attention_xla`, whose band (causal, window) is static. The
offset ``d`` between the pair's global key and query positions depends on the
device (``lax.axis_index``), but takes one of a few static values, so each
value gets its own static call with the band shifted by ``d``
(``lower - d <= key - query <= upper - d`` in local positions), chosen by
``lax.switch``; a band that hides the whole pair is a branch that computes
nothing (the skipped steps). The per-device choices are static NumPy tables
(:func:`_pair_configs`), which also count the blocks each device computes
(:func:`block_counts`).

Each pair gives a partial ``(o_p, L_p)``; a query chunk's pairs merge as

.. math::

    m = \max_p L_p, \qquad \ell = \sum_p e^{L_p - m}, \qquad
    L = m + \log \ell, \qquad o = \frac{1}{\ell} \sum_p e^{L_p - m} o_p,

kept as a running ``(o, m, total)`` (``o`` and ``total`` the unnormalised
sums) and finished once, after the last pair, so that ``L`` is rounded
once, not at every step; the sink joins ``L`` then. The backward pass
needs no merge: given the *global* ``O`` and ``L``, the block path's
backward of one pair (``P = exp(s - L)``, ``D = rowsum(dO * O)``) is
exactly that key/value piece's share of the gradient.

- ``ring``: ``n`` steps, the first ``n - 1`` a ``lax.fori_loop`` whose carry
  holds the visiting K/V (with its segment ids and the bias and mask columns
  split with the keys) and the running ``(o, m, total)``, so that one step's
  buffers are reused whatever ``n``: each iteration sends the visiting K/V
  on to the next device (``lax.ppermute``, one per array in the loop body,
  ``n - 1`` runs forward) before its compute; the last step, which sends
  nothing, runs after the loop. The band configuration of a pair at a step
  on a device is a static table indexed by the loop's step and
  ``lax.axis_index``. The backward pass runs the ring again, as a loop too;
  dK/dV (and the bias gradient split with the keys) travel with their K/V
  and arrive home after the ``n``-th permute.
- ``all_gather``: K/V (and what is split with the keys) are gathered, put in
  natural order, and the local queries attend to all of it; the backward
  pass reduce-scatters dK/dV.

Both modes run the key/value heads in groups, one group (its K/V heads and
their query heads) after another, in a loop around the whole pass
(:func:`head_groups`): the fewest groups with at most an eighth of the
query heads each (or one key/value head) whose K/V-sized buffers (the
ring's visiting and arriving K, V, dK and dV; the gathered ones) hold no
more elements than the local queries. Heads are independent, so nothing
merges across groups; each group's K/V travel once, so the bytes sent are
those of one pass over all heads, in ``groups`` times as many permutes. At
T = 32768 on 8 devices with 8 heads this takes the ring's memory per device
from 0.42-0.50 of the one-device op's to 0.09-0.12, at 1.00-1.14x the time
on the CPU (``bench/context_parallel.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jsoftmax import _attention_dispatch as dispatch
from jsoftmax import _attention_xla as xla
from jsoftmax._checks import static_int
from jsoftmax._collectives import varying_like
from jsoftmax._forward_mode import _unbound_vmap_axes, _with_forward_mode
from jsoftmax._platform import by_platform

MODES = ("ring", "all_gather")
LAYOUTS = ("contiguous", "zigzag")


# -- The zigzag layout ---------------------------------------------------------


def _zigzag_order(axis_size):
    """Chunk ``order[c]`` of the natural order goes to position ``c``: device
    ``i`` holds chunks ``i`` and ``2n - 1 - i``."""
    n = axis_size
    return np.array([c for i in range(n) for c in (i, 2 * n - 1 - i)])


def _permute_chunks(name, x, axis_size, axis, order):
    x = jnp.asarray(x)
    n = static_int(name, "axis_size", axis_size)
    axis = static_int(name, "axis", axis)
    if n < 1:
        raise ValueError(f"{name}: axis_size must be positive, got {n}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for shape {x.shape}")
    axis %= x.ndim
    length = x.shape[axis]
    if length % (2 * n):
        raise ValueError(
            f"{name}: the sequence length {length} (axis {axis}) must be divisible "
            f"by 2 * axis_size = {2 * n}"
        )
    sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec) + (None,) * x.ndim
    split = _explicit(x) and spec[axis] is not None
    if split:
        # The axis split over an explicit mesh axis: gathered, reordered and
        # split again as it was (the chunks move between devices).
        whole = P(*spec[:axis], None, *spec[axis + 1 : x.ndim])
        x = jax.sharding.reshard(x, sharding.update(spec=whole))
    dims = tuple(range(axis + 1)) + tuple(range(axis, x.ndim))
    shape = x.shape[:axis] + (2 * n, length // (2 * n)) + x.shape[axis + 1 :]
    x = jnp.take(xla.reshape(x, shape, x, dims), order(n), axis=axis)
    dims = tuple(range(axis + 1)) + tuple(range(axis + 2, x.ndim))
    x = xla.reshape(x, x.shape[:axis] + (length,) + x.shape[axis + 2 :], x, dims)
    if split:
        x = jax.sharding.reshard(x, sharding)
    return x


def to_zigzag(x: jax.typing.ArrayLike, axis_size: int, axis: int = 1) -> jax.Array:
    """Reorders a sequence axis into the zigzag layout of ``axis_size`` devices.

    The axis is cut into ``2 * axis_size`` equal chunks and reordered so that
    an ordinary contiguous split into ``axis_size`` slices (``shard_map`` with
    the axis split over the mesh axis) gives device ``i`` the chunks ``i``
    and ``2 * axis_size - 1 - i``: under a causal mask every device then has
    the same amount of work. Apply it once to every per-token array of a
    batch (tokens, targets, positions, segment ids) and pass
    ``context_layout="zigzag"`` to :func:`dot_product_attention`. An array
    whose axis is already split over an explicit mesh axis keeps its
    sharding: its chunks move between the devices (the axis is gathered,
    reordered and split again).

    Args:
      x: an array with a sequence axis.
      axis_size: the number of devices the sequence is split over.
      axis: the sequence axis (default 1, as in ``[B, T, ...]``).

    Returns:
      ``x`` with its sequence axis reordered.

    Raises:
      ValueError: a sequence length not divisible by ``2 * axis_size``, an
        ``axis_size`` below 1, or an ``axis`` out of range.
      TypeError: an ``axis_size`` or ``axis`` that is not a static int (a
        bool, a float, a traced value).

    Examples:
      >>> import jax.numpy as jnp, jsoftmax
      >>> jsoftmax.to_zigzag(jnp.arange(8)[None], 2)
      Array([[0, 1, 6, 7, 2, 3, 4, 5]], dtype=int32)
      >>> jsoftmax.from_zigzag(jsoftmax.to_zigzag(jnp.arange(8)[None], 2), 2)
      Array([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=int32)
    """
    return _permute_chunks("to_zigzag", x, axis_size, axis, _zigzag_order)


def from_zigzag(x: jax.typing.ArrayLike, axis_size: int, axis: int = 1) -> jax.Array:
    """Undoes :func:`to_zigzag`: the sequence axis back in natural order.

    Args:
      x: an array whose ``axis`` is in the zigzag layout of ``axis_size``.
      axis_size: the number of devices the sequence is split over.
      axis: the sequence axis (default 1).

    Returns:
      ``x`` with its sequence axis in natural order.

    Raises:
      ValueError: a sequence length not divisible by ``2 * axis_size``, an
        ``axis_size`` below 1, or an ``axis`` out of range.
      TypeError: an ``axis_size`` or ``axis`` that is not a static int (a
        bool, a float, a traced value).
    """
    return _permute_chunks(
        "from_zigzag", x, axis_size, axis, lambda n: np.argsort(_zigzag_order(n))
    )


# -- The plan: static chunks, offsets and per-device block configurations ------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static description of one context-parallel call (hashable)."""

    config: object  # _attention._Config, band in global positions
    axis_name: Hashable
    size: int  # devices on the axis
    mode: str  # "ring" or "all_gather"
    layout: str  # "contiguous" or "zigzag"
    t: int  # local queries
    s: int  # local keys
    bias_keys: str | None  # the bias's key axis: None (size 1), "split", "whole"
    mask_keys: str | None
    groups: int  # key/value head groups, attended one after another


def head_groups(mode, size, t, s, heads, kv_heads):
    """How many groups of key/value heads (each with its query heads) a call
    attends to one after another: the fewest in which a group has at most
    an eighth of the query heads (or is one key/value head), and its
    K/V-sized buffers hold no more elements than the local queries: the
    ring's eight of one slice (K, V, dK and dV, visiting and arriving), the
    all-gather mode's four of all of them (K, V, dK and dV gathered). What
    grows with a group, the ring's buffers and each pair's copies of its
    queries, outputs and gradients in the XLA block path's layout, then
    stays within about the size of the local queries."""
    per_kv_head = heads // kv_heads
    held = 8 * s if mode == "ring" else 4 * size * s
    for groups in range(1, kv_heads):
        kg = kv_heads // groups
        if kv_heads % groups or 8 * kg * per_kv_head > heads:
            continue
        if held * kg <= t * heads:
            return groups
    return kv_heads


@dataclasses.dataclass(frozen=True)
class _Chunk:
    start: int  # within the local slice
    size: int
    offsets: tuple  # global start on each device


def _chunks(plan, local):
    """The local query (or key) chunks of the layout."""
    n = plan.size
    if plan.layout == "contiguous":
        return (_Chunk(0, local, tuple(i * local for i in range(n))),)
    c = local // 2
    return (
        _Chunk(0, c, tuple(i * c for i in range(n))),
        _Chunk(c, c, tuple((2 * n - 1 - i) * c for i in range(n))),
    )


def _kv_pieces(plan, direction=1):
    """The key/value pieces a device attends to, per step, with the pieces'
    offsets indexed by the device attending to them at that step. Ring: K/V
    move ``direction`` devices a step (+1 forward, -1 backward), so at step
    ``st`` device ``i`` holds the keys of device ``i - direction * st``.
    All-gather: one step, all keys in natural order."""
    n = plan.size
    if plan.mode == "all_gather":
        return [[_Chunk(0, plan.s * n, (0,) * n)]]
    steps = []
    for st in range(n):
        source = [(i - direction * st) % n for i in range(n)]
        steps.append(
            [
                _Chunk(c.start, c.size, tuple(c.offsets[j] for j in source))
                for c in _chunks(plan, plan.s)
            ]
        )
    return steps


def _shifted(config, d, tc, sc):
    """``config`` for a pair of ``tc`` queries and ``sc`` keys whose keys
    start ``d`` positions after its queries (local positions from 0), with
    bounds that hide nothing dropped (so that equal work compiles once), or
    None if the band hides every pair. Its chunks are cut to the pair's
    sizes, as the one-device op cuts them to ``T`` and ``S``: the call's come
    from the local slice, and a pair (half the slice under zigzag) padded to
    them would compute the padding, or, one token long, not be padded (a
    1-long axis reads as broadcast) and fail."""
    lower = None if config.lower is None else config.lower - d
    upper = None if config.upper is None else config.upper - d
    # key - query runs over [-(tc - 1), sc - 1] within the pair.
    if (lower is not None and lower > sc - 1) or (
        upper is not None and upper < -(tc - 1)
    ):
        return None
    if lower is not None and upper is not None and lower > upper:
        return None
    if lower is not None and lower <= -(tc - 1):
        lower = None
    if upper is not None and upper >= sc - 1:
        upper = None
    return dataclasses.replace(
        config,
        lower=lower,
        upper=upper,
        query_chunk=min(config.query_chunk, tc),
        key_chunk=min(config.key_chunk, sc),
    )


def _pair_configs(plan, q_chunk, kv_chunk):
    """The shifted config of the pair on each device (None: skipped)."""
    return tuple(
        _shifted(plan.config, ko - qo, q_chunk.size, kv_chunk.size)
        for qo, ko in zip(q_chunk.offsets, kv_chunk.offsets, strict=True)
    )


def block_counts(plan):
    """The blocks of ``query_chunk x key_chunk`` each device computes (a
    NumPy array ``[n]``), before the traced skipping by sequence lengths."""
    counts = np.zeros(plan.size, np.int64)
    for step in _kv_pieces(plan):
        for qc in _chunks(plan, plan.t):
            for kc in step:
                for i, cfg in enumerate(_pair_configs(plan, qc, kc)):
                    if cfg is not None:
                        counts[i] += xla.block_visibility(cfg, qc.size, kc.size)[
                            0
                        ].sum()
    return counts


def _is_vmap_axis(axis_name) -> bool:
    """Whether ``axis_name`` (a name or tuple) names a ``vmap`` axis whose
    batching encloses this point: there ``lax.axis_index`` is batched."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return any(name in names for name, _ in _unbound_vmap_axes())


def _if_chosen(chosen, x):
    """``x`` where ``chosen``, else zeros of its shape and dtype."""
    return jnp.where(chosen, x, jnp.zeros_like(x))


def _switch(configs, kind, operands, at, index, axis_name):
    """This device's pair call at step ``at``: ``_branch(kind, config)(
    *operands)``, one branch per distinct config of ``configs`` (per step, per
    device), chosen by ``lax.switch`` on a static table indexed by the step
    and the device (``axis_name``'s index)."""
    distinct = list(dict.fromkeys(c for row in configs for c in row))
    if len(distinct) == 1:
        return _branch(kind, distinct[0])(*operands)
    table = np.array([[distinct.index(c) for c in row] for row in configs], np.int32)
    branches = [_branch(kind, c) for c in distinct]

    mapped = _is_vmap_axis(axis_name)

    def switch(operands, at, index):
        chosen = jnp.asarray(table)[at, index]
        if not mapped:
            return lax.switch(chosen, branches, *operands)
        # The device is a vmap entry: every branch runs anyway, and vmap's
        # select of a switch puts a stop_gradient on the operands, which
        # reverse mode over reverse mode cannot transpose (JAX 0.10.2). The
        # branches not chosen take zeros instead: on the real operands, a
        # pair the causal mask hides can overflow (exp of a hidden score far
        # above the row's L), and its zero cotangent then gives 0 * inf.
        outs = [
            branch(*jax.tree.map(partial(_if_chosen, chosen == i), operands))
            for i, branch in enumerate(branches)
        ]
        return jax.tree.map(lambda *xs: lax.select_n(chosen, *xs), *outs)

    if all(c is None or c.implementation == "xla" for c in distinct):
        return switch(operands, at, index)
    # The pairs choose their code by the platform the program is lowered for.
    # Chosen inside a switch inside a shard_map lowered for several platforms
    # (jax.export, platforms=("cpu", "cuda")), the choice stays in the
    # program each platform compiles, and the CPU's fails on the kernels'
    # custom call (JAX 0.10.2): the choice is made here too, around the
    # switch, so that each platform's switch is lowered for it alone.
    return by_platform(
        (operands, jnp.asarray(at), jnp.asarray(index)), cuda=switch,
        default=switch, symbolic=switch, derivative=switch, manual=(),
    )  # fmt: skip


@functools.cache
def _branch(kind, config):
    """The pair call of ``kind`` ("forward", "backward") for ``config`` (None:
    the band hides the pair; nothing is computed). One function object per
    config, so that JAX traces each once, whatever the steps and pairs."""
    if kind == "forward":
        fn = (
            _empty_forward if config is None else partial(_block_forward, config=config)
        )
    else:
        fn = _empty_backward if config is None else partial(_pair_backward, config)

    def run(*operands):  # every branch varies as all the operands do
        return varying_like(fn(*operands), *jax.tree.leaves(operands))

    return run


# -- The block step: the XLA path or the kernels, as the config names ----------


def _block_forward(q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, config):
    """One pair's partial ``(o [B, T, N, H], lse [B, K, G, T])``, no sinks, by
    the implementation the config names (the kernels on a CUDA GPU). The
    plan's config asks for partials (``o`` here, the gradients in
    :func:`_block_backward`) in the accumulation dtype: 16-bit inputs are
    rounded once, after the pairs are merged, not once per pair."""
    args = (q, k, v, bias, None, mask, q_len, kv_len, q_seg, kv_seg)
    return dispatch.forward(config, *args)


def _block_backward(config, res, d_out):
    """One pair's ``(dq, dk, dv, dbias)`` given the global ``out`` and ``lse``."""
    return dispatch.backward(config, res, d_out)[:4]


# -- Pieces of arrays ----------------------------------------------------------


def _rows(x, chunk):
    """A query chunk of ``[B, T, ...]`` (axis 1)."""
    return lax.slice_in_dim(x, chunk.start, chunk.start + chunk.size, axis=1)


def _score_rows(x, chunk):
    """A query chunk of a bias or mask ``[B', N', T', S']``."""
    if x is None or x.shape[2] == 1:
        return x
    return lax.slice_in_dim(x, chunk.start, chunk.start + chunk.size, axis=2)


def _score_cols(x, keys, visiting, chunk, start):
    """The key piece of a bias or mask: from the visiting (split) one, or
    sliced from the whole key axis at the traced ``start``."""
    if x is None or keys is None:
        return x
    if keys == "split":
        return lax.slice_in_dim(visiting, chunk.start, chunk.start + chunk.size, axis=3)
    return lax.dynamic_slice_in_dim(x, start + chunk.start, chunk.size, axis=3)


def _clip_len(lengths, offset, size):
    if lengths is None:
        return None
    return jnp.clip(lengths - offset, 0, size).astype(lengths.dtype)


def _heads_last(x, n):
    """``[B, K, G, T]`` as ``[B, T, N]``."""
    b, k, g, t = x.shape
    return x.transpose(0, 3, 1, 2).reshape(b, t, n)


def _start_rows(q, kv_heads):
    """The running ``(o, m, total)`` of rows that have seen no key yet:
    ``o = sum_p e^(L_p - m) o_p`` and ``total = sum_p e^(L_p - m)`` over the
    pairs ``p`` merged so far, ``m`` the largest ``L_p``."""
    row = _row_stats(q, kv_heads, 0)
    return jnp.zeros_like(q, row.dtype), jnp.full_like(row, -jnp.inf), row


def _row_stats(q, kv_heads, value):
    """``[B, K, G, T]`` rows of ``q`` filled with ``value``, sharded (under an
    explicit mesh) as the block path shards its ``lse``."""
    b, t, n, _ = q.shape
    rows = jnp.full_like(q[..., 0], value, xla._acc(q)).transpose(0, 2, 1)
    return xla.reshape(rows, (b, kv_heads, n // kv_heads, t), q, (0, 2, 2, 1))


def _merge(state, o_p, lse_p):
    """The running ``(o, m, total)`` with one more pair's partial ``(o_p,
    lse_p)``. ``L = log(total) + m`` is formed once, at the end
    (:func:`_finish_rows`): merged as ``(o, L)`` pairs, every merge would
    round ``L`` again, an error of ``|L| eps`` that grows with the devices;
    here ``m`` is exact (one of the ``L_p``) and ``total`` is rounded
    relatively, as the block path's running sum. ``m`` is only a shift
    that cancels in ``o`` and ``L``: a constant for forward mode (which
    differentiates this merge), so that no tangent flows through the max.
    Rows that see no key stay ``o = 0, total = 0``, with zero tangents."""
    o, m, total = state
    new = lax.stop_gradient(jnp.maximum(m, lse_p))
    safe = jnp.where(new == -jnp.inf, 0, new)
    old_w, new_w = jnp.exp(m - safe), jnp.exp(lse_p - safe)
    n = o.shape[2]
    o = o * _heads_last(old_w, n)[..., None] + o_p * _heads_last(new_w, n)[..., None]
    return o, new, total * old_w + new_w


def _finish_rows(state):
    """``(o, lse)`` from the running ``(o, m, total)``: ``o / total`` and
    ``m + log(total)``; ``(0, -inf)`` where no key was seen."""
    o, m, total = state
    empty = total == 0
    total = jnp.where(empty, 1, total)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(total))
    return o / _heads_last(total, o.shape[2])[..., None], lse


def _add_sink(o, lse, sinks):
    """The sink logit joins each row's denominator (rows that see no key
    keep ``o = 0, lse = -inf``, as in the block path)."""
    b, k, g, t = lse.shape
    sink = sinks.astype(lse.dtype).reshape(1, k, g, 1)
    empty = lse == -jnp.inf
    new = jnp.where(empty, -jnp.inf, jnp.logaddexp(jnp.where(empty, 0, lse), sink))
    w = jnp.where(empty, 0, jnp.exp(jnp.where(empty, 0, lse - new)))
    return o * _heads_last(w, o.shape[2])[..., None], new


# -- The steps: what each device attends to, and when K/V move -----------------


def _ring_perm(axis_name, n, direction):
    """The axes and pairs of the ``lax.ppermute`` that sends each device's
    arrays to the device ``direction`` positions on, positions counted as
    ``lax.axis_index`` counts them (and as the sequence is split). Over a
    tuple of mesh axes in another order than the mesh's, ppermute numbers
    the devices in the mesh's order (JAX 0.10.2) and axis_index in the
    tuple's: the pairs are given over the axes in the mesh's order, which
    both read alike."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    mesh = jax.sharding.get_abstract_mesh()
    ordered = tuple(a for a in mesh.axis_names if a in names)
    if len(names) < 2 or len(ordered) != len(names) or ordered == names:
        return axis_name, [(i, (i + direction) % n) for i in range(n)]

    def mesh_index(position):
        coords = {}
        for a in reversed(names):
            position, coords[a] = divmod(position, mesh.shape[a])
        index = 0
        for a in ordered:
            index = index * mesh.shape[a] + coords[a]
        return index

    pairs = [(mesh_index(i), mesh_index((i + direction) % n)) for i in range(n)]
    return ordered, pairs


def _source(plan, index, step, direction):
    """The device whose keys device ``index`` attends to at ``step``."""
    return (index - direction * step) % plan.size


def _start(plan, index, step, direction):
    """Where the visiting keys start in a whole key axis (of a bias or mask):
    the source's slice (ring), or 0 (all-gather, all keys)."""
    if plan.mode == "all_gather":
        return 0
    return _source(plan, index, step, direction) * plan.s


def _sides(plan, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg):
    """What stays with the local queries, ``(q, bias, mask, q_len, kv_len,
    q_seg)`` (a bias or mask with a whole key axis in natural order for the
    all-gather mode), and what moves with K/V (or is gathered with them),
    ``(k, v, kv_seg, bias, mask)``: the arrays split along the keys."""
    local = (
        q,
        _whole_keys(plan, bias, plan.bias_keys),
        _whole_keys(plan, mask, plan.mask_keys),
        q_len,
        kv_len,
        q_seg,
    )
    bias = bias if plan.bias_keys == "split" else None
    mask = mask if plan.mask_keys == "split" else None
    return local, (k, v, kv_seg, bias, mask)


def _gather_keys(plan, x, axis, direction):
    """All devices' key slices of ``x`` along ``axis``, in natural order.
    The backward pass (``direction`` -1) gathers them with a trailing axis of
    1 (as :func:`_send`): not the forward's computation, which XLA would
    otherwise merge with it (CSE) and keep alive from one pass to the other."""
    if direction == 1:
        x = lax.all_gather(x, plan.axis_name, axis=axis, tiled=True)
    else:
        x = lax.all_gather(x[..., None], plan.axis_name, axis=axis, tiled=True)[..., 0]
    if plan.layout == "zigzag":
        x = from_zigzag(x, plan.size, axis=axis)
    return x


def _scatter_keys(plan, x, axis):
    """The transpose of :func:`_gather_keys`: each device's share of the sum."""
    if plan.layout == "zigzag":
        x = to_zigzag(x, plan.size, axis=axis)
    if _explicit(x) and any(e is not None for e in jax.typeof(x).sharding.spec):
        # lax.psum_scatter fails inside JAX (0.10.2) on an array with an
        # axis split over an explicit mesh axis: the sum everywhere, sliced.
        size = x.shape[axis] // plan.size
        start = lax.axis_index(plan.axis_name) * size
        return lax.dynamic_slice_in_dim(lax.psum(x, plan.axis_name), start, size, axis)
    return lax.psum_scatter(x, plan.axis_name, scatter_dimension=axis, tiled=True)


def _whole_keys(plan, x, keys, inverse=False):
    """A bias or mask whose key axis is whole (in the layout's order) in
    natural order for the all-gather mode (``inverse``: back)."""
    if x is None or keys != "whole" or plan.mode != "all_gather":
        return x
    if plan.layout != "zigzag":
        return x
    return (to_zigzag if inverse else from_zigzag)(x, plan.size, axis=3)


def _gathered(plan, x, direction):
    """The all-gather mode's keys: each array of ``x`` (a tuple of arrays
    split along the keys) gathered, in natural order."""
    axes = (1, 1, 1, 3, 3)  # k, v, kv_seg, bias, mask
    return tuple(
        None if a is None else _gather_keys(plan, a, axis, direction)
        for a, axis in zip(x, axes, strict=True)
    )


def _send(plan, x, direction):
    """``x`` (a tuple) sent ``direction`` devices on. The backward pass sends
    its arrays with a trailing axis of 1 (free, and sharded as they are under
    an explicit mesh): with the other direction, that keeps its permutes
    distinct from the forward pass's, also on 2 devices, where both
    directions are one permutation and XLA inlines the one-trip loops."""
    axes, perm = _ring_perm(plan.axis_name, plan.size, direction)
    if direction == 1:
        return lax.ppermute(x, axes, perm)
    marked = tuple(None if a is None else a[..., None] for a in x)
    marked = lax.ppermute(marked, axes, perm)
    return tuple(None if a is None else a[..., 0] for a in marked)


@dataclasses.dataclass(frozen=True)
class _Steps:
    """Ring steps ``first, first + 1, ...`` run by one traced body, which
    gets its position ``at`` among them (traced in a loop, 0 outside)."""

    plan: Plan
    first: int
    count: int
    direction: int

    def pairs(self):
        """Per query chunk and key piece: the query chunk, the key piece (its
        start in the local slice), its configs per (step, device) and its
        global key offsets per (step, device)."""
        plan = self.plan
        pieces = _kv_pieces(plan, self.direction)
        rows = range(self.first, self.first + self.count)
        for qc in _chunks(plan, plan.t):
            for c, kc in enumerate(pieces[self.first]):
                configs = tuple(_pair_configs(plan, qc, pieces[r][c]) for r in rows)
                offsets = np.array([pieces[r][c].offsets for r in rows], np.int32)
                yield qc, kc, configs, offsets


def _pair(plan, qc, kc, q_off, k_off, local, visiting, start):
    """The operands of one pair's block call: ``(q, k, v, bias, mask, q_len,
    kv_len, q_seg, kv_seg)`` of the query chunk and key piece, whose global
    offsets are ``q_off`` and ``k_off``."""
    q, bias, mask, q_len, kv_len, q_seg = local
    k, v, kv_seg, bias_v, mask_v = visiting
    return (
        _rows(q, qc),
        _rows(k, kc),
        _rows(v, kc),
        _score_cols(_score_rows(bias, qc), plan.bias_keys, bias_v, kc, start),
        _score_cols(_score_rows(mask, qc), plan.mask_keys, mask_v, kc, start),
        _clip_len(q_len, q_off, qc.size),
        _clip_len(kv_len, k_off, kc.size),
        None if q_seg is None else _rows(q_seg, qc),
        None if kv_seg is None else _rows(kv_seg, kc),
    )


def _step_pairs(steps, at, index, local, visiting):
    """Per pair of one step: the query chunk, the key piece, the pair's
    configs and its block call's operands."""
    plan = steps.plan
    start = _start(plan, index, steps.first + at, steps.direction)
    for qc, kc, configs, offsets in steps.pairs():
        q_off = jnp.asarray(np.array(qc.offsets, np.int32))[index]
        k_off = jnp.asarray(offsets)[at, index]
        yield qc, kc, configs, _pair(plan, qc, kc, q_off, k_off, local, visiting, start)


def _loop(count, body, carry):
    """``body(at, carry)`` for ``at`` in ``range(count)``, rolled (one
    iteration's buffers, reused), or inlined for a single step."""
    if count == 1:
        return body(0, carry)
    return lax.fori_loop(0, count, body, carry)


# -- The forward pass ----------------------------------------------------------


def _empty_forward(q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg):
    lse = _row_stats(q, k.shape[2], -jnp.inf)
    return jnp.zeros_like(q, lse.dtype), lse


def _forward_step(steps, at, index, local, visiting, state):
    """``state`` (per query chunk, the running ``(o, m, total)``) merged
    with one step's pairs."""
    acc = xla._acc(local[0])
    state = list(state)
    starts = [qc.start for qc in _chunks(steps.plan, steps.plan.t)]
    for qc, _, configs, operands in _step_pairs(steps, at, index, local, visiting):
        o, lse = _switch(configs, "forward", operands, at, index, steps.plan.axis_name)
        a = starts.index(qc.start)
        state[a] = _merge(state[a], o.astype(acc), lse)
    return tuple(state)


def forward(plan, q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg):
    """``(out [B, T, N, H], lse [B, K, G, T])`` of the local queries, one
    group of key/value heads at a time (:func:`head_groups`)."""
    args = (q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)
    if plan.groups == 1:
        return _forward_heads(plan, *args)
    ng, kg = q.shape[2] // plan.groups, k.shape[2] // plan.groups

    def body(j, carry):
        out, lse = carry
        o_j, lse_j = _forward_heads(plan, *_head_group(plan, args, j))
        out = lax.dynamic_update_slice_in_dim(out, o_j, j * ng, 2)
        return out, lax.dynamic_update_slice_in_dim(lse, lse_j, j * kg, 1)

    lse = _row_stats(q, k.shape[2], 0)
    carry = varying_like(
        (jnp.zeros_like(q), lse), *args, lax.axis_index(plan.axis_name)
    )
    return lax.fori_loop(0, plan.groups, body, carry)


def _head_group(plan, args, j):
    """``args`` (the rule's arrays, or its residuals) of group ``j``: its
    key/value heads and their query heads; a bias or mask with one head is
    every group's."""
    q, k = args[:2]
    ng, kg = q.shape[2] // plan.groups, k.shape[2] // plan.groups

    def heads(x, size, axis):
        if x is None or x.shape[axis] == 1:
            return x
        return lax.dynamic_slice_in_dim(x, j * size, size, axis)

    # q, k, v, bias, sinks, mask, the lengths and segment ids (every
    # group's); the residuals out and lse.
    axes = ((ng, 2), (kg, 2), (kg, 2), (ng, 1), (ng, 0), (ng, 1)) + (None,) * 4
    axes += ((ng, 2), (kg, 1))
    return tuple(
        x if a is None else heads(x, *a) for x, a in zip(args, axes, strict=False)
    )


def _forward_heads(plan, q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg):
    """``(out [B, T, N, H], lse [B, K, G, T])`` of the local queries.

    The steps run in a loop (``lax.fori_loop``) whose carry holds the
    visiting K/V and the running ``(o, m, total)`` per query chunk: one
    step's buffers, reused, whatever the number of devices. Ring: each
    iteration sends the visiting K/V on before its compute; the last step,
    which sends nothing, runs after the loop. All-gather: each iteration takes one
    device's slice of the gathered K/V.
    """
    n = plan.size
    index = lax.axis_index(plan.axis_name)
    local, travelling = _sides(plan, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg)
    arrays = (q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, index)
    state = tuple(_start_rows(_rows(q, qc), k.shape[2]) for qc in _chunks(plan, plan.t))
    state = varying_like(state, *arrays)
    if plan.mode == "ring":
        steps = _Steps(plan, 0, n - 1, 1)

        def body(at, carry):
            visiting, state = carry
            following = _send(plan, visiting, 1)  # issued before the compute
            return following, _forward_step(steps, at, index, local, visiting, state)

        if n > 1:
            travelling, state = _loop(n - 1, body, (travelling, state))
        state = _forward_step(
            _Steps(plan, n - 1, 1, 1), 0, index, local, travelling, state
        )
    else:
        visiting = _gathered(plan, travelling, 1)
        state = _forward_step(_Steps(plan, 0, 1, 1), 0, index, local, visiting, state)
    state = [_finish_rows(rows) for rows in state]
    if sinks is not None:
        state = [_add_sink(o, lse, sinks) for o, lse in state]
    out = jnp.concatenate([o for o, _ in state], axis=1).astype(q.dtype)
    lse = jnp.concatenate([lse for _, lse in state], axis=3)
    return out, lse


# -- The backward pass ---------------------------------------------------------


def _add_at(total, part, row, col):
    """``total`` with ``part`` added at ``[..., row:, col:]`` (offsets None on
    axes where ``total`` broadcasts)."""
    if part is None:
        return total
    index = [np.int32(0)] * total.ndim
    if row is not None and total.shape[-2] != 1:
        index[-2] = row
    if col is not None and total.shape[-1] != 1:
        index[-1] = col
    current = lax.dynamic_slice(total, index, part.shape)
    return lax.dynamic_update_slice(total, current + part.astype(total.dtype), index)


def _add_rows(total, part, start):
    """``total`` with ``part`` added at ``start`` along the sequence axis 1."""
    return total.at[:, start : start + part.shape[1]].add(part.astype(total.dtype))


def _empty_backward(q, k, v, bias, *_):
    acc = xla._acc(q)
    return (
        jnp.zeros_like(q, acc),
        jnp.zeros_like(k, acc),
        jnp.zeros_like(v, acc),
        None if bias is None else jnp.zeros_like(bias, acc),
    )


def _pair_backward(
    config, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, o, lse, g
):
    res = (q, k, v, bias, None, mask, q_len, kv_len, q_seg, kv_seg, o, lse)
    return _block_backward(config, res, g)


def _backward_step(steps, at, index, local, visiting, seen, moving, d_q, d_bias):
    """One step's gradients added in: ``moving`` (dK, dV and the split bias's
    gradient of the visiting keys), ``d_q`` and ``d_bias`` (the bias's
    gradient when its key axis is not split). ``seen`` is ``(out, lse,
    d_out)`` of the local queries."""
    plan = steps.plan
    out, lse, d_out = seen
    start = _start(plan, index, steps.first + at, steps.direction)
    dk, dv, db = moving
    for qc, kc, configs, operands in _step_pairs(steps, at, index, local, visiting):
        o_c = _rows(out, qc)
        lse_c = lax.slice_in_dim(lse, qc.start, qc.start + qc.size, axis=3)
        g_c = _rows(d_out, qc)
        dq_p, dk_p, dv_p, dbias_p = _switch(
            configs, "backward", operands + (o_c, lse_c, g_c), at, index,
            plan.axis_name,
        )  # fmt: skip
        d_q = _add_rows(d_q, dq_p, qc.start)
        dk = _add_rows(dk, dk_p, kc.start)
        dv = _add_rows(dv, dv_p, kc.start)
        if plan.bias_keys == "split":
            db = _add_at(db, dbias_p, qc.start, kc.start)
        elif d_bias is not None:
            col = kc.start + start if plan.bias_keys == "whole" else None
            d_bias = _add_at(d_bias, dbias_p, qc.start, col)
    return (dk, dv, db), d_q, d_bias


# P = exp(s - L) and D = rowsum(dO * O) from the global O and L: each pair's
# block backward is its key piece's share. dsink = -sum_rows e^(sink - L) D.
def backward(plan, res, d_out):
    """The cotangents of ``(q, k, v, bias, sinks)``, one group of key/value
    heads at a time, as the forward pass."""
    q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, out, lse = res
    if plan.groups == 1:
        d_q, d_k, d_v, d_bias = _backward_heads(plan, res, d_out)
    else:
        acc = xla._acc(q)
        n, kh = q.shape[2], k.shape[2]
        ng, kg = n // plan.groups, kh // plan.groups
        # A bias with one head is every group's: its gradient sums theirs.
        summed = bias is not None and bias.shape[1] == 1

        def body(j, carry):
            d_q, d_k, d_v, d_bias = carry
            g_j = lax.dynamic_slice_in_dim(d_out, j * ng, ng, 2)
            dq_j, dk_j, dv_j, db_j = _backward_heads(
                plan, _head_group(plan, res, j), g_j
            )
            d_q = lax.dynamic_update_slice_in_dim(d_q, dq_j.astype(q.dtype), j * ng, 2)
            d_k = lax.dynamic_update_slice_in_dim(d_k, dk_j.astype(k.dtype), j * kg, 2)
            d_v = lax.dynamic_update_slice_in_dim(d_v, dv_j.astype(v.dtype), j * kg, 2)
            if summed:
                d_bias = d_bias + db_j
            elif d_bias is not None:
                d_bias = lax.dynamic_update_slice_in_dim(d_bias, db_j, j * ng, 1)
            return d_q, d_k, d_v, d_bias

        d_bias = None if bias is None else jnp.zeros_like(bias, acc)
        carry = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), d_bias)
        carry = varying_like(carry, *res, d_out, lax.axis_index(plan.axis_name))
        d_q, d_k, d_v, d_bias = lax.fori_loop(0, plan.groups, body, carry)
    d_sinks = None
    if sinks is not None:
        q_chunks = _chunks(plan, plan.t)
        index = lax.axis_index(plan.axis_name)
        d_sinks = _sinks_grad(q, sinks, q_len, out, lse, d_out, q_chunks, index)
    return (
        d_q.astype(q.dtype),
        d_k.astype(k.dtype),
        d_v.astype(v.dtype),
        None if d_bias is None else d_bias.astype(bias.dtype),
        d_sinks,
    )


def _backward_heads(plan, res, d_out):
    """The cotangents of ``(q, k, v, bias)``, unrounded.

    A loop over the steps, as the forward pass's. Ring: the ring runs the
    other way round (its permutes then differ from the forward pass's, which
    XLA would otherwise merge with these when it compiles both together,
    keeping K/V alive from one pass to the other); each iteration sends the
    visiting K/V on before its compute, and dK/dV (and the split bias's
    gradient) after it, the n-th send bringing them home. All-gather: dK/dV
    of every device's keys add up here and are reduce-scattered at the end.
    """
    q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, out, lse = res
    n = plan.size
    index = lax.axis_index(plan.axis_name)
    acc = xla._acc(q)
    local, travelling = _sides(plan, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg)
    seen = (out, lse, d_out)
    arrays = (q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, out, lse, d_out)
    arrays += (index,)
    split = plan.bias_keys == "split"
    # The bias's gradient stays here unless its key axis is split (then it
    # travels, or is reduce-scattered, with dK and dV).
    d_bias = None if bias is None or split else jnp.zeros_like(local[1], acc)
    d_q = jnp.zeros_like(q, acc)
    moving = (k, v, travelling[3])
    if plan.mode == "ring":
        moving = tuple(None if x is None else jnp.zeros_like(x, acc) for x in moving)
        carry = varying_like((moving, d_q, d_bias), *arrays)
        steps = _Steps(plan, 0, n - 1, -1)

        def body(at, carry):
            visiting, *grads = carry
            following = _send(plan, visiting, -1)
            moving, d_q, d_bias = _backward_step(
                steps, at, index, local, visiting, seen, *grads
            )
            return following, _send(plan, moving, -1), d_q, d_bias

        if n > 1:
            travelling, *carry = _loop(n - 1, body, (travelling, *carry))
        moving, d_q, d_bias = _backward_step(
            _Steps(plan, n - 1, 1, -1), 0, index, local, travelling, seen, *carry
        )
        d_k, d_v, d_bias_split = _send(plan, moving, -1)  # home
    else:
        visiting = _gathered(plan, travelling, -1)
        moving = (visiting[0], visiting[1], visiting[3])
        moving = tuple(None if x is None else jnp.zeros_like(x, acc) for x in moving)
        moving, d_q, d_bias = _backward_step(
            _Steps(plan, 0, 1, -1), 0, index, local, visiting, seen, moving, d_q, d_bias
        )
        d_k, d_v = _scatter_keys(plan, moving[0], 1), _scatter_keys(plan, moving[1], 1)
        d_bias_split = None if moving[2] is None else _scatter_keys(plan, moving[2], 3)
    if split:
        d_bias = d_bias_split
    elif d_bias is not None:
        d_bias = _whole_keys(plan, d_bias, plan.bias_keys, inverse=True)
    return d_q, d_k, d_v, d_bias


def _explicit(x):
    """Is ``x`` typed with an explicit mesh's sharding?"""
    mesh = jax.typeof(x).sharding.mesh
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _sinks_grad(q, sinks, q_len, out, lse, d_out, q_chunks, index):
    """``-sum_rows e^(sink - L) D`` over the local rows (the other devices'
    rows are summed where the sinks are marked varying)."""
    acc = xla._acc(q)
    n = q.shape[2]
    total = jnp.zeros((n,), acc)
    for qc in q_chunks:
        q_off = jnp.asarray(np.array(qc.offsets, np.int32))[index]
        g = xla.zero_past(_rows(d_out, qc), _clip_len(q_len, q_off, qc.size))
        delta = jnp.einsum(
            "btnh,btnh->btn",
            g.astype(q.dtype),
            _rows(out, qc),
            preferred_element_type=acc,
        )
        lse_c = _heads_last(
            lax.slice_in_dim(lse, qc.start, qc.start + qc.size, axis=3), n
        )
        total = total + jnp.sum(
            xla.sink_grad(sinks.astype(acc), lse_c, delta), axis=(0, 1)
        )
    total = total.astype(sinks.dtype)
    if _explicit(sinks) and jax.typeof(total).sharding != jax.typeof(sinks).sharding:
        # Summed from heads split over an explicit mesh axis: gathered into
        # the sinks' own sharding (the cotangent's type).
        total = jax.sharding.reshard(total, jax.typeof(sinks).sharding.spec)
    return total


# -- The rule ------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(10,))
def _attention(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, plan):
    return _attention_fwd(
        q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, plan
    )[0]


def _attention_fwd(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, plan):
    args = (q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)
    out, lse = forward(plan, *args)
    return (out, lse), (*args, out, lse)


def _attention_bwd(plan, res, cotangents):
    return tuple(backward(plan, res, cotangents[0])) + (None,) * 5


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_tangent(statics, res, t_leaves):
    """Forward mode: ``jax.jvp`` of the forward pass recomputed from the
    residuals, as the single-device rule's."""
    (plan,) = statics
    return dispatch.recomputed_tangent(
        lambda *args: forward(plan, *args)[0], res, t_leaves
    )


attention = _with_forward_mode(_attention, tangent=_attention_tangent, keep_traces=True)

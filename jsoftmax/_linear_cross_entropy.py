"""Fused, chunked linear + softmax cross-entropy that never holds all logits."""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jsoftmax._checks import (
    compute_dtype,
    explicit_axes,
    float_input,
    in_operands_mesh,
    log_sum,
    lowest,
    mask_input,
    mesh_spec,
    reshard_to,
    shards,
    share_shardings,
    static_int,
    traced_once,
    widen_8bit,
)
from jsoftmax._collectives import (
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
from jsoftmax._cross_entropy import (
    cap,
    cap_grad,
    check_integer_labels,
    check_loss_options,
    loud_labels,
    split_empty,
)
from jsoftmax._forward_mode import _with_forward_mode

_REDUCTIONS = ("mean", "sum", "none")

# The chunk's logits (tokens x chunk_size, float32) stay near this many
# elements: 2**22 is 16 MiB, small next to the full logits, and large enough
# that the matmuls run near full speed and the per-chunk work (accumulating
# dx, slicing w) stays small. Measured at B=4096, D=512, V=32768 on a 2-core
# CPU: chunks of 512 / 1024 / 2048 columns (8 / 16 / 32 MiB) took about 1.16 /
# 1.10 / 1.07x optax's time for 17 / 26 / 44 MiB of temporaries (before the
# backward kept a transposed copy of x, 8 MiB more there: 34 MiB at 1024;
# with the per-chunk target compare of the forward pass, 40 MiB).
_CHUNK_ELEMENTS = 2**22


# The chunk when the number of tokens is not known at trace time (a symbolic
# batch under jax.export): what 4096 tokens get.
_SYMBOLIC_BATCH_CHUNK = 1024


def default_chunk_size(num_tokens, vocab: int) -> int:
    """Vocabulary columns per chunk: about 16 MiB of float32 logits per chunk.

    A power of two between 128 and 8192, at most ``vocab``. Memory grows with
    the chunk (a few chunk-sized buffers are live at once), speed with fewer,
    larger matmuls; 16 MiB keeps the temporaries in the tens of MiB. A
    symbolic ``num_tokens`` (``jax.export`` with a symbolic batch) gets 1024
    columns, what 4096 tokens get: pass ``chunk_size`` to choose otherwise.
    """
    if not isinstance(num_tokens, (int, np.integer)):
        return int(min(vocab, _SYMBOLIC_BATCH_CHUNK))
    size = _CHUNK_ELEMENTS // max(num_tokens, 1)
    size = 1 << max(int(size).bit_length() - 1, 0)
    return int(min(vocab, min(max(size, 128), 8192)))


@in_operands_mesh
def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    soft_cap: float | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Cross-entropy of ``softmax(x @ w + bias)`` without materialising the logits.

    The same loss as :func:`softmax_cross_entropy_with_integer_labels` applied
    to ``x @ w + bias``, computed by walking the vocabulary in chunks of
    ``chunk_size`` columns. The forward pass keeps an online logsumexp
    (running max and rescaled sum) and saves only the per-token logsumexp
    :math:`L`; the backward pass recomputes each chunk's logits, forms
    :math:`\partial \ell / \partial z = (1 + 2 \zeta L) p - (1 - a) e_y - a / V`
    (times the soft-cap derivative) and accumulates ``dx`` and writes the
    chunk's columns of ``dw`` and ``dbias``. Peak memory is a few
    ``tokens x chunk_size`` buffers instead of ``tokens x V``.

    Args:
      x: ``[B, D]`` activations.
      w: ``[D, V]`` output weights.
      labels: ``[B]`` integer class ids, any integer dtype.
      bias: optional ``[V]`` bias.
      where: optional boolean ``[B]`` mask of the tokens that count. Masked
        tokens have loss 0 and zero gradient, whatever their label.
      reduction: ``"mean"`` over the counted tokens (0 if none), ``"sum"``, or
        ``"none"`` for per-token losses ``[B]``.
      chunk_size: vocabulary columns per chunk, a static int; ``V`` need not be a
        multiple. Default (None): about 16 MiB of float32 logits per chunk,
        a power of two. Where the vocabulary is split (``axis_name``, or an
        ``Explicit`` mesh), each shard walks its own columns in chunks of
        this size.
      label_smoothing, z_loss, soft_cap: as in :func:`softmax_cross_entropy`.
      axis_name: the named axis over which the vocab columns of ``w`` (and
        ``bias``) are split, ``x`` being the same on every shard (vocab
        parallelism): a mesh axis inside ``jax.shard_map`` or ``jax.pmap``, or
        a ``jax.vmap`` axis. Labels stay global ids. The forward pass takes one
        ``pmax`` and one ``psum``; ``dw`` and ``dbias`` stay local. Inside
        ``shard_map`` with ``check_vma=True`` (the default) the backward pass
        takes one ``psum``, of ``dx`` (each shard holds a partial sum).
        Elsewhere it takes one ``psum`` of the ``[B]`` loss cotangent instead,
        and each shard's ``dx`` is its part, which JAX sums for a gradient
        taken outside (as plain JAX code gives it). Each shard walks its own
        columns in chunks. Without ``axis_name``, where an ``Explicit`` mesh
        splits ``w``'s columns, the op runs so by itself, in a ``shard_map``
        over their mesh axes and the tokens' (except inside a ``shard_map``
        over other axes, where XLA gathers ``w``).

    Returns:
      A scalar for ``"mean"``/``"sum"``, else ``[B]``, in the dtype of ``x``
      and ``w``. bfloat16/float16 inputs run their matmuls in that dtype with
      float32 accumulation, and all softmax arithmetic is float32 (float64
      inputs stay float64). A counted token whose label is outside
      ``[0, V)`` has a NaN loss, and NaN gradients where its cotangent is not
      0 (masking per-token losses with ``jnp.where`` afterwards gives zero
      gradients). Losses are never negative: the target logit comes from the
      same chunk matmul as the logsumexp. Columns whose logits are ``-inf``
      (a ``-inf`` bias, as on vocabulary padding) have probability 0 wherever
      they fall among the chunks and shards; a token whose logits are all
      ``-inf`` has loss 0 and gradient 0, whatever its label, as in the
      unfused op.

    Raises:
      TypeError: complex inputs, non-integer labels, a non-boolean ``where``,
        a ``chunk_size`` that is not an int (a bool, a float, a traced value),
        an option that is not a real number (named).
      ValueError: shapes that do not match (named), a symbolic ``V``
        (:func:`jax.export`), a bad ``reduction``, a ``chunk_size`` below 1,
        bad options.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])
      >>> labels = jnp.array([1, 0])
      >>> jsoftmax.linear_softmax_cross_entropy(x, w, labels, reduction="none").round(4)
      Array([0.2877, 0.6931], dtype=float32)
    """
    name = "linear_softmax_cross_entropy"
    x, w = float_input(name, x), float_input(name, w)
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"{name}: x must be [B, D] and w [D, V] with the same D, got x "
            f"{x.shape} and w {w.shape}"
        )
    num_tokens, vocab = x.shape[0], w.shape[1]
    if not isinstance(vocab, int):
        raise ValueError(
            f"{name}: the vocabulary V of w {w.shape} is symbolic (jax.export "
            "shape polymorphism): its chunks are a static loop, so V must be "
            "static; a symbolic batch is supported"
        )
    if vocab == 0:
        raise ValueError(f"{name}: w of shape {w.shape} has no classes (V = 0)")
    # Labels keep their dtype: the range test runs in it (shard_labels), so a
    # large int64 or unsigned label cannot wrap into range.
    labels = check_integer_labels(name, labels, (num_tokens,))
    if bias is not None:
        bias = widen_8bit(float_input(name, bias))
        if bias.shape != (vocab,):
            raise ValueError(f"{name}: bias of shape {bias.shape} must be ({vocab},)")
    if where is not None:
        where = jnp.asarray(where)
        if where.shape != (num_tokens,):
            raise ValueError(
                f"{name}: where of shape {where.shape} must be a [B] token mask "
                f"({num_tokens},)"
            )
        where = mask_input(name, where, (num_tokens,))
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(num_tokens, vocab)
    chunk_size = static_int(name, "chunk_size", chunk_size, "a positive int")
    if chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size}")
    options = check_loss_options(name, label_smoothing, z_loss, soft_cap)
    dtype = jnp.result_type(x.dtype, w.dtype)
    x, w = widen_8bit(x.astype(dtype)), widen_8bit(w.astype(dtype))
    if x.shape[1] == 0:  # no features: one of zeros gives the same logits
        x, w = jnp.pad(x, ((0, 0), (0, 1))), jnp.pad(w, ((0, 1), (0, 0)))
    # On an Explicit mesh (see share_shardings) the tokens split alike, and so
    # do the vocabulary columns of w and bias. The features are gathered where
    # split: the chunks' logits contract them, and a token's carries are
    # sliced from x.
    x, w, bias, labels, where = share_shardings(
        (x, w, bias, labels, where),
        (("tokens", "features"), ("features", "vocab"), ("vocab",), ("tokens",),
         ("tokens",)),
        whole=("features",),
    )  # fmt: skip
    losses = _vocab_parallel(x, w, bias, labels, where, chunk_size, options, axis_name)
    if reduction == "none":
        return losses.astype(out_dtype)
    total = jnp.sum(losses)
    if reduction == "mean":
        count = num_tokens if where is None else jnp.sum(where, dtype=total.dtype)
        total = total / jnp.maximum(count, 1)
    return total.astype(out_dtype)


def _chunk_over_shards(chunk_size: int, w) -> int:
    """``chunk_size`` rounded up to a multiple of the number of shards over
    which an Explicit mesh splits ``w``'s columns (at most all of them): a
    chunk sliced from them is split the same way. Only inside a
    ``shard_map``, where :func:`_vocab_parallel` leaves them split."""
    if not explicit_axes():
        return chunk_size
    entry = mesh_spec(w)[1]
    n = 1 if entry is None else shards(entry)
    return min(-(-chunk_size // n) * n, w.shape[1])


def _per_token(x, w, bias, labels, where, chunk_size, options, axis_name):
    """The per-token losses, NaN for a counted token's out-of-range label.
    ``w`` holds this shard's columns, which the chunks walk."""
    chunk_size = _chunk_over_shards(min(chunk_size, w.shape[1]), w)
    axis_name = shard_axis(axis_name)
    w, bias = varying_over_shards((w, bias), axis_name)
    x, w, bias = varying_like((x, w, bias), x, w, bias, labels, where)
    losses = traced_once(_linear_cross_entropy_forward_mode)(
        x, w, bias, labels, where, chunk_size, *options, axis_name
    )
    # Masked tokens' labels (-100 padding) are not checked: their cotangents,
    # which the backward zeroes, never hold a NaN (jax_debug_nans stays quiet).
    checked = labels if where is None else jnp.where(where, labels, 0)
    return loud_labels(losses, checked, _vocab(w, axis_name))


def _vocab_parallel(x, w, bias, labels, where, chunk_size, options, axis_name):
    """:func:`_per_token` with ``axis_name`` given, or, where an ``Explicit``
    mesh splits ``w``'s columns, run vocab-parallel in a ``shard_map`` over those
    mesh axes (the others stay ``Explicit`` inside): each device walks its
    own columns, as with ``axis_name``, with one ``pmax`` and one ``psum`` of
    per-token statistics forward and one ``psum`` of ``dx`` backward.
    Left to XLA, the chunks' dots gathered the whole of ``w`` on every device
    (once forward and once per chunk backward), and a ``vmap`` of the
    backward pass wrote the chunks' columns of a batched ``dw`` with a
    scatter that JAX could not type on split columns.

    The tokens' mesh axes are manual too, so that each device keeps its own
    tokens (XLA gathered a token-split ``x`` into a ``shard_map`` manual over
    the columns' axes only); tokens split over the columns' axes are
    gathered over them (each device needs every token's logits for its
    columns), and the per-token losses split back. A bias split otherwise
    than the columns (which ``x @ w + bias`` refuses) is split as they are.

    XLA's gathering stays inside a ``shard_map`` (a mesh with ``Manual``
    axes): JAX 0.10 cannot lower the gradient of a ``shard_map`` nested in
    one over other axes. It stays too for a symbolic number of tokens
    (``jax.export``): the call of such an export, which fails in plain JAX
    ("Error refining shapes"), crashed the process with the ``shard_map``."""
    mesh = jax.sharding.get_abstract_mesh()
    split = (
        axis_name is None
        and explicit_axes()
        and not mesh.manual_axes
        and isinstance(x.shape[0], int)
    )
    entry = mesh_spec(w)[1] if split else None
    if entry is None:
        return _per_token(x, w, bias, labels, where, chunk_size, options, axis_name)
    name = entry[0] if len(entry) == 1 else entry

    def shard(x, w, bias, labels, where):
        return _per_token(x, w, bias, labels, where, chunk_size, options, name)

    tokens = mesh_spec(x)[0]
    kept = tuple(a for a in tokens or () if a not in entry) or None
    x, labels, where = (
        None if a is None else reshard_to(a, (kept, *mesh_spec(a)[1:]))
        for a in (x, labels, where)
    )
    bias = None if bias is None else reshard_to(bias, (entry,))
    by_token = P(kept)
    losses = jax.shard_map(
        shard,
        in_specs=(
            P(kept, None),
            P(None, entry),
            None if bias is None else P(entry),
            by_token,
            None if where is None else by_token,
        ),
        out_specs=by_token,
        axis_names={*entry, *(kept or ())},
    )(x, w, bias, labels, where)
    return reshard_to(losses, (tokens,))


def acc(x):
    """The accumulation dtype: float32 for 16-bit inputs, else x's dtype."""
    return compute_dtype(x.dtype)


def _chunks(vocab, chunk_size):
    """Start columns of the full chunks, and the size of the last partial one."""
    full, rest = divmod(vocab, chunk_size)
    return jnp.arange(full, dtype=jnp.int32) * chunk_size, rest


def _chunk_logits(x, w, bias, start, size, soft_cap):
    """Capped logits, in ``acc(x)``, ``x @ w[:, start:start+size] + bias``."""
    w_c = lax.dynamic_slice_in_dim(w, start, size, axis=1)
    z = jnp.dot(x, w_c, preferred_element_type=acc(x))
    if bias is not None:
        z = z + lax.dynamic_slice_in_dim(bias, start, size).astype(acc(x))[None]
    return cap(z, soft_cap)


def _online_logsumexp(x, w, bias, labels, chunk_size, soft_cap, want_sum):
    """Per-token running max ``m``, rescaled sum ``s`` of exponentials, the
    target logit and (when ``want_sum``) the sum of ``z - m``, over all
    columns, one chunk at a time.

    ``m`` and ``s`` are the stable online logsumexp: ``s`` is rescaled when
    the max grows, and never more than one chunk of logits is alive. The
    target logit is picked out of the same chunk logits (a compare per
    column), not recomputed by another matmul: a different rounding there
    made losses slightly negative when the target was the max. The sum of
    ``z - m`` is kept relative to the running max too (shifted when it
    grows), so the label-smoothing term has no large-offset cancellation.
    """

    def step(carry, start, size):
        m, s, target, total = carry
        z = _chunk_logits(x, w, bias, start, size, soft_cap)
        # The running max is only a shift: a constant for autodiff, as the
        # per-example losses' row max is (see _collectives.pmax).
        m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(z, axis=1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        columns = start + lax.broadcasted_iota(labels.dtype, (1, size), 1)
        target = target + jnp.sum(jnp.where(labels[:, None] == columns, z, 0), axis=1)
        if want_sum:
            # The `start` columns before this chunk move to the new max: a
            # shift of start * (m - m_new) <= 0 (none before the first chunk,
            # where m is still its start value).
            seen = jnp.asarray(start, acc(x))
            shift = jnp.where(seen > 0, seen * (m - m_new), 0)
            total = total + shift + jnp.sum(z - m_new[:, None], axis=1)
        return (m_new, s, target, total), None

    # Per-token carries made from x's first column: sharded as x's batch axis
    # is under an explicit mesh, so the loop body does not change their type.
    # The running max starts at the lowest finite value, as row_max does: a
    # first chunk (or a shard) whose logits are all -inf (a -inf bias on its
    # columns) keeps a finite max, so its shifts are -inf, not -inf - -inf.
    zeros = jnp.zeros_like(x[:, 0], acc(x))
    carry = (jnp.full_like(zeros, lowest(zeros.dtype)), zeros, zeros, zeros)
    carry = varying_like(carry, x, w, bias, labels)
    starts, rest = _chunks(w.shape[1], chunk_size)
    carry, _ = lax.scan(partial(step, size=chunk_size), carry, starts)
    if rest:
        carry, _ = step(carry, w.shape[1] - rest, rest)
    return carry


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _linear_cross_entropy(
    x, w, bias, labels, where, chunk_size, label_smoothing, z_loss, soft_cap, axis_name
):
    return _linear_cross_entropy_fwd(
        x, w, bias, labels, where, chunk_size, label_smoothing, z_loss, soft_cap,
        axis_name,
    )[0]  # fmt: skip


def _vocab(w, axis_name):
    """The number of classes over all shards."""
    return w.shape[1] * num_shards(axis_name)


def _local_labels(labels, w, x, axis_name):
    """:func:`shard_labels`, with -1 (no column) for labels this shard does
    not hold."""
    here, holds, in_range = shard_labels(
        labels, w.shape[1], axis_name, batch_shape=x.shape
    )
    return jnp.where(holds, here, -1), holds, in_range


def _losses(
    x, w, bias, labels, where, chunk_size, label_smoothing, z_loss, soft_cap, axis_name
):
    """The per-token losses (0 where ``where`` is False), before an
    out-of-range label's NaN, whether each label is in range, and the
    backward pass's row statistics ``(m, log_s)``."""
    local_labels, holds, in_range = _local_labels(labels, w, x, axis_name)
    m, s, target, total = _online_logsumexp(
        x, w, bias, local_labels, chunk_size, soft_cap, bool(label_smoothing)
    )
    # Across shards: one pmax, then the rescaled sums, the shifted target
    # (held by one shard) and the shifted sum of logits in one psum.
    m_all = pmax(m, axis_name)
    target = jnp.where(holds, target - m_all, 0)
    if label_smoothing:
        total = total + w.shape[1] * (m - m_all)
    s, target, total = psum((s * jnp.exp(m - m_all), target, total), axis_name)
    log_s = log_sum(s)
    valid, safe_log_s = split_empty(log_s)
    # (1 - a)(log_s - (z_y - m)) + a (log_s - mean(z - m)): each term >= 0, so
    # the loss is >= 0, and none carries the large m.
    # With label_smoothing 1 the target has no weight, also where its logit
    # is -inf (0 * -inf would be NaN), as in the per-example losses.
    loss = safe_log_s
    if label_smoothing < 1:
        loss = loss - (1 - label_smoothing) * target
    if label_smoothing:
        loss = loss - label_smoothing * total / _vocab(w, axis_name)
    if z_loss:
        loss = loss + z_loss * jnp.square(m_all + safe_log_s)
    # A token with no finite logit (a -inf bias on every column) has no loss,
    # whatever its label, as in the per-example losses.
    loss = jnp.where(valid, loss, 0)
    if where is not None:
        loss = jnp.where(where, loss, 0)
    return loss, in_range | ~valid, (m_all, log_s)


def _linear_cross_entropy_fwd(
    x, w, bias, labels, where, chunk_size, label_smoothing, z_loss, soft_cap, axis_name
):
    loss, in_range, (m, log_s) = _losses(
        x, w, bias, labels, where, chunk_size, label_smoothing, z_loss, soft_cap,
        axis_name,
    )  # fmt: skip
    if where is not None:
        in_range = in_range | ~where
    loss = jnp.where(in_range, loss, jnp.nan)
    return per_shard(loss, axis_name), (x, w, bias, labels, where, m, log_s)


# dz = g * ((1 + 2 z_loss L) * p - (1 - a) * onehot(y) - a / V) * cap'(z)
# dx = sum_chunks dz @ w_c.T;  dw_c = x.T @ dz;  dbias_c = sum(dz, tokens)
def _linear_cross_entropy_bwd(
    chunk_size, label_smoothing, z_loss, soft_cap, axis_name, res, g
):
    x, w, bias, labels, where, m, log_s = res
    local_labels, _, _ = _local_labels(labels, w, x, axis_name)
    # An out-of-range label's cotangent arrives NaN where it is not 0 (see
    # loud_labels).
    g = loss_cotangent(g.astype(acc(x)), axis_name)
    # Tokens with no finite logit get 0, whatever their label.
    valid, log_s = split_empty(log_s)
    g = jnp.where(valid, g, 0)
    if where is not None:
        g = jnp.where(where, g, 0)
    p_coef = (g * (1 + 2 * z_loss * (m + log_s)) if z_loss else g)[:, None]
    target_coef = (g * (1 - label_smoothing))[:, None]
    uniform = (g * label_smoothing / _vocab(w, axis_name))[:, None]
    # p = exp((z - m) - log_s): z - m is exact near the max, where z - L would
    # carry the rounding of a large L (see _cross_entropy.row_stats).
    m, log_s = m[:, None], log_s[:, None]
    # x transposed once, outside the loop: each chunk's dW then runs as a plain
    # matmul (XLA:CPU hands it to its fast kernel; x.T inside the loop was a
    # transposed-operand dot, about 12% slower). The barrier keeps it so where
    # the loop has one step and XLA unrolls it: folded back into the dot, the
    # transpose made a 16-bit x 16-bit -> float32 dot that XLA:CPU's runtime
    # does not implement.
    x_t = lax.optimization_barrier(x.T)

    def step(carry, start, size):
        dx, dw, db = carry
        z = _chunk_logits(x, w, bias, start, size, soft_cap)
        p = jnp.exp((z - m) - log_s)
        columns = start + lax.broadcasted_iota(local_labels.dtype, (1, size), 1)
        is_target = local_labels[:, None] == columns
        dz = p_coef * p - jnp.where(is_target, target_coef, 0)
        if label_smoothing:
            dz = dz - uniform
        dz = cap_grad(dz, z, soft_cap).astype(x.dtype)
        w_c = lax.dynamic_slice_in_dim(w, start, size, axis=1)
        # Contracts the chunk's columns: under an explicit mesh that shards
        # w's vocabulary, the parts are summed into x's sharding.
        dx = dx + jnp.dot(
            dz,
            w_c.T,
            preferred_element_type=acc(x),
            out_sharding=jax.typeof(x).sharding,
        )
        # Contracts the token axis: under an explicit mesh that shards tokens,
        # the parts are summed into w's sharding, as JAX's own dot transpose does.
        dw_c = jnp.dot(
            x_t, dz, preferred_element_type=acc(x), out_sharding=jax.typeof(w).sharding
        )
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(w.dtype), start, axis=1)
        if db is not None:
            db_c = jnp.sum(dz, axis=0, dtype=acc(x)).astype(db.dtype)
            db = lax.dynamic_update_slice_in_dim(db, db_c, start, axis=0)
        return (dx, dw, db), None

    carry = (
        jnp.zeros_like(x, acc(x)),
        jnp.zeros_like(w),
        None if bias is None else jnp.zeros_like(bias),
    )
    carry = varying_like(carry, x, w, bias)
    local = w.shape[1]
    starts, rest = _chunks(local, chunk_size)
    carry, _ = lax.scan(partial(step, size=chunk_size), carry, starts)
    if rest:
        carry, _ = step(carry, local - rest, rest)
    # Each shard's dx is its columns' part. With vocab-sharded w, x was marked
    # varying before this rule (or, without variation tracking, is a per-shard
    # argument), and JAX sums the parts where x is shared: no psum here.
    dx, dw, db = carry
    return dx.astype(x.dtype), dw, db, None, None


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def _linear_cross_entropy_tangent(statics, res, t_leaves):
    """Forward mode: JAX's own ``jax.jvp`` of the forward pass recomputed from
    the residuals, chunk by chunk, as the forward holds one chunk of logits.
    The tangent map derived from ``bwd`` (its transpose) stacked every
    chunk's probabilities, ``[B, V]``: the logits the fused loss never
    holds. An out-of-range label's tangent is finite, as ``bwd``'s is
    (:func:`loud_labels` makes it NaN where it is not 0)."""
    x, w, bias, labels, where, _, _ = res
    axis_name = statics[-1]

    def losses(x, w, *bias):
        loss, _, _ = _losses(x, w, *(bias or (None,)), labels, where, *statics)
        return per_shard(loss, axis_name)

    primals = (x, w) if bias is None else (x, w, bias)
    _, d_loss = jax.jvp(losses, primals, tuple(t_leaves))
    return [d_loss]


_linear_cross_entropy_forward_mode = _with_forward_mode(
    _linear_cross_entropy, tangent=_linear_cross_entropy_tangent, keep_traces=True
)

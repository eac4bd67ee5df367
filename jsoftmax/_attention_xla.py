"""The XLA block path of dot_product_attention (FlashAttention-2 as XLA loops
over blocks), and the block maths the Pallas kernels share with it."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jsoftmax._checks import compute_dtype, log_sum, shards

# Default block sizes, chosen by measurement: `python bench/attention.py
# --blocks` (bench/results/attention_blocks_cpu.md) times forward+backward at
# T = S = 1024 and 2048, B=1, N=8, H=64, float32, causal and not, for query x
# key blocks of 64x128 to 512x512 on a 2-core CPU (jax 0.10.2). 128x128 and
# 256x256 tied on full attention (0.57-0.65x jax.nn's time); 128x128 was the
# fastest causal one (0.31-0.38x against 0.33-0.45x: a smaller diagonal block
# wastes less), and it keeps the per-block temporaries small.
QUERY_CHUNK = 128
KEY_CHUNK = 128


# -- The block maths, one statement for this path and the Pallas kernels -------


def capped(x, soft_cap):
    """Scores under the soft cap, ``c tanh(x / c)``, and the ``tanh`` (None
    without a cap) that the backward's chain rule needs."""
    if soft_cap is None:
        return x, None
    cap = jnp.asarray(soft_cap, x.dtype)
    tanh = jnp.tanh(x / cap)
    return cap * tanh, tanh


def in_band(rows, cols, s, lower, upper):
    """Visible through the band ``lower <= col - row <= upper`` (causal mask,
    local window; None: unbounded) and the key padding ``col < s``."""
    valid = cols < s
    if lower is not None:
        valid = valid & (cols - rows >= lower)
    if upper is not None:
        valid = valid & (cols - rows <= upper)
    return valid


def online_step(m, total, o, x, row_max, weigh):
    """One block of the online softmax: the running max ``m``, sum ``total``
    and output ``o`` updated by the masked scores ``x`` (-inf where hidden);
    ``weigh(p)`` is ``p @ v`` in the caller's layout. ``m`` starts at the
    lowest finite value, so that a row with nothing visible yet keeps a
    finite max and ``exp(-inf - m) = 0``, not NaN."""
    m_new = jnp.maximum(m, row_max(x))
    p = jnp.exp(x - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    total = total * alpha + jnp.sum(p, axis=-1)
    return m_new, total, o * alpha[..., None] + weigh(p)


def finish_rows(m, total, o, sink):
    """The rows' output and logsumexp from the online softmax's state, with
    the sink logit (or None) in the denominator. ``total == 0``: the row sees
    no key; its output is 0 and its ``L`` is -inf."""
    if sink is not None:
        m_all = jnp.maximum(m, sink)
        shift = jnp.exp(m - m_all)
        o = o * shift[..., None]
        total_all = total * shift + jnp.exp(sink - m_all)
    else:
        m_all, total_all = m, total
    empty = total == 0
    # log_sum: no log(0) under the select (a NaN in reverse over reverse for a
    # row hidden by a -inf bias alone, whose entries all count as visible).
    lse = jnp.where(empty, -jnp.inf, m_all + log_sum(total_all))
    # Selected, not scaled: 0 * NaN (a value hidden from the row) is NaN.
    o = jnp.where(empty[..., None], 0, o / jnp.where(empty, 1, total_all)[..., None])
    return o, lse


def safe_lse(lse):
    """``L`` for recomputing ``P = exp(s - L)``: +inf where no key is visible
    (``L = -inf``), so that ``P = 0`` there whatever ``s`` is."""
    return jnp.where(lse == -jnp.inf, jnp.inf, lse)


def hidden_zero(dp, valid):
    """``dP`` with the hidden entries 0: a NaN or inf in a value hidden from
    every row of a block (the causal mask, a window, padded queries) would
    otherwise reach dS as ``0 * NaN``."""
    return dp if valid is None else jnp.where(valid, dp, 0)


def score_grad(p, dp, delta, tanh):
    """``dS = P (dP - D)``, the cotangent of the biased scores (the bias's
    gradient), and ``dS'``, that of ``q . k`` scaled (through the soft cap's
    ``1 - tanh^2``)."""
    ds = p * (dp - delta[..., None])
    return ds, ds if tanh is None else ds * (1 - tanh * tanh)


def sink_grad(sink, lse, delta):
    """``d sink = -sum_rows e^(sink - L) D`` per row (summed by the caller):
    the sink's probability times the softmax VJP's ``-D``."""
    # sink lines up with lse's last axes (no rank promotion: some users set
    # jax_numpy_rank_promotion="raise").
    sink = sink.reshape((1,) * (lse.ndim - sink.ndim) + sink.shape)
    # 0 where no key is visible, by L = +inf there rather than a select after
    # exp(sink - L) = inf: reverse mode of that select (second derivatives)
    # multiplied its zero cotangent by inf.
    weight = jnp.exp(sink - safe_lse(lse))
    return -weight * delta


def zero_past(x, lengths):
    """``x [B, L, ...]`` with the positions ``>= lengths[b]`` set to 0."""
    if lengths is None:
        return x
    pos = lax.broadcasted_iota(jnp.int32, x.shape[:2], 1)
    keep = pos < lengths[:, None]
    return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0)


# -- Block bookkeeping (static, NumPy) ----------------------------------------


def block_visibility(config, t, s):
    """``any[i, j]`` and ``all[i, j]``: does query block ``i`` see some / every
    real key of key block ``j`` through the band and the key padding?"""
    bq, bk = config.query_chunk, config.key_chunk
    nq, nk = -(-t // bq), -(-s // bk)
    i0 = np.arange(nq)[:, None] * bq
    i1 = np.minimum(i0 + bq, t) - 1
    j0 = np.arange(nk)[None, :] * bk
    j1 = j0 + bk - 1
    j1_real = np.minimum(j1, s - 1)
    lower = -np.inf if config.lower is None else config.lower
    upper = np.inf if config.upper is None else config.upper
    # key - query over the block runs from j0 - i1 to j1 - i0.
    any_ = (j0 - i1 <= upper) & (j1_real - i0 >= lower)
    all_ = (j1 == j1_real) & (j0 - i1 >= lower) & (j1 - i0 <= upper)
    return any_, all_ & any_


def ranges(any_):
    """Per row of the block matrix, the visible blocks ``[lo, hi)`` as int32
    arrays (the band makes them contiguous; ``lo = hi`` if none)."""
    lo, hi = [], []
    for seen in any_:
        idx = np.flatnonzero(seen)
        lo.append(int(idx[0]) if idx.size else 0)
        hi.append(int(idx[-1]) + 1 if idx.size else 0)
        assert seen[lo[-1] : hi[-1]].all()
    return np.array(lo, np.int32), np.array(hi, np.int32)


# -- Shared pieces --------------------------------------------------------------


def _acc(x):
    return compute_dtype(x.dtype)


def _grouped(x, k):
    """A bias or mask ``[B', N', T', S']`` as ``[B', K', G', T', S']``."""
    b_, n_, t_, s_ = x.shape
    if n_ == 1:
        return x.reshape(b_, 1, 1, t_, s_)
    return x.reshape(b_, k, n_ // k, t_, s_)


def _pad_axis(x, axis, size, value=0):
    if x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _block(x, axis_starts, sizes):
    """``x[..., i0:i0+bq, j0:j0+bk]`` on the axes where ``x`` is not 1."""
    starts = [np.int32(0)] * x.ndim
    shape = list(x.shape)
    for axis, start in axis_starts.items():
        if x.shape[axis] != 1:
            starts[axis] = start
            shape[axis] = sizes[axis]
    return lax.dynamic_slice(x, starts, shape)


@dataclasses.dataclass(frozen=True)
class _Context:
    """The arrays a block needs, padded and grouped, and the static sizes."""

    config: object  # the call's static options (_attention._Config)
    t: int
    s: int
    bias: jax.Array | None  # [B', K', G', Tp', Sp']
    mask: jax.Array | None
    q_len: jax.Array | None
    kv_len: jax.Array | None
    q_seg: jax.Array | None  # [B, Tp]
    kv_seg: jax.Array | None  # [B, Sp]


def _context(config, t, s, k, bias, mask, q_len, kv_len, q_seg, kv_seg):
    bq, bk = config.query_chunk, config.key_chunk
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk

    def prepare(x):
        if x is None:
            return None
        return _pad_axis(_pad_axis(_grouped(x, k), 3, tp), 4, sp)

    return _Context(
        config,
        t,
        s,
        prepare(bias),
        prepare(mask),
        q_len,
        kv_len,
        None if q_seg is None else _pad_axis(q_seg, 1, tp, -1),
        None if kv_seg is None else _pad_axis(kv_seg, 1, sp, -2),
    )


def _logits(ctx, qb, kb, i0, j0, structural):
    """One block's scores ``[B, K, G, bq, bk]`` in float32 (float64 for
    float64 inputs), the soft cap's tanh (or None) and the visible entries
    (or None if all are). ``structural``: apply the band and key padding."""
    config = ctx.config
    bq, bk = config.query_chunk, config.key_chunk
    x = jnp.einsum("bkgqh,bkch->bkgqc", qb, kb, preferred_element_type=_acc(qb))
    if not config.prescaled:
        x = x * jnp.asarray(config.scale, x.dtype)
    x, tanh = capped(x, config.soft_cap)
    sizes = (None, None, None, bq, bk)
    if ctx.bias is not None:
        x = x + _block(ctx.bias, {3: i0, 4: j0}, sizes).astype(x.dtype)
    valid = None

    def both(m):
        m = m.reshape((1,) * (x.ndim - m.ndim) + m.shape)  # as x: [B, K, G, bq, bk]
        return m if valid is None else valid & m

    if structural:
        rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        valid = both(in_band(rows, cols, ctx.s, config.lower, config.upper))
    if ctx.mask is not None:
        valid = both(_block(ctx.mask, {3: i0, 4: j0}, sizes))
    if ctx.q_len is not None:
        rows = i0 + lax.broadcasted_iota(jnp.int32, (1, bq, 1), 1)
        valid = both((rows < ctx.q_len[:, None, None])[:, None, None])
    if ctx.kv_len is not None:
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, 1, bk), 2)
        valid = both((cols < ctx.kv_len[:, None, None])[:, None, None])
    if ctx.q_seg is not None:
        qs = lax.dynamic_slice_in_dim(ctx.q_seg, i0, bq, axis=1)
        ks = lax.dynamic_slice_in_dim(ctx.kv_seg, j0, bk, axis=1)
        valid = both((qs[:, :, None] == ks[:, None, :])[:, None, None])
    return x, tanh, valid


@jax.custom_jvp
def _row_max(x):
    """The max over the last axis. Its tangent is the tangent of the entry
    at the argmax: jnp.max's JVP divides by the count of entries equal to the
    max, which is 0 (NaN tangents) where XLA rounds the fused scores
    differently in the two places it computes them. The shift needs a
    tangent at all only for precision: a tangent centred on the row's top
    entry keeps the 16-bit probabilities' tangents small."""
    return jnp.max(x, axis=-1)


@_row_max.defjvp
def _row_max_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    top = jnp.argmax(x, axis=-1)[..., None]
    return jnp.max(x, axis=-1), jnp.take_along_axis(dx, top, axis=-1)[..., 0]


def _visit_blocks(config, lo, hi, trips, body, carry, meets=None):
    """``body(j, carry)`` for the blocks ``lo <= j < hi`` (traced bounds) where
    ``meets(j)`` (None: all of them), in a loop of ``trips`` steps (static)
    whose other steps are skipped by a ``cond``. A static trip count makes
    the loop a scan, which reverse mode differentiates (second derivatives:
    ``jacrev(jacrev)``, ``grad`` of a gradient norm), where a ``fori_loop``
    over traced bounds is a ``while_loop`` it cannot; a skipped step costs
    one predicate."""

    def visit(j, carry, pred):
        if meets is not None:
            pred = meets(j) if pred is None else pred & meets(j)
        if pred is None:
            return body(j, carry)
        return lax.cond(_any_example(pred), partial(body, j), lambda c: c, carry)

    if not config.static_trips:
        return lax.fori_loop(lo, hi, lambda j, c: visit(j, c, None), carry)

    def step(n, carry):
        j = lo + lax.convert_element_type(n, lo.dtype)
        return visit(j, carry, j < hi)

    return lax.fori_loop(0, trips, step, carry)


def _segments_meet(ctx, i0, j0):
    """Can a query of the block at ``i0`` and a key of the block at ``j0``
    share a segment in some example? A block pair whose ids' ranges are
    apart in every example (packed sequences, away from the diagonal) is
    skipped, as the kernels skip it: only its cost changes, and what its
    values hold (NaN) no longer meets a probability of 0. None without
    segment ids."""
    if ctx.q_seg is None:
        return None
    bq, bk = ctx.config.query_chunk, ctx.config.key_chunk
    qs = lax.dynamic_slice_in_dim(ctx.q_seg, i0, bq, axis=1)
    ks = lax.dynamic_slice_in_dim(ctx.kv_seg, j0, bk, axis=1)
    return jnp.any(segments_meet(qs, i0, ctx.t, ks, j0, ctx.s))


def segments_meet(a, a0, a_len, b, b0, b_len):
    """Can an id of block ``a`` equal one of block ``b`` (their ranges
    overlap), per leading index? The blocks hold the ids of the positions
    ``a0, a0 + 1, ...`` along their last axis; only those before ``a_len``
    (``b_len``) count, so that the padding's ids (-1 and -2, which keep
    padded queries and keys apart) do not widen a range."""
    lo_a, hi_a = _id_range(a, a0, a_len)
    lo_b, hi_b = _id_range(b, b0, b_len)
    return (lo_a <= hi_b) & (lo_b <= hi_a)


def _id_range(ids, start, length):
    """The least and greatest of ``ids`` over the last axis among positions
    before ``length`` (a block holds at least one)."""
    real = start + lax.broadcasted_iota(jnp.int32, ids.shape, ids.ndim - 1) < length
    info = jnp.iinfo(ids.dtype)
    top, bottom = np.array(info.max, ids.dtype), np.array(info.min, ids.dtype)
    return (
        jnp.min(jnp.where(real, ids, top), axis=-1),
        jnp.max(jnp.where(real, ids, bottom), axis=-1),
    )


def _meets_keys(ctx, i0):
    """The per-key-block predicate of a query block (None: all meet)."""
    if ctx.q_seg is None:
        return None
    return lambda j: _segments_meet(ctx, i0, j * ctx.config.key_chunk)


@jax.custom_batching.custom_vmap
def _any_example(pred):
    """``pred``, or under ``vmap`` whether it holds for any example: a block
    that only some examples visit (their lengths differ) is computed for all,
    its masks hiding it from the others. A ``cond`` on a batched predicate
    would compute both branches at every step, and reverse mode of that
    (second derivatives) fails in JAX (0.10.2) on the ``stop_gradient`` it
    puts on the branches' operands."""
    return pred


@_any_example.def_vmap
def _any_example_vmap(axis_size, in_batched, pred):
    (batched,) = in_batched
    return _any_example(jnp.any(pred) if batched else pred), False


def _dynamic_bounds(ctx, outer_start, lo, hi, outer_is_query):
    """Narrows a block range by the longest sequence lengths (traced)."""
    config = ctx.config
    inner_len = ctx.kv_len if outer_is_query else ctx.q_len
    outer_len = ctx.q_len if outer_is_query else ctx.kv_len
    inner_block = config.key_chunk if outer_is_query else config.query_chunk
    inner_size = ctx.s if outer_is_query else ctx.t
    # initial=0: a batch of 0 has no longest length. The length is capped at
    # the sequence before rounding up to blocks, where int32's max would wrap.
    if inner_len is not None:
        longest = jnp.minimum(jnp.max(inner_len, initial=0), inner_size)
        hi = jnp.minimum(hi, (longest + inner_block - 1) // inner_block)
    if outer_len is not None:
        longest = jnp.max(outer_len, initial=0)
        hi = jnp.where(outer_start >= longest, lo, hi)
    return lo, jnp.maximum(hi, lo)


# -- The rule -------------------------------------------------------------------


def forward(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config):
    """``(out [B, T, N, H], lse [B, K, G, T])`` by the block loops."""
    batch, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = config.query_chunk, config.key_chunk
    nq = -(-t // bq)
    tp, sp = nq * bq, -(-s // bk) * bk
    ctx = _context(config, t, s, kh, bias, mask, q_len, kv_len, q_seg, kv_seg)
    qg, kg, vg = _layout(q, k, v, ctx, tp, sp)
    acc = _acc(q)
    any_, all_ = block_visibility(config, t, s)
    lo, hi = ranges(any_)
    trips = int((hi - lo).max(initial=0))
    # One loop body for every block: with a mask where some visited block is
    # partly hidden (the diagonal of a causal mask, a window's edges, the
    # last block of keys when S is not a multiple). Measured: computing the
    # mask in every block cost no time against a separate unmasked loop over
    # the inner blocks (the exp dominates), and a single body halves the
    # compile time.
    structural = bool((any_ & ~all_).any())

    def query_block(_, xs):
        i, lo, hi = xs
        i0 = i * bq
        qb = lax.dynamic_slice_in_dim(qg, i0, bq, axis=3)

        def step(j, carry):
            m, total, o = carry
            j0 = j * bk
            kb = lax.dynamic_slice_in_dim(kg, j0, bk, axis=2)
            vb = lax.dynamic_slice_in_dim(vg, j0, bk, axis=2)
            x, _, valid = _logits(ctx, qb, kb, i0, j0, structural)
            if valid is not None:
                x = jnp.where(valid, x, -jnp.inf)

            def weigh(p):
                return jnp.einsum(
                    "bkgqc,bkch->bkgqh",
                    p.astype(v.dtype),
                    vb,
                    preferred_element_type=acc,
                )

            return online_step(m, total, o, x, _row_max, weigh)

        # Carries made from the query block: sharded (explicit mesh) and
        # varying (shard_map) as the loop body's results are.
        row = jnp.zeros_like(qb[..., 0], acc)  # [B, K, G, bq]
        carry = (
            jnp.full_like(row, jnp.finfo(acc).min),
            row,
            jnp.zeros_like(qb, acc),
        )
        lo, hi = _dynamic_bounds(ctx, i0, lo, hi, True)
        meets = _meets_keys(ctx, i0)
        m, total, o = _visit_blocks(config, lo, hi, trips, step, carry, meets)
        sink = None
        if sinks is not None:
            sink = reshape(sinks.astype(acc), (1, kh, g, 1), sinks, (None, 0, 0, None))
        o, lse = finish_rows(m, total, o, sink)
        return None, (o.astype(acc if config.partials else q.dtype), lse)

    xs = (jnp.arange(nq, dtype=jnp.int32), jnp.asarray(lo), jnp.asarray(hi))
    _, (o, lse) = lax.scan(query_block, None, xs)
    # [nq, B, K, G, bq, H] -> [B, T, N, H];  [nq, B, K, G, bq] -> [B, K, G, T]
    out = o.transpose(1, 0, 4, 2, 3, 5)
    out = reshape(out, (batch, tp, n, h), q, (0, 1, 2, 3))[:, :t]
    lse = lse.transpose(1, 2, 3, 0, 4)
    lse = reshape(lse, (batch, kh, g, tp), q, (0, 2, 2, 1))[..., :t]
    return out, lse


def _layout(q, k, v, ctx, tp, sp):
    """q as ``[B, K, G, Tp, H]`` (scaled when ``config.prescaled``), k and v
    as ``[B, K, Sp, H]``, zero-padded to whole blocks, with the queries past
    ``query_seq_lengths`` and the keys and values past
    ``key_value_seq_lengths`` zeroed: whatever they hold (a KV cache's
    unwritten NaN tail) never meets a probability of 0 in a matmul, whichever
    blocks the schedule visits."""
    batch, t, n, h = q.shape
    kh = k.shape[2]
    q, k, v = (
        zero_past(q, ctx.q_len),
        zero_past(k, ctx.kv_len),
        zero_past(v, ctx.kv_len),
    )
    qg = reshape(q, (batch, t, kh, n // kh, h), q, (0, 1, 2, 2, 3))
    qg = qg.transpose(0, 2, 3, 1, 4)
    if ctx.config.prescaled:
        qg = qg * jnp.asarray(ctx.config.scale, qg.dtype)
    qg = _pad_axis(qg, 3, tp)
    kg = _pad_axis(k.transpose(0, 2, 1, 3), 2, sp)
    vg = _pad_axis(v.transpose(0, 2, 1, 3), 2, sp)
    return qg, kg, vg


def _exact_delta(ctx, qg, kg, vg, dog, lse_safe, any_, all_):
    """``D = rowsum(P * dP)`` from the recomputed blocks, a pass over the
    visible blocks before the backward's: the exact softmax VJP of the
    recomputed ``P`` (``rowsum(dS) = 0``), where ``rowsum(dO * O)`` differs from
    it by the rounding of the forward's output."""
    config = ctx.config
    bq, bk = config.query_chunk, config.key_chunk
    acc = _acc(qg)
    lo, hi = ranges(any_)
    trips = int((hi - lo).max(initial=0))
    structural = bool((any_ & ~all_).any())

    def query_block(_, xs):
        i, lo, hi = xs
        i0 = i * bq
        qb = lax.dynamic_slice_in_dim(qg, i0, bq, axis=3)
        dob = lax.dynamic_slice_in_dim(dog, i0, bq, axis=3)
        lb = lax.dynamic_slice_in_dim(lse_safe, i0, bq, axis=3)

        def step(j, d):
            j0 = j * bk
            kb = lax.dynamic_slice_in_dim(kg, j0, bk, axis=2)
            vb = lax.dynamic_slice_in_dim(vg, j0, bk, axis=2)
            x, _, valid = _logits(ctx, qb, kb, i0, j0, structural)
            if valid is not None:
                x = jnp.where(valid, x, -jnp.inf)
            p = jnp.exp(x - lb[..., None])
            dp = jnp.einsum("bkgqh,bkch->bkgqc", dob, vb, preferred_element_type=acc)
            return d + jnp.sum(p * hidden_zero(dp, valid), axis=-1)

        lo, hi = _dynamic_bounds(ctx, i0, lo, hi, True)
        zeros = jnp.zeros_like(qb[..., 0], acc)
        d = _visit_blocks(config, lo, hi, trips, step, zeros, _meets_keys(ctx, i0))
        return None, d

    xs = (jnp.arange(len(lo), dtype=jnp.int32), jnp.asarray(lo), jnp.asarray(hi))
    _, d = lax.scan(query_block, None, xs)
    # [nq, B, K, G, bq] -> [B, K, G, Tp]
    d = d.transpose(1, 2, 3, 0, 4)
    return d.reshape(d.shape[:3] + (-1,))


# P = exp(s - L);  D = rowsum(dO * O);  dS = P * (dP - D) with dP = dO V^T
# dV = P^T dO;  dQ = dS' K * scale;  dK = dS'^T Q * scale;  dbias = dS
# (dS' = dS * (1 - tanh^2) under the soft cap);  dsink = -sum_rows e^(sink-L) D
def backward(config, res, d_out):
    """The cotangents of the rule's ten array arguments, by the block loops."""
    q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, out, lse = res
    batch, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = config.query_chunk, config.key_chunk
    tp, nk = -(-t // bq) * bq, -(-s // bk)
    sp = nk * bk
    ctx = _context(config, t, s, kh, bias, mask, q_len, kv_len, q_seg, kv_seg)
    acc = _acc(q)
    qg, kg, vg = _layout(q, k, v, ctx, tp, sp)
    # Padded queries' outputs are constant 0: their cotangents count nothing.
    d_out = zero_past(d_out, ctx.q_len)
    dog = reshape(d_out, (batch, t, kh, g, h), q, (0, 1, 2, 2, 3))
    dog = _pad_axis(dog.transpose(0, 2, 3, 1, 4), 3, tp).astype(q.dtype)
    og = reshape(out, (batch, t, kh, g, h), q, (0, 1, 2, 2, 3))
    og = og.transpose(0, 2, 3, 1, 4)
    # D in float32, from the output as returned.
    delta = jnp.einsum(
        "bkgth,bkgth->bkgt", dog[..., :t, :], og, preferred_element_type=acc
    )
    # Rows with nothing visible (L = -inf) and padded rows get L = +inf, so
    # that exp(s - L) = 0 there whatever s is.
    lse_safe = _pad_axis(safe_lse(lse), 3, tp, jnp.inf)
    any_, all_ = block_visibility(config, t, s)
    if config.exact_delta:
        delta = _exact_delta(ctx, qg, kg, vg, dog, lse_safe, any_, all_)[..., :t]
    delta_p = _pad_axis(delta, 3, tp)
    lo, hi = ranges(any_.T)
    trips = int((hi - lo).max(initial=0))
    structural = bool((any_ & ~all_).any())

    def key_block(carry, xs):
        d_q, d_bias = carry
        j, lo, hi = xs
        j0 = j * bk
        kb = lax.dynamic_slice_in_dim(kg, j0, bk, axis=2)
        vb = lax.dynamic_slice_in_dim(vg, j0, bk, axis=2)
        kv_sharding = jax.typeof(kb).sharding

        def step(i, carry):
            d_k, d_v, d_q, d_bias = carry
            i0 = i * bq
            qb = lax.dynamic_slice_in_dim(qg, i0, bq, axis=3)
            dob = lax.dynamic_slice_in_dim(dog, i0, bq, axis=3)
            lb = lax.dynamic_slice_in_dim(lse_safe, i0, bq, axis=3)
            db = lax.dynamic_slice_in_dim(delta_p, i0, bq, axis=3)
            x, tanh, valid = _logits(ctx, qb, kb, i0, j0, structural)
            if valid is not None:
                x = jnp.where(valid, x, -jnp.inf)
            p = jnp.exp(x - lb[..., None])
            # dK and dV contract the query heads of a group and the queries:
            # under an explicit mesh that shards them (multi-query attention
            # with sharded heads), the parts are summed into k's sharding.
            d_v = d_v + jnp.einsum(
                "bkgqc,bkgqh->bkch",
                p.astype(q.dtype),
                dob,
                preferred_element_type=acc,
                out_sharding=kv_sharding,
            )
            dp = jnp.einsum("bkgqh,bkch->bkgqc", dob, vb, preferred_element_type=acc)
            d_scores, ds = score_grad(p, hidden_zero(dp, valid), db, tanh)
            if d_bias is not None:
                d_bias = _add_block(d_bias, d_scores, i0, j0, config)
            ds = ds.astype(q.dtype)
            d_k = d_k + jnp.einsum(
                "bkgqc,bkgqh->bkch",
                ds,
                qb,
                preferred_element_type=acc,
                out_sharding=kv_sharding,
            )
            dq_b = jnp.einsum("bkgqc,bkch->bkgqh", ds, kb, preferred_element_type=acc)
            dq_b = dq_b + lax.dynamic_slice_in_dim(d_q, i0, bq, axis=3)
            d_q = lax.dynamic_update_slice_in_dim(d_q, dq_b, i0, axis=3)
            return d_k, d_v, d_q, d_bias

        zeros = jnp.zeros_like(kb, acc)  # typed as the loop body's results
        lo, hi = _dynamic_bounds(ctx, j0, lo, hi, False)
        carry = (zeros, zeros, d_q, d_bias)
        meets = None
        if ctx.q_seg is not None:
            meets = lambda i: _segments_meet(ctx, i * bq, j0)  # noqa: E731
        d_k, d_v, d_q, d_bias = _visit_blocks(config, lo, hi, trips, step, carry, meets)
        return (d_q, d_bias), (d_k, d_v)

    d_bias = None
    if ctx.bias is not None:
        d_bias = jnp.zeros_like(ctx.bias, acc)
    xs = (jnp.arange(nk, dtype=jnp.int32), jnp.asarray(lo), jnp.asarray(hi))
    carry = (jnp.zeros_like(qg, acc), d_bias)
    (d_q, d_bias), (d_k, d_v) = lax.scan(key_block, carry, xs)

    scale = jnp.asarray(config.scale, acc)
    # [B, K, G, Tp, H] -> [B, T, N, H];  [nk, B, K, bk, H] -> [B, S, K, H]
    d_q = (d_q * scale).transpose(0, 3, 1, 2, 4)
    d_q = reshape(d_q, (batch, tp, n, h), q, (0, 1, 2, 3))[:, :t]
    if not config.prescaled:
        d_k = d_k * scale
    d_k = reshape(d_k.transpose(1, 0, 3, 2, 4), (batch, sp, kh, h), k, (0, 1, 2, 3))
    d_v = reshape(d_v.transpose(1, 0, 3, 2, 4), (batch, sp, kh, h), k, (0, 1, 2, 3))
    d_k, d_v = d_k[:, :s], d_v[:, :s]
    if d_bias is not None:
        d_bias = d_bias[:, :, :, : bias.shape[2], : bias.shape[3]]
        d_bias = d_bias.reshape(bias.shape)
        d_bias = d_bias if config.partials else d_bias.astype(bias.dtype)
    d_sinks = None
    if sinks is not None:
        sink = reshape(sinks.astype(acc), (1, kh, g, 1), sinks, (None, 0, 0, None))
        d_sink = jnp.sum(sink_grad(sink, lse, delta), axis=(0, 3))
        d_sinks = reshape(d_sink, (n,), sinks, (0,))
        d_sinks = d_sinks.astype(sinks.dtype)
    if not config.partials:
        d_q, d_k, d_v = d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)
    return d_q, d_k, d_v, d_bias, d_sinks


def _add_block(d_bias, ds, i0, j0, config):
    """Adds a block's dS, summed over the axes the bias broadcasts, into the
    bias gradient's matching block."""
    axes = tuple(i for i in range(3) if d_bias.shape[i] == 1 and ds.shape[i] != 1)
    axes += tuple(i for i in (3, 4) if d_bias.shape[i] == 1)
    part = jnp.sum(ds, axis=axes, keepdims=True)
    sizes = (None, None, None, config.query_chunk, config.key_chunk)
    starts = {3: i0, 4: j0}
    current = _block(d_bias, starts, sizes)
    index = [np.int32(0)] * 5
    for axis, start in starts.items():
        if d_bias.shape[axis] != 1:
            index[axis] = start
    return lax.dynamic_update_slice(d_bias, current + part, index)


def reshape(x, shape, like, dims):
    """``x.reshape(shape)``, sharded (under an explicit mesh) on each new axis
    ``i`` as ``like`` is on its axis ``dims[i]`` (None: not sharded): JAX does
    not infer the sharding of a reshape that merges or splits axes next to a
    sharded one. An axis of ``like`` split in two (heads into key/value heads
    and groups) shards the first part its shards divide."""
    sharding = jax.typeof(like).sharding
    spec = tuple(sharding.spec) + (None,) * (like.ndim - len(sharding.spec))
    out, used = [], set()
    for size, d in zip(shape, dims, strict=True):
        entry = None if d is None or d in used else spec[d]
        if entry is not None and size % shards(entry, sharding.mesh) == 0:
            used.add(d)
        else:
            entry = None
        out.append(entry)
    return lax.reshape(x, shape, out_sharding=sharding.update(spec=P(*out)))

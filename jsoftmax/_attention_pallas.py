"""Pallas kernels of dot_product_attention (FlashAttention-2): the forward
(output and logsumexp), and the backward's dK/dV (one program per key block)
and dQ (one program per query block). They lower through Triton for a CUDA
GPU; on other platforms they run in Pallas interpret mode (tests).

The masks, soft cap, online softmax and sinks are the XLA path's statements
(``_attention_xla``), applied to one block of refs."""

from __future__ import annotations

import dataclasses
import inspect
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jsoftmax import _attention_xla as xla

_MIN_BLOCK = 16  # Triton's smallest dot operand
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel's launch: its (query, key) block, and Triton's warps and
    software-pipeline stages."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


# Each kernel's launch by input width (float32 or 16-bit) and padded head dim
# (16 and 32 take 64's), where the call names no chunk sizes (chunk sizes
# replace the blocks and keep the warps and stages). Of a few candidates,
# largest blocks first, each is the first that Triton 3.9 compiles for an
# H100/H200 (sm_90a) with no register spilled, no stack frame and within the
# 227 KiB of shared memory one block may use, in each of seven calls: no
# option; causal, soft cap, a full bias or a two-sided window alone;
# grouped-query heads with a full mask and bias, a window and soft cap; and
# every option at once. What spills does not grow with the options, so other
# mixes can still spill a few bytes. A spilling kernel runs out of local
# memory, and one over the shared memory limit does not launch. Measured on a
# CPU by bench/triton_sm90.py (bench/results/triton_sm90_cpu.md, which lists
# what the other candidates spill) and asserted by tests/test_triton_sm90.py;
# which launch that fits is fastest needs a GPU (bench/gpu.sh times chunk
# sizes).
LAUNCHES = {
    ("forward", False, 64): Launch(128, 64, 8, 2),
    ("forward", False, 128): Launch(128, 64, 8, 2),
    ("forward", False, 256): Launch(64, 32, 8, 2),
    ("dkv", False, 64): Launch(128, 64, 8, 2),
    ("dkv", False, 128): Launch(32, 64, 8, 2),
    ("dkv", False, 256): Launch(16, 32, 8, 2),
    ("dq", False, 64): Launch(128, 64, 8, 2),
    ("dq", False, 128): Launch(64, 64, 8, 2),
    ("dq", False, 256): Launch(32, 64, 8, 2),
    # float32: exact products (no TF32) are FMA loops, not tensor-core dots,
    # and hold more registers; with a second stage most backward kernels spill.
    ("forward", True, 64): Launch(16, 32, 8, 1),
    ("forward", True, 128): Launch(32, 32, 8, 2),
    ("forward", True, 256): Launch(32, 32, 8, 2),
    ("dkv", True, 64): Launch(16, 16, 8, 1),
    ("dkv", True, 128): Launch(16, 16, 4, 1),
    ("dkv", True, 256): Launch(16, 32, 8, 1),
    ("dq", True, 64): Launch(64, 32, 8, 2),
    ("dq", True, 128): Launch(16, 32, 8, 1),
    ("dq", True, 256): Launch(16, 16, 4, 1),
}
_LARGEST_BLOCK = max(max(x.block_q, x.block_k) for x in LAUNCHES.values())


def launch(kernel, dtype, head_dim):
    """The :data:`LAUNCHES` entry of ``kernel`` for inputs of ``dtype`` and a
    padded ``head_dim``."""
    return LAUNCHES[kernel, jnp.dtype(dtype) == jnp.float32, max(64, head_dim)]


def unsupported(dtype, head_dim, query_chunk_size, key_chunk_size, shapes=()):
    """Why the kernels cannot run a call (a message naming the option), or
    None. Every attention option is supported; these are the limits of the
    Triton dots and grids (``shapes``: the inputs' shapes)."""
    if not all(isinstance(d, int) for shape in shapes for d in shape):
        return (
            "symbolic shapes (jax.export shape polymorphism: the Triton grid is static)"
        )
    if jnp.dtype(dtype) == jnp.float64:
        return "float64 inputs (the Triton dots are float32, 16-bit or 8-bit)"
    if head_dim > _MAX_HEAD_DIM:
        return f"a head dim H of {head_dim} (the kernels hold H <= {_MAX_HEAD_DIM})"
    for what, size in (("query_chunk_size", query_chunk_size),
                       ("key_chunk_size", key_chunk_size)):  # fmt: skip
        if size is not None and (size < _MIN_BLOCK or size & (size - 1)):
            return (
                f"{what}={size} (the kernels' blocks are powers of two, at least "
                f"{_MIN_BLOCK})"
            )
    return None


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a kernel needs to know, static: sizes, options, which optional
    inputs there are and which of their axes are full (not broadcast)."""

    t: int
    s: int
    groups: int  # query heads per key/value head
    scale: float
    soft_cap: float | None
    lower: int | None
    upper: int | None
    bias: tuple | None  # per axis of [B, N, T, S]: full (True) or broadcast
    mask: tuple | None
    q_len: bool
    kv_len: bool
    segments: bool
    precision: lax.Precision | None

    def dot(self, a, b, transpose_b=False):
        """``a @ b`` (``a @ b.T``), accumulated in float32; exact float32
        products for float32 inputs (no TF32)."""
        dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
        return lax.dot_general(
            a, b, dims, precision=self.precision, preferred_element_type=jnp.float32
        )


def _blocks(config, t_pad, s_pad, tuned):
    """A kernel's (query, key) block: the call's chunk sizes where it names
    them, else the kernel's launch ``tuned``, at most the padded lengths."""
    bq = config.kernel_query_chunk or tuned.block_q
    bk = config.kernel_key_chunk or tuned.block_k
    return min(bq, t_pad), min(bk, s_pad)


def _padded(n, config_chunk):
    """A sequence length padded to whole blocks of every kernel: a power of
    two below the largest default block, a multiple of it above."""
    top = config_chunk or _LARGEST_BLOCK
    if n >= top:
        return -(-n // top) * top
    return max(_MIN_BLOCK, pl.next_power_of_2(n))


def _pad(x, axis, size, value=0):
    """``x`` padded with ``value`` to ``size`` on ``axis`` (None stays None)."""
    if x is None or x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _pad_scores(x, tp, sp):
    """A bias or mask ``[B', N', T', S']`` padded on its sequence axes, except
    where they broadcast (size 1)."""
    if x is None:
        return None
    if x.shape[2] != 1:
        x = _pad(x, 2, tp)
    return x if x.shape[3] == 1 else _pad(x, 3, sp)


def _out(shape, dtype, like):
    """An output's ShapeDtypeStruct, varying over the mesh axes of an
    enclosing ``shard_map`` as ``like`` does (Pallas needs it said under
    ``check_vma=True``)."""
    aval = jax.typeof(like)
    if "manual_axis_type" in _SDS_PARAMETERS and hasattr(aval, "mat"):
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.mat)
    if "vma" in _SDS_PARAMETERS:
        return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
    return jax.ShapeDtypeStruct(shape, dtype)


_SDS_PARAMETERS = inspect.signature(jax.ShapeDtypeStruct).parameters


def _dtype(x, config):
    """An output's dtype: ``x``'s, or float32 for context parallelism's
    partials (``config.partials``)."""
    return jnp.float32 if config.partials else x.dtype


def _compiler_params(tuned):
    return plt.CompilerParams(num_warps=tuned.num_warps, num_stages=tuned.num_stages)


# -- One block's scores, shared by the three kernels --------------------------


def _band_bounds(spec, start, size, n_inner, inner_block, rows_outer):
    """The inner blocks ``[lo, hi)`` that the band can show to an outer block
    of ``size`` positions from ``start`` (traced): key blocks for a query
    block (``rows_outer``), query blocks for a key block."""
    lower, upper = (spec.lower, spec.upper)
    if not rows_outer:  # row - col lies in [-upper, -lower]
        lower, upper = (None if upper is None else -upper,
                        None if lower is None else -lower)  # fmt: skip
    # int32 throughout (Python ints would be int64 under x64, and lax.div
    # does not promote).
    block = jnp.int32(inner_block)
    lo, hi = jnp.int32(0), jnp.int32(n_inner)
    if lower is not None:
        # At most n_inner: with T > S a window's first key block can lie past
        # the keys, and the dQ kernel zeroes the blocks before lo.
        lo = jnp.minimum(lax.div(jnp.maximum(start + lower, 0), block), hi)
    if upper is not None:
        top = start + size - 1 + upper
        hi = jnp.minimum(
            hi, jnp.where(top < 0, 0, lax.div(jnp.maximum(top, 0), block) + 1)
        )
    return lo, hi


def _length_bounds(lo, hi, inner_len, inner_block, outer_len, outer_start):
    """Narrows ``[lo, hi)`` by the sequence lengths of this batch entry: the
    inner blocks past the inner length, and all of them where the outer
    block lies past the outer length."""
    if inner_len is not None:
        inner = jnp.maximum(inner_len, 0)
        block = jnp.int32(inner_block)
        # The blocks that hold a position below the length, rounded up
        # without adding (a length near int32's max would wrap).
        blocks = lax.div(inner, block) + (lax.rem(inner, block) > 0).astype(jnp.int32)
        hi = jnp.minimum(hi, blocks)
    if outer_len is not None:
        hi = jnp.where(outer_start >= outer_len, lo, hi)
    return lo, jnp.maximum(hi, lo)


def _tile(ref, lead, rows, cols, full_rows, full_cols):
    """A bias or mask block: ``ref[lead, rows, cols]`` on the axes that are
    not broadcast (``rows``/``cols``: a ``pl.ds`` or None for the whole
    block)."""
    index = () if lead is None else (lead,)
    index += (rows if full_rows and rows is not None else slice(None),)
    index += (cols if full_cols and cols is not None else slice(None),)
    return ref[index]


def _scores(spec, r, q, k, i0, j0, bq, bk, head, q_seg, rows_sliced):
    """The block's scores ``[bq, bk]`` (float32), masked to -inf where hidden,
    the soft cap's ``tanh``, and which entries are visible. ``rows_sliced``:
    the bias and mask refs hold every query (dK/dV) and are sliced at ``i0``;
    else the key axis is sliced at ``j0``. ``head``: the query head within
    the refs' group axis (None: the refs have no group axis)."""
    x = spec.dot(q, k, transpose_b=True) * jnp.float32(spec.scale)
    x, tanh = xla.capped(x, spec.soft_cap)
    rows = i0 + jnp.arange(bq, dtype=jnp.int32)[:, None]
    cols = j0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
    rs = pl.ds(i0, bq) if rows_sliced else None
    cs = None if rows_sliced else pl.ds(j0, bk)
    if spec.bias is not None:
        lead = None if head is None else (head if spec.bias[1] else 0)
        b = _tile(r["bias"], lead, rs, cs, spec.bias[2], spec.bias[3])
        x = x + b.astype(jnp.float32)
    valid = xla.in_band(rows, cols, spec.s, spec.lower, spec.upper)
    if spec.mask is not None:
        lead = None if head is None else (head if spec.mask[1] else 0)
        shown = _tile(r["mask"], lead, rs, cs, spec.mask[2], spec.mask[3])
        valid = valid & (shown != 0)
    if spec.q_len:
        valid = valid & (rows < r["q_len"][...])
    if spec.kv_len:
        valid = valid & (cols < r["kv_len"][...])
    if spec.segments:
        kv_seg = r["kv_seg"][pl.ds(j0, bk)] if not rows_sliced else r["kv_seg"][...]
        valid = valid & (q_seg[:, None] == kv_seg[None, :])
    return jnp.where(valid, x, -jnp.inf), tanh, valid


def _segments_meet(spec, q_seg, i0, kv_seg, j0):
    """Can a query of the block at ``i0`` share a segment with a key of the
    block at ``j0`` (the ranges of their ids, padding aside, overlap)? A
    block pair whose ranges are apart is skipped."""
    return xla.segments_meet(q_seg, i0, spec.t, kv_seg, j0, spec.s)


def _visit(lo, hi, meets, body, carry, skipped=None):
    """``body(j, carry)`` for ``lo <= j < hi`` where ``meets(j)`` (None:
    always); ``skipped(j, carry)`` runs instead where it does not."""
    if meets is None:
        return lax.fori_loop(lo, hi, body, carry)

    def step(j, carry):
        other = skipped or (lambda _, c: c)
        return lax.cond(meets(j), partial(body, j), partial(other, j), carry)

    return lax.fori_loop(lo, hi, step, carry)


# -- Forward -------------------------------------------------------------------


def _forward_kernel(*refs, names, spec, bq, bk, nk):
    r = dict(zip(names, refs, strict=True))
    i = pl.program_id(2)
    i0 = i * bq
    q = r["q"][...]
    q_seg = r["q_seg"][...] if spec.segments else None
    lo, hi = _band_bounds(spec, i0, bq, nk, bk, rows_outer=True)
    lo, hi = _length_bounds(
        lo, hi, r["kv_len"][...] if spec.kv_len else None, bk,
        r["q_len"][...] if spec.q_len else None, i0,
    )  # fmt: skip

    def step(j, carry):
        m, total, o = carry
        j0 = j * bk
        k = r["k"][pl.ds(j0, bk), :]
        v = r["v"][pl.ds(j0, bk), :]
        x, _, _ = _scores(spec, r, q, k, i0, j0, bq, bk, None, q_seg, rows_sliced=False)

        def weigh(p):
            return spec.dot(p.astype(v.dtype), v)

        return xla.online_step(m, total, o, x, partial(jnp.max, axis=-1), weigh)

    meets = None
    if spec.segments:
        meets = lambda j: _segments_meet(  # noqa: E731
            spec, q_seg, i0, r["kv_seg"][pl.ds(j * bk, bk)], j * bk
        )
    h = q.shape[-1]
    carry = (
        jnp.full((bq,), jnp.finfo(jnp.float32).min, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, h), jnp.float32),
    )
    m, total, o = _visit(lo, hi, meets, step, carry)
    sink = r["sinks"][...] if "sinks" in r else None
    o, lse = xla.finish_rows(m, total, o, sink)
    r["o"][...] = o.astype(r["o"].dtype)
    r["lse"][...] = lse


def forward(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config,
            interpret=False):  # fmt: skip
    """``(out [B, T, N, H], lse [B, K, G, T])``, the XLA path's contract."""
    call = _Call(q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, config)
    spec, (batch, tp, n, hp), kh = call.spec, call.q.shape, call.k.shape[2]
    g = spec.groups
    tuned = launch("forward", call.q.dtype, hp)
    bq, bk = _blocks(config, call.tp, call.sp, tuned)
    nq, nk = call.tp // bq, -(-spec.s // bk)
    operands, names, specs = call.inputs(True, bq, bk)
    if sinks is not None:
        operands.append(sinks.astype(jnp.float32))
        names.append("sinks")
        specs.append(pl.BlockSpec((None,), lambda b, h, i: (h,)))
    o, lse = pl.pallas_call(
        partial(
            _forward_kernel,
            names=tuple(names) + ("o", "lse"),
            spec=spec,
            bq=bq,
            bk=bk,
            nk=nk,
        ),  # fmt: skip
        grid=(batch, n, nq),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, hp), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            _out(call.q.shape, _dtype(q, config), call.q),
            _out((batch, n, tp), jnp.float32, call.q),
        ],
        compiler_params=_compiler_params(tuned),
        interpret=interpret,
        name="jsoftmax_attention_forward",
    )(*operands)
    t, h = spec.t, q.shape[-1]
    return o[:, :t, :, :h], lse[:, :, :t].reshape(batch, kh, g, t)


# -- Backward ------------------------------------------------------------------


def _dkv_kernel(*refs, names, spec, bq, bk, nq):
    r = dict(zip(names, refs, strict=True))
    j = pl.program_id(2)
    j0 = j * bk
    k = r["k"][pl.ds(j0, bk), :]
    v = r["v"][pl.ds(j0, bk), :]
    kv_seg = r["kv_seg"][...] if spec.segments else None
    lo, hi = _band_bounds(spec, j0, bk, nq, bq, rows_outer=False)
    lo, hi = _length_bounds(
        lo, hi, r["q_len"][...] if spec.q_len else None, bq,
        r["kv_len"][...] if spec.kv_len else None, j0,
    )  # fmt: skip
    hi = jnp.where(j0 >= spec.s, lo, hi)  # a block of key padding only

    def head(g, carry):
        def step(i, carry):
            d_k, d_v = carry
            i0 = i * bq
            rows = pl.ds(i0, bq)
            q = r["q"][rows, g, :]
            do = r["do"][rows, g, :]
            q_seg = r["q_seg"][rows] if spec.segments else None
            x, tanh, valid = _scores(
                spec, r, q, k, i0, j0, bq, bk, g, q_seg, rows_sliced=True
            )
            p = jnp.exp(x - r["lse"][g, rows][:, None])
            d_v = d_v + spec.dot(p.astype(do.dtype).T, do)
            dp = xla.hidden_zero(spec.dot(do, v, transpose_b=True), valid)
            _, ds = xla.score_grad(p, dp, r["delta"][g, rows], tanh)
            return d_k + spec.dot(ds.astype(q.dtype).T, q), d_v

        meets = None
        if spec.segments:
            meets = lambda i: _segments_meet(  # noqa: E731
                spec, r["q_seg"][pl.ds(i * bq, bq)], i * bq, kv_seg, j0
            )
        return _visit(lo, hi, meets, step, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    d_k, d_v = lax.fori_loop(0, spec.groups, head, (zeros, zeros))
    r["dk"][...] = (d_k * jnp.float32(spec.scale)).astype(r["dk"].dtype)
    r["dv"][...] = d_v.astype(r["dv"].dtype)


def _dkv(call, rows, config, interpret):
    """dK, dV: a program per (batch, key/value head, key block); the G query
    heads of the group and the query blocks in the band are its loops."""
    spec, (batch, tp, _, hp), kh = call.spec, call.q.shape, call.k.shape[2]
    tuned = launch("dkv", call.q.dtype, hp)
    bq, bk = _blocks(config, call.tp, call.sp, tuned)
    group = pl.BlockSpec((None, tp, spec.groups, hp), lambda b, h, j: (b, 0, h, 0))
    group_rows = pl.BlockSpec((None, spec.groups, tp), lambda b, h, j: (b, h, 0))
    operands, names, specs = call.inputs(False, bq, bk)
    for name, x in rows:
        operands.append(x)
        names.append(name)
        specs.append(group if name == "do" else group_rows)
    kernel = partial(
        _dkv_kernel, names=tuple(names) + ("dk", "dv"), spec=spec, bq=bq, bk=bk,
        nq=-(-spec.t // bq),
    )  # fmt: skip
    block = pl.BlockSpec((None, bk, None, hp), lambda b, h, j: (b, j, h, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, kh, call.sp // bk),
        in_specs=specs,
        out_specs=[block, block],
        out_shape=[_out(call.k.shape, _dtype(call.k, config), call.q)] * 2,
        compiler_params=_compiler_params(tuned),
        interpret=interpret,
        name="jsoftmax_attention_dkv",
    )(*operands)


def _dq_kernel(*refs, names, spec, bq, bk, nk):
    r = dict(zip(names, refs, strict=True))
    i = pl.program_id(2)
    i0 = i * bq
    q = r["q"][...]
    do = r["do"][...]
    lse = r["lse"][...]
    delta = r["delta"][...]
    q_seg = r["q_seg"][...] if spec.segments else None
    lo, hi = _band_bounds(spec, i0, bq, nk, bk, rows_outer=True)
    lo, hi = _length_bounds(
        lo, hi, r["kv_len"][...] if spec.kv_len else None, bk,
        r["q_len"][...] if spec.q_len else None, i0,
    )  # fmt: skip
    d_scores_ref = r.get("ds")

    def step(j, d_q):
        j0 = j * bk
        k = r["k"][pl.ds(j0, bk), :]
        v = r["v"][pl.ds(j0, bk), :]
        x, tanh, valid = _scores(
            spec, r, q, k, i0, j0, bq, bk, None, q_seg, rows_sliced=False
        )
        p = jnp.exp(x - lse[:, None])
        dp = xla.hidden_zero(spec.dot(do, v, transpose_b=True), valid)
        d_scores, ds = xla.score_grad(p, dp, delta, tanh)
        if d_scores_ref is not None:
            d_scores_ref[:, pl.ds(j0, bk)] = d_scores
        return d_q + spec.dot(ds.astype(k.dtype), k)

    def zero(j, d_q):  # the bias gradient of a block the masks hide
        d_scores_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((bq, bk), jnp.float32)
        return d_q

    meets = None
    if spec.segments:
        meets = lambda j: _segments_meet(  # noqa: E731
            spec, q_seg, i0, r["kv_seg"][pl.ds(j * bk, bk)], j * bk
        )
    d_q = jnp.zeros(q.shape, jnp.float32)
    if d_scores_ref is not None:
        lax.fori_loop(0, lo, zero, d_q)
        lax.fori_loop(hi, d_scores_ref.shape[-1] // bk, zero, d_q)
    d_q = _visit(lo, hi, meets, step, d_q, zero if d_scores_ref is not None else None)
    r["dq"][...] = (d_q * jnp.float32(spec.scale)).astype(r["dq"].dtype)


def _dq(call, rows, with_bias, config, interpret):
    """dQ, and the bias's dS where there is a bias: a program per (batch,
    query head, query block); the key blocks in the band are its loop."""
    spec, (batch, tp, n, hp) = call.spec, call.q.shape
    tuned = launch("dq", call.q.dtype, hp)
    bq, bk = _blocks(config, call.tp, call.sp, tuned)
    operands, names, specs = call.inputs(True, bq, bk)
    for name, x in rows:
        operands.append(x)
        names.append(name)
        specs.append(
            pl.BlockSpec((None, bq, None, hp), lambda b, h, i: (b, i, h, 0))
            if name == "do"
            else pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
        )
    out_specs = [pl.BlockSpec((None, bq, None, hp), lambda b, h, i: (b, i, h, 0))]
    out_shape = [_out(call.q.shape, _dtype(call.q, config), call.q)]
    out_names = ("dq",)
    if with_bias:
        # dS of every (query, key) pair, summed by the caller to the bias's
        # shape.
        out_specs.append(
            pl.BlockSpec((None, None, bq, call.sp), lambda b, h, i: (b, h, i, 0))
        )
        out_shape.append(_out((batch, n, tp, call.sp), jnp.float32, call.q))
        out_names += ("ds",)
    kernel = partial(
        _dq_kernel, names=tuple(names) + out_names, spec=spec, bq=bq, bk=bk,
        nk=-(-spec.s // bk),
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(batch, n, tp // bq),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(tuned),
        interpret=interpret,
        name="jsoftmax_attention_dq",
    )(*operands)


# P = exp(s - L);  D = rowsum(dO * O);  dS = P * (dP - D) with dP = dO V^T
# dV = P^T dO;  dK = dS'^T Q * scale (one program per key block);
# dQ = dS' K * scale and dbias = dS (one program per query block)
def backward(res, d_out, config, interpret=False):
    """The cotangents of q, k, v, bias and sinks: the XLA path's contract."""
    q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, out, lse = res
    call = _Call(q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, config)
    batch, tp, n, hp = call.q.shape
    t, s, h = call.spec.t, call.spec.s, q.shape[-1]
    d_out = xla.zero_past(d_out, q_len).astype(q.dtype)
    # D = rowsum(dO * O), [B, N, T] in float32: one fused XLA reduction.
    delta = jnp.einsum("btnh,btnh->bnt", d_out, out, preferred_element_type=jnp.float32)
    lse = lse.reshape(batch, n, t)
    rows = [
        ("do", _pad(_pad(d_out, 1, tp), 3, hp)),
        ("lse", _pad(xla.safe_lse(lse), 2, tp, jnp.inf)),
        ("delta", _pad(delta, 2, tp)),
    ]
    d_k, d_v = _dkv(call, rows, config, interpret)
    outs = _dq(call, rows, bias is not None, config, interpret)
    d_q = outs[0][:, :t, :, :h]
    d_k, d_v = d_k[:, :s, :, :h], d_v[:, :s, :, :h]
    d_bias = None
    if bias is not None:
        d_scores = outs[1][:, :, :t, :s]
        axes = tuple(a for a in range(4) if bias.shape[a] == 1)
        d_bias = jnp.sum(d_scores, axis=axes, keepdims=True)
        d_bias = d_bias if config.partials else d_bias.astype(bias.dtype)
    d_sinks = None
    if sinks is not None:
        weights = xla.sink_grad(sinks.astype(jnp.float32)[:, None], lse, delta)
        d_sinks = jnp.sum(weights, axis=(0, 2)).astype(sinks.dtype)
    return d_q, d_k, d_v, d_bias, d_sinks


class _Call:
    """One call's inputs padded to whole blocks (sequence axes) and a power
    of two (head dim), and its :class:`_Spec`."""

    def __init__(self, q, k, v, bias, mask, q_len, kv_len, q_seg, kv_seg, config):
        batch, t, n, h = q.shape
        s, kh = k.shape[1], k.shape[2]
        self.tp = _padded(t, config.kernel_query_chunk)
        self.sp = _padded(s, config.kernel_key_chunk)
        hp = max(_MIN_BLOCK, pl.next_power_of_2(h))
        q, k, v = (xla.zero_past(q, q_len), xla.zero_past(k, kv_len),
                   xla.zero_past(v, kv_len))  # fmt: skip
        self.q = _pad(_pad(q, 1, self.tp), 3, hp)
        self.k = _pad(_pad(k, 1, self.sp), 3, hp)
        self.v = _pad(_pad(v, 1, self.sp), 3, hp)

        def full(x):
            return None if x is None else tuple(d != 1 for d in x.shape)

        self.bias = _pad_scores(bias, self.tp, self.sp)
        if mask is not None:
            mask = _pad_scores(mask.astype(jnp.int8), self.tp, self.sp)
        self.mask = mask
        self.q_len, self.kv_len = q_len, kv_len
        self.q_seg = _pad(q_seg, 1, self.tp, -1)
        self.kv_seg = _pad(kv_seg, 1, self.sp, -2)
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        self.spec = _Spec(
            t, s, n // kh, float(config.scale), config.soft_cap, config.lower,
            config.upper, full(bias), full(mask), q_len is not None,
            kv_len is not None, q_seg is not None, precision,
        )  # fmt: skip

    def inputs(self, by_query, bq, bk):
        """The operands, their names and BlockSpecs over a grid ``(batch,
        head, block)``: a query head and a query block (``by_query``), or a
        key/value head (its G query heads) and a key block. q, k and v come
        whole along the sequence where the kernel loops over it."""
        tp, sp, g = self.tp, self.sp, self.spec.groups
        hp = self.q.shape[-1]
        if by_query:
            q = pl.BlockSpec((None, bq, None, hp), lambda b, h, i: (b, i, h, 0))
            kv = pl.BlockSpec((None, sp, None, hp), lambda b, h, i: (b, 0, h // g, 0))
        else:
            q = pl.BlockSpec((None, tp, g, hp), lambda b, h, j: (b, 0, h, 0))
            kv = pl.BlockSpec((None, sp, None, hp), lambda b, h, j: (b, 0, h, 0))
        operands, names, specs = [self.q, self.k, self.v], ["q", "k", "v"], [q, kv, kv]

        def scores_spec(x):
            fb, fn, ft, fs = (d != 1 for d in x.shape)
            if by_query:
                shape = (None, None, bq if ft else 1, sp if fs else 1)
            else:
                shape = (None, g if fn else 1, tp if ft else 1, bk if fs else 1)

            def index(b, h, blk):
                return (
                    b if fb else 0,
                    h if fn else 0,
                    blk if ft and by_query else 0,
                    blk if fs and not by_query else 0,
                )

            return pl.BlockSpec(shape, index)

        def add(name, x, spec):
            if x is not None:
                operands.append(x)
                names.append(name)
                specs.append(spec)

        add("bias", self.bias, None if self.bias is None else scores_spec(self.bias))
        add("mask", self.mask, None if self.mask is None else scores_spec(self.mask))
        by_batch = pl.BlockSpec((None,), lambda b, h, blk: (b,))
        add("q_len", self.q_len, by_batch)
        add("kv_len", self.kv_len, by_batch)
        block = pl.BlockSpec((None, bq if by_query else bk), lambda b, h, blk: (b, blk))
        whole = pl.BlockSpec((None, sp if by_query else tp), lambda b, h, blk: (b, 0))
        add("q_seg", self.q_seg, block if by_query else whole)
        add("kv_seg", self.kv_seg, whole if by_query else block)
        return operands, names, specs

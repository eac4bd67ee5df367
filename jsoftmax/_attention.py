"""Block-wise attention (FlashAttention-2) that never holds the score matrix."""

from __future__ import annotations

import dataclasses
import math
import operator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jsoftmax._checks import compute_dtype, float_input, widen_8bit
from jsoftmax._collectives import varying_like
from jsoftmax._forward_mode import _with_forward_mode

# Default block sizes, chosen by measurement: `python bench/attention.py
# --blocks` (bench/results/attention_blocks_cpu.md) times forward+backward at
# T = S = 1024 and 2048, B=1, N=8, H=64, float32, causal and not, for query x
# key blocks of 64x128 to 512x512 on a 2-core CPU (jax 0.10.2). 128x128 and
# 256x256 tied on full attention (0.57-0.65x jax.nn's time); 128x128 was the
# fastest causal one (0.31-0.38x against 0.33-0.45x: a smaller diagonal block
# wastes less), and it keeps the per-block temporaries small.
_QUERY_CHUNK = 128
_KEY_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static options of one call (hashable: a nondiff argument)."""

    scale: float  # the full scale of q.k
    prescaled: bool  # q is multiplied by scale before the matmul
    lower: int | None  # key - query >= lower (left window), None: unbounded
    upper: int | None  # key - query <= upper (causal / right window)
    soft_cap: float | None
    query_chunk: int
    key_chunk: int
    # Measured alternatives (bench/attention.py --precision), not public:
    exact_delta: bool = False  # D = rowsum(P * dP), a pre-pass (_exact_delta)
    static_trips: bool = True  # False: while loops over traced block bounds


def dot_product_attention(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.typing.ArrayLike | None = None,
    key_value_seq_lengths: jax.typing.ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: jax.typing.ArrayLike | None = None,
    key_value_segment_ids: jax.typing.ArrayLike | None = None,
    soft_cap: float | None = None,
    sinks: jax.typing.ArrayLike | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Scaled dot-product attention that never holds the ``T x S`` scores.

    A drop-in for :func:`jax.nn.dot_product_attention` (same arguments, shapes
    and defaults, jax 0.10.2) computed block by block with the
    FlashAttention-2 algorithm (arXiv 2307.08691): for each block of
    ``query_chunk_size`` queries, an online softmax (running max, rescaled
    sum and output accumulator, in float32) walks the blocks of
    ``key_chunk_size`` keys that the masks leave visible; only the output and
    the per-row logsumexp :math:`L` are kept. Per head,

    .. math::

        s_{ij} = c \tanh\!\left(\frac{\sigma\, q_i \cdot k_j}{c}\right)
        + b_{ij}, \qquad
        L_i = \log\Big(e^{\text{sink}} + \sum_{j \text{ visible}} e^{s_{ij}}\Big),
        \qquad o_i = \sum_{j \text{ visible}} e^{s_{ij} - L_i} v_j,

    with :math:`\sigma` the ``scale``, the :math:`\tanh` only with
    ``soft_cap`` :math:`c` and the sink term only with ``sinks``. The
    backward pass recomputes each block's probabilities :math:`P` from
    :math:`L` and forms :math:`dS = P \odot (dP - D)` with
    :math:`D = \operatorname{rowsum}(dO \odot O)`, the softmax VJP
    :math:`y \odot (g - \langle g, y \rangle)`.

    Precision: values and ``L`` are equal to jax.nn's to float32 rounding.
    Gradients are too where the scores are moderate; where a row's softmax
    is near one-hot, :math:`dP - D` cancels, and :math:`D` from the rounded
    output (as in FlashAttention and cuDNN) leaves a float32 gradient error
    of up to about :math:`3\,\epsilon \max|s|` relative to the largest
    gradient entry. Measured (``python bench/attention.py --precision``,
    ``q = k = v = c x``, causal): 1.2e-6, 9.8e-5, 6.0e-4 and 7.3e-3 at
    ``max|s|`` of 7, 709, 6.4e3 and 7.1e4, where jax.nn's error is 3e-8 to
    5e-7. The exact :math:`D = \operatorname{rowsum}(P \odot dP)` removes
    the term but costs a second pass over the blocks (measured there).

    Every transformation composes: ``jit``, ``vmap``, ``grad``, forward mode
    (``jvp``, ``jacfwd``, ``hessian``) and reverse over reverse
    (``jacrev(jacrev)``, the gradient of a gradient norm): the block loops
    have static trip counts, and the steps past a range that the masks or
    lengths end early are skipped by a ``cond``.

    Blocks that the causal mask, the local window or the key padding hide
    entirely are skipped, not computed and masked: causal attention does
    about half the work of full attention, a window of width ``w`` about
    ``T * w``. Blocks past the longest ``key_value_seq_lengths`` (and query
    blocks past the longest ``query_seq_lengths``) are skipped too.

    Args:
      query: ``[B, T, N, H]`` or ``[T, N, H]``.
      key: ``[B, S, K, H]`` (or ``[S, K, H]``), ``N % K == 0``: query head
        ``n`` attends with key/value head ``n // (N // K)`` (grouped-query
        and multi-query attention, without copying ``key`` or ``value``).
      value: the shape of ``key``.
      bias: optional, added to the scores (after the soft cap); at most 4-D,
        broadcastable to ``[B, N, T, S]`` (leading axes added as in jax.nn).
        Its gradient is summed to its own shape.
      mask: optional boolean, ``True`` where a query may attend to a key;
        broadcastable to ``[B, N, T, S]``.
      scale: the factor of ``q . k``; default ``1 / sqrt(H)``. A traced value
        is applied to ``query`` before the call (and differentiated).
      is_causal: query ``i`` sees keys ``j <= i`` (jax.nn's ``tril`` of the
        ``[T, S]`` matrix, aligned at the top left).
      query_seq_lengths: optional int ``[B]``: queries ``t >= length`` see no
        key (output 0).
      key_value_seq_lengths: optional int ``[B]``: keys ``s >= length`` are
        hidden.
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys
        ``i - left <= j <= i + right``, as in jax.nn.
      query_segment_ids: optional int ``[B, T]`` (``[T]`` unbatched); with
        ``key_value_segment_ids`` ``[B, S]``, a query sees only keys of its
        own segment (packed sequences). Compared block by block; no
        ``[B, T, S]`` mask is built.
      key_value_segment_ids: see ``query_segment_ids``; both or neither.
      soft_cap: optional positive finite ``c``: scores become
        ``c * tanh(scale * q . k / c)`` before ``bias`` is added (Gemma 2).
      sinks: optional float ``[N]``: a per-head logit that joins every row's
        softmax denominator and carries no value (attention sinks).
        Differentiable.
      query_chunk_size: queries per block (static). Default 128, or ``T``
        if smaller. ``T`` need not be a multiple.
      key_chunk_size: keys per block (static). Default 128, or ``S`` if
        smaller. ``S`` need not be a multiple. The defaults were chosen by
        timing forward plus backward for blocks of 64x128 to 512x512 at
        ``T = S = 1024`` and ``2048``, ``N = 8``, ``H = 64``, float32, causal
        and not, on a 2-core CPU (``python bench/attention.py --blocks``):
        128x128 tied with 256x256 on full attention and was the fastest
        causal one. The temporaries of a step are a few
        ``B * N * query_chunk_size * key_chunk_size`` float32 buffers;
        larger blocks can pay off on accelerators.
      return_residual: also return the per-row logsumexp ``L`` of the masked
        scores, ``[B, T, N]`` (``[T, N]`` unbatched), in the dtype of
        ``query``, not differentiated (as in jax.nn).

    Returns:
      The attention output, ``query``'s shape and dtype; with
      ``return_residual``, ``(output, lse)``. float16 and bfloat16 inputs run
      their matmuls in that dtype with float32 accumulation, and the scores,
      probabilities, ``L`` and ``D`` are float32. A query row that sees no
      key (all masked, zero key length, a padded query, an empty segment)
      has output 0 and ``L = -inf``, and contributes no gradient to any
      input; masked-out scores and bias entries, however large or infinite,
      never reach the arithmetic. (jax.nn returns the mean of ``value``
      there and passes gradient into the masked values.) Keys and values
      past ``key_value_seq_lengths``, and queries past ``query_seq_lengths``,
      are zeroed before any matmul: a NaN or inf there (a KV cache's
      unwritten tail) changes nothing, whatever the chunk sizes and the other
      sequences' lengths (jax.nn's output is NaN). A NaN in a key or value
      hidden only by ``mask``, the causal mask, a window or segment ids
      meets zero probabilities in a matmul and reaches the rows of its block,
      as in jax.nn.

    Raises:
      ValueError: shapes that do not fit (named): ranks, batch, head counts
        (``N % K``), head dims, bias/mask/lengths/segment ids/sinks, chunk
        sizes that are not positive ints, an empty sequence, a symbolic
        sequence length ``T`` or ``S`` under :mod:`jax.export` (the block
        schedule is static; a symbolic batch is supported).
      TypeError: a non-boolean mask, non-integer lengths or segment ids,
        complex inputs, inputs of different dtypes; a bool or non-number
        ``scale`` or ``soft_cap``; a traced ``is_causal``,
        ``local_window_size``, ``soft_cap`` or chunk size (they must be
        static: under ``jit``, pass them with ``static_argnames``). Concrete
        0-d arrays (``np.array(30.)``, ``jnp.float32(30.)``) are accepted.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 4))
      >>> out = jsoftmax.dot_product_attention(q, k, v, is_causal=True)
      >>> want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      >>> out.shape, bool(jnp.allclose(out, want, atol=1e-6))
      ((2, 5, 2, 4), True)
    """
    args = _prepare(
        query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
        key_value_seq_lengths, local_window_size, query_segment_ids,
        key_value_segment_ids, soft_cap, sinks, query_chunk_size, key_chunk_size,
    )  # fmt: skip
    out, lse = _attention_forward_mode(*args.arrays, args.config)
    out = out.reshape(args.out_shape).astype(args.out_dtype)
    if not return_residual:
        return out
    return out, _lse_output(lse, args)


_NAME = "dot_product_attention"


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A checked call: the rule's arrays and static config, and how to shape
    its output."""

    arrays: tuple  # q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg
    config: _Config
    out_shape: tuple
    out_dtype: np.dtype


def _prepare(
    query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
    key_value_seq_lengths, local_window_size, query_segment_ids,
    key_value_segment_ids, soft_cap, sinks, query_chunk_size, key_chunk_size,
):  # fmt: skip
    """Checks the arguments (errors name them) and brings them to the rule's
    form: batched ``[B, T, N, H]``, bias and mask 4-D, lengths int32, segment
    ids of one dtype, the static options in a :class:`_Config`."""
    name = _NAME
    query, key, value = _qkv(query, key, value)
    out_shape, out_dtype = query.shape, query.dtype
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    batch, t, n, h = query.shape
    s = key.shape[1]
    full = (batch, n, t, s)
    bias = _scores_input(name, "bias", bias, full, float_mask=True)
    mask = _scores_input(name, "mask", mask, full, float_mask=False)
    q_len = _lengths(_int_input(name, "query_seq_lengths", query_seq_lengths, (batch,)))
    kv_len = _lengths(
        _int_input(name, "key_value_seq_lengths", key_value_seq_lengths, (batch,))
    )
    q_seg, kv_seg = _segment_ids(
        query_segment_ids, key_value_segment_ids, (t, s), batch, unbatched
    )
    if sinks is not None:
        sinks = widen_8bit(float_input(name, sinks))
        if sinks.shape != (n,):
            raise ValueError(
                f"{name}: sinks of shape {sinks.shape} must be one logit per query "
                f"head ({n},)"
            )
    query_chunk = _chunk("query_chunk_size", query_chunk_size, _QUERY_CHUNK, t)
    key_chunk = _chunk("key_chunk_size", key_chunk_size, _KEY_CHUNK, s)
    lower, upper = _band(is_causal, local_window_size)
    soft_cap = _soft_cap(soft_cap)

    query, key, value = (widen_8bit(a) for a in (query, key, value))
    query, scale = _scale(query, scale, h)
    # float32/float64 queries are scaled before the matmul (T x H products
    # instead of T x S); 16-bit ones keep their rounding and the float32
    # scores are scaled.
    prescaled = jnp.finfo(query.dtype).bits >= 32
    config = _Config(scale, prescaled, lower, upper, soft_cap, query_chunk, key_chunk)
    # Inside shard_map(check_vma=True), every differentiable input varies
    # over the mesh axes any input varies over: then a replicated bias or
    # sinks (or k, v) gets one cotangent part per shard, which JAX sums.
    arrays = (query, key, value, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)
    arrays = varying_like(arrays[:5], *arrays) + arrays[5:]
    return _Prepared(tuple(arrays), config, out_shape, out_dtype)


def _qkv(query, key, value):
    """query, key and value as float arrays of one dtype and fitting shapes,
    with static sequence lengths."""
    name = _NAME
    query, key, value = (float_input(name, a) for a in (query, key, value))
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != key.ndim:
        raise ValueError(
            f"{name}: query, key and value must all be [B, T, N, H] / [B, S, K, H] "
            f"or all unbatched [T, N, H] / [S, K, H], got query {query.shape}, key "
            f"{key.shape} and value {value.shape}"
        )
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"{name}: query, key and value must have one dtype, got {query.dtype}, "
            f"{key.dtype} and {value.dtype}"
        )
    q4 = query.shape if query.ndim == 4 else (1,) + query.shape
    k4 = key.shape if key.ndim == 4 else (1,) + key.shape
    (batch, t, n, h), (_, s, k, _) = q4, k4
    for axis, size in (("T (query", t), ("S (key/value", s)):
        if not isinstance(size, (int, np.integer)):
            raise ValueError(
                f"{name}: the sequence length {axis} axis) is symbolic ({size}): "
                "the block schedule (which blocks the masks hide, and the loop "
                "trip counts) is static. Export one function per length, or pad "
                "to a few bucket lengths and pass query_seq_lengths / "
                "key_value_seq_lengths; a symbolic batch is supported"
            )
    if value.shape != key.shape:
        raise ValueError(
            f"{name}: value of shape {value.shape} must have key's shape {key.shape}"
        )
    if k4[0] != batch or k4[3] != h:
        raise ValueError(
            f"{name}: key {key.shape} must have query's batch and head dim "
            f"(query {query.shape}: B={batch}, H={h})"
        )
    if k == 0 or n % k:
        raise ValueError(
            f"{name}: the {n} query heads must be a multiple of the {k} key/value "
            f"heads (query {query.shape}, key {key.shape})"
        )
    if t == 0 or s == 0:
        raise ValueError(
            f"{name}: empty sequence: query {query.shape}, key {key.shape}"
        )
    return query, key, value


def _segment_ids(query_segment_ids, key_value_segment_ids, lengths, batch, unbatched):
    """Both segment ids or neither, as ``[B, T]`` / ``[B, S]`` of one integer
    dtype."""
    name = _NAME
    if (query_segment_ids is None) != (key_value_segment_ids is None):
        raise ValueError(
            f"{name}: pass both query_segment_ids and key_value_segment_ids or neither"
        )
    t, s = lengths
    seg_shapes = ((t,), (s,)) if unbatched else ((batch, t), (batch, s))
    q_seg = _int_input(name, "query_segment_ids", query_segment_ids, seg_shapes[0])
    kv_seg = _int_input(
        name, "key_value_segment_ids", key_value_segment_ids, seg_shapes[1]
    )
    if q_seg is not None and q_seg.dtype != kv_seg.dtype:
        with jax.numpy_dtype_promotion("standard"):  # whatever the user's mode
            common = jnp.promote_types(q_seg.dtype, kv_seg.dtype)
        if not jnp.issubdtype(common, jnp.integer):
            raise TypeError(
                f"{name}: query_segment_ids ({q_seg.dtype}) and key_value_segment_ids "
                f"({kv_seg.dtype}) have no common integer dtype"
            )
        q_seg, kv_seg = q_seg.astype(common), kv_seg.astype(common)
    if unbatched and q_seg is not None:
        q_seg, kv_seg = q_seg[None], kv_seg[None]
    return q_seg, kv_seg


def _scale(query, scale, h):
    """The static scale as a float; a traced one is applied to ``query`` here,
    where autodiff sees it (then 1.0)."""
    name = _NAME
    if scale is None:
        return query, 1.0 / math.sqrt(h)
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"{name}: scale must be a real number, got {scale!r}")
    if np.ndim(scale) != 0:
        raise ValueError(f"{name}: scale must be a scalar, got shape {np.shape(scale)}")
    if isinstance(scale, (int, float, np.number)):
        return query, float(scale)
    query = (query * jnp.asarray(scale, query.dtype)).astype(query.dtype)
    return query, 1.0


def _soft_cap(soft_cap):
    """A static, positive, finite soft cap as a float (or None)."""
    name = _NAME
    if soft_cap is None:
        return None
    _require_static("soft_cap", soft_cap)
    if isinstance(soft_cap, (str, bytes, bool, np.bool_)) or np.ndim(soft_cap) != 0:
        raise TypeError(f"{name}: soft_cap must be a real number, got {soft_cap!r}")
    value = np.asarray(soft_cap)
    if not np.issubdtype(value.dtype, np.integer) and not np.issubdtype(
        value.dtype, np.floating
    ):
        raise TypeError(f"{name}: soft_cap must be a real number, got {soft_cap!r}")
    value = float(value)
    # An infinite cap would be inf * tanh(0) = NaN, not "no cap".
    if not 0 < value < math.inf:
        raise ValueError(
            f"{name}: soft_cap must be a positive finite number, got {soft_cap!r}"
        )
    return value


def _require_static(what, value):
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{_NAME}: {what} must be static (it sets the block schedule or the "
            f"soft cap at trace time), got a traced value. Under jit, close over "
            f"it or pass it with static_argnames=({what!r},)"
        )


def _lse_output(lse, args):
    """The rule's ``[B, K, G, T]`` lse as ``[B, T, N]`` (``[T, N]`` unbatched),
    without gradient."""
    query = args.arrays[0]
    batch, t, n, _ = query.shape
    lse = _reshape(lax.stop_gradient(lse), (batch, n, t), query, (0, 2, 1))
    lse = lse.transpose(0, 2, 1)
    return lse.reshape(args.out_shape[:-1]).astype(args.out_dtype)


def _reshape(x, shape, like, dims):
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
        if entry is not None and size % _shards(sharding.mesh, entry) == 0:
            used.add(d)
        else:
            entry = None
        out.append(entry)
    return lax.reshape(x, shape, out_sharding=sharding.update(spec=P(*out)))


def _shards(mesh, entry):
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def _scores_input(name, what, x, full, float_mask):
    """bias or mask, at most 4-D, with leading axes added (as in jax.nn)."""
    if x is None:
        return None
    if float_mask:
        x = widen_8bit(float_input(name, x))
    else:
        x = jnp.asarray(x)
        if x.dtype != jnp.bool_:
            raise TypeError(
                f"{name}: mask must be boolean (True where a query may attend), got "
                f"dtype {x.dtype} of shape {x.shape}; an additive mask belongs in "
                "bias"
            )
    # Compared axis by axis, not with np.broadcast_shapes: under jax.export a
    # symbolic batch size is no int.
    ok = x.ndim <= 4 and all(
        d == 1 or d == f for d, f in zip(x.shape[::-1], full[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name}: {what} of shape {x.shape} does not broadcast to the scores "
            f"[B, N, T, S] = {full}"
        )
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _int_input(name, what, x, shape):
    if x is None:
        return None
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: {what} must be integers, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name}: {what} of shape {x.shape} must be {shape}")
    return x


def _lengths(x):
    """Sequence lengths as int32, whatever their integer dtype: the block
    arithmetic compares them with int32 positions, and with strict dtype
    promotion (or int64 lengths under x64) nothing may promote implicitly.
    Lengths past int32's range are clamped first, which changes nothing: a
    negative length hides everything, as 0 does, and any length past the
    sequence shows all of it."""
    if x is None or x.dtype == np.int32:
        return x
    if jnp.iinfo(x.dtype).bits >= 32:
        top = np.iinfo(np.int32).max
        x = jnp.clip(x, np.array(0, x.dtype), np.array(top, x.dtype))
    return x.astype(np.int32)


def _chunk(what, size, default, length):
    if size is None:
        return int(min(default, length))
    _require_static(what, size)
    if isinstance(size, (bool, np.bool_)):
        raise ValueError(f"{_NAME}: {what} must be a positive int, got {size!r}")
    try:
        size = operator.index(size)
    except TypeError:
        raise ValueError(
            f"{_NAME}: {what} must be a positive int, got {size!r}"
        ) from None
    if size < 1:
        raise ValueError(f"{_NAME}: {what} must be a positive int, got {size!r}")
    return int(min(size, length))


def _band(is_causal, window):
    """The visible keys as a band ``lower <= key - query <= upper``."""
    name = _NAME
    lower = upper = None
    _require_static("is_causal", is_causal)
    if window is not None:
        _require_static("local_window_size", window)
        if isinstance(window, (tuple, list)):
            for w in window:
                _require_static("local_window_size", w)
        if np.ndim(window) == 0:
            window = (window, window)
        try:
            left, right = (_index(w) for w in window)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name}: local_window_size must be an int or a pair of ints, got "
                f"{window!r}"
            ) from None
        lower, upper = -left, right
    if is_causal:
        upper = 0 if upper is None else min(upper, 0)
    return lower, upper


def _index(w):
    if isinstance(w, (bool, np.bool_)):
        raise TypeError(f"{w!r} is a bool")
    return operator.index(w)


# -- Block bookkeeping (static, NumPy) ----------------------------------------


def _block_visibility(config, t, s):
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


def _ranges(any_):
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

    config: _Config
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
    tanh = None
    if config.soft_cap is not None:
        cap = jnp.asarray(config.soft_cap, x.dtype)
        tanh = jnp.tanh(x / cap)
        x = cap * tanh
    sizes = (None, None, None, bq, bk)
    if ctx.bias is not None:
        x = x + _block(ctx.bias, {3: i0, 4: j0}, sizes).astype(x.dtype)
    valid = None

    def both(m):
        return m if valid is None else valid & m

    if structural:
        rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        valid = cols < ctx.s
        if config.lower is not None:
            valid = valid & (cols - rows >= config.lower)
        if config.upper is not None:
            valid = valid & (cols - rows <= config.upper)
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


def _visit_blocks(config, lo, hi, trips, body, carry):
    """``body(j, carry)`` for the blocks ``lo <= j < hi`` (traced bounds), in
    a loop of ``trips`` steps (static) whose steps past ``hi`` are skipped by a
    ``cond``. A static trip count makes the loop a scan, which reverse mode
    differentiates (second derivatives: ``jacrev(jacrev)``, ``grad`` of a
    gradient norm), where a ``fori_loop`` over traced bounds is a
    ``while_loop`` it cannot; a skipped step costs one predicate."""

    if not config.static_trips:
        return lax.fori_loop(lo, hi, body, carry)

    def step(n, carry):
        j = lo + lax.convert_element_type(n, lo.dtype)
        return lax.cond(j < hi, partial(body, j), lambda c: c, carry)

    return lax.fori_loop(0, trips, step, carry)


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


@partial(jax.custom_vjp, nondiff_argnums=(10,))
def _attention(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config):
    return _attention_fwd(
        q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config
    )[0]


def _attention_fwd(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config):
    batch, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = config.query_chunk, config.key_chunk
    nq = -(-t // bq)
    tp, sp = nq * bq, -(-s // bk) * bk
    ctx = _context(config, t, s, kh, bias, mask, q_len, kv_len, q_seg, kv_seg)
    qg, kg, vg = _layout(q, k, v, ctx, tp, sp)
    acc = _acc(q)
    any_, all_ = _block_visibility(config, t, s)
    lo, hi = _ranges(any_)
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
            # m starts at the lowest finite value, so a row with nothing
            # visible yet keeps a finite max and exp(-inf - m) = 0, not NaN.
            m_new = jnp.maximum(m, _row_max(x))
            p = jnp.exp(x - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            total = total * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgqc,bkch->bkgqh", p.astype(v.dtype), vb, preferred_element_type=acc
            )
            return m_new, total, o * alpha[..., None] + pv

        # Carries made from the query block: sharded (explicit mesh) and
        # varying (shard_map) as the loop body's results are.
        row = jnp.zeros_like(qb[..., 0], acc)  # [B, K, G, bq]
        carry = (
            jnp.full_like(row, jnp.finfo(acc).min),
            row,
            jnp.zeros_like(qb, acc),
        )
        lo, hi = _dynamic_bounds(ctx, i0, lo, hi, True)
        m, total, o = _visit_blocks(config, lo, hi, trips, step, carry)
        if sinks is not None:
            sink = _reshape(sinks.astype(acc), (1, kh, g, 1), sinks, (None, 0, 0, None))
            m_all = jnp.maximum(m, sink)
            shift = jnp.exp(m - m_all)
            o = o * shift[..., None]
            total_all = total * shift + jnp.exp(sink - m_all)
        else:
            m_all, total_all = m, total
        # total == 0: the row sees no key. Its o is 0 and its L is -inf.
        lse = jnp.where(total == 0, -jnp.inf, m_all + jnp.log(total_all))
        o = o / jnp.where(total == 0, 1, total_all)[..., None]
        return None, (o.astype(q.dtype), lse)

    xs = (jnp.arange(nq, dtype=jnp.int32), jnp.asarray(lo), jnp.asarray(hi))
    _, (o, lse) = lax.scan(query_block, None, xs)
    # [nq, B, K, G, bq, H] -> [B, T, N, H];  [nq, B, K, G, bq] -> [B, K, G, T]
    out = o.transpose(1, 0, 4, 2, 3, 5)
    out = _reshape(out, (batch, tp, n, h), q, (0, 1, 2, 3))[:, :t]
    lse = lse.transpose(1, 2, 3, 0, 4)
    lse = _reshape(lse, (batch, kh, g, tp), q, (0, 2, 2, 1))[..., :t]
    res = (q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, out, lse)
    return (out, lse), res


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
        _zero_past(q, ctx.q_len),
        _zero_past(k, ctx.kv_len),
        _zero_past(v, ctx.kv_len),
    )
    qg = _reshape(q, (batch, t, kh, n // kh, h), q, (0, 1, 2, 2, 3))
    qg = qg.transpose(0, 2, 3, 1, 4)
    if ctx.config.prescaled:
        qg = qg * jnp.asarray(ctx.config.scale, qg.dtype)
    qg = _pad_axis(qg, 3, tp)
    kg = _pad_axis(k.transpose(0, 2, 1, 3), 2, sp)
    vg = _pad_axis(v.transpose(0, 2, 1, 3), 2, sp)
    return qg, kg, vg


def _zero_past(x, lengths):
    """``x [B, L, ...]`` with the positions ``>= lengths[b]`` set to 0."""
    if lengths is None:
        return x
    pos = lax.broadcasted_iota(jnp.int32, x.shape[:2], 1)
    keep = pos < lengths[:, None]
    return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0)


def _exact_delta(ctx, qg, kg, vg, dog, lse_safe, any_, all_):
    """``D = rowsum(P * dP)`` from the recomputed blocks, a pass over the
    visible blocks before the backward's: the exact softmax VJP of the
    recomputed ``P`` (``rowsum(dS) = 0``), where ``rowsum(dO * O)`` differs from
    it by the rounding of the forward's output."""
    config = ctx.config
    bq, bk = config.query_chunk, config.key_chunk
    acc = _acc(qg)
    lo, hi = _ranges(any_)
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
            return d + jnp.sum(p * dp, axis=-1)

        lo, hi = _dynamic_bounds(ctx, i0, lo, hi, True)
        d = _visit_blocks(config, lo, hi, trips, step, jnp.zeros_like(qb[..., 0], acc))
        return None, d

    xs = (jnp.arange(len(lo), dtype=jnp.int32), jnp.asarray(lo), jnp.asarray(hi))
    _, d = lax.scan(query_block, None, xs)
    # [nq, B, K, G, bq] -> [B, K, G, Tp]
    d = d.transpose(1, 2, 3, 0, 4)
    return d.reshape(d.shape[:3] + (-1,))


# P = exp(s - L);  D = rowsum(dO * O);  dS = P * (dP - D) with dP = dO V^T
# dV = P^T dO;  dQ = dS' K * scale;  dK = dS'^T Q * scale;  dbias = dS
# (dS' = dS * (1 - tanh^2) under the soft cap);  dsink = -sum_rows e^(sink-L) D
def _attention_bwd(config, res, cotangents):
    q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, out, lse = res
    d_out = cotangents[0]  # lse is returned without gradient (stop_gradient)
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
    d_out = _zero_past(d_out, ctx.q_len)
    dog = _reshape(d_out, (batch, t, kh, g, h), q, (0, 1, 2, 2, 3))
    dog = _pad_axis(dog.transpose(0, 2, 3, 1, 4), 3, tp).astype(q.dtype)
    og = _reshape(out, (batch, t, kh, g, h), q, (0, 1, 2, 2, 3))
    og = og.transpose(0, 2, 3, 1, 4)
    # D in float32, from the output as returned.
    delta = jnp.einsum(
        "bkgth,bkgth->bkgt", dog[..., :t, :], og, preferred_element_type=acc
    )
    # Rows with nothing visible (L = -inf) and padded rows get L = +inf, so
    # that exp(s - L) = 0 there whatever s is.
    lse_safe = _pad_axis(jnp.where(lse == -jnp.inf, jnp.inf, lse), 3, tp, jnp.inf)
    any_, all_ = _block_visibility(config, t, s)
    if config.exact_delta:
        delta = _exact_delta(ctx, qg, kg, vg, dog, lse_safe, any_, all_)[..., :t]
    delta_p = _pad_axis(delta, 3, tp)
    lo, hi = _ranges(any_.T)
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
            ds = p * (dp - db[..., None])
            if d_bias is not None:
                d_bias = _add_block(d_bias, ds, i0, j0, config)
            if tanh is not None:
                ds = ds * (1 - tanh * tanh)
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
        d_k, d_v, d_q, d_bias = _visit_blocks(config, lo, hi, trips, step, carry)
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
    d_q = _reshape(d_q, (batch, tp, n, h), q, (0, 1, 2, 3))[:, :t]
    if not config.prescaled:
        d_k = d_k * scale
    d_k = _reshape(d_k.transpose(1, 0, 3, 2, 4), (batch, sp, kh, h), k, (0, 1, 2, 3))
    d_v = _reshape(d_v.transpose(1, 0, 3, 2, 4), (batch, sp, kh, h), k, (0, 1, 2, 3))
    d_k, d_v = d_k[:, :s], d_v[:, :s]
    if d_bias is not None:
        d_bias = d_bias[:, :, :, : bias.shape[2], : bias.shape[3]]
        d_bias = d_bias.reshape(bias.shape).astype(bias.dtype)
    d_sinks = None
    if sinks is not None:
        sink = _reshape(sinks.astype(acc), (1, kh, g, 1), sinks, (None, 0, 0, None))
        weight = jnp.where(lse == -jnp.inf, 0, jnp.exp(sink - lse))
        d_sinks = _reshape(-jnp.sum(weight * delta, axis=(0, 3)), (n,), sinks, (0,))
        d_sinks = d_sinks.astype(sinks.dtype)
    return (
        d_q.astype(q.dtype),
        d_k.astype(k.dtype),
        d_v.astype(v.dtype),
        d_bias,
        d_sinks,
        None,
        None,
        None,
        None,
        None,
    )


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


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_tangent(statics, res, t_leaves):
    """Forward mode: JAX's own ``jax.jvp`` of the forward pass recomputed from
    the residuals (which hold all its inputs): no second hand-written
    derivative, and cheaper than transposing ``_attention_bwd``, whose scans
    would save every block's intermediates. Tangents flow from q, k, v,
    bias and sinks, as in the backward pass; ``lse`` has none there (its
    cotangent is ignored), so none here."""
    (config,) = statics
    *args, _, lse = res
    # The float input leaves, in order (None arguments are no leaves).
    floats = [
        i
        for i, a in enumerate(args)
        if a is not None and jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    moved = [i for i in floats if i < 5]  # q, k, v, bias, sinks
    t_moved = [t for i, t in zip(floats, t_leaves, strict=True) if i < 5]

    def forward(*xs):
        full = list(args)
        for i, x in zip(moved, xs, strict=True):
            full[i] = x
        return _attention_fwd(*full, config)[0][0]

    _, d_out = jax.jvp(forward, [args[i] for i in moved], t_moved)
    return [d_out, jnp.zeros(lse.shape, lse.dtype)]


_attention_forward_mode = _with_forward_mode(_attention, tangent=_attention_tangent)

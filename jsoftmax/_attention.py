"""Block-wise attention (FlashAttention-2) that never holds the score matrix."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Hashable
from functools import partial
from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax import _attention_dispatch as dispatch
from jsoftmax import _attention_pallas as pallas
from jsoftmax import _attention_xla as xla
from jsoftmax import _context_parallel as cp
from jsoftmax._checks import (
    as_input,
    as_int_input,
    broadcast_dims,
    float_input,
    in_operands_mesh,
    mesh_spec,
    number_kind,
    shards,
    share_shardings,
    traced_once,
    widen_8bit,
)
from jsoftmax._collectives import axis_names, varying_like
from jsoftmax._forward_mode import _with_forward_mode

_IMPLEMENTATIONS = (None, "xla", "pallas", "cudnn")


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
    # "xla", "pallas" (interpret mode off a CUDA GPU) or "auto" (the kernel
    # where the program is lowered for CUDA, else the XLA path).
    implementation: str = "xla"
    kernel_query_chunk: int | None = None  # the call's chunk sizes, as given
    kernel_key_chunk: int | None = None
    # Measured alternatives (bench/attention.py --precision), not public:
    exact_delta: bool = False  # D = rowsum(P * dP), a pre-pass (_exact_delta)
    static_trips: bool = True  # False: while loops over traced block bounds
    # Context parallelism's pairs: o, dq, dk, dv and the bias's gradient in
    # the accumulation dtype (float32 for 16-bit inputs), so that the pairs'
    # partials are merged and summed before the one rounding to the inputs'.
    partials: bool = False


# Type checkers: the output alone, or (output, lse) with return_residual=True.
@overload
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
    implementation: Literal["xla", "pallas", "cudnn"] | None = None,
    query_segment_ids: jax.typing.ArrayLike | None = None,
    key_value_segment_ids: jax.typing.ArrayLike | None = None,
    soft_cap: float | None = None,
    sinks: jax.typing.ArrayLike | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    return_residual: Literal[False] = False,
    axis_name: Hashable | None = None,
    context_parallel: Literal["ring", "all_gather"] = "ring",
    context_layout: Literal["contiguous", "zigzag"] = "contiguous",
) -> jax.Array: ...


@overload
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
    implementation: Literal["xla", "pallas", "cudnn"] | None = None,
    query_segment_ids: jax.typing.ArrayLike | None = None,
    key_value_segment_ids: jax.typing.ArrayLike | None = None,
    soft_cap: float | None = None,
    sinks: jax.typing.ArrayLike | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    return_residual: Literal[True],
    axis_name: Hashable | None = None,
    context_parallel: Literal["ring", "all_gather"] = "ring",
    context_layout: Literal["contiguous", "zigzag"] = "contiguous",
) -> tuple[jax.Array, jax.Array]: ...


@overload
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
    implementation: Literal["xla", "pallas", "cudnn"] | None = None,
    query_segment_ids: jax.typing.ArrayLike | None = None,
    key_value_segment_ids: jax.typing.ArrayLike | None = None,
    soft_cap: float | None = None,
    sinks: jax.typing.ArrayLike | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    return_residual: bool = False,
    axis_name: Hashable | None = None,
    context_parallel: Literal["ring", "all_gather"] = "ring",
    context_layout: Literal["contiguous", "zigzag"] = "contiguous",
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


@in_operands_mesh
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
    implementation: Literal["xla", "pallas", "cudnn"] | None = None,
    query_segment_ids: jax.typing.ArrayLike | None = None,
    key_value_segment_ids: jax.typing.ArrayLike | None = None,
    soft_cap: float | None = None,
    sinks: jax.typing.ArrayLike | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    return_residual: bool = False,
    axis_name: Hashable | None = None,
    context_parallel: Literal["ring", "all_gather"] = "ring",
    context_layout: Literal["contiguous", "zigzag"] = "contiguous",
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
    the term but costs a second pass over the blocks (measured there). With
    16-bit inputs :math:`D` comes from the 16-bit output, and the same term
    scales with that dtype's epsilon: bfloat16 dK errors of 7.7e-3, 1.5e-2
    and 7.4e-2 at ``max|s|`` of 37, 411 and 1642, against jax.nn's 2.9e-3
    to 6.3e-3 (``python bench/attention_precision_16bit.py``).

    Every transformation composes: ``jit``, ``vmap``, ``grad``, forward mode
    (``jvp``, ``jacfwd``, ``hessian``) and reverse over reverse
    (``jacrev(jacrev)``, the gradient of a gradient norm): the block loops
    have static trip counts, and the steps past a range that the masks or
    lengths end early are skipped by a ``cond``. ``implementation`` picks
    the XLA block path or Pallas kernels (the default on a CUDA GPU).

    On a mesh with ``Explicit`` axes (sharding in types), inputs split
    differently (a mask, bias, lengths, segment ids or sinks split over the
    batch or the heads beside replicated q, k, v) are first brought to one
    split per dimension, as broadcasting does in plain JAX, and key positions
    split over a mesh axis are gathered (a sequence split that is not
    gathered is context parallelism: ``axis_name``). The XLA path and the
    kernels then keep the batch, head and query splits.

    Blocks that the causal mask, the local window or the key padding hide
    entirely are skipped, not computed and masked: causal attention does
    about half the work of full attention, a window of width ``w`` about
    ``T * w``. Blocks past the longest ``key_value_seq_lengths`` (and query
    blocks past the longest ``query_seq_lengths``) are skipped too; under
    ``vmap`` over examples with lengths of their own, the longest over the
    vmapped examples too (a block that some of them visit is computed for
    all, and masked for the others).

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
      scale: the factor of ``q . k``; default ``1 / sqrt(H)``. A number or a
        concrete 0-d array scales the float32 scores. A traced value (under
        ``jit`` or a derivative with respect to it) is applied to ``query``
        in its dtype before the call, and differentiated: for 16-bit inputs
        that is one more rounding, about 8x the error of a static scale
        (measured in bfloat16), so pass it as a static argument where you
        can.
      is_causal: query ``i`` sees keys ``j <= i`` (jax.nn's ``tril`` of the
        ``[T, S]`` matrix, aligned at the top left).
      query_seq_lengths: optional int ``[B]``: queries ``t >= length`` see no
        key (output 0).
      key_value_seq_lengths: optional int ``[B]``: keys ``s >= length`` are
        hidden.
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys
        ``i - left <= j <= i + right``, as in jax.nn.
      implementation: which code runs, as in jax.nn (static):

        - ``None`` (default): the Pallas kernels where the program is
          lowered for a CUDA GPU and they support the call, else the XLA
          block path. Chosen by the platform the program is *lowered* for
          (as :func:`jax.lax.platform_dependent` does), not by the default backend:
          :func:`jax.export` for CUDA from a CPU gets the kernels (jax
          0.11 and later need an abstract GPU device named by the
          context's abstract mesh there, as for every Pallas kernel: the
          recipes show it). The kernels lack only float64, head dims
          ``H > 256``, chunk sizes that are not powers of two of at least
          16, and symbolic shapes
          (:func:`jax.export` shape polymorphism, a ``vmap`` of the op over
          a symbolic axis included); those calls take the XLA path. A
          program lowered for several platforms at once (one
          :func:`jax.export` for CPU and CUDA) gets each platform's path.
          On a mesh with ``Explicit`` axes (sharding in types) the kernels
          run shard by shard in a ``shard_map`` over the batch and the query
          heads as the query is split (their key/value heads with them, or
          one replicated); a split of query or key positions is gathered
          for them. Query heads split into more shards than the key/value
          heads divide into (tensor parallelism past them) get ``key`` and
          ``value`` repeated to ``lcm(K, shards)`` heads split with them,
          on every path: each device computes its own query heads only.
          Inside a ``vmap`` whose mapped axis is split over such an axis
          (Pallas takes no operand typed on a mesh axis outside a
          ``shard_map``), the kernels run on each shard's part of the
          mapped axis in a ``shard_map`` over it. Under a ``jit`` that XLA
          splits by itself (arrays on an ``Auto`` mesh), which cannot split
          a Pallas call, a :func:`jax.experimental.custom_partitioning`
          runs them on each device's shard, split likewise (a split they
          cannot take is gathered for them); not in a :func:`jax.export`,
          which cannot serialise one.
        - ``"xla"``: the block path (loops of XLA ops), on every platform.
        - ``"pallas"``: the Pallas kernels (Triton on a CUDA GPU): a
          FlashAttention-2 forward, and a backward of one program per key
          block (dK, dV) and one per query block (dQ), with every option
          above. On other platforms they run in Pallas interpret mode (slow:
          for tests and debugging; inside ``shard_map``, gradients need
          ``check_vma=False``). A call the kernels lack raises a
          ``ValueError`` naming it. With a ``bias``, the backward holds the
          float32 ``[B, N, T, S]`` score gradient before summing it to the
          bias's shape. Forward mode and second derivatives differentiate
          the XLA path's forward and backward (the same functions: a Pallas
          call has no derivative).
        - ``"cudnn"``: :func:`jax.nn.dot_product_attention` with
          ``implementation="cudnn"`` (a CUDA GPU only). It takes float16 and
          bfloat16, a left window (or causal) only, and none of
          ``soft_cap``, ``sinks``, segment ids or chunk sizes: each raises a
          ``ValueError`` naming it. Its results are cuDNN's: where a row
          sees no key, or masked values hold NaN, they follow cuDNN, not the
          semantics below, and they have not been measured here.
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
        if smaller. ``T`` need not be a multiple. Given, it is the query
        block of every Pallas kernel too (whose own defaults, per kernel,
        head dim and float32 or 16-bit inputs, are ``LAUNCHES`` in
        ``jsoftmax/_attention_pallas.py``: blocks that fit an H100's
        registers and shared memory). Chunk sizes replace the kernels'
        blocks but not their warps and stages, and blocks larger than those
        defaults can spill registers on a GPU (``triton_kernels`` and
        ``compile_sm90`` in ``bench/triton_sm90.py`` build a call's kernels
        for an H100 on a CPU and report their registers and spills).
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
      axis_name: context parallelism (static): inside :func:`jax.shard_map`,
        the mesh axis over which the query and key/value sequence axes are
        split (as for the other ops, the softmax's axis, here the keys, lies
        across devices). ``query``, ``key``, ``value`` and segment ids are the
        local slices; ``query_seq_lengths`` and ``key_value_seq_lengths``
        stay global ``[B]`` and replicated. A ``bias`` or ``mask`` is split
        along with the sequence: its query axis with the queries (or 1), and
        its key axis either whole (all ``S`` keys, in the layout's order, for
        example a ``[B, N, T, S]`` bias split over ``T``) or, where its query
        axis is 1, split with the keys (``[B, 1, 1, S]``, which then travels
        with K/V). With one key per device, a key axis of 1 is this device's
        key where the query axis is 1 (where every device holds the same, that
        is also the broadcast), and is refused as ambiguous otherwise. Values,
        ``lse`` and gradients equal the unsharded op's, for
        every option above. Blocks that the causal mask or window hide across
        devices are skipped. Each pair runs the implementation the call
        names: under ``None``, the Pallas kernels where the program is
        lowered for CUDA, the XLA block path elsewhere.
      context_parallel: ``"ring"`` (default): ``n`` steps; each attends the
        local queries to the visiting K/V and merges the partial
        ``(o, L)``, ``L = log(e^L_a + e^L_b)``, ``o = e^(L_a - L) o_a +
        e^(L_b - L) o_b``, after sending K/V on with ``lax.ppermute``
        (issued before the step's compute). Forward: ``n - 1`` permutes per
        array that travels (K, V, key segment ids and a bias or mask split
        with the keys); backward: the ring again, the other way round
        (``n - 1`` per array), and ``n`` permutes of dK, dV (and of the split
        bias's gradient), which travel with their K/V and arrive home.
        ``"all_gather"``: K/V (and what is split with the keys) are gathered
        (one all-gather per array, forward and backward) and dK, dV
        reduce-scattered: cheaper with few key/value heads, and it holds the
        whole K/V on every device. Both modes run these collectives once
        per group of key/value heads, the groups one after another, each
        group's K/V the size of ``1 / groups`` of them: the fewest groups
        with at most an eighth of the query heads each (or one key/value
        head) whose K/V-sized buffers (the ring's visiting and arriving K,
        V, dK and dV; all-gather's gathered ones) hold no more elements than
        the local queries (8 heads, or 64 query heads over 8 key/value
        heads: one key/value head at a time; a single key/value head: one
        group). The K/V bytes sent are those of one pass; what every head
        shares (key segment ids, a one-head bias or mask split with the
        keys) travels once per group.
      context_layout: ``"contiguous"`` (default): device ``i`` holds the
        ``i``-th slice. ``"zigzag"``: the sequence is cut into ``2n`` chunks
        and device ``i`` holds chunks ``i`` and ``2n - 1 - i``
        (:func:`to_zigzag` reorders a global array so that a contiguous split
        does that; :func:`from_zigzag` undoes it): under a causal mask every
        device computes the same number of blocks (measured on 4 devices,
        ``T = 64``, blocks of 4: 34 each, against 10, 26, 42 and 58
        contiguous).

    Returns:
      The attention output, ``query``'s shape and dtype; with
      ``return_residual``, ``(output, lse)``, ``lse`` in the output's dtype
      (float32 for 8-bit inputs, whose formats lack ``-inf`` or its range:
      float8_e4m3fn ends at 448). float16 and bfloat16 inputs run
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
      meets zero probabilities in a matmul and reaches the rows of its block
      that see a key, as in jax.nn; rows that see none stay 0, and it
      reaches no gradient through them. Block pairs that are never computed
      keep it out: those the causal mask or a window hides whole, and those
      whose segment ids' ranges are apart in every example of the batch.

    Raises:
      ValueError: with ``axis_name``: an axis name not bound here (outside
        ``shard_map``), a sequence length not divisible by ``2n`` under
        ``"zigzag"`` (both named), a bias or mask not split along with the
        sequence. ``implementation="pallas"`` off a CUDA GPU (Pallas'
        interpreter) inside ``shard_map(check_vma=True)`` on operands that
        vary over its axes, for its gradient and for a forward pass with
        sinks or lengths (JAX cannot lower the interpreter there; pass
        ``check_vma=False``). Shapes that do not fit (named):
        ranks, batch, head counts (``N % K``), head dims,
        bias/mask/lengths/segment ids/sinks, chunk sizes that are not positive
        ints, a ``local_window_size`` that is not an int or a pair of ints,
        NumPy 64-bit segment ids past int32's range where 64-bit types are off
        (JAX would wrap them into it), an empty sequence, a symbolic sequence
        length ``T`` or ``S`` under :mod:`jax.export` (the block schedule is
        static; a symbolic batch is supported); an unknown
        ``implementation``, or an option that ``"pallas"`` or ``"cudnn"``
        lacks (named), ``"pallas"`` inside a
        ``vmap`` of symbolic size whose mapped axis is split over an
        ``Explicit`` mesh axis.
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
    implementation = _implementation_name(implementation)
    _parallel_names(context_parallel, context_layout)
    if isinstance(implementation, str) and implementation == "cudnn":
        lacking = {
            "query_segment_ids": query_segment_ids,
            "key_value_segment_ids": key_value_segment_ids,
            "soft_cap": soft_cap,
            "sinks": sinks,
            "query_chunk_size": query_chunk_size,
            "key_chunk_size": key_chunk_size,
            "axis_name": axis_name,
        }
        return _cudnn(
            query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
            key_value_seq_lengths, local_window_size, lacking, return_residual,
        )  # fmt: skip
    parallel = _parallel_options(axis_name, context_parallel, context_layout)
    if parallel is not None:
        scores, bias, mask = (bias, mask), None, None
    args = _prepare(
        query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
        key_value_seq_lengths, local_window_size, query_segment_ids,
        key_value_segment_ids, soft_cap, sinks, query_chunk_size, key_chunk_size,
        implementation,
    )  # fmt: skip
    if parallel is None:
        batch, t, n, _ = args.arrays[0].shape
        config = _band_within(args.config, t, args.arrays[1].shape[1])
        if batch == 0 or n == 0:  # nothing to compute: the XLA path's empty output
            config = dataclasses.replace(config, implementation="xla")
        out, lse = traced_once(_attention_forward_mode)(*args.arrays, config)
    else:
        arrays, plan = _parallel_plan(args, *scores, *parallel)
        out, lse = cp.attention(*arrays, plan)
    out = out[..., : args.out_shape[-1]].reshape(args.out_shape).astype(args.out_dtype)
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
    implementation=None,
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
    q_len = _length_input(name, "query_seq_lengths", query_seq_lengths, (batch,))
    kv_len = _length_input(
        name, "key_value_seq_lengths", key_value_seq_lengths, (batch,)
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
    query_chunk = _chunk("query_chunk_size", query_chunk_size, xla.QUERY_CHUNK, t)
    key_chunk = _chunk("key_chunk_size", key_chunk_size, xla.KEY_CHUNK, s)
    lower, upper = _band(is_causal, local_window_size)
    soft_cap = _soft_cap(soft_cap)

    query, key, value = (widen_8bit(a) for a in (query, key, value))
    if h == 0:  # no features: one of zeros gives the same scores; sliced away
        pad = ((0, 0),) * 3 + ((0, 1),)
        query, key, value = (jnp.pad(a, pad) for a in (query, key, value))
        h = 1
    query, scale = _scale(query, scale, h)
    # float32/float64 queries are scaled before the matmul (T x H products
    # instead of T x S); 16-bit ones keep their rounding and the float32
    # scores are scaled.
    prescaled = jnp.finfo(query.dtype).bits >= 32
    # The kernels' blocks: the chunk sizes as given (checked by _chunk).
    kernel_chunks = tuple(
        None if c is None else operator.index(c)
        for c in (query_chunk_size, key_chunk_size)
    )
    config = _Config(
        scale, prescaled, lower, upper, soft_cap, query_chunk, key_chunk,
        _implementation(
            implementation, query.dtype, h, *kernel_chunks, (query.shape, key.shape)
        ),
        *kernel_chunks,
    )  # fmt: skip
    # Inside shard_map(check_vma=True), every differentiable input varies
    # over the mesh axes any input varies over: then a replicated bias or
    # sinks (or k, v) gets one cotangent part per shard, which JAX sums.
    arrays = (query, key, value, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)
    dims = _dims(query, key, bias, mask)
    arrays = share_shardings(arrays, dims, whole=("keys",))
    arrays[1:3] = _kv_heads_with_queries(*arrays[:3])
    arrays = varying_like(arrays[:5], *arrays) + arrays[5:]
    return _Prepared(tuple(arrays), config, out_shape, out_dtype)


def _kv_heads_with_queries(query, key, value):
    """``key`` and ``value`` with each head repeated ``r`` times in a row,
    split as the query heads are, where those are split over ``Explicit``
    mesh axes into more shards than the key/value heads divide into (tensor
    parallelism past the key/value heads: 4 query heads over 4 devices with
    2 key/value heads): ``lcm(K, shards)`` heads, which the shards divide.
    Each shard then holds the key/value heads of its own query heads, and
    the XLA path and the kernels compute only those; otherwise each shard
    gathers every head and computes all of them (the kernels), or the query
    heads are moved between shards to split the groups (the XLA path), where
    their number allows. One key/value head stays as it is: each shard uses
    it whole. The repeat's transpose sums the repeated heads' cotangents."""
    heads = mesh_spec(query)[2]
    kv_heads = key.shape[2]
    if heads is None or kv_heads == 1 or kv_heads % shards(heads) == 0:
        return key, value
    repeats = math.lcm(kv_heads, shards(heads)) // kv_heads
    # The batch keeps its split, less the heads' axes (a mix that puts them
    # on k's batch: gathered there).
    batch = tuple(a for a in mesh_spec(key)[0] or () if a not in heads) or None

    def spread(x):
        x = jax.sharding.reshard(x, jax.P(batch))  # the heads whole
        return jax.sharding.reshard(
            jnp.repeat(x, repeats, axis=2), jax.P(batch, None, heads)
        )

    return spread(key), spread(value)


def _dims(query, key, bias, mask):
    """The logical dimensions of the rule's arrays' axes, for
    :func:`share_shardings`: each of batch, query positions and query heads
    split one way in all of them on an ``Explicit`` mesh (a mask or lengths
    split over the batch beside replicated q, k, v). The key positions, over
    which each row's softmax runs block by block, are gathered where split
    (splitting them is context parallelism: ``axis_name``). The key/value
    heads are the query heads' only without grouping; the head dims, which
    the matmuls contract, are left alone."""
    kv_heads = "heads" if key.shape[2] == query.shape[2] else "kv_heads"
    full = ("batch", "heads", "queries", "keys")
    shape = query.shape[:1] + query.shape[2:3] + query.shape[1:2] + key.shape[1:2]
    return (
        ("batch", "queries", "heads", None),
        ("batch", "keys", kv_heads, None),
        ("batch", "keys", kv_heads, None),
        broadcast_dims(bias, shape, full),
        ("heads",),
        broadcast_dims(mask, shape, full),
        ("batch",),
        ("batch",),
        ("batch", "queries"),
        ("batch", "keys"),
    )


def _parallel_names(mode, layout):
    """Checks ``context_parallel`` and ``context_layout`` (every call, with
    or without ``axis_name``, whatever the implementation)."""
    for what, value, allowed in (
        ("context_parallel", mode, cp.MODES),
        ("context_layout", layout, cp.LAYOUTS),
    ):
        _require_static(what, value)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{_NAME}: {what} must be one of {allowed}, got {value!r}")


def _parallel_options(axis_name, mode, layout):
    """``(axis_name, size, mode, layout)`` for a context-parallel call (checked),
    or None without ``axis_name``."""
    name = _NAME
    _parallel_names(mode, layout)
    if axis_name is None:
        return None
    axis_name = axis_names(axis_name)
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{name}: axis_name {axis_name!r} is not a mesh axis here: context "
            "parallelism runs inside jax.shard_map (or pmap / vmap with that axis "
            "name), over the axis that splits the sequence"
        ) from None
    return axis_name, size, mode, layout


def _parallel_plan(args, bias, mask, axis_name, size, mode, layout):
    """The context-parallel rule's arrays and static plan: the bias and mask
    checked against the local sequence slices (their query axis split with
    the queries, their key axis split with the keys or whole)."""
    name = _NAME
    query, key = args.arrays[:2]
    batch, t, heads, _ = query.shape
    s = key.shape[1]
    if layout == "zigzag" and (t % 2 or s % 2):
        length, local = ("T (query", t) if t % 2 else ("S (key/value", s)
        raise ValueError(
            f"{name}: context_layout='zigzag' cuts the sequence into 2 * axis size "
            f"chunks: the sequence length {length} axis) {local * size} must be "
            f"divisible by 2 * {size} = {2 * size}"
        )
    bias, bias_keys = _split_scores("bias", bias, (batch, heads, t, s), size, True)
    mask, mask_keys = _split_scores("mask", mask, (batch, heads, t, s), size, False)
    q, k, v, _, sinks, _, q_len, kv_len, q_seg, kv_seg = args.arrays
    (bias,) = varying_like((bias,), *args.arrays)
    config = args.config
    config = dataclasses.replace(config, partials=True)
    groups = cp.head_groups(mode, size, t, s, heads, key.shape[2])
    if any(_sharded_axis(x, 2) for x in (query, key)):
        groups = 1  # heads split over an explicit mesh axis: no slicing them
    plan = cp.Plan(
        config, axis_name, size, mode, layout, t, s, bias_keys, mask_keys, groups
    )
    return (q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg), plan


def _sharded_axis(x, axis):
    """Is ``x``'s ``axis`` split over an explicit mesh axis?"""
    spec = tuple(jax.typeof(x).sharding.spec)
    return axis < len(spec) and spec[axis] is not None


def _split_scores(what, x, local, size, float_mask):
    """A bias or mask of a context-parallel call as 4-D, and how its key axis
    is held: None (size 1, every key), ``"split"`` (this device's keys, which
    it travels with; also size 1 with one key per device) or ``"whole"`` (all
    keys, in the layout's order)."""
    if x is None:
        return None, None
    batch, heads, t, s = local
    shape = np.shape(x)
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    keys = None
    if shape[-1] != 1:
        keys = "whole" if shape[-1] == s * size else "split"
    elif s == 1 and size > 1:
        # One key per device: a key axis of 1 is this device's key (a mask
        # of the local keys, as flax builds one) or every key (broadcast),
        # the same where the query axis is 1 and every device holds the same.
        if shape[2] != 1:
            raise ValueError(
                f"{_NAME}: with axis_name and one key per device (local key "
                f"length 1), a {what} of local shape {np.shape(x)} is ambiguous: "
                "its key axis of 1 may be this device's key or every key. "
                f"Broadcast its key axis to all {size} keys (in the layout's "
                "order), or give it a query axis of 1 (split with the keys)"
            )
        keys = "split"
    if shape[-1] not in (1, s, s * size) or (
        len(shape) == 4
        and (shape[2] not in (1, t) or (keys == "split" and shape[2] != 1))
    ):
        raise ValueError(
            f"{_NAME}: with axis_name, a {what} is split along with the sequence: "
            f"its query axis with the queries (local size {t}, or 1), and its key "
            f"axis whole ({s * size}, in the layout's order) or, where its query "
            f"axis is 1, with the keys (local size {s}); got local shape "
            f"{np.shape(x)}"
        )
    full = (batch, heads, t, s * size if keys == "whole" else s)
    return _scores_input(_NAME, what, x, full, float_mask), keys


def _cudnn(
    query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
    key_value_seq_lengths, local_window_size, lacking, return_residual,
):  # fmt: skip
    """``jax.nn.dot_product_attention(implementation="cudnn")``, after refusing
    what cuDNN's fused attention lacks (named)."""
    name = _NAME
    for what, value_ in lacking.items():
        if value_ is not None:
            raise ValueError(
                f"{name}: implementation='cudnn' has no {what} (jax.nn's cuDNN "
                "attention lacks it); use implementation=None, 'pallas' or 'xla'"
            )
    query, key, value = _qkv(query, key, value)
    if query.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(
            f"{name}: implementation='cudnn' takes float16 or bfloat16 inputs, got "
            f"{query.dtype}; use implementation=None, 'pallas' or 'xla'"
        )
    lower, upper = _band(is_causal, local_window_size)
    if local_window_size is not None:
        if upper != 0:
            raise ValueError(
                f"{name}: implementation='cudnn' supports a local_window_size with "
                f"no right part (or causal), got {local_window_size!r}"
            )
        local_window_size = (-lower, 0)
    # [B] lengths; unbatched inputs take [1], as on the other paths.
    shape = (query.shape[0] if query.ndim == 4 else 1,)
    lengths = [
        _length_input(name, what, x, shape)
        for what, x in (("query_seq_lengths", query_seq_lengths),
                        ("key_value_seq_lengths", key_value_seq_lengths))
    ]  # fmt: skip
    return jax.nn.dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=bool(is_causal),
        query_seq_lengths=lengths[0], key_value_seq_lengths=lengths[1],
        local_window_size=local_window_size, implementation="cudnn",
        return_residual=return_residual,
    )  # fmt: skip


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
    # Ids past int32's range are refused: clamping could merge two segments.
    q_seg = _int_input(
        name, "query_segment_ids", query_segment_ids, seg_shapes[0], saturate=False
    )
    kv_seg = _int_input(
        name,
        "key_value_segment_ids",
        key_value_segment_ids,
        seg_shapes[1],
        saturate=False,
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
    """The scale as a float where it is concrete (a number, a 0-d array);
    a traced one is applied to ``query`` here, where autodiff sees it (then
    1.0)."""
    name = _NAME
    if scale is None:
        return query, 1.0 / math.sqrt(h)
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"{name}: scale must be a real number, got {scale!r}")
    if np.ndim(scale) != 0:
        raise ValueError(f"{name}: scale must be a scalar, got shape {np.shape(scale)}")
    if number_kind(scale) is None:
        # A complex scale would lose its imaginary part in the cast below.
        raise TypeError(f"{name}: scale must be a real number, got {scale!r}")
    if not isinstance(scale, jax.core.Tracer):  # a number or a concrete array
        if not math.isfinite(float(scale)):  # every score would be NaN or inf
            raise ValueError(f"{name}: scale must be finite, got {scale!r}")
        return query, float(scale)
    query = (query * jnp.asarray(scale, query.dtype)).astype(query.dtype)
    return query, 1.0


def _soft_cap(soft_cap):
    """A static, positive, finite soft cap as a float (or None)."""
    name = _NAME
    if soft_cap is None:
        return None
    _require_static("soft_cap", soft_cap)
    if number_kind(soft_cap) is None:
        raise TypeError(f"{name}: soft_cap must be a real number, got {soft_cap!r}")
    value = float(soft_cap)
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
    without gradient, in the output's dtype; float32 for 8-bit inputs, where
    ``-inf`` (or, in float8_e4m3fn, anything past 448) would be NaN."""
    query = args.arrays[0]
    batch, t, n, _ = query.shape
    lse = xla.reshape(lax.stop_gradient(lse), (batch, n, t), query, (0, 2, 1))
    lse = lse.transpose(0, 2, 1)
    dtype = args.out_dtype if jnp.finfo(args.out_dtype).bits > 8 else jnp.float32
    return lse.reshape(args.out_shape[:-1]).astype(dtype)


def _scores_input(name, what, x, full, float_mask):
    """bias or mask, at most 4-D, with leading axes added (as in jax.nn)."""
    if x is None:
        return None
    if float_mask:
        x = widen_8bit(float_input(name, x))
    else:
        x = as_input(x)
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


def _int_input(name, what, x, shape, *, saturate):
    if x is None:
        return None
    x = as_int_input(name, what, x, saturate=saturate)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: {what} must be integers, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name}: {what} of shape {x.shape} must be {shape}")
    return x


def _length_input(name, what, x, shape):
    """Checked sequence lengths (None stays None) as int32: NumPy 64-bit
    values are clamped to int32's range on the host (see as_int_input)."""
    return _lengths(_int_input(name, what, x, shape, saturate=True))


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
    if number_kind(size) != "i":
        raise ValueError(f"{_NAME}: {what} must be a positive int, got {size!r}")
    size = operator.index(size)
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


def _band_within(config, t, s):
    """``config`` with the band's bounds that hide nothing dropped, and the
    others clamped to the span of ``key - query``, ``[-(t - 1), s - 1]``: a
    window of ``2**31 - 1`` or ``10**12`` (a placeholder for "unbounded")
    shows every key, and the block arithmetic stays within int32. (Context
    parallelism does this per pair of chunks, on global positions.)"""
    lower, upper = config.lower, config.upper
    if lower is not None:
        lower = None if lower <= -(t - 1) else min(lower, s)
    if upper is not None:
        upper = None if upper >= s - 1 else max(upper, -t)
    return dataclasses.replace(config, lower=lower, upper=upper)


def _index(w):
    if number_kind(w) != "i":
        raise TypeError(f"{w!r} is not an int")
    return operator.index(w)


# -- The rule -------------------------------------------------------------------


def _implementation_name(implementation):
    """``implementation`` with a NumPy string (a scalar or a 0-d array, which
    jax.nn compares as its string) as a ``str``; other values as given, for
    :func:`_implementation` to check."""
    if isinstance(implementation, np.ndarray) and implementation.shape == ():
        implementation = implementation[()]
    if isinstance(implementation, str):  # np.str_ too
        return str(implementation)
    return implementation


def _implementation(implementation, dtype, h, query_chunk_size, key_chunk_size, shapes):
    """The rule's implementation for ``implementation=`` (checked)."""
    _require_static("implementation", implementation)
    named = implementation is None or isinstance(implementation, str)
    if not named or implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"{_NAME}: implementation must be one of {_IMPLEMENTATIONS}, got "
            f"{implementation!r}"
        )
    if implementation == "xla":
        return "xla"
    why = pallas.unsupported(dtype, h, query_chunk_size, key_chunk_size, shapes)
    if implementation == "pallas":
        if why is not None:
            raise ValueError(f"{_NAME}: implementation='pallas' does not support {why}")
        return "pallas"
    return "xla" if why is not None else "auto"


@partial(jax.custom_vjp, nondiff_argnums=(10,))
def _attention(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config):
    return _attention_fwd(
        q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config
    )[0]


def _attention_fwd(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, config):
    args = (q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)
    out, lse = dispatch.forward(config, *args)
    return (out, lse), (*args, out, lse)


# P = exp(s - L);  D = rowsum(dO * O);  dS = P * (dP - D) with dP = dO V^T
# dV = P^T dO;  dQ = dS' K * scale;  dK = dS'^T Q * scale;  dbias = dS
# (dS' = dS * (1 - tanh^2) under the soft cap);  dsink = -sum_rows e^(sink-L) D
def _attention_bwd(config, res, cotangents):
    d_out = cotangents[0]  # lse is returned without gradient (stop_gradient)
    grads = dispatch.backward(config, res, d_out)
    return tuple(grads) + (None,) * 5  # mask, lengths, segment ids


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_tangent(statics, res, t_leaves):
    """Forward mode: JAX's own ``jax.jvp`` of the forward pass recomputed from
    the residuals (which hold all its inputs): no second hand-written
    derivative, and cheaper than transposing ``_attention_bwd``, whose scans
    would save every block's intermediates. It is the XLA path's forward
    whichever implementation the call runs (Pallas calls have no JVP)."""
    (config,) = statics
    return dispatch.recomputed_tangent(
        lambda *args: xla.forward(*args, config)[0], res, t_leaves
    )


_attention_forward_mode = _with_forward_mode(
    _attention, tangent=_attention_tangent, keep_traces=True
)

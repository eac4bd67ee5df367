"""flax's ``attention_fn`` signature over :func:`jsoftmax.dot_product_attention`.

flax is optional: nothing here imports it. The adapter only accepts the
arguments that ``flax.nnx.MultiHeadAttention`` and
``flax.linen.MultiHeadDotProductAttention`` pass to their ``attention_fn``
(flax 0.12.8) and maps them onto jsoftmax's attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax._attention import dot_product_attention


def flax_attention_fn(
    query: jax.typing.ArrayLike,
    key: jax.typing.ArrayLike,
    value: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.typing.ArrayLike | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: jax.typing.DTypeLike | None = None,
    precision: Any = None,
    module: Any = None,
    promote_dtype: Callable[..., Any] | None = None,
    is_causal: bool = False,
    *,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Any] | None = None,
    qk_attn_weights_einsum: Callable[..., Any] | None = None,
    attn_weights_value_einsum: Callable[..., Any] | None = None,
    implementation: Literal["xla", "pallas", "cudnn"] | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    axis_name: Hashable | None = None,
    context_parallel: Literal["ring", "all_gather"] = "ring",
    context_layout: Literal["contiguous", "zigzag"] = "contiguous",
) -> jax.Array:
    r"""jsoftmax's attention with the signature of flax's ``attention_fn``.

    Pass it to a flax attention layer to run that layer's attention with
    :func:`jsoftmax.dot_product_attention` (block-wise, the ``T x S`` scores
    never held, a hand-written backward pass):

    .. code-block:: python

        nnx.MultiHeadAttention(..., attention_fn=jsoftmax.flax_attention_fn)
        nn.MultiHeadDotProductAttention(..., attention_fn=jsoftmax.flax_attention_fn)

    The arguments are those of ``flax.nnx.dot_product_attention`` (in its
    order) and, keyword-only, the extra ones of
    ``flax.linen.dot_product_attention`` (flax 0.12.8), then six of
    :func:`jsoftmax.dot_product_attention`'s that choose how it is computed,
    not what, to bind with :func:`functools.partial`:

    .. code-block:: python

        attention_fn=functools.partial(
            jsoftmax.flax_attention_fn, implementation="cudnn"
        )
        # context parallelism: the layer inside a shard_map over "seq"
        attention_fn=functools.partial(
            jsoftmax.flax_attention_fn, axis_name="seq", context_layout="zigzag"
        )

    Where every query
    row sees at least one key, the output is flax's attention,

    .. math::

        o_i = \sum_j \operatorname{softmax}_j\!\left(
        \frac{q_i \cdot k_j}{\sqrt{H}} + b_{ij}\right) v_j
        \quad\text{over the keys } j \text{ the mask leaves visible},

    equal to float32 rounding in values and in gradients where the scores are
    moderate (near one-hot rows: see :func:`jsoftmax.dot_product_attention`).

    Args:
      query: ``[batch..., T, N, H]``, any number of batch axes (also none).
      key: ``[batch..., S, K, H]``, ``N % K == 0`` (grouped-query attention).
      value: the shape of ``key``.
      bias: optional, added to the scores; broadcastable to
        ``[batch..., N, T, S]``.
      mask: optional, broadcastable to ``[batch..., N, T, S]``, any dtype: a
        query attends to a key where the mask is nonzero (``True``, ``1.0``,
        but also ``0.5``, ``-1`` or NaN), as flax's
        ``jnp.where(mask, scores, big_neg)`` reads it. The float 0/1 masks
        of ``nnx.make_attention_mask``, ``make_causal_mask`` and
        ``combine_masks`` (and their linen twins) work as they are.
      broadcast_dropout: accepted; dropout is not supported.
      dropout_rng: accepted and ignored: no dropout is ever applied.
      dropout_rate: must not be positive unless ``deterministic``
        (evaluation, where flax applies no dropout either).
      deterministic: with ``True``, any ``dropout_rate`` is accepted.
      dtype: the computation dtype: ``query``, ``key`` and ``value`` are
        cast to it (default: their promoted dtype, at least floating), and
        the output has it. float16 and bfloat16 run their matmuls in that
        dtype with float32 accumulation, and the scores and probabilities
        are float32.
      precision: the default only: ``None``, ``lax.Precision.DEFAULT`` or
        ``lax.DotAlgorithmPreset.DEFAULT`` (or their names). The matmuls
        take their precision from ``jax_default_matmul_precision`` in the
        forward and the backward pass; to raise it, leave ``precision`` unset
        and run the step under ``jax.default_matmul_precision("highest")``.
      module: must be ``None``: the attention weights are never formed, so
        they cannot be sown (``sow_weights=True`` in flax's layers).
      promote_dtype: optional, flax nnx's convention:
        ``promote_dtype((query, key, value), dtype=dtype)`` returns the three
        arrays cast; by default they are cast as flax nnx's default
        ``promote_dtype`` does.
      is_causal: query ``i`` sees keys ``j <= i``, on top of ``mask``
        (nnx's ``is_causal``; the ``[T, S]`` lower triangle, aligned at the
        top left).
      force_fp32_for_softmax: accepted (linen): the softmax is at least
        float32 whatever it is.
      einsum_dot_general: must be ``None`` (linen).
      qk_attn_weights_einsum: must be ``None`` (linen's custom einsums, as
        AQT quantization uses, cannot reach jsoftmax's block matmuls).
      attn_weights_value_einsum: must be ``None``, as above.
      implementation: as :func:`jsoftmax.dot_product_attention`'s: ``None``
        (default: the Pallas kernels where the program is lowered for CUDA,
        the XLA block path elsewhere), ``"xla"``, ``"pallas"`` (on a CPU in
        Pallas interpret mode: slow, for tests) or ``"cudnn"`` (16-bit
        inputs on a CUDA GPU only; its rows that see no key differ, as that
        function's docstring says).
      query_chunk_size: the query block size, as
        :func:`jsoftmax.dot_product_attention`'s.
      key_chunk_size: the key block size, as above.
      axis_name: context parallelism, as
        :func:`jsoftmax.dot_product_attention`'s: inside
        :func:`jax.shard_map`, the mesh axis over which the sequence is
        split. The layer's inputs are then local slices of the sequence, and
        so are ``mask`` and ``bias``: their query axis is split with the
        queries (or 1), and their key axis is whole (all ``S`` keys, in the
        layout's order) or, where their query axis is 1, split with the keys
        (a key padding mask ``[batch, 1, 1, S]``). A mask that flax's
        ``make_attention_mask`` builds from two local slices is local in both
        axes: build it from a query input of length 1. For a causal mask
        across devices, pass ``is_causal=True``: to an nnx layer's call
        (nnx passes its own ``is_causal``, which overrides a bound one), or
        bound with :func:`functools.partial` for linen (whose layers pass
        none).
      context_parallel: ``"ring"`` (default) or ``"all_gather"``, as above.
      context_layout: ``"contiguous"`` (default) or ``"zigzag"``, as above.

    Returns:
      ``[batch..., T, N, H]`` in the computation dtype. A query row that sees
      no key (all masked, as a padded query under ``make_attention_mask``)
      has output 0 and passes no gradient to any input; flax gives the mean
      of ``value`` there (its masked scores are ``finfo.min``, not
      ``-inf``).

    Raises:
      ValueError: ``dropout_rate > 0`` with ``deterministic=False``; a
        ``module`` (sown weights); a ``precision`` other than the default;
        a custom einsum; ranks, batch axes or a ``bias``/``mask`` shape that
        do not fit (named); and the shapes
        :func:`jsoftmax.dot_product_attention` refuses (heads that do not
        divide, an empty sequence), and what it refuses of
        ``implementation``, the chunk sizes and the context-parallel
        options.
      TypeError: complex inputs, as :func:`jsoftmax.dot_product_attention`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 4))
      >>> causal = jnp.tril(jnp.ones((5, 5)))  # a float 0/1 mask, as flax makes
      >>> out = jsoftmax.flax_attention_fn(
      ...     q, k, v, mask=causal, dropout_rate=0.1, deterministic=True
      ... )
      >>> want = jsoftmax.dot_product_attention(q, k, v, is_causal=True)
      >>> out.shape, bool(jnp.allclose(out, want, atol=1e-6))
      ((2, 5, 2, 4), True)
      >>> jsoftmax.flax_attention_fn(q, k, v, dropout_rate=0.1)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
        ...
      ValueError: flax_attention_fn: attention dropout is not supported ...
    """
    name = "flax_attention_fn"
    _refuse_unsupported(
        name,
        dropout_rate,
        deterministic,
        module,
        precision,
        einsum_dot_general,
        qk_attn_weights_einsum,
        attn_weights_value_einsum,
    )
    if promote_dtype is None:
        query, key, value = _promote(query, key, value, dtype)
    else:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    if not (query.ndim >= 3 and key.ndim == query.ndim == value.ndim):
        raise ValueError(
            f"{name}: query, key and value must be [batch..., T, N, H] / "
            f"[batch..., S, K, H] with the same batch axes, got query "
            f"{query.shape}, key {key.shape} and value {value.shape}"
        )
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
        raise ValueError(
            f"{name}: query, key and value must have the same batch axes, got "
            f"query {query.shape}, key {key.shape} and value {value.shape}"
        )
    # With axis_name, a key axis may hold all keys: dot_product_attention
    # checks it against the axis size.
    keys = key.shape[-3] if axis_name is None else None
    scores = batch + (query.shape[-2], query.shape[-3], keys)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            mask = mask.astype(jnp.bool_)  # nonzero (and NaN) attends
    bias = _scores_input(name, "bias", bias, scores)
    mask = _scores_input(name, "mask", mask, scores)
    if len(batch) > 1:
        flat = math.prod(batch)
        query, key, value = (
            x.reshape((flat,) + x.shape[-3:]) for x in (query, key, value)
        )
    out = dot_product_attention(
        query,
        key,
        value,
        bias,
        mask,
        is_causal=is_causal,
        implementation=implementation,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        axis_name=axis_name,
        context_parallel=context_parallel,
        context_layout=context_layout,
    )
    return out.reshape(batch + out.shape[-3:])


def _refuse_unsupported(
    name,
    dropout_rate,
    deterministic,
    module,
    precision,
    einsum_dot_general,
    qk_attn_weights_einsum,
    attn_weights_value_einsum,
):
    """The ValueErrors for what flax's attention does and jsoftmax's cannot."""
    if not deterministic and dropout_rate > 0:
        raise ValueError(
            f"{name}: attention dropout is not supported (dropout_rate="
            f"{dropout_rate} with deterministic={deterministic}): jsoftmax never "
            "forms the attention weights that dropout would drop. Set "
            "dropout_rate=0 (or deterministic=True for evaluation), or use flax's "
            "own attention_fn for training with attention dropout"
        )
    if module is not None:
        raise ValueError(
            f"{name}: module={type(module).__name__} asks to sow the attention "
            "weights (sow_weights=True), but jsoftmax never forms them; call the "
            "layer with sow_weights=False, or use flax's attention to inspect them"
        )
    parts = precision if isinstance(precision, (tuple, list)) else (precision,)
    if not all(_default_precision(p) for p in parts):
        raise ValueError(
            f"{name}: precision={precision!r} is not supported: jsoftmax's matmuls "
            "take their precision from jax_default_matmul_precision in the forward "
            "and the backward pass. Leave precision unset and run the step under "
            'jax.default_matmul_precision("highest")'
        )
    for what, einsum in (
        ("einsum_dot_general", einsum_dot_general),
        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
        ("attn_weights_value_einsum", attn_weights_value_einsum),
    ):
        if einsum is not None:
            raise ValueError(
                f"{name}: {what} is not supported: jsoftmax's block matmuls cannot "
                "use a custom einsum or dot_general (e.g. AQT quantization)"
            )


def _promote(query, key, value, dtype):
    """Cast to ``dtype``, or to the inputs' promoted dtype made floating, as
    ``flax.nnx.promote_dtype`` does."""
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
        if not jnp.issubdtype(dtype, jnp.inexact):
            with jax.numpy_dtype_promotion("standard"):  # ints and bools: float32
                dtype = jnp.promote_types(jnp.float32, dtype)
    return tuple(jnp.asarray(x, dtype) for x in (query, key, value))


def _scores_input(name, what, x, scores):
    """A bias or mask broadcastable to ``scores = [batch..., N, T, S]`` (an
    ``S`` of None: any size), with several batch axes merged into one (as
    the inputs are)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    ok = x.ndim <= len(scores) and all(
        d == 1 or f in (d, None)
        for d, f in zip(x.shape[::-1], scores[::-1], strict=False)
    )
    if not ok:
        shown = ", ".join("S" if d is None else str(d) for d in scores)
        raise ValueError(
            f"{name}: {what} of shape {x.shape} does not broadcast to the scores "
            f"[batch..., N, T, S] = ({shown})"
        )
    batch_axes = len(scores) - 3
    if batch_axes <= 1:
        return x
    x = x.reshape((1,) * (len(scores) - x.ndim) + x.shape)
    if all(d == 1 for d in x.shape[:batch_axes]):
        return x.reshape((1,) + x.shape[batch_axes:])
    x = jnp.broadcast_to(x, scores[:batch_axes] + x.shape[batch_axes:])
    return x.reshape((math.prod(scores[:batch_axes]),) + x.shape[batch_axes:])


def _default_precision(p) -> bool:
    """Whether ``p`` asks for the default matmul precision: None,
    ``lax.Precision.DEFAULT`` or ``lax.DotAlgorithmPreset.DEFAULT`` in any
    spelling JAX reads (``"default"``, ``"DEFAULT"``); anything else, another
    dot algorithm preset or a name JAX does not know included, does not."""
    if p is None:
        return True
    if isinstance(p, str) and p in lax.DotAlgorithmPreset.__members__:
        p = lax.DotAlgorithmPreset[p]  # as jnp.einsum reads a preset's name
    if isinstance(p, lax.DotAlgorithmPreset):
        return p == lax.DotAlgorithmPreset.DEFAULT
    try:
        return lax.Precision(p) == lax.Precision.DEFAULT
    except (TypeError, ValueError):
        return False

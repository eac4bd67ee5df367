"""The block step of dot_product_attention on the implementation a call's
config names: the XLA block path, or the Pallas kernels where the program is
lowered for CUDA (interpret mode elsewhere under ``"pallas"``). The public
function's rule and context parallelism's pairs both call it.

``forward(config, q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)``
gives ``(out, lse)``; ``backward(config, res, d_out)`` the cotangents of q,
k, v, bias and sinks (the contracts of ``_attention_xla``).
"""

from __future__ import annotations

import itertools
import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import (
    ArrayMapping,
    CompoundFactor,
    SdyShardingRule,
    custom_partitioning,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jsoftmax import _attention_pallas as pallas
from jsoftmax import _attention_xla as xla
from jsoftmax._checks import (
    explicit_axes,
    mesh_spec,
    reshard_to,
    shards,
    spec_entries,
)
from jsoftmax._collectives import vma
from jsoftmax._platform import (
    by_platform,
    mesh_partition_spec,
    partitioned_by_xla,
    vmapped_mesh_axes,
)


def _on_platform(xla_fn, kernel_fn, layout, interpreter_fails):
    """``f(config, *args)``: the implementation ``config.implementation``
    names, chosen by the platform the program is lowered for (not the
    default backend), per platform even in a program lowered for several:
    ``kernel_fn(*args, config=, interpret=False)`` for CUDA, and elsewhere
    ``xla_fn(*args, config=)`` ("auto") or the kernels in interpret mode
    ("pallas"). Its derivatives (forward mode, and second derivatives
    through the backward pass) are ``xla_fn``'s, the same function: a Pallas
    call has none. ``"xla"`` calls ``xla_fn`` itself. On a mesh with
    ``Explicit`` axes the kernels run shard by shard, the arrays laid out by
    ``layout`` (see :func:`_per_shard`). ``interpreter_fails(*args)``: where
    the interpreted kernels are refused (see :func:`_interpretable`)."""

    def call(config, *args):
        xla_call = partial(xla_fn, config=config)
        if config.implementation == "xla":
            return xla_call(*args)
        pallas = config.implementation == "pallas"
        kernel, interpreted = (
            _per_shard(
                _interpretable(
                    partial(kernel_fn, config=config, interpret=True),
                    interpreter_fails,
                )
                if interpret
                else partial(kernel_fn, config=config, interpret=False),
                layout,
                xla_call,
                _refuse_vmapped_mesh_axes if pallas else xla_call,
                f"{kernel_fn.__module__}.{kernel_fn.__qualname__}"
                f"(config={config!r}, interpret={interpret})",
            )
            for interpret in (False, True)
        )
        default, symbolic, manual = xla_call, xla_call, ("cuda",)
        if pallas:
            default, symbolic, manual = (
                interpreted,
                _refuse_symbolic,
                ("cuda", "default"),
            )
        # Lowered with the program's devices named (see by_platform) only
        # where the kernels may run: JAX then refuses two meshes in one
        # program, as it does with jax.nn's cuDNN attention.
        partitions = pallas or jax.default_backend() == "gpu"
        return by_platform(
            args, cuda=kernel, default=default, symbolic=symbolic,
            derivative=xla_call, manual=manual, partitions=partitions,
        )  # fmt: skip

    return call


def _interpretable(kernel, fails):
    """``kernel`` (the kernels in Pallas' interpreter), refused with a
    ValueError saying so inside a ``shard_map`` that tracks variation
    (``check_vma=True``), where an operand varies over its axes and
    ``fails(*args)``: the interpreter mixes such operands with values of its
    own that do not vary, and JAX (0.10.2) refuses that when lowering it,
    asking for an issue. It does so for the backward kernels, and for the
    forward's with sinks or lengths; the forward's other options run. The
    kernels lowered for CUDA are not interpreted."""

    def run(*args):
        varying = set().union(*(vma(x) for x in jax.tree.leaves(args)))
        if varying and fails(*args):
            raise ValueError(
                "dot_product_attention: implementation='pallas' off a CUDA GPU "
                "runs the kernels in Pallas' interpreter, which JAX cannot "
                "lower inside shard_map with check_vma=True on operands that "
                f"vary over its axes {sorted(varying, key=str)} (its gradient, "
                "and its forward pass with sinks or lengths). Pass "
                "check_vma=False to shard_map, or use implementation=None or "
                "'xla' (lowered for a CUDA GPU, the kernels are not interpreted)"
            )
        return kernel(*args)

    return run


def _forward_fails(q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg):
    return sinks is not None or q_len is not None or kv_len is not None


def _backward_fails(*args):
    return True


def _per_shard(kernel, layout, twin, instead, name):
    """``kernel``, run shard by shard in a ``shard_map`` over the mesh's
    ``Explicit`` axes where it has some (a Pallas call takes no split
    operand). Pallas (its Triton lowering and its interpreter) refuses any
    operand typed on a mesh axis it does not hold manual: under a ``vmap``
    whose mapped axis is split over one, :func:`by_platform`'s batching rule
    runs this inside a ``shard_map`` over that axis; ``instead`` where it
    could not (a ``vmap`` of symbolic size, or a JAX whose ``vmap`` does not
    say which mesh axes it maps over). Where XLA splits the program by
    itself, ``kernel`` runs split alike through :func:`_partitioned`, which
    ``name`` (the kernel and its every option) identifies.

    ``layout(*args)`` gives the spec each array is split by for that (None
    for an absent one) and each output's: the batch and the query heads split
    as the query's are, what the kernels cannot split (query and key
    positions, head dims) whole. The arrays are resharded to it first, and
    the outputs to the shardings of ``twin``'s (the XLA path's, which keeps
    every split), as the platform choice needs of its branches. An output
    split over fewer axes than the inputs (d sinks, and d bias or d K/V
    where they are not split with the batch or the heads) is the ``psum`` of
    its shards' parts."""

    def run(*args):
        # Found when traced: a vmap of the op that no shard_map undid.
        if vmapped_mesh_axes():
            return instead(*args)
        axes = explicit_axes()
        if not axes:
            if partitioned_by_xla():
                return _partitioned(kernel, layout, name)(*args)
            return kernel(*args)
        leaves, tree = jax.tree.flatten(args)
        in_specs, out_specs = layout(*args)
        in_specs = [spec for spec in in_specs if spec is not None]
        leaves = [reshard_to(x, spec) for x, spec in zip(leaves, in_specs, strict=True)]
        split = set().union(*map(_axes, in_specs))
        present = []  # which outputs are not None

        def shard(*leaves):
            outs = _summed(kernel(*jax.tree.unflatten(tree, leaves)), out_specs, split)
            present[:] = [x is not None for x in outs]
            return [x for x in outs if x is not None]

        outs = jax.shard_map(
            shard,
            in_specs=tuple(P(*spec) for spec in in_specs),
            out_specs=[P(*spec) for spec in out_specs if spec is not None],
            axis_names=set(axes),
            check_vma=False,
        )(*leaves)
        targets = jax.make_jaxpr(twin)(*args).out_avals
        outs = iter(_like(x, t) for x, t in zip(outs, targets, strict=True))
        return tuple(next(outs) if here else None for here in present)

    return run


def _summed(outs, specs, split):
    """The outputs of one shard's kernels, each one split over fewer mesh
    axes than ``split`` (its spec in ``specs``) summed over the others."""
    # The specs, given before the outputs are known, name the same ones.
    assert [x is not None for x in outs] == [s is not None for s in specs], specs
    return [
        None if x is None else lax.psum(x, tuple(sorted(split - _axes(spec))))
        for x, spec in zip(outs, specs, strict=True)
    ]


def _partitioned(kernel, layout, name):
    """``kernel`` as a :func:`jax.experimental.custom_partitioning` that XLA
    runs shard by shard, where it splits the program by itself (see
    :func:`partitioned_by_xla`): split as :func:`_per_shard` splits it on an
    ``Explicit`` mesh, by the query's batch and head splits where the
    kernels can run them (:func:`_xla_split`), each other axis whole. XLA
    moves the operands to those splits (it gathers nothing the query's
    split already gives), and each device runs the kernels on its shard
    only, where a Pallas call alone would run on every device over the
    whole gathered arrays.

    The call's options live in Python (the callbacks XLA calls back into),
    not in the program, which names the callbacks only by their ``id``: a
    persistent compilation cache told to drop that id from its key
    (``jax_remove_custom_partitioning_ptr_from_cache_key``) would serve one
    call's program for another's. So the call also takes a digest of
    ``name`` (the kernel and its options) as an operand it ignores, a
    constant in the program and in its key."""

    def specs(mesh, args):
        split = _xla_split(mesh, *jax.tree.leaves(args)[:2])
        return layout(*args, split=split)

    def shardings(mesh, specs, like):
        leaves, tree = jax.tree.flatten(like)
        named = [NamedSharding(mesh, P(*spec)) for spec in specs if spec is not None]
        assert len(named) == len(leaves), (specs, like)
        return jax.tree.unflatten(tree, named)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, specs(mesh, arg_shapes[1:])[1], result_shape)

    def partition(mesh, arg_shapes, result_shape):
        in_specs, out_specs = specs(mesh, arg_shapes[1:])
        split = set().union(*(_axes(spec) for spec in in_specs if spec is not None))

        def shard(digest, *args):
            del digest
            return tuple(_summed(kernel(*args), out_specs, split))

        return (
            mesh,
            shard,
            shardings(mesh, out_specs, result_shape),
            shardings(mesh, [(None,), *in_specs], arg_shapes),
        )

    def run(*args):
        call = custom_partitioning(lambda digest, *args: tuple(kernel(*args)))
        call.def_partition(
            infer_sharding_from_operands=infer,
            partition=partition,
            # Shapes only: the arguments are tracers of the lowering.
            sharding_rule=partial(_sharding_rule, _shapes(args)),
            decode_shardings=False,  # read by mesh_partition_spec, which may refuse
        )
        text = name.encode()
        digest = np.array([zlib.crc32(text), zlib.adler32(text)], np.uint32)
        return call(digest, *args)

    return run


def _shapes(args):
    """``args`` with each array a ``ShapeDtypeStruct`` of its shape."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)


def _xla_split(mesh, q, k):
    """The query's batch and head splits (:func:`mesh_spec` entries, None for
    whole) that the kernels run shard by shard, given ``q``'s sharding on
    ``mesh`` where XLA splits the program: each only where it splits its
    axis evenly (XLA pads an uneven split, and the padding would reach the
    sums over it), the heads only where they split the key/value heads
    alike too (or there is one); neither where the split names no whole
    mesh axes."""
    spec = mesh_partition_spec(q.sharding, mesh, 4)
    b, _, n, _ = (None,) * 4 if spec is None else spec_entries(spec, 4)

    def even(entry, *sizes):
        return entry is not None and all(s % shards(entry, mesh) == 0 for s in sizes)

    kv = k.shape[2]
    return (
        b if even(b, q.shape[0]) else None,
        n if even(n, q.shape[2], *(() if kv == 1 else (kv,))) else None,
    )


def _sharding_rule(args, mesh, value_types, result_types):
    """The Shardy rule of :func:`_partitioned`'s call, from its arguments
    ``args`` (how XLA's sharding propagation sees the call; the split it
    runs with is its ``partition``'s): q, k, v, o, ``lse`` and the output
    cotangent share their batch, position, head and head-dim factors (the
    query heads as the key/value heads times their group), each cotangent
    its input's; every other axis is a factor of its own."""
    del mesh
    backward = isinstance(args[0], tuple)  # (res, d_out), else the inputs
    res = args[0] if backward else args
    n, kv = res[0].shape[2], res[1].shape[2]
    fresh = (f"x{i}" for i in itertools.count())
    if kv == n:
        heads, kv_heads, lse_heads = "n", "n", ("n", next(fresh))
    elif kv == 1:
        heads, kv_heads, lse_heads = "n", next(fresh), (next(fresh), "n")
    else:  # XLA may split these over parts of a mesh axis: see _xla_split
        heads, kv_heads, lse_heads = CompoundFactor("k", "g"), "k", ("k", "g")
    known = {
        0: ("b", "t", heads, "h"),
        1: ("b", "s", kv_heads, "h"),
        2: ("b", "s", kv_heads, "hv"),
        10: ("b", "t", heads, "hv"),
        11: ("b", *lse_heads, "t"),
    }
    given = {
        i: known.get(i) or tuple(next(fresh) for _ in x.shape)
        for i, x in enumerate(res)
        if x is not None
    }
    operands = [(next(fresh),), *given.values()]  # the digest first
    if backward:
        operands.append(known[10])  # d_out
        results = [given[i] for i in range(5) if i in given]
    else:
        results = [known[10], known[11]]
    assert len(operands) == len(value_types), (operands, value_types)
    assert len(results) == len(result_types), (results, result_types)
    return SdyShardingRule(
        tuple(ArrayMapping(*m) for m in operands),
        tuple(ArrayMapping(*m) for m in results),
    )


def _like(x, aval):
    """``x`` with the type of ``aval``: its sharding, and varying over the
    manual axes of an enclosing ``shard_map`` as ``aval`` does (the inner
    ``shard_map``, ``check_vma=False``, hands back values that vary over
    them, typed as if they did not: context parallelism's pairs)."""
    x = reshard_to(x, mesh_spec(aval))
    missing = vma(aval) - vma(x)
    return lax.pcast(x, tuple(sorted(missing, key=str)), to="varying") if missing else x


def _axes(spec):
    """The mesh axes a spec splits over."""
    return {axis for entry in spec if entry for axis in entry}


def _forward_layout(
    q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg, *, split=None
):
    """The specs the kernels run shard by shard with (see :func:`_per_shard`):
    the batch split as the query's (or as ``split = (batch, heads)`` says),
    the query heads too with their key/value heads (split alike, or one
    replicated); with the outputs' (``o`` as q, ``lse [B, K, G, T]``)."""
    del v
    b, n = (mesh_spec(q)[::2]) if split is None else split
    # More shards than key/value heads: the public function repeats them to
    # a number the shards divide, except a single one.
    kv_n = None if k.shape[2] == 1 else n
    kv = (b, None, kv_n, None)

    def scores(x):  # bias, mask: [B, N, T, S], their own size-1 axes unsplit
        if x is None:
            return None
        return (
            b if x.shape[0] > 1 else None,
            n if x.shape[1] > 1 else None,
            None,
            None,
        )

    def given(x, spec):
        return None if x is None else spec

    arrays = (
        (b, None, n, None), kv, kv, scores(bias), given(sinks, (n,)), scores(mask),
        given(q_len, (b,)), given(kv_len, (b,)), given(q_seg, (b, None)),
        given(kv_seg, (b, None)),
    )  # fmt: skip
    lse = (b, kv_n, None if kv_n else n, None)
    return arrays, ((b, None, n, None), lse)


def _backward_layout(res, d_out, *, split=None):
    """:func:`_forward_layout`'s for the backward pass: the residuals (the
    inputs, ``o`` and ``lse``) and the cotangent in; the inputs' cotangents
    out, each split as its input."""
    del d_out
    arrays, (o, lse) = _forward_layout(*res[:10], split=split)
    return (*arrays, o, lse, o), arrays[:5]


def _refuse_vmapped_mesh_axes(*args):
    """The kernels inside a ``vmap`` whose mapped axis is split over a mesh
    axis, where they cannot run shard by shard: refused (see
    :func:`_per_shard`)."""
    del args
    raise ValueError(
        "dot_product_attention: implementation='pallas' does not support this "
        "vmap, whose mapped axis is split over an Explicit mesh axis and which "
        "cannot run shard by shard (a vmap of symbolic size); the XLA path "
        "(implementation=None or 'xla') supports it"
    )


def _refuse_symbolic(*args):
    """The kernels for CUDA under a ``vmap`` of symbolic size: refused, as the
    kernels refuse symbolic shapes they see."""
    del args
    raise ValueError(
        "dot_product_attention: implementation='pallas' does not support "
        "symbolic shapes (a vmap of symbolic size, lowered for CUDA: the "
        "Triton grid is static)"
    )


def _xla_backward(res, d_out, config):
    return xla.backward(config, res, d_out)


forward = _on_platform(xla.forward, pallas.forward, _forward_layout, _forward_fails)
backward = _on_platform(
    _xla_backward, pallas.backward, _backward_layout, _backward_fails
)


def recomputed_tangent(forward_output, res, t_leaves):
    """The output's tangent (and a zero one for ``lse``) in a forward-mode
    rule: ``jax.jvp`` of ``forward_output(*args)`` at the rule's inputs,
    which its residuals hold ahead of ``(out, lse)``. Tangents flow from q,
    k, v, bias and sinks, as cotangents do in the backward pass; ``lse`` has
    none there (its cotangent is ignored), so none here."""
    *args, _, lse = res
    # The float input leaves, in order (None arguments are no leaves).
    floats = [
        i
        for i, a in enumerate(args)
        if a is not None and jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    moved = [i for i in floats if i < 5]  # q, k, v, bias, sinks
    t_moved = [t for i, t in zip(floats, t_leaves, strict=True) if i < 5]

    def output(*xs):
        full = list(args)
        for i, x in zip(moved, xs, strict=True):
            full[i] = x
        return forward_output(*full)

    _, d_out = jax.jvp(output, [args[i] for i in moved], t_moved)
    return [d_out, jnp.zeros(lse.shape, lse.dtype)]

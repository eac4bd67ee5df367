"""Code chosen by the platform a program is lowered for, per platform even
when one program is lowered for several (``jax.export`` with
``platforms=("cpu", "cuda")``).

:func:`jax.lax.platform_dependent` lowers every branch for every platform of
the lowering, and a Pallas GPU kernel has no CPU lowering: a kernel in its
``cuda`` branch makes a CPU-and-CUDA export fail. Here the choice is a
primitive whose lowering rule is per platform (``mlir.lower_per_platform``),
so each branch is lowered for its own platform only. Its derivative is that
of a differentiable twin the caller gives (a kernel has none), as a JVP rule
of the primitive, so that it holds wherever JAX moves the primitive (a
``custom_jvp`` around it is inlined when a ``lax.scan`` body is partially
evaluated for a second derivative). This module and ``_forward_mode`` are
where jsoftmax touches JAX internals (``jax._src``'s dispatch, effects, ad,
batching and mlir registries).
"""

from __future__ import annotations

import functools
import math

import jax
from jax._src import core, dispatch, effects
from jax._src.interpreters import ad, batching, mlir
from jax.extend.core import Primitive
from jax.sharding import PartitionSpec as P


class _Branches:
    """The functions of flat arrays, all of the same outputs: ``cuda``,
    ``default``, ``symbolic`` (the CUDA one's stand-in under a ``vmap`` of
    symbolic size) and ``derivative`` (differentiable), and their outputs'
    avals; ``manual`` names those that take no operand typed on a mesh axis
    (see :func:`_batch`). Hashed by identity: a primitive parameter, never
    holding a tracer."""

    def __init__(self, fns, out_avals, manual):
        self.fns, self.out_avals, self.manual = fns, out_avals, manual

    def __repr__(self):
        return "<cuda | default>"


by_platform_p = Primitive("jsoftmax_by_platform")
by_platform_p.multiple_results = True
by_platform_p.def_impl(functools.partial(dispatch.apply_primitive, by_platform_p))
by_platform_p.def_abstract_eval(lambda *avals, branches: list(branches.out_avals))


def _lowering(ctx, *args, branches):
    return mlir.lower_per_platform(
        ctx,
        "jsoftmax_by_platform",
        {"cuda": mlir.lower_fun(branches.fns["cuda"], multiple_results=True)},
        mlir.lower_fun(branches.fns["default"], multiple_results=True),
        effects.no_effects,
        *args,
    )


mlir.register_lowering(by_platform_p, _lowering)


def _jvp(primals, tangents, *, branches):
    """The derivative twin's JVP, beside the chosen branch's output."""
    out = by_platform_p.bind(*primals, branches=branches)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, d_out = jax.jvp(branches.fns["derivative"], list(primals), tangents)
    return out, d_out


ad.primitive_jvps[by_platform_p] = _jvp


def _batch(axis_data, args, dims, *, branches):
    """vmap: the branches vmapped, outputs at axis 0. A vmap of symbolic size
    (:func:`jax.export` shape polymorphism) would give the CUDA branch's
    kernels a grid of dynamic bounds, which the Triton lowering refuses: the
    stand-in takes the CUDA branch's place there. Where the mapped axis is
    split over ``Explicit`` mesh axes, the ``manual`` branches vmap each
    shard's part inside a ``shard_map`` over those axes, so that they see no
    operand typed on them (which a Pallas call refuses)."""
    if all(d is None for d in dims):
        out = by_platform_p.bind(*args, branches=branches)
        return out, [None] * len(out)
    vmap = functools.partial(
        jax.vmap,
        in_axes=list(dims),
        out_axes=0,
        axis_name=axis_data.name,
        axis_size=axis_data.size,
        spmd_axis_name=axis_data.spmd_name,
    )
    fns = {name: vmap(fn) for name, fn in branches.fns.items()}
    axes = getattr(axis_data, "explicit_mesh_axis", None)
    if axes and core.is_constant_dim(axis_data.size):
        for name in branches.manual:
            fns[name] = _shard_by_shard(
                branches.fns[name], dims, axes, axis_data, len(branches.out_avals)
            )
    if not core.is_constant_dim(axis_data.size):
        fns["cuda"] = fns["symbolic"]
    out = _bind(fns, args, branches.manual)
    return out, [0] * len(out)


batching.fancy_primitive_batchers[by_platform_p] = _batch


def _shard_by_shard(fn, dims, axes, axis_data, outputs):
    """``fn`` vmapped over the axes ``dims`` of its arguments (None: not
    mapped), whose mapped axis is split over the mesh ``axes``: each shard's
    part vmapped inside a ``shard_map`` over ``axes``, the outputs mapped at
    axis 0. The mesh is the context's where it is traced (inside an outer
    one of nested vmaps, its axis manual), else the one here (a program
    lowered outside ``jax.set_mesh``)."""
    traced_in = jax.sharding.get_abstract_mesh()
    shards = math.prod(traced_in.shape[axis] for axis in axes)
    local = jax.vmap(
        fn,
        in_axes=list(dims),
        out_axes=0,
        axis_name=axis_data.name,
        axis_size=axis_data.size // shards,
    )

    def spec(d):
        return P() if d is None else P(*(None,) * d, axes)

    def run(*leaves):
        mesh = jax.sharding.get_abstract_mesh()
        return jax.shard_map(
            local,
            mesh=traced_in if mesh.empty else mesh,
            in_specs=tuple(spec(d) for d in dims),
            out_specs=[P(axes)] * outputs,
            axis_names=set(axes),
            check_vma=False,
        )(*leaves)

    return run


def _bind(fns, leaves, manual):
    # The differentiable twin's: every branch gives the same, and it can be
    # traced anywhere (a manual branch not inside a vmap over mesh axes).
    out_avals = tuple(jax.make_jaxpr(fns["derivative"])(*leaves).out_avals)
    return by_platform_p.bind(*leaves, branches=_Branches(fns, out_avals, manual))


def vmapped_mesh_axes() -> frozenset:
    """The mesh axes that enclosing ``vmap``s split their mapped axes over
    (``spmd_axis_name``, or a mapped axis split on an ``Explicit`` mesh) and
    that no ``shard_map`` inside them holds manual: inside them, no
    ``shard_map`` may name those axes."""
    names = getattr(core.get_axis_env(), "explicit_mesh_axis_names", ())
    return frozenset(names) - set(jax.sharding.get_abstract_mesh().manual_axes)


def by_platform(args, *, cuda, default, symbolic, derivative, manual=("cuda",)):
    """``cuda(*args)`` where the program is lowered for CUDA, ``default(*args)``
    elsewhere (all four functions the same output structure, shapes and
    dtypes), differentiated as ``derivative(*args)`` is.

    ``cuda`` may run kernels, whose grids need static shapes: ``symbolic``
    takes its place for CUDA under a ``vmap`` of symbolic size (symbolic
    shapes the caller sees, it handles itself). The branches named in
    ``manual`` take no operand typed on a mesh axis: under a ``vmap`` whose
    mapped axis is split over ``Explicit`` mesh axes, they run shard by
    shard in a ``shard_map`` over those axes."""
    leaves, in_tree = jax.tree.flatten(args)
    out_tree = []

    def flat(fn):
        def run(*leaves):
            out = fn(*jax.tree.unflatten(in_tree, leaves))
            out_leaves, tree = jax.tree.flatten(out)
            out_tree[:] = [tree]
            return out_leaves

        return run

    fns = dict(cuda=cuda, default=default, symbolic=symbolic, derivative=derivative)
    out = _bind({name: flat(fn) for name, fn in fns.items()}, leaves, manual)
    return jax.tree.unflatten(out_tree[0], out)

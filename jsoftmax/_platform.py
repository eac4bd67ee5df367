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
evaluated for a second derivative). A branch may also see, while it is
lowered, whether XLA splits the program by itself (:func:`partitioned_by_xla`:
it then runs a kernel shard by shard through a ``custom_partitioning``).
This module and ``_forward_mode`` are where jsoftmax touches JAX internals
(``jax._src``'s dispatch, effects, ad, batching and mlir registries, the
lowering's module context, and its sharding parser).
"""

from __future__ import annotations

import contextvars
import functools
import math

import jax
from jax._src import core, dispatch, effects, sharding_impls
from jax._src import mesh as jax_mesh
from jax._src.interpreters import ad, batching, mlir
from jax._src.interpreters import partial_eval as pe
from jax.extend.core import Primitive
from jax.sharding import PartitionSpec as P


class _Branches:
    """The functions of flat arrays, all of the same outputs: ``cuda``,
    ``default``, ``symbolic`` (the CUDA one's stand-in under a ``vmap`` of
    symbolic size) and ``derivative`` (differentiable), and their outputs'
    avals; ``manual`` names those that take no operand typed on a mesh axis
    (see :func:`_batch`); ``devices``: whether a branch may need the
    program's devices when lowered (see :func:`by_platform`). Hashed by
    identity: a primitive parameter, never holding a tracer."""

    def __init__(self, fns, out_avals, manual, devices):
        self.fns, self.out_avals, self.manual = fns, out_avals, manual
        self.devices = devices

    def __repr__(self):
        return "<cuda | default>"


def _primitive(name):
    p = Primitive(name)
    p.multiple_results = True
    p.def_impl(functools.partial(dispatch.apply_primitive, p))
    p.def_abstract_eval(lambda *avals, branches: list(branches.out_avals))
    return p


by_platform_p = _primitive("jsoftmax_by_platform")
# The same, for branches that may split a call over the program's devices
# (a custom_partitioning): JAX lowers a program holding it with its devices
# at hand, which it refuses for a program on an abstract mesh alone.
by_platform_on_devices_p = _primitive("jsoftmax_by_platform_on_devices")
dispatch.prim_requires_devices_during_lowering.add(by_platform_on_devices_p)


def _bind_branches(args, branches):
    p = by_platform_on_devices_p if branches.devices else by_platform_p
    return p.bind(*args, branches=branches)


# The module a by_platform branch is being lowered into, while it is traced.
_lowering_into = contextvars.ContextVar("jsoftmax_lowering_into", default=None)


def _lowering(ctx, *args, branches):
    token = _lowering_into.set(ctx.module_context)
    try:
        return mlir.lower_per_platform(
            ctx,
            "jsoftmax_by_platform",
            {"cuda": mlir.lower_fun(branches.fns["cuda"], multiple_results=True)},
            mlir.lower_fun(branches.fns["default"], multiple_results=True),
            effects.no_effects,
            *args,
        )
    finally:
        _lowering_into.reset(token)


for _p in (by_platform_p, by_platform_on_devices_p):
    mlir.register_lowering(_p, _lowering)


def _jvp(primals, tangents, *, branches):
    """The derivative twin's JVP, beside the chosen branch's output."""
    out = _bind_branches(primals, branches)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, d_out = jax.jvp(branches.fns["derivative"], list(primals), tangents)
    return out, d_out


for _p in (by_platform_p, by_platform_on_devices_p):
    ad.primitive_jvps[_p] = _jvp


def _batch(axis_data, args, dims, *, branches):
    """vmap: the branches vmapped, outputs at axis 0. A vmap of symbolic size
    (:func:`jax.export` shape polymorphism) would give the CUDA branch's
    kernels a grid of dynamic bounds, which the Triton lowering refuses: the
    stand-in takes the CUDA branch's place there. Where the mapped axis is
    split over ``Explicit`` mesh axes, the ``manual`` branches vmap each
    shard's part inside a ``shard_map`` over those axes, so that they see no
    operand typed on them (which a Pallas call refuses)."""
    if all(d is None for d in dims):
        out = _bind_branches(args, branches)
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
    out = _bind(fns, args, branches.manual, branches.devices)
    return out, [0] * len(out)


for _p in (by_platform_p, by_platform_on_devices_p):
    batching.fancy_primitive_batchers[_p] = _batch


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


def _bind(fns, leaves, manual, devices):
    # The differentiable twin's: every branch gives the same, and it can be
    # traced anywhere (a manual branch not inside a vmap over mesh axes).
    out_avals = tuple(jax.make_jaxpr(fns["derivative"])(*leaves).out_avals)
    return _bind_branches(leaves, _Branches(fns, out_avals, manual, devices))


def _devices_at_hand(leaves) -> bool:
    """Whether a program traced now, of arrays ``leaves``, may be split over
    several devices that its lowering can name: this process sees more than
    one device, and neither the context (``jax.sharding.use_abstract_mesh``)
    nor an array's type (a ``ShapeDtypeStruct`` on an ``AbstractMesh``, as
    :func:`jax.export` takes) is on an abstract mesh with no devices."""
    if jax.device_count() == 1:
        return False
    if not jax.sharding.get_abstract_mesh().empty:
        return not jax_mesh.get_concrete_mesh().empty
    for leaf in leaves:
        mesh = getattr(jax.typeof(leaf).sharding, "mesh", None)
        if mesh is not None and not mesh.empty:
            if getattr(mesh, "abstract_device", None) is None:
                return False
    return True


def partitioned_by_xla() -> bool:
    """Whether the branch traced now is lowered into a program that XLA
    splits over several devices by itself (``jit`` of arrays split on an
    ``Auto`` mesh, outside any ``shard_map``), at its own level (not inside a
    ``vmap`` of it), for devices at hand (not for :func:`jax.export`, which
    cannot serialise a :func:`jax.experimental.custom_partitioning`). A call
    XLA cannot split (a Pallas kernel) runs there on every device over the
    whole arrays, gathered, unless a ``custom_partitioning`` says how to
    split it."""
    module = _lowering_into.get()
    if module is None:
        return False
    axes = module.axis_context
    # JAX internals, read so that a JAX without one keeps the plain call.
    return (
        isinstance(axes, getattr(sharding_impls, "ShardingContext", ()))
        and getattr(axes, "num_devices", 1) > 1
        and getattr(axes, "device_assignment", None) is not None
        and getattr(axes, "abstract_mesh", None) is not None
        and not getattr(module.lowering_parameters, "for_export", True)
        and isinstance(core.trace_ctx.trace, pe.DynamicJaxprTrace)
    )


def mesh_partition_spec(sharding, mesh, ndim):
    """The ``PartitionSpec`` on ``mesh`` of ``sharding`` (over ``ndim`` axes,
    as XLA hands it to a ``custom_partitioning``); None where none names it
    (a split over part of a mesh axis)."""
    if sharding is None:  # GSPMD may ask before it has given the operand one
        return None
    try:
        hlo = sharding._to_xla_hlo_sharding(ndim)
        (spec,) = sharding_impls.parse_flatten_op_sharding(hlo, mesh)
    except (ValueError, NotImplementedError, AssertionError, StopIteration):
        return None  # JAX's ways of saying the mesh's axes name no such split
    return spec


def vmapped_mesh_axes() -> frozenset:
    """The mesh axes that enclosing ``vmap``s split their mapped axes over
    (``spmd_axis_name``, or a mapped axis split on an ``Explicit`` mesh) and
    that no ``shard_map`` inside them holds manual: inside them, no
    ``shard_map`` may name those axes."""
    names = getattr(core.get_axis_env(), "explicit_mesh_axis_names", ())
    return frozenset(names) - set(jax.sharding.get_abstract_mesh().manual_axes)


def by_platform(
    args, *, cuda, default, symbolic, derivative, manual=("cuda",), partitions=False
):
    """``cuda(*args)`` where the program is lowered for CUDA, ``default(*args)``
    elsewhere (all four functions the same output structure, shapes and
    dtypes), differentiated as ``derivative(*args)`` is.

    ``cuda`` may run kernels, whose grids need static shapes: ``symbolic``
    takes its place for CUDA under a ``vmap`` of symbolic size (symbolic
    shapes the caller sees, it handles itself). The branches named in
    ``manual`` take no operand typed on a mesh axis: under a ``vmap`` whose
    mapped axis is split over ``Explicit`` mesh axes, they run shard by
    shard in a ``shard_map`` over those axes. ``partitions``: whether a
    branch may split itself over the program's devices where
    :func:`partitioned_by_xla` (it is then lowered with them named, where
    they are at hand)."""
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
    devices = partitions and _devices_at_hand(leaves)
    out = _bind({name: flat(fn) for name, fn in fns.items()}, leaves, manual, devices)
    return jax.tree.unflatten(out_tree[0], out)

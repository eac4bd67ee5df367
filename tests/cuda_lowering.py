"""Lowering for CUDA on a machine without a GPU, as the tests do.

JAX lowers a Pallas Triton kernel for the GPU it finds. Where there is none,
jax 0.10 assumed compute capability 9.0; from jax 0.11 on, its Triton
lowering raises "No supported GPU devices found" unless the abstract mesh of
the context names an abstract GPU device (jax/_src/pallas/triton/gpu_info.py).
The tests lower under one that names an H100, the sm_90 part whose limits
the kernels' launches are chosen for (tests/test_triton_sm90.py), on both
versions. Arguments split over a mesh are then typed on that mesh's abstract
twin naming the H100 (:func:`typed`), not put on this machine's CPU devices,
whose mesh JAX would refuse beside the context's.
"""

import jax
from jax.sharding import AbstractDevice, NamedSharding

TRITON = "__gpu$xla.gpu.triton"  # the custom call of a Triton kernel
H100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")


def on_an_h100(mesh=None):
    """The abstract mesh of ``mesh`` (of the context where None), naming an
    H100 as its device."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh.abstract_mesh
    return mesh.update(abstract_device=H100)


def typed(x, spec, mesh):
    """``x``'s shape and dtype, split by ``spec`` over :func:`on_an_h100` of
    ``mesh``."""
    sharding = NamedSharding(on_an_h100(mesh), spec)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def export(fn, *args, platforms=("cuda",), mesh=None):
    """``jax.jit(fn)`` exported for ``platforms`` at ``args`` (arrays, or
    :func:`typed` over ``mesh``), an H100 its GPU, Triton's custom call
    allowed."""
    with jax.sharding.use_abstract_mesh(on_an_h100(mesh)):
        return jax.export.export(
            jax.jit(fn),
            platforms=platforms,
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
        )(*args)

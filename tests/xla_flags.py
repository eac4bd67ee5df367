"""XLA flags of the tests' multi-device subprocesses (the ``*_worker.py``
scripts and ``python -m jsoftmax``'s sharded rows).

Each sets them before it imports jax: ``n`` host CPU devices, also on a
machine with a GPU, and XLA's cheapest CPU code generation. The workers check
how the ops partition, value against the unsharded op and the collectives in
the compiled program, over thousands of small programs. XLA's older CPU
fusion emitters (``--xla_cpu_use_fusion_emitters=false``) compile them about
1.6 times faster (jaxlib 0.10.2). Partitioning, and with it every collective,
is decided before fusion and does not change; what is fused, and so the
buffers, does. A worker that measures compiled memory keeps XLA's default
emitters (``fusion_emitters=True``), as the in-process suite does: there
the older emitters also round differently, and convert a negative float32
that underflows to a float8 ``fnuz`` type (which has no negative zero) to
NaN, where the default emitters give 0.
"""

import os

CHEAP_CODEGEN = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def use_host_devices(n: int, *, fusion_emitters: bool = False) -> None:
    """XLA_FLAGS (after any set already) and JAX_PLATFORMS for ``n`` host CPU
    devices; call it before importing jax."""
    flags = [os.environ.get("XLA_FLAGS", ""), CHEAP_CODEGEN]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    if not fusion_emitters:
        flags.append("--xla_cpu_use_fusion_emitters=false")
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)
    os.environ["JAX_PLATFORMS"] = "cpu"

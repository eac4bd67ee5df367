"""Shared test setup.

Strict dtype promotion catches silent upcasts. x64 stays off globally; float64
tests enable it locally with ``jax.enable_x64(True)``. float32 matmuls run at
full float32 precision: on GPUs JAX's default lets them use TF32 (10 mantissa
bits), and the fused loss's chunked matmuls then differ from an unfused
reference by about 5e-3 (measured on an H200, jax 0.11.2).
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")
collect_ignore = [
    "sharded_worker.py",
    "sharding_modes_worker.py",
    "second_derivatives_worker.py",
    "mixed_sharding_worker.py",
]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run on a CUDA GPU only (bench/gpu.sh runs them)."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

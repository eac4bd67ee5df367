"""Shared test setup.

Strict dtype promotion catches silent upcasts, and rank promotion raises
(here and in the tests' subprocesses): the ops must work for users who set
``jax_numpy_rank_promotion="raise"``. x64 stays off globally; float64 tests
enable it locally with ``jax.enable_x64(True)``. float32 matmuls run at
full float32 precision: on GPUs JAX's default lets them use TF32 (10 mantissa
bits), and the fused loss's chunked matmuls then differ from an unfused
reference by about 5e-3 (measured on an H200, jax 0.11.2).

Without a CUDA plugin, XLA's CPU backend compiles with LLVM's cheap passes
only (appended to any XLA_FLAGS, and inherited by the tests' subprocesses;
the multi-device ones set theirs with tests/xla_flags.py). The suite
compiles thousands of small programs and this saves about a quarter of its
time; the HLO each compiles to, whose collectives and buffers tests count, is
the same (checked on the context-parallel worker's reports), and values are
compared with tolerances. CI's own `python -m jsoftmax` run, outside pytest,
and the benchmarks' published numbers use XLA's defaults.

There too, the run keeps every program it compiles in a persistent
compilation cache, in a temporary folder that the pytest-xdist workers and
the tests' subprocesses share and that is removed at the end (a
``JAX_COMPILATION_CACHE_DIR`` set before is used as it is). Tests build the
same programs from different Python functions (a lambda per test, a rule per
case, each worker its own): XLA then compiles each once. This cut the
suite's test time by about a seventh on the 2-core machine (jax 0.10.2). A
program read from the cache still counts as compiled for tests/compiles.py.
"""

import importlib.util
import os
import shutil
import tempfile

from xla_flags import CHEAP_CODEGEN

# Without a CUDA plugin: cheap code generation and the persistent cache.
_CPU = not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
_CACHE_MADE_HERE = None
if _CPU:
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_CODEGEN}".strip()
    )
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _CACHE_MADE_HERE = tempfile.mkdtemp(prefix="jsoftmax-tests-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_MADE_HERE
    # Every program, however small or quick to compile.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

if _CPU:  # in case a plugin imported jax before the environment was set
    jax.config.update(
        "jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

jax.config.update("jax_numpy_dtype_promotion", "strict")
# No implicit rank promotion in the ops (users set it to "raise"); the tests'
# subprocesses inherit it.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
jax.config.update("jax_numpy_rank_promotion", "raise")
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


def pytest_unconfigure(config):
    """The process that made the cache folder (pytest-xdist's controller, or
    the only process) removes it once every worker has ended."""
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)

"""The kernels' default launches fit an H100/H200 (sm_90a), checked on a CPU.

Each kernel of the gradient of an attention call is lowered for CUDA here and
compiled by the triton package for sm_90a, down to ptxas
(bench/triton_sm90.py): no register may spill, the stack frame must be
empty, and the shared memory of a block must stay within the 227 KiB that
sm_90 allows. XLA compiles the same
Triton IR only on the GPU, where a spill costs time and a block over the limit
does not launch. The triton package stands in for the Triton inside the GPU's
jaxlib: close numbers, not equal ones.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import jsoftmax
from jsoftmax import _attention_pallas

pytest.importorskip("triton", reason="the triton package compiles for sm_90a")

_PATH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "triton_sm90.py"
_SPEC = importlib.util.spec_from_file_location("triton_sm90", _PATH)
sm90 = sys.modules.setdefault("triton_sm90", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(sm90)


# bench/triton_sm90.py chose the launches to fit five calls (CALLS); CI
# compiles three of them.
@pytest.mark.parametrize("options", ["plain", "causal", "every"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
# float16's kernels have bfloat16's shapes and, in
# bench/results/triton_sm90_cpu.md, their counts to within 2 registers: CI
# compiles bfloat16's.
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_default_launches_fit_sm90(dtype, head_dim, options):
    kernels = sm90.attention_kernels(sm90.DTYPES[dtype], head_dim, options)
    assert sorted(kernels) == sorted(sm90.KERNELS)
    for name, kernel in kernels.items():
        launch = _attention_pallas.launch(name, sm90.DTYPES[dtype], head_dim)
        assert (kernel.num_warps, kernel.num_stages) == (
            launch.num_warps,
            launch.num_stages,
        )
        resources = sm90.compile_sm90(kernel)
        assert resources.spilled == 0, (name, launch, resources)
        assert resources.stack == 0, (name, launch, resources)
        assert resources.shared <= sm90.SHARED_LIMIT, (name, launch, resources)
        assert resources.fits
        if dtype != "float32" and head_dim <= 128:  # Hopper's tensor-core dots
            assert "wgmma" in resources.dots, (name, launch, resources)


def test_launches_that_spill_or_pass_the_shared_limit_do_not_fit():
    # dK/dV's launch before these checks (64x128 blocks, 4 warps) at H=64.
    spilling = _attention_pallas.Launch(64, 128, 4, 2)
    with sm90.launches({("dkv", False, 64): spilling}):
        kernel = sm90.attention_kernels(jnp.bfloat16, 64, "causal")["dkv"]
    resources = sm90.compile_sm90(kernel)
    assert resources.spilled > 0 and not resources.fits
    # 128x128 blocks, 3 stages at H=256: 448 KiB of shared memory.
    large = _attention_pallas.Launch(128, 128, 8, 3)
    with sm90.launches({("forward", False, 256): large}):
        kernel = sm90.attention_kernels(jnp.bfloat16, 256, "causal")["forward"]
    assert (kernel.num_warps, kernel.num_stages) == (8, 3)
    resources = sm90.compile_sm90(kernel)
    assert resources.shared > sm90.SHARED_LIMIT and not resources.fits
    # Each condition alone fails a kernel.
    assert not sm90.Resources(sm90.SHARED_LIMIT + 1, 100, 0, 0, "wgmma").fits
    assert not sm90.Resources(1024, 100, 4, 0, "wgmma").fits
    assert not sm90.Resources(1024, 100, 0, 16, "wgmma").fits
    assert sm90.Resources(sm90.SHARED_LIMIT, 255, 0, 0, "wgmma").fits
    # The table is back as it was.
    assert _attention_pallas.LAUNCHES[("dkv", False, 64)] != spilling


@pytest.mark.parametrize(
    "dtype, t, s, h, options",
    [
        (jnp.bfloat16, 5, 7, 64, dict(is_causal=True)),  # blocks of 16
        (jnp.float32, 5, 7, 24, dict(is_causal=True)),
        (jnp.bfloat16, 200, 300, 80, {}),  # H padded to 128
        (jnp.bfloat16, 200, 300, 16, {}),  # takes H=64's launch
        (jnp.bfloat16, 200, 300, 64, dict(query_chunk_size=32, key_chunk_size=64)),
        (jnp.float32, 200, 300, 64, dict(query_chunk_size=16, key_chunk_size=16)),
    ],
    ids=["short", "short_float32", "h80", "h16", "chunks", "chunks_of_16"],
)
def test_short_padded_and_chunked_calls_fit_sm90(dtype, t, s, h, options):
    q = jnp.zeros((2, t, 4, h), dtype)
    k = jnp.zeros((2, s, 2, h), dtype)

    def loss(q, k, v):
        out = jsoftmax.dot_product_attention(
            q, k, v, implementation="pallas", **options
        )
        return jnp.sum(out.astype(jnp.float32))

    kernels = sm90.triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, k)
    assert len(kernels) == 3
    for kernel in kernels:
        resources = sm90.compile_sm90(kernel)
        assert resources.fits, (kernel.name, resources)

"""The attention kernels compiled for an H100/H200 (sm_90a) on this CPU.

    pip install -e '.[test]'                # brings the triton package (3.9.0)
    python bench/triton_sm90.py             # bench/results/triton_sm90_cpu.md
    python bench/triton_sm90.py --sweep     # and the candidates (slow)

XLA compiles a Pallas kernel's Triton IR on the GPU only, so a kernel whose
registers spill (it then runs out of local memory) or whose shared memory
passes the 227 KiB one block may use on sm_90 (it then does not launch) shows
up there only. This lowers dot_product_attention's kernels for CUDA here
(``jax.export``), takes each kernel's Triton IR out of the exported module,
and compiles it with the ``triton`` package for sm_90a, down to ptxas: shared
memory, registers per thread and bytes spilled, per kernel.

The triton package's compiler stands in for the one inside the GPU's jaxlib
(XLA's copy of the same project, at another commit): its numbers are close to
what the GPU builds, not equal. Time is measured on a GPU only (bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from concurrent import futures

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as triton_dialect

import jsoftmax
from jsoftmax import _attention_pallas

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TRITON_CALL = "__gpu$xla.gpu.triton"
H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100", num_cores=None, platform="cuda"
)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
KERNELS = ("forward", "dkv", "dq")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Triton kernel of a program lowered for CUDA."""

    name: str
    ir: str  # the Triton module, as text
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Resources:
    """What ptxas reports for one kernel compiled for sm_90a."""

    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spilled: int  # bytes of spill stores plus spill loads
    stack: int  # bytes of stack frame (local memory) per thread
    dots: str  # the matmul instructions: wgmma (Hopper's), mma.sync, or fma

    @property
    def fits(self):
        return self.spilled == 0 and self.stack == 0 and self.shared <= SHARED_LIMIT


def triton_kernels(fn, *args):
    """The Triton kernels of ``jax.jit(fn)(*args)`` lowered for CUDA, in the
    exported module's order, for an H100 (sm_90): from jax 0.11 on, JAX
    lowers a Pallas kernel for CUDA on a machine without a GPU only where the
    context's abstract mesh names one (jax 0.10 assumed sm_90 there)."""
    mesh = jax.sharding.get_abstract_mesh().update(abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*args)
    context = mlir.make_ir_context()
    triton_dialect.register_dialect(context)
    found = []
    with context:
        module = ir.Module.parse(exported.mlir_module())
        _calls(module.operation, found)
        kernels = []
        for call in found:
            config = ir.DictAttr(call.attributes["mhlo.backend_config"])
            body = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
            kernels.append(
                Kernel(
                    ir.StringAttr(config["name"]).value,
                    body.operation.get_asm(),
                    ir.IntegerAttr(config["num_warps"]).value,
                    ir.IntegerAttr(config["num_stages"]).value,
                )
            )
    return kernels


def _calls(op, found):
    if op.name == "stablehlo.custom_call":
        if ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_CALL:
            found.append(op)
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                _calls(inner.operation, found)


def compile_sm90(kernel):
    """:class:`Resources` of ``kernel`` compiled by the triton package for
    sm_90a; raises where Triton or ptxas fails (e.g. registers that cannot be
    allocated)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = pathlib.Path(folder, "kernel.ttir")
        source.write_text(kernel.ir)
        with triton.knobs.cache.scope():
            triton.knobs.cache.dir = os.path.join(folder, "cache")
            compiled = triton.compile(
                str(source),
                target=GPUTarget("cuda", 90, 32),
                options={
                    "num_warps": kernel.num_warps,
                    "num_stages": kernel.num_stages,
                    "enable_fp_fusion": True,  # Triton's default: a*b+c fused
                },
            )
        ptx = pathlib.Path(folder, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        # Triton's own ptxas and flags; -v reports registers and spills.
        report = subprocess.run(
            [get_ptxas(90).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
             "--gpu-name=sm_90a", str(ptx), "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    text = report.stdout + report.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", text).group(1))
    stores, loads = re.search(
        r"(\d+) bytes spill stores, (\d+) bytes spill loads", text
    ).groups()
    ptx_text = compiled.asm["ptx"]
    kinds = (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
    dots = [name for name, op in kinds if op in ptx_text] or ["fma"]
    return Resources(
        compiled.metadata.shared,
        registers,
        int(stores) + int(loads),
        stack,
        "+".join(dots),
    )


# -- The calls whose kernels are compiled -------------------------------------

B, T, N = 1, 1024, 4


# The calls whose kernels must fit: options alone and together, since what
# spills does not grow with the options (a kernel can fit with every option
# and spill with a few).
CALLS = ("plain", "causal", "soft_cap", "bias", "window", "masked", "every")


def options(name, dtype):
    """(key/value heads, attention options) of a call by name: ``plain`` (no
    option); ``causal``, ``soft_cap``, a full ``bias`` or a two-sided
    ``window`` alone; ``masked`` (grouped-query heads, a full mask and bias, a
    two-sided window and soft cap); or ``every`` option the kernels take at
    once (grouped-query heads, a full bias, a mask, lengths, segment ids, a
    window, soft cap and sinks)."""
    full = (B, N, T, T)
    if name == "plain":
        return N, {}
    if name == "causal":
        return N, dict(is_causal=True)
    if name == "soft_cap":
        return N, dict(soft_cap=30.0)
    if name == "bias":
        return N, dict(bias=jnp.zeros(full, dtype))
    if name == "window":
        return N, dict(local_window_size=(100, 50))
    if name == "masked":
        return N // 2, dict(
            mask=jnp.ones(full, bool),
            bias=jnp.zeros(full, dtype),
            local_window_size=(100, 50),
            soft_cap=30.0,
        )
    segments = jnp.zeros((B, T), jnp.int32)
    return N // 2, dict(
        is_causal=True,
        local_window_size=(256, 0),
        bias=jnp.zeros(full, dtype),
        mask=jnp.ones((B, 1, 1, T), bool),
        query_seq_lengths=jnp.full((B,), T, jnp.int32),
        key_value_seq_lengths=jnp.full((B,), T, jnp.int32),
        query_segment_ids=segments,
        key_value_segment_ids=segments,
        soft_cap=30.0,
        sinks=jnp.zeros(N, jnp.float32),
    )


def attention_kernels(dtype, head_dim, name):
    """The forward, dK/dV and dQ kernels of the gradient of an attention call
    with ``implementation="pallas"`` and the default launches."""
    k_heads, opts = options(name, dtype)
    q = jnp.zeros((B, T, N, head_dim), dtype)
    k = jnp.zeros((B, T, k_heads, head_dim), dtype)

    def loss(q, k, v):
        out = jsoftmax.dot_product_attention(q, k, v, implementation="pallas", **opts)
        return jnp.sum(out.astype(jnp.float32))

    kernels = triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, k)
    return {
        kernel.name.removeprefix("jsoftmax_attention_"): kernel for kernel in kernels
    }


@contextlib.contextmanager
def launches(changes):
    """:data:`jsoftmax._attention_pallas.LAUNCHES` with ``changes`` for the
    duration (a sweep's candidates)."""
    table = _attention_pallas.LAUNCHES
    if not set(changes) <= set(table):
        raise KeyError(f"not launches of the table: {set(changes) - set(table)}")
    saved = dict(table)
    table.update(changes)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


# -- Tables --------------------------------------------------------------------

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
HEAD_DIMS = (64, 128, 256)


def _row(dtype, head_dim, name, kernel, launch, resources):
    if isinstance(resources, Resources):
        verdict = "fits" if resources.fits else (
            "SPILLS" if resources.spilled or resources.stack
            else "OVER SHARED LIMIT")  # fmt: skip
        numbers = (f"{resources.shared / 1024:.0f} | {resources.registers} | "
                   f"{resources.spilled} | {resources.stack} | {resources.dots} | "
                   f"{verdict}")  # fmt: skip
    else:
        numbers = f"- | - | - | - | - | FAILS: {resources}"
    blocks = (
        f"{launch.block_q}x{launch.block_k}, {launch.num_warps}, {launch.num_stages}"
    )
    return f"| {dtype} | {head_dim} | {name} | {kernel} | {blocks} | {numbers} |"


def _compile(kernel):
    try:
        return compile_sm90(kernel)
    except Exception as error:  # noqa: BLE001  (a row of the table says why)
        return type(error).__name__ + ": " + " ".join(str(error).split())[:120]


HEADER = [
    "| dtype | H | options | kernel | block q x k, warps, stages | shared KiB "
    "| registers | spilled bytes | stack bytes | dots | |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


# Candidates for each kernel's launch, largest blocks first:
# "QxK/WARPS/STAGES". The defaults are the first of each list that fits in
# every call of CALLS.
CANDIDATES = {
    (False, "forward", 64): "128x128/8/2 128x64/8/2 64x128/8/2 64x64/8/2",
    (False, "forward", 128): "128x64/8/2 64x128/8/2 128x32/8/2 64x64/8/2",
    (False, "forward", 256): "64x64/8/2 64x32/8/2 32x64/8/2 32x32/8/2",
    (False, "dkv", 64): "128x64/8/2 64x64/8/2 128x32/8/2 64x32/8/2",
    (False, "dkv", 128): "128x64/8/2 64x64/8/2 128x32/8/2 32x64/8/2 64x32/8/2 "
    "32x32/8/2",
    (False, "dkv", 256): "32x32/8/2 16x32/8/2 32x16/8/2 16x16/8/2 32x32/8/1 16x16/8/1",
    (False, "dq", 64): "128x128/8/2 128x64/8/2 64x64/8/2 128x32/8/2",
    (False, "dq", 128): "128x128/8/2 128x64/8/2 64x64/8/2 128x32/8/2 64x32/8/2 "
    "32x32/8/2",
    (False, "dq", 256): "64x32/8/2 32x64/8/2 32x32/8/2 16x32/8/2 16x16/8/2",
    (True, "forward", 64): "64x64/8/2 64x32/8/2 32x64/8/2 32x32/8/2 32x32/8/1 "
    "16x32/8/1 16x16/8/1 16x16/4/1",
    (True, "forward", 128): "64x32/8/2 32x64/8/2 32x32/8/2 32x32/8/1 16x32/8/1 "
    "16x16/8/1",
    (True, "forward", 256): "64x64/8/2 64x32/8/2 32x64/8/2 32x32/8/2 32x32/8/1 "
    "16x32/8/1 16x16/8/1",
    (True, "dkv", 64): "64x32/8/2 64x32/8/1 32x64/8/1 32x32/8/1 16x32/8/1 "
    "16x16/8/1 16x16/4/1",
    (True, "dkv", 128): "64x32/8/1 32x64/8/1 32x32/8/1 16x32/8/1 16x16/8/1 16x16/4/1",
    (True, "dkv", 256): "32x32/8/1 16x32/8/1 16x16/8/1 16x16/4/1",
    (True, "dq", 64): "64x32/8/2 32x64/8/2 32x32/8/2 64x32/8/1 32x32/8/1 "
    "16x32/8/1 16x16/8/1 16x16/4/1",
    (True, "dq", 128): "64x32/8/2 32x32/8/2 64x32/8/1 32x32/8/1 16x32/8/1 "
    "16x16/8/1 16x16/4/1",
    (True, "dq", 256): "32x32/8/2 32x32/8/1 16x32/8/1 16x16/8/1 16x16/4/1",
}


def _parse(candidate):
    blocks, warps, stages = candidate.split("/")
    bq, bk = blocks.split("x")
    return _attention_pallas.Launch(int(bq), int(bk), int(warps), int(stages))


def _defaults_rows(job):
    """One call's three kernels at the table's launches (with ``changes``)."""
    dtype, head_dim, name, changes = job
    with launches(changes):
        kernels = attention_kernels(DTYPES[dtype], head_dim, name)
        rows = []
        for kernel_name in KERNELS:
            launch = _attention_pallas.launch(kernel_name, DTYPES[dtype], head_dim)
            resources = _compile(kernels[kernel_name])
            rows.append(_row(dtype, head_dim, name, kernel_name, launch, resources))
    return rows


def _candidate_rows(job):
    """One kernel's candidates in turn, each over the calls up to the first
    that does not fit, up to the first candidate that fits in all; a last
    row names the one chosen."""
    dtype, (wide, kernel_name, head_dim), candidates = job
    rows, chosen = [], None
    for candidate in candidates.split():
        launch = _parse(candidate)
        for name in CALLS:
            with launches({(kernel_name, wide, head_dim): launch}):
                kernel = attention_kernels(DTYPES[dtype], head_dim, name)[kernel_name]
            resources = _compile(kernel)
            rows.append(_row(dtype, head_dim, name, kernel_name, launch, resources))
            if not (isinstance(resources, Resources) and resources.fits):
                break
        else:
            chosen = candidate
            break
    rows.append(
        f"| {dtype} | {head_dim} | | {kernel_name} | chosen: {chosen} | | | | | | |"
    )
    return rows


def _run(worker, jobs, processes):
    """``worker`` over ``jobs`` in fresh processes (each imports JAX anew: a
    launch table changed in this one does not reach them), rows in order."""
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return [row for rows in pool.map(worker, jobs) for row in rows]


def defaults_table(dtypes, processes, calls=CALLS, changes=None):
    jobs = [(dtype, head_dim, name, changes or {})
            for dtype in dtypes for head_dim in HEAD_DIMS
            for name in calls]  # fmt: skip
    return _run(_defaults_rows, jobs, processes)


def sweep_table(dtypes, processes):
    jobs = [(dtype, key, candidates)
            for dtype in dtypes for key, candidates in CANDIDATES.items()
            if key[0] == (dtype == "float32")]  # fmt: skip
    return _run(_candidate_rows, jobs, processes)


# The one launch table of jsoftmax 6a927ec, for every dtype: blocks 128x64
# (forward, dQ) and 64x128 (dK/dV), halved above H=128; 4 warps to H=64, 8
# above; 2 stages.
BEFORE = {
    (kernel, wide, head_dim): _attention_pallas.Launch(
        *(b // (2 if head_dim > 128 else 1) for b in blocks),
        4 if head_dim <= 64 else 8,
        2,
    )
    for wide in (False, True)
    for kernel, blocks in (
        ("forward", (128, 64)),
        ("dkv", (64, 128)),
        ("dq", (128, 64)),
    )
    for head_dim in HEAD_DIMS
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep", action="store_true", help="also the candidates of the defaults"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptxas = get_ptxas_version(90).split("release ")[-1].split(",")[0]
    lines = [
        "# The attention kernels compiled for sm_90a (H100/H200) on a CPU",
        "",
        f"triton {triton.__version__} (its ptxas, CUDA {ptxas}, for sm_90a), jax "
        f"{jax.__version__}; `python bench/triton_sm90.py --sweep`. The "
        f'gradient of a call with `implementation="pallas"`, B={B}, T=S={T}, '
        f"N={N}, in seven calls: `plain` (no option); `causal`, `soft_cap`, a "
        "full `bias` or a two-sided `window` alone; `masked` (grouped-query "
        "heads, a full mask and bias, a two-sided window, soft cap); and `every` "
        "option at once (grouped-query heads, a full bias, a mask, lengths, "
        "segment ids, a window, soft cap, sinks). A kernel fits where "
        "nothing spills, its stack frame is empty and its shared memory is at "
        f"most {SHARED_LIMIT // 1024} KiB. The triton package and its ptxas "
        "stand in for the Triton inside the GPU's jaxlib and the ptxas it "
        "uses: close numbers, not equal ones (a kernel near 255 registers can "
        "spill under another ptxas). No time is measured here.",
        "",
        "## The default launches (`jsoftmax._attention_pallas.LAUNCHES`)",
        "",
        *HEADER,
        *defaults_table(DTYPES, args.jobs),
    ]
    if args.sweep:
        lines += [
            "",
            "## The candidates, largest first, each over the calls up to the first "
            "that does not fit, up to the first that fits in all",
            "",
            *HEADER,
            *sweep_table(("bfloat16", "float32"), args.jobs),
            "",
            "## The launches these replaced (`BEFORE`), causal",
            "",
            *HEADER,
            *defaults_table(("bfloat16", "float32"), args.jobs, ("causal",), BEFORE),
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "triton_sm90_cpu.md").write_text("\n".join(lines) + "\n")
    print("wrote", args.out / "triton_sm90_cpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

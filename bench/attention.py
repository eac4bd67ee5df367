"""Benchmark dot_product_attention against jax.nn.dot_product_attention.

    python bench/attention.py             # bench/results/attention_cpu.{md,png}
    python bench/attention.py --quick     # small shapes, a smoke run (< 2 min)
    python bench/attention.py --gpu       # bfloat16, also jax.nn's cuDNN kernel
    python bench/attention.py --blocks    # the block-size sweep behind the defaults
    python bench/attention.py --sizes 1024,4096   # these T=S only, all timed
    python bench/attention.py --precision  # backward's D and loop form: error, time
    python bench/attention.py --packed     # packed documents: segment ids vs a mask
    python bench/attention.py --gpu-targets  # issue 19: B=4, N=16, H=128, peers
    python bench/attention.py --gpu-blocks   # chunk sizes at T=4096 on this backend

B=1, N=8 heads, H=64, T=S, float32 (bfloat16 with ``--gpu``, every
implementation: cuDNN's kernel takes no float32).

Memory is XLA's own accounting, compile-only, so it covers sizes that are
never run: the residuals (``saved_residuals`` of the forward pass, what
autodiff keeps for the backward) and the temporaries of the compiled
``jit(grad)`` (``memory_analysis().temp_size_in_bytes``: scratch beyond inputs
and outputs). A jax.nn case whose temporaries and arguments exceed the memory
limit (24 GiB by default) is reported as not fitting and is not run.

Times are medians of interleaved rounds in one process (each round runs every
implementation once, in a fresh random order), after a warm-up and a check
that the outputs agree. A second compiled copy of jax.nn runs beside it: the
``A/A`` column (copy / jax.nn, the same program) shows how far a ratio moves
by noise alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals

import jsoftmax
from bench import (
    compile_all,
    gpu_header,
    interleaved,
    machine,
    short_error,
    side_by_side,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MiB = 2**20
GiB = 2**30
B, N, H = 1, 8, 64
OURS, JAX_NN, COPY, CUDNN = "jsoftmax", "jax.nn (xla)", "jax.nn copy", "jax.nn (cudnn)"


def attention_fns(gpu):
    """name -> attention(q, k, v, is_causal)."""
    fns = {
        OURS: lambda q, k, v, c: jsoftmax.dot_product_attention(q, k, v, is_causal=c),
        JAX_NN: lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"
        ),
        # The A/A control: the same program as jax.nn, compiled separately.
        COPY: lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"
        ),
    }
    if gpu:
        fns[CUDNN] = lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn"
        )
    return fns


def _modes(fn, causal):
    """(forward, forward+backward) of ``fn``, not yet jitted."""
    fwd = functools.partial(fn, c=causal)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) * v), (0, 1, 2))(q, k, v)

    return {"fwd": lambda q, k, v: fwd(q, k, v), "fwd+bwd": fwd_bwd}


def _shape(t, dtype):
    return jax.ShapeDtypeStruct((B, t, N, H), dtype)


def memory(fn, t, causal, dtype=jnp.float32):
    """(residual bytes, fwd+bwd temp bytes, argument bytes) or an error string."""
    shape = _shape(t, dtype)
    try:
        res = saved_residuals(functools.partial(fn, c=causal), shape, shape, shape)
        residuals = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in res)
        grad = jax.jit(_modes(fn, causal)["fwd+bwd"])
        analysis = grad.lower(shape, shape, shape).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - report, don't stop the table
        return f"fails: {type(e).__name__}"
    return residuals, analysis.temp_size_in_bytes, analysis.argument_size_in_bytes


def _data(t, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (B, t, N, H)).astype(dtype) for k in keys]


def time_side_by_side(fns, args, rounds):
    """Outputs and median seconds per call of each function (see losses.py)."""
    jitted = {n: jax.jit(f) for n, f in fns.items()}
    outs = {n: jax.block_until_ready(f(*args)) for n, f in jitted.items()}
    samples = interleaved(jitted, args, rounds)
    return outs, {n: np.median(t) for n, t in samples.items()}


def _check(outs, reference):
    want = jax.tree.leaves(outs[reference])
    for name, out in outs.items():
        for g, w in zip(jax.tree.leaves(out), want, strict=True):
            tol = 1e-3 if g.dtype == w.dtype == np.float32 else 2e-2
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
            if not err <= tol:
                raise AssertionError(f"{name}: relative error {err:.3g} vs {reference}")


def _fits(mem, limit):
    return isinstance(mem, tuple) and mem[1] + mem[2] <= limit


def run(sizes, timed_sizes, rounds, gpu, limit):
    """One row per (T, causal, implementation)."""
    rows = []
    fns = attention_fns(gpu)
    # On a GPU every implementation runs in bfloat16, the only dtype (with
    # float16) that cuDNN's kernel takes, and the one GPU models train in.
    dtypes = {n: jnp.bfloat16 if gpu else jnp.float32 for n in fns}
    for t in sizes:
        for causal in (False, True):
            mems = {n: memory(f, t, causal, dtypes[n]) for n, f in fns.items()}
            times = {}
            run_now = [
                n
                for n in fns
                if t in timed_sizes and (n == OURS or _fits(mems[n], limit))
            ]
            for mode in ("fwd", "fwd+bwd"):
                sel = {
                    f"{n}/{np.dtype(dtypes[n]).name}": _modes(fns[n], causal)[mode]
                    for n in run_now
                }
                groups = {}
                for key, f in sel.items():
                    groups.setdefault(key.split("/")[1], {})[key] = f
                for dtype_name, group in groups.items():
                    args = _data(t, jnp.dtype(dtype_name))
                    outs, medians = time_side_by_side(
                        group, args, rounds[t] if isinstance(rounds, dict) else rounds
                    )
                    ref = f"{JAX_NN}/{dtype_name}"
                    ref = ref if ref in outs else None
                    if ref is not None:
                        _check(outs, ref)
                    for key, m in medians.items():
                        times[(key.split("/")[0], mode)] = m
            for n in fns:
                rows.append(
                    dict(
                        t=t,
                        causal=causal,
                        impl=n,
                        dtype=np.dtype(dtypes[n]).name,
                        memory=mems[n],
                        fits=n == OURS or _fits(mems[n], limit),
                        fwd=times.get((n, "fwd")),
                        fwd_bwd=times.get((n, "fwd+bwd")),
                    )
                )
            print(f"T={t} causal={causal} done", flush=True)
    return rows


def _mib(b):
    return f"{b / MiB:,.1f} MiB" if b < 4 * GiB else f"{b / GiB:,.1f} GiB"


def _ms(s):
    return "" if s is None else f"{s * 1e3:,.1f}"


def markdown(rows, title, limit):
    lines = [
        title,
        "",
        f"Machine: {machine()}. B={B}, N={N}, H={H}, T=S, default chunk sizes.",
        "",
        "Times: median ms per call; ratios jsoftmax / jax.nn (xla) from the same "
        "rounds. A/A: a second compiled copy of jax.nn over jax.nn (noise). "
        "Memory: compile-only; temporaries of `jit(grad)`, residuals of the "
        f"forward pass. jax.nn is not run where its temporaries and arguments "
        f"exceed {_mib(limit)}.",
        "",
        "| T | causal | impl | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio | "
        "A/A (fwd, fwd+bwd) | residuals | temporaries | temp ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["t"], r["causal"], r["impl"]): r for r in rows}
    for r in rows:
        if r["impl"] == COPY:
            continue
        base = by_key[(r["t"], r["causal"], JAX_NN)]
        copy = by_key.get((r["t"], r["causal"], COPY))
        mem = r["memory"]
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else ""  # noqa: E731
        aa = ""
        if r["impl"] == OURS and copy is not None and copy["fwd"]:
            aa = (
                f"{ratio(copy['fwd'], base['fwd'])}, "
                f"{ratio(copy['fwd_bwd'], base['fwd_bwd'])}"
            )
        if isinstance(mem, tuple):
            res, temp = _mib(mem[0]), _mib(mem[1])
            base_mem = base["memory"]
            temp_ratio = (
                f"1/{base_mem[1] / mem[1]:.0f}"
                if r["impl"] == OURS and isinstance(base_mem, tuple) and mem[1]
                else ""
            )
        else:
            res, temp, temp_ratio = mem, "", ""
        note = "" if r["fits"] else " (does not fit: not run)"
        lines.append(
            f"| {r['t']} | {'yes' if r['causal'] else 'no'} | {r['impl']} "
            f"({r['dtype']}){note} | {_ms(r['fwd'])} | {_ms(r['fwd_bwd'])} | "
            f"{ratio(r['fwd'], base['fwd']) if r['impl'] != JAX_NN else ''} | "
            f"{ratio(r['fwd_bwd'], base['fwd_bwd']) if r['impl'] != JAX_NN else ''} | "
            f"{aa} | {res} | {temp} | {temp_ratio} |"
        )
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for impl, color in ((OURS, "C0"), (JAX_NN, "C1"), (CUDNN, "C2")):
        for causal, style in ((False, "-"), (True, "--")):
            sel = [r for r in rows if r["impl"] == impl and r["causal"] == causal]
            if not sel:
                continue
            label = f"{impl}{' causal' if causal else ''}"
            for ax, key in ((axes[0], "fwd"), (axes[1], "fwd_bwd")):
                pts = [(r["t"], r[key]) for r in sel if r[key]]
                if pts:
                    ax.loglog(*zip(*pts, strict=True), style + "o", color=color,
                              label=label)  # fmt: skip
            pts = [(r["t"], r["memory"][1] / MiB) for r in sel
                   if isinstance(r["memory"], tuple)]  # fmt: skip
            if pts:
                axes[2].loglog(*zip(*pts, strict=True), style + "o", color=color,
                               label=label)  # fmt: skip
            unfit = [(r["t"], r["memory"][1] / MiB) for r in sel if not r["fits"]]
            if unfit:
                axes[2].loglog(*zip(*unfit, strict=True), "x", color="red",
                               markersize=10)  # fmt: skip
    for ax, title, unit in (
        (axes[0], "forward", "s per call"),
        (axes[1], "forward+backward", "s per call"),
        (axes[2], "jit(grad) temporaries (x: does not fit, not run)", "MiB"),
    ):
        ax.set_title(title)
        ax.set_xlabel("T = S")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"B={B}, N={N}, H={H}; {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def block_sweep(sizes, rounds):
    """fwd+bwd time per (query_chunk, key_chunk), relative to jax.nn, per case."""
    lines = [
        "## Block sizes (fwd+bwd, ratio to jax.nn xla; lower is better)",
        "",
        f"Machine: {machine()}. B={B}, N={N}, H={H}, float32, median of "
        f"{rounds} interleaved rounds; query x key block sizes. A shared, noisy "
        "machine: read differences under about 10% as ties.",
        "",
    ]
    choices = [(64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    header = " | ".join(f"{q}x{k}" for q, k in choices)
    lines += [f"| T | causal | {header} |", "|---|---|" + "---|" * len(choices)]
    for t in sizes:
        for causal in (False, True):
            fns = {JAX_NN: _modes(attention_fns(False)[JAX_NN], causal)["fwd+bwd"]}
            for q, k in choices:
                f = functools.partial(
                    lambda q_, k_, v_, c, qc, kc: jsoftmax.dot_product_attention(
                        q_, k_, v_, is_causal=c, query_chunk_size=qc, key_chunk_size=kc
                    ),
                    qc=q,
                    kc=k,
                )
                fns[f"{q}x{k}"] = _modes(f, causal)["fwd+bwd"]
            _, medians = time_side_by_side(fns, _data(t, jnp.float32), rounds)
            cells = " | ".join(
                f"{medians[f'{q}x{k}'] / medians[JAX_NN]:.2f}" for q, k in choices
            )
            lines.append(f"| {t} | {'yes' if causal else 'no'} | {cells} |")
            print(lines[-1], flush=True)
    return lines


def packed(t, documents, rounds):
    """fwd+bwd of causal attention over packed documents: segment ids (the
    block pairs of two documents are skipped) against the same visibility as
    a boolean mask (every block computed) and jax.nn with that mask."""
    lines = [
        "## Packed sequences (causal fwd+bwd, segment ids against a mask)",
        "",
        f"Machine: {machine()}. B={B}, N={N}, H={H}, T=S={t}, float32, equal "
        f"documents, default chunk sizes; medians of {rounds} interleaved rounds. "
        "`ids`: jsoftmax with `query_segment_ids`/`key_value_segment_ids`; "
        "`mask`: jsoftmax with the same visibility as `mask` (no block is "
        "skipped); jax.nn takes the mask. A/A: a second compiled copy of jax.nn.",
        "",
        "| documents | ids ms | mask ms | jax.nn ms | ids / mask | ids / jax.nn "
        "| A/A |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_docs in documents:
        ids = jnp.repeat(jnp.arange(n_docs, dtype=jnp.int32), t // n_docs)[None]
        mask = (ids[:, :, None] == ids[:, None, :])[:, None]

        def ours(q, k, v, c, **kw):
            return jsoftmax.dot_product_attention(q, k, v, is_causal=c, **kw)

        def nn(q, k, v, c, mask=mask):
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=c, implementation="xla"
            )

        fns = {
            "ids": functools.partial(
                ours, query_segment_ids=ids, key_value_segment_ids=ids
            ),
            "mask": functools.partial(ours, mask=mask),
            JAX_NN: nn,
            COPY: lambda q, k, v, c: nn(q, k, v, c),
        }
        fns = {n: _modes(f, True)["fwd+bwd"] for n, f in fns.items()}
        outs, ms = time_side_by_side(fns, _data(t, jnp.float32), rounds)
        _check(outs, JAX_NN)
        lines.append(
            f"| {n_docs} | {_ms(ms['ids'])} | {_ms(ms['mask'])} | "
            f"{_ms(ms[JAX_NN])} | {ms['ids'] / ms['mask']:.2f} | "
            f"{ms['ids'] / ms[JAX_NN]:.2f} | {ms[COPY] / ms[JAX_NN]:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def _variants():
    """name -> attention(q, k, v, is_causal) with the backward's D and loop
    form set: the shipped rule, D = rowsum(P * dP) by a pre-pass, and the
    while loops over traced block bounds (no reverse-over-reverse)."""
    from jsoftmax import _attention as attention

    def with_config(**changes):
        def fn(q, k, v, c):
            args = attention._prepare(
                q, k, v, None, None, None, c, None, None, None, None, None,
                None, None, None, None,
            )  # fmt: skip
            config = dataclasses.replace(args.config, **changes)
            out, _ = attention._attention_forward_mode(*args.arrays, config)
            return out.reshape(args.out_shape)

        return fn

    return {
        "shipped": with_config(),
        "exact D": with_config(exact_delta=True),
        "while loops": with_config(static_trips=False),
        "shipped copy": with_config(),  # the A/A control
    }


def precision(sizes, rounds):
    """The float32 gradient's error against float64 as the logits grow
    (q = k = v = c * x, causal), for the shipped D, the exact D and jax.nn;
    then fwd+bwd times of the variants against the shipped rule."""
    lines = [
        "# dot_product_attention: the backward's D, and its loop form",
        "",
        f"Machine: {machine()}.",
        "",
        "Gradient error of sum(sin(attention(q, q, q))) w.r.t. q, q = c * x, causal,",
        "B=1, T=16, N=2, H=16, float32, against float64 (jax.nn's definition), "
        "relative to the largest entry:",
        "",
        "| c | shipped: D = rowsum(dO * O) | exact D = rowsum(P * dP) | jax.nn |",
        "| --- | --- | --- | --- |",
    ]
    fns = _variants()
    x = jax.random.normal(jax.random.key(0), (1, 16, 2, 16))

    def grad(fn, q):
        return jax.grad(lambda q: jnp.sum(jnp.sin(fn(q, q, q, True))))(q)

    nn = functools.partial(jax.nn.dot_product_attention, implementation="xla")
    for c in (1, 10, 30, 100):
        with jax.enable_x64(True):
            want = np.asarray(grad(lambda q, k, v, c: nn(q, k, v, is_causal=c),
                                   (c * x).astype(jnp.float64)))  # fmt: skip
        cells = []
        for fn in (fns["shipped"], fns["exact D"], lambda q, k, v, c: nn(
                q, k, v, is_causal=c)):  # fmt: skip
            got = np.asarray(grad(fn, c * x), np.float64)
            cells.append(f"{np.max(np.abs(got - want)) / np.max(np.abs(want)):.1e}")
        lines.append(f"| {c} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        f"fwd+bwd time / the shipped rule's, B={B}, N={N}, H={H}, float32, "
        f"medians of {rounds} interleaved rounds:",
        "",
        "| T | causal | " + " | ".join(n for n in fns if n != "shipped") + " |",
        "| --- | --- | " + " | ".join("---" for n in fns if n != "shipped") + " |",
    ]
    for t in sizes:
        for causal in (False, True):
            modes = {n: _modes(f, causal)["fwd+bwd"] for n, f in fns.items()}
            _, medians = time_side_by_side(modes, _data(t, jnp.float32), rounds)
            cells = " | ".join(
                f"{medians[n] / medians['shipped']:.2f}" for n in fns if n != "shipped"
            )
            lines.append(f"| {t} | {'yes' if causal else 'no'} | {cells} |")
            print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------
# --gpu-targets and --gpu-blocks: the shapes and peers of issue 19's targets.

PEAK_TFLOPS = 989.0  # H200 bfloat16 dense peak (datasheet)
J_NONE, J_COPY, J_XLA = "jsoftmax None", "jsoftmax None (A/A copy)", "jsoftmax xla"
NN_XLA, NN_CUDNN = "jax.nn xla", "jax.nn cudnn"
TK_TRITON, TK_MOSAIC = "tokamax triton", "tokamax mosaic"
MHA = "pallas mha (floor)"
TARGET_IMPLS = (J_NONE, J_COPY, J_XLA, NN_XLA, NN_CUDNN, TK_TRITON, TK_MOSAIC, MHA)


@dataclasses.dataclass(frozen=True)
class GpuShapes:
    b: int
    n: int
    h: int
    kv_heads: tuple
    sizes: tuple
    dtype: object
    rounds: dict  # T -> interleaved rounds
    xla_max_t: int  # jsoftmax xla (the block path) is timed up to this T


def gpu_shapes(quick):
    if quick:  # a CPU smoke run
        return GpuShapes(1, 4, 32, (4, 2), (64,), jnp.bfloat16, {64: 2}, 64)
    return GpuShapes(4, 16, 128, (16, 4), (2048, 4096, 8192, 16384), jnp.bfloat16,
                     {2048: 5, 4096: 5, 8192: 3, 16384: 3}, 4096)  # fmt: skip


def attention_flops(s, t, causal, mode):
    """4*B*N*T*S*H for the forward, 3.5x that for fwd+bwd, halved if causal."""
    f = 4 * s.b * s.n * t * t * s.h * (3.5 if mode == "fwd+bwd" else 1.0)
    return f / 2 if causal else f


def _tokamax_or_reason():
    # tokamax parses sys.argv with absl flags, which do not know ours.
    sys.argv = sys.argv[:1]
    try:
        import tokamax
    except Exception as e:  # noqa: BLE001 - any import failure is a reason
        return None, f"import tokamax failed: {short_error(e)}"
    return tokamax, None


def peer_fns(s):
    """(name -> attention(q, k, v, is_causal), name -> why it is not run)."""
    scale = 1 / np.sqrt(s.h)
    fns = {
        J_NONE: lambda q, k, v, c: jsoftmax.dot_product_attention(q, k, v, is_causal=c),
        # The A/A control: the same program, traced and compiled separately.
        J_COPY: lambda q, k, v, c: jsoftmax.dot_product_attention(q, k, v, is_causal=c),
        J_XLA: lambda q, k, v, c: jsoftmax.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"
        ),
        NN_XLA: lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="xla"
        ),
    }
    skipped = {}
    if jax.default_backend() != "gpu":
        for name in (NN_CUDNN, TK_TRITON, TK_MOSAIC, MHA):
            skipped[name] = "not run: needs a CUDA GPU"
        return fns, skipped
    fns[NN_CUDNN] = lambda q, k, v, c: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn"
    )
    tokamax, why = _tokamax_or_reason()
    if tokamax is None:
        skipped[TK_TRITON] = skipped[TK_MOSAIC] = f"not run: {why}"
    else:
        for name, impl in ((TK_TRITON, "triton"), (TK_MOSAIC, "mosaic")):
            fns[name] = functools.partial(
                lambda q, k, v, c, impl: tokamax.dot_product_attention(
                    q, k, v, is_causal=c, implementation=impl
                ),
                impl=impl,
            )
    try:
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    except Exception as e:  # noqa: BLE001
        skipped[MHA] = f"not run: {short_error(e)}"
    else:

        def mha(q, k, v, c):
            # No grouped-query support: k and v are repeated to N heads inside
            # the timed function (and their gradients summed back).
            group = q.shape[2] // k.shape[2]
            k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
            return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=c)

        fns[MHA] = mha
    return fns, skipped


def _gqa_modes(fn, causal):
    """(q, k, v, dout) -> output ("fwd") or (dq, dk, dv) ("fwd+bwd")."""
    fwd = functools.partial(fn, c=causal)

    def fwd_bwd(q, k, v, d_out):
        _, vjp = jax.vjp(fwd, q, k, v)
        return vjp(d_out)

    return {"fwd": lambda q, k, v, d_out: fwd(q, k, v), "fwd+bwd": fwd_bwd}


def _gqa_data(s, t, kv):
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = [(s.b, t, s.n, s.h), (s.b, t, kv, s.h), (s.b, t, kv, s.h),
              (s.b, t, s.n, s.h)]  # fmt: skip
    return [jax.random.normal(k, sh).astype(s.dtype)
            for k, sh in zip(keys, shapes, strict=True)]  # fmt: skip


def _cell_ms(r):
    if r.get("median") is None:
        return ""
    return f"{r['median'] * 1e3:,.2f} ({r['min'] * 1e3:,.2f}-{r['max'] * 1e3:,.2f})"


def _tflops(flops, r):
    if r.get("median") is None:
        return "", ""
    tf = flops / r["median"] / 1e12
    return f"{tf:,.{0 if tf >= 10 else 2}f}", f"{100 * tf / PEAK_TFLOPS:.1f}%"


def _ratio(r, base):
    if not base or r.get("median") is None or base.get("median") is None:
        return ""
    return f"{r['median'] / base['median']:.2f}"


def _not_run(reason):
    return dict(status=reason, temp=None, err=None, ref=None)


def gpu_targets(s, budget_s, limit, workers, write):
    """Rows of (T, K, causal, mode, name -> result); ``write(rows)`` after each T."""
    fns, skipped = peer_fns(s)
    deadline = time.monotonic() + budget_s
    rows = []
    for t in s.sizes:
        cases = [(kv, c, m) for kv in s.kv_heads for c in (False, True)
                 for m in ("fwd", "fwd+bwd")]  # fmt: skip
        if time.monotonic() > deadline:
            for kv, causal, mode in cases:
                results = {n: _not_run("not run: time budget") for n in TARGET_IMPLS}
                rows.append(dict(t=t, kv=kv, causal=causal, mode=mode,
                                 results=results))  # fmt: skip
            write(rows)
            continue
        # Compile every case of this T at once (in parallel), then time them.
        sel, data = {}, {}
        for kv in s.kv_heads:
            data[kv] = _gqa_data(s, t, kv)
        for kv, causal, mode in cases:
            for name, fn in fns.items():
                if name == J_XLA and t > s.xla_max_t:
                    continue
                sel[(kv, causal, mode, name)] = _gqa_modes(fn, causal)[mode]
        compiled = compile_all(sel, {key: data[key[0]] for key in sel}, workers)
        print(f"T={t}: {len(sel)} programs compiled", flush=True)
        for kv, causal, mode in cases:
            keys = [key for key in sel if key[:3] == (kv, causal, mode)]
            group = {key[3]: sel[key] for key in keys}
            if time.monotonic() > deadline:
                results = {n: _not_run("not run: time budget") for n in group}
            else:
                results = side_by_side(
                    group, data[kv], s.rounds.get(t, 3),
                    references=(NN_XLA, NN_CUDNN, J_XLA, J_NONE), tol=3e-2,
                    limit_bytes=limit, compiled={key[3]: compiled[key] for key in keys},
                )  # fmt: skip
            if J_XLA not in group:
                results[J_XLA] = _not_run(
                    f"not run above T={s.xla_max_t} (seconds per call: the XLA "
                    "block loops; see attention_gpu.md)"
                )
            for name, why in skipped.items():
                results[name] = _not_run(why)
            rows.append(dict(t=t, kv=kv, causal=causal, mode=mode, results=results))
            print(f"T={t} K={kv} causal={causal} {mode}: " + ", ".join(
                f"{n} {_cell_ms(r) or r['status']}" for n, r in results.items()),
                flush=True)  # fmt: skip
        write(rows)
    return rows


def _verdict(ratio, bound, why_missing):
    if ratio is None:
        return f"n/a ({why_missing})"
    return f"{ratio:.2f} {'met' if ratio <= bound else '**NOT met**'}"


def _median_ratio(results, name, base):
    a, b = results.get(name, {}), results.get(base, {})
    if a.get("median") is None or b.get("median") is None:
        missing = base if b.get("median") is None else name
        status = results.get(missing, {}).get("status", "absent")
        return None, f"{missing}: {status}"
    return a["median"] / b["median"], None


def targets_markdown(s, rows, title):
    lines = [
        title,
        "",
        f"Machine: {gpu_header()}.",
        "",
        f"B={s.b}, N={s.n} query heads, K key/value heads, H={s.h}, T=S, "
        f"{np.dtype(s.dtype).name}; `fwd` is the output, `fwd+bwd` one "
        "`jax.vjp` with a fixed cotangent (forward, then dq, dk, dv). "
        "`jsoftmax None` is `implementation=None`: the Pallas (Triton) kernels "
        "where the program is lowered for a CUDA GPU, the XLA block path "
        "elsewhere; `jsoftmax xla` is the block path. The peers run in the same "
        "process: jax.nn xla and cudnn, tokamax's triton and mosaic (where "
        "`import tokamax` works), and JAX's Pallas GPU example "
        "`jax.experimental.pallas.ops.gpu.attention.mha` as a floor; it has no "
        "grouped-query support, so for K < N it repeats k and v to N heads "
        "inside the timed function.",
        "",
        "Method: every function compiled (in parallel threads), run once and "
        "checked against the first of jax.nn xla, cuDNN, jsoftmax xla that ran "
        "(relative error to the largest entry, bfloat16 allowance 3e-2), then "
        "timed in interleaved rounds in a random order; median ms per call "
        "(min-max). A/A: a second compiled copy of jsoftmax None over it (the "
        "noise of that row). TFLOP/s count 4*B*N*T*S*H for the forward and 3.5x "
        f"that for fwd+bwd, halved when causal; % of the {PEAK_TFLOPS:.0f} "
        "TFLOP/s bfloat16 dense peak. temp: the compiled program's temporaries "
        "(XLA's memory_analysis).",
        "",
    ]
    for mode in ("fwd+bwd", "fwd"):
        lines += [
            f"## {mode}",
            "",
            "| T | K | causal | implementation | ms | TFLOP/s | % peak | "
            "/ jax.nn xla | / cuDNN | A/A | temp | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if row["mode"] != mode:
                continue
            flops = attention_flops(s, row["t"], row["causal"], mode)
            res = row["results"]
            for name in TARGET_IMPLS:
                if name == J_COPY or name not in res:
                    continue
                r = res[name]
                tf, pct = _tflops(flops, r)
                aa = _ratio(res.get(J_COPY, {}), r) if name == J_NONE else ""
                temp = "" if r["temp"] is None else _mib(r["temp"])
                lines.append(
                    f"| {row['t']} | {row['kv']} | {'yes' if row['causal'] else 'no'}"
                    f" | {name} | {_cell_ms(r)} | {tf} | {pct} | "
                    f"{_ratio(r, res.get(NN_XLA)) if name != NN_XLA else ''} | "
                    f"{_ratio(r, res.get(NN_CUDNN)) if name != NN_CUDNN else ''} | "
                    f"{aa} | {temp} | {r['status']} |"
                )
        lines.append("")
    lines += [
        "## Targets (fwd+bwd time of jsoftmax None over the peer's, lower is better)",
        "",
        "Issue 19: never slower than jax.nn xla at T >= 1024; at T >= 4096 at "
        "most 0.5x jax.nn xla (non-causal) and 0.3x (causal), at most 1.5x "
        "cuDNN (stretch 1.0x); at least tokamax triton's throughput (ratio "
        "<= 1.0).",
        "",
        "| T | K | causal | <= 1.0x jax.nn xla | <= 0.5x / 0.3x jax.nn xla | "
        "<= 1.5x cuDNN | <= 1.0x tokamax triton |",
        "|---|---|---|---|---|---|---|",
    ]
    tally = {}
    for row in rows:
        if row["mode"] != "fwd+bwd":
            continue
        res, t, causal = row["results"], row["t"], row["causal"]
        cells = []
        for key, base, bound, applies in (
            ("vs xla", NN_XLA, 1.0, t >= 1024),
            ("vs xla (T>=4096)", NN_XLA, 0.3 if causal else 0.5, t >= 4096),
            ("vs cuDNN", NN_CUDNN, 1.5, t >= 4096),
            ("vs tokamax triton", TK_TRITON, 1.0, True),
        ):
            if not applies:
                cells.append("(T below the target's range)")
                continue
            ratio, why = _median_ratio(res, J_NONE, base)
            cell = _verdict(ratio, bound, why)
            cells.append(cell)
            outcome = "n/a" if ratio is None else "met" if ratio <= bound else "not"
            tally.setdefault(key, {}).setdefault(outcome, 0)
            tally[key][outcome] += 1
        lines.append(
            f"| {t} | {row['kv']} | {'yes' if causal else 'no'} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Tally: " + "; ".join(
        f"{k}: " + ", ".join(f"{v} {o}" for o, v in sorted(d.items()))
        for k, d in tally.items()) + "."]  # fmt: skip
    return lines


def targets_plot(s, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(s.kv_heads) * 2, figsize=(20, 5), sharey=True)
    panels = [(kv, c) for kv in s.kv_heads for c in (False, True)]
    for ax, (kv, causal) in zip(axes, panels, strict=True):
        for i, name in enumerate(n for n in TARGET_IMPLS if n != J_COPY):
            pts = [
                (r["t"], attention_flops(s, r["t"], causal, "fwd+bwd")
                 / r["results"][name]["median"] / 1e12)
                for r in rows
                if r["mode"] == "fwd+bwd" and r["kv"] == kv and r["causal"] == causal
                and r["results"].get(name, {}).get("median")
            ]  # fmt: skip
            if pts:
                ax.semilogx(*zip(*pts, strict=True), "o-", color=f"C{i}", label=name)
        ax.axhline(PEAK_TFLOPS, color="gray", lw=0.8, ls=":")
        ax.set_title(f"fwd+bwd, K={kv}{', causal' if causal else ''}")
        ax.set_xlabel("T = S")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"B={s.b}, N={s.n}, H={s.h}; {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def gpu_block_sweep(s, t, budget_s, workers):
    """fwd+bwd time per chunk size: the XLA block path and the kernels."""
    if s.b == 1:  # quick
        xla_chunks = [(128, 128), (256, 256)]
        kernel_chunks = [None, (32, 32), (64, 64)]
    else:
        xla_chunks = [(128, 128), (256, 256), (512, 512), (512, 1024), (1024, 1024)]
        kernel_chunks = [None, (32, 32), (32, 64), (64, 64), (64, 128), (128, 64),
                         (128, 128)]  # fmt: skip
    variants = {}
    for qc, kc in xla_chunks:
        variants[f"xla {qc}x{kc}"] = dict(implementation="xla", query_chunk_size=qc,
                                          key_chunk_size=kc)  # fmt: skip
    for chunks in kernel_chunks:
        label = "default" if chunks is None else f"{chunks[0]}x{chunks[1]}"
        kw = {} if chunks is None else dict(
            query_chunk_size=chunks[0], key_chunk_size=chunks[1])  # fmt: skip
        variants[f"None {label}"] = kw
    kv = s.kv_heads[0]
    lines = [
        "# dot_product_attention: chunk sizes on this backend (fwd+bwd)",
        "",
        f"Machine: {gpu_header()}.",
        "",
        f"B={s.b}, N={s.n}, K={kv}, H={s.h}, T=S={t}, {np.dtype(s.dtype).name}; "
        '`xla QxK`: `implementation="xla"` (the block path) with '
        "`query_chunk_size=Q, key_chunk_size=K`; `None QxK`: the default "
        "implementation (the Pallas kernels on a CUDA GPU, the block path "
        "elsewhere) with those chunk sizes, which then set the blocks of every "
        "kernel (forward, dK/dV and dQ); `None default`: each kernel's own "
        "blocks (jsoftmax/_attention_pallas.py). Medians (min-max) of "
        "interleaved rounds; TFLOP/s as in attention_gpu_targets.md.",
        "",
        "| variant | causal | ms | TFLOP/s | % peak | / fastest of its kind | status |",
        "|---|---|---|---|---|---|---|",
    ]
    deadline = time.monotonic() + budget_s
    data = _gqa_data(s, t, kv)
    for causal in (False, True):
        fns = {
            name: _gqa_modes(functools.partial(
                lambda q, k, v, c, kw: jsoftmax.dot_product_attention(
                    q, k, v, is_causal=c, **kw), kw=kw), causal)["fwd+bwd"]
            for name, kw in variants.items()
        }  # fmt: skip
        if jax.default_backend() == "gpu":
            cudnn = functools.partial(jax.nn.dot_product_attention,
                                      implementation="cudnn")  # fmt: skip
            fns[NN_CUDNN] = _gqa_modes(
                lambda q, k, v, c, f=cudnn: f(q, k, v, is_causal=c), causal
            )["fwd+bwd"]
        if time.monotonic() > deadline:
            res = {n: _not_run("not run: time budget") for n in fns}
        else:
            res = side_by_side(fns, data, 2 if s.b == 1 else 5,
                               references=(NN_CUDNN, "xla 128x128"), tol=3e-2,
                               workers=workers)  # fmt: skip
        flops = attention_flops(s, t, causal, "fwd+bwd")
        best = {}
        for name, r in res.items():
            kind = name.split()[0]
            if r.get("median") is not None:
                best[kind] = min(best.get(kind, np.inf), r["median"])
        for name, r in res.items():
            tf, pct = _tflops(flops, r)
            kind = name.split()[0]
            rel = (f"{r['median'] / best[kind]:.2f}"
                   if r.get("median") is not None else "")  # fmt: skip
            lines.append(f"| {name} | {'yes' if causal else 'no'} | {_cell_ms(r)} | "
                         f"{tf} | {pct} | {rel} | {r['status']} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/attention.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--blocks", action="store_true")
    parser.add_argument("--precision", action="store_true")
    parser.add_argument(
        "--packed", action="store_true",
        help="packed documents: segment ids against a mask (attention_packed)",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-targets", action="store_true",
        help="issue 19's shapes and peers (attention_gpu_targets.md)",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-blocks", action="store_true",
        help="chunk sizes of the XLA path and the kernels at T=4096 "
        "(attention_blocks_gpu.md)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float, default=200.0,
        help="--gpu-targets/--gpu-blocks: cases not started within this many "
        "seconds are reported as not run",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=12, help="threads that compile in parallel"
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--limit-gib", type=float, default=None,
        help="cases needing more memory than this are not run "
        "(default 24, or 100 with --gpu-targets)",
    )  # fmt: skip
    parser.add_argument(
        "--sizes", type=lambda a: [int(t) for t in a.split(",")], default=None,
        help="comma-separated sequence lengths T=S, every one timed",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    limit_gib = args.limit_gib or (100.0 if args.gpu_targets else 24.0)
    limit = int(limit_gib * GiB)
    platform = "gpu" if args.gpu else "cpu"
    if args.gpu_targets or args.gpu_blocks:
        shapes = gpu_shapes(args.quick)
        if args.sizes:
            shapes = dataclasses.replace(shapes, sizes=tuple(args.sizes))
        suffix = "quick" if args.quick else "gpu"
    if args.gpu_targets:
        stem = out / f"attention_{suffix}_targets"
        title = "# dot_product_attention against its peers: issue 19's targets"

        def write(rows):
            text = "\n".join(targets_markdown(shapes, rows, title)) + "\n"
            stem.with_suffix(".md").write_text(text)

        rows = gpu_targets(shapes, args.budget_s, limit, args.workers, write)
        try:
            targets_plot(shapes, rows, stem.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - the plot is optional
            print(f"no plot: {short_error(e)}")
        print(stem.with_suffix(".md").read_text())
        return 0
    if args.gpu_blocks:
        t = 256 if args.quick else 4096
        lines = gpu_block_sweep(shapes, t, args.budget_s, args.workers)
        (out / f"attention_blocks_{suffix}.md").write_text("\n".join(lines) + "\n")
        return 0
    if args.packed:
        t, docs = (256, [2, 4]) if args.quick else (2048, [2, 8, 32])
        lines = packed(t, docs, 2 if args.quick else 5)
        name = "quick" if args.quick else platform
        (out / f"attention_packed_{name}.md").write_text("\n".join(lines) + "\n")
        return 0
    if args.precision:
        sizes = [256] if args.quick else [1024, 2048]
        lines = precision(sizes, 2 if args.quick else 7)
        name = "quick" if args.quick else platform
        (out / f"attention_precision_{name}.md").write_text("\n".join(lines) + "\n")
        return 0
    if args.blocks:
        sizes = [512] if args.quick else [1024, 2048]
        lines = block_sweep(sizes, 2 if args.quick else 3)
        (out / f"attention_blocks_{platform}.md").write_text("\n".join(lines) + "\n")
        return 0
    if args.quick:
        sizes, timed_sizes, rounds = [256, 512], {256, 512}, 2
    elif args.gpu:
        sizes = [1024, 2048, 4096, 8192, 16384]
        timed_sizes, rounds = set(sizes), 7
    else:
        # Memory (compile-only) up to 16384; times where a run takes seconds,
        # not minutes, on a 2-core CPU (jax.nn's fwd+bwd at 4096 takes ~10 s).
        sizes = [512, 1024, 2048, 4096, 8192, 16384]
        timed_sizes = {512, 1024, 2048, 4096}
        rounds = {512: 7, 1024: 7, 2048: 5, 4096: 3}
    if args.sizes:
        sizes, timed_sizes = args.sizes, set(args.sizes)
        rounds = rounds if isinstance(rounds, int) else 5
    rows = run(sizes, timed_sizes, rounds, args.gpu, limit)
    title = f"# dot_product_attention benchmark{' (quick)' if args.quick else ''}"
    lines = markdown(rows, title, limit)
    if not (args.quick or args.gpu or args.sizes):
        lines += [
            "",
            "Times are measured up to T=4096 (a jax.nn fwd+bwd call takes seconds "
            "there and grows as T^2); the memory columns go to T=16384.",
        ]
    name = f"attention_{'quick' if args.quick else platform}"
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    plot(rows, out / f"{name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

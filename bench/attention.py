"""Benchmark dot_product_attention against jax.nn.dot_product_attention.

    python bench/attention.py             # bench/results/attention_cpu.{md,png}
    python bench/attention.py --quick     # small shapes, a smoke run (< 2 min)
    python bench/attention.py --gpu       # bfloat16, also jax.nn's cuDNN kernel
    python bench/attention.py --blocks    # the block-size sweep behind the defaults
    python bench/attention.py --sizes 1024,4096   # these T=S only, all timed
    python bench/attention.py --precision  # backward's D and loop form: error, time

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

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals

import jsoftmax
from bench import interleaved, machine

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/attention.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--blocks", action="store_true")
    parser.add_argument("--precision", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--limit-gib", type=float, default=24.0,
        help="jax.nn cases needing more memory than this are not run",
    )  # fmt: skip
    parser.add_argument(
        "--sizes", type=lambda a: [int(t) for t in a.split(",")], default=None,
        help="comma-separated sequence lengths T=S, every one timed",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_gib * GiB)
    platform = "gpu" if args.gpu else "cpu"
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

"""Benchmark jsoftmax against jax.nn, naive autodiff and the memory floor.

Run from a checkout with the package installed (``pip install -e '.[bench]'``):

    python -m jsoftmax bench            # CPU sweep
    python -m jsoftmax bench --quick    # tiny shapes, a smoke run
    python -m jsoftmax bench --gpu      # the GPU shape set, file named by device
    python -m jsoftmax bench --out bench/results   # replace the committed tables

Without ``--out`` a run writes to a new folder in the system's temporary
directory (``jsoftmax-bench-<time>-*``) and prints its path, so that it never
overwrites the committed results in ``bench/results/``.

Everything runs in one process, side by side: for each shape every
implementation is compiled, checked against jax.nn, warmed up, then timed in
interleaved rounds (each round runs every implementation once, in a random
order), and the median, min and max over rounds are reported. Ratios are what
to read; these machines are noisy. A second, separately compiled copy of
jax.nn is timed as a control: its ratio to jax.nn (the same program) shows
how far a ratio moves by noise alone for that case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as jax_config
from jax._src.ad_checkpoint import saved_residuals

import jsoftmax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CONTROL = "jax.nn copy"


def naive_softmax(x, where=None):
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, -1, keepdims=True)))
    y = e / jnp.sum(e, -1, keepdims=True)
    return y if where is None else jnp.where(where, y, 0.0)


def naive_log_softmax(x, where=None):
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    s = x - jax.lax.stop_gradient(jnp.max(x, -1, keepdims=True))
    o = s - jnp.log(jnp.sum(jnp.exp(s), -1, keepdims=True))
    return o if where is None else jnp.where(where, o, -jnp.inf)


@contextlib.contextmanager
def _custom_jvp_flag(value):
    with jax_config.softmax_custom_jvp(value):
        yield


def implementations(op):
    """name -> (function of (x, where), config context)."""
    ours = {"softmax": jsoftmax.softmax, "log_softmax": jsoftmax.log_softmax}[op]
    nn = {"softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax}[op]
    naive = {"softmax": naive_softmax, "log_softmax": naive_log_softmax}[op]
    impls = {
        "jsoftmax": (lambda x, w: ours(x, where=w), contextlib.nullcontext),
        "jax.nn": (lambda x, w: nn(x, where=w), lambda: _custom_jvp_flag(False)),
        # The same program compiled a second time: its ratio to jax.nn is the
        # noise floor of this machine for the case (an A/A test).
        CONTROL: (lambda x, w: nn(x, where=w), lambda: _custom_jvp_flag(False)),
        "naive": (naive, contextlib.nullcontext),
    }
    if op == "softmax":
        # log_softmax has no custom_jvp variant in jax.nn.
        impls["jax.nn(custom_jvp)"] = (
            lambda x, w: nn(x, where=w),
            lambda: _custom_jvp_flag(True),
        )
    return impls


def floor_fns():
    """Elementwise ops that move the bytes a softmax must move, and no more."""
    fwd = jax.jit(lambda x: x * 2.0)  # read N, write N
    bwd = jax.jit(lambda y, g: y * g)  # read 2N, write N
    return fwd, bwd


def timed(fn, args, number, ctx=contextlib.nullcontext):
    """Seconds per call, over ``number`` back-to-back calls (also used by
    losses.py)."""
    with ctx():
        start = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / number


def calls_per_sample(fn, args, ctx=contextlib.nullcontext):
    """Enough calls that one sample lasts about 5 ms, so dispatch noise averages out."""
    once = timed(fn, args, 1, ctx)
    return int(min(max(5e-3 / max(once, 1e-7), 1), 200))


def interleaved(fns, args, rounds):
    """Samples of seconds per call of each (compiled) function: one sample per
    function per round, each round in a fresh random order. A sample is enough
    back-to-back calls to last about 5 ms (see calls_per_sample). Used by
    losses.py, attention.py and forward_mode.py."""
    calls = {n: calls_per_sample(f, args) for n, f in fns.items()}
    times = {n: [] for n in fns}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for n in rng.permutation(list(fns)):
            times[n].append(timed(fns[n], args, calls[n]))
    return {n: np.array(t) for n, t in times.items()}


def gpu_header():
    """The machine line of a GPU table: device, driver, CUDA, jax and jaxlib."""
    import jaxlib

    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        smi = f"nvidia-smi unavailable ({type(e).__name__})"
    return (
        f"{machine()}, jaxlib {jaxlib.__version__}; nvidia-smi: {smi}"
        if jax.default_backend() == "gpu"
        else f"{machine()}, jaxlib {jaxlib.__version__} (no GPU: a smoke run)"
    )


def short_error(e):
    """One line of an exception, safe inside a markdown table cell."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:160]}".replace("|", "/")


def compile_all(fns, args, workers=8):
    """name -> ``jax.jit(fn).lower(*args).compile()``, or the exception it
    raised; ``args`` is one tuple for all, or a dict name -> tuple. Lowering
    and compiling run in ``workers`` threads (XLA and Triton compile outside
    the GIL), since compile time dominates a GPU sweep. The threads see the
    global JAX config, not the caller's thread-local contexts (``with
    jax.numpy_dtype_promotion(...)`` and the like)."""

    def build(name):
        fn_args = args[name] if isinstance(args, dict) else args
        return jax.jit(fns[name]).lower(*fn_args).compile()

    out = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {name: pool.submit(build, name) for name in fns}
        for name, future in futures.items():
            try:
                out[name] = future.result()
            except Exception as e:  # noqa: BLE001 - reported in the table
                out[name] = e
    return out


def _relative_error(got, want):
    """Largest |got - want| over the largest |want|, over every leaf, on device."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
        scale = jnp.maximum(jnp.max(jnp.abs(w)), 1e-30)
        worst = max(worst, float(jnp.max(jnp.abs(g - w)) / scale))
    return worst


def side_by_side(fns, args, rounds, references=(), tol=2e-2, limit_bytes=None,
                 workers=8, compiled=None):  # fmt: skip
    """Compile, check and time ``fns`` on ``args``, never raising for one of them.

    Returns name -> dict with ``status`` ("ok", "mismatch ...", "failed: ...",
    "not run: ..."), ``median``/``min``/``max`` seconds per call (where timed),
    ``temp`` (compiled temporaries in bytes) and ``err`` (the relative error
    against the first of ``references`` that ran, which is named in ``ref``).
    A function whose temporaries, arguments and outputs exceed ``limit_bytes``
    is compiled but not run. The rest run in interleaved rounds (interleaved).
    ``compiled`` (name -> executable or exception, from compile_all) skips
    the compilation.
    """
    res = {n: dict(status="ok", temp=None, err=None, ref=None) for n in fns}
    if compiled is None:
        compiled = compile_all(fns, args, workers)
    compiled = {n: compiled[n] for n in fns}
    runnable = {}
    for name, c in compiled.items():
        if isinstance(c, Exception):
            res[name]["status"] = f"failed: {short_error(c)}"
            continue
        mem = c.memory_analysis()
        if mem is not None:
            res[name]["temp"] = mem.temp_size_in_bytes
            need = (
                mem.temp_size_in_bytes
                + mem.argument_size_in_bytes
                + mem.output_size_in_bytes
            )
            if limit_bytes is not None and need > limit_bytes:
                res[name]["status"] = (
                    f"not run: needs {need / 2**30:,.0f} GiB > "
                    f"{limit_bytes / 2**30:,.0f} GiB"
                )
                continue
        runnable[name] = c
    outs = {}
    for name, c in list(runnable.items()):
        try:
            outs[name] = jax.block_until_ready(c(*args))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory
            res[name]["status"] = f"failed: {short_error(e)}"
            del runnable[name]
    ref = next((r for r in references if r in outs), None)
    for name, out in outs.items():
        if ref is None or name == ref:
            continue
        err = _relative_error(out, outs[ref])
        res[name].update(err=err, ref=ref)
        if not err <= tol:
            res[name]["status"] = f"mismatch: {err:.2g} vs {ref}"
    del outs
    try:
        samples = interleaved(runnable, args, rounds)
    except Exception as e:  # noqa: BLE001 - a failure while timing
        for name in runnable:
            res[name]["status"] = f"failed while timing: {short_error(e)}"
        return res
    for name, t in samples.items():
        res[name].update(median=float(np.median(t)), min=float(t.min()),
                         max=float(t.max()))  # fmt: skip
    return res


def measure(shape, dtype, masked, op, rounds, check=True):
    key = jax.random.key(0)
    x = (3 * jax.random.normal(key, shape)).astype(dtype)
    g = jax.random.normal(jax.random.key(1), shape).astype(dtype)
    where = (
        (jax.random.uniform(jax.random.key(2), shape[-1:]) > 0.2).at[0].set(True)
        if masked
        else None
    )
    impls = implementations(op)
    runs = {}
    info = {}
    for name, (f, ctx) in impls.items():
        fwd = jax.jit(lambda x, f=f: f(x, where))

        def fwd_bwd(x, g, f=f):
            y, vjp = jax.vjp(lambda x: f(x, where), x)
            return y, vjp(g)[0]

        fwd_bwd = jax.jit(fwd_bwd)
        with ctx():
            t0 = time.perf_counter()
            compiled = fwd_bwd.lower(x, g).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            res = saved_residuals(lambda x, f=f: f(x, where), x)
            jax.block_until_ready(fwd(x))
            jax.block_until_ready(fwd_bwd(x, g))
        info[name] = dict(
            compile_s=compile_s,
            temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
            residual_bytes=int(
                sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a, _ in res)
            ),
        )
        runs[name] = (fwd, fwd_bwd, ctx)
    if check:
        _check(runs, x, g)
    floor_fwd, floor_bwd = floor_fns()
    y = jax.block_until_ready(floor_fwd(x))
    jax.block_until_ready(floor_bwd(y, g))
    number = calls_per_sample(runs["jax.nn"][1], (x, g), runs["jax.nn"][2])
    times = {name: {"fwd": [], "fwd_bwd": []} for name in runs}
    times["floor"] = {"fwd": [], "fwd_bwd": []}
    # Each round runs every implementation once, in a fresh random order, so
    # that no implementation always follows the same neighbour.
    rng = np.random.default_rng(0)
    names = [*runs, "floor"]
    for _ in range(rounds):
        for name in rng.permutation(names):
            if name == "floor":
                tf = timed(floor_fwd, (x,), number)
                tb = timed(floor_bwd, (y, g), number)
                times["floor"]["fwd"].append(tf)
                times["floor"]["fwd_bwd"].append(tf + tb)
                continue
            fwd, fwd_bwd, ctx = runs[name]
            times[name]["fwd"].append(timed(fwd, (x,), number, ctx))
            times[name]["fwd_bwd"].append(timed(fwd_bwd, (x, g), number, ctx))
    return times, info


def _check(runs, x, g):
    """Every implementation agrees with jax.nn before it is timed."""
    outs = {}
    for name, (_, fwd_bwd, ctx) in runs.items():
        with ctx():
            outs[name] = [np.asarray(a, np.float32) for a in fwd_bwd(x, g)]
    base = outs["jax.nn"]
    tol = 1e-4 if x.dtype == jnp.float32 else 5e-2
    for name, (y, dx) in outs.items():
        for got, want, what in ((y, base[0], "value"), (dx, base[1], "gradient")):
            ok = np.isfinite(want)
            scale = 1 + np.max(np.abs(want[ok]), initial=0)
            err = np.max(np.abs(got[ok] - want[ok]), initial=0) / scale
            if err > tol:
                raise AssertionError(f"{name}: {what} differs from jax.nn by {err}")


def sweep(gpu, quick):
    """(label, shape, dtype, masked) cases."""
    if quick:
        shapes = [("rows128", (64, 128)), ("rows4096", (8, 4096))]
        return [(label, s, d, False) for label, s in shapes for d in ("float32",)] + [
            ("rows128+where", (64, 128), "float32", True)
        ]
    if gpu:
        shapes = [
            ("rows128", (8192, 128)),
            ("rows4096", (4096, 4096)),
            ("rows4096", (32768, 4096)),
            ("rows131072", (512, 131072)),
            ("attn[b,h,q,k]", (8, 16, 1024, 1024)),
        ]
    else:
        shapes = [
            ("rows128", (80, 128)),
            ("rows128", (8192, 128)),
            ("rows4096", (256, 4096)),
            ("rows4096", (2048, 4096)),
            ("rows131072", (8, 131072)),
            ("rows131072", (128, 131072)),
            ("attn[b,h,q,k]", (4, 8, 512, 512)),
            ("rows4096", (24576, 4096)),
        ]
    cases = [
        (label, s, d, False) for label, s in shapes for d in ("float32", "bfloat16")
    ]
    cases.append(("rows4096+where", (2048, 4096), "float32", True))
    return cases


def machine():
    dev = jax.devices()[0]
    return (
        f"{dev.device_kind} ({dev.platform}), {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, jax {jax.__version__}"
    )


def _rounds(n_elements, quick):
    if quick:
        return 2
    return 31 if n_elements < 1e6 else 15 if n_elements < 2e7 else 9


def run(gpu=False, quick=False):
    rows = []
    for op in ("softmax", "log_softmax"):
        for label, shape, dtype, masked in sweep(gpu, quick):
            n = int(np.prod(shape))
            times, info = measure(shape, dtype, masked, op, _rounds(n, quick))
            for name, t in times.items():
                row = dict(
                    op=op,
                    label=label,
                    shape=list(shape),
                    n=n,
                    dtype=dtype,
                    masked=masked,
                    impl=name,
                )
                for mode in ("fwd", "fwd_bwd"):
                    v = np.array(t[mode])
                    row[mode] = dict(
                        median=float(np.median(v)),
                        min=float(v.min()),
                        max=float(v.max()),
                    )
                row.update(info.get(name, {}))
                rows.append(row)
            print(f"{op:11s} {label:15s} {str(shape):22s} {dtype:8s} done", flush=True)
    return rows


def ratios(rows):
    """jsoftmax / other, per case, for medians."""
    out = []
    key = lambda r: (r["op"], r["label"], tuple(r["shape"]), r["dtype"], r["masked"])  # noqa: E731
    cases = {}
    for r in rows:
        cases.setdefault(key(r), {})[r["impl"]] = r
    for k, impls in cases.items():
        ours = impls["jsoftmax"]
        entry = dict(zip(("op", "label", "shape", "dtype", "masked"), k, strict=True))
        entry["n"] = ours["n"]
        for mode in ("fwd", "fwd_bwd"):
            for other in impls:
                if other == "jsoftmax":
                    continue
                entry[f"{mode}/{other}"] = (
                    ours[mode]["median"] / impls[other][mode]["median"]
                )
        if CONTROL in impls:
            for mode in ("fwd", "fwd_bwd"):
                entry[f"control_{mode}"] = (
                    impls[CONTROL][mode]["median"] / impls["jax.nn"][mode]["median"]
                )
        entry["residual_bytes"] = {
            n: r["residual_bytes"] for n, r in impls.items() if n != "floor"
        }
        entry["temp_bytes"] = {
            n: r["temp_bytes"] for n, r in impls.items() if n != "floor"
        }
        entry["compile_s"] = {
            n: r["compile_s"] for n, r in impls.items() if n != "floor"
        }
        out.append(entry)
    return out


def markdown(rows, title):
    lines = [f"# {title}", "", f"Machine: {machine()}.", ""]
    lines += [
        "Ratios are jsoftmax's median time over the other's (below 1: jsoftmax is "
        "faster), from interleaved rounds in one process. `floor` is an elementwise "
        "op moving the minimum bytes (forward: read N, write N; backward: read 2N, "
        "write N). `A/A` is the control: a second compiled copy of jax.nn over "
        "jax.nn, the same program, so its distance from 1.00 is the noise in that "
        "row (fwd, fwd+bwd).",
        "",
        "| op | shape | dtype | where | fwd / jax.nn | fwd+bwd / jax.nn | "
        "A/A (fwd, fwd+bwd) | "
        "fwd+bwd / jax.nn(custom_jvp) | fwd+bwd / naive | fwd / floor | "
        "fwd+bwd / floor | residual bytes (ours / jax.nn) | temp bytes (ours / jax.nn) "
        "| compile s (ours / jax.nn) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ratios(rows):
        cj = e.get("fwd_bwd/jax.nn(custom_jvp)")
        lines.append(
            f"| {e['op']} | {tuple(e['shape'])} | {e['dtype']} "
            f"| {'yes' if e['masked'] else ''} "
            f"| {e['fwd/jax.nn']:.2f} | {e['fwd_bwd/jax.nn']:.2f} | "
            f"{e['control_fwd']:.2f}, {e['control_fwd_bwd']:.2f} | "
            f"{'' if cj is None else f'{cj:.2f}'} | {e['fwd_bwd/naive']:.2f} | "
            f"{e['fwd/floor']:.2f} | {e['fwd_bwd/floor']:.2f} | "
            f"{e['residual_bytes']['jsoftmax']} / {e['residual_bytes']['jax.nn']} | "
            f"{e['temp_bytes']['jsoftmax']} / {e['temp_bytes']['jax.nn']} | "
            f"{e['compile_s']['jsoftmax']:.2f} / {e['compile_s']['jax.nn']:.2f} |"
        )
    lines += ["", "## Summary", ""]
    for op in ("softmax", "log_softmax"):
        for dtype in ("float32", "bfloat16"):
            es = [e for e in ratios(rows) if e["op"] == op and e["dtype"] == dtype]
            if not es:
                continue
            fb = np.array([e["fwd_bwd/jax.nn"] for e in es])
            fw = np.array([e["fwd/jax.nn"] for e in es])
            aa = np.array([[e["control_fwd"], e["control_fwd_bwd"]] for e in es])
            lines.append(
                f"- {op} {dtype}: fwd+bwd / jax.nn median {np.median(fb):.2f}, worst "
                f"{fb.max():.2f}; fwd / jax.nn median {np.median(fw):.2f}, worst "
                f"{fw.max():.2f}; A/A control from {aa.min():.2f} to {aa.max():.2f}"
            )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    # One color per implementation in every panel (log_softmax has no
    # custom_jvp variant, so a per-panel color cycle would shift).
    names = sorted({r["impl"] for r in rows})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for i, op in enumerate(("softmax", "log_softmax")):
        for j, mode in enumerate(("fwd", "fwd_bwd")):
            ax = axes[i][j]
            sel = [
                r
                for r in rows
                if r["op"] == op and r["dtype"] == "float32" and not r["masked"]
            ]
            # The control is jax.nn again; a second line on top adds nothing.
            for impl in sorted({r["impl"] for r in sel} - {CONTROL}):
                # Several shapes share an element count (e.g. (256, 4096) and
                # (8, 131072)): each shows as a dot, the line joins their
                # median, so it does not zigzag between them.
                pts = [
                    (r["n"], r[mode]["median"] / r["n"] * 1e9)
                    for r in sel
                    if r["impl"] == impl
                ]
                ns = sorted({n for n, _ in pts})
                line = [np.median([t for n2, t in pts if n2 == n]) for n in ns]
                color = colors[impl]
                ax.loglog(ns, line, "-", color=color, label=impl)
                ax.loglog(
                    [n for n, _ in pts],
                    [t for _, t in pts],
                    "o",
                    color=color,
                    alpha=0.5,
                    markersize=4,
                )
            ax.set_title(f"{op} {mode.replace('_', '+')} (float32)")
            ax.set_xlabel("elements")
            ax.set_ylabel("ns per element")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{machine()}; dots: single shapes, lines: median over the shapes "
        "with that many elements",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jsoftmax bench")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, smoke run")
    parser.add_argument("--gpu", action="store_true", help="GPU shape set")
    parser.add_argument(
        "--out",
        default=None,
        help="results folder (default: a new jsoftmax-bench-<time>-* folder in "
        f"the system's temporary directory; {RESULTS} holds the committed results)",
    )
    args = parser.parse_args(argv)
    if args.gpu and jax.default_backend() != "gpu":
        parser.error(
            f"--gpu: the GPU shape set needs a GPU, and JAX's default backend "
            f"here is {jax.default_backend()!r}"
        )
    if args.out:
        out = pathlib.Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # before any benchmark runs
            parser.error(f"--out {args.out}: cannot make that folder ({e.strerror})")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path(tempfile.mkdtemp(prefix=f"jsoftmax-bench-{stamp}-"))
    rows = run(gpu=args.gpu, quick=args.quick)
    if args.quick:
        stem = "softmax_quick"
    elif args.gpu:
        stem = "softmax_" + jax.devices()[0].device_kind.replace(" ", "_")
    else:
        stem = "softmax_cpu"
    (out / f"{stem}.json").write_text(
        json.dumps(dict(machine=machine(), rows=rows), indent=1)
    )
    (out / f"{stem}.md").write_text(
        markdown(rows, f"jsoftmax softmax benchmark ({stem})")
    )
    plot(rows, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())
    print(f"Results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

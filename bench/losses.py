"""Benchmark the cross-entropy losses: memory and time against optax and tokamax.

    python bench/losses.py            # writes bench/results/losses_cpu.md
    python bench/losses.py --quick    # tiny shapes, a smoke run
    python bench/losses.py --gpu      # issue 19's GPU shapes: losses_gpu.md
    python bench/losses.py --gpu --quick   # the same code at tiny shapes (any backend)

Memory is XLA's own accounting for the compiled ``value_and_grad``
(``memory_analysis().temp_size_in_bytes``: scratch beyond inputs and
outputs). Times are medians of interleaved rounds in one process, after a
warm-up and a check that the values agree.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax
from bench import compile_all, interleaved, machine, side_by_side

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MiB = 2**20


def _tokamax():
    try:
        import tokamax
    except ImportError:
        return None
    return tokamax


def linear_losses():
    """name -> mean loss of (x, w, labels)."""
    fns = {
        "jsoftmax (fused)": lambda x, w, y: jsoftmax.linear_softmax_cross_entropy(
            x, w, y
        ),
        "optax (unfused)": lambda x, w, y: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(
                jnp.dot(x, w, preferred_element_type=jnp.float32), y
            )
        ),
    }
    tokamax = _tokamax()
    if tokamax is not None:
        fns["tokamax (xla)"] = lambda x, w, y: (
            tokamax.linear_softmax_cross_entropy_loss(
                x, y, w, reduction="mean", implementation="xla"
            )
        )
    return fns


def _shapes(b, d, v, dtype=jnp.float32):
    return (
        jax.ShapeDtypeStruct((b, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )


def temp_bytes(fn, b, d, v, dtype=jnp.float32):
    grad = jax.jit(jax.value_and_grad(fn, (0, 1)))
    try:
        compiled = grad.lower(*_shapes(b, d, v, dtype)).compile()
    except Exception as e:  # noqa: BLE001 - report, don't stop the table
        return f"fails: {type(e).__name__}"
    return compiled.memory_analysis().temp_size_in_bytes


def _data(b, d, v, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (b, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(k[2], (b,), 0, v)
    return x, w, y


def time_side_by_side(fns, args, rounds):
    """Outputs and per-call time samples of each function, jitted and timed in
    interleaved rounds (bench.interleaved)."""
    jitted = {n: jax.jit(f) for n, f in fns.items()}
    outs = {n: jax.block_until_ready(f(*args)) for n, f in jitted.items()}
    return outs, interleaved(jitted, args, rounds)


def _fmt_bytes(b):
    return b if isinstance(b, str) else f"{b / MiB:,.1f} MiB"


def linear_section(quick):
    lines = ["## Fused linear + cross-entropy", ""]
    b, d, v = (256, 64, 2048) if quick else (4096, 512, 32768)
    fns = linear_losses()
    mem = {n: temp_bytes(f, b, d, v) for n, f in fns.items()}
    lines += [
        f"`value_and_grad` w.r.t. x and w, B={b}, D={d}, V={v}, float32.",
        "",
        "| implementation | temp memory | vs optax | time (median, min-max) | "
        "time / optax |",
        "|---|---|---|---|---|",
    ]
    args = _data(b, d, v)
    grads = {n: jax.value_and_grad(f, (0, 1)) for n, f in fns.items()}
    outs, times = time_side_by_side(grads, args, 2 if quick else 7)
    ref_loss = float(outs["optax (unfused)"][0])
    for n in fns:
        loss = float(outs[n][0])
        if abs(loss - ref_loss) > 1e-4 * max(1.0, abs(ref_loss)):
            raise AssertionError(f"{n}: loss {loss} differs from optax {ref_loss}")
    t_opt = np.median(times["optax (unfused)"])
    for n in fns:
        m = mem[n]
        ratio = (
            f"{mem['optax (unfused)'] / m:.1f}x less"
            if isinstance(m, int) and m
            else ""
        )
        t = times[n]
        lines.append(
            f"| {n} | {_fmt_bytes(m)} | {ratio} | {np.median(t):.3f} s "
            f"({t.min():.3f}-{t.max():.3f}) | {np.median(t) / t_opt:.2f} |"
        )
    lines += ["", f"All losses agree with optax's {ref_loss:.6f} to 1e-4.", ""]

    lines += [
        "### Temp memory as tokens x vocabulary grow (compile-only, D=512, float32)",
        "",
        "| tokens | vocab | logits alone | jsoftmax (fused) | optax (unfused) | "
        "ratio |",
        "|---|---|---|---|---|---|",
    ]
    grid = (
        [(256, 4096)]
        if quick
        else [
            (1024, 32768),
            (4096, 32768),
            (4096, 131072),
            (8192, 131072),
            (8192, 262144),
        ]
    )
    for tokens, vocab in grid:
        ours = temp_bytes(fns["jsoftmax (fused)"], tokens, 64 if quick else 512, vocab)
        theirs = temp_bytes(fns["optax (unfused)"], tokens, 64 if quick else 512, vocab)
        ratio = (
            f"{theirs / ours:.0f}x"
            if isinstance(ours, int) and isinstance(theirs, int)
            else ""
        )
        lines.append(
            f"| {tokens} | {vocab} | {_fmt_bytes(tokens * vocab * 4)} | "
            f"{_fmt_bytes(ours)} | {_fmt_bytes(theirs)} | {ratio} |"
        )
    return lines


def per_example_section(quick):
    lines = ["", "## Per-example cross-entropy, forward + backward", ""]
    lines += [
        "`jax.value_and_grad` of the summed loss w.r.t. the logits, in one jit, "
        "float32; medians of 31 interleaved rounds in random order; ratio is "
        "jsoftmax / optax (below 1: jsoftmax is faster); A/A is a second "
        "compiled copy of optax over optax, the noise of that row.",
        "",
        "| labels | shape | jsoftmax | optax | ratio | A/A |",
        "|---|---|---|---|---|---|",
    ]
    shapes = (
        [(64, 512)]
        if quick
        else [(8192, 128), (1024, 4096), (4096, 32768), (64, 262144)]
    )
    for shape in shapes:
        k = jax.random.split(jax.random.key(1), 3)
        logits = 3 * jax.random.normal(k[0], shape)
        probs = jax.nn.softmax(jax.random.normal(k[1], shape))
        ids = jax.random.randint(k[2], shape[:1], 0, shape[1])
        cases = {
            "probabilities": (
                jsoftmax.softmax_cross_entropy,
                optax.softmax_cross_entropy,
                probs,
            ),
            "integer": (
                jsoftmax.softmax_cross_entropy_with_integer_labels,
                optax.softmax_cross_entropy_with_integer_labels,
                ids,
            ),
        }
        for kind, (ours, theirs, labels) in cases.items():
            fns = {
                "jsoftmax": jax.value_and_grad(lambda z, y, f=ours: jnp.sum(f(z, y))),
                "optax": jax.value_and_grad(lambda z, y, f=theirs: jnp.sum(f(z, y))),
                "optax (A/A)": jax.value_and_grad(
                    lambda z, y, f=theirs: jnp.sum(f(z, y) * 1.0)
                ),
            }
            outs, times = time_side_by_side(fns, (logits, labels), 3 if quick else 31)
            np.testing.assert_allclose(outs["jsoftmax"][1], outs["optax"][1], atol=1e-5)
            a, b = np.median(times["jsoftmax"]), np.median(times["optax"])
            control = np.median(times["optax (A/A)"]) / b
            lines.append(
                f"| {kind} | {shape} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms "
                f"| {a / b:.2f} | {control:.2f} |"
            )
    return lines


# ---------------------------------------------------------------------------
# --gpu: issue 19's shapes (rows of 32k-256k classes; the fused loss at
# B*T=8192, D=4096, V=128256 bfloat16), with a chunk-size sweep.

ROW_OPS = ("softmax", "log_softmax", "softmax_cross_entropy",
           "softmax_cross_entropy_with_integer_labels")  # fmt: skip


def _row_fns(op):
    """(jsoftmax fn, baseline fn, baseline name) of (x, aux), aux the cotangent
    (softmax, log_softmax) or the labels (the losses)."""
    if op in ("softmax", "log_softmax"):
        return getattr(jsoftmax, op), getattr(jax.nn, op), f"jax.nn.{op}"
    return getattr(jsoftmax, op), getattr(optax, op), f"optax.{op}"


def _row_modes(fn, op):
    """fwd: (x, aux) -> value; fwd+bwd: (x, aux) -> the gradient w.r.t. x of
    sum(value * aux) (softmax, log_softmax) or sum(loss) (the losses)."""
    if op in ("softmax", "log_softmax"):
        return {
            "fwd": lambda x, g: fn(x),
            "fwd+bwd": jax.grad(lambda x, g: jnp.sum((fn(x) * g).astype(jnp.float32))),
        }
    return {
        "fwd": lambda x, y: fn(x, y),
        "fwd+bwd": jax.grad(lambda x, y: jnp.sum(fn(x, y).astype(jnp.float32))),
    }


def _row_data(op, rows, v, dtype):
    k = jax.random.split(jax.random.key(2), 2)
    x = (3 * jax.random.normal(k[0], (rows, v))).astype(dtype)
    if op == "softmax_cross_entropy_with_integer_labels":
        aux = jax.random.randint(k[1], (rows,), 0, v)
    elif op == "softmax_cross_entropy":
        aux = jax.nn.softmax(jax.random.normal(k[1], (rows, v))).astype(dtype)
    else:
        aux = jax.random.normal(k[1], (rows, v)).astype(dtype)
    return x, aux


def _ms_cell(r):
    return "" if r.get("median") is None else f"{r['median'] * 1e3:,.3f}"


def _ratio_cell(a, b):
    if a.get("median") is None or b.get("median") is None:
        return ""
    return f"{a['median'] / b['median']:.2f}"


def rows_section_gpu(quick, budget_s, workers):
    vocabs = (512, 2048) if quick else (32768, 131072, 262144)
    logits_bytes = 2**18 if quick else 256 * MiB
    lines = [
        "## softmax, log_softmax and the per-example losses, rows of V classes",
        "",
        f"About {logits_bytes / MiB:g} MiB of logits per case (rows = that / "
        "(V * itemsize)). fwd: the value; fwd+bwd: the gradient w.r.t. the "
        "logits of sum(value * g) (softmax, log_softmax, g a fixed cotangent) "
        "or of the summed loss. Each case compiles jsoftmax, the baseline and "
        "a second copy of the baseline (A/A: copy / baseline, the noise of "
        "that row); median ms of interleaved rounds; ratio = jsoftmax / "
        "baseline (target: median <= 1.0 over these rows).",
        "",
        "| op | dtype | shape | fwd ms | base fwd ms | fwd ratio | fwd+bwd ms "
        "| base fwd+bwd ms | fwd+bwd ratio | A/A (fwd, fwd+bwd) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    deadline = time.monotonic() + budget_s
    ratios = {}
    for v in vocabs:
        fns, args, cases = {}, {}, []
        for op in ROW_OPS:
            ours, base, _ = _row_fns(op)
            for dtype in (jnp.bfloat16, jnp.float32):
                rows = max(1, logits_bytes // (v * np.dtype(dtype).itemsize))
                data = _row_data(op, rows, v, dtype)
                cases.append((op, dtype, rows, data))
                for mode in ("fwd", "fwd+bwd"):
                    for name, fn in (("ours", ours), ("base", base),
                                     ("copy", base)):  # fmt: skip
                        key = (op, np.dtype(dtype).name, mode, name)
                        # A distinct function object per key: "copy" is the
                        # baseline traced and compiled a second time.
                        fns[key] = _row_modes(fn, op)[mode]
                        args[key] = data
        if time.monotonic() > deadline:
            for op, dtype, rows, _ in cases:
                lines.append(f"| {op} | {np.dtype(dtype).name} | ({rows}, {v}) | "
                             + "| " * 7 + "not run: time budget |")  # fmt: skip
            continue
        compiled = compile_all(fns, args, workers)
        for op, dtype, rows, data in cases:
            dname = np.dtype(dtype).name
            res = {}
            for mode in ("fwd", "fwd+bwd"):
                keys = [k for k in fns if k[:3] == (op, dname, mode)]
                res[mode] = side_by_side(
                    {k[3]: fns[k] for k in keys}, data, 3 if quick else 9,
                    references=("base",), tol=5e-2 if dtype == jnp.bfloat16 else 1e-4,
                    compiled={k[3]: compiled[k] for k in keys},
                )  # fmt: skip
            f, fb = res["fwd"], res["fwd+bwd"]
            status = "; ".join(
                f"{mode} {n}: {r['status']}"
                for mode, rr in res.items() for n, r in rr.items()
                if r["status"] != "ok"
            ) or "ok"  # fmt: skip
            for mode, rr in res.items():
                if rr["ours"].get("median") and rr["base"].get("median"):
                    ratios.setdefault((op, mode), []).append(
                        rr["ours"]["median"] / rr["base"]["median"]
                    )
            lines.append(
                f"| {op} | {dname} | ({rows}, {v}) | {_ms_cell(f['ours'])} | "
                f"{_ms_cell(f['base'])} | {_ratio_cell(f['ours'], f['base'])} | "
                f"{_ms_cell(fb['ours'])} | {_ms_cell(fb['base'])} | "
                f"{_ratio_cell(fb['ours'], fb['base'])} | "
                f"{_ratio_cell(f['copy'], f['base'])}, "
                f"{_ratio_cell(fb['copy'], fb['base'])} | {status} |"
            )
            print(lines[-1], flush=True)
    lines += ["", "Median ratio over the rows above (target <= 1.0):", ""]
    for (op, mode), rs in sorted(ratios.items()):
        med = float(np.median(rs))
        lines.append(f"- {op} {mode}: {med:.2f} ({'met' if med <= 1.0 else 'NOT met'}"
                     f"; range {min(rs):.2f}-{max(rs):.2f})")  # fmt: skip
    return lines


def fused_section_gpu(quick, budget_s, workers):
    b, d, v = (256, 64, 2048) if quick else (8192, 4096, 128256)
    dtype = jnp.bfloat16
    chunks = [None, 256, 512] if quick else [None, 1024, 2048, 4096, 8192, 16384]
    lines = [
        "",
        "## Fused linear + cross-entropy",
        "",
        f"`jax.value_and_grad` w.r.t. x and w of the mean loss, B*T={b}, D={d}, "
        f"V={v}, {np.dtype(dtype).name} x and w (optax: the float32 logits "
        "`jnp.dot(x, w, preferred_element_type=float32)` then "
        "`optax.softmax_cross_entropy_with_integer_labels`). temp: the compiled "
        "program's temporaries (`memory_analysis().temp_size_in_bytes`). "
        "Target: <= 1.1x optax's time at >= 20x less temporary memory. "
        "`chunk_size=None` is the library's default "
        f"({jsoftmax_default_chunk(b, v)} columns here).",
        "",
        "| implementation | time ms (median, min-max) | / optax | temp | optax temp / "
        "temp | status |",
        "|---|---|---|---|---|---|",
    ]
    fns = {"optax (unfused)": linear_losses()["optax (unfused)"]}
    tokamax_fn = linear_losses().get("tokamax (xla)")
    if tokamax_fn is not None:
        fns["tokamax (xla)"] = tokamax_fn
    for c in chunks:
        fns[f"jsoftmax chunk_size={c}"] = functools.partial(
            lambda x, w, y, c: jsoftmax.linear_softmax_cross_entropy(
                x, w, y, chunk_size=c
            ),
            c=c,
        )
    grads = {n: jax.value_and_grad(f, (0, 1)) for n, f in fns.items()}
    if budget_s <= 0:
        return lines + ["", "Not run: time budget."]
    res = side_by_side(grads, _data(b, d, v, dtype), 3 if quick else 5,
                       references=("optax (unfused)",), tol=3e-2,
                       workers=workers)  # fmt: skip
    base = res["optax (unfused)"]
    verdicts = []
    for name, r in res.items():
        t = (f"{r['median'] * 1e3:,.1f} ({r['min'] * 1e3:,.1f}-{r['max'] * 1e3:,.1f})"
             if r.get("median") is not None else "")  # fmt: skip
        temp = "" if r["temp"] is None else _fmt_bytes(r["temp"])
        less = (f"{base['temp'] / r['temp']:.0f}x"
                if r["temp"] and base["temp"] else "")  # fmt: skip
        ratio = _ratio_cell(r, base)
        lines.append(f"| {name} | {t} | {ratio} | {temp} | {less} | {r['status']} |")
        if name.startswith("jsoftmax") and ratio and less:
            ok = float(ratio) <= 1.1 and base["temp"] / r["temp"] >= 20
            verdicts.append(f"{name}: {ratio}x time, {less} less temp: "
                            f"{'met' if ok else 'NOT met'}")  # fmt: skip
        print(lines[-1], flush=True)
    lines += ["", "Target per chunk size: " + "; ".join(verdicts) + "."]
    return lines


def jsoftmax_default_chunk(b, v):
    from jsoftmax._linear_cross_entropy import default_chunk_size

    return default_chunk_size(b, v)


def main_gpu(quick, out, budget_s, workers):
    from bench import gpu_header

    lines = [f"# jsoftmax losses on the GPU{' (quick)' if quick else ''}", ""]
    lines += [f"Machine: {gpu_header()}.", ""]
    start = time.monotonic()
    name = "losses_quick_gpu.md" if quick else "losses_gpu.md"
    # The fused loss first (one compile batch, the memory target), then
    # the rows with what is left of the budget.
    fused = fused_section_gpu(quick, budget_s, workers)
    (out / name).write_text("\n".join(lines + fused) + "\n")
    rows = rows_section_gpu(quick, budget_s - (time.monotonic() - start), workers)
    lines += rows + fused
    text = "\n".join(lines) + "\n"
    (out / name).write_text(text)
    print(text)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/losses.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--gpu", action="store_true",
        help="issue 19's shapes: rows of 32k-256k classes, the fused loss at "
        "8192 x 4096 x 128256 bfloat16 and its chunk sizes (losses_gpu.md)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float, default=100.0,
        help="--gpu: cases not started within this many seconds are not run",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=12, help="threads that compile in parallel"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # tokamax parses sys.argv with absl flags, which do not know ours.
    sys.argv = sys.argv[:1]
    out = pathlib.Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        return main_gpu(args.quick, out, args.budget_s, args.workers)

    lines = [f"# jsoftmax loss benchmark{' (quick)' if args.quick else ''}", ""]
    lines += [f"Machine: {machine()}.", ""]
    lines += linear_section(args.quick)
    lines += per_example_section(args.quick)
    text = "\n".join(lines) + "\n"
    name = "losses_quick.md" if args.quick else "losses_cpu.md"
    (out / name).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

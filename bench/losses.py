"""Benchmark the cross-entropy losses: memory and time against optax and tokamax.

    python bench/losses.py            # writes bench/results/losses_cpu.md
    python bench/losses.py --quick    # tiny shapes, a smoke run

Memory is XLA's own accounting for the compiled ``value_and_grad``
(``memory_analysis().temp_size_in_bytes``: scratch beyond inputs and
outputs). Times are medians of interleaved rounds in one process, after a
warm-up and a check that the values agree.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax
from bench import interleaved, machine

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/losses.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # tokamax parses sys.argv with absl flags, which do not know ours.
    sys.argv = sys.argv[:1]
    out = pathlib.Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)

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

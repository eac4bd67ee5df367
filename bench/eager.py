"""Calls outside ``jit``: each op, ``jax.grad`` of it, and its second
derivatives (a jvp-of-grad Hessian-vector product, grad of grad), run
eagerly, against jax.nn and optax; and the time to trace, lower and compile
``jit(grad)`` of a stack of attention layers.

    python bench/eager.py           # bench/results/eager_cpu.md
    python bench/eager.py --quick   # smaller shapes, 2 rounds, a smoke run

Eager calls are how notebooks, debuggers and first tries run the ops. Each op
calls its rule through a ``jax.jit`` keyed on the static options
(``jsoftmax._checks.traced_once``): the block loops of attention and the
fused loss are traced and compiled once per shape, not at every call; their
rules' traces are kept, so that second derivatives, which run the first
derivative's rules at every call, compile them once too. The
per-call cost left is the argument checks and the small ops around the rule,
each dispatched on its own. The baseline's second copy (the same function
timed as a separate entry) is the A/A control. Medians of interleaved rounds
in one process.

The layer stack: ``jit(grad)`` of ``L`` attention layers of one shape, traced,
lowered and compiled from scratch (a new function each round); the rule is
traced once for all layers and inlined into each.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax
from bench import interleaved, machine

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BASE, COPY = "baseline", "baseline copy"


def cases(quick):
    """name -> (jsoftmax function, baseline function, baseline name, args,
    the float arguments that grad differentiates)."""
    keys = jax.random.split(jax.random.key(0), 6)
    rows, classes, tokens, features = (
        (8, 256, 64, 32) if quick else (32, 4096, 512, 256)
    )
    t, heads, dim = (64, 2, 16) if quick else (512, 8, 64)
    x = jax.random.normal(keys[0], (rows, classes))
    labels = jax.random.randint(keys[1], (rows,), 0, classes)
    targets = jax.nn.softmax(jax.random.normal(keys[2], (rows, classes)))
    h = jax.random.normal(keys[3], (tokens, features))
    w = jax.random.normal(keys[4], (features, classes)) / np.sqrt(features)
    token_labels = jax.random.randint(keys[1], (tokens,), 0, classes)
    q, k, v = jax.random.normal(keys[5], (3, 1, t, heads, dim))
    optax_int = optax.softmax_cross_entropy_with_integer_labels
    return {
        f"softmax [{rows}, {classes}]": (
            jsoftmax.softmax, jax.nn.softmax, "jax.nn", (x,), (0,)
        ),
        f"log_softmax [{rows}, {classes}]": (
            jsoftmax.log_softmax, jax.nn.log_softmax, "jax.nn", (x,), (0,)
        ),
        f"softmax_cross_entropy [{rows}, {classes}]": (
            jsoftmax.softmax_cross_entropy, optax.softmax_cross_entropy, "optax",
            (x, targets), (0,),
        ),
        f"..._with_integer_labels [{rows}, {classes}]": (
            jsoftmax.softmax_cross_entropy_with_integer_labels, optax_int, "optax",
            (x, labels), (0,),
        ),
        f"linear_softmax_cross_entropy [{tokens}, {features}] x [{features}, "
        f"{classes}]": (
            partial(jsoftmax.linear_softmax_cross_entropy, reduction="none"),
            lambda h, w, y: optax_int(h @ w, y),
            "optax on h @ w",
            (h, w, token_labels),
            (0, 1),
        ),
        f"dot_product_attention causal, T={t}, N={heads}, H={dim}": (
            lambda q, k, v: jsoftmax.dot_product_attention(q, k, v, is_causal=True),
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
            "jax.nn",
            (q, k, v),
            (0, 1, 2),
        ),
    }  # fmt: skip


def _grad(f, argnums):
    """jax.grad of the sum of f's output, without jit."""
    return jax.grad(lambda *a: jnp.sum(f(*a)), argnums)


def _hvp(f, argnums):
    """The Hessian-vector product of f's sum in its float arguments, each
    vector the argument itself (jvp of grad), without jit."""
    grad = _grad(f, argnums)

    def hvp(*args):
        def in_floats(*floats):
            full = list(args)
            for i, x in zip(argnums, floats, strict=True):
                full[i] = x
            return grad(*full)

        floats = [args[i] for i in argnums]
        return jax.jvp(in_floats, floats, floats)[1]

    return hvp


def _grad_of_grad(f, argnums):
    """Reverse over reverse: grad of the squared norm of the gradient."""
    grad = _grad(f, argnums)
    return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in grad(*a)), argnums)


MODES_1 = ("call", "grad")
MODES = {
    "call": lambda f, argnums: f,
    "grad": _grad,
    "hvp": _hvp,
    "grad(grad)": _grad_of_grad,
}


def _check(ours, base, args, rtol):
    got, want = ours(*args), base(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(float(jnp.max(jnp.abs(w))), 1.0)
        assert float(jnp.max(jnp.abs(g - w))) <= rtol * scale


def eager_rows(quick, rounds):
    rows = []
    for name, (ours, base, base_name, args, argnums) in cases(quick).items():
        for mode, transform in MODES.items():
            fns = {
                "jsoftmax": transform(ours, argnums),
                BASE: transform(base, argnums),
                COPY: transform(lambda *a, b=base: b(*a), argnums),
            }
            _check(fns["jsoftmax"], fns[BASE], args, 1e-4 if mode in MODES_1 else 1e-3)
            times = interleaved(fns, args, rounds)
            ours_t, base_t, copy_t = (times[m] for m in ("jsoftmax", BASE, COPY))
            rows.append(
                f"| {name} | {mode} | {base_name} | {1e3 * np.median(ours_t):.2f} | "
                f"{1e3 * np.median(base_t):.2f} | {np.median(ours_t / base_t):.2f} | "
                f"{np.median(copy_t / base_t):.2f} |"
            )
            print(rows[-1], flush=True)
    return rows


def _stack(attention, layers):
    """jit(grad) of ``layers`` attention layers, a new function object (so
    that jit traces it anew)."""

    def loss(x):
        for _ in range(layers):
            x = x + attention(x, x, x, is_causal=True)
        return jnp.sum(x)

    return jax.jit(jax.grad(loss))


def build_seconds(attention, layers, x):
    start = time.perf_counter()
    _stack(attention, layers).lower(x).compile()
    return time.perf_counter() - start


def stack_rows(quick, rounds):
    t, heads, dim = (64, 2, 16) if quick else (512, 8, 64)
    x = jax.random.normal(jax.random.key(1), (1, t, heads, dim))
    impls = {
        "jsoftmax": jsoftmax.dot_product_attention,
        "jax.nn": jax.nn.dot_product_attention,
    }
    rows = []
    for layers in (1, 2) if quick else (1, 4, 16):
        times = {name: [] for name in impls}
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            for name in rng.permutation(list(impls)):
                times[name].append(build_seconds(impls[name], layers, x))
        ours, base = (np.median(times[n]) for n in ("jsoftmax", "jax.nn"))
        rows.append(f"| {layers} | {ours:.2f} | {base:.2f} | {ours / base:.2f} |")
        print(rows[-1], flush=True)
    return rows, (t, heads, dim)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/eager.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 15
    eager = eager_rows(args.quick, rounds)
    stack_rounds = 2 if args.quick else 5
    stack, (t, heads, dim) = stack_rows(args.quick, stack_rounds)
    table = "\n".join(
        [
            "# Calls outside jit",
            "",
            f"{machine()}; float32; medians of {rounds} interleaved rounds in one "
            "process, each sample enough back-to-back calls to last about 5 ms. "
            "`call`: the op itself; `grad`: `jax.grad` of its sum w.r.t. its "
            "float inputs (the weights of the fused loss too); `hvp`: `jax.jvp` "
            "of that gradient, each tangent its input; `grad(grad)`: `jax.grad` "
            "of the gradient's squared norm; all without `jit`. A/A: the "
            "baseline's second copy over the baseline.",
            "",
            "| op | mode | baseline | jsoftmax ms | baseline ms | ratio | A/A |",
            "|---|---|---|---|---|---|---|",
            *eager,
            "",
            "## `jit(grad)` of a stack of causal attention layers: trace, lower and "
            "compile",
            "",
            f"T={t}, N={heads}, H={dim}, float32, a new function each time; medians "
            f"of {stack_rounds} interleaved rounds.",
            "",
            "| layers | jsoftmax s | jax.nn s | ratio |",
            "|---|---|---|---|",
            *stack,
            "",
        ]
    )
    out = pathlib.Path(args.out) if args.out else RESULTS
    name = "eager_quick.md" if args.quick else "eager_cpu.md"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(table)
    print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What forward mode costs, and what it gives, measured side by side.

    python bench/forward_mode.py            # bench/results/forward_mode_cpu.md
    python bench/forward_mode.py --quick    # small shapes, a smoke run

1. Reverse mode is unchanged: ``jit(value_and_grad)`` of each public op
   (wrapped by ``with_forward_mode``) against the bare ``custom_vjp`` it wraps,
   compiled in the same process: whether the optimised HLO is identical, and
   the time ratio (an A/A pair of the same program: identical HLO should read
   1.00 up to noise).
2. Second derivatives: ``jax.hessian`` and a Hessian-vector product
   (``jvp`` of ``grad``) of softmax and log_softmax against jax.nn's.
3. A claim from the design notes: softmax's backward written as
   ``gy = g * y; dx = gy - y * sum(gy)`` against the shipped
   ``y * (g - sum(g * y))``.

Times are medians of interleaved rounds in one process, each round in a fresh
random order; ratios are jsoftmax (or the variant) over the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from bench import interleaved, machine
from jsoftmax import _attention, _cross_entropy, _linear_cross_entropy, _softmax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


# Every with_forward_mode wrapper in the package: (module, name, bare op).
WRAPPED = [
    (_softmax, "_softmax_forward_mode", _softmax._softmax),
    (_softmax, "_log_softmax_forward_mode", _softmax._log_softmax),
    (_cross_entropy, "_softmax_cross_entropy_forward_mode",
     _cross_entropy._softmax_cross_entropy),
    (_cross_entropy, "_integer_cross_entropy_forward_mode",
     _cross_entropy._integer_cross_entropy),
    (_cross_entropy, "loud_labels", _cross_entropy._loud_labels),
    (_linear_cross_entropy, "loud_labels", _cross_entropy._loud_labels),
    (_linear_cross_entropy, "_linear_cross_entropy_forward_mode",
     _linear_cross_entropy._linear_cross_entropy),
    (_attention, "_attention_forward_mode", _attention._attention),
]  # fmt: skip


@contextlib.contextmanager
def bare():
    """Within the block, every op calls its bare custom_vjp again."""
    wrapped = [getattr(module, name) for module, name, _ in WRAPPED]
    for module, name, custom_vjp in WRAPPED:
        setattr(module, name, custom_vjp)
    try:
        yield
    finally:
        for (module, name, _), w in zip(WRAPPED, wrapped, strict=True):
            setattr(module, name, w)


def _hlo(compiled) -> str:
    """The optimised HLO without module name, source locations and the numbers
    XLA appends to names (which count every op traced, kept or not): each
    name becomes its order of first appearance."""
    text = compiled.as_text()
    text = text[text.index("\n%") if "\n%" in text else text.index("ENTRY") :]
    text = re.sub(r",? metadata=\{[^}]*\}", "", text)
    names = {}
    return re.sub(
        r"%[\w.\-]+", lambda m: names.setdefault(m[0], f"%{len(names)}"), text
    )


def medians(fns, args, rounds):
    """Median seconds per call of each compiled function, interleaved."""
    return {n: float(np.median(t)) for n, t in interleaved(fns, args, rounds).items()}


def reverse_mode_cases(quick):
    b, k = (256, 512) if quick else (2048, 4096)
    x = 3.0 * jax.random.normal(jax.random.key(0), (b, k))
    w = jax.random.normal(jax.random.key(1), (b, k))
    ids = jax.random.randint(jax.random.key(2), (b,), 0, k)
    d, v = (128, 2048) if quick else (512, 16384)
    h = jax.random.normal(jax.random.key(3), (b, d))
    wo = 0.05 * jax.random.normal(jax.random.key(4), (d, v))
    ids_v = jax.random.randint(jax.random.key(5), (b,), 0, v)
    labels = jax.nn.softmax(w)
    t = 256 if quick else 1024
    q, kk, vv = (
        jax.random.normal(key, (1, t, 8, 64))
        for key in jax.random.split(jax.random.key(6), 3)
    )
    return [
        (
            "softmax",
            lambda x: jnp.sum(jsoftmax.softmax(x) * w),
            (x,),
        ),
        (
            "log_softmax",
            lambda x: jnp.sum(jsoftmax.log_softmax(x) * w),
            (x,),
        ),
        (
            "softmax_cross_entropy",
            lambda x, labels: jnp.sum(jsoftmax.softmax_cross_entropy(x, labels)),
            (x, labels),
        ),
        (
            "ce_with_integer_labels",
            lambda x: jnp.sum(
                jsoftmax.softmax_cross_entropy_with_integer_labels(x, ids)
            ),
            (x,),
        ),
        (
            "linear_softmax_cross_entropy",
            lambda h: jsoftmax.linear_softmax_cross_entropy(h, wo, ids_v),
            (h,),
        ),
        (
            "dot_product_attention (causal)",
            lambda q, k, v: jnp.sum(
                jsoftmax.dot_product_attention(q, k, v, is_causal=True) * q
            ),
            (q, kk, vv),
        ),
    ]


def reverse_mode(quick, rounds):
    lines = [
        "## Reverse mode: wrapped op against the bare custom_vjp",
        "",
        "`jit(value_and_grad)`, float32. HLO: the optimised HLO text, module "
        "name and source locations removed. A/A: a second compilation of the "
        "wrapped op.",
        "",
        "| op | shape | HLO identical | wrapped / bare | A/A |",
        "|---|---|---|---|---|",
    ]
    for name, loss, args in reverse_mode_cases(quick):

        def compiled(loss=loss, args=args):
            # A new function each time, so that jit traces it again.
            grad = jax.value_and_grad(lambda *a: loss(*a), tuple(range(len(args))))
            return jax.jit(grad).lower(*args).compile()

        wrapped, copy = compiled(), compiled()
        with bare():
            plain = compiled()
        same = _hlo(wrapped) == _hlo(plain)
        t = medians({"wrapped": wrapped, "bare": plain, "copy": copy}, args, rounds)
        shape = "x".join(str(s) for s in args[0].shape)
        lines.append(
            f"| {name} | {shape} | {'yes' if same else 'NO'} | "
            f"{t['wrapped'] / t['bare']:.2f} | {t['copy'] / t['wrapped']:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def second_order(quick, rounds):
    n = 128 if quick else 512
    b, k = (64, 256) if quick else (512, 2048)
    lines = [
        "",
        "## Second derivatives against jax.nn",
        "",
        f"`jax.hessian` of `sum(op(x) * w)` for x of shape ({n},), and a "
        f"Hessian-vector product `jvp(grad(...))` at ({b}, {k}); float32, jit.",
        "",
        "| op | hessian: jsoftmax / jax.nn | HVP: jsoftmax / jax.nn | max abs diff |",
        "|---|---|---|---|",
    ]
    ops = {
        "softmax": (jsoftmax.softmax, jax.nn.softmax),
        "log_softmax": (jsoftmax.log_softmax, jax.nn.log_softmax),
    }
    x1 = jax.random.normal(jax.random.key(0), (n,))
    w1 = jax.random.normal(jax.random.key(1), (n,))
    x2 = jax.random.normal(jax.random.key(2), (b, k))
    w2 = jax.random.normal(jax.random.key(3), (b, k))
    v2 = jax.random.normal(jax.random.key(4), (b, k))
    for name, (ours, theirs) in ops.items():

        def hess(op):
            return jax.jit(jax.hessian(lambda x: jnp.sum(op(x) * w1)))

        def hvp(op):
            grad = jax.grad(lambda x: jnp.sum(op(x) * w2))
            return jax.jit(lambda x, v: jax.jvp(grad, (x,), (v,))[1])

        h = medians({"ours": hess(ours), "nn": hess(theirs)}, (x1,), rounds)
        p = medians({"ours": hvp(ours), "nn": hvp(theirs)}, (x2, v2), rounds)
        diff = max(
            float(jnp.max(jnp.abs(hess(ours)(x1) - hess(theirs)(x1)))),
            float(jnp.max(jnp.abs(hvp(ours)(x2, v2) - hvp(theirs)(x2, v2)))),
        )
        lines.append(
            f"| {name} | {h['ours'] / h['nn']:.2f} | {p['ours'] / p['nn']:.2f} | "
            f"{diff:.1e} |"
        )
        print(lines[-1], flush=True)
    return lines


def _softmax_variant(bwd_formula):
    @jax.custom_vjp
    def f(x):
        e = jnp.exp(x - jnp.max(x, -1, keepdims=True))
        return e / jnp.sum(e, -1, keepdims=True)

    def fwd(x):
        e = jnp.exp(x - jnp.max(x, -1, keepdims=True))
        y = e / jnp.sum(e, -1, keepdims=True)
        return y, y

    f.defvjp(fwd, lambda y, g: (bwd_formula(y, g),))
    return f


def shipped_bwd(y, g):
    return y * (g - jnp.sum(g * y, -1, keepdims=True))


def claimed_bwd(y, g):
    gy = g * y
    return gy - y * jnp.sum(gy, -1, keepdims=True)


def _jit_vjp(bwd):
    f = _softmax_variant(bwd)
    return jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0])


def bwd_formula(quick, rounds):
    shapes = [(256, 1024)] if quick else [(1024, 1024), (4096, 4096), (256, 32768)]
    lines = [
        "",
        "## softmax backward: `gy - y * sum(gy)` against `y * (g - sum(g * y))`",
        "",
        "`jit(vjp)` of the same forward with each backward, float32; below 1: "
        "the claimed form is faster. A/A: a second compilation of the shipped "
        "form.",
        "",
        "| shape | claimed / shipped | A/A |",
        "|---|---|---|",
    ]
    for shape in shapes:
        x = jax.random.normal(jax.random.key(0), shape)
        g = jax.random.normal(jax.random.key(1), shape)

        fns = {"shipped": _jit_vjp(shipped_bwd), "claimed": _jit_vjp(claimed_bwd)}
        fns["copy"] = _jit_vjp(shipped_bwd)
        np.testing.assert_allclose(
            fns["claimed"](x, g), fns["shipped"](x, g), rtol=1e-5, atol=1e-6
        )
        t = medians(fns, (x, g), rounds)
        lines.append(
            f"| {shape[0]}x{shape[1]} | {t['claimed'] / t['shipped']:.2f} | "
            f"{t['copy'] / t['shipped']:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/forward_mode.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    rounds = 3 if args.quick else 15
    lines = [
        f"# Forward mode{' (quick)' if args.quick else ''}",
        "",
        f"Machine: {machine()}. Medians of {rounds} interleaved rounds.",
        "",
    ]
    lines += reverse_mode(args.quick, rounds)
    lines += second_order(args.quick, rounds)
    lines += bwd_formula(args.quick, rounds)
    name = "forward_mode_quick" if args.quick else "forward_mode_cpu"
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runs jsoftmax, jax.nn and optax on their edge cases and writes the tables.

``python docs/semantics.py [OUT]`` writes the markdown tables of
``docs/semantics.md`` to OUT (default ``docs/_generated/semantics_tables.md``).
The Sphinx build runs it first (see ``conf.py``), so the page always describes
the installed versions, which it names: no cell is typed by hand, each is what
the code below observed.
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax._src.ad_checkpoint import saved_residuals
from jax.experimental import jet

import jsoftmax

T, F = True, False


def describe(a) -> str:
    """A few words for what an array holds: 0, -inf, NaN, finite, ..."""
    a = np.asarray(a, dtype=np.float64)
    if a.size and np.isnan(a).all():
        return "NaN"
    if np.isnan(a).any():
        return "NaN in part"
    if (a == 0).all():
        return "0"
    if np.isneginf(a).all():
        return "-inf"
    if np.isposinf(a).all():
        return "+inf"
    if np.isfinite(a).all():
        return "finite"
    return "finite and ±inf"


def outcome(thunk: Callable[[], str]) -> str:
    """``thunk()``, or the name of the exception it raises."""
    try:
        return thunk()
    except Exception as e:  # noqa: BLE001 - the exception's type is the result
        return f"`{type(e).__name__}`"


def value_and_grad_row(f, x, row: int, cotangent=None) -> str:
    """'value …, gradient …' of row ``row`` of ``f(x)`` under a fixed cotangent."""

    def thunk():
        y, vjp = jax.vjp(f, x)
        g = jnp.ones_like(y) if cotangent is None else cotangent
        (dx,) = vjp(g)
        return f"value {describe(y[row])}, gradient {describe(dx[row])}"

    return outcome(thunk)


def _row(case: str, *cells: str) -> str:
    return "| " + " | ".join((case, *cells)) + " |"


def _table(header: tuple[str, ...], rows: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + rows)


def _forward_mode(f, x) -> str:
    return outcome(lambda: (jax.jvp(f, (x,), (jnp.ones_like(x),)), "works")[1])


def _jet(f, x) -> str:
    """Whether ``jax.experimental.jet`` of ``f`` at ``x`` runs."""
    series = ((jnp.ones_like(x), jnp.zeros_like(x)),)
    return outcome(lambda: (jet.jet(f, (x,), series), "works")[1])


def _residual_bytes(f, x) -> str:
    def thunk():
        saved = saved_residuals(f, x)
        total = sum(np.prod(a.shape) * a.dtype.itemsize for a, _ in saved)
        return f"{total / 2**20:.1f} MiB"

    return outcome(thunk)


def _max_relative_error(f, x, reference) -> float:
    y = np.asarray(f(x).astype(jnp.float32), dtype=np.float64)
    return float(np.max(np.abs(y - reference)) / np.max(np.abs(reference)))


def _same_as_no_mask(op, x, g) -> str:
    """Whether an all-True mask gives ``op``'s values and gradients bit for bit."""
    a = jax.vjp(lambda v: op(v, where=jnp.ones_like(v, dtype=bool)), x)
    b = jax.vjp(op, x)
    same = np.array_equal(a[0], b[0], equal_nan=True) and np.array_equal(
        a[1](g)[0], b[1](g)[0], equal_nan=True
    )
    return "same as no mask" if same else "differs from no mask"


def _accepted(op, *args, **kwargs) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casts that lose the imaginary part
        op(*args, **kwargs)
    return "accepted"


def softmax_table() -> str:
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    g = jnp.array([[1.0, -2.0, 0.5], [2.0, 1.0, -1.0]])
    ops = {
        "softmax": (jax.nn.softmax, jsoftmax.softmax),
        "log_softmax": (jax.nn.log_softmax, jsoftmax.log_softmax),
    }
    masked = jnp.array([[T, T, T], [F, F, F]])
    cases = [
        ("row with every entry masked (`where` all False)", x, masked),
        ("row of `-inf`, no mask", x.at[1].set(-jnp.inf), None),
        (
            "valid entries all `-inf`, the others masked",
            x.at[1].set(jnp.array([-jnp.inf, 5.0, -jnp.inf])),
            jnp.array([[T, T, T], [T, F, T]]),
        ),
        ("`+inf` in the row", x.at[1, 0].set(jnp.inf), None),
        (
            "masked entry holding NaN",
            x.at[1, 0].set(jnp.nan),
            jnp.array([[T, T, T], [F, T, T]]),
        ),
    ]
    rows = []
    for name, (nn_op, our_op) in ops.items():
        for case, xs, where in cases:
            cells = [
                value_and_grad_row(lambda v, op=op, w=where: op(v, where=w), xs, 1, g)
                for op in (nn_op, our_op)
            ]
            rows.append(_row(f"`{name}`: {case}", *cells))
        # An all-True mask should change nothing; compare with no mask.
        xs = x.at[1, 0].set(-jnp.inf)
        cells = [
            outcome(partial(_same_as_no_mask, op, xs, g)) for op in (nn_op, our_op)
        ]
        rows.append(_row(f"`{name}`: all-True mask, a `-inf` input", *cells))

    z = 4.0 * jax.random.normal(jax.random.key(0), (256, 1024))
    for name, (nn_op, our_op) in ops.items():
        with jax.enable_x64():
            reference = np.asarray(nn_op(jnp.asarray(np.asarray(z), jnp.float64)))
        cells = [
            f"{_max_relative_error(op, z.astype(jnp.bfloat16), reference):.1e}"
            for op in (nn_op, our_op)
        ]
        rows.append(
            _row(f"`{name}`: bfloat16 input, max error / max of float64 result", *cells)
        )
    ints = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    for name, (nn_op, our_op) in ops.items():
        cells = [outcome(lambda op=op: f"`{op(ints).dtype}`") for op in (nn_op, our_op)]
        rows.append(_row(f"`{name}`: int32 input, output dtype", *cells))
        cells = [
            outcome(partial(_accepted, op, x, where=jnp.ones_like(x)))
            for op in (nn_op, our_op)
        ]
        rows.append(_row(f"`{name}`: float `where` (an additive mask)", *cells))
        cells = [
            outcome(partial(_accepted, op, x.astype(jnp.complex64)))
            for op in (nn_op, our_op)
        ]
        rows.append(_row(f"`{name}`: complex input", *cells))
        cells = [_forward_mode(op, x) for op in (nn_op, our_op)]
        rows.append(_row(f"`{name}`: forward mode (`jax.jvp`)", *cells))
        cells = [_jet(op, x) for op in (nn_op, our_op)]
        rows.append(_row(f"`{name}`: Taylor series (`jax.experimental.jet`)", *cells))
        big = jnp.zeros((1024, 1024))
        cells = [_residual_bytes(op, big) for op in (nn_op, our_op)]
        rows.append(
            _row(f"`{name}`: saved for the backward pass, f32 [1024, 1024]", *cells)
        )
    return _table(("case", "jax.nn", "jsoftmax"), rows)


def cross_entropy_table() -> str:
    logits = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    labels = jnp.array([2, 0])
    ops = {
        "optax": optax.softmax_cross_entropy_with_integer_labels,
        "jsoftmax": jsoftmax.softmax_cross_entropy_with_integer_labels,
    }
    padded = jnp.array([2, -100])
    rows = []

    def per_op(case, make_f, x=logits, row=1):
        cells = [value_and_grad_row(make_f(op), x, row) for op in ops.values()]
        rows.append(_row(case, *cells))

    per_op("label -100 (outside `[0, K)`)", lambda op: lambda z: op(z, padded))
    per_op(
        "label -100, loss masked by `jnp.where(labels == -100, 0, loss)`",
        lambda op: lambda z: jnp.where(padded == -100, 0.0, op(z, padded)),
    )
    per_op(
        "row of `-inf` logits",
        lambda op: lambda z: op(z, labels),
        x=logits.at[1].set(-jnp.inf),
    )
    per_op(
        "row with every class masked (`where` all False)",
        lambda op: lambda z: op(z, labels, where=jnp.array([[T, T, T], [F, F, F]])),
    )
    per_op(
        "label on a masked class",
        lambda op: lambda z: op(z, labels, where=jnp.array([[T, T, T], [F, T, T]])),
    )

    wide = 2.0 * jax.random.normal(jax.random.key(1), (64, 256))
    ids = jax.random.randint(jax.random.key(2), (64,), 0, 256)
    cells = []
    for op in ops.values():

        def same_as_int32(op=op):
            a = op(wide, ids.astype(jnp.uint8))
            b = op(wide, ids)
            return "same as int32" if np.allclose(a, b) else "differs from int32"

        cells.append(outcome(same_as_int32))
    rows.append(_row("`uint8` labels, 256 classes", *cells))

    offset = 1e4 + 3.0 * jax.random.normal(jax.random.key(3), (64, 512))
    targets = jax.random.randint(jax.random.key(4), (64,), 0, 512)
    with jax.enable_x64():
        exact = np.asarray(
            optax.softmax_cross_entropy_with_integer_labels(
                jnp.asarray(np.asarray(offset), jnp.float64), targets
            )
        )
    cells = []
    for op in ops.values():
        loss = np.asarray(op(offset, targets), dtype=np.float64)
        cells.append(f"{np.max(np.abs(loss - exact)):.1e}")
    rows.append(_row("float32 logits near 1e4, max loss error against float64", *cells))
    cells = [
        outcome(partial(_accepted, op, logits, labels, where=jnp.ones_like(logits)))
        for op in ops.values()
    ]
    rows.append(_row("float `where`", *cells))
    cells = [
        _forward_mode(lambda z, op=op: op(z, labels), logits) for op in ops.values()
    ]
    rows.append(_row("forward mode (`jax.jvp`)", *cells))
    cells = [_jet(lambda z, op=op: op(z, labels), logits) for op in ops.values()]
    rows.append(_row("Taylor series (`jax.experimental.jet`)", *cells))
    return _table(("case", "optax", "jsoftmax"), rows)


def probability_table() -> str:
    """softmax_cross_entropy with label mass on masked classes."""
    logits = jnp.array([[1.0, 2.0, 3.0, 0.5], [4.0, 5.0, 6.0, 4.5]])
    ops = {
        "optax": optax.softmax_cross_entropy,
        "jsoftmax": jsoftmax.softmax_cross_entropy,
    }
    masked = jnp.array([[F, T, T, T]] * 2)  # class 0 masked (optax: full shape)
    rows = []

    def per_op(case, labels, where=masked):
        def cell(op):
            loss, pullback = jax.vjp(lambda z, q: op(z, q, where=where), logits, labels)
            dz, dq = pullback(jnp.ones_like(loss))
            return (
                f"value {describe(loss[0])}, gradient: logits {describe(dz[0])}, "
                f"labels {describe(dq[0])} ({describe(dq[0, 0])} at the masked class)"
            )

        rows.append(_row(case, *(outcome(partial(cell, op)) for op in ops.values())))

    per_op(
        "all the label mass on the masked class",
        jnp.array([[1.0, 0.0, 0.0, 0.0]] * 2),
    )
    per_op(
        "half the label mass on the masked class",
        jnp.array([[0.5, 0.0, 0.5, 0.0]] * 2),
    )
    per_op(
        "no label mass on the masked class",
        jnp.array([[0.0, 0.2, 0.5, 0.3]] * 2),
    )
    per_op(
        "row with every class masked (labels as in the first row)",
        jnp.array([[0.5, 0.0, 0.5, 0.0]] * 2),
        where=jnp.array([[F, F, F, F]] * 2),
    )
    soft = jax.nn.softmax(logits)
    cells = [_forward_mode(lambda z, op=op: op(z, soft), logits) for op in ops.values()]
    rows.append(_row("forward mode (`jax.jvp`)", *cells))
    return _table(("case", "optax", "jsoftmax"), rows)


def fused_loss_table() -> str:
    """Compiled temporaries of the fused loss against optax on explicit logits."""
    b, d, v = 2048, 256, 16384
    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b,), jnp.int32)

    def unfused(x, w, y):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    def temp_mib(loss):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w, y)
        return compiled.compile().memory_analysis().temp_size_in_bytes / 2**20

    ours = temp_mib(jsoftmax.linear_softmax_cross_entropy)
    theirs = temp_mib(unfused)
    rows = [
        _row(
            f"`value_and_grad` temporaries, B={b}, D={d}, V={v}, float32 (compiled)",
            f"{theirs:.0f} MiB",
            f"{ours:.0f} MiB",
        )
    ]
    return _table(("case", "optax on `x @ w`", "`linear_softmax_cross_entropy`"), rows)


def attention_table() -> str:
    """dot_product_attention against jax.nn's portable (xla) implementation."""
    b, t, s, n, h = 1, 6, 8, 2, 4
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, s, n, h))
    v = jax.random.normal(keys[2], (b, s, n, h))
    ops = {
        "jax.nn": partial(jax.nn.dot_product_attention, implementation="xla"),
        "jsoftmax": jsoftmax.dot_product_attention,
    }
    blind = np.ones((b, 1, t, s), bool)
    blind[0, :, 2] = False  # query row 2 sees no key
    rows = []

    def no_key_row(op, bias=None):
        def f(v, bias):
            out, lse = op(q, k, v, bias, blind, return_residual=True)
            return out, lse

        (out, lse), pullback = jax.vjp(f, v, bias)
        cot = jnp.zeros_like(out).at[0, 2].set(1.0)
        d_v, d_bias = pullback((cot, jnp.zeros_like(lse)))
        mean_v = np.allclose(out[0, 2], v[0].mean(0), rtol=1e-5)
        value = "mean of `v`" if mean_v else describe(out[0, 2])
        text = f"output {value}, lse {describe(lse[0, 2])}, gradient of `v` "
        text += describe(d_v)
        if bias is not None:
            text += f", of `bias` {describe(d_bias)}"
        return text

    cells = [outcome(partial(no_key_row, op)) for op in ops.values()]
    rows.append(_row("query row that sees no key (mask)", *cells))
    for fill in (3e38, jnp.inf):
        bias = jnp.where(jnp.asarray(blind), 0.0, fill)
        cells = [outcome(partial(no_key_row, op, bias)) for op in ops.values()]
        rows.append(_row(f"the same, masked bias entries {fill:g}", *cells))

    lengths = jnp.array([3], jnp.int32)
    cells = []
    for op in ops.values():

        def padded(op=op):
            out, lse = op(q, k, v, query_seq_lengths=lengths, return_residual=True)
            return f"output {describe(out[0, 3:])}, lse {describe(lse[0, 3:])}"

        cells.append(outcome(padded))
    rows.append(_row("query rows past `query_seq_lengths`", *cells))
    cells = [
        outcome(partial(_accepted, op, q, k, v, mask=jnp.ones((t, s))))
        for op in ops.values()
    ]
    rows.append(_row("float `mask`", *cells))
    cells = [
        outcome(
            partial(_accepted, jax.jit(op), *(a.astype(jnp.float16) for a in (q, k, v)))
        )
        for op in ops.values()
    ]
    rows.append(_row(f"float16 inputs on {jax.default_backend().upper()}", *cells))
    cells = [_forward_mode(lambda q, op=op: op(q, k, v), q) for op in ops.values()]
    rows.append(_row("forward mode (`jax.jvp`)", *cells))
    cells = []
    for op in ops.values():

        def second(op=op):
            hess = jax.jacrev(jax.jacrev(lambda q: jnp.sum(jnp.sin(op(q, k, v)))))(q)
            return f"works (finite: {bool(np.isfinite(hess).all())})"

        cells.append(outcome(second))
    rows.append(_row("reverse over reverse (`jacrev(jacrev)`)", *cells))

    kv_len = jnp.array([5], jnp.int32)
    tail = jnp.zeros((b, s, 1, 1)).at[:, 5:].set(jnp.nan)  # an unwritten cache
    cells = []
    for op in ops.values():

        def nan_tail(op=op):
            out = op(q, k + tail, v + tail, key_value_seq_lengths=kv_len)
            clean = op(q, k, v, key_value_seq_lengths=kv_len)
            same = bool(np.array_equal(out, clean))
            return f"output {describe(out)}" + (", equal to a clean tail's" * same)

        cells.append(outcome(nan_tail))
    rows.append(_row("NaN in `k`, `v` past `key_value_seq_lengths`", *cells))

    x = jax.random.normal(jax.random.key(6), (1, 16, 2, 16))
    cells = []
    for op in ops.values():

        def precision(op=op, c=10.0):
            def grad(q):
                return jax.grad(
                    lambda q: jnp.sum(jnp.sin(op(q, q, q, is_causal=True)))
                )(q)

            with jax.enable_x64(True):
                want = np.asarray(grad((c * x).astype(jnp.float64)))
            got = np.asarray(grad(c * x), np.float64)
            err = np.max(np.abs(got - want)) / np.max(np.abs(want))
            return f"gradient error {err:.1e} (relative to its largest entry)"

        cells.append(outcome(precision))
    rows.append(
        _row(
            "float32, near one-hot rows: `q = k = v = 10 x`, causal, the largest "
            "score about 700, against float64",
            *cells,
        )
    )

    size = 1024
    shape = jax.ShapeDtypeStruct((1, size, 8, 64), jnp.float32)
    for causal in (False, True):
        cells = []
        for op in ops.values():

            def memory(op=op, causal=causal):
                def loss(q, k, v):
                    return jnp.sum(op(q, k, v, is_causal=causal) * v)

                saved = saved_residuals(loss, shape, shape, shape)
                residual = sum(
                    np.prod(a.shape) * a.dtype.itemsize
                    for a, why in saved
                    if "argument" not in why
                )
                grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                temp = grad.lower(shape, shape, shape).compile().memory_analysis()
                return (
                    f"saves {residual / 2**20:.0f} MiB besides its inputs, "
                    f"{temp.temp_size_in_bytes / 2**20:.0f} MiB of temporaries"
                )

            cells.append(outcome(memory))
        kind = "causal" if causal else "not causal"
        rows.append(
            _row(f"`grad` at B=1, T=S={size}, N=8, H=64, float32, {kind}", *cells)
        )
    return _table(("case", 'jax.nn (`implementation="xla"`)', "jsoftmax"), rows)


def generate() -> str:
    return "\n\n".join(
        [
            f"Generated with jax {jax.__version__}, optax {optax.__version__} and "
            f"jsoftmax {jsoftmax.__version__} on {jax.default_backend().upper()}.",
            "(softmax-tables)=\n### softmax and log_softmax against jax.nn\n\n"
            "Cotangent `[2, 1, -1]` on the row shown; `where` as in `jax.nn`.\n\n"
            + softmax_table(),
            "(cross-entropy-tables)=\n### Integer-label cross-entropy against optax\n\n"
            "Cotangent 1 on every example; the cells describe the second example.\n\n"
            + cross_entropy_table(),
            "(probability-label-tables)=\n### Probability-label cross-entropy "
            "against optax\n\n"
            "Class 0 masked (`where` at the logits' shape, as optax wants it); "
            "cotangent 1 on every example; the cells describe the first.\n\n"
            + probability_table(),
            "(fused-loss-tables)=\n### The fused loss against optax\n\n"
            + fused_loss_table(),
            "(attention-tables)=\n### dot_product_attention against jax.nn\n\n"
            "B=1, T=6, S=8, N=2, H=4, float32; the cells describe query row 2 "
            "(3 and later for the lengths).\n\n" + attention_table(),
        ]
    )


def main(argv: list[str]) -> int:
    here = pathlib.Path(__file__).parent
    out = pathlib.Path(argv[0]) if argv else here / "_generated" / "semantics_tables.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with jax.default_matmul_precision("highest"), warnings.catch_warnings():
        # numpy's casts of complex and NaN inputs warn; the tables say what
        # each library returned.
        warnings.simplefilter("ignore", RuntimeWarning)
        text = generate()
    out.write_text(text + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m jsoftmax``: verify every op's VJP on every local backend.

``python -m jsoftmax`` checks each op's value and Jacobian (by ``jax.jacrev``,
and by ``jax.jacfwd`` where the op has forward mode: the "jacfwd" columns)
against ``jax.jacrev`` of a plain-autodiff reference, under jit and vmap, in float32
and bfloat16, on the CPU and on any accelerator JAX finds, and prints one
table. On a platform with two devices or more, it also checks every op
that takes ``axis_name`` over them (under jit), against its reference on
the whole axis. Under the table it says why each failing row failed, and
where a float64 comparison did not run. It exits with 1 if any check fails
(a check that raises is an ERROR row).

``python -m jsoftmax bench [--quick] [--gpu] [--out DIR]`` runs the benchmark
in ``bench/`` of the checkout this package is imported from (see
bench/README.md). Without ``--out`` it writes to a new folder in the system's
temporary directory, never over the results in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import runpy
import sys
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import testing


def _jacobian_reference(x):
    per_row = partial(jnp.vectorize, signature="(n)->(n,n)")
    return per_row(jax.jacrev(testing.reference_softmax))(x)


def _soft_labels(shape):
    """Fixed probability labels of ``shape``, so that vmap sees one example."""
    return jax.nn.softmax(jnp.sin(jnp.arange(np.prod(shape)).reshape(shape)))


def _int_labels(shape, classes):
    return (jnp.arange(np.prod(shape), dtype=jnp.int32).reshape(shape) * 3) % classes


def _linear(op, x):
    """The fused linear loss of ``x`` (rows of 12 features) into 7 classes."""
    x2 = x.reshape(-1, x.shape[-1])
    w = jnp.cos(jnp.arange(12 * 7).reshape(12, 7)).astype(x.dtype)
    return op(x2, w, _int_labels(x2.shape[:1], 7)).reshape(x.shape[:-1])


def _attention(op, x):
    """Causal grouped-query attention over ``T`` positions with 2 query heads
    and 1 key/value head of size 2, all taken from ``x`` (rows of ``4 T``)."""
    q = x.reshape(*x.shape[:-1], x.shape[-1] // 4, 2, 2)
    k = jnp.flip(q[..., :1, :], -3)
    v = jnp.flip(q[..., 1:, :], -1)
    return op(q, k, v, is_causal=True).reshape(x.shape)


def _attention_reference(q, k, v, is_causal):
    """Plain attention of ``[..., T, N, H]`` queries, keys and values (the key
    and value heads repeated for their groups): the scores, a masked
    reference softmax and the weighted sum, all in the inputs' dtype, so that
    it computes in float64 too (jax.nn's casts to float32)."""
    groups = q.shape[-2] // k.shape[-2]
    k, v = (jnp.repeat(a, groups, axis=-2) for a in (k, v))
    scale = 1 / np.sqrt(q.shape[-1])
    scores = jnp.einsum("...tnh,...snh->...nts", q, k) * jnp.asarray(scale, q.dtype)
    t, s = q.shape[-3], k.shape[-3]
    visible = np.tril(np.ones((t, s), bool)) if is_causal else None
    weights = testing.reference_softmax(scores, where=visible)
    return jnp.einsum("...nts,...snh->...tnh", weights, v)


# The losses' options in every row: each term of the rule is checked.
_LOSS_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, soft_cap=5.0)


def _cases() -> list[tuple[str, Callable, Callable, int]]:
    """(name, op of one array argument, independent reference, width of a
    row of that argument)."""
    mask = jnp.arange(12) % 3 != 1
    ce_opts = _LOSS_OPTIONS
    rows_of_12 = [
        ("softmax", jsoftmax.softmax, testing.reference_softmax),
        ("log_softmax", jsoftmax.log_softmax, testing.reference_log_softmax),
        (
            "softmax[where]",
            partial(jsoftmax.softmax, where=mask),
            partial(testing.reference_softmax, where=mask),
        ),
        (
            "log_softmax[where]",
            partial(jsoftmax.log_softmax, where=mask),
            partial(testing.reference_log_softmax, where=mask),
        ),
        (
            "softmax_jacobian",
            lambda x: jsoftmax.softmax_jacobian(jsoftmax.softmax(x)),
            _jacobian_reference,
        ),
        (
            "softmax_cross_entropy",
            lambda x: jsoftmax.softmax_cross_entropy(
                x, _soft_labels(x.shape), **ce_opts
            ),
            lambda x: testing.reference_softmax_cross_entropy(
                x, _soft_labels(x.shape), **ce_opts
            ),
        ),
        (
            "ce_with_integer_labels",
            lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(
                x, _int_labels(x.shape[:-1], 12), where=mask, **ce_opts
            ),
            lambda x: testing.reference_softmax_cross_entropy_with_integer_labels(
                x, _int_labels(x.shape[:-1], 12), where=mask, **ce_opts
            ),
        ),
        (
            "linear_softmax_cross_entropy",
            partial(
                _linear,
                partial(
                    jsoftmax.linear_softmax_cross_entropy,
                    chunk_size=3,
                    reduction="none",
                ),
            ),
            partial(
                _linear,
                lambda x, w, y: (
                    testing.reference_softmax_cross_entropy_with_integer_labels(
                        x @ w, y
                    )
                ),
            ),
        ),
    ]
    # Attention over 24 positions in blocks of 16 (a partial block, the
    # causal diagonal, a skipped block): the smallest blocks the kernels
    # take, so that on a GPU the default runs the kernels.
    attention = (
        "dot_product_attention",
        partial(
            _attention,
            partial(
                jsoftmax.dot_product_attention, query_chunk_size=16, key_chunk_size=16
            ),
        ),
        partial(_attention, _attention_reference),
        4 * 24,
    )
    return [(*case, 12) for case in rows_of_12] + [attention]


def _context_parallel(mesh, mode, layout, q, k, v, is_causal):
    """Attention with the sequence axis (``-3``) of ``q, k, v`` split over
    the mesh axis "c", ``mode`` and ``layout`` as ``context_parallel`` and
    ``context_layout`` name them; in and out in natural order. Blocks of 16,
    the kernels' smallest: on GPUs the pairs run the kernels."""
    n = mesh.shape["c"]
    seq = P(*(None,) * (q.ndim - 3), "c")
    zigzag = layout == "zigzag"

    def attend(q, k, v):
        return jsoftmax.dot_product_attention(
            q, k, v, is_causal=is_causal, query_chunk_size=16, key_chunk_size=16,
            axis_name="c", context_parallel=mode, context_layout=layout,
        )  # fmt: skip

    if zigzag:
        q, k, v = (jsoftmax.to_zigzag(a, n, axis=-3) for a in (q, k, v))
    out = jax.shard_map(attend, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq)(q, k, v)
    return jsoftmax.from_zigzag(out, n, axis=-3) if zigzag else out


def _mesh_cases(mesh) -> list[tuple[str, Callable, Callable, int]]:
    """(name, op, reference, row width) of the ops that take ``axis_name``,
    over the mesh axis "c": softmax, log_softmax and both per-example losses
    with the classes split (6 a device), the fused loss with its vocabulary
    split, and context-parallel attention (the ring under the zigzag layout,
    the all-gather under the contiguous one; 4 positions a device), each
    against its reference on the whole axis."""
    n = mesh.shape["c"]
    classes, cols = 6 * n, P(None, "c")

    def split(fn, *in_specs, out_specs=cols):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    def labels(x):
        return _int_labels(x.shape[:-1], classes)

    def weights(x):  # [12, classes]
        return jnp.cos(jnp.arange(12 * classes).reshape(12, classes)).astype(x.dtype)

    ce_opts = dict(_LOSS_OPTIONS, axis_name="c")
    ref_opts = _LOSS_OPTIONS
    attention = _attention_reference
    cases = [
        (
            "softmax",
            split(partial(jsoftmax.softmax, axis_name="c"), cols),
            testing.reference_softmax,
        ),
        (
            "log_softmax",
            split(partial(jsoftmax.log_softmax, axis_name="c"), cols),
            testing.reference_log_softmax,
        ),
        (
            "softmax_cross_entropy",
            lambda x: split(
                partial(jsoftmax.softmax_cross_entropy, **ce_opts),
                cols, cols, out_specs=P(),
            )(x, _soft_labels(x.shape)),
            lambda x: testing.reference_softmax_cross_entropy(
                x, _soft_labels(x.shape), **ref_opts
            ),
        ),
        (
            "ce_with_integer_labels",
            lambda x: split(
                partial(jsoftmax.softmax_cross_entropy_with_integer_labels, **ce_opts),
                cols, P(), out_specs=P(),
            )(x, labels(x)),
            lambda x: testing.reference_softmax_cross_entropy_with_integer_labels(
                x, labels(x), **ref_opts
            ),
        ),
        (
            "linear_softmax_cross_entropy",
            lambda x: split(
                partial(
                    jsoftmax.linear_softmax_cross_entropy,
                    chunk_size=3, reduction="none", axis_name="c",
                ),
                P(), cols, P(), out_specs=P(),
            )(x[:, :12], weights(x), labels(x)),
            lambda x: testing.reference_softmax_cross_entropy_with_integer_labels(
                x[:, :12] @ weights(x), labels(x)
            ),
        ),
    ]  # fmt: skip
    rows = [(f"{name}[axis_name x{n}]", op, ref, classes) for name, op, ref in cases]
    return rows + [
        (
            f"dot_product_attention[{mode} x{n}]",
            partial(_attention, partial(_context_parallel, mesh, mode, layout)),
            partial(_attention, attention),
            16 * n,
        )
        for mode, layout in (("ring", "zigzag"), ("all_gather", "contiguous"))
    ]


def _mesh_devices(platform: str) -> list[jax.Device]:
    """The local devices of ``platform`` the sharded checks span: the
    largest power of two of them up to 8, none if there is only one."""
    devices = jax.local_devices(backend=platform)
    n = 1 << (min(len(devices), 8).bit_length() - 1)
    return devices[:n] if n > 1 else []


def _backends() -> list[jax.Device]:
    """The first device of each local platform, the CPU always included."""
    devices = {d.platform: d for d in reversed(jax.local_devices())}
    devices.setdefault("cpu", jax.local_devices(backend="cpu")[0])
    return [devices[p] for p in sorted(devices, key=lambda p: p != "cpu")]


def verify(transforms=("jit", "vmap"), dtypes=("float32", "bfloat16")) -> list[dict]:
    """Runs every check and returns one row per (op, backend, transform, dtype).

    Matmuls run at full precision (``jax.default_matmul_precision("highest")``):
    on GPUs JAX's default lets float32 matmuls use TF32, and the fused loss
    and its unfused reference would then differ by TF32's rounding, not by
    their maths.
    """
    with jax.default_matmul_precision("highest"):
        return _verify(transforms, dtypes)


def _verify(transforms, dtypes) -> list[dict]:
    rows = []
    for device in _backends():
        # A batch of 4 rows; vmap maps over the 4 rows.
        for name, op, reference, width in _cases():
            shape = (4, width)
            rows += _rows(name, op, reference, device, shape, transforms, dtypes)
        devices = _mesh_devices(device.platform)
        # The sharded ops under jit only: eager vmap would dispatch each
        # operation of every ring step on its own (minutes, not seconds).
        jitted = tuple(t for t in transforms if t == "jit")
        if devices and jitted:
            mesh = jax.make_mesh(
                (len(devices),), ("c",), (jax.sharding.AxisType.Auto,),
                devices=devices,
            )  # fmt: skip
            place = NamedSharding(mesh, P())
            for name, op, reference, width in _mesh_cases(mesh):
                shape = (4, width)
                rows += _rows(name, op, reference, place, shape, jitted, dtypes)
    return rows


def _spread(name: str) -> float:
    """The standard deviation of the point an op is checked at: 3 (logits
    from near-uniform to near-one-hot rows), and 1 for attention. Its q and
    k come from the same point, and at 3 most rows of scores are near
    one-hot, where the 16-bit backward's ``D = rowsum(dO * O)``, taken from
    the 16-bit output as FlashAttention and cuDNN take it, is rounded
    beyond the 16-bit allowance of the row (bench/attention_precision_16bit.py
    measures that regime: 1.5-10x jax.nn's error as the scores grow)."""
    return 1.0 if name.startswith("dot_product_attention") else 3.0


def _rows(name, op, reference, place, shape, transforms, dtypes) -> list[dict]:
    """One row per transform and dtype: ``op`` against ``reference`` at an
    ``x`` of ``shape`` put on ``place`` (a device or a sharding). A check that
    raises is a failed row, with the error as its message."""
    rows = []
    device = place if isinstance(place, jax.Device) else None
    platform = (device or place.mesh.devices.flat[0]).platform
    for dtype in dtypes:
        # Drawn in float32 whatever jax_enable_x64 says: the same point.
        x = _spread(name) * jax.random.normal(jax.random.key(0), shape, jnp.float32)
        x = jax.device_put(x.astype(dtype), place)
        for transform in transforms:
            row = dict(
                op=name, backend=platform, transform=_label(transform), dtype=dtype
            )
            try:
                with jax.default_device(device):
                    e = testing.vjp_errors(op, reference, x, transform=transform)
            except Exception as error:  # noqa: BLE001 (reported in its row)
                first = str(error).strip().splitlines()[:1] or [""]
                rows.append(
                    dict(row, passed=False, error=f"{type(error).__name__}: {first[0]}")
                )
                continue
            messages = (e.value_mismatch, e.jacobian_mismatch, e.forward_mismatch)
            rows.append(
                dict(
                    row,
                    value_error=e.value_error,
                    jacobian_error=e.jacobian_error,
                    jacfwd_error=e.forward_error,
                    jacfwd_passed=e.forward_mismatch is None,
                    passed=e.passed,
                    message="; ".join(dict.fromkeys(m for m in messages if m)),
                    float64_skipped=e.float64_skipped,
                )
            )
    return rows


def _label(transform: str) -> str:
    """A row's transform as it ran: ``jit`` under ``JAX_DISABLE_JIT`` runs
    op by op."""
    if transform == "jit" and jax.config.jax_disable_jit:
        return "jit (disabled)"
    return transform


def format_table(rows: list[dict]) -> str:
    header = (
        "op",
        "backend",
        "transform",
        "dtype",
        "value err",
        "jacobian err",
        "jacfwd err",
        "jacfwd",
        "result",
    )
    body = [
        (
            r["op"],
            r["backend"],
            r["transform"],
            r["dtype"],
            *_error_cells(r),
            *_forward_cells(r),
            "pass" if r["passed"] else ("ERROR" if "error" in r else "FAIL"),
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
        for line in [header, *body]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _error_cells(row: dict) -> tuple[str, str]:
    if "error" in row:  # the check raised
        return "-", "-"
    return f"{row['value_error']:.2e}", f"{row['jacobian_error']:.2e}"


def format_notes(rows: list[dict]) -> str:
    """Why each row failed or raised, and where the float64 comparison did not
    run (the error columns are those of the rows' own dtype)."""
    lines = []
    for r in rows:
        where = f"{r['op']} | {r['backend']} | {r['transform']} | {r['dtype']}"
        if "error" in r:
            lines.append(f"ERROR {where}: {r['error']}")
        elif not r["passed"]:
            lines.append(f"FAIL {where}: {r.get('message') or 'no message'}")
        if r.get("float64_skipped"):
            lines.append(f"no float64 comparison {where}: {r['float64_skipped']}")
    return "\n".join(lines)


def _forward_cells(row: dict) -> tuple[str, str]:
    """jax.jacfwd's error and result; "-" where the op has no forward mode."""
    error = row.get("jacfwd_error")
    if error is None or "error" in row:
        return "-", "-"
    return f"{error:.2e}", "pass" if row.get("jacfwd_passed") else "FAIL"


def _run_bench(argv: list[str]) -> int:
    """Runs bench/bench.py of the checkout that jsoftmax is imported from.

    Never the current directory's: that can belong to another project. A
    checkout holds pyproject.toml next to the package; an installed wheel has
    neither it nor bench/ there.
    """
    root = pathlib.Path(jsoftmax.__file__).resolve().parent.parent
    script = root / "bench" / "bench.py"
    if not ((root / "pyproject.toml").is_file() and script.is_file()):
        print(
            f"python -m jsoftmax bench: no checkout with bench/bench.py at {root}, "
            "where jsoftmax is imported from. The benchmark is not part of the "
            "installed package: run it from a checkout installed with "
            "pip install -e '.[bench]'.",
            file=sys.stderr,
        )
        return 2
    sys.argv = [str(script), *argv]
    namespace = runpy.run_path(str(script))
    bench_main = namespace.get("main")
    if not callable(bench_main):
        print(
            f"python -m jsoftmax bench: {script} defines no main(argv)",
            file=sys.stderr,
        )
        return 2
    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jsoftmax", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "bench",
        add_help=False,
        help="run this checkout's bench/bench.py; its options follow",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        before = argv[: argv.index("bench")]  # none of them are bench's
        if before:
            parser.error(f"unrecognized arguments: {' '.join(before)}")
        return _run_bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    start = time.perf_counter()
    rows = verify()
    failed = sum(not r["passed"] for r in rows)
    notes = format_notes(rows)
    report = "\n".join(
        [
            format_table(rows),
            *(["", notes] if notes else []),
            f"\n{len(rows) - failed} passed, {failed} failed "
            f"(jax {jax.__version__}, {time.perf_counter() - start:.1f} s)",
        ]
    )
    try:
        print(report, flush=True)
    except BrokenPipeError:  # a reader that stopped early (| head): no traceback
        # What is left in stdout's buffer goes nowhere at exit, not to the pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

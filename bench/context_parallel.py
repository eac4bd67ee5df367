"""Per-device memory and collective bytes of context-parallel attention.

    python bench/context_parallel.py             # T=32768 on 8 host devices
    python bench/context_parallel.py --quick     # T=2048, a smoke run
    python bench/context_parallel.py --time      # head groups: time, T=8192

Compile-only (nothing runs): XLA's ``memory_analysis`` of one device's
program, ``jit(value_and_grad)`` of ``sum(dot_product_attention(...))``
w.r.t. q, k and v inside ``shard_map`` (the sequence split over the mesh
axis), against the same on one device without ``axis_name``. Per device:
the temporaries of that program, the residuals the forward pass saves for
the backward (``saved_residuals``, divided by the devices), the arguments
(q, k, v) and the forward pass's collective bytes received, counted from the
compiled forward program's ``collective-permute`` / ``all-gather`` shapes.
Writes ``bench/results/context_parallel_cpu.md`` (``_quick`` with --quick).

``--time`` times the ring's ``jit(value_and_grad)`` (8 devices, T=8192, 8
query and key/value heads, causal) as it runs, one key/value head at a time
(:func:`jsoftmax._context_parallel.head_groups`), against the ring over all
heads at once (one group), with a second compiled copy of the latter as the
A/A control: medians of interleaved rounds, written to
``bench/results/context_parallel_time_cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from host_devices import request  # noqa: E402

request(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402
from bench import interleaved, machine  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MiB = 2**20
B, N, H = 1, 8, 64
ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1}


def _programs(t, kv_heads, devices, mode, layout):
    """(the attention, jit(value_and_grad)) of one device's program: the
    single-device op with ``devices`` 0."""
    kw = dict(is_causal=True)
    if devices:
        kw.update(axis_name="c", context_parallel=mode, context_layout=layout)

    def attend(q, k, v):
        return jsoftmax.dot_product_attention(q, k, v, **kw)

    def step(q, k, v):
        return jax.value_and_grad(lambda *a: jnp.sum(attend(*a)), (0, 1, 2))(q, k, v)

    if not devices:
        return attend, step
    mesh = jax.make_mesh(
        (devices,), ("c",), (jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:devices],
    )  # fmt: skip
    seq = P(None, "c")

    def mapped(fn, out_specs):
        return jax.shard_map(
            fn, mesh=mesh, in_specs=(seq,) * 3, out_specs=out_specs, check_vma=False
        )

    return mapped(attend, seq), mapped(step, (P(), (seq,) * 3))


def received_bytes(hlo_text):
    """Bytes each device receives in the collectives of a compiled program;
    one in a while loop's body counts once per trip (XLA's known trip
    count; the ring's steps are a loop)."""
    sizes, calls, current = {}, {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            sizes[current], calls[current] = 0.0, []
            continue
        if current is None:
            continue
        m = re.search(
            r"= (\w+)\[([\d,]*)\][^ ]* (collective-permute|all-gather)\(", line
        )
        if m:
            dtype, dims, op = m.groups()
            size = ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",")]))
            if op == "all-gather":
                # The gathered result holds this device's own share too.
                size = size * (1 - 1 / _group_size(line))
            sizes[current] += size
        for kind, callees in re.findall(
            r"\b(body|to_apply|calls|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)",
            line,
        ):
            trips = 1
            if kind == "body":
                trips = int(re.search(r'"known_trip_count":\{"n":"(\d+)"', line)[1])
            calls[current] += [(c, trips) for c in re.findall(r"[\w.\-]+", callees)]

    def total(name):
        return sizes[name] + sum(trips * total(c) for c, trips in calls[name])

    return total(re.search(r"^ENTRY %?([\w.\-]+)", hlo_text, re.M).group(1))


def _group_size(line):
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    shape = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    return int(shape.group(2))


def measure(t, kv_heads, devices=0, mode="ring", layout="zigzag"):
    """Per-device bytes: dict(temp, residuals, arguments, received)."""
    q = jax.ShapeDtypeStruct((B, t, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, t, kv_heads, H), jnp.float32)
    attend, step = _programs(t, kv_heads, devices, mode, layout)
    analysis = jax.jit(step).lower(q, kv, kv).compile().memory_analysis()
    res = saved_residuals(attend, q, kv, kv)
    # saved_residuals lists the residuals of the whole mesh (the shard_map's
    # outputs stack the devices' on the sequence axis); the arguments among
    # them (q, k, v) are counted once, as arguments.
    residuals = sum(
        int(np.prod(a.shape)) * a.dtype.itemsize
        for a, why in res
        if not str(why).startswith("from the argument")
    ) / max(devices, 1)
    received = 0
    if devices:
        forward = jax.jit(attend).lower(q, kv, kv).compile().as_text()
        received = received_bytes(forward)
    return dict(
        temp=analysis.temp_size_in_bytes,
        residuals=residuals,
        arguments=analysis.argument_size_in_bytes,
        received=received,
        kv=2 * t * kv_heads * H * 4 * B,
    )


def rows(t, devices):
    table = []
    for kv_heads in (N, 2, 1):
        single = measure(t, kv_heads)
        table.append(("one device", kv_heads, "-", single, single))
        for mode in ("ring", "all_gather"):
            for layout in ("zigzag", "contiguous"):
                got = measure(t, kv_heads, devices, mode, layout)
                table.append((mode, kv_heads, layout, got, single))
                print(mode, kv_heads, layout, got, flush=True)
    return table


def timing(t=8192, devices=8, rounds=7):
    """Median seconds per call of the ring (value and gradients), in head
    groups and in one group, per layout; and the A/A control."""
    from jsoftmax import _context_parallel as cp

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, t, N, H), jnp.float32) for key in keys)
    groups = cp.head_groups
    rows = []
    for layout in ("zigzag", "contiguous"):
        fns = {}
        for name in ("head groups", "one group", "one group (A/A)"):
            cp.head_groups = groups if name == "head groups" else lambda *a: 1
            try:
                _, step = _programs(t, N, devices, "ring", layout)
                fns[name] = jax.jit(step)
                jax.block_until_ready(fns[name](q, k, v))  # traced and compiled
            finally:
                cp.head_groups = groups
        medians = {
            n: float(np.median(x))
            for n, x in interleaved(fns, (q, k, v), rounds).items()
        }
        rows.append((layout, medians))
        print(layout, medians, flush=True)
    return rows


def main_time(rounds):
    t, n = 8192, 8
    rows = timing(t, n, rounds)
    lines = [
        "# Context-parallel attention: key/value heads in groups, time",
        "",
        f"Machine: {machine()}; {n} host CPU devices via XLA_FLAGS (the 2 cores "
        "run all 8).",
        "",
        f"The ring's `jit(value_and_grad)` of `sum(dot_product_attention(...))` "
        f"inside `shard_map`, causal, B={B}, T=S={t}, N={N} query and key/value "
        f"heads, H={H}, float32, default chunks: as it runs (head groups: "
        f"here one key/value head at a time, {N} groups) against the ring over "
        "all heads at once (one group), and a second compiled copy of the "
        f"latter (A/A). Medians of {rounds} interleaved rounds.",
        "",
        "| layout | head groups | one group | A/A | groups / one group | A/A ratio |",
        "|---|---|---|---|---|---|",
    ]
    for layout, m in rows:
        one = m["one group"]
        lines.append(
            f"| {layout} | {m['head groups'] * 1e3:,.0f} ms | {one * 1e3:,.0f} ms | "
            f"{m['one group (A/A)'] * 1e3:,.0f} ms | {m['head groups'] / one:.3f} | "
            f"{m['one group (A/A)'] / one:.3f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "context_parallel_time_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.time:
        return main_time(args.rounds)
    t, n = (2048, 8) if args.quick else (32768, 8)
    table = rows(t, n)
    lines = [
        "# Context-parallel attention: memory and collective bytes per device",
        "",
        f"Machine: {machine()}; {n} host CPU devices via XLA_FLAGS.",
        "",
        f"Causal, B={B}, T=S={t}, N={N} query heads, H={H}, float32, default "
        f"chunks; the sequence over {n} devices. Compile-only: "
        "`memory_analysis()` of one device's `jit(value_and_grad)` (w.r.t. q, "
        "k, v) inside `shard_map`, the residuals of the forward pass "
        "(`saved_residuals`, per device), the arguments (q, k, v slices), and "
        "the bytes each device receives in the compiled forward pass's "
        "collectives (from the HLO shapes). `ratio` is (temporaries + "
        "residuals) over the one-device op's; the target is <= 1/6 = 0.167.",
        "",
        "| mode | KV heads | layout | temporaries | residuals | arguments | "
        "ratio | fwd received | / K+V | (n-1)/n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, kv_heads, layout, got, single in table:
        ratio = (got["temp"] + got["residuals"]) / (
            single["temp"] + single["residuals"]
        )
        recv = got["received"]
        lines.append(
            f"| {mode} | {kv_heads} | {layout} | {got['temp'] / MiB:,.1f} MiB | "
            f"{got['residuals'] / MiB:,.1f} MiB | {got['arguments'] / MiB:,.1f} MiB | "
            f"{ratio:.3f} | {recv / MiB:,.2f} MiB | {recv / got['kv']:.3f} | "
            f"{'-' if mode == 'one device' else f'{(n - 1) / n:.3f}'} |"
        )
    RESULTS.mkdir(exist_ok=True)
    name = "context_parallel_quick.md" if args.quick else "context_parallel_cpu.md"
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

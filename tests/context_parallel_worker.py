"""Context-parallel dot_product_attention on 2, 4 and 8 host devices.

Run as ``python tests/context_parallel_worker.py values`` (or ``schedule``):
it sets XLA_FLAGS for 8 CPU devices before importing jax (hence a separate
process). ``values`` checks, for both ``context_parallel`` modes and both
layouts, that the output, ``lse`` and the gradients of q, k, v, bias and
sinks equal the unsharded op's; ``schedule`` counts the collectives in the
compiled forward pass (8 devices too) and the blocks each device computes.
Each prints a JSON report on its last line. Importing it (pytest collects
doctests from every module) does nothing.
"""

import collections
import json
import math
import sys
from functools import partial

from xla_flags import use_host_devices


def cp_collectives(text):
    """Collectives of a compiled HLO module: ``{op: runs}`` where an op in a
    while loop's body runs once per trip of the loop (nested loops multiply),
    and ``{op + " in loops": written}``, those written in loop bodies."""
    import re

    ops = ("collective-permute", "all-gather", "reduce-scatter")
    body_of, found = {}, {}  # computation -> [(called body, trips)]; ops
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            body_of[current], found[current] = [], collections.Counter()
            continue
        if current is None:
            continue
        for op in ops:
            if f" {op}(" in line or f" {op}-start(" in line:
                found[current][op] += 1
        for kind, callees in re.findall(
            r"\b(body|to_apply|calls|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)",
            line,
        ):
            trips = 1
            if kind == "body":
                trips = int(re.search(r'"known_trip_count":\{"n":"(\d+)"', line)[1])
            for callee in re.findall(r"[\w.\-]+", callees):
                body_of[current].append((callee, trips, kind == "body"))
    counts = collections.Counter()

    def visit(name, runs, looped):
        for op, k in found[name].items():
            counts[op] += runs * k
            if looped:
                counts[op + " in loops"] += k
        for callee, trips, is_body in body_of[name]:
            visit(callee, runs * trips, looped or is_body)

    entry = re.search(r"^ENTRY %?([\w.\-]+)", text, re.M).group(1)
    visit(entry, 1, False)
    return dict(counts)


def main():
    part = sys.argv[1]
    # The memory part measures compiled temporaries: XLA's default fusion.
    use_host_devices(8, fusion_emitters=part == "memory")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import jsoftmax
    from jsoftmax import _attention_xla as xla
    from jsoftmax import _context_parallel as cp
    from jsoftmax._attention import _Config

    jax.config.update("jax_default_matmul_precision", "highest")
    report = {}
    if part in ("compose", "memory", "order", "heads", "export"):
        parts = {"compose": compose, "memory": memory, "order": order}
        parts["heads"], parts["export"] = explicit_heads, multi_platform_export
        parts[part](report)
        print(json.dumps(report))
        return
    b, t, h = 2, 32, 8
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def normal(shape):
        return jax.random.normal(next(keys), shape)

    # Two cases cover every option between them, each with rows that see no
    # key (a zero key length; a query segment absent from the keys).
    # causal: grouped-query, lengths, soft cap, sinks, a key-only bias and
    # mask (split with the keys: they travel with K/V).
    # window: multi-query, a two-sided window, segment ids, a full bias and
    # mask (split with the queries, key axis whole), sinks.
    seg = jnp.array([[0] * 8 + [1] * 14 + [3] * 10, [0] * 32])
    kv_seg = jnp.array([[0] * 8 + [1] * 14 + [2] * 10, [0] * 32])
    cases = {
        "causal": dict(
            heads=(4, 2),
            opts=dict(is_causal=True, soft_cap=3.0),
            ints=dict(
                query_seq_lengths=jnp.array([27, 32]),
                key_value_seq_lengths=jnp.array([0, 21]),
            ),
            bias=(normal((b, 1, 1, t)), P(None, None, None, "c"), (3,)),
            mask=(normal((1, 1, 1, t)) > -1.0, P(None, None, None, "c"), (3,)),
        ),
        "window": dict(
            heads=(4, 1),
            opts=dict(local_window_size=(6, 3)),
            ints=dict(query_segment_ids=seg, key_value_segment_ids=kv_seg),
            bias=(normal((b, 4, t, t)), P(None, None, "c"), (2, 3)),
            mask=(normal((b, 1, t, t)) > -1.5, P(None, None, "c"), (2, 3)),
        ),
    }
    for case in cases.values():
        n_heads, kv_heads = case["heads"]
        case["q"] = normal((b, t, n_heads, h))
        case["k"] = 2 * normal((b, t, kv_heads, h))
        case["v"] = normal((b, t, kv_heads, h))
        case["sinks"] = normal((n_heads,))
        case["ct"] = normal((b, t, n_heads, h))
    chunks = dict(query_chunk_size=4, key_chunk_size=4)

    def attention(case, **parallel):
        def f(q, k, v, bias, sinks, mask, ints):
            return jsoftmax.dot_product_attention(
                q, k, v, bias, mask, sinks=sinks, return_residual=True,
                **case["opts"], **ints, **chunks, **parallel,
            )  # fmt: skip

        return f

    def vjp_of(f):
        # Value, lse and the VJP of a cotangent on the output.
        def run(q, k, v, bias, sinks, mask, ints, ct):
            (out, lse), pull = jax.vjp(
                lambda *d: f(*d, mask, ints), q, k, v, bias, sinks
            )
            return out, lse, pull((ct, jnp.zeros_like(lse)))

        return run

    def check(name, got, want):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            finite = np.isfinite(w)
            np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=name)
            np.testing.assert_array_equal(g[~finite], w[~finite], err_msg=name)
            scale = np.abs(w[finite]).max()
            np.testing.assert_allclose(
                g[finite], w[finite], rtol=1e-5, atol=1e-5 * scale, err_msg=name
            )

    def collectives(text):
        """Per collective op: how many times it runs, counting each one in a
        while loop's body once per trip (XLA's known trip count), and how
        many of those are written in loop bodies."""
        return cp_collectives(text)

    wants = {}
    for name, case in cases.items():
        args = (case["q"], case["k"], case["v"], case["bias"][0], case["sinks"])
        wants[name] = jax.jit(vjp_of(attention(case)))(
            *args, case["mask"][0], case["ints"], case["ct"]
        )
        lse = np.asarray(wants[name][1])
        assert np.isneginf(lse).any() and np.isfinite(lse).any(), name
        print(name, "empty rows:", int(np.isneginf(lse).sum()), flush=True)

    def sharded(
        case, n, mode, layout, check_vma=True, forward_counts=False, axis_name="c"
    ):
        """jit(vjp) of the op inside shard_map over n devices, with the inputs
        in the layout and the results back in natural order. ``axis_name``: a
        mesh axis, or a pair of them, the mesh's in sorted order."""
        names = (axis_name,) if isinstance(axis_name, str) else tuple(sorted(axis_name))
        mesh = jax.make_mesh(
            (n,) if len(names) == 1 else (2, n // 2),
            names,
            (jax.sharding.AxisType.Auto,) * len(names),
            devices=jax.devices()[:n],
        )

        def on(spec):
            return P(*(axis_name if e == "c" else e for e in spec))

        def put(x, axes=(1,)):
            if layout == "zigzag":
                for axis in axes:
                    x = jsoftmax.to_zigzag(x, n, axis=axis)
            return x

        def back(x, axis=1):
            return jsoftmax.from_zigzag(x, n, axis=axis) if layout == "zigzag" else x

        seq = on(P(None, "c"))
        bias, bias_spec, bias_axes = case["bias"]
        mask, mask_spec, mask_axes = case["mask"]
        bias_spec, mask_spec = on(bias_spec), on(mask_spec)
        parallel = dict(context_parallel=mode, context_layout=layout)
        # Lengths stay global and replicated; segment ids are split.
        int_specs = {k: P() if x.ndim == 1 else seq for k, x in case["ints"].items()}
        f = jax.shard_map(
            attention(case, axis_name=axis_name, **parallel),
            mesh=mesh,
            in_specs=(seq, seq, seq, bias_spec, P(), mask_spec, int_specs),
            out_specs=(seq, seq),
            check_vma=check_vma,
        )  # fmt: skip
        ints = {k: (x if x.ndim == 1 else put(x)) for k, x in case["ints"].items()}
        args = (
            put(case["q"]), put(case["k"]), put(case["v"]), put(bias, bias_axes),
            case["sinks"], put(mask, mask_axes), ints, put(case["ct"]),
        )  # fmt: skip
        fn = jax.jit(vjp_of(f))
        compiled = fn.lower(*args).compile()
        out, lse, (dq, dk, dv, dbias, dsinks) = compiled(*args)
        got = (
            back(out), back(lse), back(dq), back(dk), back(dv),
            back(back(dbias, bias_axes[0]), bias_axes[-1])
            if len(bias_axes) == 2 else back(dbias, bias_axes[0]),
            dsinks,
        )  # fmt: skip
        counts = {"fwd+bwd": collectives(compiled.as_text())}
        if forward_counts:
            forward = jax.jit(f).lower(*args[:-1]).compile()
            counts["fwd"] = collectives(forward.as_text())
        return got, counts

    def run(name, n, mode, layout, **kw):
        label = f"{name}/{mode}/{layout}/{n}"
        if not kw.get("check_vma", True):
            label += "/no-vma"
        if kw.get("axis_name", "c") != "c":
            label += f"/{kw['axis_name']}"
        got, counts = sharded(cases[name], n, mode, layout, **kw)
        want = wants[name]
        check(label, got, (*want[:2], *want[2]))
        report[label] = counts
        print(label, "equal to unsharded;", counts, flush=True)

    if part == "values":
        # With the runs of "schedule", each case in both modes and both
        # layouts, on 2 and 4 devices (8: "schedule").
        run("causal", 2, "ring", "zigzag")
        run("causal", 2, "all_gather", "contiguous")
        run("window", 2, "ring", "contiguous")
        run("window", 2, "all_gather", "zigzag")
        run("window", 4, "all_gather", "contiguous")
        # Without variation tracking, the replicated sinks' cotangent parts
        # are summed by shard_map's transpose, not by the op.
        run("causal", 2, "ring", "contiguous", check_vma=False)
        # The sequence split over two mesh axes named in the other order than
        # the mesh's: lax.ppermute numbers the devices in the mesh's order
        # there, lax.axis_index in the name's (the ring's causal mask, window,
        # lengths and key-split bias were silently misplaced).
        for name, mode, layout in (
            ("causal", "ring", "contiguous"),
            ("causal", "ring", "zigzag"),
            ("window", "ring", "contiguous"),
            ("window", "all_gather", "zigzag"),
        ):
            run(name, 4, mode, layout, axis_name=("b", "a"))
        # Forward mode, and the gradient taken inside shard_map through
        # jax.checkpoint (the replicated sinks' parts summed by the op's
        # varying mark), on 4 devices.
        case = cases["causal"]
        mesh = jax.make_mesh((4,), ("c",), (jax.sharding.AxisType.Auto,))
        seq = P(None, "c")

        def op(q, k, v, sinks, **parallel):
            return jsoftmax.dot_product_attention(
                q, k, v, sinks=sinks, **case["opts"], **case["ints"], **chunks,
                **parallel,
            )  # fmt: skip

        def inner(q, k, v, sinks, tq, tk):
            def f(q, k, sinks):
                return op(q, k, v, sinks, axis_name="c")

            _, tangent = jax.jvp(lambda q, k: f(q, k, sinks), (q, k), (tq, tk))

            def loss(q, sinks):
                return jnp.sum(jnp.sin(jax.checkpoint(f)(q, k, sinks)))

            return tangent, jax.grad(loss, argnums=(0, 1))(q, sinks)

        mapped = jax.shard_map(
            inner,
            mesh=mesh,
            in_specs=(seq, seq, seq, P(), seq, seq),
            out_specs=(seq, (seq, P())),
        )
        q, k, v, sinks = (case[x] for x in ("q", "k", "v", "sinks"))
        tq, tk = jnp.cos(q), jnp.sin(k)
        got = jax.jit(mapped)(q, k, v, sinks, tq, tk)
        want_t = jax.jvp(lambda q, k: op(q, k, v, sinks), (q, k), (tq, tk))[1]

        def loss(q, sinks):
            return jnp.sum(jnp.sin(op(q, k, v, sinks)))

        want = (want_t, jax.grad(loss, argnums=(0, 1))(q, sinks))
        check("jvp, grad inside shard_map", got, want)
        print("jvp and grad inside shard_map: equal to unsharded", flush=True)
        print(json.dumps(report))
        return

    # The forward pass's collectives alone too; 8 devices.
    run("causal", 4, "ring", "contiguous", forward_counts=True)
    run("causal", 4, "all_gather", "zigzag", forward_counts=True)
    run("window", 4, "ring", "zigzag", forward_counts=True)
    run("causal", 8, "ring", "zigzag", forward_counts=True)

    # Blocks computed per device, causal, T = S = 64 over 4 devices, blocks of
    # 4: counted at run time (each block's online-softmax step reports its
    # device) and from the static schedule.
    n, t_long = 4, 64
    config = _Config(1.0, True, None, 0, None, 4, 4)
    mesh = jax.make_mesh(
        (n,), ("c",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )
    step = xla.online_step
    for layout in cp.LAYOUTS:
        seen = np.zeros(n, np.int64)

        def record(device, seen=seen):
            seen[int(device)] += 1

        def counted(*a, **kw):
            jax.debug.callback(record, lax.axis_index("c"))
            return step(*a, **kw)

        xla.online_step = counted
        try:
            x = jnp.ones((1, t_long, 1, h))
            f = jax.shard_map(
                lambda q, layout=layout: jsoftmax.dot_product_attention(
                    q,
                    q,
                    q,
                    is_causal=True,
                    axis_name="c",
                    context_layout=layout,
                    **chunks,
                ),  # fmt: skip
                mesh=mesh,
                in_specs=P(None, "c"),
                out_specs=P(None, "c"),
            )
            jax.block_until_ready(jax.jit(f)(x))
        finally:
            xla.online_step = step
        plan = cp.Plan(
            config, "c", n, "ring", layout, t_long // n, t_long // n, None, None, 1
        )
        static = cp.block_counts(plan)
        np.testing.assert_array_equal(seen, static, err_msg=layout)
        assert seen.sum() == (16 * 17) // 2, seen  # the causal blocks, once each
        report[f"blocks/{layout}"] = seen.tolist()
        print(f"blocks per device, {layout}:", seen.tolist(), flush=True)
    zig = report["blocks/zigzag"]
    assert max(zig) - min(zig) <= 1, zig

    print(json.dumps(report))


def memory(report):
    """Per-device bytes of jit(value_and_grad) inside shard_map and of the
    one-device op (compile-only): temporaries and the forward pass's
    residuals, causal. At T = 1024 (4 heads, blocks of 32), both modes on
    2, 4 and 8 devices; at issue 20's size, T = 32768 (8 query heads of 64,
    default blocks), the ring in both layouts on 2, 4 and 8 devices with 8
    key/value heads, and on 8 with 1."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals
    from jax.sharding import PartitionSpec as P

    import jsoftmax
    from jsoftmax import _context_parallel as cp

    def measure(n, t, heads, kv_heads, h, chunks, **parallel):
        q = jax.ShapeDtypeStruct((1, t, heads, h), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, kv_heads, h), jnp.float32)

        def attend(q, k, v):
            return jsoftmax.dot_product_attention(
                q, k, v, is_causal=True, **chunks, **parallel
            )

        def step(q, k, v):
            return jax.value_and_grad(lambda *a: jnp.sum(attend(*a)), (0, 1, 2))(
                q, k, v
            )

        if n:
            mesh = jax.make_mesh(
                (n,), ("c",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
            )
            seq = P(None, "c")
            attend_, step_ = (
                jax.shard_map(
                    fn, mesh=mesh, in_specs=(seq,) * 3, out_specs=out, check_vma=False
                )
                for fn, out in ((attend, seq), (step, (P(), (seq,) * 3)))
            )
        else:
            attend_, step_ = attend, step
        temp = (
            jax.jit(step_).lower(q, kv, kv).compile().memory_analysis()
        ).temp_size_in_bytes
        residuals = sum(
            int(np.prod(a.shape)) * a.dtype.itemsize
            for a, why in saved_residuals(attend_, q, kv, kv)
            if not str(why).startswith("from the argument")
        ) / max(n, 1)
        return {"temp": temp, "residuals": residuals}

    small = (1024, 4, 4, 32, dict(query_chunk_size=32, key_chunk_size=32))
    report["1"] = measure(0, *small)
    for n in (2, 4, 8):
        for mode, layout in (("ring", "zigzag"), ("all_gather", "contiguous")):
            label = f"{mode}/{layout}/{n}"
            report[label] = measure(
                n, *small, axis_name="c", context_parallel=mode, context_layout=layout
            )
            print(label, report[label], flush=True)
    for kv_heads in (8, 1):
        large = (32768, 8, kv_heads, 64, {})
        report[f"target/1/kv{kv_heads}"] = measure(0, *large)
        for n in (2, 4, 8) if kv_heads == 8 else (8,):
            for layout in ("zigzag", "contiguous"):
                label = f"target/ring/{layout}/{n}/kv{kv_heads}"
                report[label] = measure(
                    n, *large, axis_name="c", context_parallel="ring",
                    context_layout=layout,
                )  # fmt: skip
                print(label, report[label], flush=True)
    # The ring with the K/V of every head travelling together.
    groups = cp.head_groups
    cp.head_groups = lambda *args: 1
    try:
        for layout in ("zigzag", "contiguous"):
            label = f"one-group/ring/{layout}/8/kv8"
            report[label] = measure(
                8, 32768, 8, 8, 64, {}, axis_name="c", context_parallel="ring",
                context_layout=layout,
            )  # fmt: skip
            print(label, report[label], flush=True)
    finally:
        cp.head_groups = groups


def order(report):
    """Where each ring step's collective-permutes sit relative to that step's
    block compute, in the forward pass (4 devices, no mask): the ring's loop
    body is one function, in the unoptimized StableHLO (program order) and
    in the scheduled, optimized HLO, and its loop's trip count."""
    import re

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    n = 4
    mesh = jax.make_mesh(
        (n,), ("c",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )
    seq = P(None, "c")
    f = jax.jit(
        jax.shard_map(
            lambda q, k, v: jsoftmax.dot_product_attention(
                q, k, v, axis_name="c", query_chunk_size=8, key_chunk_size=8
            ),
            mesh=mesh,
            in_specs=(seq,) * 3,
            out_specs=seq,
        )
    )
    shape = jax.ShapeDtypeStruct((1, 64, 2, 4), jnp.float32)
    lowered = f.lower(shape, shape, shape)

    def with_permutes(text, head, permute, compute):
        """The kinds ("permute", "compute") in program order in each function
        of ``text`` that holds a permute, by the function's name."""
        found, name, kinds = {}, None, []
        for line in text.splitlines():
            start = re.match(head, line)
            if start:
                name, kinds = start.group(1), []
                found[name] = kinds
            elif re.search(permute, line):
                kinds.append("permute")
            elif re.search(compute, line):
                kinds.append("compute")
        return {k: v for k, v in found.items() if "permute" in v}

    # StableHLO: the ring's loop body is a func.call'd function: its permutes
    # (K and V) come first, then its block loop (stablehlo.while).
    report["stablehlo"] = list(
        with_permutes(
            lowered.as_text(),
            r"^\s*func\.func \w+ @(\w+)",
            r"stablehlo\.collective_permute",
            r"stablehlo\.while",
        ).values()
    )
    compiled = lowered.compile().as_text()
    bodies = with_permutes(
        compiled,
        r"^%?([\w.\-]+) \(.*\{$",
        r" collective-permute(-start)?\(",
        r" while\(",
    )
    report["scheduled"] = list(bodies.values())
    report["trips"] = [
        int(re.search(r'"known_trip_count":\{"n":"(\d+)"', line)[1])
        for line in compiled.splitlines()
        for body in bodies
        if re.search(rf"body=%?{re.escape(body)}\b", line)
    ]
    report["async"] = bool(re.search(r"collective-permute-(start|done)", compiled))
    print(report, flush=True)


def explicit_heads(report):
    """Tensor or data parallelism beside context parallelism, in meshes of
    explicit axes with shard_map manual over "c" only: q, k, v with the
    sequence over "c" and the heads over "model" (2 and 4 devices along
    "c": the ring's steps are then inlined, and a loop), or the batch over
    "data" (key/value heads in groups, each group's pass a loop trip). Both
    modes and layouts, causal, with sinks: the output and the gradients of
    q, k, v and the sinks equal the unsharded op's, and the output keeps
    the sharding of its heads and batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    b, t, heads, kv_heads, h = 2, 32, 4, 2, 8
    keys = jax.random.split(jax.random.key(5), 5)
    q, ct = (jax.random.normal(key, (b, t, heads, h)) for key in keys[:2])
    k, v = (jax.random.normal(key, (b, t, kv_heads, h)) for key in keys[2:4])
    sinks = jax.random.normal(keys[4], (heads,))
    opts = dict(is_causal=True, query_chunk_size=4, key_chunk_size=4)

    def loss(f, ct, q, k, v, sinks):
        return jnp.sum(f(q, k, v, sinks) * ct)

    def unsharded(q, k, v, sinks):
        return jsoftmax.dot_product_attention(q, k, v, sinks=sinks, **opts)

    want = jax.value_and_grad(partial(loss, unsharded, ct), (0, 1, 2, 3))(
        q, k, v, sinks
    )
    want = (unsharded(q, k, v, sinks), *want)
    # (name, mesh axes and sizes, the sharding of q, k, v and the output)
    meshes = (
        ("heads", (("c", 2), ("model", 2)), P(None, "c", "model")),
        ("heads4", (("c", 4), ("model", 2)), P(None, "c", "model")),
        ("batch", (("data", 2), ("c", 4)), P("data", "c")),
    )

    def padded(spec):
        return tuple(spec) + (None,) * (4 - len(spec))

    for name, axes, spec in meshes:
        names, sizes = zip(*axes, strict=True)
        n = dict(axes)["c"]
        mesh = jax.make_mesh(
            sizes,
            names,
            (AxisType.Explicit,) * 2,
            devices=jax.devices()[: math.prod(sizes)],
        )
        for mode in ("ring", "all_gather"):
            for layout in ("contiguous", "zigzag"):

                def local(q, k, v, sinks, mode=mode, layout=layout):
                    return jsoftmax.dot_product_attention(
                        q, k, v, sinks=sinks, axis_name="c",
                        context_parallel=mode, context_layout=layout, **opts,
                    )  # fmt: skip

                seq = P(None, "c")
                f = jax.shard_map(
                    local,
                    in_specs=(seq, seq, seq, P()),
                    out_specs=seq,
                    axis_names={"c"},
                )

                # The layout applied to (and undone on) the sharded arrays:
                # the chunks move between devices, and the sharding stays.
                def put(x, layout=layout, n=n, mesh=mesh, spec=spec):
                    x = jax.device_put(x, NamedSharding(mesh, spec))
                    if layout == "zigzag":
                        x = jsoftmax.to_zigzag(x, n)
                    assert padded(x.sharding.spec) == padded(spec), x.sharding
                    return x

                def back(x, layout=layout, n=n):
                    return jsoftmax.from_zigzag(x, n) if layout == "zigzag" else x

                with jax.set_mesh(mesh):
                    args = (put(q), put(k), put(v), sinks)
                    out = jax.jit(f)(*args)
                    value, grads = jax.jit(
                        jax.value_and_grad(partial(loss, f, put(ct)), (0, 1, 2, 3))
                    )(*args)
                assert padded(out.sharding.spec) == padded(spec), out.sharding
                got = (back(out), value, *(back(g) for g in grads[:3]), grads[3])
                for label, g, w in zip(
                    ("out", "loss", "dq", "dk", "dv", "dsinks"),
                    got,
                    (want[0], want[1], *want[2]),
                    strict=True,
                ):
                    scale = float(np.abs(w).max())
                    np.testing.assert_allclose(
                        np.asarray(g), w, rtol=1e-5, atol=1e-5 * scale, err_msg=label
                    )
                report[f"{name}/{mode}/{layout}"] = "equal"
                print(name, mode, layout, "equal to unsharded", flush=True)


def compose(report):
    """A small causal attention model trained with the sequence split over
    "c", in one step with the batch over "data" and the vocabulary over
    "vocab" (the fused loss), against plain autodiff of the same model with
    an unsharded attention written in jnp and an unsharded loss: the loss
    and every weight's gradient, taken outside shard_map, on Auto and
    Explicit meshes, with and without jax.checkpoint (and a policy)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    b, t, d, heads, h, vocab = 4, 32, 16, 4, 4, 24
    keys = jax.random.split(jax.random.key(1), 8)
    params = dict(
        wq=jax.random.normal(keys[0], (d, heads * h)) / d**0.5,
        wk=jax.random.normal(keys[1], (d, heads * h)) / d**0.5,
        wv=jax.random.normal(keys[2], (d, heads * h)) / d**0.5,
        wo=jax.random.normal(keys[3], (heads * h, d)) / d**0.5,
        wout=jax.random.normal(keys[4], (d, vocab)) / d**0.5,
    )
    x = jax.random.normal(keys[5], (b, t, d))
    targets = jax.random.randint(keys[6], (b, t), 0, vocab)

    def reference_attention(q, k, v):
        s = jnp.einsum("btnh,bsnh->bnts", q, k) / h**0.5
        causal = jnp.tril(jnp.ones((t, t), bool))
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", p, v)

    def hidden(p, x, attention):
        bl, tl, _ = x.shape
        q, k, v = ((x @ p[w]).reshape(bl, tl, heads, h) for w in ("wq", "wk", "wv"))
        return x + attention(q, k, v).reshape(bl, tl, heads * h) @ p["wo"]

    def reference(p, x, targets):
        z = hidden(p, x, reference_attention).reshape(-1, d)
        logp = jax.nn.log_softmax(z @ p["wout"])
        return -jnp.mean(jnp.take_along_axis(logp, targets.reshape(-1, 1), 1))

    want_loss, want_grad = jax.value_and_grad(reference)(params, x, targets)

    def check(label, got_loss, got_grad):
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=label)
        for name in params:
            w, g = np.asarray(want_grad[name]), np.asarray(got_grad[name])
            np.testing.assert_allclose(
                g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=label + name
            )
        report[label] = True
        print(label, "equal to plain autodiff", flush=True)

    def sharded(mesh, layout, vocab_axis, remat=None):
        context = mesh.shape["c"]
        batch_axes = tuple(a for a in ("data",) if a in mesh.shape)
        total = b * t

        def attention(q, k, v):
            return jsoftmax.dot_product_attention(
                q, k, v, is_causal=True, axis_name="c", context_layout=layout,
                query_chunk_size=4, key_chunk_size=4,
            )  # fmt: skip

        def local_loss(p, x, targets):
            layer = lambda p, x: hidden(p, x, attention)  # noqa: E731
            if remat is not None:
                layer = jax.checkpoint(layer, policy=remat)
            z = layer(p, x).reshape(-1, d)
            losses = jsoftmax.linear_softmax_cross_entropy(
                z, p["wout"], targets.reshape(-1), reduction="sum",
                axis_name=vocab_axis, chunk_size=4,
            )  # fmt: skip
            return jax.lax.psum(losses, batch_axes + ("c",)) / total

        seq = P(batch_axes or None, "c")
        specs = {k: P() for k in params}
        if vocab_axis:
            specs["wout"] = P(None, vocab_axis)
        f = jax.shard_map(
            local_loss, mesh=mesh, in_specs=(specs, seq, seq), out_specs=P()
        )
        xs, ts = x, targets
        if layout == "zigzag":
            xs, ts = (
                jsoftmax.to_zigzag(x, context),
                jsoftmax.to_zigzag(targets, context),
            )
        if mesh.axis_types[0] == AxisType.Explicit:
            put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
            ps = {k: put(v, specs[k]) for k, v in params.items()}
            xs, ts = put(xs, seq), put(ts, seq)
            with jax.set_mesh(mesh):
                return jax.jit(jax.value_and_grad(f))(ps, xs, ts)
        return jax.jit(jax.value_and_grad(f))(params, xs, ts)

    def mesh_of(shape, names, kind):
        n = int(np.prod(shape))
        return jax.make_mesh(
            shape, names, axis_types=(kind,) * len(shape), devices=jax.devices()[:n]
        )

    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    for kind in (AxisType.Auto, AxisType.Explicit):
        tag = kind.name
        check(
            f"context 4 {tag}",
            *sharded(mesh_of((4,), ("c",), kind), "zigzag", None),
        )
        check(
            f"data 2 x context 2 {tag}",
            *sharded(mesh_of((2, 2), ("data", "c"), kind), "contiguous", None),
        )
        check(
            f"data 2 x context 2 x vocab 2 {tag}",
            *sharded(
                mesh_of((2, 2, 2), ("data", "c", "vocab"), kind), "zigzag", "vocab"
            ),
        )
    pmap_checks(report, params, x, targets, hidden, check)
    mesh = mesh_of((2, 2, 2), ("data", "c", "vocab"), AxisType.Auto)
    check(
        "checkpoint",
        *sharded(
            mesh, "zigzag", "vocab", remat=jax.checkpoint_policies.nothing_saveable
        ),
    )
    check(
        "checkpoint with a policy", *sharded(mesh, "contiguous", "vocab", remat=policy)
    )
    try:
        import flax  # noqa: F401  (optional: the docs and examples extras)
    except ImportError:
        return
    flax_layer(report)


def flax_layer(report):
    """An nnx attention layer with ``jsoftmax.flax_attention_fn`` bound to
    the sequence axis, inside a shard_map over 4 devices (zigzag, causal at
    the layer's call, a key padding mask of the local keys): its output and
    parameter gradients (taken outside shard_map) against the same layer
    with flax's own attention over the whole sequence."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    n, b, t, features, heads = 4, 2, 32, 16, 4

    def layer(attention_fn):
        return nnx.MultiHeadAttention(
            num_heads=heads, in_features=features, decode=False,
            rngs=nnx.Rngs(0), attention_fn=attention_fn,
        )  # fmt: skip

    fn = functools.partial(
        jsoftmax.flax_attention_fn, axis_name="c", context_layout="zigzag"
    )
    graphdef, params, rest = nnx.split(layer(fn), nnx.Param, ...)
    flax_graphdef, _, flax_rest = nnx.split(
        layer(nnx.dot_product_attention), nnx.Param, ...
    )
    keys = jax.random.split(jax.random.key(5), 2)
    x, ct = (jax.random.normal(k, (b, t, features)) for k in keys)
    valid = jnp.ones((b, t)).at[0, 5:9].set(0).at[1, 20:].set(0)
    one = jnp.ones((b, 1))

    def local(params, x, valid):
        mask = nnx.make_attention_mask(one, valid)
        return nnx.merge(graphdef, params, rest)(x, mask=mask, is_causal=True)

    mesh = jax.make_mesh(
        (n,), ("c",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n]
    )
    seq = P(None, "c")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), seq, seq), out_specs=seq)

    def ours(params):
        zig = (jsoftmax.to_zigzag(a, n) for a in (x, valid))
        return jsoftmax.from_zigzag(sharded(params, *zig), n)

    def theirs(params):
        causal = nnx.make_causal_mask(jnp.ones((b, t)))
        mask = nnx.combine_masks(causal, nnx.make_attention_mask(one, valid))
        return nnx.merge(flax_graphdef, params, flax_rest)(x, mask=mask)

    def value_and_grad(f):
        out, pull = jax.vjp(f, params)
        return [out, *jax.tree.leaves(pull(ct))]

    got, want = (jax.jit(value_and_grad, static_argnums=0)(f) for f in (ours, theirs))
    scale = max(float(jnp.max(jnp.abs(w))) for w in want[1:])
    np.testing.assert_allclose(
        got[0], want[0], atol=1e-5 * float(jnp.max(abs(want[0])))
    )
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5 * scale)
    report["flax layer"] = True
    print("flax layer equal to flax's attention", flush=True)


def pmap_checks(report, params, x, targets, hidden, check):
    """The model of :func:`compose` with the sequence over a ``jax.pmap``
    axis "c" of 4 devices (contiguous): the gradient taken outside the pmap
    equals plain autodiff; taken inside it (pmap's own transpose of the
    loss's ``psum``), each device's gradient equals the same model's with a
    plain jnp attention over the gathered K/V, in the same pmap."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import jsoftmax

    n, (b, t, _), h = 4, x.shape, 4

    def split(a):  # [B, T, ...] -> [n, B, T / n, ...]
        return jnp.moveaxis(a.reshape(b, n, t // n, *a.shape[2:]), 1, 0)

    def ours(q, k, v):
        return jsoftmax.dot_product_attention(
            q, k, v, is_causal=True, axis_name="c", query_chunk_size=4,
            key_chunk_size=4,
        )  # fmt: skip

    def gathered(q, k, v):
        k, v = (lax.all_gather(a, "c", axis=1, tiled=True) for a in (k, v))
        start = lax.axis_index("c") * q.shape[1]
        rows = jnp.arange(q.shape[1])[:, None] + start
        visible = jnp.arange(k.shape[1])[None, :] <= rows
        s = jnp.einsum("btnh,bsnh->bnts", q, k) / h**0.5
        p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", p, v)

    def local_loss(p, x, targets, attention):
        z = hidden(p, x, attention).reshape(-1, x.shape[-1])
        losses = jsoftmax.linear_softmax_cross_entropy(
            z, p["wout"], targets.reshape(-1), reduction="sum"
        )
        return lax.psum(losses, "c") / (b * t)

    def pmapped(fn):
        return jax.pmap(fn, axis_name="c", in_axes=(None, 0, 0))

    xs, ts = split(x), split(targets)

    def whole(p):  # the loss, replicated over the devices
        return pmapped(partial(local_loss, attention=ours))(p, xs, ts)[0]

    check("pmap, gradient outside", *jax.value_and_grad(whole)(params))
    inside = {
        name: pmapped(jax.grad(partial(local_loss, attention=fn)))(params, xs, ts)
        for name, fn in (("ours", ours), ("gathered", gathered))
    }
    for name in params:
        got, want = (np.asarray(inside[k][name]) for k in ("ours", "gathered"))
        np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name
        )
    report["pmap, gradient inside"] = True
    print("pmap, gradient inside: equal to the gathered attention's", flush=True)


def multi_platform_export(report):
    """Causal context parallelism inside a shard_map, implementation None,
    exported for the CPU and CUDA at once and called on the CPU: the value
    and gradients' error against the unsharded op, and the kernels' custom
    calls the export holds (its CUDA branch), per mode."""
    import cuda_lowering
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    n = 2
    mesh = jax.make_mesh((n,), ("c",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(4)
    q, k, v, ct = (
        jnp.asarray(rng.standard_normal((1, 16 * n, 2, 8)), jnp.float32)
        for _ in range(4)
    )

    def grads(attention):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v) * ct)

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))

    want = grads(partial(jsoftmax.dot_product_attention, is_causal=True))(q, k, v)
    for mode in ("ring", "all_gather"):
        local = partial(
            jsoftmax.dot_product_attention, is_causal=True, axis_name="c",
            context_parallel=mode,
        )  # fmt: skip
        spec = P(None, "c")
        # Over the mesh's abstract twin naming an H100 (tests/cuda_lowering.py).
        sharded = jax.shard_map(
            local, mesh=cuda_lowering.on_an_h100(mesh), in_specs=spec, out_specs=spec
        )
        exported = cuda_lowering.export(
            grads(sharded), q, k, v, platforms=("cpu", "cuda"), mesh=mesh
        )
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        got = jax.jit(exported.call)(*args)
        error = max(
            float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        )
        kernels = exported.mlir_module().count(cuda_lowering.TRITON)
        report[mode] = dict(error=error, kernels=kernels)


if __name__ == "__main__":
    sys.exit(main())

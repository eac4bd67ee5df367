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
import os
import sys


def main():
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

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
    part = sys.argv[1]
    report = {}
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
        found = collections.Counter()
        for line in text.splitlines():
            for op in ("collective-permute", "all-gather", "reduce-scatter"):
                if f" {op}(" in line or f" {op}-start(" in line:
                    found[op] += 1
        return dict(found)

    wants = {}
    for name, case in cases.items():
        args = (case["q"], case["k"], case["v"], case["bias"][0], case["sinks"])
        wants[name] = jax.jit(vjp_of(attention(case)))(
            *args, case["mask"][0], case["ints"], case["ct"]
        )
        lse = np.asarray(wants[name][1])
        assert np.isneginf(lse).any() and np.isfinite(lse).any(), name
        print(name, "empty rows:", int(np.isneginf(lse).sum()), flush=True)

    def sharded(case, n, mode, layout, check_vma=True, forward_counts=False):
        """jit(vjp) of the op inside shard_map over n devices, with the inputs
        in the layout and the results back in natural order."""
        mesh = jax.make_mesh(
            (n,), ("c",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
        )

        def put(x, axes=(1,)):
            if layout == "zigzag":
                for axis in axes:
                    x = jsoftmax.to_zigzag(x, n, axis=axis)
            return x

        def back(x, axis=1):
            return jsoftmax.from_zigzag(x, n, axis=axis) if layout == "zigzag" else x

        seq = P(None, "c")
        bias, bias_spec, bias_axes = case["bias"]
        mask, mask_spec, mask_axes = case["mask"]
        parallel = dict(context_parallel=mode, context_layout=layout)
        # Lengths stay global and replicated; segment ids are split.
        int_specs = {k: P() if x.ndim == 1 else seq for k, x in case["ints"].items()}
        f = jax.shard_map(
            attention(case, axis_name="c", **parallel),
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
            config, "c", n, "ring", layout, t_long // n, t_long // n, None, None
        )
        static = cp.block_counts(plan)
        np.testing.assert_array_equal(seen, static, err_msg=layout)
        assert seen.sum() == (16 * 17) // 2, seen  # the causal blocks, once each
        report[f"blocks/{layout}"] = seen.tolist()
        print(f"blocks per device, {layout}:", seen.tolist(), flush=True)
    zig = report["blocks/zigzag"]
    assert max(zig) - min(zig) <= 1, zig

    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())

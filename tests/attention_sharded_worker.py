"""dot_product_attention on 8 host devices: batch- and head-sharded inputs.

Run as ``python tests/attention_sharded_worker.py``: it sets XLA_FLAGS for 8
CPU devices before importing jax (hence a separate process), checks that the
output and gradients of jit(value_and_grad) with batch-sharded and with
head-sharded ``NamedSharding`` inputs equal the unsharded ones and stay
sharded, and that the compiled HLO holds no collective. Importing it (pytest
collects doctests from every module) does nothing.
"""

import contextlib
import functools
import sys

from xla_flags import use_host_devices


def main():
    use_host_devices(8)
    if sys.argv[1:] == ["cache"]:
        return options_in_the_cache_key()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    b, t, n, kh, h = 8, 24, 8, 8, 8
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kh, h))
    v = jax.random.normal(keys[2], (b, t, kh, h))
    bias = jax.random.normal(keys[3], (b, n, t, t))
    sinks = jax.random.normal(keys[4], (n,))
    collectives = ("all-reduce", "all-gather", "all-to-all", "collective-permute")

    def attention(q, k, v, bias, sinks):
        return jsoftmax.dot_product_attention(
            q, k, v, bias, is_causal=True, sinks=sinks, local_window_size=(9, 0),
            query_chunk_size=8, key_chunk_size=8,
        )  # fmt: skip

    # The output and the VJP of a sharded cotangent: a scalar loss would add
    # the all-reduce of its own sum. Replicated sinks with batch-sharded data
    # need one all-reduce of their [N] gradient (any replicated parameter
    # does), so d sinks is taken in the head-sharded case only.
    def vjp(q, k, v, bias, sinks, ct, with_sinks):
        if with_sinks:
            out, pullback = jax.vjp(attention, q, k, v, bias, sinks)
        else:
            out, pullback = jax.vjp(
                lambda q, k, v, bias: attention(q, k, v, bias, sinks), q, k, v, bias
            )
        return out, pullback(ct)

    f = jax.jit(vjp, static_argnames="with_sinks")
    ct = jnp.cos(q)
    for name, spec, bias_spec, sink_spec in [
        ("batch", P("d"), P("d"), P()),
        ("heads", P(None, None, "d"), P(None, "d"), P("d")),
    ]:
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
        with_sinks = name == "heads"
        args = (
            put(q, spec), put(k, spec), put(v, spec), put(bias, bias_spec),
            put(sinks, sink_spec), put(ct, spec),
        )  # fmt: skip
        want = f(q, k, v, bias, sinks, ct, with_sinks=with_sinks)
        text = f.lower(*args, with_sinks=with_sinks).compile().as_text()
        found = [
            line.strip()[:160]
            for line in text.splitlines()
            if any(f" {c}(" in line or f" {c}-start(" in line for c in collectives)
        ]
        assert not found, (name, found)
        got = f(*args, with_sinks=with_sinks)
        out, grads = got
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), name
        assert grads[0].sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), name
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
        print(f"{name}-sharded: no collectives, equal to unsharded")

    # Sharding in types (an Explicit mesh): the loop carries, the reshapes
    # that split and merge heads and, with multi-query attention, dK and dV
    # (which sum over sharded query heads) must carry shardings, or tracing
    # fails. Both batch- and head-sharded (k, v replicated: one kv head).
    explicit = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    mqa = (k[:, :, :1], v[:, :, :1])
    unsharded = {"batch": want, "heads-mqa": f(q, *mqa, bias, sinks, ct, True)}
    for name, spec, kv_spec, kv, bias_spec, sink_spec in [
        ("batch", P("d"), P("d"), (k, v), P("d"), P()),
        ("heads-mqa", P(None, None, "d"), P(), mqa, P(None, "d"), P("d")),
    ]:
        want = unsharded[name]
        with jax.set_mesh(explicit):
            put = lambda x, s: jax.device_put(x, NamedSharding(explicit, s))  # noqa: E731
            args = (
                put(q, spec), put(kv[0], kv_spec), put(kv[1], kv_spec),
                put(bias, bias_spec), put(sinks, sink_spec), put(ct, spec),
            )  # fmt: skip
            got = f(*args, with_sinks=True)
        for x in (got[0], got[1][0]):  # out and d query
            assert x.sharding.is_equivalent_to(NamedSharding(explicit, spec), 4), name
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
        print(f"explicit {name}-sharded: equal to unsharded")
        # k and v made before the mesh (uncommitted: no sharding in their
        # type), as plain JAX code may pass them beside sharded queries.
        with jax.set_mesh(explicit):
            got = f(args[0], *kv, *args[3:], with_sinks=True)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
        print(f"explicit {name}-sharded, k and v made outside: equal to unsharded")

    # vmap over examples whose mapped axis is split over the Explicit mesh,
    # each with its own lengths, bias and sinks broadcast (in_axes=None): the
    # batching rule shards the tangents it broadcasts and its outputs' types
    # as the mapped inputs are. The VJP, per-example gradients, the JVP and
    # the gradient of a gradient norm equal the unsharded vmap's.
    lens = jnp.array([24, 3, 17, 0, 9, 24, 16, 1], jnp.int32)

    def one(q, k, v, bias, sinks, length):
        return jsoftmax.dot_product_attention(
            q[None], k[None], v[None], bias, is_causal=True, sinks=sinks,
            query_seq_lengths=length[None], key_value_seq_lengths=length[None],
            query_chunk_size=8, key_chunk_size=8,
        )[0]  # fmt: skip

    in_axes = (0, 0, 0, None, None, 0)
    mapped = jax.vmap(one, in_axes=in_axes)

    def inner(q, k, v, bias, sinks, lens, ct):
        return jnp.sum(mapped(q, k, v, bias, sinks, lens) * ct)

    def modes(q, k, v, bias, sinks, lens, ct):
        diff = (q, k, v, bias, sinks)
        grads = jax.grad(inner, argnums=(0, 1, 2, 3, 4))
        per_example = jax.vmap(
            jax.grad(lambda *a: jnp.sum(one(*a[:-1]) * a[-1]), argnums=(0, 1, 2)),
            in_axes=(*in_axes, 0),
        )(q, k, v, bias, sinks, lens, ct)
        jvp = jax.jvp(lambda *d: mapped(*d, lens), diff, diff)
        norm = jax.grad(
            lambda q: sum(jnp.sum(g**2) for g in grads(q, k, v, bias, sinks, lens, ct))
        )(q)
        return grads(*diff, lens, ct), per_example, jvp, norm

    head_bias = bias[0]  # [N, T, S], shared by the examples
    want = jax.jit(modes)(q, k, v, head_bias, sinks, lens, ct)
    with jax.set_mesh(explicit):
        put = lambda x, s: jax.device_put(x, NamedSharding(explicit, s))  # noqa: E731
        b_ = P("d")
        args = (
            put(q, b_), put(k, b_), put(v, b_), put(head_bias, P()), put(sinks, P()),
            put(lens, b_), put(ct, b_),
        )  # fmt: skip
        got = jax.jit(modes)(*args)
    assert got[0][0].sharding.is_equivalent_to(NamedSharding(explicit, b_), 4)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    print("vmap over an explicit axis: equal to unsharded")

    # shard_map with check_vma=True (its default), data parallel: the
    # carries vary as the loop bodies do; the replicated sinks get their
    # cotangent summed over the shards.
    spec = P("d")
    mapped = jax.shard_map(
        functools.partial(vjp, with_sinks=True), mesh=mesh,
        in_specs=(spec, spec, spec, spec, P(), spec),
        out_specs=(spec, (spec, spec, spec, spec, P())),
    )  # fmt: skip
    got = jax.jit(mapped)(q, k, v, bias, sinks, ct)
    for g, w in zip(
        jax.tree.leaves(got), jax.tree.leaves(unsharded["batch"]), strict=True
    ):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    print("shard_map(check_vma=True) batch: equal to unsharded")

    kernels_split_by_xla(jax, jnp, np, NamedSharding, P, jsoftmax, collectives)
    # XLA's older propagation (GSPMD) asks the custom_partitioning its own
    # way (infer_sharding_from_operands, not a Shardy rule).
    jax.config.update("jax_use_shardy_partitioner", False)
    kernels_split_by_xla(jax, jnp, np, NamedSharding, P, jsoftmax, collectives)
    # GSPMD asks for the call's output shardings before q has one where q is
    # given unsplit beside split k and v (it aborted the process).
    q, k, v = jax.random.normal(jax.random.key(3), (3, 8, 32, 4, 16))
    split = [jax.device_put(x, NamedSharding(mesh, P("d"))) for x in (k, v)]

    def kernels(q, k, v):
        return jsoftmax.dot_product_attention(
            q, k, v, implementation="pallas", query_chunk_size=16, key_chunk_size=16
        )

    np.testing.assert_allclose(
        jax.jit(kernels)(q, *split), jax.jit(kernels)(q, k, v), rtol=1e-5, atol=1e-6
    )
    jax.config.update("jax_use_shardy_partitioner", True)
    print("kernels split by XLA (GSPMD): q unsplit beside split k and v")

    # Exported for an abstract mesh given in the arguments' types, on a host
    # of several devices: JAX lowers no program that needs devices there.
    auto = (jax.sharding.AxisType.Auto,)
    abstract = jax.sharding.AbstractMesh((8,), ("d",), axis_types=auto)
    on_it = NamedSharding(abstract, P("d"))
    typed = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=on_it)
    jax.export.export(jax.jit(kernels), platforms=("cpu",))(typed, typed, typed)
    print("kernels split by XLA: exported for an abstract mesh")

    # Each device's memory (compiled, deterministic): its batch shard's
    # gradients out, where a gathered call gave back all of them, as the
    # whole batch does on one device.
    whole = jnp.ones((8, 512, 8, 64), jnp.bfloat16)
    x = jax.device_put(whole, NamedSharding(mesh, P("d")))
    sizes = {}
    cases = [
        ("xla", "xla", x),
        ("pallas", "pallas", x),
        ("pallas-whole", "pallas", whole),
    ]
    for name, implementation, args in cases:

        def loss(q, k, v, implementation=implementation):
            out = jsoftmax.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )
            return jnp.sum(out.astype(jnp.float32))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        memory = grad.lower(args, args, args).compile().memory_analysis()
        sizes[name] = [
            round(size / 2**20, 2)
            for size in (memory.output_size_in_bytes, memory.temp_size_in_bytes)
        ]
    # The XLA path's output (an eighth of dq, dk and dv, and a few bytes of
    # its own), and no more temporaries.
    assert sizes["pallas"][0] == sizes["xla"][0] == sizes["pallas-whole"][0] / 8, sizes
    assert sizes["pallas"][1] <= sizes["xla"][1], sizes
    print(f"kernels split by XLA: per-device output and temporary MiB {sizes}")


def kernels_split_by_xla(jax, jnp, np, NamedSharding, P, jsoftmax, collectives):
    """The kernels (Pallas, interpreted here) under a jit that XLA splits by
    itself (arrays on an Auto mesh): XLA cannot split a Pallas call, which
    ran on every device over the whole gathered arrays; a
    custom_partitioning runs it on each device's shard. Values and
    gradients equal the unsharded XLA path's; no collective where the
    query's split holds the work, and only the all-reduce of a cotangent
    summed over shards (d sinks, a broadcast d bias, the one key/value
    head's dK and dV) where it does not."""
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=auto)
    t, ab, whole = 32, P(("a", "b")), None
    cases = [
        # name, B, N, K, q's spec, k/v's spec, bias shape and spec, sinks,
        # collectives allowed (None: any); lengths and segment ids in all
        ("batch", 8, 4, 4, ab, ab, None, None, False, set()),
        ("batch-heads", 4, 4, 4, P("a", None, "b"), P("a", None, "b"),
         None, None, False, set()),
        ("gqa-heads", 2, 8, 4, P(None, None, "b"), P(None, None, "b"),
         None, None, False, set()),
        ("gqa-kv-batch-only", 4, 8, 2, P("b", None, "a"), P("b"),
         None, None, False, set()),
        ("mqa-heads", 8, 8, 1, P("a", None, "b"), P("a"),
         None, None, False, {"all-reduce"}),
        ("bias-per-example", 8, 4, 4, ab, ab, (8, 1, t, t), ab, False, set()),
        ("bias-broadcast-sinks", 8, 4, 4, ab, ab, (1, 4, t, t), P(), True,
         {"all-reduce"}),
        # More shards of the query heads than key/value heads: heads whole.
        ("gqa-heads-gathered", 4, 8, 2, P("a", None, "b"), P("a"),
         None, None, False, whole),
        ("positions-gathered", 8, 4, 4, P(None, "b"), P(None, "b"),
         None, None, False, whole),
    ]  # fmt: skip
    for (
        name,
        b,
        n,
        kv,
        spec,
        kv_spec,
        bias_shape,
        bias_spec,
        with_sinks,
        allowed,
    ) in cases:
        keys = jax.random.split(jax.random.key(2), 5)
        q = jax.random.normal(keys[0], (b, t, n, 16))
        k = jax.random.normal(keys[1], (b, t, kv, 16))
        v = jax.random.normal(keys[2], (b, t, kv, 16))
        bias = None if bias_shape is None else jax.random.normal(keys[3], bias_shape)
        sinks = jax.random.normal(keys[4], (n,)) if with_sinks else None
        lengths = jnp.arange(b) % t + 3
        segments = jnp.broadcast_to(jnp.arange(t) // 10, (b, t))
        ct = jnp.cos(q)

        def vjp(q, k, v, bias, sinks, lengths, segments, ct, implementation):
            def attention(q, k, v, bias, sinks):
                return jsoftmax.dot_product_attention(
                    q, k, v, bias, is_causal=True, sinks=sinks,
                    key_value_seq_lengths=lengths, query_segment_ids=segments,
                    key_value_segment_ids=segments, query_chunk_size=16,
                    key_chunk_size=16, implementation=implementation,
                )  # fmt: skip

            out, pullback = jax.vjp(attention, q, k, v, bias, sinks)
            return out, pullback(ct)

        f = jax.jit(vjp, static_argnames="implementation")
        want = f(q, k, v, bias, sinks, lengths, segments, ct, implementation="xla")

        def put(x, s):
            return None if x is None else jax.device_put(x, NamedSharding(mesh, s))

        args = (
            put(q, spec), put(k, kv_spec), put(v, kv_spec), put(bias, bias_spec),
            put(sinks, P()), put(lengths, P(spec[0])), put(segments, P(spec[0])),
            put(ct, spec),
        )  # fmt: skip
        # No tracer of the lowering kept (in the custom_partitioning's rule);
        # checked once, as it retraces all it sees (6 s a case).
        leaks = jax.checking_leaks() if name == "batch" else contextlib.nullcontext()
        with leaks:
            text = f.lower(*args, implementation="pallas").compile().as_text()
        found = {
            c
            for line in text.splitlines()
            for c in collectives
            if f" {c}(" in line or f" {c}-start(" in line
        }
        assert allowed is None or found <= allowed, (name, found)
        out, grads = got = f(*args, implementation="pallas")
        if allowed is not None:
            for x in (out, grads[0]):
                assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), name
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
        shardy = jax.config.jax_use_shardy_partitioner
        print(
            f"kernels split by XLA ({'Shardy' if shardy else 'GSPMD'}), {name}: "
            f"collectives {sorted(found)}, equal"
        )


def options_in_the_cache_key():
    """Split by XLA, the kernels' options live in the custom_partitioning's
    Python callbacks, named in the program by ``id`` only. A persistent
    compilation cache told to drop that id from its key served a causal
    call the program compiled for a non-causal one (values off by 3); the
    program now holds a digest of the options. Run first in a fresh process:
    JAX sets its cache up once."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax

    with tempfile.TemporaryDirectory() as cache:
        return _options_in_the_cache_key(
            cache, jax, jnp, np, NamedSharding, P, jsoftmax
        )


def _options_in_the_cache_key(cache, jax, jnp, np, NamedSharding, P, jsoftmax):
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (8, 32, 4, 16)) for key in keys)
    split = [jax.device_put(x, NamedSharding(mesh, P("d"))) for x in (q, k, v)]
    for causal in (False, True):

        def attention(q, k, v, implementation, causal=causal):
            return jsoftmax.dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation,
                query_chunk_size=16, key_chunk_size=16,
            )  # fmt: skip

        f = jax.jit(attention, static_argnames="implementation")
        want = f(q, k, v, implementation="xla")
        got = f(*split, implementation="pallas")
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5 * jnp.abs(want).max()
        )
    print("kernels split by XLA: a persistent cache keyed without callback ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())

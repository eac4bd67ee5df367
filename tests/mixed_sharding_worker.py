"""Every op with its inputs split differently over an ``Explicit`` mesh.

Run as ``python tests/mixed_sharding_worker.py PART``, PART "xla" (softmax,
the losses and attention's XLA path) or "pallas" (the kernels, their CUDA
lowering and context parallelism), two halves of similar time that the tests
run side by side: it sets XLA_FLAGS for 4 host CPU devices before importing
jax (hence a separate process). On a 2 x 2 mesh, "data" x "model", each input
of each op is put on the shardings of a small set: replicated, its batch
split, its class (or head, or position) axis split, both. Every two inputs
meet in every pair of their shardings (where more than two inputs have a
choice, a covering of the pairs stands in for the whole product: a sharding
mismatch is between two operands). Plain JAX code runs with any such mix
(broadcasting gives the result the sharded operand's sharding); each op,
value and gradient under ``jit``, must equal the op on unsharded inputs, with

- softmax and log_softmax: a mask of the input's shape and a row mask;
- both per-example losses: labels and mask split apart from the logits;
- the fused loss: labels and token mask split over the batch, ``x`` not;
- attention: q, k, v, bias, mask, lengths, segment ids and sinks each split
  their own way (grouped-query too, unbatched, keys split), the XLA path, the
  Pallas kernels in interpret mode (run shard by shard in a ``shard_map``),
  a mesh of Explicit and Auto axes, a ``vmap`` over a split axis, and the
  kernels lowered for CUDA under such a split;
- context parallelism in a ``shard_map`` over the sequence's mesh axis, the
  batch split over the other, Explicit one.

It prints one JSON line, the number of checks and the failures, and exits
with status 1 if any check failed.
"""

import contextlib
import functools
import itertools
import json
import math
import re
import sys

from xla_flags import use_host_devices  # noqa: E402 (tests/, the script's)

use_host_devices(4)

import cuda_lowering  # noqa: E402 (tests/)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

PART = sys.argv[1]
IMPLS = {"xla": ("xla",), "pallas": ("pallas",)}[PART]  # attention's
VMAP_IMPLS = {"xla": (None,), "pallas": ("pallas",)}[PART]
RTOL = 1e-5  # of the largest entry of each compared array
MESH = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
rng = np.random.default_rng(0)
checks, failures = 0, []


def problem(got, want):
    """None if every leaf of ``got`` is within RTOL of the largest finite
    entry of ``want``'s and non-finite exactly where ``want``'s is (NaN for
    NaN, the same infinities), else what differs."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        finite = np.isfinite(w)
        if not np.array_equal(g[~finite], w[~finite], equal_nan=True) or not (
            np.isfinite(g[finite]).all()
        ):
            return "non-finite entries differ"
        g, w = g[finite], w[finite]
        scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
        worst = max(worst, float(np.max(np.abs(g - w), initial=0.0)) / scale)
    return None if worst <= RTOL else f"error {worst:.3g} of the largest entry"


def pairwise(options):
    """Combinations of one item of each list in ``options`` in which every two
    lists meet in every pair of their items: the whole product where at most
    two lists have more than one item, fewer beyond (greedy, the same every
    run: each combination covers the most pairs not yet covered)."""
    sizes = [len(o) for o in options]
    product = list(itertools.product(*map(range, sizes)))
    if len(options) < 2:
        return [tuple(o[i] for o, i in zip(options, c, strict=True)) for c in product]

    def pairs(c):
        return set(itertools.combinations(enumerate(c), 2))

    uncovered = set().union(*map(pairs, product))
    chosen = []
    while uncovered:
        best = max(product, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return [tuple(o[i] for o, i in zip(options, c, strict=True)) for c in chosen]


# It covers every pair, with the whole product for two lists and 16 of 64
# combinations for three lists of 4.
_three = [[0, 1, 2, 3]] * 3
_covering = pairwise(_three)
assert len(_covering) == 16
assert {(c[i], c[j]) for c in _covering for i, j in ((0, 1), (0, 2), (1, 2))} == {
    (a, b) for a in range(4) for b in range(4)
}
assert sorted(pairwise([[0, 1], [2, 3, 4]])) == sorted(
    itertools.product([0, 1], [2, 3, 4])
)
assert pairwise([[0, 1]]) == [(0,), (1,)]


def put(x, spec, mesh=MESH):
    return jax.device_put(x, NamedSharding(mesh, spec))


def typed(x, spec, mesh=MESH):
    """``x`` as :func:`put` splits it, typed for lowering for CUDA."""
    return cuda_lowering.typed(x, spec, mesh)


def check(name, f, args, argnums, options, mesh=MESH, in_context=True):
    """``f``'s output and the gradient of its weighted sum (``argnums``) with
    the inputs put on the ``pairwise`` combinations of ``options`` (one list
    of specs per input) equal them on the unsharded inputs; called inside
    ``jax.set_mesh`` (``in_context``) or outside it, the mesh known from the
    inputs alone."""

    def loss(*a):
        out = f(*a)
        cot = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return jnp.sum(out * cot), out

    run = jax.jit(jax.grad(loss, argnums, has_aux=True))
    want = run(*args)
    for specs in pairwise(options):
        context = jax.set_mesh(mesh) if in_context else contextlib.nullcontext()
        compare(
            f"{name} {tuple(tuple(s) for s in specs)}",
            lambda specs=specs: run(
                *(put(a, s, mesh) for a, s in zip(args, specs, strict=True))
            ),
            want,
            context,
        )


def compare(where, got_of, want, context):
    """One check: ``got_of()`` inside ``context`` equals ``want``; an
    exception is a failure, reported by its first line."""
    global checks
    checks += 1
    try:
        with context:
            got = got_of()
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
        first = str(e).strip().splitlines()[0][:160]
        failures.append(f"{where}: {type(e).__name__}: {first}")
        return
    if found := problem(got, want):
        failures.append(f"{where}: {found}")


# The check can fail: a gradient off by 1e-4 of its largest entry is caught,
# one off by 1e-7 is not.
_w = {"g": jnp.asarray([1.0, -2.0, 3.0])}
assert problem({"g": _w["g"].at[0].add(3e-4)}, _w) is not None
assert problem({"g": _w["g"].at[0].add(3e-7)}, _w) is None
assert problem({"g": _w["g"].at[1].set(jnp.nan)}, _w) is not None
assert problem({"g": _w["g"].at[1].set(jnp.inf)}, _w) is not None
_inf = {"g": _w["g"].at[2].set(-jnp.inf)}
assert problem(_inf, _inf) is None
assert problem({"g": _inf["g"].at[2].set(jnp.inf)}, _inf) is not None

# softmax, log_softmax and the per-example losses.
B, V, D = 4, 8, 6
ROWS = [P(), P("data"), P(None, "model"), P("data", "model")]
x = jnp.asarray(rng.normal(size=(B, V)), jnp.float32)
mask = jnp.asarray(rng.random((B, V)) < 0.7)
if PART == "xla":
    for op in (jsoftmax.softmax, jsoftmax.log_softmax):
        check(
            op.__name__,
            lambda x, m, op=op: jnp.where(m, op(x, where=m), 0),
            (x, mask), 0, [ROWS, ROWS],
        )  # fmt: skip
        check(
            f"{op.__name__} row mask",
            lambda x, m, op=op: jnp.where(m[:, None], op(x, where=m[:, None]), 0),
            (x, mask[:, 0]), 0, [ROWS, [P(), P("data")]],
        )  # fmt: skip
    # No label mass on masked classes (that loss is inf, by design).
    labels = jax.nn.softmax(
        jnp.asarray(rng.normal(size=(B, V)), jnp.float32), where=mask
    )
    check(
        "softmax_cross_entropy",
        lambda x, y, m: jsoftmax.softmax_cross_entropy(x, y, where=m),
        (x, labels, mask), (0, 1), [ROWS, ROWS, ROWS],
    )  # fmt: skip
    ids = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    check(
        "softmax_cross_entropy_with_integer_labels",
        lambda x, i, m: jsoftmax.softmax_cross_entropy_with_integer_labels(
            x, i, where=m
        ),
        # The class axis split without axis_name (it fails in optax too: a
        # gather whose output sharding JAX cannot infer) raised
        # ShardingTypeError.
        (x, ids, mask), 0, [ROWS, ROWS[:2], [P(), P("data", "model")]],
    )  # fmt: skip
    tokens = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    vocab_bias = jnp.asarray(rng.normal(size=(V,)), jnp.float32)

    # w split over its vocabulary (2 or 4 shards) or its features, and x over
    # its features, raised ShardingTypeError: a chunk of 3 columns sliced from
    # split ones, dx's dot contracting split columns, a token's carry sliced
    # from split features. Chunks of 3 and 8 (more than a shard's 4 columns).
    # Tokens and columns split over one mesh axis, and a bias split over
    # another than w's columns (which raise in x @ w + bias), are resharded.
    def fused(x, w, b, i, m, chunk):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, i, bias=b, where=m, reduction="none", chunk_size=chunk,
            label_smoothing=0.1, z_loss=1e-3, soft_cap=5.0,
        )  # fmt: skip

    for chunk in (3, 8):
        check(
            f"linear_softmax_cross_entropy chunk_size={chunk}",
            functools.partial(fused, chunk=chunk),
            (tokens, w, vocab_bias, ids, mask[:, 0]), (0, 1, 2),
            [ROWS, [P(), P(None, "model"), P("model"), P("data", "model")],
             [P(), P("model"), P("data")], [P(), P("data")], [P(), P("data")]],
        )  # fmt: skip
        check(
            f"linear_softmax_cross_entropy chunk_size={chunk} over 4 shards",
            functools.partial(fused, chunk=chunk),
            (tokens, w, vocab_bias, ids, mask[:, 0]), (0, 1, 2),
            [[P(), P(None, "model"), P("data"), P("model")],
             [P(None, ("data", "model"))], [P(), P(("data", "model"))],
             [P(), P("data")], [P()]],
        )  # fmt: skip
        check(
            f"linear_softmax_cross_entropy chunk_size={chunk}, tokens and "
            "columns over one axis",
            functools.partial(fused, chunk=chunk),
            (tokens, w, vocab_bias, ids, mask[:, 0]), (0, 1, 2),
            [[P("model"), P(("data", "model"))], [P(None, "model")],
             [P(), P("model")], [P(), P("model")], [P(), P("model")]],
        )  # fmt: skip

    # Per-example gradients with w's columns split: a vmap whose mapped axis
    # is split over "data" raised ShardingTypeError (the batched backward
    # wrote each chunk's columns of a per-example dw by a scatter that JAX
    # could not type on split columns); a user's shard_map over "data" around
    # the op (the op cannot nest its own there, and XLA gathers w's columns).
    def fused_one(x, w, b, i, m):
        return jnp.sum(jnp.cos(jnp.arange(B // 2)) * fused(x, w, b, i, m, chunk=3))

    pairs = (tokens.reshape(2, B // 2, D), w, vocab_bias, ids.reshape(2, -1),
             mask[:, 0].reshape(2, -1))  # fmt: skip
    grads = jax.grad(fused_one, (0, 1, 2))
    for spmd in ("data", None):
        per_example = jax.jit(
            jax.vmap(grads, in_axes=(0, None, None, 0, 0), spmd_axis_name=spmd)
        )
        compare(
            f"linear_softmax_cross_entropy per-example gradients, spmd {spmd}",
            lambda per_example=per_example: per_example(
                put(pairs[0], P("data")), put(w, P(None, "model")),
                put(vocab_bias, P("model")), *(put(a, P("data")) for a in pairs[3:]),
            ),
            jax.jit(jax.vmap(grads, in_axes=(0, None, None, 0, 0)))(*pairs),
            jax.set_mesh(MESH),
        )  # fmt: skip
    in_shard_map = jax.shard_map(
        lambda *a: jax.lax.psum(fused_one(*a), "data"),
        in_specs=(P("data"), P(), P(), P("data"), P("data")),
        out_specs=P(), axis_names={"data"},
    )  # fmt: skip

    def halves(x, w, b, i, m):
        cut = (slice(None, B // 2), slice(B // 2, None))
        return sum(fused_one(x[h], w, b, i[h], m[h]) for h in cut)

    compare(
        "linear_softmax_cross_entropy in a shard_map over the tokens",
        lambda: jax.jit(jax.value_and_grad(in_shard_map, (0, 1, 2)))(
            put(tokens, P("data")), put(w, P(None, "model")),
            put(vocab_bias, P("model")), put(ids, P("data")),
            put(mask[:, 0], P("data")),
        ),
        jax.jit(jax.value_and_grad(halves, (0, 1, 2)))(
            tokens, w, vocab_bias, ids, mask[:, 0]
        ),
        jax.set_mesh(MESH),
    )  # fmt: skip

    # Vocab parallel: the loss and its gradients with the tokens over "data"
    # and the columns over "model" compile to all-reduces of per-token
    # statistics, dx [B/2, D] and dw [D, V/2] (once, not per chunk), and
    # nothing else: left to XLA, the chunks' dots all-gathered w [D, V] (once
    # forward, once per chunk backward) and reduced each chunk's dw.
    checks += 1
    with jax.set_mesh(MESH):
        hlo = (
            jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fused(*a, 3)), (0, 1, 2)))
            .lower(put(tokens, P("data")), put(w, P(None, "model")),
                   put(vocab_bias, P("model")), put(ids, P("data")),
                   put(mask[:, 0], P("data")))
            .compile()
            .as_text()
        )  # fmt: skip
    moved = re.findall(
        r"= \(?([^=]*?)\)? (all-gather|all-to-all|collective-permute|reduce-scatter|"
        r"all-reduce)(?:-start)?\(",
        hlo,
    )
    shapes = {
        shape for types, kind in moved for shape in re.findall(r"\[([\d,]*)\]", types)
    }
    kinds = {kind for _, kind in moved}
    allowed = {f"{B // 2}", "", f"{B // 2},{D}", f"{D},{V // 2}", f"{V // 2}"}
    if kinds != {"all-reduce"} or not shapes <= allowed:
        failures.append(f"fused loss vocab parallel moves {kinds} of {shapes}")

    # Forward mode in the same layouts: the JVP and the Hessian-vector product
    # (jvp of the gradient) of x and w.
    def fused_forward(x, w, b, i, m):
        def total(x, w):
            return jnp.sum(jnp.cos(jnp.arange(B)) * fused(x, w, b, i, m, chunk=3))

        grad = jax.grad(total, (0, 1))
        return jax.jvp(total, (x, w), (x, w))[1], jax.jvp(grad, (x, w), (x, w))[1]

    forward = jax.jit(fused_forward)
    fused_args = (tokens, w, vocab_bias, ids, mask[:, 0])
    want = forward(*fused_args)
    for x_spec, w_spec in [
        (P("data"), P(None, "model")), (P(None, "model"), P("model")),
        (P(), P(None, ("data", "model"))),
    ]:  # fmt: skip
        compare(
            f"linear_softmax_cross_entropy forward mode {x_spec} {w_spec}",
            lambda x_spec=x_spec, w_spec=w_spec: forward(
                put(tokens, x_spec), put(w, w_spec), *fused_args[2:]
            ),
            want, jax.set_mesh(MESH),
        )  # fmt: skip

# Attention: every input split its own way.
B, T, N, K, H = 4, 32, 4, 2, 4
q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) for _ in range(2))
k_g, v_g = k[:, :, :K], v[:, :, :K]
bias = jnp.asarray(rng.normal(size=(B, N, T, T)), jnp.float32)
head_bias = bias[0]  # [N, T, S]
score_mask = jnp.asarray(rng.random((B, 1, T, T)) < 0.8)
lengths = jnp.asarray([3, 32, 17, 0], jnp.int32)
segments = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
QKV = [P(), P("data"), P(None, None, "model"), P(None, "model")]
KV = [P(), P("data"), P(None, None, "model")]


def attention(impl, fixed=None, named=()):
    def f(q, k, v, *extra):
        return jsoftmax.dot_product_attention(
            q, k, v, **dict(zip(named, extra, strict=True)), **(fixed or {}),
            implementation=impl, query_chunk_size=16, key_chunk_size=16,
        )  # fmt: skip

    return f


CAUSAL = dict(is_causal=True)
LENGTHS = ("query_seq_lengths", "key_value_seq_lengths")
SEGMENTS = ("query_segment_ids", "key_value_segment_ids")
# name: fixed options, named arrays, arrays after q, spec options, argnums,
# whether the kernels (in interpret mode, slower) run it too.
CASES = {
    "causal, bias": (CAUSAL, ("bias",), (k, v, bias),
                     [QKV, [P(), P("data")], [P()], [P(), P("data")]], 4, True),
    "lengths": ({}, LENGTHS, (k, v, lengths, lengths),
                [QKV, [P(), P("data")], [P()], [P(), P("data")], [P()]], 3, False),
    "segment ids": ({}, SEGMENTS, (k, v, segments, segments),
                    [QKV, [P(), P("data")], [P()], [P(), P("data")], [P()]], 3, False),
    "grouped-query, causal": (CAUSAL, (), (k_g, v_g), [QKV, KV, KV], 3, True),
    "mask": ({}, ("mask",), (k, v, score_mask),
             [[P(), P("data")], [P()], [P()],
              [P(), P("data"), P(None, None, "model"), P(None, None, None, "model")]],
             3, False),
    "head bias": ({}, ("bias",), (k, v, head_bias),
                  [[P(), P(None, None, "model")], [P()], [P()],
                   [P(), P("model"), P(None, "data")]], 4, True),
    "sinks": ({}, ("sinks",), (k, v, sinks),
              [[P(), P("data"), P(None, None, "model")], [P()], [P()],
               [P(), P("model")]], 4, True),
    "keys split": (CAUSAL, (), (k, v),
                   [[P(), P(None, "model")], [P(), P(None, "model"), P(None, "data")],
                    [P(), P(None, "model")]], 3, True),
}  # fmt: skip
for impl in IMPLS:
    for name, (fixed, named, rest, options, argc, kernels) in CASES.items():
        if impl == "pallas" and not kernels:
            continue
        f = attention(impl, fixed, named)
        check(f"attention {impl}: {name}", f, (q, *rest), tuple(range(argc)), options)
    seg = segments[0]
    check(
        f"attention {impl}: unbatched, segment ids",
        attention(impl, named=SEGMENTS), (q[0], k[0], v[0], seg, seg), (0, 1, 2),
        [[P(), P(None, "model")], [P(), P(None, "model")], [P()], [P(), P("data")],
         [P()]],
    )  # fmt: skip
    # A mesh of Explicit and Auto axes: the kernels' shard_map is partial.
    for kinds in (
        (AxisType.Explicit, AxisType.Auto),
        (AxisType.Auto, AxisType.Explicit),
    ):
        split = P("data", None, "model")
        check(
            f"attention {impl}: {kinds[0].name}/{kinds[1].name} mesh",
            attention(impl, CAUSAL, ("key_value_seq_lengths",)),
            (q, k_g, v_g, lengths), (0, 1, 2),
            [[split], [split], [split], [P("data")]],
            mesh=jax.make_mesh((2, 2), ("data", "model"), axis_types=kinds),
        )  # fmt: skip


# vmap over examples whose mapped axis is split over "data" (and nested
# vmaps over "data" and "model"): the kernels run on each shard's examples in
# a shard_map over those axes, since Pallas takes no operand typed on a mesh
# axis outside one (in interpret mode here under "pallas"; the XLA path on the
# CPU under None).
def per_example(impl):
    def one(q, k, v, length):
        return jsoftmax.dot_product_attention(
            q[None], k[None], v[None], is_causal=True,
            key_value_seq_lengths=length[None], implementation=impl,
        )[0]  # fmt: skip

    return jax.vmap(one)


def per_pair(impl):  # examples in [2, 2]
    return jax.vmap(per_example(impl))


pairs = tuple(a.reshape(2, 2, *a.shape[1:]) for a in (q, k_g, v_g, lengths))
for impl in VMAP_IMPLS:
    check(
        f"vmap over a split axis, {impl}",
        per_example(impl), (q, k_g, v_g, lengths), (0, 1, 2),
        [[P("data"), P("data", None, "model")], [P("data")], [P("data")],
         [P("data")]],
    )  # fmt: skip
    check(
        f"vmaps over two split axes, {impl}",
        per_pair(impl), pairs, (0, 1, 2), [[P("data", "model")]] * 4,
    )  # fmt: skip

# Lowered for CUDA from the CPU under such a split: the three kernels (the
# forward, dK/dV, dQ) under None and "pallas", each on its shard's part
# (the leading axes of its first operand: the batch, or the vmaps' axes).
TRITON = cuda_lowering.TRITON
if PART == "pallas":
    for name, f, args, specs, local in [
        ("batch and heads split, None", attention(None), (q, k_g, v_g),
         [P("data", None, "model"), P("data", None, "model"), P("data")], "2x32x2"),
        ("queries split, 'pallas'", attention("pallas"), (q, k_g, v_g),
         [P(None, "data"), P(), P()], "4x32x4"),
        ("vmap over a split axis, None", per_example(None), (q, k_g, v_g, lengths),
         [P("data")] * 4, "2x1x32x4"),
        ("vmaps over two split axes, 'pallas'", per_pair("pallas"), pairs,
         [P("data", "model")] * 4, "1x32x4"),  # one example, its axes merged
    ]:  # fmt: skip
        checks += 1
        try:
            exported = cuda_lowering.export(
                jax.grad(lambda *a, f=f: jnp.sum(f(*a)), (0, 1, 2)),
                *(typed(a, s) for a, s in zip(args, specs, strict=True)),
                mesh=MESH,
            )
        except Exception as e:  # noqa: BLE001 (reported, not hidden)
            first = str(e).strip().splitlines()[0][:160]
            failures.append(f"CUDA lowering, {name}: {type(e).__name__}: {first}")
            continue
        firsts = [
            re.search(r"\(tensor<([\dx]+)x\d+xf32>", line).group(1)
            for line in exported.mlir_module().splitlines()
            if TRITON in line
        ]
        if firsts != [local] * 3:
            failures.append(f"CUDA lowering, {name}: Triton calls' queries {firsts}")


# Outside jax.set_mesh, arrays put on an Explicit mesh (plain JAX code runs
# so under jit): the ops take the mesh from the inputs' types. Before, the
# attention kernels (and, with the key/value heads repeated or a vmap over a
# split axis, the XLA path) failed, and so did log_softmax with a row mask
# and the integer-label loss with labels split apart from the logits.
if PART == "xla":
    check(
        "outside set_mesh: log_softmax, row mask",
        lambda x, m: jnp.where(
            m[:, None], jsoftmax.log_softmax(x, where=m[:, None]), 0
        ),
        (x, mask[:, 0]), 0, [[P(None, "model")], [P("data")]], in_context=False,
    )  # fmt: skip
    check(
        "outside set_mesh: integer labels",
        jsoftmax.softmax_cross_entropy_with_integer_labels,
        (x, ids), 0, [[P()], [P("data")]], in_context=False,
    )  # fmt: skip
for impl in IMPLS:
    check(
        f"outside set_mesh: attention {impl}, grouped-query",
        attention(impl, CAUSAL), (q, k_g, v_g), (0, 1, 2),
        [[P("data", None, "model")], [P(), P("data")], [P()]], in_context=False,
    )  # fmt: skip
    check(
        f"outside set_mesh: vmap over a split axis, {impl}",
        per_example(impl), (q, k_g, v_g, lengths), (0, 1, 2),
        [[P("data")], [P("data")], [P("data")], [P("data")]], in_context=False,
    )  # fmt: skip
if PART == "pallas":
    checks += 1
    try:
        found = (
            cuda_lowering.export(
                jax.grad(lambda *a: jnp.sum(attention(None)(*a)), (0, 1, 2)),
                typed(q, P("data", None, "model")),
                typed(k_g, P("data")),
                typed(v_g, P("data")),
                mesh=MESH,
            )
            .mlir_module()
            .count(TRITON)
        )
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
        found = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    if found != 3:
        failures.append(f"CUDA lowering outside set_mesh: {found}, want 3 Triton calls")


# The query heads over 4 shards, more than the key/value heads divide into
# (tensor parallelism past them): 4 query heads over 2 key/value heads (one
# group per shard) and 12 over 3 (a shard's 3 query heads span two groups).
# Output and gradient equal the unsharded op's, and each shard computes its
# own query heads only: the kernels lowered for CUDA take N / 4 query heads
# and as many key/value heads, and the XLA path's largest product per device
# is the batch's N / 4 heads' 16 x 16 blocks of scores. Before, the kernels
# took all N query heads on each shard, and the XLA path all 4 of the first
# case's.
HEADS_MESH = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Explicit,))
q12 = jnp.asarray(rng.normal(size=(2, T, 12, H)), jnp.float32)
k3, v3 = (jnp.asarray(rng.normal(size=(2, T, 3, H)), jnp.float32) for _ in range(2))
heads_split = P(None, None, "model")
for impl in IMPLS:
    # k and v also with their batch split over the heads' axis: gathered.
    for name, args, kv in [
        ("4 query, 2 key/value heads", (q, k_g, v_g), [P(), P("model")]),
        ("12 query, 3 key/value heads", (q12, k3, v3), [P()]),
    ]:  # fmt: skip
        check(
            f"attention {impl}: {name}, query heads over 4 shards",
            attention(impl, CAUSAL), args, (0, 1, 2), [[heads_split], kv, kv],
            mesh=HEADS_MESH,
        )  # fmt: skip
if PART == "pallas":
    for args in ((q, k_g, v_g), (q12, k3, v3)):
        checks += 2
        local = args[0].shape[2] // 4
        with jax.set_mesh(HEADS_MESH):
            split = [put(args[0], heads_split, HEADS_MESH)] + [
                put(a, P(), HEADS_MESH) for a in args[1:]
            ]
            grad = jax.jit(
                jax.grad(lambda *a: jnp.sum(attention(None, CAUSAL)(*a)), (0, 1, 2))
            )
            module = cuda_lowering.export(
                grad,
                typed(args[0], heads_split, HEADS_MESH),
                *(typed(a, P(), HEADS_MESH) for a in args[1:]),
                mesh=HEADS_MESH,
            ).mlir_module()
            operands = [
                re.findall(r"tensor<(\d+)x(\d+)x(\d+)x", line)[:3]
                for line in module.splitlines()
                if TRITON in line
            ]
            heads = {tuple(int(shape[2]) for shape in qkv) for qkv in operands}
            xla_grad = jax.jit(
                jax.grad(lambda *a: jnp.sum(attention("xla", CAUSAL)(*a)), (0, 1, 2))
            )
            hlo = xla_grad.lower(*split).compile().as_text()
        products = re.findall(r"= f32\[([\d,]*)\][^ ]* dot\(", hlo)
        largest = max(math.prod(map(int, dims.split(","))) for dims in products)
        if len(operands) != 3 or heads != {(local, local, local)}:
            failures.append(f"kernels' query and key/value heads per shard {heads}")
        if largest != args[0].shape[0] * local * 16 * 16:  # batch, heads, 16 x 16
            failures.append(f"XLA path's largest product per device: {largest} entries")


# Context parallelism in a shard_map over "seq" alone, the batch split over
# "data", Explicit, outside it: the pairs' kernels run shard by shard over
# "data" (6 Triton calls in the lowered gradient, as on an Auto mesh, where
# none of this is needed); output and gradient equal the one-device op's.
def context_parallel(q, impl=None):
    def body(q):
        return jsoftmax.dot_product_attention(
            q, q, q, is_causal=True, axis_name="seq", implementation=impl
        )

    return jax.shard_map(
        body, in_specs=P(None, "seq"), out_specs=P(None, "seq"), axis_names={"seq"}
    )(q)


seq_mesh = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
q_long = jnp.asarray(rng.normal(size=(4, 64, 4, 16)), jnp.float32)
weights_cp = jnp.cos(jnp.arange(16.0))[None, None, None]  # over H


def output_and_grad(f):
    return jax.jit(lambda q: (f(q), jax.grad(lambda q: jnp.sum(f(q) * weights_cp))(q)))


if PART == "pallas":
    want_cp = output_and_grad(
        lambda q: jsoftmax.dot_product_attention(q, q, q, is_causal=True)
    )(q_long)
    checks += 3
    with jax.set_mesh(seq_mesh):
        split_q = put(q_long, P("data", "seq"), seq_mesh)
        got_cp = output_and_grad(context_parallel)(split_q)
    # Under None and "pallas" (whose kernels' outputs must vary over "seq", as
    # the XLA twin's do, though the inner shard_map types them invariant).
    for impl in (None, "pallas"):
        try:
            exported = cuda_lowering.export(
                jax.grad(lambda q, impl=impl: jnp.sum(context_parallel(q, impl))),
                typed(q_long, P("data", "seq"), seq_mesh),
                mesh=seq_mesh,
            )
            found = exported.mlir_module().count(TRITON)
        except Exception as e:  # noqa: BLE001 (reported, not hidden)
            found = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        if found != 6:
            failures.append(f"CUDA lowering, context parallel, {impl}: {found}, want 6")
    if found_cp := problem(got_cp, want_cp):
        failures.append(f"context parallel against one device: {found_cp}")

print(json.dumps({"checks": checks, "failures": failures}))
sys.exit(1 if failures else 0)

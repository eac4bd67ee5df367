"""Checks the ops over a class axis sharded across N host devices.

Run as ``python tests/sharded_worker.py N``: it sets XLA_FLAGS for N CPU
devices before importing jax (which is why it is a separate process), asserts
that every sharded op equals the unsharded op (values and gradients), and
prints one JSON line with the collective counts it found in the compiled HLO.
"""

import json
import re
import sys

N = int(sys.argv[1])
from xla_flags import use_host_devices  # noqa: E402 (tests/, the script's)

use_host_devices(N)

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

mesh = jax.make_mesh((N,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
B, V = 4, 24  # 24 classes: 12, 6 or 3 per shard
keys = jax.random.split(jax.random.key(N), 6)
x = 3.0 * jax.random.normal(keys[0], (B, V))
weights = jax.random.normal(keys[1], (B, V))
where = (jnp.arange(V) % 5 != 3)[None, :].repeat(B, 0)
probs = jax.nn.softmax(jax.random.normal(keys[2], (B, V)))
ids = jax.random.randint(keys[3], (B,), 0, V)
ids = jnp.where(where[0][ids], ids, 0)
TOL = dict(atol=2e-6, rtol=2e-5)


def sharded(f, in_specs, out_specs, check_vma=True):
    return jax.jit(
        jax.shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
        )
    )


def count_collectives(fn, *args):
    text = fn.lower(*args).compile().as_text()
    return {
        "all-reduce": text.count(" all-reduce("),
        "all-reduce-start": text.count(" all-reduce-start("),
        # The operand shapes, e.g. "f32[12]" or "(f32[4], f32[4])".
        "shapes": re.findall(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", text),
    }


report = {}

# softmax and log_softmax, with and without a mask.
for name in ("softmax", "log_softmax"):
    op = getattr(jsoftmax, name)
    for mask in (None, where):

        def loss(x, w, m, op=op, sharded_axis=None):
            y = op(x, where=m, axis_name=sharded_axis)
            y = jnp.where(m, y, 0.0) if m is not None else y
            return jnp.sum(jnp.sin(y) * w)

        spec = P(None, "v")
        m_spec = None if mask is None else spec
        fwd = sharded(
            lambda x, m, op=op: op(x, where=m, axis_name="v"), (spec, m_spec), spec
        )
        chex.assert_trees_all_close(fwd(x, mask), op(x, where=mask), **TOL)
        # The summed loss: each shard sums its columns, then one psum.
        grad = sharded(
            jax.grad(
                lambda x, w, m: jax.lax.psum(loss(x, w, m, sharded_axis="v"), "v")
            ),
            (spec, spec, m_spec),
            spec,
        )
        want = jax.grad(loss)(x, weights, mask)
        chex.assert_trees_all_close(grad(x, weights, mask), want, **TOL)
        if mask is None:
            report[f"{name}/fwd"] = count_collectives(fwd, x, None)
            vjp = sharded(
                lambda x, g, op=op: jax.vjp(lambda x: op(x, axis_name="v"), x)[1](g)[0],
                (spec, spec),
                spec,
            )
            chex.assert_trees_all_close(
                vjp(x, weights), jax.vjp(op, x)[1](weights)[0], **TOL
            )
            report[f"{name}/fwd+bwd"] = count_collectives(vjp, x, weights)

# Special rows, split over the shards: no valid entry (gradient 0), one finite
# entry held by one shard only, and NaN or +inf (NaN throughout, gradients too).
special = jnp.full((4, V), -jnp.inf)
special = special.at[1, V - 1].set(2.0)
special = special.at[2].set(x[2]).at[2, 1].set(jnp.nan)
special = special.at[3].set(x[3]).at[3, V - 2].set(jnp.inf)
for name in ("softmax", "log_softmax"):
    op = getattr(jsoftmax, name)
    spec = P(None, "v")
    got = sharded(
        lambda x, g, op=op: jax.vjp(lambda x: op(x, axis_name="v"), x)[1](g)[0],
        (spec, spec),
        spec,
    )(special, weights)
    want = jax.vjp(op, special)[1](weights)[0]
    np.testing.assert_allclose(got, want, equal_nan=True, **TOL)
    assert not np.any(got[0]) and np.all(np.isnan(got[2:]))

# Per-example losses: logits split over classes, loss replicated.
opts = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=4.0)
# Labels on masked classes (3, 8, 13, 18, 23, on every shard): the losses are
# +inf with finite gradients, sharded as not. Row 0's probability labels are
# one-hot on class 23, as its integer label.
off_ids = jnp.array([23, 3, 8, 13])
off_probs = probs.at[0].set(jax.nn.one_hot(23, V))
cases = (
    ({}, probs, ids),
    (opts, probs, ids),
    (dict(opts, where=where), jnp.where(where, probs, 0.0), ids),
    (dict(opts, where=where), off_probs, off_ids),
)
for kw, qs, ys in cases:
    spec = P(None, "v")
    m = kw.get("where")
    rest = {k: v for k, v in kw.items() if k != "where"}

    def ce(z, q, m, sharded_axis=None, rest=rest):
        return jsoftmax.softmax_cross_entropy(
            z, q, where=m, axis_name=sharded_axis, **rest
        )

    def int_ce(z, y, m, sharded_axis=None, rest=rest):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, y, where=m, axis_name=sharded_axis, **rest
        )

    m_spec = None if m is None else spec
    f = sharded(lambda z, q, m: ce(z, q, m, "v"), (spec, spec, m_spec), P())
    chex.assert_trees_all_close(f(x, qs, m), ce(x, qs, m), **TOL)
    g = sharded(
        jax.grad(
            lambda z, q, m: jnp.sum(ce(z, q, m, "v") * jnp.arange(1.0, B + 1)), (0, 1)
        ),
        (spec, spec, m_spec),
        (spec, spec),
    )
    want = jax.grad(
        lambda z, q, m: jnp.sum(ce(z, q, m) * jnp.arange(1.0, B + 1)), (0, 1)
    )
    chex.assert_trees_all_close(g(x, qs, m), want(x, qs, m), **TOL)

    f = sharded(lambda z, y, m: int_ce(z, y, m, "v"), (spec, P(), m_spec), P())
    chex.assert_trees_all_close(f(x, ys, m), int_ce(x, ys, m), **TOL)
    g = sharded(
        jax.grad(lambda z, y, m: jnp.sum(int_ce(z, y, m, "v"))),
        (spec, P(), m_spec),
        spec,
    )
    chex.assert_trees_all_close(
        g(x, ys, m), jax.grad(lambda z, m, y=ys: jnp.sum(int_ce(z, y, m)))(x, m), **TOL
    )
    if ys is off_ids:
        assert np.all(np.isposinf(f(x, ys, m))), f(x, ys, m)
        assert np.all(np.isfinite(g(x, ys, m)))
        q_loss = sharded(lambda z, q, m: ce(z, q, m, "v"), (spec, spec, spec), P())
        assert np.all(np.isposinf(q_loss(x, qs, m))), q_loss(x, qs, m)
        q_grad = sharded(
            jax.grad(lambda z, q, m: ce(z, q, m, "v")[0]), (spec, spec, spec), spec
        )
        chex.assert_trees_all_close(q_grad(x, qs, m)[0], g(x, ys, m)[0], **TOL)
    if not kw:
        chex.assert_trees_all_close(
            f(x, ys, None),
            optax.softmax_cross_entropy_with_integer_labels(x, ys),
            **TOL,
        )
        report["ce_integer/fwd"] = count_collectives(f, x, ys, None)
        report["ce_integer/fwd+bwd"] = count_collectives(g, x, ys, None)
        # Without variation tracking (check_vma=False, pmap, vmap) the backward
        # pass sums the loss cotangent over the shards: here one that differs
        # from shard to shard (XLA drops the all-reduce of one it can prove
        # replicated). Values and gradients in every mode are checked by
        # tests/sharding_modes_worker.py.
        f = sharded(
            lambda z, y: int_ce(z, y, None, "v"), (spec, P()), P(), check_vma=False
        )
        g = sharded(
            jax.grad(lambda z, y, c: jnp.sum(int_ce(z, y, None, "v") * c)),
            (spec, P(), P("v")), spec, check_vma=False,
        )  # fmt: skip
        c = jnp.arange(1.0, N * B + 1)
        report["ce_integer/no-vma fwd"] = count_collectives(f, x, ys)
        report["ce_integer/no-vma fwd+bwd"] = count_collectives(g, x, ys, c)

# Fused linear loss: w and bias split over vocab columns, x replicated.
D, VL = 8, 40  # 40 columns: 20, 10 or 5 per shard, walked in chunks of 3
x2 = jax.random.normal(keys[4], (B * 3, D))
w2 = jax.random.normal(keys[5], (D, VL))
b2 = jnp.linspace(-1.0, 1.0, VL)
y2 = jax.random.randint(keys[3], (B * 3,), 0, VL)
tok = jnp.arange(B * 3) % 4 != 1
for kw in ({}, dict(opts, where=tok)):

    def lin(x, w, b, sharded_axis=None, kw=kw):
        return jsoftmax.linear_softmax_cross_entropy(
            x, w, y2, bias=b, chunk_size=3, axis_name=sharded_axis, **kw
        )

    in_specs = (P(), P(None, "v"), P("v"))
    f = sharded(lambda x, w, b: lin(x, w, b, "v"), in_specs, P())
    chex.assert_trees_all_close(f(x2, w2, b2), lin(x2, w2, b2), **TOL)
    g = sharded(
        jax.grad(lambda x, w, b: lin(x, w, b, "v"), (0, 1, 2)), in_specs, in_specs
    )
    chex.assert_trees_all_close(
        g(x2, w2, b2), jax.grad(lin, (0, 1, 2))(x2, w2, b2), **TOL
    )
    if not kw:
        want = optax.softmax_cross_entropy_with_integer_labels(
            x2 @ w2 + b2[None], y2
        ).mean()
        chex.assert_trees_all_close(f(x2, w2, b2), want, **TOL)
        report["linear/fwd"] = count_collectives(f, x2, w2, b2)
        report["linear/fwd+bwd"] = count_collectives(g, x2, w2, b2)

        # Without variation tracking, the gradient taken inside the shard_map
        # (each shard's dx is its part; JAX sums them for a gradient outside).
        def lin_none(x, w, b, c):
            return jnp.sum(
                jsoftmax.linear_softmax_cross_entropy(
                    x, w, y2, bias=b, chunk_size=3, axis_name="v", reduction="none"
                )
                * c
            )

        g = sharded(
            jax.grad(lin_none, (0, 1, 2)), (*in_specs, P("v")),
            (P("v"), P(None, "v"), P("v")), check_vma=False,
        )  # fmt: skip
        c = jnp.arange(1.0, N * B * 3 + 1)
        report["linear/no-vma fwd+bwd"] = count_collectives(g, x2, w2, b2, c)

# Forward mode inside shard_map: each op's jvp (the tangent map is its
# backward pass, collectives included, or that pass transposed) equals the
# unsharded op's, and so does a jvp-of-grad HVP. One compiled program per op.
spec = P(None, "v")
tx = jax.random.normal(keys[5], (B, V))
for name in ("softmax", "log_softmax"):
    op = getattr(jsoftmax, name)
    jvp = sharded(
        lambda x, t, op=op: jax.jvp(lambda x: op(x, axis_name="v"), (x,), (t,))[1],
        (spec, spec),
        spec,
    )
    chex.assert_trees_all_close(jvp(x, tx), jax.jvp(op, (x,), (tx,))[1], **TOL)


def _hvp(x, t, sharded_axis=None):
    def loss(x):
        y = jsoftmax.log_softmax(x, axis_name=sharded_axis)
        s = jnp.sum(jnp.sin(y) * weights_local(x, sharded_axis))
        return s if sharded_axis is None else jax.lax.psum(s, sharded_axis)

    return jax.jvp(jax.grad(loss), (x,), (t,))[1]


def weights_local(x, sharded_axis):
    if sharded_axis is None:
        return weights
    i = jax.lax.axis_index(sharded_axis) * x.shape[1]
    return jax.lax.dynamic_slice_in_dim(weights, i, x.shape[1], axis=1)


hvp = sharded(lambda x, t: _hvp(x, t, "v"), (spec, spec), spec)
chex.assert_trees_all_close(hvp(x, tx), _hvp(x, tx), **TOL)
tq = jax.random.normal(keys[4], (B, V))
ce_jvp = sharded(
    lambda z, q, tz, tq, m: jax.jvp(
        lambda z, q: jsoftmax.softmax_cross_entropy(
            z, q, where=m, axis_name="v", **opts
        ),
        (z, q),
        (tz, tq),
    )[1],
    (spec, spec, spec, spec, spec),
    P(),
)
want = jax.jvp(
    lambda z, q: jsoftmax.softmax_cross_entropy(z, q, where=where, **opts),
    (x, probs),
    (tx, tq),
)[1]
chex.assert_trees_all_close(ce_jvp(x, probs, tx, tq, where), want, **TOL)
int_jvp = sharded(
    lambda z, y, tz: jax.jvp(
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, y, axis_name="v", **opts
        ),
        (z,),
        (tz,),
    )[1],
    (spec, P(), spec),
    P(),
)
want = jax.jvp(
    lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(z, ids, **opts),
    (x,),
    (tx,),
)[1]
chex.assert_trees_all_close(int_jvp(x, ids, tx), want, **TOL)
lin_specs = (P(), P(None, "v"), P("v"))
t_lin = (x2, jnp.cos(w2), jnp.sin(b2))


def lin_jvp(x, w, b, tx, tw, tb, sharded_axis=None):
    return jax.jvp(
        lambda x, w, b: jsoftmax.linear_softmax_cross_entropy(
            x, w, y2, bias=b, chunk_size=3, axis_name=sharded_axis, **opts
        ),
        (x, w, b),
        (tx, tw, tb),
    )[1]


got = sharded(lambda *a: lin_jvp(*a, sharded_axis="v"), lin_specs * 2, P())(
    x2, w2, b2, *t_lin
)
chex.assert_trees_all_close(got, lin_jvp(x2, w2, b2, *t_lin), **TOL)

# Batch-sharded inputs under plain jit (no shard_map) just work and stay sharded.
batch = NamedSharding(mesh, P("v"))
xb = jax.device_put(jnp.tile(x, (2 * N, 1)), batch)
yb = jax.jit(jsoftmax.softmax)(xb)
assert yb.sharding.is_equivalent_to(batch, 2), yb.sharding
chex.assert_trees_all_close(yb, jsoftmax.softmax(jnp.tile(x, (2 * N, 1))), **TOL)
gb = jax.jit(jax.grad(lambda x: jnp.sum(jsoftmax.log_softmax(x) ** 2)))(xb)
assert gb.sharding.is_equivalent_to(batch, 2), gb.sharding

print(json.dumps(report))

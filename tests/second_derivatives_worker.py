"""Second derivatives of every op with ``axis_name``, the class axis split
across N host devices, against the unsharded op.

Run as ``python tests/second_derivatives_worker.py N``: it sets XLA_FLAGS for
N CPU devices before importing jax (hence a separate process, as for
tests/sharded_worker.py). For softmax, log_softmax, both per-example losses
and the fused linear loss it takes ``jax.hessian`` (jacfwd of jacrev),
jvp of grad and ``jacrev(jacrev)`` in x (the logits), and for the fused loss
also in w, with ``shard_map(check_vma=True)`` and ``check_vma=False``, around
the ``shard_map`` (of the global function) and inside its body, and asserts
that each equals what the unsharded op's derivative says it must be. It
prints one JSON line with the number of checks.

Each case is a per-shard objective whose sum over the shards is the unsharded
objective: softmax's outputs are split, so each shard sums its own columns;
the losses are the same on every shard, so each shard weighs them by a share
that differs from shard to shard and sums to 1 (then the shards' cotangents
differ, too).
"""

import json
import sys

N = int(sys.argv[1])
from xla_flags import use_host_devices  # noqa: E402 (tests/, the script's)

use_host_devices(N)

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")

mesh = jax.make_mesh((N,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
TOL = dict(atol=2e-6, rtol=2e-5)
OPTS = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=4.0)
keys = jax.random.split(jax.random.key(N), 6)
# Per-example ops: 8 classes, 4 or 2 per shard. Fused loss: 20 columns, 10 or
# 5 per shard, walked in chunks of 3 (full chunks and a partial one).
B, V = 3, 8
x = 3.0 * jax.random.normal(keys[0], (B, V))
weights = jax.random.normal(keys[1], (B, V))
probs = jax.nn.softmax(jax.random.normal(keys[2], (B, V)))
ids = jnp.array([0, V // 2 + 1, V - 1])  # held by the first and last shards
T, D, VL = 4, 3, 20
xl = jax.random.normal(keys[3], (T, D))
wl = jax.random.normal(keys[4], (D, VL))
bl = jnp.linspace(-1.0, 1.0, VL)
yl = jax.random.randint(keys[5], (T,), 0, VL)
row = jnp.arange(1.0, B + 1)
C = P(None, "v")  # split over classes


def share(ax):
    """1, 2, ..., N over the shards, normalised to sum to 1 (1 unsharded)."""
    if ax is None:
        return 1.0
    return (lax.axis_index(ax) + 1).astype(jnp.float32) / (N * (N + 1) / 2)


def local(a, ax, axis):
    """This shard's part of the global array ``a`` split along ``axis``."""
    if ax is None:
        return a
    size = a.shape[axis] // N
    return lax.dynamic_slice_in_dim(a, lax.axis_index(ax) * size, size, axis)


def softmax_case(name):
    op = getattr(jsoftmax, name)
    return lambda x, ax: jnp.sum(jnp.sin(op(x, axis_name=ax)) * local(weights, ax, 1))


def ce(z, q, ax):
    loss = jsoftmax.softmax_cross_entropy(z, q, axis_name=ax, **OPTS)
    return share(ax) * jnp.sum(loss * row)


def int_ce(z, ax):
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels(
        z, ids, axis_name=ax, **OPTS
    )
    return share(ax) * jnp.sum(loss * row)


def linear(x, w, b, ax):
    loss = jsoftmax.linear_softmax_cross_entropy(
        x, w, yl, bias=b, chunk_size=3, axis_name=ax, **OPTS
    )
    return share(ax) * loss


# name: (objective(*args, ax), global args, their specs, argnums checked)
CASES = {
    "softmax": (softmax_case("softmax"), (x,), (C,), (0,)),
    "log_softmax": (softmax_case("log_softmax"), (x,), (C,), (0,)),
    "softmax_cross_entropy": (ce, (x, probs), (C, C), (0,)),
    "softmax_cross_entropy_with_integer_labels": (int_ce, (x,), (C,), (0,)),
    # x replicated, w and bias split by columns.
    "linear_softmax_cross_entropy": (
        linear, (xl, wl, bl), (P(), C, P("v")), (0, 1)
    ),
}  # fmt: skip


def _tangent(arg):
    return jnp.cos(jnp.arange(arg.size, dtype=arg.dtype)).reshape(arg.shape)


def second_derivatives(f, a, args, t):
    """hessian, jvp of grad (tangent ``t``) and jacrev of jacrev of ``f`` in
    argument ``a``."""
    grad = jax.grad(f, a)

    def grad_at(v):
        return grad(*args[:a], v, *args[a + 1 :])

    return {
        "hessian": jax.hessian(f, a)(*args),
        "jvp(grad)": jax.jvp(grad_at, (args[a],), (t,))[1],
        "jacrev(jacrev)": jax.jacrev(grad, a)(*args),
    }


def unsharded():
    return {
        (name, a): second_derivatives(
            lambda *p, f=f: f(*p, None), a, args, _tangent(args[a])
        )
        for name, (f, args, specs, argnums) in CASES.items()
        for a in argnums
    }


def _split_dim(spec, ndim):
    return (tuple(spec) + (None,) * ndim).index("v")


def fold(h, spec, ndim, half):
    """What the shards see, stacked along the split axis, of the global
    Hessian ``h`` of an argument split by ``spec``, taken inside the
    ``shard_map``. There the basis vectors that ``jacfwd`` seeds (``half=1``,
    the input half of ``h``) or ``jacrev`` seeds (``half=0``, the output half)
    are the same on every shard, i.e. the global basis vector has a 1 in every
    shard's block: that half's blocks add up."""
    d = _split_dim(spec, ndim) + half * ndim
    return h.reshape(h.shape[:d] + (N, h.shape[d] // N) + h.shape[d + 1 :]).sum(d)


def sharded(check_vma, want):
    """Each case's derivatives around and inside the shard_map (``got``), and
    what the unsharded op's derivatives ``want`` say they must be."""
    got, expect = {}, {}
    for name, (f, args, specs, argnums) in CASES.items():
        outside = jax.shard_map(
            lambda *p, f=f: lax.psum(f(*p, "v"), "v"), mesh=mesh, in_specs=specs,
            out_specs=P(), check_vma=check_vma,
        )  # fmt: skip
        for a in argnums:
            w, spec, ndim = want[name, a], specs[a], args[a].ndim
            t = _tangent(args[a])
            for k, v in second_derivatives(outside, a, args, t).items():
                got[name, a, k, "outside"] = v
                expect[name, a, k, "outside"] = w[k]

            def inside(*p, f=f, a=a, spec=spec):
                *p, t = p  # this shard's part of the tangent
                out = second_derivatives(lambda *p: f(*p, "v"), a, p, t)
                if spec == P() and not check_vma:
                    # Without variation tracking a replicated argument is
                    # each shard's own: its derivatives are parts to sum.
                    out = lax.psum(out, "v")
                return out

            if spec == P():
                out_specs = dict.fromkeys(w, P())
                expect.update({(name, a, k, "inside"): w[k] for k in w})
            else:
                split = P(*(None,) * _split_dim(spec, ndim), "v")
                out_specs = {
                    "hessian": split,
                    "jvp(grad)": spec,
                    "jacrev(jacrev)": P(*(None,) * ndim, *split),
                }
                expect[name, a, "hessian", "inside"] = fold(w["hessian"], spec, ndim, 1)
                expect[name, a, "jvp(grad)", "inside"] = w["jvp(grad)"]
                expect[name, a, "jacrev(jacrev)", "inside"] = fold(
                    w["jacrev(jacrev)"], spec, ndim, 0
                )
            out = jax.shard_map(
                inside, mesh=mesh, in_specs=(*specs, spec), out_specs=out_specs,
                check_vma=check_vma,
            )(*args, t)  # fmt: skip
            got.update({(name, a, k, "inside"): v for k, v in out.items()})
    return got, expect


want = jax.jit(unsharded)()
checks = 0
for check_vma in (True, False):
    got, expect = jax.jit(lambda w, c=check_vma: sharded(c, w))(want)
    for key, value in expect.items():
        where = f"check_vma={check_vma}, {key}"
        chex.assert_trees_all_close(got[key], value, **TOL, custom_message=where)
        checks += 1

# The checks can fail: inside the shard_map, a split argument's Hessian is not
# the diagonal block of the global one (the other shards' blocks add in), and
# that block, a slightly wrong answer, is rejected.
key = ("linear_softmax_cross_entropy", 1, "hessian", "inside")
h = want[key[:2]]["hessian"].reshape(D, N, VL // N, D, N, VL // N)
diagonal = jnp.moveaxis(jnp.diagonal(h, axis1=1, axis2=4), -1, 1)
try:
    chex.assert_trees_all_close(got[key], diagonal.reshape(expect[key].shape), **TOL)
except AssertionError:
    pass
else:
    raise AssertionError("the diagonal block passed for the Hessian inside")
print(json.dumps({"checks": checks}))

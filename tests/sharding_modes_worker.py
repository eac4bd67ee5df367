"""Checks every op in every way JAX can split its class or batch axis.

Run as ``python tests/sharding_modes_worker.py``: it sets XLA_FLAGS for 4 host
CPU devices before importing jax (hence a separate process). The ground truth
in every mode is plain autodiff of the same loss written with ``jnp`` and
``lax.psum`` / ``lax.pmax``: each op, value and gradient, must equal it in

- ``shard_map`` with ``check_vma=True`` and ``check_vma=False``, the gradient
  taken inside the body and outside the ``shard_map``;
- ``pmap`` with the gradient outside, and ``vmap(axis_name=...)`` with the
  gradient inside and outside;
- with a cotangent that differs from shard to shard: inside, each shard's
  objective is weighted by its axis index plus one; outside ``pmap`` and
  ``vmap``, each device gets its own cotangent;
- data parallelism (``axis_name=None``): the batch split over a mesh axis, with
  some inputs replicated (``w``, ``bias``, probability labels, logits), in
  ``shard_map`` and under plain ``jit`` over an ``Explicit`` mesh (sharding in
  types);
- a 2 x 2 mesh, "data" x "vocab": the batch split over one axis and the
  classes over the other.

It prints one JSON line, the number of checks and the failures (mode, case,
what went wrong), and exits with status 1 if any check failed.
"""

import contextlib
import json
import sys
import time
from functools import partial

from xla_flags import use_host_devices  # noqa: E402 (tests/, the script's)

use_host_devices(4)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

N = 4
TOL = dict(atol=2e-5, rtol=2e-4)
OPTS = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=4.0)


# The reference: each loss written with jnp and lax collectives, differentiated
# by JAX itself. ``ax=None`` is the unsharded loss.


def _psum(x, ax):
    return x if ax is None else lax.psum(x, ax)


def _pmax(x, ax):
    return x if ax is None else lax.pmax(x, ax)


def _classes(z, ax):
    """Global class ids of this shard's columns of ``z``."""
    first = 0 if ax is None else lax.axis_index(ax) * z.shape[-1]
    return first + jnp.arange(z.shape[-1])


def _capped(logits, where, soft_cap):
    z = logits if soft_cap is None else soft_cap * jnp.tanh(logits / soft_cap)
    return z if where is None else jnp.where(where, z, -jnp.inf)


def _lse(z, ax):
    m = _pmax(lax.stop_gradient(jnp.max(z, -1)), ax)
    return m + jnp.log(_psum(jnp.sum(jnp.exp(z - m[:, None]), -1), ax))


def _valid(z, where, ax):
    valid = jnp.ones_like(z) if where is None else where
    return _psum(jnp.sum(valid, -1, dtype=z.dtype), ax)


def ref_softmax(x, where=None, axis_name=None, log=False):
    z = _capped(x, where, None)
    m = _pmax(lax.stop_gradient(jnp.max(z, -1, keepdims=True)), axis_name)
    e = jnp.exp(z - m)
    s = _psum(jnp.sum(e, -1, keepdims=True), axis_name)
    return z - m - jnp.log(s) if log else e / s


def ref_ce(
    logits, q, where=None, label_smoothing=0.0, z_loss=0.0, soft_cap=None,
    axis_name=None,
):  # fmt: skip
    z = _capped(logits, where, soft_cap)
    lse = _lse(z, axis_name)
    if label_smoothing:
        q = (1 - label_smoothing) * q + label_smoothing / _valid(z, where, axis_name)[
            :, None
        ]
    terms = q * (lse[:, None] - (z if where is None else jnp.where(where, z, 0)))
    terms = terms if where is None else jnp.where(where, terms, 0)
    return _psum(jnp.sum(terms, -1), axis_name) + z_loss * lse**2


def ref_int_ce(
    logits, ids, where=None, label_smoothing=0.0, z_loss=0.0, soft_cap=None,
    axis_name=None,
):  # fmt: skip
    z = _capped(logits, where, soft_cap)
    lse = _lse(z, axis_name)
    z = z if where is None else jnp.where(where, z, 0)
    target = ids[:, None] == _classes(z, axis_name)[None]
    loss = lse - (1 - label_smoothing) * _psum(
        jnp.sum(jnp.where(target, z, 0), -1), axis_name
    )
    if label_smoothing:
        z_sum = _psum(jnp.sum(z, -1), axis_name)
        loss = loss - label_smoothing * z_sum / _valid(z, where, axis_name)
    return loss + z_loss * lse**2


def ref_linear(
    x, w, ids, bias=None, where=None, reduction="mean", chunk_size=None,
    axis_name=None, **opts,
):  # fmt: skip
    del chunk_size
    loss = ref_int_ce(x @ w + bias[None], ids, axis_name=axis_name, **opts)
    if where is not None:
        loss = jnp.where(where, loss, 0)
    if reduction == "none":
        return loss
    count = loss.shape[0] if where is None else jnp.sum(where, dtype=loss.dtype)
    return jnp.sum(loss) / (count if reduction == "mean" else 1)


IMPLS = {
    "ours": dict(
        softmax=jsoftmax.softmax,
        log_softmax=jsoftmax.log_softmax,
        ce=jsoftmax.softmax_cross_entropy,
        int_ce=jsoftmax.softmax_cross_entropy_with_integer_labels,
        linear=jsoftmax.linear_softmax_cross_entropy,
    ),
    "ref": dict(
        softmax=ref_softmax,
        log_softmax=lambda x, **kw: ref_softmax(x, log=True, **kw),
        ce=ref_ce,
        int_ce=ref_int_ce,
        linear=ref_linear,
    ),
}


# The cases. Each is a function of this shard's arrays, called with the ops of
# one implementation and an axis name; its output is at least 1-d. Arguments
# are given globally, each with the PartitionSpec that splits it.


def softmax_case(op):
    def f(impl, axis_name, x, where=None):
        y = impl[op](x, where=where, axis_name=axis_name)
        return y if where is None else jnp.where(where, y, 0)

    return f


def ce_case(**opts):
    def f(impl, axis_name, logits, q, where=None):
        return impl["ce"](logits, q, where=where, axis_name=axis_name, **opts)

    return f


def int_ce_case(**opts):
    def f(impl, axis_name, logits, ids, where=None):
        return impl["int_ce"](logits, ids, where=where, axis_name=axis_name, **opts)

    return f


def linear_case(reduction, **opts):
    def f(impl, axis_name, x, w, bias, ids, where=None):
        out = impl["linear"](
            x, w, ids, bias=bias, where=where, reduction=reduction, chunk_size=4,
            axis_name=axis_name, **opts,
        )  # fmt: skip
        return jnp.atleast_1d(out)

    return f


rng = np.random.default_rng(0)


def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# Numpy data (no device work before the checks). Vocab parallelism: 4 classes
# per shard on 4 devices, 8 on the 2 x 2 mesh.
B, V = 4, 16
x = 3 * normal(B, V)
mask = np.tile(np.arange(V) % 5 != 3, (B, 1))
mask[1, :8] = False  # a row with all its valid classes on the last shards
probs = np.exp(normal(B, V))
probs /= probs.sum(1, keepdims=True)
valid_probs = np.where(mask, probs, 0)  # none on a masked class (+inf there)
ids = np.array([0, 9, 14, 6])  # valid classes under the mask
BL, D = 6, 5  # the fused loss: 4 columns per shard, 8 on the 2 x 2 mesh
xl, wl = normal(BL, D), normal(D, V)
bl = np.linspace(-1, 1, V, dtype=np.float32)
idl = rng.integers(0, V, BL)
tok = np.arange(BL) % 4 != 1
C, R = P(None, "v"), P()  # split over classes; replicated

# name: (case, global args, their specs, argnums to differentiate, output spec)
VOCAB_CASES = {}
for kw, tag in (({}, ""), (OPTS, "+options")):
    m = (mask,) if kw else ()
    for op in ("softmax", "log_softmax"):
        VOCAB_CASES[op + ("+where" if kw else "")] = (
            softmax_case(op), (x, *m), (C,) * (1 + len(m)), (0,), C
        )  # fmt: skip
    VOCAB_CASES["ce" + tag] = (
        ce_case(**kw), (x, valid_probs if kw else probs, *m),
        (C, C) + (C,) * len(m), (0, 1), R,
    )  # fmt: skip
    VOCAB_CASES["int_ce" + tag] = (
        int_ce_case(**kw), (x, ids, *m), (C, R) + (C,) * len(m), (0,), R
    )  # fmt: skip
    t = (tok,) if kw else ()
    VOCAB_CASES["linear" + tag] = (
        linear_case("mean" if kw else "none", **kw), (xl, wl, bl, idl, *t),
        (R, C, P("v"), R) + (R,) * len(t), (0, 1, 2), R,
    )  # fmt: skip

# The inputs split over the classes given replicated instead: every shard
# holds the same slice (the global input is it tiled), and its gradient is
# the sum of the shards'. Under shard_map(check_vma=True) the probability-
# label loss gave a quarter of it, and the integer-label and fused losses
# raised.
S = V // N  # classes per shard
# A mask slice that leaves every row a valid class, labels on valid classes.
mask_r = mask[:, 2 * S : 3 * S]
probs_r = np.where(mask_r, probs[:, :S], 0)
ids_r = np.array([1, 9, 14, 6])
REPLICATED_CASES = {
    "softmax": (softmax_case("softmax"), (x[:, :S],), (R,), (0,), R),
    "log_softmax": (softmax_case("log_softmax"), (x[:, :S],), (R,), (0,), R),
    "ce": (ce_case(), (x[:, :S], probs[:, :S]), (R, R), (0, 1), R),
    "ce, logits replicated": (ce_case(), (x[:, :S], probs), (R, C), (0, 1), R),
    "ce+options": (
        ce_case(**OPTS), (x[:, :S], probs_r, mask_r),
        (R, R, R), (0, 1), R,
    ),
    "int_ce": (int_ce_case(), (x[:, :S], ids_r), (R, R), (0,), R),
    "int_ce+options": (
        int_ce_case(**OPTS), (x[:, :S], ids_r, mask_r), (R, R, R), (0,), R
    ),
    "linear": (
        linear_case("none"), (xl, wl[:, :S], bl[:S], idl), (R, R, R, R),
        (0, 1, 2), R,
    ),
    "linear+options, w replicated": (
        linear_case("mean", **OPTS), (xl, wl[:, :S], bl, idl, tok),
        (R, R, P("v"), R, R), (0, 1, 2), R,
    ),
}  # fmt: skip

# Data parallelism: no axis_name; the batch split over "data" and some inputs
# replicated, so that their gradient must be summed over the batch shards.
Bd, Rd = P("data"), P()
maskd = rng.random((N * B, V)) < 0.8
maskd[:, 0] = True
DATA_CASES = {}
for op in ("softmax", "log_softmax"):  # x replicated, a mask per batch shard
    DATA_CASES[op] = (softmax_case(op), (x, maskd), (Rd, Bd), (0,), Bd)
for kw, tag in (({}, ""), (OPTS, "+options")):
    # Probability labels replicated.
    DATA_CASES["ce" + tag] = (
        ce_case(**kw), (np.tile(x, (N, 1)), probs), (Bd, Rd), (0, 1), Bd
    )  # fmt: skip
    # Logits replicated (a learned table, say), labels split.
    DATA_CASES["int_ce" + tag] = (
        int_ce_case(**kw), (x, rng.integers(0, V, N * B)), (Rd, Bd), (0,), Bd
    )  # fmt: skip
    # w and bias replicated.
    t = (np.arange(N * BL) % 4 != 1,) if kw else ()
    DATA_CASES["linear" + tag] = (
        linear_case("mean" if kw else "none", **kw),
        (normal(N * BL, D), wl, bl, rng.integers(0, V, N * BL), *t),
        (Bd, Rd, Rd, Bd) + (Bd,) * len(t), (0, 1, 2), Bd,
    )  # fmt: skip

# The same data parallelism under plain jit over an Explicit mesh: the cases
# there are global computations, so every batch-sized input is split.
xd = np.tile(x, (N, 1))
EXPLICIT_CASES = {
    op: (softmax_case(op), (xd, maskd), (Bd, Bd), (0,), Bd)
    for op in ("softmax", "log_softmax")
}
for kw, tag in (({}, ""), (OPTS, "+options")):
    EXPLICIT_CASES["ce" + tag] = (
        ce_case(**kw), (xd, np.tile(probs, (N, 1))), (Bd, Bd), (0, 1), Bd
    )  # fmt: skip
    EXPLICIT_CASES["int_ce" + tag] = (
        int_ce_case(**kw), (xd, rng.integers(0, V, N * B)), (Bd, Bd), (0,), Bd
    )  # fmt: skip
    EXPLICIT_CASES["linear" + tag] = DATA_CASES["linear" + tag]

# 2 x 2 mesh: the batch over "data", the classes over "vocab".
BV, CV = P("data", "vocab"), P(None, "vocab")
x2, mask2, ids2 = np.tile(x, (2, 1)), np.tile(mask, (2, 1)), np.tile(ids, 2)
MESH2_CASES = {}
for op in ("softmax", "log_softmax"):  # x replicated over "data"
    MESH2_CASES[op] = (softmax_case(op), (x, mask2), (CV, BV), (0,), BV)
for kw, tag in (({}, ""), (OPTS, "+options")):
    m = (mask2,) if kw else ()
    # Probability labels replicated over "data".
    MESH2_CASES["ce" + tag] = (
        ce_case(**kw), (x2, valid_probs if kw else probs, *m),
        (BV, CV) + (BV,) * len(m), (0, 1), Bd,
    )  # fmt: skip
    MESH2_CASES["int_ce" + tag] = (
        int_ce_case(**kw), (x2, ids2, *m), (BV, Bd) + (BV,) * len(m), (0,), Bd
    )  # fmt: skip
    # x split over "data", w and bias over "vocab".
    t = (np.tile(tok, 2),) if kw else ()
    MESH2_CASES["linear" + tag] = (
        linear_case("mean" if kw else "none", **kw),
        (np.tile(xl, (2, 1)), wl, bl, np.tile(idl, 2), *t),
        (Bd, CV, P("vocab"), Bd) + (Bd,) * len(t), (0, 1, 2), Bd,
    )  # fmt: skip


# The modes. ``mode(f, impl, axis_name, args, specs, argnums, out_spec)``
# returns a function of the global args that gives the output and the
# gradients of the sum of output times a random cotangent; the driver
# compiles all cases of one mode together.


def _cotangent(shape):
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def _weight(mesh):
    """1, 2, ... on the shards, so that each shard's cotangent differs."""
    index = 0
    for name in mesh.axis_names:
        index = index * mesh.shape[name] + lax.axis_index(name)
    return 1.0 + index


def _grad(f, argnums, cot, weight=1.0):
    """(f(*a), gradients of sum(f(*a) * cot) * weight), one forward pass."""

    def obj(*a):
        out = f(*a)
        return jnp.sum(out * cot) * weight, out

    def run(*a):
        grads, out = jax.grad(obj, argnums, has_aux=True)(*a)
        return out, grads

    return run


def shard_map_mode(mesh, check_vma, inside):
    def make(f, impl, axis_name, args, specs, argnums, out_spec):
        body = partial(f, impl, axis_name)
        sm = jax.shard_map(
            body, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=check_vma
        )
        cot = _cotangent(jax.eval_shape(sm, *args).shape)
        if not inside:
            return _grad(sm, argnums, cot)

        def inner(*a):
            *a, c = a
            out = _grad(body, argnums, c, _weight(mesh))(*a)
            return jax.tree.map(lambda t: t[None], out)  # each shard's own

        sm = jax.shard_map(
            inner, mesh=mesh, in_specs=(*specs, out_spec),
            out_specs=P(mesh.axis_names), check_vma=check_vma,
        )  # fmt: skip
        return lambda *a: sm(*a, cot)

    return make


def _split(a, spec):
    """Global array -> [N, ...] stack of its shards under ``spec`` (axis 'v')."""
    return jnp.stack(jnp.split(a, N, axis=list(spec).index("v")))


def mapped_mode(transform, inside):
    """``pmap`` or ``vmap`` with axis_name 'v' over the stacked shards."""

    def make(f, impl, axis_name, args, specs, argnums, out_spec):
        in_axes = tuple(None if s == R else 0 for s in specs)
        body = partial(f, impl, axis_name)

        def stack(a):  # the global args, each as its stack of shards
            return [
                x if s == R else _split(x, s) for x, s in zip(a, specs, strict=True)
            ]

        mapped = transform(body, axis_name="v", in_axes=in_axes)
        cot = _cotangent(jax.eval_shape(lambda *a: mapped(*stack(a)), *args).shape)
        if not inside:  # a different cotangent on each device
            return lambda *a: _grad(mapped, argnums, cot)(*stack(a))

        def inner(*a):
            *a, c = a
            return _grad(body, argnums, c, lax.axis_index("v") + 1.0)(*a)

        mapped = transform(inner, axis_name="v", in_axes=(*in_axes, 0))
        return lambda *a: mapped(*stack(a), cot)

    return make


def explicit_mode(mesh, replicated_outside=False):
    """Plain ``jit`` over a mesh whose axes are ``Explicit`` (sharding in
    types): every array's sharding is part of its type, so each op must give
    its intermediates and cotangents consistent shardings. With
    ``replicated_outside``, the replicated inputs keep no sharding (arrays
    made before ``jax.set_mesh``: parameters, NumPy constants), as plain JAX
    code takes them."""

    def make(f, impl, axis_name, args, specs, argnums, out_spec):
        body = partial(f, impl, axis_name)
        cot = _cotangent(jax.eval_shape(body, *args).shape)

        def run(*a):
            a = [
                x
                if replicated_outside and s == Rd
                else jax.sharding.reshard(x, NamedSharding(mesh, s))
                for x, s in zip(a, specs, strict=True)
            ]
            return _grad(body, argnums, cot)(*a)

        return run

    make.mesh = mesh  # jit runs in this mesh's context (see the driver)
    return make


def explicit_vmap_mode(mesh, how):
    """``vmap`` over the batch cut into N chunks (microbatches), the mapped
    axis split over an ``Explicit`` mesh axis, the replicated inputs
    broadcast (``in_axes=None``). ``how``: the gradient of the whole
    ("grad outside"), each chunk's own ("grad inside": per-example
    gradients), or in place of gradients the JVP along the inputs themselves
    ("jvp"). The ops' batching rules must shard what they create along the
    mapped axis (broadcast tangents, their outputs' types) as their batched
    inputs are."""

    def make(f, impl, axis_name, args, specs, argnums, out_spec):
        body = partial(f, impl, axis_name)
        in_axes = [0 if s == Bd else None for s in specs]

        def chunk(a, put):  # the global args, batch-sized ones as [N, B/N, ...]
            return [
                put(x.reshape(N, -1, *x.shape[1:]), Bd) if ax == 0 else put(x, Rd)
                for x, ax in zip(a, in_axes, strict=True)
            ]

        def put(x, spec):
            return jax.sharding.reshard(x, NamedSharding(mesh, spec))

        mapped = jax.vmap(body, in_axes=in_axes)
        shape = jax.eval_shape(mapped, *chunk(args, lambda x, _: x)).shape
        cot = _cotangent(shape)
        if how == "grad outside":
            return lambda *a: _grad(mapped, argnums, cot)(*chunk(a, put))
        if how == "jvp":

            def jvp(*a):
                a = chunk(a, put)

                def along(*d):
                    return mapped(*(d[argnums.index(i)] if i in argnums else x
                                    for i, x in enumerate(a)))  # fmt: skip

                primals = [a[i] for i in argnums]
                return jax.jvp(along, primals, primals)

            return jvp
        per_chunk = jax.vmap(
            lambda c, *a: _grad(body, argnums, c)(*a), in_axes=(0, *in_axes)
        )
        return lambda *a: per_chunk(put(cot, Bd), *chunk(a, put))

    make.mesh = mesh
    return make


mesh_v = jax.make_mesh((N,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
mesh_d = jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
mesh_2 = jax.make_mesh(
    (2, 2), ("data", "vocab"), axis_types=(jax.sharding.AxisType.Auto,) * 2
)


def shard_map_modes(mesh, check_vma=(True, False)):
    return {
        f"shard_map(check_vma={vma})/grad {'inside' if inside else 'outside'}": (
            shard_map_mode(mesh, vma, inside)
        )
        for vma in check_vma
        for inside in (False, True)
    }


SUITES = [
    # (suite, cases, axis_name passed to the ops, modes)
    (
        "vocab",
        VOCAB_CASES,
        "v",
        {
            **shard_map_modes(mesh_v),
            # pmap is shard_map(check_vma=False) underneath (JAX 0.10): the
            # gradient inside it is that mode's.
            "pmap/grad outside": mapped_mode(jax.pmap, False),
            "vmap/grad outside": mapped_mode(jax.vmap, False),
            "vmap/grad inside": mapped_mode(jax.vmap, True),
        },
    ),
    ("vocab, split inputs replicated", REPLICATED_CASES, "v", shard_map_modes(mesh_v)),
    # Without check_vma, data parallelism has nothing to get wrong: no op
    # communicates, and the user sums the replicated inputs' gradients.
    (
        "data",
        DATA_CASES,
        None,
        shard_map_modes(mesh_d, check_vma=(True,)),
    ),
    (
        "data",
        EXPLICIT_CASES,
        None,
        {
            "jit over an Explicit mesh": explicit_mode(
                jax.make_mesh(
                    (N,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
                )
            )
        },
    ),
    (
        "data",
        # The fused loss's w and bias, replicated beside a sharded x.
        {name: case for name, case in EXPLICIT_CASES.items() if "linear" in name},
        None,
        {
            "jit over an Explicit mesh, replicated inputs made outside it": (
                explicit_mode(
                    jax.make_mesh(
                        (N,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
                    ),
                    replicated_outside=True,
                )
            )
        },
    ),
    (
        "data",
        EXPLICIT_CASES,
        None,
        {
            f"vmap over an Explicit mesh axis/{how}": explicit_vmap_mode(
                jax.make_mesh(
                    (N,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
                ),
                how,
            )
            for how in ("grad outside", "grad inside", "jvp")
        },
    ),
    ("data x vocab", MESH2_CASES, "vocab", shard_map_modes(mesh_2)),
]


def _max_error(got, want):
    errors = jax.tree.map(
        lambda g, w: float(jnp.max(jnp.abs(jnp.asarray(g) - jnp.asarray(w)))),
        got,
        want,
    )
    return max(jax.tree.leaves(errors))


def _problem(got, want):
    try:
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), got, want)
        return None
    except AssertionError:
        return f"max error {_max_error(got, want):.3g}"


def run_all(mode, cases, impl, axis_name):
    """Every case of one mode, compiled together (much faster than apart)."""
    fns = {
        name: mode(f, IMPLS[impl], axis_name, args, specs, argnums, out_spec)
        for name, (f, args, specs, argnums, out_spec) in cases.items()
    }
    args = {name: case[1] for name, case in cases.items()}
    return jax.jit(lambda a: {name: fn(*a[name]) for name, fn in fns.items()})(args)


def compare(where, mode, cases, axis_name):
    want = run_all(mode, cases, "ref", axis_name)
    refs[where] = want
    try:
        got = run_all(mode, cases, "ours", axis_name)
    except Exception:  # noqa: BLE001 (each case again, to report which)
        got = {}
        for name, case in cases.items():
            try:
                got[name] = run_all(mode, {name: case}, "ours", axis_name)[name]
            except Exception as e:  # noqa: BLE001 (reported, not hidden)
                first = str(e).strip().splitlines()[0][:150]
                failures.append(f"{where}: {name}: {type(e).__name__}: {first}")
    for name in got:
        problem = _problem(got[name], want[name])
        if problem:
            failures.append(f"{where}: {name}: {problem}")


checks, failures, refs = 0, [], {}
for suite, cases, axis_name, modes in SUITES:
    for mode_name, mode in modes.items():
        checks += len(cases)
        t0 = time.perf_counter()
        mesh = getattr(mode, "mesh", None)
        with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
            compare(f"{suite}: {mode_name}", mode, cases, axis_name)
        print(f"{time.perf_counter() - t0:.1f}s {suite}: {mode_name}", file=sys.stderr)


# The reference itself against the unsharded ops, in one mode.
def unsharded(f, impl, axis_name, args, specs, argnums, out_spec):
    del axis_name, specs, out_spec
    body = partial(f, IMPLS["ours"], None)
    cot = _cotangent(jax.eval_shape(body, *args).shape)
    return lambda *a: (
        body(*a),
        jax.grad(lambda *a: jnp.sum(body(*a) * cot), argnums)(*a),
    )


checks += len(VOCAB_CASES)
want = refs["vocab: shard_map(check_vma=True)/grad outside"]
got = run_all(unsharded, VOCAB_CASES, "ours", None)
for name in VOCAB_CASES:
    problem = _problem(got[name], want[name])
    if problem:
        failures.append(f"reference vs unsharded op: {name}: {problem}")

print(json.dumps({"checks": checks, "failures": failures}))
sys.exit(1 if failures else 0)

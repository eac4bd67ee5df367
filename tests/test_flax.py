"""flax_attention_fn: flax's attention layers (nnx and linen, flax 0.12.8) give
the same outputs and parameter gradients with it as with flax's own
attention_fn, and what jsoftmax cannot do (dropout, sown weights, a matmul
precision, custom einsums) is refused by name."""

import functools

import cuda_lowering
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jsoftmax

flax = pytest.importorskip("flax")
nn = pytest.importorskip("flax.linen")
from flax import nnx  # noqa: E402
from flax.nnx.nn.dtypes import promote_dtype as promote  # noqa: E402

T, S, F, N = 6, 5, 8, 2
# float32, relative to the largest entry of the reference (as in
# tests/test_attention.py): the layers add two projections around attention.
VALUE_RTOL, GRAD_RTOL = 1e-5, 2e-5


def rel_err(got, want):
    """The largest error over every leaf, relative to the largest reference
    entry of the whole tree (the key projection's bias has a gradient of 0
    up to rounding: softmax ignores a score shift shared by a row's keys);
    inf where a shape differs or got is not finite."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    got_leaves = [np.asarray(g, np.float64) for g in got_leaves]
    want_leaves = [np.asarray(w, np.float64) for w in want_leaves]
    scale = max(float(np.max(np.abs(w), initial=0.0)) for w in want_leaves)
    worst = 0.0
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if g.shape != w.shape or not np.isfinite(g).all():
            return np.inf
        worst = max(worst, float(np.max(np.abs(g - w), initial=0.0)))
    return worst / max(scale, 1e-30)


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def padding(batch, length, seed):
    """A 0/1 float validity vector per sequence, position 0 always valid
    (so that no query row is fully masked: flax differs there)."""
    valid = np.random.default_rng(seed).random(batch + (length,)) < 0.6
    valid[..., 0] = True
    return jnp.asarray(valid, jnp.float32)


def float_mask(shape, seed):
    """A float mask with 0 (hidden) and the nonzero values 1, 0.5, -2 and NaN
    (all of which flax's jnp.where reads as visible); key 0 always visible."""
    rng = np.random.default_rng(seed)
    m = rng.choice(np.array([0.0, 0.0, 1.0, 0.5, -2.0, np.nan], np.float32), shape)
    m[..., 0] = 1.0
    return jnp.asarray(m)


# Masks for the layers, all [2, 1, T, T] float (one compilation each side):
# flax's own mask builders, and a float mask with other nonzero values.
def layer_mask(name, batch=(2,)):
    ones = jnp.ones(batch + (T,))
    causal = nnx.make_causal_mask(ones)
    padded = nnx.make_attention_mask(ones, padding(batch, T, 2))
    return {
        "causal": causal,
        "key_padding": padded,
        "causal_and_padding": nnx.combine_masks(causal, padded),
        "float_nonzero": float_mask(batch + (1, T, T), 4),
    }[name]


MASKS = ["causal", "key_padding", "causal_and_padding", "float_nonzero"]


def test_dot_product_attention_itself_is_not_an_attention_fn():
    # Why the adapter exists: flax passes dropout_rng and float 0/1 masks.
    q, k, v = qkv((2,))
    with pytest.raises(TypeError, match="dropout_rng"):
        jsoftmax.dot_product_attention(q, k, v, dropout_rng=None)
    with pytest.raises(TypeError, match="mask must be boolean"):
        jsoftmax.dot_product_attention(q, k, v, mask=jnp.ones((T, S)))


# -- nnx ----------------------------------------------------------------------


def nnx_pair(**kw):
    """The same nnx layer (same parameters) with jsoftmax's and with flax's
    attention_fn."""

    def make(attention_fn):
        return nnx.MultiHeadAttention(
            num_heads=N,
            in_features=F,
            decode=False,
            rngs=nnx.Rngs(0),
            attention_fn=attention_fn,
            **kw,
        )

    return make(jsoftmax.flax_attention_fn), make(nnx.dot_product_attention)


@functools.partial(jax.jit, static_argnums=(0, 7))
def nnx_value_and_grads(graphdef, params, rest, x, kv, mask, ct, call=()):
    """The layer's output and the gradients of sum(output * ct) w.r.t. its
    parameters; jitted on the graph (which holds attention_fn) so that layers
    built alike share a compilation."""

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(x, kv, mask=mask, **dict(call))
        return jnp.sum(out * ct), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads


def assert_nnx_layers_agree(ours, theirs, x, kv=None, mask=None, **call):
    ct = normal(x.shape, 9)
    call = tuple(sorted(call.items()))
    out, grads = nnx_value_and_grads(
        *nnx.split(ours, nnx.Param, ...), x, kv, mask, ct, call
    )
    want, want_grads = nnx_value_and_grads(
        *nnx.split(theirs, nnx.Param, ...), x, kv, mask, ct, call
    )
    assert out.shape == want.shape and out.dtype == want.dtype
    assert rel_err(out, want) <= VALUE_RTOL
    assert rel_err(grads, want_grads) <= GRAD_RTOL


@pytest.mark.parametrize("mask", MASKS)
def test_nnx_layer_with_flax_masks_matches_flax_attention(mask):
    x = normal((2, T, F), 1)
    assert_nnx_layers_agree(*nnx_pair(), x, mask=layer_mask(mask))


def test_nnx_layer_without_mask_matches_flax():
    assert_nnx_layers_agree(*nnx_pair(), normal((2, T, F), 1))


def test_nnx_cross_attention_with_key_padding_matches_flax():
    x, kv = normal((2, T, F), 1), normal((2, S, F), 6)
    mask = nnx.make_attention_mask(jnp.ones((2, T)), padding((2,), S, 7))
    assert_nnx_layers_agree(*nnx_pair(), x, kv, mask)


def test_nnx_layer_with_two_batch_axes_matches_flax():
    x = normal((2, 3, T, F), 1)
    mask = layer_mask("causal_and_padding", (2, 3))
    assert_nnx_layers_agree(*nnx_pair(), x, mask=mask)


def test_nnx_is_causal_and_grouped_query_heads_match_flax():
    x = normal((2, T, F), 1)
    ours, theirs = nnx_pair(num_kv_heads=1)
    assert_nnx_layers_agree(
        ours, theirs, x, mask=layer_mask("key_padding"), is_causal=True
    )


def test_nnx_layer_with_the_pallas_kernels_matches_flax():
    # implementation bound with functools.partial reaches dot_product_attention
    # (the kernels in interpret mode on a CPU).
    x = normal((2, T, F), 1)
    _, theirs = nnx_pair(num_kv_heads=1)
    fn = functools.partial(
        jsoftmax.flax_attention_fn, implementation="pallas", key_chunk_size=16
    )
    ours = nnx.MultiHeadAttention(
        num_heads=N,
        in_features=F,
        num_kv_heads=1,
        decode=False,
        rngs=nnx.Rngs(0),
        attention_fn=fn,
    )
    mask = layer_mask("key_padding")
    assert_nnx_layers_agree(ours, theirs, x, mask=mask, is_causal=True)


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_nnx_layer_lowered_for_cuda_runs_the_kernels_unless_told_otherwise(
    implementation,
):
    # flax_attention_fn's default is dot_product_attention's: the Triton
    # kernels where the program is lowered for CUDA (forward, and the dK/dV
    # and dQ kernels of the backward); "xla" bound with functools.partial
    # keeps the XLA block path there.
    fn = functools.partial(jsoftmax.flax_attention_fn, implementation=implementation)
    layer = nnx.MultiHeadAttention(
        num_heads=N, in_features=F, decode=False, rngs=nnx.Rngs(0), attention_fn=fn
    )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x, mask = normal((2, T, F), 1), layer_mask("causal")

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, mask=mask) ** 2)

    exported = cuda_lowering.export(jax.grad(loss), params, x)
    kernels = exported.mlir_module().count(cuda_lowering.TRITON)
    assert kernels == (3 if implementation is None else 0)


def test_nnx_evaluation_with_dropout_rate_and_default_precision_matches_flax():
    x = normal((2, T, F), 1)
    ours, theirs = nnx_pair(dropout_rate=0.1, precision=lax.Precision.DEFAULT)
    mask = layer_mask("causal_and_padding")
    assert_nnx_layers_agree(ours, theirs, x, mask=mask, deterministic=True)


def test_nnx_dropout_in_training_is_refused():
    ours, _ = nnx_pair(dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"dropout is not supported.*rate=0.1"):
        ours(normal((2, T, F), 1), deterministic=False)


def test_nnx_sown_weights_are_refused():
    ours, _ = nnx_pair()
    with pytest.raises(ValueError, match="sow the attention weights"):
        ours(normal((2, T, F), 1), sow_weights=True)


def test_nnx_precision_other_than_default_is_refused():
    ours, _ = nnx_pair(precision=lax.Precision.HIGHEST)
    with pytest.raises(ValueError, match="precision=.*HIGHEST"):
        ours(normal((2, T, F), 1))


@nnx.jit(static_argnames="decode")
def nnx_call(layer, x, mask=None, decode=False):
    return layer(x, mask=mask, decode=decode)


def test_nnx_decode_matches_flax_and_the_full_causal_pass():
    x = normal((2, T, F), 1)
    ours, theirs = nnx_pair()
    full = nnx_call(ours, x, layer_mask("causal"))
    for layer in (ours, theirs):
        layer.init_cache(x.shape)
    for i in range(T):
        step = nnx_call(ours, x[:, i : i + 1], decode=True)
        want = nnx_call(theirs, x[:, i : i + 1], decode=True)
        assert rel_err(step, want) <= VALUE_RTOL
        assert rel_err(step, full[:, i : i + 1]) <= VALUE_RTOL


def test_nnx_bfloat16_layer_runs_in_bfloat16():
    x = normal((2, T, F), 1)
    ours, theirs = nnx_pair(dtype=jnp.bfloat16)
    out = nnx_call(ours, x, layer_mask("causal"))
    with jax.numpy_dtype_promotion("standard"):  # jax.nn's needs it
        want = nnx_call(theirs, x, layer_mask("causal"))
    assert out.dtype == want.dtype == jnp.bfloat16
    assert rel_err(out, want) <= jsoftmax.testing.tolerances(jnp.bfloat16, n=T)[0]


# Context parallelism: the sequence split over n entries of a vmap axis named
# "c" (its collectives work over it, so no host devices are needed), in the
# layout's order; a zigzag split needs 2 * n chunks.
CP_T = 8


def cp_split(x, n, layout):
    """``x``'s sequence axis 1 as ``[n, ...]`` local slices."""
    x = jsoftmax.to_zigzag(x, n) if layout == "zigzag" else x
    return jnp.moveaxis(x.reshape(x.shape[0], n, -1, *x.shape[2:]), 1, 0)


def cp_join(x, n, layout):
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape(x.shape[0], -1, *x.shape[3:])
    return jsoftmax.from_zigzag(x, n) if layout == "zigzag" else x


@pytest.mark.parametrize(
    "mode, layout", [("ring", "zigzag"), ("all_gather", "contiguous")]
)
def test_nnx_layer_with_context_parallelism_matches_flax_unsharded(mode, layout):
    # The layer inside the split, bound to the axis with functools.partial:
    # is_causal across the devices (passed to the call: nnx passes its own to
    # attention_fn), and a key padding mask [B, 1, 1, S] split with the keys.
    # flax's own attention sees the whole sequence.
    n = 2
    fn = functools.partial(
        jsoftmax.flax_attention_fn,
        axis_name="c",
        context_parallel=mode,
        context_layout=layout,
    )
    ours = nnx.MultiHeadAttention(
        num_heads=N, in_features=F, decode=False, rngs=nnx.Rngs(0), attention_fn=fn
    )
    _, theirs = nnx_pair()
    x, ct = normal((2, CP_T, F), 1), normal((2, CP_T, F), 2)
    valid = padding((2,), CP_T, 3)
    one = jnp.ones((2, 1))  # a query input of length 1: a mask of keys only

    def sharded(params):
        layer = nnx.merge(*nnx.split(ours, nnx.Param, ...)[::2], params)

        def local(x, valid):
            mask = nnx.make_attention_mask(one, valid)
            return layer(x, mask=mask, is_causal=True)

        split = (cp_split(a, n, layout) for a in (x, valid))
        return cp_join(jax.vmap(local, axis_name="c")(*split), n, layout)

    def unsharded(params):
        layer = nnx.merge(*nnx.split(theirs, nnx.Param, ...)[::2], params)
        causal = nnx.make_causal_mask(jnp.ones((2, CP_T)))
        keys = nnx.make_attention_mask(one, valid)
        return layer(x, mask=nnx.combine_masks(causal, keys))

    got, want = (
        jax.jit(lambda p, f=f: jax.vjp(f, p)[1](ct) + (f(p),))(
            nnx.split(layer, nnx.Param, ...)[1]
        )
        for f, layer in ((sharded, ours), (unsharded, theirs))
    )
    assert rel_err(got[-1], want[-1]) <= VALUE_RTOL
    assert rel_err(got[0], want[0]) <= GRAD_RTOL


def test_context_parallel_bias_over_all_keys_and_two_batch_axes_match_unsharded():
    # A bias [batch..., N, T, S] split with the queries, all keys whole;
    # two batch axes merged by the adapter.
    n, layout = 2, "zigzag"
    q, k, v = (normal((2, 3, CP_T, N, 4), seed) for seed in (1, 2, 3))
    bias = normal((3, N, CP_T, CP_T), 4)

    def local(q, k, v, bias):
        return jsoftmax.flax_attention_fn(
            q, k, v, bias, axis_name="c", context_layout=layout, is_causal=True
        )

    def sharded(q, k, v, bias):
        flat = (a.reshape((6,) + a.shape[2:]) for a in (q, k, v))
        split = [cp_split(a, n, layout).reshape((n, 2, 3, -1, N, 4)) for a in flat]
        keys = jsoftmax.to_zigzag(bias, n, axis=3)  # the keys in the layout
        per_query = jnp.moveaxis(cp_split(jnp.moveaxis(keys, 2, 1), n, layout), 2, 3)
        out = jax.vmap(local, axis_name="c")(*split, per_query)
        return cp_join(out.reshape((n, 6) + out.shape[3:]), n, layout).reshape(q.shape)

    def unsharded(q, k, v, bias):
        return jsoftmax.flax_attention_fn(q, k, v, bias, is_causal=True)

    ct = normal(q.shape, 5)
    got, want = (
        jax.jit(lambda *a, f=f: jax.vjp(f, *a)[1](ct) + (f(*a),))(q, k, v, bias)
        for f in (sharded, unsharded)
    )
    assert rel_err(got, want) <= GRAD_RTOL


def test_context_parallel_mask_local_in_both_axes_is_refused():
    # flax's make_attention_mask from two local slices: its key axis holds
    # only this device's keys, which a query axis other than 1 cannot take.
    q = normal((2, 2, CP_T // 2, N, 4), 1)
    valid = padding((2, 2), CP_T // 2, 3)

    def local(q, valid):
        mask = nnx.make_attention_mask(jnp.ones(valid.shape), valid)
        return jsoftmax.flax_attention_fn(q, q, q, mask=mask, axis_name="c")

    with pytest.raises(ValueError, match="split along with the sequence"):
        jax.vmap(local, axis_name="c")(q, valid)


# -- linen --------------------------------------------------------------------


def linen_pair(**kw):
    return (
        nn.MultiHeadDotProductAttention(
            num_heads=N, attention_fn=jsoftmax.flax_attention_fn, **kw
        ),
        nn.MultiHeadDotProductAttention(num_heads=N, **kw),
    )


@functools.partial(jax.jit, static_argnums=(0, 5))
def linen_value_and_grads(layer, params, x, mask, ct, call=()):
    def loss(params):
        out = layer.apply(params, x, mask=mask, **dict(call))
        return jnp.sum(out * ct), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads


def assert_linen_layers_agree(ours, theirs, x, mask=None, **call):
    params = theirs.init(jax.random.key(0), x, deterministic=True)
    ct = normal(x.shape, 9)
    call = tuple(sorted(call.items()))
    out, grads = linen_value_and_grads(ours, params, x, mask, ct, call)
    want, want_grads = linen_value_and_grads(theirs, params, x, mask, ct, call)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert rel_err(out, want) <= VALUE_RTOL
    assert rel_err(grads, want_grads) <= GRAD_RTOL


@pytest.mark.parametrize("mask", MASKS)
def test_linen_layer_with_flax_masks_matches_flax_attention(mask):
    x = normal((2, T, F), 1)
    assert_linen_layers_agree(*linen_pair(), x, layer_mask(mask))


def test_linen_evaluation_with_dropout_rate_matches_flax():
    x = normal((2, T, F), 1)
    ours, theirs = linen_pair(dropout_rate=0.1)
    mask = layer_mask("causal_and_padding")
    assert_linen_layers_agree(ours, theirs, x, mask, deterministic=True)


def test_linen_decode_matches_flax():
    x = normal((2, T, F), 1)
    ours, theirs = linen_pair(decode=True)
    variables = theirs.init(jax.random.key(0), x)
    params = {"params": variables["params"]}
    caches = [variables["cache"], variables["cache"]]
    step = jax.jit(
        lambda layer, cache, x: layer.apply(
            {**params, "cache": cache}, x, mutable=["cache"]
        ),
        static_argnums=0,
    )
    for i in range(T):
        (got, caches[0]), (want, caches[1]) = (
            step(layer, cache, x[:, i : i + 1])
            for layer, cache in zip((ours, theirs), caches, strict=True)
        )
        caches = [c["cache"] for c in caches]
        assert rel_err(got, want) <= VALUE_RTOL


def test_linen_dropout_sown_weights_and_custom_einsums_are_refused():
    ours, theirs = linen_pair(dropout_rate=0.1)
    x = normal((2, T, F), 1)
    params = theirs.init(jax.random.key(0), x, deterministic=True)
    with pytest.raises(ValueError, match="dropout is not supported"):
        ours.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    with pytest.raises(ValueError, match="sow the attention weights"):
        ours.apply(
            params, x, deterministic=True, sow_weights=True, mutable=["intermediates"]
        )
    einsums = dict(
        qk_attn_weights_einsum_cls=lambda: jnp.einsum,
        attn_weights_value_einsum_cls=lambda: jnp.einsum,
    )
    ours, _ = linen_pair(**einsums)
    with pytest.raises(ValueError, match="qk_attn_weights_einsum is not supported"):
        ours.apply(params, x)


# -- the function itself, against flax's dot_product_attention ----------------


def qkv(batch, seed=0, k_heads=N):
    return (
        normal(batch + (T, N, 4), seed),
        normal(batch + (S, k_heads, 4), seed + 1),
        normal(batch + (S, k_heads, 4), seed + 2),
    )


@functools.partial(jax.jit, static_argnums=(0, 6))
def value_and_grads(attention, q, k, v, bias, mask, kw=(), ct=None):
    """attention's output and the gradients of sum(output * ct) w.r.t. q, k,
    v (and bias); ct random by default."""
    if ct is None:
        ct = normal(q.shape, 9)

    def loss(q, k, v, bias):
        out = attention(q, k, v, bias, mask, **dict(kw))
        return jnp.sum(out * ct), out

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, bias)
    return out, grads


@functools.partial(jax.jit, static_argnums=(0, 5))
def forward(attention, q, k, v, mask, kw=()):
    return attention(q, k, v, mask=mask, **dict(kw))


# Mask and bias shapes broadcastable to [batch..., N, T, S], per batch axes.
SCORE_SHAPES = [
    ((), (N, T, S)),
    ((), (S,)),
    ((2,), (1, N, 1, S)),
    ((2, 3), (2, 1, 1, T, S)),
    ((2, 3), (3, 1, 1, S)),
    ((2, 1, 3), (1, 1, 3, 1, T, S)),
]


@pytest.mark.parametrize("batch, shape", SCORE_SHAPES)
def test_masks_and_biases_of_every_broadcast_shape_match_flax(batch, shape):
    q, k, v = qkv(batch)
    mask, bias = float_mask(shape, 3), normal(shape, 4)
    got = value_and_grads(jsoftmax.flax_attention_fn, q, k, v, bias, mask)
    with jax.numpy_rank_promotion("allow"):  # flax's adds a (S,) bias so
        want = value_and_grads(nn.dot_product_attention, q, k, v, bias, mask)
    assert rel_err(got, want) <= GRAD_RTOL


@pytest.mark.parametrize(
    "mask",
    [
        np.array([[1, 0, 1, 1, 0]] * T, np.float32),
        np.array([[1, 0, 3, -1, 0]] * T, np.int32),
        np.array([[True, False, True, True, False]] * T),
        np.array([[0.5, 0.0, -2.0, np.nan, 0.0]] * T, np.float32),
    ],
    ids=["float_0_1", "int", "bool", "float_nonzero"],
)
def test_nonzero_mask_entries_attend_as_in_flax(mask):
    q, k, v = qkv((2,))
    out = forward(jsoftmax.flax_attention_fn, q, k, v, mask)
    for reference in (nn.dot_product_attention, nnx.dot_product_attention):
        assert rel_err(out, forward(reference, q, k, v, mask)) <= VALUE_RTOL
    # The check can fail: reading only 1 as visible gives another answer.
    if not np.isin(mask, (0, 1)).all():
        ones_only = forward(jsoftmax.flax_attention_fn, q, k, v, mask == 1)
        assert rel_err(ones_only, out) > 100 * VALUE_RTOL


def test_is_causal_with_grouped_query_heads_matches_flax():
    q, k, v = qkv((2,), k_heads=1)
    mask = float_mask((2, 1, T, S), 3)
    causal = (("is_causal", True),)
    got = value_and_grads(jsoftmax.flax_attention_fn, q, k, v, None, mask, causal)
    # flax's einsum path (taken with a dropout rate in evaluation) and its
    # jax.nn path.
    for kw in ((("deterministic", True), ("dropout_rate", 0.5)), ()):
        want = value_and_grads(
            nnx.dot_product_attention, q, k, v, None, mask, causal + kw
        )
        assert rel_err(got, want) <= GRAD_RTOL


def test_fully_masked_query_row_is_zero_where_flax_gives_the_mean_of_values():
    q, k, v = qkv((2,))
    mask = np.ones((T, S), bool)
    mask[0] = False  # query 0 sees no key
    row_0 = jnp.zeros(q.shape).at[:, 0].set(normal(q[:, 0].shape, 9))
    out, grads = value_and_grads(
        jsoftmax.flax_attention_fn, q, k, v, None, mask, (), row_0
    )
    want = forward(nn.dot_product_attention, q, k, v, mask)
    assert (out[:, 0] == 0).all()
    assert rel_err(want[:, 0], v.mean(axis=1)) <= VALUE_RTOL
    assert rel_err(out[:, 1:], want[:, 1:]) <= VALUE_RTOL
    assert all((g == 0).all() for g in grads)  # row 0 passes no gradient


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dtype_casts_the_inputs_as_flax_does(dtype):
    q, k, v = qkv((2,))
    kw = (("dtype", dtype),)
    out = forward(jsoftmax.flax_attention_fn, q, k, v, None, kw)
    cast = (x.astype(dtype) for x in (q, k, v))
    assert (out == forward(jsoftmax.dot_product_attention, *cast, None)).all()
    # flax's einsum path (jax.nn's does not compile float16 on a CPU).
    with jax.numpy_dtype_promotion("standard"):
        assert out.dtype == forward(nn.dot_product_attention, q, k, v, None, kw).dtype
    with_flax = forward(
        jsoftmax.flax_attention_fn, q, k, v, None, kw + (("promote_dtype", promote),)
    )
    assert (with_flax == out).all()


def test_integer_inputs_promote_to_float_as_in_flax():
    ints = jnp.arange(2 * T * N * 4, dtype=jnp.int32).reshape(2, T, N, 4) % 3
    out = forward(jsoftmax.flax_attention_fn, ints, ints, ints, None)
    with jax.numpy_dtype_promotion("standard"):  # flax's promote_dtype needs it
        want = forward(nnx.dot_product_attention, ints, ints, ints, None)
    assert out.dtype == want.dtype == jnp.float32
    assert rel_err(out, want) <= VALUE_RTOL


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dropout_rate=0.1), "dropout is not supported"),
        (dict(dropout_rate=0.1, deterministic=False), "dropout is not supported"),
        (dict(module=object()), "sow the attention weights"),
        (dict(precision=lax.Precision.HIGHEST), "precision="),
        (dict(precision="float32"), "precision="),
        (dict(precision=(None, lax.Precision.HIGH)), "precision="),
        # A dot algorithm preset, and a name JAX does not know: refused with
        # this message, not lax.Precision's bare one.
        (dict(precision=lax.DotAlgorithmPreset.F32_F32_F32), "precision=.*unset"),
        (dict(precision="bogus"), "precision=.*unset"),
        (dict(einsum_dot_general=lax.dot_general), "einsum_dot_general"),
        (dict(mask=jnp.ones((T, T))), r"mask of shape \(6, 6\)"),
        (dict(bias=jnp.ones((3, N, T, S))), r"bias of shape \(3, 2, 6, 5\)"),
    ],
)
def test_unsupported_arguments_are_refused_by_name(kw, match):
    q, k, v = qkv((2,))
    with pytest.raises(ValueError, match=match):
        jsoftmax.flax_attention_fn(q, k, v, **kw)


def test_dot_product_attention_options_reach_it(monkeypatch):
    seen = []

    def recorder(*args, **kw):
        seen.append(kw)
        return jsoftmax.dot_product_attention(*args, **kw)

    monkeypatch.setattr(jsoftmax._flax, "dot_product_attention", recorder)
    q, k, v = qkv((2,))
    jsoftmax.flax_attention_fn(q, k, v)
    kw = dict(implementation="xla", query_chunk_size=2, key_chunk_size=4)
    jsoftmax.flax_attention_fn(q, k, v, is_causal=True, **kw)
    parallel = dict(axis_name="c", context_parallel="all_gather")
    parallel.update(context_layout="zigzag")
    jax.vmap(functools.partial(jsoftmax.flax_attention_fn, **parallel), axis_name="c")(
        *(jnp.stack([x[:, :4]] * 2) for x in (q, k, v))
    )
    defaults = dict(implementation=None, query_chunk_size=None, key_chunk_size=None)
    defaults.update(axis_name=None, context_parallel="ring")
    defaults.update(context_layout="contiguous")
    assert seen == [
        dict(defaults, is_causal=False),
        dict(defaults, is_causal=True, **kw),
        dict(defaults, is_causal=False, **parallel),
    ]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(implementation="cudnn"), "implementation='cudnn' takes float16"),
        (dict(implementation="triton"), "implementation"),
        (dict(implementation="pallas", key_chunk_size=4), "pallas.*key_chunk_size"),
        (dict(query_chunk_size=0), "query_chunk_size"),
    ],
)
def test_implementation_and_chunk_sizes_are_checked_by_dot_product_attention(kw, match):
    q, k, v = qkv((2,))
    with pytest.raises(ValueError, match=match):
        jsoftmax.flax_attention_fn(q, k, v, **kw)


@pytest.mark.parametrize(
    "precision",
    [(lax.Precision.DEFAULT, "default"), lax.DotAlgorithmPreset.DEFAULT, "DEFAULT"],
)
def test_accepted_no_op_arguments_change_nothing(precision):
    # The default preset, by value or name (jnp.einsum reads both as the
    # default), was refused.
    q, k, v = qkv((2,))
    plain = jax.make_jaxpr(jsoftmax.flax_attention_fn)(q, k, v)
    no_ops = jax.make_jaxpr(
        functools.partial(
            jsoftmax.flax_attention_fn,
            broadcast_dropout=False,
            dropout_rng=None,
            dropout_rate=0.3,
            deterministic=True,
            precision=precision,
            force_fp32_for_softmax=True,
        )
    )(q, k, v)
    assert str(no_ops) == str(plain)


def test_mismatched_batch_axes_and_ranks_are_refused():
    q, k, v = qkv((2, 3))
    with pytest.raises(ValueError, match="same batch axes"):
        jsoftmax.flax_attention_fn(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"\[batch..., T, N, H\]"):
        jsoftmax.flax_attention_fn(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])

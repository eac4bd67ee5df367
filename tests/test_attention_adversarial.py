"""Regression tests from an adversarial pass over
``dot_product_attention(implementation=...)``: each reproduced a defect of
the Pallas kernels (interpret mode on this CPU) or of the choice of
implementation, and failed before its fix. The reference is
``implementation="xla"`` (itself tested against jax.nn and a dense float64
definition)."""

import cuda_lowering
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from closeness import assert_close
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import _attention_pallas

TRITON = cuda_lowering.TRITON
CHUNKS = dict(query_chunk_size=16, key_chunk_size=16)
# The kernels against the XLA path, relative to the largest reference entry.
RTOL = 2e-5


def _arrays(b, t, s, n, k_heads, h, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, s, k_heads, h), (b, s, k_heads, h), (b, t, n, h)]
    return [jnp.asarray(rng.standard_normal(x), dtype) for x in shapes]


def _value_and_grads(implementation, q, k, v, ct, **options):
    def loss(q, k, v):
        out = jsoftmax.dot_product_attention(
            q, k, v, implementation=implementation, **options
        )
        return jnp.sum(out * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        q, k, v
    )
    return out, grads


def _export_for_cuda(fn, *args):
    return cuda_lowering.export(fn, *args)


# ---------------------------------------------------------------------------
# Defect 1: the kernels' pallas_call declares outputs without their variation
# over the mesh axes, so inside shard_map(check_vma=True) (shard_map's
# default) "pallas" fails to trace, and the default implementation=None fails
# to lower for CUDA: on a GPU, the default call in a default shard_map raises.
# "xla" works in both.


def _mesh():
    return jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def test_pallas_runs_inside_shard_map_with_check_vma():
    q, k, v, _ = _arrays(2, 16, 16, 2, 1, 8)

    def attend(implementation):
        return jax.shard_map(
            lambda q, k, v: jsoftmax.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            ),
            mesh=_mesh(),
            in_specs=P("d"),
            out_specs=P("d"),
            check_vma=True,
        )

    want = attend("xla")(q, k, v)
    # ValueError: When `check_vma=True` on `jax.shard_map`, `manual_axis_type`
    # on `jax.ShapeDtypeStruct` must not be `None`.
    assert_close(attend("pallas")(q, k, v), want, RTOL)


def test_default_lowers_for_cuda_inside_shard_map_with_check_vma():
    q, k, v, _ = _arrays(2, 16, 16, 2, 1, 8)

    def loss(q, k, v):
        return jnp.sum(jsoftmax.dot_product_attention(q, k, v, is_causal=True))

    fn = jax.shard_map(
        jax.grad(loss, (0, 1, 2)),
        mesh=_mesh(),
        in_specs=P("d"),
        out_specs=P("d"),
        check_vma=True,
    )
    # Same ValueError at lowering; with check_vma=False it lowers (3 kernels).
    assert _export_for_cuda(fn, q, k, v).mlir_module().count(TRITON) == 3


# ---------------------------------------------------------------------------
# Defect 2: _attention_pallas._pad leaves an axis of size 1 alone (meant for
# a broadcast bias or mask), and _Call pads q, k, v, dO and the segment ids
# with it: a sequence of one query (decoding), one key, or a head dim of 1 is
# never padded to the kernels' blocks. S = 1: NaN output and gradients (the
# blocks read interpret mode's NaN padding, on a GPU whatever lies past the
# array); T = 1: the backward raises a TypeError ("slice_sizes must be less
# than or equal to operand shape"). "xla" (and jax.nn) are fine.


@pytest.mark.parametrize(
    "t, s, chunks",
    [(1, 16, {}), (1, 16, CHUNKS), (16, 1, {}), (1, 1, {}), (40, 1, CHUNKS)],
    ids=["one_query", "one_query_chunks", "one_key", "one_each", "one_key_chunks"],
)
def test_pallas_with_a_sequence_of_one(t, s, chunks):
    # With one key the softmax is constant: dq and dk are 0 in exact
    # arithmetic, rounding noise on both paths, compared at the scale of
    # the largest gradient.
    q, k, v, ct = _arrays(2, t, s, 4, 2, 8)
    options = dict(is_causal=t >= s, **chunks)
    want = _value_and_grads("xla", q, k, v, ct, **options)
    got = _value_and_grads("pallas", q, k, v, ct, **options)
    assert_close(got, want, RTOL, common_scale=s == 1)


@pytest.mark.parametrize("t, s, h", [(1, 24, 8), (24, 1, 8), (24, 24, 1)])
def test_kernel_operands_are_padded_to_whole_blocks(t, s, h):
    # The class behind the test above, H = 1 included (which happens to pass
    # in interpret mode): every operand the kernels index by blocks has the
    # padded length on each blocked axis.
    q, k, v, _ = _arrays(1, t, s, 2, 1, h)
    seg_q, seg_kv = jnp.zeros((1, t), jnp.int32), jnp.zeros((1, s), jnp.int32)
    config = jsoftmax._attention._prepare(
        q, k, v, None, None, None, False, None, None, None, seg_q, seg_kv, None,
        None, None, None, "pallas",
    ).config  # fmt: skip
    call = _attention_pallas._Call(
        q, k, v, None, None, None, None, seg_q, seg_kv, config
    )
    hp = max(16, int(2 ** np.ceil(np.log2(h))))
    assert call.q.shape == (1, call.tp, 2, hp)
    assert call.k.shape == call.v.shape == (1, call.sp, 1, hp)
    assert call.q_seg.shape == (1, call.tp)
    assert call.kv_seg.shape == (1, call.sp)


# ---------------------------------------------------------------------------
# Defect 3: under jax.enable_x64 (float32 inputs), the kernels' block bounds
# mix int32 positions with int64 Python-int constants: "pallas" raises
# "TypeError: lax.div requires arguments to have the same dtypes, got int32,
# int64" as soon as there is a causal mask, a window or key lengths, and so
# does implementation=None lowered for CUDA. "xla" runs.


@pytest.mark.parametrize(
    "options",
    [
        dict(is_causal=True),
        dict(local_window_size=(3, 2)),
        dict(key_value_seq_lengths=np.array([3, 9], np.int32)),
    ],
    ids=["causal", "window", "key_lengths"],
)
def test_pallas_under_x64(options):
    q, k, v, ct = _arrays(2, 16, 16, 2, 1, 8)
    with jax.enable_x64(True):
        want = _value_and_grads("xla", q, k, v, ct, **options)
        got = _value_and_grads("pallas", q, k, v, ct, **options)
    assert_close(got, want, RTOL)


def test_default_lowers_for_cuda_under_x64():
    q, k, v, _ = _arrays(2, 16, 16, 2, 1, 8)

    def loss(q, k, v):
        return jnp.sum(jsoftmax.dot_product_attention(q, k, v, is_causal=True))

    with jax.enable_x64(True):
        exported = _export_for_cuda(jax.grad(loss, (0, 1, 2)), q, k, v)
    assert exported.mlir_module().count(TRITON) == 3


# ---------------------------------------------------------------------------
# Defect 4 (GPU memory safety; invisible in interpret mode, whose clamped
# dynamic_update_slice hides it): with a bias, the dQ kernel zeroes the score
# gradient of the key blocks [0, lo) before the band. With a left window and
# T > S, lo (from _band_bounds) exceeds the number of key blocks, and
# ``d_scores_ref[:, pl.ds(j * bk, bk)] = 0`` stores past the ref: on a GPU
# into the next rows, or another program's, or past the buffer.


def test_assert_close_catches_a_slightly_wrong_answer():
    want = [np.linspace(1.0, 3.0, 8), np.full(4, 1e-7)]
    assert_close([want[0] * (1 + 1e-5), want[1] * 2], want, RTOL, common_scale=True)
    with pytest.raises(AssertionError):
        assert_close([want[0] * (1 + 3e-5), want[1]], want, RTOL, common_scale=True)
    with pytest.raises(AssertionError):
        assert_close([want[0], want[1] * 2], want, RTOL)


def test_dq_kernel_zeroes_only_key_blocks_inside_the_score_gradient():
    t, s, bq, bk = 64, 16, 16, 16  # T > S, window (2, 2), one key block
    q, k, v, _ = _arrays(1, t, s, 1, 1, 8)
    bias = jnp.zeros((t, s), jnp.float32)
    args = jsoftmax._attention._prepare(
        q, k, v, bias, None, None, False, None, None, (2, 2), None, None, None,
        None, bq, bk, "pallas",
    )  # fmt: skip
    call = _attention_pallas._Call(*args.arrays[:4], *args.arrays[5:], args.config)
    key_blocks = call.sp // bk  # the width of the dQ kernel's dS ref, in blocks
    for i in range(call.tp // bq):
        lo, hi = _attention_pallas._band_bounds(
            call.spec, jnp.int32(i * bq), bq, -(-s // bk), bk, rows_outer=True
        )
        # The kernel runs zero(j) for 0 <= j < lo: each j must be a block of
        # the ref.
        assert int(lo) <= key_blocks, (i, int(lo), key_blocks)


# ---------------------------------------------------------------------------
# Defect 5 (message): unbatched inputs with lengths. The XLA and Pallas paths
# take lengths of shape (1,) for [T, N, H] inputs; implementation="cudnn"
# refuses them before reaching cuDNN with "key_value_seq_lengths of shape
# (1,) must be None", which names no shape the caller could pass.


def test_cudnn_unbatched_lengths_error_is_meaningful():
    q, k, v, _ = _arrays(1, 16, 16, 2, 1, 8, jnp.bfloat16)
    lengths = jnp.array([5], jnp.int32)
    jsoftmax.dot_product_attention(  # accepted by the other paths
        q[0], k[0], v[0], key_value_seq_lengths=lengths, implementation="xla"
    )
    with pytest.raises(Exception) as info:
        jsoftmax.dot_product_attention(
            q[0], k[0], v[0], key_value_seq_lengths=lengths, implementation="cudnn"
        )
    assert "must be None" not in str(info.value), str(info.value)


def test_numpy_64_bit_lengths_and_segment_ids_past_int32_with_x64_off():
    # With 64-bit types off (the default), JAX converts a NumPy int64 array
    # to int32 by wrapping: a length of 2**32 + 2 read as 2 and hid all keys
    # but two, and segment ids 0 and 2**32 read as one segment. Lengths are
    # now clamped to int32's range on the host first (past any sequence, as
    # documented); ids past it are refused, where clamping could merge them.
    q, k, v, _ = _arrays(2, 6, 6, 2, 2, 4)
    lengths = np.array([2**32 + 2, 2**63 - 1], np.int64)
    assert jnp.asarray(lengths)[0] == 2  # the control: JAX's conversion wraps
    for option in ("query_seq_lengths", "key_value_seq_lengths"):
        got = jsoftmax.dot_product_attention(q, k, v, **{option: lengths})
        assert_close(got, jax.nn.dot_product_attention(q, k, v), 1e-6, option)
    ids = np.array([[0, 0, 0, 2**32, 2**32, 2**32]] * 2, np.int64)
    with pytest.raises(ValueError, match="query_segment_ids hold values past int32"):
        jsoftmax.dot_product_attention(
            q, k, v, query_segment_ids=ids, key_value_segment_ids=ids % 2**32
        )
    # Ids within int32's range, in int64, are taken as they are.
    small = np.array([[0, 0, 0, 7, 7, 7]] * 2, np.int64)
    got = jsoftmax.dot_product_attention(
        q, k, v, query_segment_ids=small, key_value_segment_ids=small
    )
    want = jax.nn.dot_product_attention(
        q,
        k,
        v,
        query_seq_lengths=None,
        mask=(small[:, None, :, None] == small[:, None, None, :]),
    )
    assert_close(got, want, 1e-6, "segments")


@pytest.mark.parametrize(
    "scale", [float("nan"), float("inf"), -np.inf, np.float32("nan")]
)
def test_a_non_finite_static_scale_is_refused(scale):
    # It was taken, and every output was NaN; soft_cap refuses the same.
    q, k, v, _ = _arrays(1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match="scale must be finite"):
        jsoftmax.dot_product_attention(q, k, v, scale=scale)
    jsoftmax.dot_product_attention(q, k, v, scale=np.float32(0.0))  # 0 is a scale


# ---------------------------------------------------------------------------
# Defect: a query row hidden by a -inf bias alone (the additive-mask idiom
# `where(m, b, -inf)`, no boolean mask) is empty, and finish_rows took
# log(0) for its L before selecting -inf: the select's zero cotangent times
# log's 1/0 made reverse over reverse NaN in that row's q and bias entries
# (first derivatives were right). Both implementations, and context
# parallelism, whose pairs run the block path's finish_rows.


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_second_derivatives_through_a_row_hidden_by_a_minus_inf_bias(implementation):
    q, k, v, _ = _arrays(1, 5, 6, 2, 1, 3, seed=10)
    bias = jnp.asarray(np.random.default_rng(11).standard_normal((1, 2, 5, 6)))
    bias = bias.astype(jnp.float32)
    shown = jnp.ones((1, 1, 5, 6), bool).at[:, :, 2, :].set(False)  # row 2: none

    def second(bias, mask):
        def loss(q, bias):
            out = jsoftmax.dot_product_attention(
                q, k, v, bias, mask, implementation=implementation, **CHUNKS
            )
            return jnp.sum(jnp.sin(out))

        def curvature(q, bias):
            return jnp.sum(jax.grad(loss, 1)(q, bias) ** 2)

        return jax.jit(jax.grad(curvature, (0, 1)))(q, bias)

    # The same scores hidden by the boolean mask: a where keeps the row out.
    got = second(jnp.where(shown, bias, -jnp.inf), None)
    want = second(bias, shown)
    assert_close(got, want, RTOL, "-inf bias against mask")
    assert float(jnp.max(jnp.abs(want[0]))) > 0  # the check has something to see


# ---------------------------------------------------------------------------
# Defect: zero query heads (N = 0, K = 1) reached the kernels, which raised a
# TypeError on a slice; "xla" and jax.nn give the empty output. An empty
# batch already went to the XLA path.


def test_pallas_with_no_query_heads():
    q = jnp.zeros((2, 9, 0, 8))
    k = jnp.ones((2, 11, 1, 8))
    for implementation in ("pallas", None):
        out, grads = _value_and_grads(implementation, q, k, k, q)
        assert out.shape == (2, 9, 0, 8)
        assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
        assert not np.asarray(grads[1]).any()
    exported = _export_for_cuda(
        lambda q: jsoftmax.dot_product_attention(q, k, k).sum(), q
    )
    assert TRITON not in exported.mlir_module()  # nothing to launch


# ---------------------------------------------------------------------------
# Defect: return_residual's lse was cast to the inputs' dtype; float8_e4m3fn
# has no -inf and ends at 448, so a row that sees no key got NaN (documented:
# -inf) and any L past 448 turned NaN. 8-bit inputs now get a float32 lse.


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_an_8_bit_call_returns_its_lse_in_float32(dtype, implementation):
    q, k, v, _ = _arrays(1, 4, 6, 1, 1, 8)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    shown = jnp.ones((1, 1, 4, 6), bool).at[:, :, 2, :].set(False)  # row 2: none
    bias = jnp.full((6,), 500.0)  # every L past 448
    for options in (dict(mask=shown), dict(bias=bias)):
        _, lse = jsoftmax.dot_product_attention(
            q, k, v, return_residual=True, implementation=implementation, **options
        )
        # The same 8-bit values in float32: the op computes 8-bit in float32.
        _, want = jsoftmax.dot_product_attention(
            *(x.astype(jnp.float32) for x in (q, k, v)), return_residual=True,
            implementation="xla", **options,
        )  # fmt: skip
        assert lse.dtype == jnp.float32
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want))
        visible = np.isfinite(want)
        assert_close(lse[visible], want[visible], 1e-6, str(options))
    assert float(jnp.min(lse)) > 448

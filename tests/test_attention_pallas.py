"""dot_product_attention's Pallas kernels and ``implementation=``: the kernels
(in interpret mode on a CPU) against the XLA block path, the choice of path
by lowering platform, and every kernel configuration lowered for CUDA from
the CPU (Triton), so that lowering errors show without a GPU."""

import functools
import re

import cuda_lowering
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from closeness import assert_close
from jax._src.ad_checkpoint import saved_residuals
from jax._src.interpreters import mlir
from jax.extend.core import Primitive
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import _attention_pallas

B, T, S, N, H = 2, 40, 56, 4, 24  # T, S, H not multiples of the blocks
CHUNKS = dict(query_chunk_size=16, key_chunk_size=16)
TRITON = cuda_lowering.TRITON
# Relative tolerances (error / largest reference entry): the two paths order
# their float32 sums differently.
RTOL = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-2, 5e-2)}


def _arrays(k_heads, dtype, seed=0, t=T, s=S, h=H):
    rng = np.random.default_rng(seed)
    shapes = [(B, t, N, h), (B, s, k_heads, h), (B, s, k_heads, h), (B, t, N, h)]
    return [jnp.asarray(rng.standard_normal(x), dtype) for x in shapes]


def _segments(length, cuts):
    ids = np.zeros((B, length), np.int32)
    for b in range(B):
        for c in cuts[b]:
            ids[b, c:] += 1
    return jnp.asarray(ids)


def _cases():
    """name -> (key/value heads, options, bias shape or None, sinks)."""
    rng = np.random.default_rng(1)
    mask = rng.random((B, 1, T, S)) < 0.7
    return {
        "plain": (2, {}, None, False),
        "causal_sinks": (2, dict(is_causal=True), None, True),
        "window_soft_cap": (
            2,
            dict(local_window_size=(5, 3), soft_cap=2.5),
            None,
            False,
        ),
        "bias_mask_causal": (
            2,
            dict(is_causal=True, mask=jnp.asarray(mask)),
            (1, N, T, S),
            False,
        ),
        "broadcast_bias_lengths": (
            2,
            dict(
                query_seq_lengths=jnp.array([33, 0], jnp.int32),
                key_value_seq_lengths=jnp.array([50, 9], jnp.int16),
            ),
            (B, 1, 1, S),
            True,
        ),
        "segments_causal_lengths": (
            2,
            dict(
                is_causal=True,
                query_segment_ids=_segments(T, [[10, 25], [3]]),
                key_value_segment_ids=_segments(S, [[10, 25], [3]]),
                key_value_seq_lengths=jnp.array([56, 30], jnp.int32),
            ),
            None,
            False,
        ),
        "multi_query_window_row_bias": (
            1,
            dict(local_window_size=(8, 0)),
            (T, 1),
            True,
        ),
    }


CASES = _cases()


def _run(implementation, case, dtype, chunks=CHUNKS):
    """Output, lse and the gradients of a weighted sum w.r.t. q, k, v and the
    bias and sinks where the case has them."""
    k_heads, options, bias_shape, with_sinks = case
    q, k, v, ct = _arrays(k_heads, dtype)
    rng = np.random.default_rng(2)
    bias = (
        None
        if bias_shape is None
        else jnp.asarray(rng.standard_normal(bias_shape), dtype)
    )
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32) if with_sinks else None

    def loss(q, k, v, bias, sinks):
        out, lse = jsoftmax.dot_product_attention(
            q, k, v, bias, sinks=sinks, implementation=implementation,
            return_residual=True, **chunks, **options,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), (out, lse)

    argnums = (
        (0, 1, 2) + ((3,) if bias is not None else ()) + ((4,) if with_sinks else ())
    )
    run = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))
    (_, (out, lse)), grads = run(q, k, v, bias, sinks)
    return out, lse, grads


def assert_runs_close(got, want, dtype):
    """Two :func:`_run` results: output, lse and gradients."""
    (out, lse, grads), (want_out, want_lse, want_grads) = got, want
    value_rtol, grad_rtol = RTOL[dtype]
    assert out.dtype == want_out.dtype == dtype
    assert_close(out, want_out, value_rtol, "output")
    # Rows that see no key have L = -inf on both paths.
    lse, want_lse = np.asarray(lse, np.float64), np.asarray(want_lse, np.float64)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    assert_close(lse[finite], want_lse[finite], value_rtol, "lse")
    assert_close(grads, want_grads, grad_rtol, "gradients")


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_equal_the_xla_path(name):
    want = _run("xla", CASES[name], jnp.float32)
    assert_runs_close(_run("pallas", CASES[name], jnp.float32), want, jnp.float32)


@pytest.mark.parametrize("name", ["causal_sinks", "bias_mask_causal"])
def test_kernels_in_bfloat16(name):
    want = _run("xla", CASES[name], jnp.bfloat16)
    assert_runs_close(_run("pallas", CASES[name], jnp.bfloat16), want, jnp.bfloat16)


def test_kernels_with_their_default_blocks():
    # No chunk sizes: the kernels' own blocks, clipped to the padded lengths.
    case = CASES["causal_sinks"]
    want = _run("xla", case, jnp.float32, chunks={})
    assert_runs_close(_run("pallas", case, jnp.float32, chunks={}), want, jnp.float32)


def test_kernels_ignore_nan_past_the_lengths():
    # A KV cache's unwritten tail: NaN past key_value_seq_lengths, and NaN
    # queries and cotangents past query_seq_lengths, change nothing.
    q, k, v, ct = _arrays(2, jnp.float32)
    q_len, kv_len = jnp.array([33, 5], jnp.int32), jnp.array([50, 9], jnp.int32)

    def poison(x, length):
        pos = jnp.arange(x.shape[1])[None, :, None, None]
        return jnp.where(pos >= length[:, None, None, None], jnp.nan, x)

    def grads(q, k, v, ct):
        def loss(q, k, v):
            out = jsoftmax.dot_product_attention(
                q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                implementation="pallas", **CHUNKS,
            )  # fmt: skip
            return jnp.sum(jnp.where(jnp.isnan(ct), 0, ct) * out), out

        return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

    clean = grads(q, k, v, ct)
    dirty = grads(poison(q, q_len), poison(k, kv_len), poison(v, kv_len), ct)
    for got, want in zip(jax.tree.leaves(dirty), jax.tree.leaves(clean), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isfinite(np.asarray(dirty[1])).all()  # the output


HIDDEN = {
    # Keys 32 on (whole blocks) hidden from every query by a mask, and
    # queries 32 on seeing none (a right-padded batch written as a mask).
    "mask": dict(
        is_causal=True,
        mask=(jnp.arange(T)[:, None] < 32) & (jnp.arange(S)[None, :] < 32),
    ),
    # Queries 32 on past their lengths; the causal mask hides keys 32 on
    # from the others.
    "causal_lengths": dict(
        is_causal=True, query_seq_lengths=jnp.array([32, 32], jnp.int32)
    ),
    # Packed documents: keys 32 on are a document no query belongs to, and
    # queries 32 on one with no key. Both paths skip the block pairs whose
    # ids' ranges are apart, and no pair here holds two documents.
    "segments": dict(
        query_segment_ids=jnp.broadcast_to(jnp.where(jnp.arange(T) < 32, 0, 1), (B, T)),
        key_value_segment_ids=jnp.broadcast_to(
            jnp.where(jnp.arange(S) < 32, 0, 2), (B, S)
        ),
    ),
}


@pytest.mark.parametrize("hidden", sorted(HIDDEN))
def test_kernels_ignore_nan_in_values_the_masks_hide(hidden):
    # NaN values at keys no query sees (garbage in padding that a mask or
    # the lengths hide): dP = dO v^T is NaN there, and P (dP - D)
    # was 0 * NaN in the kernels' backward, making dq and dk NaN where the
    # XLA path's are finite. The hidden entries of dP are now 0, as there.
    # (Segment ids: the XLA path computed the pairs of two documents, and
    # 0 * NaN in P V made the output NaN.)
    # (A NaN value hidden from some rows of a block that others see reaches
    # those rows' output as 0 * NaN in P V, on both paths, as in jax.nn.)
    options = HIDDEN[hidden]
    q, k, v, ct = _arrays(2, jnp.float32)

    def grads(v, implementation):
        def loss(q, k, v):
            out = jsoftmax.dot_product_attention(
                q, k, v, implementation=implementation, **CHUNKS, **options
            )
            return jnp.sum(ct * out), out

        return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

    dirty = v.at[:, 32:].set(jnp.nan)
    want = grads(v, "xla")
    for implementation in ("xla", "pallas"):
        got = grads(dirty, implementation)
        assert np.isfinite(np.asarray(got[1])).all(), implementation
        assert_close(got, want, 2e-5, implementation)


BIG = 2**31 - 1
# Options that show every key, at int32's limit and past it (placeholders
# for "unbounded"): name -> (options, the same visibility said plainly).
UNBOUNDED = {
    "kv lengths": (dict(key_value_seq_lengths=jnp.array([BIG, BIG])), {}),
    "q lengths": (dict(query_seq_lengths=jnp.array([BIG, BIG])), {}),
    "uint32 lengths": (
        dict(key_value_seq_lengths=jnp.array([2**32 - 1] * 2, jnp.uint32)),
        {},
    ),
    "window both": (dict(local_window_size=(BIG, BIG)), {}),
    "window right": (dict(local_window_size=(5, BIG)), dict(local_window_size=(5, S))),
    "window left": (dict(local_window_size=(BIG, 0)), dict(is_causal=True)),
    "window 2**31": (dict(local_window_size=2**31), {}),
    "window 10**12": (dict(local_window_size=(10**12, -(10**12))), None),
}


@pytest.mark.parametrize("name", sorted(UNBOUNDED))
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_lengths_and_windows_at_and_past_int32s_limit(name, implementation):
    # The kernels' block bounds added a block to a length, and a window to a
    # position, in int32: near int32's max they wrapped, and the kernels
    # visited no block (an output of zeros, or zero dk and dv). A window past
    # it raised an OverflowError on both paths. (10**12, -10**12) hides every
    # key: the output is 0 with a zero gradient.
    options, plain = UNBOUNDED[name]
    q, k, v, ct = _arrays(2, jnp.float32)

    def run(**options):
        def loss(q, k, v):
            out = jsoftmax.dot_product_attention(q, k, v, **CHUNKS, **options)
            return jnp.sum(ct * out), out

        return jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

    got = run(implementation=implementation, **options)
    if plain is None:
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(got))
    else:
        assert_close(got, run(implementation="xla", **plain), 2e-5)


def test_an_empty_batch_runs_on_every_path():
    q = jnp.zeros((0, 8, 2, 16), jnp.float32)
    for implementation in (None, "xla", "pallas"):

        def f(q, implementation=implementation):
            out = jsoftmax.dot_product_attention(
                q, q, q, is_causal=True, implementation=implementation
            )
            return jnp.sum(out), out

        grad, out = jax.grad(f, has_aux=True)(q)
        assert grad.shape == out.shape == q.shape


def test_kernels_under_vmap_and_forward_mode():
    q, k, v, _ = _arrays(2, jnp.float32)
    f = functools.partial(jsoftmax.dot_product_attention, is_causal=True, **CHUNKS)
    xla, kernel = (functools.partial(f, implementation=i) for i in ("xla", "pallas"))
    # vmap over an extra leading axis (the kernels' grid grows).
    qs = jnp.stack([q, 2 * q])
    assert_close(jax.vmap(kernel, (0, None, None))(qs, k, v),
                 jax.vmap(xla, (0, None, None))(qs, k, v), 1e-5)  # fmt: skip
    # Forward mode runs the XLA path's forward, whatever the implementation.
    tangent = jnp.ones_like(q)
    assert_close(jax.jvp(kernel, (q, k, v), (tangent, 0 * k, 0 * v)),
                 jax.jvp(xla, (q, k, v), (tangent, 0 * k, 0 * v)), 1e-5)  # fmt: skip


# ---------------------------------------------------------------------------
# implementation=: the choice, and its errors.


def _lowered_text(fn, platforms, *args):
    return cuda_lowering.export(fn, *args, platforms=platforms).mlir_module()


def _loss(**options):
    def loss(q, k, v):
        out = jsoftmax.dot_product_attention(q, k, v, **options)
        return jnp.sum(out.astype(jnp.float32))

    return jax.value_and_grad(loss, (0, 1, 2))


# What JAX 0.11's Triton lowering reads for the GPU it lowers for, where there
# is none (jax/_src/pallas/triton/gpu_info.py): the device of the context's
# abstract mesh, while the program is lowered. A primitive whose lowering
# records it, around the kernels' gradient.
_seen_at_lowering = []
_probe = Primitive("probe_lowering_device")
_probe.def_abstract_eval(lambda x: x)


def _record_device(ctx, x):
    del ctx
    _seen_at_lowering.append(jax.sharding.get_abstract_mesh().abstract_device)
    return [x]


mlir.register_lowering(_probe, _record_device)


def test_lowering_for_cuda_names_an_h100_to_the_kernels():
    q, k, v, _ = _arrays(2, jnp.bfloat16)

    def probed(q, k, v):
        return [_probe.bind(g) for g in _loss(is_causal=True)(q, k, v)[1]]

    mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Explicit,))
    split = [cuda_lowering.typed(x, P("b"), mesh) for x in (q, k, v)]
    for args, on in [((q, k, v), None), (split, mesh)]:
        _seen_at_lowering.clear()
        text = cuda_lowering.export(probed, *args, mesh=on).mlir_module()
        assert text.count(TRITON) == 3
        # (JAX may lower the same probe of the same shape once.)
        assert set(_seen_at_lowering) == {cuda_lowering.H100}, _seen_at_lowering
    # Without it, none is named (jax 0.10 assumes sm_90; 0.11 raises).
    _seen_at_lowering.clear()
    jax.export.export(jax.jit(probed), platforms=["cpu"])(q, k, v)
    assert set(_seen_at_lowering) == {None}, _seen_at_lowering


def test_default_is_the_xla_path_on_cpu_and_the_kernels_for_cuda():
    q, k, v, _ = _arrays(2, jnp.bfloat16)
    # On this CPU, None runs the XLA path: the same numbers as "xla".
    got = jax.jit(_loss(is_causal=True))(q, k, v)
    want = jax.jit(_loss(is_causal=True, implementation="xla"))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(
            np.asarray(g, np.float32), np.asarray(w, np.float32)
        )
    # Lowered for CUDA (from this CPU), None runs the three kernels: forward,
    # dK/dV and dQ. "xla" runs none.
    assert _lowered_text(_loss(is_causal=True), ["cuda"], q, k, v).count(TRITON) == 3
    assert TRITON not in _lowered_text(_loss(implementation="xla"), ["cuda"], q, k, v)
    assert TRITON not in _lowered_text(_loss(), ["cpu"], q, k, v)


@pytest.mark.parametrize("implementation", [None, "pallas"])
def test_one_program_for_cpu_and_cuda_runs_each_platforms_path(implementation):
    # One export for both platforms: the kernels in its CUDA branch, and on
    # this CPU the XLA path (None) or the kernels in interpret mode.
    q, k, v, _ = _arrays(2, jnp.float32)
    fn = _loss(is_causal=True, implementation=implementation, **CHUNKS)
    exported = cuda_lowering.export(fn, q, k, v, platforms=("cpu", "cuda"))
    assert exported.mlir_module().count(TRITON) == 3
    want = jax.jit(_loss(is_causal=True, implementation="xla", **CHUNKS))(q, k, v)
    assert_close(exported.call(q, k, v), want, 2e-5)


def _instructions(fn, *args):
    """The compiled program's instructions, without metadata or frame ids
    (which name the Python functions that built them), and with the values
    renamed in order of appearance (their numbers count what was traced)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"(, )?(stack_)?frame_id=[0-9]+", "", text)
    names = {}

    def rename(match):
        return names.setdefault(match.group(0), f"%v{len(names)}")

    return [
        re.sub(r"%[\w.\-]+", rename, line)
        for line in text.splitlines()
        if " = " in line and "file_location_id" not in line
    ]


def test_default_compiles_to_the_xla_path_on_cpu():
    # The kernels' branch is pruned when lowering for the CPU: the compiled
    # program of None is the XLA path's, instruction for instruction, so CPU
    # timings cannot move.
    q, k, v, _ = _arrays(2, jnp.float32)
    options = dict(is_causal=True, soft_cap=20.0, sinks=jnp.zeros(N))
    default = _instructions(_loss(**options), q, k, v)
    assert default == _instructions(_loss(implementation="xla", **options), q, k, v)
    assert default != _instructions(_loss(implementation="xla"), q, k, v)  # can fail


@pytest.mark.parametrize(
    "options, dtype",
    [
        (dict(query_chunk_size=24), jnp.bfloat16),  # not a power of two
        (dict(key_chunk_size=8), jnp.bfloat16),  # below Triton's 16
        ({}, jnp.float64),
    ],
)
def test_default_falls_back_where_the_kernels_do_not_run(options, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, _ = _arrays(2, dtype)
        text = _lowered_text(_loss(**options), ["cuda"], q, k, v)
        assert TRITON not in text
        with pytest.raises(
            ValueError, match="implementation='pallas' does not support"
        ):
            jsoftmax.dot_product_attention(q, k, v, implementation="pallas", **options)


def test_default_takes_the_xla_path_for_a_symbolic_batch():
    # jax.export shape polymorphism: the Triton grid is static, and lowering
    # the kernels over a symbolic batch for CUDA raised NotImplementedError
    # (dynamic grid bounds). None now takes the XLA path there, and runs the
    # kernels again once the batch is static; "pallas" names the reason.
    q, k, v, _ = _arrays(2, jnp.bfloat16)
    (b,) = jax.export.symbolic_shape("b")
    shapes = [jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype) for x in (q, k, v)]
    assert TRITON not in _lowered_text(_loss(is_causal=True), ["cuda"], *shapes)
    assert _lowered_text(_loss(is_causal=True), ["cuda"], q, k, v).count(TRITON) == 3
    with pytest.raises(ValueError, match="'pallas' does not support symbolic shapes"):
        _lowered_text(_loss(implementation="pallas"), ["cuda"], *shapes)


@pytest.mark.parametrize("implementation", [None, "pallas"])
def test_vmap_of_symbolic_size_takes_the_xla_path_for_cuda(implementation):
    # The op sees one example's static shapes under a vmap over a symbolic
    # batch; its batching rule gave the kernels a grid of dynamic bounds, and
    # the CUDA lowering raised NotImplementedError. The vmapped CUDA branch is
    # now the XLA path under None; "pallas" is refused with a ValueError.
    q, k, v, _ = _arrays(2, jnp.bfloat16)
    (b,) = jax.export.symbolic_shape("b")
    shapes = [jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype) for x in (q, k, v)]
    static = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]

    def one(q, k, v):
        return _loss(is_causal=True, implementation=implementation)(
            q[None], k[None], v[None]
        )

    assert _lowered_text(jax.vmap(one), ["cuda"], *static).count(TRITON) == 3
    if implementation is None:
        text = _lowered_text(jax.vmap(one), ["cuda"], *shapes)
        assert TRITON not in text and "stablehlo.while" in text
    else:
        with pytest.raises(ValueError, match="a vmap of symbolic size"):
            _lowered_text(jax.vmap(one), ["cuda"], *shapes)


def test_pallas_refuses_a_head_dim_past_its_limit():
    q, k, v, _ = _arrays(2, jnp.bfloat16, h=264)
    with pytest.raises(ValueError, match="head dim H of 264"):
        jsoftmax.dot_product_attention(q, k, v, implementation="pallas")


@pytest.mark.parametrize("bad", ["triton", "XLA", 3, True, np.array(["xla"]), b"xla"])
def test_unknown_implementation_is_refused(bad):
    q, k, v, _ = _arrays(2, jnp.float32)
    with pytest.raises(ValueError, match="implementation must be one of"):
        jsoftmax.dot_product_attention(q, k, v, implementation=bad)


@pytest.mark.parametrize(
    "option, value",
    [
        ("soft_cap", 30.0),
        ("sinks", np.zeros(N, np.float32)),
        ("query_chunk_size", 16),
        ("query_segment_ids", np.zeros((B, T), np.int32)),
        ("axis_name", "seq"),  # context parallelism would be dropped silently
    ],
)
@pytest.mark.parametrize("form", [str, np.str_, np.array])
def test_cudnn_refuses_what_it_lacks(option, value, form):
    # A NumPy string, which jax.nn compares as its string, names cuDNN too: a
    # 0-d array of "cudnn" skipped the refusals and ran the default path.
    q, k, v, _ = _arrays(2, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"implementation='cudnn' has no {option}"):
        jsoftmax.dot_product_attention(
            q, k, v, implementation=form("cudnn"), **{option: value}
        )


def test_cudnn_refuses_float32_and_a_right_window():
    q, k, v, _ = _arrays(2, jnp.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        jsoftmax.dot_product_attention(q, k, v, implementation="cudnn")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="no right part"):
        jsoftmax.dot_product_attention(
            q, k, v, implementation="cudnn", local_window_size=(4, 2)
        )


def test_cudnn_delegates_to_jax_nn(monkeypatch):
    # What reaches jax.nn: implementation="cudnn", int32 lengths, the window
    # as (left, 0).
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return args[0]

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v, _ = _arrays(2, jnp.bfloat16)
    out = jsoftmax.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True, local_window_size=7,
        key_value_seq_lengths=np.array([3, 4], np.int64),
    )  # fmt: skip
    assert out is q
    assert seen["implementation"] == "cudnn"
    assert seen["local_window_size"] == (7, 0)
    assert seen["key_value_seq_lengths"].dtype == jnp.int32
    assert seen["query_seq_lengths"] is None


# ---------------------------------------------------------------------------
# Lowered for CUDA: every configuration that None can pick, from this CPU.


def _configurations():
    """(name, dtype, head dim, T, S, key/value heads, options): each option
    alone and mixed, every kernel-supported dtype, head dims of 64, 128 and a
    padded one, sequences under one block and over several."""
    rng = np.random.default_rng(3)
    out = []
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        out.append((dtype.__name__, dtype, 64, 256, 256, 2, {}))
    for h in (128, 256, 80):
        out.append((f"h{h}", jnp.bfloat16, h, 256, 384, 2, {}))
    t, s = 200, 300
    options = {
        "causal": dict(is_causal=True),
        "window": dict(local_window_size=(64, 16)),
        "soft_cap": dict(soft_cap=30.0),
        "sinks": dict(sinks=jnp.zeros(N, jnp.float32)),
        "bias": dict(bias=jnp.zeros((1, N, t, s), jnp.bfloat16)),
        "row_bias": dict(bias=jnp.zeros((B, 1, t, 1), jnp.bfloat16)),
        "mask": dict(mask=jnp.asarray(rng.random((B, 1, 1, s)) < 0.5)),
        "lengths": dict(
            query_seq_lengths=jnp.array([t, 10], jnp.int32),
            key_value_seq_lengths=jnp.array([s, 5], jnp.int32),
        ),
        "segments": dict(
            query_segment_ids=jnp.zeros((B, t), jnp.int32),
            key_value_segment_ids=jnp.zeros((B, s), jnp.int32),
        ),
        "chunks": dict(query_chunk_size=32, key_chunk_size=64),
    }
    for name, opts in options.items():
        out.append((name, jnp.bfloat16, 64, t, s, 2, opts))
    everything = {k: v for opts in options.values() for k, v in opts.items()}
    everything["bias"] = options["bias"]["bias"]
    out.append(("everything_gqa", jnp.bfloat16, 64, t, s, 1, everything))
    out.append(("short", jnp.bfloat16, 64, 5, 7, 2, dict(is_causal=True)))
    return out


@pytest.mark.parametrize(
    "name, dtype, h, t, s, k_heads, options",
    _configurations(),
    ids=[c[0] for c in _configurations()],
)
def test_kernels_lower_for_cuda(name, dtype, h, t, s, k_heads, options):
    q, k, v, _ = _arrays(k_heads, dtype, t=t, s=s, h=h)
    text = _lowered_text(_loss(**options), ["cuda"], q, k, v)
    assert text.count(TRITON) == 3, name


def test_kernels_lower_for_cuda_under_vmap():
    q, k, v, _ = _arrays(2, jnp.bfloat16, t=128, s=128, h=64)
    fn = jax.vmap(_loss(is_causal=True), (0, None, None))
    text = _lowered_text(fn, ["cuda"], jnp.stack([q, q]), k, v)
    assert text.count(TRITON) == 3


def _in_shard_map(check_vma, sinks, **options):
    """value_and_grad of the op inside a shard_map over a one-device "b"
    axis: the batch split over it, or with axis_name, the sequence
    (context parallelism); replicated sinks (N,) beside the split q, k, v."""
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((1,), ("b",), (jax.sharding.AxisType.Auto,))
    split = P(None, "b") if options.get("axis_name") else P("b")

    def loss(q, k, v):
        def body(q, k, v, sinks):
            return jsoftmax.dot_product_attention(q, k, v, sinks=sinks, **options)

        f = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(split, split, split, P()),
            out_specs=split,
            check_vma=check_vma,
        )
        return jnp.sum(f(q, k, v, sinks).astype(jnp.float32))

    return jax.value_and_grad(loss, (0, 1, 2))


@pytest.mark.parametrize("parallel", [{}, dict(axis_name="b")], ids=["batch", "cp"])
@pytest.mark.parametrize("implementation", [None, "pallas"])
def test_kernels_lower_for_cuda_inside_shard_map_tracking_variation(
    implementation, parallel
):
    # Pallas' interpreter cannot run there (the next test); the CUDA lowering
    # of the same program holds the kernels: the forward's and the
    # backward's two (context parallelism on one device: one pair).
    q, k, v, _ = _arrays(2, jnp.bfloat16, t=128, s=128, h=64)
    sinks = jnp.zeros(N, jnp.bfloat16)
    fn = _in_shard_map(
        True, sinks, is_causal=True, implementation=implementation, **parallel
    )
    text = _lowered_text(fn, ["cuda"], q, k, v)
    assert text.count(TRITON) == 3


@pytest.mark.parametrize("parallel", [{}, dict(axis_name="b")], ids=["batch", "cp"])
def test_interpreted_kernels_inside_shard_map_tracking_variation_say_so(parallel):
    # JAX's Pallas interpreter raised "requires varying manual axes to match
    # ... please open an issue" when lowered, in the backward pass (and the
    # forward with sinks); with check_vma=False it runs, equal to the XLA path.
    q, k, v, _ = _arrays(2, jnp.float32, t=32, s=32, h=16)
    sinks = jnp.linspace(-1.0, 1.0, N)
    options = dict(is_causal=True, **CHUNKS, **parallel)
    fn = _in_shard_map(True, sinks, implementation="pallas", **options)
    with pytest.raises(ValueError, match="check_vma=False to shard_map"):
        jax.jit(fn)(q, k, v)
    got = jax.jit(_in_shard_map(False, sinks, implementation="pallas", **options))
    want = jax.jit(_in_shard_map(True, sinks, implementation="xla", **options))
    value_rtol, grad_rtol = RTOL[jnp.float32]
    (value, grads), (want_value, want_grads) = got(q, k, v), want(q, k, v)
    assert_close(value, want_value, value_rtol, "value")
    assert_close(grads, want_grads, grad_rtol, "gradients")


def test_unsupported_reasons_name_the_option():
    why = _attention_pallas.unsupported
    assert why(jnp.bfloat16, 128, None, None) is None
    assert "float64" in why(jnp.float64, 64, None, None)
    assert "key_chunk_size=48" in why(jnp.float32, 64, 64, 48)
    (b,) = jax.export.symbolic_shape("b")
    assert "symbolic" in why(jnp.float32, 64, None, None, ((b, 4, 2, 64),))
    assert why(jnp.float32, 64, None, None, ((3, 4, 2, 64),)) is None


# ---------------------------------------------------------------------------
# On a CUDA GPU (bench/gpu.sh): the compiled kernels against the XLA path.


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_equal_the_xla_path(name, dtype):
    want = _run("xla", CASES[name], dtype)
    assert_runs_close(_run(None, CASES[name], dtype), want, dtype)


@pytest.mark.gpu
def test_gpu_default_runs_the_kernels():
    q, k, v, _ = _arrays(2, jnp.bfloat16, t=256, s=256, h=64)
    text = jax.jit(_loss(is_causal=True)).lower(q, k, v).as_text()
    assert TRITON in text or "triton" in text


def test_kernels_second_derivatives_are_the_xla_paths():
    # hessian (forward over reverse) and jacrev(jacrev) differentiate the
    # kernels through the XLA path's derivative of the same function.
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, 16, 2, 16)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)

    def f(implementation):
        def loss(q):
            out = jsoftmax.dot_product_attention(
                q, q, q, bias, is_causal=True, implementation=implementation
            )
            return jnp.sum(out**2)

        return loss

    for second in (jax.hessian, lambda g: jax.jacrev(jax.grad(g))):
        assert_close(second(f("pallas"))(q), second(f("xla"))(q), 1e-5)


@pytest.mark.parametrize("implementation", ["pallas", None])
def test_residuals_are_q_k_v_output_and_lse(implementation):
    # Nothing of size T x S is saved for the backward pass, on either path.
    q, k, v, _ = _arrays(2, jnp.bfloat16)
    bias = jnp.zeros((1, N, T, S), jnp.bfloat16)

    def attention(q, k, v, bias):
        return jsoftmax.dot_product_attention(
            q, k, v, bias, is_causal=True, implementation=implementation, **CHUNKS
        )

    shapes = sorted(
        tuple(a.shape) for a, _ in saved_residuals(attention, q, k, v, bias)
    )
    want = sorted([q.shape, k.shape, v.shape, bias.shape, q.shape, (B, 2, N // 2, T)])
    assert shapes == want

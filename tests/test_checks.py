"""The wrappers the ops share: attention's, the fused loss's, softmax's and
log_softmax's rules under a cached jit (``traced_once``), inlined into staged
traces. Outside ``jit`` a call, its gradient, or a second derivative at
types and options seen before compiles nothing (the per-example losses run
op by op there); under ``jit`` the program holds no call of its own."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import compiles

import jsoftmax
from jsoftmax import _attention as _attention_module
from jsoftmax import _checks, _cross_entropy, _linear_cross_entropy, _softmax

K = jax.random.split(jax.random.key(3), 8)
X = jax.random.normal(K[0], (4, 12))
LABELS = jnp.array([3, -100, 11, 0], jnp.int16)
WHERE = LABELS >= 0
Q = jax.random.normal(K[1], (2, 8, 4, 4))
KV = jax.random.normal(K[2], (2, 8, 2, 4))
H = jax.random.normal(K[3], (4, 6))
W = jax.random.normal(K[4], (6, 12))
SEGMENTS = jnp.array([[0, 0, 0, 1, 1, 1, 2, 2]] * 2)


def _attention(**options):
    return (
        lambda q, kv: jsoftmax.dot_product_attention(q, kv, kv, **options),
        (Q, KV),
    )


# name -> (function, args), every op and the options that change its rule.
OPS = {
    "softmax": (jsoftmax.softmax, (X,)),
    "softmax where, axis=0": (
        lambda x: jsoftmax.softmax(x, axis=0, where=x > 0),
        (X,),
    ),
    "log_softmax": (jsoftmax.log_softmax, (X,)),
    "softmax_cross_entropy": (
        lambda x: jsoftmax.softmax_cross_entropy(x, jax.nn.softmax(2 * x)),
        (X,),
    ),
    "integer labels, -100 masked, smoothing": (
        lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(
            x, LABELS, where=WHERE[:, None], label_smoothing=0.1
        ),
        (X,),
    ),
    "linear_softmax_cross_entropy, chunks of 2": (
        lambda h, w: jsoftmax.linear_softmax_cross_entropy(
            h, w, LABELS, where=WHERE, chunk_size=2
        ),
        (H, W),
    ),
    "attention causal, grouped": _attention(
        is_causal=True, query_chunk_size=4, key_chunk_size=4
    ),
    "attention window, segments, lengths, sinks, soft cap": _attention(
        local_window_size=(3, 1),
        query_segment_ids=SEGMENTS,
        key_value_segment_ids=SEGMENTS,
        key_value_seq_lengths=jnp.array([8, 5]),
        sinks=jnp.array([0.5, -1.0, 0.0, 2.0]),
        soft_cap=5.0,
        query_chunk_size=4,
        key_chunk_size=4,
    ),
    "attention bias, mask": _attention(
        bias=jax.random.normal(K[5], (1, 4, 8, 8)),
        mask=jax.random.bernoulli(K[6], 0.7, (2, 1, 8, 8)),
    ),
    "attention pallas (interpreted)": _attention(
        is_causal=True, implementation="pallas", query_chunk_size=16
    ),
}


def _grad(f):
    return jax.grad(lambda *a: jnp.sum(f(*a)), argnums=0)


@pytest.mark.parametrize("mode", ["call", "grad"])
@pytest.mark.parametrize("name", list(OPS))
def test_a_repeated_eager_call_compiles_nothing(name, mode):
    # The block loops (attention, the fused loss) were traced and compiled
    # again at every call outside jit: 250 ms a call for a small attention.
    f, args = OPS[name]
    _assert_called_again_without_compiling(f if mode == "call" else _grad(f), args)


def _assert_called_again_without_compiling(f, args, tol=1e-6):
    """A second eager call of ``f`` compiles nothing and repeats the first's
    values, which are those of ``jit(f)`` (one program, the rule inlined)."""
    first = f(*args)
    with compiles() as names:
        again = f(*args)
        jax.block_until_ready(again)
    assert names == []
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(again, jax.jit(f)(*args), rtol=tol, atol=tol)


SECOND_DERIVATIVES = {
    # Hessian-vector products, forward over reverse and reverse over reverse.
    "jvp(grad)": lambda f: lambda *a: jax.jvp(_grad(f), a, a)[1],
    "grad(grad)": lambda f: _grad(lambda *a: jnp.sum(_grad(f)(*a) ** 2)),
}


@pytest.mark.parametrize("form", list(SECOND_DERIVATIVES))
@pytest.mark.parametrize("name", [n for n in OPS if "pallas" not in n])
def test_a_repeated_eager_second_derivative_compiles_nothing(name, form):
    # JAX evaluates the first derivative's rules eagerly under an outer jvp
    # or grad: the rules were traced again at every call, and each loop in
    # them, its transpose and its tangent program compiled again (0.5-3 s a
    # call for a small attention, 0.1 s for the fused loss).
    f, args = OPS[name]
    _assert_called_again_without_compiling(SECOND_DERIVATIVES[form](f), args, 1e-5)


@pytest.mark.parametrize("mode", ["call", "grad"])
def test_a_loss_option_schedule_outside_jit_compiles_nothing(mode):
    # The per-example losses run op by op outside jit (not through a program
    # cached per static option): a smoothing or z_loss value changed at every
    # call compiled a new program each time (72 ms a call, and the programs
    # kept) while their rules went through traced_once.
    for op, labels in (
        (jsoftmax.softmax_cross_entropy, jax.nn.softmax(2 * X)),
        (jsoftmax.softmax_cross_entropy_with_integer_labels, jnp.abs(LABELS) % 12),
    ):

        def loss(x, value, op=op, labels=labels):
            return op(x, labels, label_smoothing=value, z_loss=value / 10)

        f = loss if mode == "call" else jax.grad(lambda *a: jnp.sum(loss(*a)))
        f(X, 0.05)
        with compiles() as names:
            for value in (0.1, 0.2, 0.3):
                jax.block_until_ready(f(X, value))
        assert names == []


def test_the_compile_counter_sees_a_compile_per_call():
    # A control: a function jit traces anew at every call (as the eager block
    # loops were) is seen compiling each time.
    def retraced(x):
        return jax.jit(lambda y: jnp.sum(jnp.exp(y)))(x)

    retraced(X)
    with compiles() as names:
        retraced(X)
    assert len(names) == 1


def test_new_static_options_and_types_are_traced_anew():
    # The cache is keyed on the static options and the argument types: a
    # call that differs in either gets its own program.
    f = functools.partial(jsoftmax.dot_product_attention, query_chunk_size=4)
    f(Q, KV, KV)
    for changed in (
        lambda: f(Q, KV, KV, is_causal=True),
        lambda: f(Q, KV, KV, scale=0.3),
        lambda: f(Q[:, :6], KV, KV),
        lambda: f(Q.astype(jnp.bfloat16), *(KV.astype(jnp.bfloat16),) * 2),
    ):
        with compiles() as names:
            changed()
        assert names
    got = f(Q, KV, KV, scale=0.3)
    want = jax.nn.dot_product_attention(Q, KV, KV, scale=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPS))
def test_under_jit_the_rule_is_inlined(name):
    # No call of its own in the jaxpr: the programs, residuals and memory
    # tests see what they saw before.
    f, args = OPS[name]

    def twice(*a):
        return f(*a), f(*a)

    assert not _rule_calls(jax.make_jaxpr(twice)(*args))


# The ops' rules, as jit names their calls.
RULES = {
    rule.__name__
    for rule in (
        _softmax._softmax_forward_mode,
        _softmax._log_softmax_forward_mode,
        _cross_entropy._softmax_cross_entropy_forward_mode,
        _cross_entropy._integer_cross_entropy_forward_mode,
        _linear_cross_entropy._linear_cross_entropy_forward_mode,
        _attention_module._attention_forward_mode,
    )
}


def _rule_calls(jaxpr):
    """The top-level jit calls of a rule in a jaxpr (jnp's own jits, such as
    jnp.where's, are left out)."""
    return [
        e.params["name"]
        for e in jaxpr.eqns
        if e.primitive.name in ("jit", "pjit") and e.params["name"] in RULES
    ]


def test_the_rule_call_check_sees_a_call():
    # A control: the same rule under a jit that is not inlined is seen.
    rule = _softmax._softmax_forward_mode
    called = jax.jit(rule, static_argnums=rule.nondiff_argnums)
    jaxpr = jax.make_jaxpr(lambda x: called(x, None, (1,), None))(X)
    assert _rule_calls(jaxpr) == [rule.__name__]
    assert len(RULES) == 6


def test_a_layer_stack_traces_the_attention_rule_once(monkeypatch):
    rule = _attention_module._attention_forward_mode
    calls = []

    def counted(*args):
        calls.append(args[-1])
        return rule(*args)

    counted.nondiff_argnums = rule.nondiff_argnums
    monkeypatch.setattr(_attention_module, "_attention_forward_mode", counted)

    def stack(x):
        for _ in range(4):
            x = x + jsoftmax.dot_product_attention(x, x, x, is_causal=True)
        return jnp.sum(x)

    jax.make_jaxpr(jax.grad(stack))(Q)
    assert len(calls) == 1
    stack(Q[:, :5])  # eager, a new shape
    assert len(calls) == 2


def test_optax_still_matches_after_a_cached_call():
    # A cached program is not reused for other label values (labels are
    # arguments, not static).
    loss = jsoftmax.softmax_cross_entropy_with_integer_labels
    for labels in (jnp.array([1, 2, 3, 4]), jnp.array([0, 0, 11, 5])):
        np.testing.assert_allclose(
            loss(X, labels),
            optax.softmax_cross_entropy_with_integer_labels(X, labels),
            rtol=1e-6,
        )


def _window_pair(q, k, v, *, local_window_size):
    return jsoftmax.dot_product_attention(
        q, k, v, local_window_size=(1, local_window_size)
    )


_LOSSES = [
    (jsoftmax.softmax_cross_entropy, (X, X), {}),
    (
        jsoftmax.softmax_cross_entropy_with_integer_labels,
        (X, LABELS),
        {"where": WHERE[:, None]},
    ),
    (jsoftmax.linear_softmax_cross_entropy, (H, W, LABELS), {"where": WHERE}),
]
# The static number options of every op: (option, a valid value, op, args, kw).
NUMBER_OPTIONS = [
    ("axis", -1, jsoftmax.softmax, (X,), {}),
    ("axis", -1, jsoftmax.log_softmax, (X,), {}),
    ("axis", -1, jsoftmax.softmax_cross_entropy, (X, X), {}),
    ("chunk_size", 2, jsoftmax.linear_softmax_cross_entropy, (H, W, LABELS % 12), {}),
    ("axis_size", 2, jsoftmax.to_zigzag, (X,), {}),
    ("axis", 1, jsoftmax.from_zigzag, (X, 2), {}),
    ("scale", 2, jsoftmax.dot_product_attention, (Q, KV, KV), {}),
    ("soft_cap", 2, jsoftmax.dot_product_attention, (Q, KV, KV), {}),
    ("query_chunk_size", 2, jsoftmax.dot_product_attention, (Q, KV, KV), {}),
    ("key_chunk_size", 2, jsoftmax.dot_product_attention, (Q, KV, KV), {}),
    ("local_window_size", 2, jsoftmax.dot_product_attention, (Q, KV, KV), {}),
    ("local_window_size", 2, _window_pair, (Q, KV, KV), {}),
] + [
    (arg, value, op, args, kw)
    for op, args, kw in _LOSSES
    for arg, value in (("label_smoothing", 0), ("z_loss", 1), ("soft_cap", 2))
]


@pytest.mark.parametrize(
    "arg,value,op,args,kw",
    NUMBER_OPTIONS,
    ids=[f"{o[2].__name__}-{o[0]}" for o in NUMBER_OPTIONS],
)
def test_timedeltas_datetimes_and_complex_numbers_are_not_number_options(
    arg, value, op, args, kw
):
    # NumPy counts timedelta64 as an integer: np.timedelta64(2) passed as a
    # soft cap, a z_loss, an axis or a chunk size meant 2, and a complex scale
    # lost its imaginary part with only a warning.
    for good in (value, np.int64(value), jnp.array(value)):
        op(*args, **kw, **{arg: good})  # the control: the number is accepted
    bad = [
        np.timedelta64(value),
        np.array(value, "m8[s]"),
        np.datetime64(value, "s"),
        complex(value, 1),
        np.complex64(value),
        jnp.array(complex(value, 1)),
    ]
    for v in bad:
        with pytest.raises((TypeError, ValueError), match=rf"\b{arg}\b"):
            op(*args, **kw, **{arg: v})


def test_number_kind_tells_ints_floats_and_the_rest():
    ints = [3, np.int8(3), np.uint64(3), jnp.array(3, jnp.int16), np.array(3)]
    floats = [0.5, np.float16(0.5), jnp.bfloat16(0.5), np.array(0.5, jnp.float8_e4m3fn)]
    others = [
        True, np.bool_(True), jnp.array(True), "3", b"3", None, [3], np.ones(2),
        np.ones((1,)), 3j, np.complex128(3), np.timedelta64(3), np.datetime64(3, "s"),
    ]  # fmt: skip
    assert [_checks.number_kind(v) for v in ints] == ["i"] * len(ints)
    assert [_checks.number_kind(v) for v in floats] == ["f"] * len(floats)
    assert [_checks.number_kind(v) for v in others] == [None] * len(others)
    traced = jax.jit(lambda a: _checks.number_kind(a) == "f" and a)
    assert traced(jnp.float32(0.5))  # a traced scalar keeps its kind

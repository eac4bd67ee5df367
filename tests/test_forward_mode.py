"""Forward mode for every op and for users' own custom_vjp (with_forward_mode).

Every op is checked against plain autodiff of jax.nn / optax / jsoftmax.testing
references: jvp, jacfwd, linearize and vmap(jvp); Hessians (jax.hessian is
jacfwd(jacrev)), jvp-of-grad HVPs and jacfwd(jacfwd); float64 finite
differences in both modes. Reverse mode must stay exactly what it was: the
same residuals and the same compiled program as the bare custom_vjp. Shapes
are small and each check runs once: the file takes about a minute.
"""

import functools
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import compiles
from jax import lax
from jax._src.ad_checkpoint import saved_residuals
from leaks import checking_leaks

import jsoftmax
from jsoftmax import (
    _attention,
    _cross_entropy,
    _forward_mode,
    _linear_cross_entropy,
    _softmax,
    testing,
)

TOL = dict(atol=2e-5, rtol=2e-5)
TOL2 = dict(atol=2e-5, rtol=1e-4)  # second derivatives
K = jax.random.split(jax.random.key(12), 8)
X = 2.0 * jax.random.normal(K[0], (3, 5))
Q = jax.nn.softmax(jax.random.normal(K[1], (3, 5)))
IDS = jnp.array([1, 4, 0])
MASK = jnp.array([True, True, False, True, True])
OPTS = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=4.0)
XL = jax.random.normal(K[2], (4, 3))
W = jax.random.normal(K[3], (3, 4))
BIAS = jnp.linspace(-1.0, 1.0, 4)
YL = jnp.array([0, 3, 1, 2])


def _linear(op):
    def f(x, w, b):
        return op(x, w, YL, bias=b, chunk_size=2, reduction="none", **OPTS)

    return f


def _linear_reference(x, w, b):
    return testing.reference_softmax_cross_entropy_with_integer_labels(
        x @ w + b[None], YL, **OPTS
    )


# name: (op, reference, differentiated arguments)
OPS = {
    "softmax": (jsoftmax.softmax, jax.nn.softmax, (X,)),
    "softmax[where]": (
        functools.partial(jsoftmax.softmax, where=MASK),
        functools.partial(testing.reference_softmax, where=MASK),
        (X,),
    ),
    "log_softmax": (jsoftmax.log_softmax, jax.nn.log_softmax, (X,)),
    "softmax_cross_entropy": (
        jsoftmax.softmax_cross_entropy,
        optax.softmax_cross_entropy,
        (X, Q),
    ),
    "softmax_cross_entropy[opts]": (
        # Label mass on a masked class is +inf: the labels are taken on the
        # valid classes only, so that finite differences in any direction
        # stay finite.
        lambda z, q: jsoftmax.softmax_cross_entropy(
            z, jnp.where(MASK, q, 0), where=MASK, **OPTS
        ),
        lambda z, q: testing.reference_softmax_cross_entropy(
            z, jnp.where(MASK, q, 0), where=MASK, **OPTS
        ),
        (X, jnp.where(MASK, Q, 0.0)),
    ),
    "integer_labels": (
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(z, IDS),
        lambda z: optax.softmax_cross_entropy_with_integer_labels(z, IDS),
        (X,),
    ),
    "integer_labels[opts]": (
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(
            z, IDS, where=MASK, **OPTS
        ),
        lambda z: testing.reference_softmax_cross_entropy_with_integer_labels(
            z, IDS, where=MASK, **OPTS
        ),
        (X,),
    ),
    "linear_softmax_cross_entropy": (
        _linear(jsoftmax.linear_softmax_cross_entropy),
        _linear_reference,
        (XL, W, BIAS),
    ),
}
op_names = pytest.mark.parametrize("name", list(OPS))


def _tangents(args, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(args))
    return tuple(
        jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, args, strict=True)
    )


def _scalar(f):
    """A scalar of f's output with a nonzero second derivative everywhere."""
    return lambda *a: jnp.sum(
        jnp.sin(f(*a)) * jnp.cos(jnp.arange(f(*a).size)).reshape(f(*a).shape)
    )


def _close(got, want, **tol):
    chex.assert_trees_all_close(got, want, **(tol or TOL))


@functools.partial(jax.jit, static_argnums=0)
def _first_order(f, args, t):
    """jvp, jacfwd (reference: jacrev), linearize and vmap(jvp) of f."""
    argnums = tuple(range(len(args)))
    _, f_lin = jax.linearize(f, *args)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), (args, t))
    return dict(
        jvp=jax.jvp(f, args, t),
        jacobian=jax.jacfwd(f, argnums)(*args),
        linearize=f_lin(*t),
        vmap=jax.vmap(lambda a, t: jax.jvp(f, a, t))(*stacked),
    )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _second_order(f, args, t, fwd_fwd):
    """Hessian (jacfwd(jacrev)), HVP (jvp of grad) and jacfwd(jacfwd)."""
    s = _scalar(f)
    argnums = tuple(range(len(args)))
    out = dict(
        hessian=jax.hessian(s, argnums)(*args),
        hvp=jax.jvp(jax.grad(s, argnums), args, t)[1],
    )
    if fwd_fwd:
        out["fwd_fwd"] = jax.jacfwd(jax.jacfwd(s, argnums), argnums)(*args)
    return out


@op_names
def test_first_and_second_order_forward_mode_match_the_reference(name):
    op, reference, args = OPS[name]
    t = _tangents(args)
    want = dict(_first_order(reference, args, t))
    want["jacobian"] = jax.jacrev(reference, tuple(range(len(args))))(*args)
    _close(_first_order(op, args, t), want)
    # jacfwd(jacfwd) of the fused loss (a scan in a scan) compiles slowly, and
    # shares all its code with the others'.
    fwd_fwd = name != "linear_softmax_cross_entropy"
    _close(
        _second_order(op, args, t, fwd_fwd),
        _second_order(reference, args, t, fwd_fwd),
        **TOL2,
    )


# name: (op of the logits and float labels, whose argument leaves are all
# masked by MASK along the last axis)
MASKED = {
    "softmax": lambda z, q: jsoftmax.softmax(z, where=MASK),
    "log_softmax": lambda z, q: jsoftmax.log_softmax(z, where=MASK),
    "softmax_cross_entropy": lambda z, q: jsoftmax.softmax_cross_entropy(
        z, q, where=MASK, **OPTS
    ),
    "integer_labels": lambda z, q: jsoftmax.softmax_cross_entropy_with_integer_labels(
        z, IDS, where=MASK, **OPTS
    ),
}


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("name", sorted(MASKED))
def test_a_non_finite_tangent_at_a_masked_entry_takes_no_part(name, bad):
    # Masked entries take no part in the value, nor in the reverse-mode
    # gradient: nor in forward mode. log_softmax's tangent map (bwd
    # transposed) and the label tangent of softmax_cross_entropy took
    # exp(o) * t and (L - z) * t with a 0 factor at masked entries, so a NaN
    # there made the whole row's tangent NaN.
    f = MASKED[name]
    z, q = X, jnp.where(MASK, Q, 0.0)
    t = _tangents((z, q))
    dirty = tuple(jnp.where(MASK, x, bad) for x in t)
    clean = tuple(jnp.where(MASK, x, 0.0) for x in t)
    y, dy = jax.jvp(f, (z, q), dirty)
    assert np.isfinite(np.asarray(dy)[np.isfinite(np.asarray(y))]).all()
    _close((y, dy), jax.jvp(f, (z, q), clean))
    # The control: the same tangent unmasked reaches the output.
    assert not np.isfinite(jax.jvp(f, (z, q), (t[0] + bad, t[1]))[1]).all()


@pytest.mark.parametrize(
    "options", [{}, dict(label_smoothing=0.1), dict(z_loss=1e-2)], ids=str
)
def test_an_unmasked_minus_inf_logit_without_label_mass(options):
    # jvp and jacfwd in the logits were NaN at an unmasked -inf logit whose
    # label is 0, and so was the labels' gradient of a row dropped by
    # jnp.where(keep, loss, 0): the labels' factor L - z was +inf there and
    # met a zero label tangent (forward mode is bwd transposed) or a zero
    # cotangent. It is the forward's own derivative now (z clamped to the
    # lowest finite value, as in the loss), finite.
    z = jnp.array([[0.5, -jnp.inf, 0.2], [1.0, 0.0, -1.0]])
    q = jnp.array([[0.3, 0.0, 0.7], [0.2, 0.5, 0.3]])

    def f(z, q):
        return jsoftmax.softmax_cross_entropy(z, q, **options)

    t = jnp.array([[1.0, 0.0, 0.5], [0.3, -1.0, 0.2]])
    dz, dq = jax.grad(lambda z, q: jnp.sum(f(z, q)), (0, 1))(z, q)
    assert np.isfinite(np.asarray(dz)).all()
    _, dy = jax.jvp(lambda z: f(z, q), (z,), (t,))
    _close(dy, jnp.sum(jax.jacrev(lambda z: f(z, q))(z) * t[None], axis=(1, 2)))
    _close(jax.jacfwd(lambda z: f(z, q))(z), jax.jacrev(lambda z: f(z, q))(z))
    # The row dropped by where has zero gradients, labels' included.
    keep = jnp.array([False, True])
    dropped = jax.grad(lambda z, q: jnp.sum(jnp.where(keep, f(z, q), 0)), (0, 1))
    for g in dropped(z, q):
        np.testing.assert_array_equal(g[0], 0)
        assert np.isfinite(np.asarray(g)).all()


def test_jacfwd_of_log_softmax_of_log_probabilities_with_zeros_masked():
    # Probabilities with zeros, their logs masked where they are 0: jacfwd
    # was NaN throughout (jax.nn's is finite). A one-entry row's Jacobian is
    # 0 (a clamp at the sum's tie would give 0.5).
    p = jnp.array([0.2, 0.0, 0.3, 0.5])

    def f(p, op=jsoftmax.log_softmax):
        return op(jnp.log(p), where=p > 0)

    got = jax.jacfwd(f)(p)
    _close(got, jax.jacfwd(functools.partial(f, op=jax.nn.log_softmax))(p))
    assert np.isfinite(np.asarray(got)).all()
    _close(jax.jacfwd(jsoftmax.log_softmax)(jnp.ones(1)), jnp.zeros((1, 1)))


# Rows whose sum of exp(x - max) is exactly 1: the other entries past exp's
# range (row 0), or a single valid entry (row 2, under ONE). Labels sit on the
# largest entry, so that the losses (under a sin) stay small.
PEAKED = X.at[0].set(jnp.array([1.0, -300.0, -200.0, -250.0, -400.0]))
ONE = jnp.array([[True] * 5, [True] * 5, [False, False, True, False, False]])
PEAKED_IDS = jnp.argmax(jnp.where(ONE, PEAKED, -jnp.inf), axis=-1)
PEAKED_Q = jax.nn.one_hot(PEAKED_IDS, 5).at[1].set(Q[1])
PEAKED_OPS = {
    "softmax": (jsoftmax.softmax, testing.reference_softmax, None),
    "log_softmax": (jsoftmax.log_softmax, testing.reference_log_softmax, None),
    "softmax_cross_entropy": (
        jsoftmax.softmax_cross_entropy,
        testing.reference_softmax_cross_entropy,
        PEAKED_Q,
    ),
    "integer_labels": (
        jsoftmax.softmax_cross_entropy_with_integer_labels,
        testing.reference_softmax_cross_entropy_with_integer_labels,
        PEAKED_IDS,
    ),
}


@pytest.mark.parametrize("where", [None, ONE], ids=["no_mask", "one_valid_entry"])
@pytest.mark.parametrize("name", sorted(PEAKED_OPS))
def test_second_derivatives_where_a_rows_sum_is_exactly_one(name, where):
    # The forward pass floors the row sum (0 in a row with no valid entry);
    # autodiff of it gives the residuals' tangents in second derivatives. A
    # floor of 1 tied with these rows' sums and halved their derivative:
    # Hessians and jacrev(jacrev) 0.5 off.
    op, reference, labels = PEAKED_OPS[name]

    def derivatives(f):
        def g(z):
            return f(z, where=where) if labels is None else f(z, labels, where=where)

        out = _second_order(g, (PEAKED,), _tangents((PEAKED,)), True)
        return dict(out, rev_rev=jax.jacrev(jax.grad(_scalar(g)))(PEAKED))

    _close(derivatives(op), derivatives(reference), **TOL2)


# A row with no valid entry by its values, all -inf, no mask. log(0) under a
# select made reverse over reverse NaN in both losses (the probability one
# always, the integer one with z_loss) and reverse over forward NaN in
# log_softmax, in every row; first derivatives and jax.hessian were right,
# and so were rows masked by `where` (the where cuts the path). The ops work
# row by row, so the Hessian is block diagonal: 0 for the empty row, the
# Hessian of the valid rows alone elsewhere. (No soft cap: it maps -inf to a
# finite logit.)
EMPTY_ROW_OPS = {  # the output for logits z of the rows `rows` of X
    "softmax": lambda z, rows: jsoftmax.softmax(z),
    "log_softmax": lambda z, rows: jnp.exp(jsoftmax.log_softmax(z)),
    "softmax_cross_entropy": lambda z, rows: jsoftmax.softmax_cross_entropy(
        z, Q[rows], label_smoothing=0.1, z_loss=0.1
    ),
    "integer_labels_z_loss": lambda z, rows: (
        jsoftmax.softmax_cross_entropy_with_integer_labels(z, IDS[rows], z_loss=0.1)
    ),
}


@pytest.mark.parametrize("name", sorted(EMPTY_ROW_OPS))
def test_second_derivatives_of_an_all_minus_inf_row_vanish_in_every_order(name):
    op = EMPTY_ROW_OPS[name]
    z, valid_rows = X.at[1].set(-jnp.inf), np.array([0, 2])
    weights = jax.random.normal(K[4], X.shape)

    def objective(z, rows=slice(None)):
        out = op(z, rows)  # [rows, 5], or a loss per row
        return jnp.sum(out * (weights[rows] if out.ndim == 2 else weights[rows, 0]))

    orders = {
        "rev_rev": jax.jacrev(jax.jacrev(objective)),
        "rev_fwd": jax.jacrev(jax.jacfwd(objective)),
        "fwd_rev": jax.jacfwd(jax.jacrev(objective)),
        "fwd_fwd": jax.jacfwd(jax.jacfwd(objective)),
    }
    valid = jax.hessian(lambda zv: objective(zv, valid_rows))(z[valid_rows])
    want = jnp.zeros(X.shape + X.shape)
    for i, row in enumerate(valid_rows):
        want = want.at[row, :, row, :].set(valid[i, :, i, :])
    assert float(jnp.max(jnp.abs(want))) > 0.01  # a check with something to see
    for order, hessian in orders.items():
        _close({order: jax.jit(hessian)(z)}, {order: want}, **TOL2)
    # The gradient-norm penalty: reverse over reverse of a user's objective.
    penalty = jax.grad(lambda z: jnp.sum(jax.grad(objective)(z) ** 2))(z)
    assert not jnp.any(penalty[1]) and jnp.all(jnp.isfinite(penalty))


def test_a_slightly_wrong_tangent_is_caught(monkeypatch):
    # A backward pass 0.1% off fails the first-order comparisons above, one 1%
    # off the second-order ones (whose entries are smaller than TOL2's atol).
    # Each wrong rule is a new custom_vjp swapped in for softmax's (the op
    # traces each rule object once: a rule redefined in place is not seen).
    bwd = _softmax._softmax_bwd

    def swap_in(scale):
        def wrong(axes, axis_name, res, g):
            dx, dwhere = bwd(axes, axis_name, res, g)
            return dx * scale, dwhere

        rule = jax.custom_vjp(_softmax._softmax.fun, nondiff_argnums=(2, 3))
        rule.defvjp(_softmax._softmax_fwd, wrong)
        wrapped = jsoftmax.with_forward_mode(rule, symmetric=True)
        monkeypatch.setattr(_softmax, "_softmax_forward_mode", wrapped)

    t = _tangents((X,))
    s, ref = _scalar(jsoftmax.softmax), _scalar(jax.nn.softmax)
    swap_in(1.001)
    with pytest.raises(AssertionError):
        _close(jax.jvp(jsoftmax.softmax, (X,), t), jax.jvp(jax.nn.softmax, (X,), t))
    swap_in(1.01)
    with pytest.raises(AssertionError):
        _close(jax.hessian(s)(X[0]), jax.hessian(ref)(X[0]), **TOL2)
    swap_in(1.0)
    _close(jax.jvp(jsoftmax.softmax, (X,), t), jax.jvp(jax.nn.softmax, (X,), t))
    _close(jax.hessian(s)(X[0]), jax.hessian(ref)(X[0]), **TOL2)


@op_names
def test_float64_finite_differences_forward_and_reverse(name):
    op, _, args = OPS[name]
    with jax.enable_x64(True):
        args = tuple(a.astype(jnp.float64) for a in args)
        jax.test_util.check_grads(
            jax.jit(_scalar(op)),
            args,
            order=2,
            modes=["fwd", "rev"],
            atol=1e-5,
            rtol=1e-5,
        )


# Reverse mode unchanged: each op against its bare custom_vjp (the
# with_forward_mode wrappers swapped back out).
_WRAPPED = [
    (_softmax, "_softmax_forward_mode", _softmax._softmax),
    (_softmax, "_log_softmax_forward_mode", _softmax._log_softmax),
    (
        _cross_entropy,
        "_softmax_cross_entropy_forward_mode",
        _cross_entropy._softmax_cross_entropy,
    ),
    (
        _cross_entropy,
        "_integer_cross_entropy_forward_mode",
        _cross_entropy._integer_cross_entropy,
    ),
    (_cross_entropy, "loud_labels", _cross_entropy._loud_labels),
    (_linear_cross_entropy, "loud_labels", _cross_entropy._loud_labels),
    (
        _linear_cross_entropy,
        "_linear_cross_entropy_forward_mode",
        _linear_cross_entropy._linear_cross_entropy,
    ),
]


def _bare(monkeypatch):
    for module, name, custom_vjp in _WRAPPED:
        assert isinstance(custom_vjp, jax.custom_vjp)
        monkeypatch.setattr(module, name, custom_vjp)


def programs(f, *args):
    """jit(f)'s optimised HLO, without the module name and the source
    locations (file names and line numbers of the Python that traced it)."""
    compiled = jax.jit(f).lower(*args).compile().as_text()
    compiled = compiled[
        compiled.index("\n%") if "\n%" in compiled else compiled.index("ENTRY") :
    ]
    return re.sub(r",? metadata=\{[^}]*\}", "", compiled)


@op_names
def test_reverse_mode_compiles_and_saves_exactly_as_the_bare_custom_vjp(
    name, monkeypatch
):
    op, _, args = OPS[name]
    argnums = tuple(range(len(args)))

    def loss():  # a new function each time: jit would reuse its trace
        return jax.value_and_grad(_scalar(op), argnums)

    hlo, residuals = programs(loss(), *args), saved_residuals(op, *args)
    assert "custom_vjp_call" in str(jax.make_jaxpr(op)(*args))
    _bare(monkeypatch)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(op, args, args)
    assert programs(loss(), *args) == hlo
    # The same arrays saved (inputs that are residuals may come in another
    # order: the wrapper forwards them).
    assert sorted(str(a) for a, _ in saved_residuals(op, *args)) == sorted(
        str(a) for a, _ in residuals
    )


def test_reverse_mode_unchanged_under_the_older_linearization(monkeypatch):
    # jax_use_direct_linearize=False: reverse mode as jvp then partial
    # evaluation, where fwd's inputs are the partial-evaluation trace's own
    # (known) tracers. The fused loss (a scan), against its bare custom_vjp.
    op, reference, args = OPS["linear_softmax_cross_entropy"]
    argnums = tuple(range(len(args)))

    def loss():
        return jax.value_and_grad(_scalar(op), argnums)

    direct = jax.config.jax_use_direct_linearize
    jax.config.update("jax_use_direct_linearize", False)
    try:
        hlo, got = programs(loss(), *args), loss()(*args)
        _bare(monkeypatch)
        assert programs(loss(), *args) == hlo
    finally:
        jax.config.update("jax_use_direct_linearize", direct)
    _close(got, jax.value_and_grad(_scalar(reference), argnums)(*args))


# Around the op: jit (its rule then traced into a jaxpr first, and evaluated
# under reverse mode later), cond and vmap. (Inside a scan's body the programs
# differ the other way: JAX's partial evaluation of the scan rewrites the bare
# custom_vjp's forward loop, hoisting its loop-invariant work, and not the
# wrapped op's, whose forward it keeps whole; same values.)
ENCLOSING = {
    "jit": lambda f: lambda *a: jax.jit(f)(*a),
    "cond": lambda f: lambda *a: jax.lax.cond(True, f, lambda *a: 0.0, *a),
    "vmap": lambda f: lambda *a: jnp.sum(jax.vmap(lambda *b: f(*a), axis_size=2)()),
}


@pytest.mark.parametrize("enclosing", list(ENCLOSING))
def test_reverse_mode_compiles_as_the_bare_custom_vjp_inside_other_transforms(
    enclosing, monkeypatch
):
    # The fused loss: a scan in fwd, and residuals that are its inputs.
    op, _, args = OPS["linear_softmax_cross_entropy"]
    argnums = tuple(range(len(args)))

    def loss():
        return jax.value_and_grad(ENCLOSING[enclosing](_scalar(op)), argnums)

    hlo = programs(loss(), *args)
    _bare(monkeypatch)
    assert programs(loss(), *args) == hlo


def test_program_comparison_sees_a_change():
    f = _scalar(jsoftmax.softmax)
    assert programs(jax.grad(f), X) == programs(jax.grad(f), X)
    assert programs(jax.grad(f), X) != programs(jax.grad(lambda x: f(x * 1.5)), X)


# dot_product_attention: its backward pass has loops with traced trip counts
# (while_loops), which JAX cannot transpose, so its tangent map is jax.jvp of
# its forward pass recomputed from the residuals. Its loops make every
# compilation slow: each check below is compiled once, at one small shape.
AK = jax.random.split(jax.random.key(7), 5)
ATTN_ARGS = (
    jax.random.normal(AK[0], (2, 8, 4, 4)),  # q: B, T, N, H
    jax.random.normal(AK[1], (2, 8, 2, 4)),  # k: grouped query attention
    jax.random.normal(AK[2], (2, 8, 2, 4)),  # v
    jax.random.normal(AK[3], (1, 4, 8, 8)),  # bias, broadcast over the batch
)


def _attention_op(q, k, v, b, **kw):
    return jsoftmax.dot_product_attention(
        q, k, v, b, is_causal=True, query_chunk_size=4, key_chunk_size=4, **kw
    )


def _attention_reference(q, k, v, b, **kw):
    return jax.nn.dot_product_attention(
        q, k, v, b, is_causal=True, implementation="xla", **kw
    )


@functools.partial(jax.jit, static_argnums=0)
def _attention_derivatives(f, args, t):
    """jacfwd of (out, lse) and a jvp-of-grad HVP."""
    argnums = tuple(range(len(args)))
    return dict(
        jacobian=jax.jacfwd(functools.partial(f, return_residual=True), argnums)(*args),
        hvp=jax.jvp(jax.grad(_scalar(f), argnums), args, t)[1],
    )


def test_attention_forward_mode_matches_jax_nn():
    # Causal, grouped-query, with a bias: jacfwd against jax.nn's (the tangent
    # map under vmap), and the HVP (forward over the backward pass). The
    # unbatched jvp and forward over forward: the float64 test below.
    args = ATTN_ARGS
    got = _attention_derivatives(_attention_op, args, _tangents(args))
    want = _attention_derivatives(_attention_reference, args, _tangents(args))
    _close(got["jacobian"][0], want["jacobian"][0])
    # lse is returned without gradient (lax.stop_gradient), in both modes.
    assert not any(d.any() for d in got["jacobian"][1])
    _close(got["hvp"], want["hvp"], **TOL2)


def _attention_programs():
    """programs() of jit(value_and_grad)."""
    args = ATTN_ARGS
    # A new function each time: jit would reuse its trace.
    loss = jax.value_and_grad(_scalar(_attention_op), tuple(range(len(args))))
    return programs(loss, *args)


def test_attention_reverse_mode_saves_exactly_as_the_bare_custom_vjp(monkeypatch):
    args = ATTN_ARGS
    residuals = saved_residuals(_attention_op, *args)
    assert "custom_vjp_call" in str(jax.make_jaxpr(_attention_op)(*args))
    monkeypatch.setattr(_attention, "_attention_forward_mode", _attention._attention)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(_attention_op, args, args)
    assert [a for a, _ in saved_residuals(_attention_op, *args)] == [
        a for a, _ in residuals
    ]


def test_attention_reverse_mode_compiles_exactly_as_the_bare_custom_vjp(monkeypatch):
    hlo = _attention_programs()
    monkeypatch.setattr(_attention, "_attention_forward_mode", _attention._attention)
    assert _attention_programs() == hlo


def test_attention_float64_finite_differences(monkeypatch):
    # jvp and forward over forward (fwd order 2); forward over reverse is the
    # HVP above. Reverse over anything differentiates the backward pass's (or
    # the tangent map's) while_loops in reverse, which JAX cannot do, with or
    # without forward mode.
    with jax.enable_x64(True):
        q, k, v, b = (a.astype(jnp.float64) for a in ATTN_ARGS)
        args = (q[:1, :4, :2, :2], k[:1, :4, :1, :2], v[:1, :4, :1, :2])
        args += (b[:, :2, :4, :4], jnp.array([0.3, -0.5]))

        def f(q, k, v, b, sinks):
            return jsoftmax.dot_product_attention(
                q,
                k,
                v,
                b,
                is_causal=True,
                sinks=sinks,
                query_chunk_size=2,
                key_chunk_size=2,
            )

        s = _scalar(f)
        check = functools.partial(
            jax.test_util.check_grads, atol=1e-5, rtol=1e-5, modes=["fwd"]
        )
        check(jax.jit(s), args, order=2)
        # A tangent map 0.1% off is caught.
        exact = _attention._attention_tangent

        def wrong(statics, res, t):
            return [1.001 * d for d in exact(statics, res, t)]

        monkeypatch.setattr(
            _attention,
            "_attention_forward_mode",
            _forward_mode._with_forward_mode(_attention._attention, tangent=wrong),
        )
        with pytest.raises(AssertionError):
            check(jax.jit(lambda *a: s(*a)), args, order=1)  # traced anew


# Transformations around the forward-mode ops.


def test_jit_checkpoint_and_scan():
    t = _tangents((X,))[0]
    want = jax.jvp(jax.nn.log_softmax, (X,), (t,))
    _close(jax.jit(lambda x, t: jax.jvp(jsoftmax.log_softmax, (x,), (t,)))(X, t), want)
    s, ref = _scalar(jsoftmax.log_softmax), _scalar(jax.nn.log_softmax)
    for policy in (None, jax.checkpoint_policies.nothing_saveable):
        remat = jax.checkpoint(s, policy=policy)
        _close(jax.grad(remat)(X), jax.grad(ref)(X))
        _close(jax.jvp(remat, (X,), (t,)), jax.jvp(ref, (X,), (t,)))
        _close(jax.hessian(remat)(X[0]), jax.hessian(ref)(X[0]), **TOL2)

    def rows(f):
        def step(c, xt):
            y, dy = jax.jvp(f, (xt[0],), (xt[1],))
            return c + jnp.sum(dy) + _scalar(f)(xt[0]), (
                y,
                dy,
                jax.grad(_scalar(f))(xt[0]),
            )

        return lax.scan(step, 0.0, (X, t))

    _close(jax.jit(lambda: rows(jsoftmax.softmax))(), rows(jax.nn.softmax))


def test_vmap_in_axes_nested_and_named_axis_with_collectives():
    t = _tangents((X,))[0]

    def jvp(f):
        return lambda x, t: jax.jvp(f, (x,), (t,))[1]

    # in_axes 1, nested vmaps, and an unbatched tangent.
    got = jax.vmap(jvp(jsoftmax.softmax), in_axes=(1, None))(X, t[:, 0])
    want = jax.vmap(jvp(jax.nn.softmax), in_axes=(1, None))(X, t[:, 0])
    _close(got, want)
    got = jax.vmap(jax.vmap(jvp(jsoftmax.log_softmax)), in_axes=(None, 0))(X, t[None])
    _close(
        got, jax.vmap(jax.vmap(jvp(jax.nn.log_softmax)), in_axes=(None, 0))(X, t[None])
    )
    # The class axis split over a vmap axis, one class per instance: the
    # collectives inside the rules (pmax/psum forward, psum backward) run over
    # it, in forward mode too.
    t2 = _tangents((X,), seed=1)[0]

    def fwd_fwd(f):
        return lambda x, t, s: jax.jvp(lambda x: jvp(f)(x, t), (x,), (s,))[1]

    for op, ref in [
        (jsoftmax.softmax, jax.nn.softmax),
        (jsoftmax.log_softmax, jax.nn.log_softmax),
    ]:
        op = functools.partial(op, axis_name="c")
        for run, tol in [(jvp, TOL), (fwd_fwd, TOL2)]:
            # fwd_fwd: the primitive's own JVP rule, over the axis.
            split = jax.vmap(run(op), in_axes=1, out_axes=1, axis_name="c")
            args = (X, t, t2)[: 2 if run is jvp else 3]
            got = split(*(a[:, :, None] for a in args))[..., 0]
            _close(got, run(ref)(*args), **tol)


def _around(where, f):
    """``f`` (one array in, one out) inside a jit, a checkpoint or a scan."""
    if where == "jit":
        return jax.jit(f)
    if where == "checkpoint":
        return jax.checkpoint(f)
    return lambda x: lax.scan(lambda c, _: (f(c), None), x, None, length=1)[0]


@pytest.mark.parametrize("where", ["jit", "checkpoint", "scan"])
def test_named_vmap_axis_inside_jit_checkpoint_and_scan_is_differentiated(where):
    # JAX batches a custom_jvp rule lazily when a jit, checkpoint or scan
    # traced around a named vmap is differentiated, without binding the axis
    # name: the rules' collectives raised "unbound axis name" NameError. A
    # trace of the rule made under the vmap itself, kept in JAX's caches,
    # hid it: an axis name of its own keeps this test from any other's.
    t = _tangents((X,))[0]
    name = f"lazy_{where}"
    for op, ref in [
        (jsoftmax.softmax, jax.nn.softmax),
        (jsoftmax.log_softmax, jax.nn.log_softmax),
    ]:
        op = functools.partial(op, axis_name=name)
        split = _around(
            where, jax.vmap(op, in_axes=1, out_axes=1, axis_name=name)
        )  # one class per instance of the axis

        def got(x, split=split):
            return split(x[:, :, None])[..., 0]

        _close(jax.jvp(got, (X,), (t,)), jax.jvp(ref, (X,), (t,)))
        _close(jax.grad(_scalar(got))(X), jax.grad(_scalar(ref))(X))


def _centred_over_c():
    """``x`` less its mean over the named axis "c", by its size: a new
    function at each call, which no cache has seen."""

    @jax.custom_vjp
    def centred(x):
        return x - lax.psum(x, "c") / lax.axis_size("c")

    centred.defvjp(
        lambda x: (centred(x), None),
        lambda _, g: (g - lax.psum(g, "c") / lax.axis_size("c"),),
    )
    return jsoftmax.with_forward_mode(centred)


@pytest.mark.parametrize("where", ["jit", "checkpoint", "scan"])
def test_a_rule_traced_outside_its_vmap_reads_the_calls_axis_size(where):
    # A user's rule reading lax.axis_size, traced lazily outside the vmap
    # (as above): the name is bound again with the size the call saw, 5
    # and then 3 instances of the same shape.
    op = _centred_over_c()
    for size in (5, 3):
        x = X[:, :size]
        t = _tangents((x,))[0]
        split = _around(where, jax.vmap(op, in_axes=1, out_axes=1, axis_name="c"))

        def got(x, split=split):
            return split(x)

        def want(x):
            return x - jnp.mean(x, axis=1, keepdims=True)

        _close(jax.jvp(got, (x,), (t,)), jax.jvp(want, (x,), (t,)))
        _close(jax.grad(_scalar(got))(x), jax.grad(_scalar(want))(x))


def test_export_serialize_deserialize_differentiate():
    export = pytest.importorskip("jax.export")
    t = _tangents((X,))[0]
    jvp = jax.jit(lambda x, t: jax.jvp(jsoftmax.log_softmax, (x,), (t,))[1])
    exported = export.deserialize(export.export(jvp)(X, t).serialize())
    _close(exported.call(X, t), jax.jvp(jax.nn.log_softmax, (X,), (t,))[1])
    f = jax.jit(_scalar(jsoftmax.softmax_cross_entropy))
    exported = export.deserialize(export.export(f)(X, Q).serialize(vjp_order=1))
    ref = _scalar(optax.softmax_cross_entropy)
    _close(jax.grad(exported.call, (0, 1))(X, Q), jax.grad(ref, (0, 1))(X, Q))


def test_out_of_range_labels_stay_loud_in_forward_mode():
    # A label outside [0, K): its loss is NaN, and so is its derivative where a
    # tangent (or cotangent) of its row is not 0; other rows are untouched.
    bad = jnp.array([1, 9, 0])
    for op in (
        lambda z: jsoftmax.softmax_cross_entropy_with_integer_labels(z, bad),
        lambda z: jsoftmax.linear_softmax_cross_entropy(
            z[:, :3], jnp.pad(W, ((0, 0), (0, 3))), bad, chunk_size=2, reduction="none"
        ),
    ):
        fwd, rev = np.asarray(jax.jacfwd(op)(X)), np.asarray(jax.jacrev(op)(X))
        np.testing.assert_array_equal(np.isnan(fwd), np.isnan(rev))
        assert np.isnan(fwd[1, 1]).any() and not np.isnan(fwd[[0, 2]]).any()
        assert not np.isnan(fwd[1, [0, 2]]).any()
        _close(np.nan_to_num(fwd), np.nan_to_num(rev))


# with_forward_mode on users' own rules.


@jax.custom_vjp
def _sin(x):
    return jnp.sin(x)


def _sin_fwd(x):
    return jnp.sin(x), jnp.cos(x)


_sin.defvjp(_sin_fwd, lambda cos_x, g: (g * cos_x,))


@pytest.mark.parametrize("symmetric", [False, True])
def test_elementwise_rule(symmetric):
    f = jsoftmax.with_forward_mode(_sin, symmetric=symmetric)
    x, t = X[0], _tangents((X[0],))[0]
    _close(jax.jvp(f, (x,), (t,)), jax.jvp(jnp.sin, (x,), (t,)))
    _close(jax.jacfwd(f)(x), jax.jacrev(jnp.sin)(x))
    for h in (jax.hessian, lambda g: jax.jacfwd(jax.jacfwd(g))):
        _close(
            h(lambda x: jnp.sum(f(x) ** 3))(x), h(lambda x: jnp.sum(jnp.sin(x) ** 3))(x)
        )


def _plain(p, ids, k):
    z = p["w"][ids] * k + p["b"][None]
    return {"z": z, "norm": jnp.sum(p["w"] ** 2), "ids": ids}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather(p, ids, k):
    return _plain(p, ids, k)


def _gather_fwd(p, ids, k):
    return _plain(p, ids, k), (p["w"], ids)


# dw = scatter_add(k dz at ids) + 2 w dnorm;  db = sum(dz, rows)
def _gather_bwd(k, res, g):
    w, ids = res
    dw = jnp.zeros_like(w).at[ids].add(k * g["z"]) + 2 * w * g["norm"]
    return {"w": dw, "b": jnp.sum(g["z"], 0)}, None


_gather.defvjp(_gather_fwd, _gather_bwd)


def test_several_inputs_pytrees_static_and_integer_arguments():
    # A pytree of two float inputs, an integer input without a tangent, a
    # static argument, and a pytree output with an integer leaf.
    f = jsoftmax.with_forward_mode(_gather)
    p = {"w": X, "b": X[0]}
    ids = jnp.array([2, 0, 2, 1])
    t = {"w": _tangents((X,))[0], "b": -X[1]}

    def run(g):
        h = functools.partial(g, ids=ids, k=3.0)
        _, dy = jax.jvp(h, (p,), (t,))
        scalar = lambda p: jnp.sum(jnp.sin(h(p)["z"])) + h(p)["norm"] ** 2  # noqa: E731
        return (
            jax.tree.map(lambda a: a, {k: v for k, v in dy.items() if k != "ids"}),
            jax.jacfwd(lambda p: h(p)["z"])(p),
            jax.hessian(scalar)(p),
            jax.jit(jax.grad(scalar))(p),
        )

    _close(run(f), run(_plain))
    assert (
        jax.jvp(lambda p: f(p, ids, 3.0), (p,), (t,))[1]["ids"].dtype
        == jax.dtypes.float0
    )


def test_reverse_mode_runs_the_users_backward_pass():
    # A deliberately wrong backward pass (twice the derivative): reverse mode
    # shows it, so it is the one that runs; forward mode, derived from it,
    # agrees with it; and it is traced once per reverse-mode trace.
    calls = []

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def bwd(cos_x, g):
        calls.append(1)
        return (2 * g * cos_x,)

    f.defvjp(_sin_fwd, bwd)
    wrapped = jsoftmax.with_forward_mode(f)
    x = X[0]
    _close(jax.grad(lambda x: jnp.sum(wrapped(x)))(x), 2 * jnp.cos(x))
    assert len(calls) == 1
    _close(jax.jvp(wrapped, (x,), (jnp.ones_like(x),))[1], 2 * jnp.cos(x))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(wrapped(x))))(x))
    assert "custom_vjp_linear" not in jaxpr  # transposed into bwd's own ops


def _plain_powers_scan(x, p):
    return lax.scan(lambda c, _: (c * x, c), x, None, length=p["n"])[1]


# x, x^2, ..., x^n, by a loop: a rule whose fwd and bwd hold loops.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _powers(x, p):
    return _plain_powers_scan(x, p)


def _powers_fwd(x, p):
    return _plain_powers_scan(x, p), x


# d(x^(k+1)) = (k+1) x^k dx, summed over the powers k = 0..n-1
def _powers_bwd(p, x, g):
    def step(acc, k_and_gk):
        k, gk = k_and_gk
        return acc + gk * (k + 1) * x**k, None

    ks = jnp.arange(p["n"], dtype=x.dtype)
    return (lax.scan(step, jnp.zeros_like(x), (ks, g))[0],)


_powers.defvjp(_powers_fwd, _powers_bwd)


def _plain_powers(x, p):
    return jnp.stack([x ** (k + 1) for k in range(p["n"])])


def _kept(fn, **options):
    """fn with forward mode and its traces kept, as the ops have it."""
    return _forward_mode._with_forward_mode(fn, keep_traces=True, **options)


def _hvps(op, x, *static):
    def loss(x):
        return jnp.sum(jnp.sin(op(x, *static)))

    return (
        jax.jvp(jax.grad(loss), (x,), (x,))[1],
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x),
    )


def test_eager_second_derivatives_of_kept_rules_with_loops_compile_once():
    # Outside jit JAX evaluates a first derivative's rules eagerly under an
    # outer jvp or grad; each call traced them anew, and every loop in them
    # compiled again. The ops' traced rules are kept per static arguments and
    # argument types, and given again. An unhashable static argument (a dict)
    # is traced at every call, as before.
    class Static(dict):
        def __hash__(self):
            return hash(tuple(self.items()))

    f = _kept(_powers)
    for n in (2, 3):
        want = _hvps(_plain_powers, X[0], {"n": n})
        _close(_hvps(f, X[0], Static(n=n)), want, **TOL2)
        with compiles() as names:
            _close(_hvps(f, X[0], Static(n=n)), want, **TOL2)
        assert names == []
        _close(_hvps(f, X[0], {"n": n}), want, **TOL2)
    # jax.clear_caches() forgets the kept traces too.
    assert _forward_mode._kept.cache_keys()
    jax.clear_caches()
    assert not _forward_mode._kept.cache_keys()


def test_kept_rules_are_keyed_on_the_rules_and_the_types_of_static_arguments():
    # A backward pass defined anew is traced anew (here a wrong one, twice the
    # derivative, which forward mode then shows).
    @jax.custom_vjp
    def g(x):
        return jnp.sin(x)

    g.defvjp(_sin_fwd, lambda cos_x, d: (d * cos_x,))
    h = _kept(g)
    x = X[1]
    _close(_hvps(h, x), _hvps(jnp.sin, x), **TOL2)
    g.defvjp(_sin_fwd, lambda cos_x, d: (2 * d * cos_x,))
    assert not np.allclose(_hvps(h, x)[0], _hvps(jnp.sin, x)[0])
    # Static arguments equal across types compute differently: 1.5 and
    # np.float32(1.5) scale a bfloat16 input to bfloat16 and to float32.
    # Keyed on the value alone, the second call took the first's trace.

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def scale(x, s):
        return x * s

    scale.defvjp(lambda x, s: (x * s, None), lambda s, _, g: (g * s,))
    scaled = _kept(scale)
    xb = jnp.full((1, 2), 1.0078125, jnp.bfloat16)

    def vmapped_jvp(s):
        return jax.vmap(lambda x: jax.jvp(lambda x: scaled(x, s), (x,), (x,)))(xb)

    with jax.numpy_dtype_promotion("standard"):  # bfloat16 * float32
        assert vmapped_jvp(1.5)[0].dtype == jnp.bfloat16
        y, dy = vmapped_jvp(np.float32(1.5))
        want = xb * np.float32(1.5)
    assert y.dtype == dy.dtype == jnp.float32
    _close((y, dy), (want, want))


def test_a_users_rule_sees_python_state_as_the_bare_custom_vjp_does():
    # A user's rule keeps no traces: one that reads a Python global gives, at
    # every eager call, jax.hessian and vmap(grad) of its current value, as
    # grad does (kept, they kept the first value).
    state = {"temperature": 1.0}

    @jax.custom_vjp
    def tempered(x):
        return jnp.sin(x) / state["temperature"]

    tempered.defvjp(
        lambda x: (jnp.sin(x) / state["temperature"], x),
        lambda x, g: (jnp.cos(x) / state["temperature"] * g,),
    )
    f = jsoftmax.with_forward_mode(tempered)

    def loss(x, op=f):
        return jnp.sum(op(x) ** 2)

    def plain(x):
        return jnp.sum((jnp.sin(x) / state["temperature"]) ** 2)

    x = X[0]
    for temperature in (1.0, 2.0):
        state["temperature"] = temperature
        _close(jax.hessian(loss)(x), jax.hessian(plain)(x), **TOL2)
        _close(jax.vmap(jax.grad(loss))(X[:2]), jax.vmap(jax.grad(plain))(X[:2]))


def test_a_rule_closing_over_a_jit_tracer_leaks_nothing():
    # The traced constants of a rule defined inside jit (a flax-style
    # parameter) were held by the kept trace, past the jit's trace.
    @jax.jit
    def step(w, x):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x) * w

        f.defvjp(lambda x: (jnp.sin(x) * w, x), lambda x, g: (jnp.cos(x) * w * g,))
        f = jsoftmax.with_forward_mode(f)
        return jax.grad(lambda x: f(x).sum())(x), jax.jvp(f, (x,), (x,))[1]

    with checking_leaks():
        got = step(jnp.full(3, 2.0), X[0, :3])
    _close(got, (2 * jnp.cos(X[0, :3]), 2 * jnp.cos(X[0, :3]) * X[0, :3]))


def test_rules_with_other_cotangent_dtypes_wrong_shapes_and_constants():
    x = X[0]

    def rule(bwd):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x)

        f.defvjp(_sin_fwd, bwd)
        return jsoftmax.with_forward_mode(f)

    # A float32 cotangent for a bfloat16 input: reverse mode accepts it, and
    # forward mode gives the tangent in the input's type.
    up = rule(lambda c, g: ((g * c).astype(jnp.float32),))
    xb = x.astype(jnp.bfloat16)
    y, dy = jax.jvp(up, (xb,), (jnp.ones_like(xb),))
    assert dy.dtype == jnp.bfloat16
    _close(dy.astype(jnp.float32), jnp.cos(xb).astype(jnp.float32), rtol=1e-2)
    _close(jax.grad(lambda x: jnp.sum(up(x)).astype(jnp.float32))(xb), dy)
    # A cotangent of the wrong shape: named as bwd's.
    wide = rule(lambda c, g: (jnp.outer(g, c),))
    with pytest.raises(TypeError, match="bwd returned a cotangent of shape"):
        jax.jvp(wide, (x,), (x,))
    # An affine bwd (not linear: +1): the transpose drops the constant, so
    # forward mode cannot show it; reverse mode does, and vjp_errors against
    # a reference fails there.
    affine = rule(lambda c, g: (g * c + 1.0,))
    errors = testing.vjp_errors(affine, jnp.sin, x)
    assert not errors.passed and errors.forward_mismatch is None
    assert testing.vjp_errors(rule(lambda c, g: (g * c,)), jnp.sin, x).passed


NOT_LINEAR = {
    "a non-linear primitive": lambda c, g: (jnp.sin(g),),
    "a product of cotangents": lambda c, g: (g * g * c,),
    "a test of the cotangent": lambda c, g: (jnp.where(g == 0, 0.0, g * c),),
    "a while_loop": lambda c, g: (
        lax.while_loop(
            lambda s: s[0] < jnp.sum(c), lambda s: (s[0] + 1, s[1] / 2), (0.0, g)
        )[1],
    ),
}


@pytest.mark.parametrize("kind", list(NOT_LINEAR))
def test_a_bwd_not_linear_in_the_cotangent_raises_as_documented(kind):
    # JAX's transposition raised a bare AssertionError for a product or a
    # test of cotangents, and a ValueError for a while_loop, where the
    # docstring promised a NotImplementedError.
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(_sin_fwd, NOT_LINEAR[kind])
    wrapped = jsoftmax.with_forward_mode(f)
    with pytest.raises(NotImplementedError, match="bwd must be linear") as info:
        jax.jvp(wrapped, (X[0],), (X[1],))
    assert info.value.__cause__ is not None  # JAX's own error, chained
    jax.grad(lambda x: jnp.sum(wrapped(x)))(X[0])  # reverse mode runs bwd as is


def test_integer_outputs_under_symbolic_shapes():
    # The float0 tangent of an integer output, at a symbolic batch size.
    export = pytest.importorskip("jax.export")

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x), jnp.argmax(x, axis=-1)

    f.defvjp(lambda x: (f(x), jnp.cos(x)), lambda c, g: (g[0] * c,))
    wrapped = jsoftmax.with_forward_mode(f)
    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, X.shape[1]), X.dtype)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(wrapped(x)[0])))
    jvp = jax.jit(lambda x, t: jax.jvp(wrapped, (x,), (t,))[1][0])
    _close(export.export(grad)(spec).call(X), jnp.cos(X))
    _close(export.export(jvp)(spec, spec).call(X, X), jnp.cos(X) * X)


# Rules that close over traced values: a custom_vjp defined inside a jit,
# vmap or scan body, reading the enclosing function's argument w, as flax and
# equinox modules' rules read their parameters.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply(scale, x):
    return scale(jnp.sin(x))


_apply.defvjp(
    lambda scale, x: (scale(jnp.sin(x)), jnp.cos(x)),
    lambda scale, cos_x, g: (scale(g * cos_x),),  # scale is linear
)


def _closing_over(w, where, wrap=True):
    """``w sin(x)`` as a custom_vjp whose rule reads ``w`` from a closure: in
    fwd (its residual is ``w cos(x)``), in bwd (``cos(x)``), or in a function
    passed in nondiff_argnums (which the tangent hook reads too); with
    forward mode (``wrap``) or bare."""
    if where.startswith("static"):
        tangent = None
        if where == "static[tangent]":

            def tangent(statics, cos_x, t):
                return [statics[0](cos_x * t[0])]

        f = _forward_mode._with_forward_mode(_apply, tangent=tangent)
        return functools.partial(f if wrap else _apply, lambda u: u * w)

    @jax.custom_vjp
    def f(x):
        return w * jnp.sin(x)

    def fwd(x):
        return w * jnp.sin(x), (w * jnp.cos(x) if where == "fwd" else jnp.cos(x))

    def bwd(res, g):
        return (g * res if where == "fwd" else g * res * w,)

    f.defvjp(fwd, bwd)
    if not wrap:
        return f
    return jsoftmax.with_forward_mode(f, symmetric=where == "bwd[symmetric]")


closures = pytest.mark.parametrize(
    "where", ["fwd", "bwd", "bwd[symmetric]", "static", "static[tangent]"]
)
XC = X[0, :3]
TC = _tangents((XC,))[0]
WS = jnp.array([0.5, -2.0])


def _every_transformation(f):
    """f's derivatives at XC along TC, by every transformation."""
    s = _scalar(f)
    ts = jnp.stack([TC, -2.0 * TC])

    def jvp(t):
        return jax.jvp(f, (XC,), (t,))

    _, f_lin = jax.linearize(f, XC)
    return dict(
        jvp=jvp(TC),
        jit_jvp=jax.jit(jvp)(TC),
        vmap_jvp=jax.vmap(jvp)(ts),
        jit_vmap_jvp=jax.jit(jax.vmap(jvp))(ts),
        jacfwd=jax.jacfwd(f)(XC),
        hessian=jax.hessian(s)(XC),
        grad=jax.grad(s)(XC),
        jit_grad=jax.jit(jax.grad(s))(XC),
        hvp=jax.jvp(jax.grad(s), (XC,), (TC,))[1],
        linearize=f_lin(TC),
    )


# The trace w belongs to, running g(w) for the values in WS.
AROUND = {
    "jit": lambda g: [jax.jit(g)(w) for w in WS],
    "vmap": lambda g: jax.vmap(g)(WS),
    "scan": lambda g: lax.scan(lambda c, w: (c, g(w)), 0.0, WS)[1],
}


@functools.cache
def _every_transformation_reference(around):
    return AROUND[around](lambda w: _every_transformation(lambda x: w * jnp.sin(x)))


@pytest.mark.parametrize("around", list(AROUND))
@closures
def test_every_transformation_of_rules_closing_over_a_traced_value(where, around):
    # Issue 18: jit(jvp) raised "No constant handler for type:
    # DynamicJaxprTracer" and vmap(jvp) UnexpectedTracerError, jit(grad)
    # worked: the closures were in the primitive's parameters.
    got = AROUND[around](lambda w: _every_transformation(_closing_over(w, where)))
    _close(got, _every_transformation_reference(around), **TOL2)


@closures
def test_reverse_mode_of_closing_rules_compiles_as_the_bare_custom_vjp(where):
    def loss(wrap):  # w: an argument of the jit
        return lambda x, w: jax.value_and_grad(
            lambda x: jnp.sum(jnp.sin(_closing_over(w, where, wrap)(x)))
        )(x)

    assert programs(loss(True), XC, 0.5) == programs(loss(False), XC, 0.5)


@closures
def test_derivatives_in_a_closed_over_value_around_those_in_the_arguments(where):
    # jacfwd and jacrev in w around forward and reverse mode in x go through
    # fwd and bwd, as JAX's own do for the bare custom_vjp (its grad in x).
    def inner(f):
        return jax.jvp(f, (XC,), (TC,))[1], jax.grad(_scalar(f))(XC)

    for outer in (jax.jacfwd, jax.jacrev):
        want = outer(lambda w: inner(lambda x: w * jnp.sin(x)))(0.5)
        _close(outer(lambda w: inner(_closing_over(w, where)))(0.5), want, **TOL2)
        bare = outer(lambda w: jax.grad(_scalar(_closing_over(w, where, False)))(XC))
        _close(bare(0.5), want[1], **TOL2)


@closures
def test_differentiating_a_closed_over_value_with_the_arguments_raises(where):
    # The rules cannot see w as an input, so they cannot give its derivative
    # in the same jvp or grad as x's: the bare custom_vjp raises
    # UnexpectedTracerError (it does not drop the term), and so does forward
    # mode, in both modes.
    def f(wrap):
        return lambda x, w: jnp.sum(_closing_over(w, where, wrap)(x))

    for wrap in (False, True):
        for argnums in (1, (0, 1)):
            with pytest.raises(jax.errors.UnexpectedTracerError):
                jax.grad(f(wrap), argnums)(XC, 0.5)
    with pytest.raises(jax.errors.UnexpectedTracerError):
        jax.jvp(f(True), (XC, 0.5), (TC, 1.0))
    with pytest.raises(jax.errors.UnexpectedTracerError):
        jax.jacfwd(f(True), 1)(XC, 0.5)


def test_eager_rules_see_values_as_for_the_bare_custom_vjp():
    # Outside any transformation JAX runs a custom_vjp's fwd and bwd on
    # values, where Python control flow on them works; so does forward mode,
    # in grad and in jvp (the rules are traced only where JAX traces them).
    seen = []

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def fwd(x):
        seen.append(float(x[0]))
        return jnp.sin(x), jnp.cos(x)

    def bwd(cos_x, g):
        seen.append(float(cos_x[0]))
        return (g * cos_x,)

    f.defvjp(fwd, bwd)
    wrapped = jsoftmax.with_forward_mode(f)
    _close(jax.grad(lambda x: jnp.sum(wrapped(x)))(XC), jnp.cos(XC))
    _close(jax.jvp(wrapped, (XC,), (TC,)), jax.jvp(jnp.sin, (XC,), (TC,)))
    assert len(seen) >= 4


def test_a_traced_nondiff_argument_raises_as_for_the_bare_custom_vjp():
    # The bare custom_vjp raises when called; forward mode, which does not
    # call it, raises too (rather than working in jvp and grad only).
    f = jsoftmax.with_forward_mode(_gather)
    p, ids = {"w": X, "b": X[0]}, jnp.array([2, 0, 2, 1])

    def z(k):
        return lambda p: f(p, ids, k)["z"]

    for run in (
        lambda k: z(k)(p),
        lambda k: jax.jvp(z(k), (p,), (p,)),
        lambda k: jax.grad(lambda p: jnp.sum(z(k)(p)))(p),
    ):
        with pytest.raises(jax.errors.UnexpectedTracerError, match="nondiff_arg"):
            jax.jit(run)(3.0)
    with pytest.raises(jax.errors.UnexpectedTracerError, match="argument 2 is in"):
        jax.jit(lambda k: jax.jvp(z(k), (p,), (p,)))(3.0)


def test_defaults_and_keyword_arguments_as_for_the_bare_custom_vjp():
    # A defaulted nondiff argument left out raised IndexError: the custom_jvp
    # counted nondiff_argnums among the arguments given.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def scale(x, s=3.0):
        return x * s

    scale.defvjp(lambda x, s: (x * s, None), lambda s, _, g: (g * s,))
    f = jsoftmax.with_forward_mode(scale)
    for call, s in [(lambda x: f(x), 3.0), (lambda x: f(x, s=2.0), 2.0)]:
        assert jax.jvp(call, (2.0,), (1.0,)) == (2.0 * s, s)
        assert jax.grad(call)(2.0) == s == jax.grad(functools.partial(scale, s=s))(2.0)

    @jax.custom_vjp
    def keyword_only(x, *, s=1.0):
        return x * s

    keyword_only.defvjp(lambda x, s=1.0: (x * s, s), lambda s, g: (g * s,))
    with pytest.raises(TypeError, match="keyword-only arguments"):
        jsoftmax.with_forward_mode(keyword_only)(2.0, s=2.0)


def test_type_errors():
    with pytest.raises(TypeError, match="takes a jax.custom_vjp object"):
        jsoftmax.with_forward_mode(jnp.sin)
    with pytest.raises(TypeError, match="takes a jax.custom_vjp object"):
        jsoftmax.with_forward_mode(jax.custom_jvp(jnp.sin))
    with pytest.raises(TypeError, match="before functools.partial or jax.jit"):
        jsoftmax.with_forward_mode(functools.partial(_softmax._softmax))
    with pytest.raises(TypeError, match="defvjp"):
        jsoftmax.with_forward_mode(jax.custom_vjp(jnp.sin))
    bad = jsoftmax.with_forward_mode(_gather, symmetric=True)
    with pytest.raises(TypeError, match="symmetric=True"):
        jax.jvp(lambda w: bad({"w": w, "b": X[0]}, IDS, 1.0)["z"], (X,), (X,))


def test_jax_internals_used_are_where_expected():
    # with_forward_mode rests on JAX's primitive registries (pinned in
    # pyproject.toml). If a JAX upgrade moves them, this fails first.
    from jax._src import core
    from jax._src.interpreters import ad, batching, mlir
    from jax._src.interpreters import partial_eval as pe

    p = _forward_mode.custom_vjp_linear_p
    assert isinstance(p, jax.extend.core.Primitive) and p.multiple_results
    assert ad.primitive_transposes[p] is _forward_mode._transpose
    assert ad.primitive_jvps[p] is _forward_mode._jvp
    assert batching.fancy_primitive_batchers[p] is _forward_mode._batch
    assert p in mlir._lowerings
    for name in ("Zero", "instantiate_zeros", "is_undefined_primal", "zeros_like_aval"):
        assert callable(getattr(ad, name))
    assert callable(core.unmapped_aval) and callable(mlir.lower_fun)
    # Closure conversion: tracers, jaxpr evaluation, and the context JAX's
    # transposition gives a rule (the programs' comparison above needs it).
    traced = []
    jax.jit(lambda x: traced.append(isinstance(x, core.Tracer)))(1.0)
    assert traced == [True] and callable(core.eval_jaxpr)
    assert isinstance(core.trace_ctx.trace, core.EvalTrace)
    assert "parent_trace" in pe.JaxprTrace.__init__.__code__.co_varnames
    with core.JaxprEqnContext().manager:
        pass
    # A lazily batched rule binds the enclosing vmaps' axis names again.
    names = []
    jax.vmap(
        lambda x: names.extend(
            (t.axis_data.name, t.axis_data.size)
            for t in [core.trace_ctx.trace]
            if isinstance(t, batching.BatchTrace)
        ),
        axis_name="c",
    )(jnp.zeros(2))
    assert names == [("c", 2)], names
    # The batching rule shards what it broadcasts along an Explicit mesh axis.
    assert isinstance(batching.AxisData.explicit_mesh_axis, property)
    assert "explicit_mesh_axis" in core.unmapped_aval.__code__.co_varnames
    assert "mesh_axis" in batching.bdim_at_front.__code__.co_varnames
    with core.extend_axis_env_nd([("d", 3)]):
        assert core.get_axis_env().axis_sizes["d"] == 3
    assert "d" not in core.get_axis_env().axis_sizes
    assert core.no_axis_name is not None
    assert "jax" in sys.modules


def test_a_kept_rule_holds_no_constant_on_either_jaxpr_representation():
    # A traced rule keeps its jaxpr, its constants given at each call (a
    # tracer of the enclosing trace among them, for a rule closing over one,
    # must not outlive that trace). Up to jax 0.10, make_jaxpr's ClosedJaxpr
    # wraps a Jaxpr that holds no constant value: the one kept.
    c = jnp.arange(3.0)
    closed = jax.make_jaxpr(lambda x: x + c)(jnp.ones(3))
    if closed.jaxpr is not closed:
        assert _forward_mode._without_consts(closed) is closed.jaxpr

    # From jax 0.11 on, one class is both: .jaxpr is the jaxpr itself, its
    # constants attached (as here, with a stand-in for its API).
    class Merged:
        def __init__(self, consts):
            self.consts = consts

        @property
        def jaxpr(self):
            return self

        def with_consts(self, consts):
            return Merged(list(consts))

    tracer_like, array = object(), np.ones(2)
    kept = _forward_mode._without_consts(Merged([tracer_like, array]))
    assert kept.consts == [None, None]
    if closed.jaxpr is closed:  # on such a JAX, the real one too
        kept = _forward_mode._without_consts(closed)
        assert all(x is None for x in kept.consts), kept.consts
        out = _forward_mode._core.eval_jaxpr(kept, closed.consts, jnp.ones(3))
        np.testing.assert_array_equal(out[0], 1 + c)

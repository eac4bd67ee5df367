r"""Forward mode for a ``jax.custom_vjp`` function, derived from its own backward.

A ``jax.custom_vjp`` function has no JVP rule: ``jax.jvp``, ``jax.jacfwd``,
``jax.linearize`` and ``jax.hessian`` raise ``TypeError: can't apply
forward-mode autodiff (jvp) to a custom_vjp function``. Its backward pass
already holds the derivative, though: ``bwd(res, g) = Jᵀ g`` is linear in the
cotangent ``g``, so ``J t`` is its transpose (or ``bwd`` itself where ``J`` is
symmetric). :func:`with_forward_mode` builds on that:

- a ``jax.custom_jvp`` whose primal is the ``custom_vjp`` function itself and
  whose JVP rule is ``y, res = fwd(*args); dy = L(res, t)``;
- ``L`` is one linear primitive, ``custom_vjp_linear``, with

  - a **transpose** rule that calls the ``custom_vjp``'s ``bwd`` on ``res``:
    reverse mode (``grad``, ``vjp``, ``jacrev``) linearises the ``custom_jvp``,
    finds ``L`` linear in ``t`` and transposes it, so it runs exactly the
    hand-written backward pass and saves exactly ``fwd``'s residuals;
  - an **evaluation** rule ``J t``: ``bwd`` itself when ``symmetric``, else
    ``jax.linear_transpose`` of ``bwd`` (no second formula to keep in sync),
    or, for an op whose ``bwd`` cannot be transposed (attention's loops have
    traced trip counts: ``while_loop``\ s), JAX's own ``jax.jvp`` of its
    forward pass recomputed from the residuals (:func:`_with_forward_mode`'s
    ``tangent``);
  - a **JVP** rule (``L`` on the tangent of ``t``, plus JAX's own JVP of the
    map in the residuals) for ``jacfwd(jacfwd)``, ``hessian`` and HVPs;
  - a **batching** rule that vmaps both maps (named axes included, so that
    collectives inside ``bwd`` see the ``vmap`` axis);
  - an MLIR **lowering** of the evaluation rule (``jit``, ``jax.export``);
- in reverse mode, the rule's ``fwd`` is computed whole, as JAX computes a
  ``custom_vjp``'s ``fwd``, not rewritten by partial evaluation
  (:func:`_fwd_call`), so that ``jit(value_and_grad)`` compiles to exactly
  the bare ``custom_vjp``'s program.
- under a transformation (``jit``, ``vmap``, an outer ``jvp``...), ``fwd``,
  ``bwd`` and the tangent map are traced once per call, and the traced
  values they close over (a ``custom_vjp`` defined inside a ``jit`` or
  ``vmap`` reads its arguments, as flax and equinox modules' rules read their
  parameters) become explicit inputs (:func:`_closure_convert`): of the
  ``fwd`` call, and of ``L``, ahead of the residuals. No primitive parameter
  holds a tracer, which would outlive its trace (a ``jit``'s lowering, a
  ``vmap`` that does not see its batch axis, a ``jvp`` that does not see its
  tangent). The ops' rules (``keep_traces``) that close over no traced
  value are kept, per rule, static arguments (with their types) and
  argument types (the 256 last used), and evaluated through a ``jit`` of
  their own outside a staged trace (:func:`jit_kept`): a second derivative
  outside ``jit``, which evaluates the first derivative's rules eagerly at
  every call, compiles their loops once.

Everything here that touches JAX internals (``jax.extend.core.Primitive``,
the ``ad``, ``batching`` and ``mlir`` registries of ``jax._src.interpreters``,
and, for closures, the trace context, the equation context and
``eval_jaxpr`` of ``jax._src.core``) stays in this module;
tests/test_forward_mode.py fails loudly if those move.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as _config
from jax._src import core as _core
from jax._src import util as _util
from jax._src.interpreters import ad, batching, mlir
from jax._src.interpreters import partial_eval as pe
from jax.extend.core import Primitive

__all__ = ["with_forward_mode"]

_R = TypeVar("_R")  # what the custom_vjp function returns


@dataclasses.dataclass(frozen=True, eq=False)
class _Maps:
    """The two linear maps of one ``custom_vjp`` call, with ``res`` as their
    first argument (a list of residual leaves).

    ``jvp(res, t) = J t`` takes the tangents of the differentiable input leaves
    and returns those of the float output leaves (``out_avals``);
    ``vjp(res, ct) = Jᵀ ct`` is the backward pass, returning one cotangent per
    differentiable input leaf (None for a zero). Compared by identity: a
    primitive parameter.
    """

    name: str
    jvp: Callable
    vjp: Callable
    num_res: int
    out_avals: tuple

    def __repr__(self):
        return f"<{self.name}>"


custom_vjp_linear_p = Primitive("custom_vjp_linear")
custom_vjp_linear_p.multiple_results = True


def _split(operands, maps):
    return list(operands[: maps.num_res]), list(operands[maps.num_res :])


def _impl(*operands, maps):
    res, t = _split(operands, maps)
    return list(maps.jvp(res, t))


custom_vjp_linear_p.def_impl(_impl)
custom_vjp_linear_p.def_abstract_eval(lambda *avals, maps: list(maps.out_avals))
mlir.register_lowering(
    custom_vjp_linear_p, mlir.lower_fun(_impl, multiple_results=True)
)


def _zero_if_none(ct, aval):
    return ad.Zero(aval) if ct is None else ct


def _transpose(cts, *operands, maps):
    """Reverse mode: the custom_vjp's own backward pass on its residuals."""
    res, t = _split(operands, maps)
    if any(ad.is_undefined_primal(r) for r in res):
        raise TypeError(
            f"{maps.name}: with_forward_mode's tangent map is linear in the "
            "tangents only, not in the residuals of fwd"
        )
    t_avals = [x.aval for x in t]
    if all(type(c) is ad.Zero for c in cts):
        return [None] * len(res) + [ad.Zero(a) for a in t_avals]
    cts = [ad.instantiate_zeros(c) for c in cts]
    cts_t = maps.vjp(res, cts)
    return [None] * len(res) + [
        _zero_if_none(c, a) for c, a in zip(cts_t, t_avals, strict=True)
    ]


ad.primitive_transposes[custom_vjp_linear_p] = _transpose


def _jvp(primals, tangents, *, maps):
    """``d(J(res) t) = J(res) dt + (dJ(res)/dres · dres) t``."""
    res, t = _split(primals, maps)
    dres, dt = _split(tangents, maps)
    out = custom_vjp_linear_p.bind(*primals, maps=maps)
    tan = [ad.Zero(a.to_tangent_aval()) for a in maps.out_avals]
    if any(type(d) is not ad.Zero for d in dt):
        dt = [ad.instantiate_zeros(d) for d in dt]
        tan = custom_vjp_linear_p.bind(*res, *dt, maps=maps)
    moved = [i for i, d in enumerate(dres) if type(d) is not ad.Zero]
    if moved:
        # The map's own derivative in the residuals, t held fixed: plain JAX
        # autodiff of the evaluation rule (a backward pass, or its transpose).
        def in_res(*r):
            full = list(res)
            for i, v in zip(moved, r, strict=True):
                full[i] = v
            return list(maps.jvp(full, t))

        _, more = jax.jvp(in_res, [res[i] for i in moved], [dres[i] for i in moved])
        tan = [
            m if type(a) is ad.Zero else a + m for a, m in zip(tan, more, strict=True)
        ]
    return out, tan


ad.primitive_jvps[custom_vjp_linear_p] = _jvp


def _batch(axis_data, operands, dims, *, maps):
    """vmap: both maps vmapped, over the same named axis, outputs at axis 0.

    Registered as a "fancy" batcher for the axis (its name and size), which
    JAX also calls when no operand is batched: then nothing is mapped.
    """
    if all(d is None for d in dims):
        out = custom_vjp_linear_p.bind(*operands, maps=maps)
        return out, [None] * len(out)
    size = axis_data.size
    res, t = _split(operands, maps)
    res_dims, t_dims = _split(dims, maps)
    # Every tangent is moved to (or broadcast at) axis 0, so that the backward
    # pass returns batched cotangents at axis 0 for all of them; JAX transposes
    # the broadcast of an unbatched tangent into a sum. Under an explicit mesh
    # that shards the vmapped axis, the broadcast tangents and the outputs are
    # sharded over it as the batched operands are: the vmaps below, and those
    # of the transpose (reverse mode), require every mapped axis to agree.
    mesh_axis = axis_data.explicit_mesh_axis
    t = [
        batching.bdim_at_front(x, d, size, mesh_axis=mesh_axis)
        for x, d in zip(t, t_dims, strict=True)
    ]
    vmap = functools.partial(
        jax.vmap,
        axis_name=axis_data.name,
        axis_size=size,
        spmd_axis_name=axis_data.spmd_name,
    )
    batched = _Maps(
        maps.name,
        vmap(maps.jvp, in_axes=(res_dims, 0), out_axes=0),
        vmap(maps.vjp, in_axes=(res_dims, 0), out_axes=0),
        maps.num_res,
        tuple(_core.unmapped_aval(size, 0, a, mesh_axis) for a in maps.out_avals),
    )
    out = custom_vjp_linear_p.bind(*res, *t, maps=batched)
    return out, [0] * len(out)


batching.fancy_primitive_batchers[custom_vjp_linear_p] = _batch


def _is_float(x) -> bool:
    return jnp.issubdtype(jax.typeof(x).dtype, jnp.inexact)


def _ct_leaves(ct, primal) -> list:
    """The leaves of a backward pass's cotangent for ``primal``, with None
    (a zero) standing for every leaf of the subtree it replaces."""
    leaves = []

    def add(c, p):
        n = len(jax.tree.leaves(p))
        leaves.extend([None] * n if c is None else [c])

    jax.tree.map(add, ct, primal, is_leaf=lambda c: c is None)
    return leaves


def with_forward_mode(
    fn: jax.custom_vjp[_R], *, symmetric: bool = False
) -> Callable[..., _R]:
    r"""Gives a ``jax.custom_vjp`` function forward mode, from its own backward.

    The result evaluates exactly as ``fn``. In reverse mode (``grad``, ``vjp``,
    ``jacrev``, reverse-over-reverse) it runs ``fn``'s own ``bwd`` on exactly
    the residuals ``fn``'s ``fwd`` returns: ``jit(value_and_grad)`` compiles
    to the same program as for ``fn``. It also supports ``jax.jvp``,
    ``jax.jacfwd``, ``jax.linearize``, ``jax.hessian``, jvp-of-grad
    Hessian-vector products, ``jacfwd(jacrev)`` and ``jacfwd(jacfwd)``, and
    composes with ``jit``, ``vmap`` (named axes and collectives included),
    ``jax.checkpoint``, ``lax.scan``, ``shard_map`` and ``jax.export``.

    The tangent map :math:`t \mapsto J t` comes from ``bwd``, which computes
    :math:`g \mapsto J^\top g` and must be linear in ``g`` (JAX-transposable):
    with ``symmetric=True`` (:math:`J = J^\top`, as for softmax) ``bwd`` is
    the tangent map itself; otherwise it is ``jax.linear_transpose`` of
    ``bwd``. Nothing needs to be written twice. Higher derivatives
    differentiate ``fwd`` and ``bwd`` with JAX's own autodiff, so ``fwd``
    must not call ``fn`` (a ``custom_vjp``, which has no forward mode): let
    it compute the output directly, or call the function this returns.

    ``fn`` may have ``nondiff_argnums`` (static arguments, passed to ``bwd``
    first), pytree inputs and outputs, and integer or boolean inputs, which
    get no tangent. Only float leaves are differentiated.

    Under a transformation, ``fwd``, ``bwd`` and the tangent map are traced
    at every call, as JAX traces a ``custom_vjp``'s rules, so that rules
    that read Python state see its current value. A second derivative
    outside ``jit`` (``jax.jvp`` of ``jax.grad``) then compiles the loops in
    them at every call: put it under ``jit``. (jsoftmax's own ops, whose
    rules read nothing else, keep their traces and compile once.)

    ``fn``'s rules may close over traced values: a ``custom_vjp`` defined
    inside a ``jit``, ``vmap`` or ``lax.scan`` body that reads its arguments
    (as flax and equinox modules' rules read their parameters), or a function
    in ``nondiff_argnums`` that does. Forward and reverse mode, their
    compositions and an inner ``jit`` or ``vmap`` work with them, and a
    ``jacfwd`` or ``jacrev`` in such a value around a ``jvp`` or ``grad`` in
    ``fn``'s arguments differentiates through ``fwd`` and ``bwd``, as for
    ``fn``. Differentiating in it in the same ``jvp`` or ``grad`` as ``fn``'s
    arguments raises JAX's ``UnexpectedTracerError``, as for ``fn``: pass it
    as an argument instead.

    Args:
      fn: a ``jax.custom_vjp`` function whose rules are defined (``defvjp``),
        without ``symbolic_zeros``.
      symmetric: declare :math:`J = J^\top`: the float input leaves and the
        float output leaves correspond one to one, with equal shapes and
        dtypes, and ``bwd`` is its own transpose. Saves a transposition. A
        wrong declaration is not detected: forward mode then silently gives
        :math:`J^\top t` in place of :math:`J t`, while reverse mode stays
        right. :func:`jsoftmax.testing.vjp_errors` (and
        :func:`~jsoftmax.testing.assert_vjp_matches`) against a reference
        catches it: it compares ``jax.jacfwd`` too, and names the failing
        row "by jax.jacfwd".

    Returns:
      A function with ``fn``'s signature. ``jax.make_jaxpr`` of it shows a
      ``custom_jvp_call`` around ``fn``'s ``custom_vjp_call``.

    Raises:
      TypeError: ``fn`` is not a ``jax.custom_vjp`` with its rules defined, or
        uses ``symbolic_zeros``. When differentiated in forward mode: a
        symmetric ``fn`` has inputs and outputs that do not correspond, or
        ``bwd`` returns a cotangent of the wrong shape.
      UnexpectedTracerError: as ``fn`` raises it: a ``nondiff_argnums``
        argument is traced, or a value the rules close over is differentiated
        together with ``fn``'s arguments.
      NotImplementedError: in forward mode, ``bwd`` is not linear in the
        cotangent as JAX traces it (a non-linear operation, which
        ``jax.linear_transpose`` names, a product or a comparison of
        cotangents, a ``while_loop`` with a traced trip count); JAX's own
        error is chained to it. A
        ``bwd`` that is affine in it (a constant added) is not detected: the
        transpose drops the constant. Its reverse mode is then wrong too, and
        :func:`jsoftmax.testing.vjp_errors` against a reference catches it.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> @jax.custom_vjp
      ... def scale(x, s):
      ...     return x * s
      >>> def scale_fwd(x, s):
      ...     return x * s, s
      >>> def scale_bwd(s, g):
      ...     return g * s, None  # no gradient for s
      >>> scale.defvjp(scale_fwd, scale_bwd)
      >>> scale = jsoftmax.with_forward_mode(scale)
      >>> y, dy = jax.jvp(lambda x: scale(x, 3.0), (2.0,), (1.0,))
      >>> dy
      Array(3., dtype=float32, weak_type=True)
      >>> jax.grad(lambda x: scale(x, 3.0))(2.0)
      Array(3., dtype=float32, weak_type=True)
    """
    return _with_forward_mode(fn, symmetric=symmetric)


def _with_forward_mode(
    fn: jax.custom_vjp,
    *,
    symmetric: bool = False,
    tangent: Callable | None = None,
    keep_traces: bool = False,
) -> Callable:
    """:func:`with_forward_mode`, with an op's own tangent map, and its
    traces kept (``keep_traces``, for the library's ops).

    ``tangent(statics, res, t_leaves) -> dy_leaves``, where given, replaces the
    evaluation rule derived from ``bwd`` (whose transpose needs ``bwd`` to be
    JAX-transposable): ``statics`` are the ``nondiff_argnums`` arguments,
    ``res`` the residuals ``fwd`` returned (as a pytree), ``t_leaves`` the
    tangents of the float input leaves in order, and it returns the tangents
    of the float output leaves in order, dense. It is meant to be JAX's own
    ``jax.jvp`` of the forward pass recomputed from the residuals, not a
    second hand-written derivative, and it must agree with ``bwd`` (which is
    ``J^T``: an output ``bwd`` ignores the cotangent of has a zero tangent).
    Like ``fwd`` and ``bwd``, it may close over traced values (through
    ``statics`` too).
    Reverse mode still runs ``bwd`` on ``res`` only; higher derivatives
    differentiate ``tangent`` (``jacfwd`` over it works, reverse mode over it
    needs it to be transposable).

    ``keep_traces``: the rules' traces are kept and given again to a later
    call with equal static arguments (of the same types) and argument types,
    and run as calls of their own outside a staged trace
    (:func:`_closure_convert`), so that second derivatives outside ``jit``
    compile once. For rules that read nothing but their arguments and static
    arguments (the ops): a user's rule may read Python state that changes
    between eager calls, which a kept trace would not see.
    """
    if symmetric and tangent is not None:
        raise TypeError("with_forward_mode: pass symmetric=True or a tangent, not both")
    if not isinstance(fn, jax.custom_vjp):
        raise TypeError(
            "with_forward_mode takes a jax.custom_vjp object, got "
            f"{type(fn).__name__} {fn!r}: wrap the custom_vjp itself, before "
            "functools.partial or jax.jit (a plain function already has "
            "forward mode, and a jax.custom_jvp has its own rule)"
        )
    if getattr(fn, "fwd", None) is None or getattr(fn, "bwd", None) is None:
        raise TypeError(
            f"with_forward_mode: {fn!r} has no rules yet; call "
            "fn.defvjp(fwd, bwd) before with_forward_mode(fn)"
        )
    if fn.symbolic_zeros:
        raise TypeError(
            "with_forward_mode does not support custom_vjp(symbolic_zeros=True)"
        )
    nondiff = tuple(fn.nondiff_argnums)
    name = getattr(fn, "__name__", "custom_vjp")

    # The axis names bound where fn is called come first, as a static
    # argument that the rule binds again where JAX runs it without them.
    def primal(axes, *args):
        return fn(*args)

    primal.__name__ = primal.__qualname__ = name  # as jaxprs and errors name it

    wrapped = jax.custom_jvp(primal, nondiff_argnums=(0, *(i + 1 for i in nondiff)))

    def rule(axes, *args):
        *statics, primals, tangents = args
        _check_static(name, nondiff, statics)
        with _rebound(axes):
            return _jvp_rule(
                fn, symmetric, tangent, keep_traces, name, nondiff, statics,
                primals, tangents,
            )  # fmt: skip

    wrapped.defjvp(rule)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        # Every argument by position, defaults included, as jax.custom_vjp
        # passes them to its rules (nondiff_argnums count them).
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.kwargs:
            raise TypeError(
                f"{name}: keyword-only arguments {sorted(bound.kwargs)} cannot be "
                "passed by position, as jax.custom_vjp needs"
            )
        return wrapped(_bound_axes(), *bound.args)

    return call


# JAX's internals that name the bound axes and bind them again, read
# defensively: where a JAX version lays them out otherwise, the rule runs as
# before (no name bound again) rather than fails.
_CAN_REBIND = hasattr(_core, "get_axis_env") and hasattr(_core, "extend_axis_env_nd")


def _axis_sizes() -> dict:
    """The sizes of the axis names bound here (``vmap``'s, ``shard_map``'s) by
    name; empty where this JAX version does not say."""
    if not _CAN_REBIND:
        return {}
    return dict(getattr(_core.get_axis_env(), "axis_sizes", {}))


def _rebound(axes):
    """A context binding again the names of ``axes`` (:func:`_bound_axes` where
    a rule was made) that are not bound where it runs
    (:func:`_unbound_axes`)."""
    unbound = _unbound_axes(axes)
    return _core.extend_axis_env_nd(unbound) if unbound else nullcontext()


def _bound_axes() -> tuple:
    """``(name, size)`` of the axis names bound here, hashable, or ``()``."""
    axes = tuple(_axis_sizes().items())
    try:
        hash(axes)
    except TypeError:
        return ()
    return axes


def _unbound_axes(axes) -> list:
    """``(name, size)`` of the axis names bound where the op was called
    (``axes``) or by an enclosing ``vmap`` (:func:`_unbound_vmap_axes`) that
    are not bound where its rule runs.

    JAX runs a ``custom_jvp`` rule where the names of its call may not be
    bound: a ``vmap``'s rule is traced lazily, unbatched and outside the
    ``vmap``, then batched, when a ``jit``, ``jax.checkpoint`` or
    ``lax.scan`` traced around the ``vmap`` is differentiated; the
    collectives in ``fwd`` then raised JAX's "unbound axis name"
    ``NameError``. The names and sizes are those the call saw, so that
    ``lax.axis_size`` reads the same."""
    if not _CAN_REBIND:
        return []
    bound = _axis_sizes()
    unbound = {}
    for axis, size in (*axes, *_unbound_vmap_axes()):
        if axis not in bound:
            unbound.setdefault(axis, size)
    return list(unbound.items())


def _unbound_vmap_axes() -> list:
    """``(name, size)`` of the named ``vmap`` axes whose batching encloses
    this rule (:func:`_unbound_axes` keeps those not bound here).

    ``vmap`` binds its axis name while it traces its function, and a
    collective in the rule then finds it. But JAX batches a ``custom_jvp``
    rule lazily, when a ``jit``, ``jax.checkpoint`` or ``lax.scan`` traced
    around the ``vmap`` is differentiated, and runs it under the ``vmap``'s
    batching without binding the name again; the rule's traces
    (:func:`_closure_convert`) then fail on the collective with JAX's
    "unbound axis name" ``NameError``. Binding those names again gives the
    rule the environment the ``vmap`` gave the function."""
    unnamed = (None, getattr(_core, "no_axis_name", None))
    axes = []
    trace = _core.trace_ctx.trace
    while trace is not None and not isinstance(trace, _core.EvalTrace):
        data = getattr(trace, "axis_data", None)
        if isinstance(trace, batching.BatchTrace) and data is not None:
            if data.name not in unnamed:
                axes.append((data.name, data.size))
        trace = getattr(trace, "parent_trace", None)
    return axes


def _check_static(name, nondiff, statics):
    """A traced ``nondiff_argnums`` argument raises, as ``jax.custom_vjp``
    raises it when called (the forward-mode rule does not call it)."""
    for i, static in zip(nondiff, statics, strict=True):
        if any(isinstance(x, _core.Tracer) for x in jax.tree.leaves(static)):
            raise jax.errors.UnexpectedTracerError(
                f"{name}: argument {i} is in nondiff_argnums but is traced (an "
                "argument of jit, vmap or grad, or computed from one): as for "
                "jax.custom_vjp, pass arrays as ordinary arguments (bwd may "
                "return None for them); nondiff_argnums are for static values "
                "such as axes, sizes and functions, which may close over "
                "traced values"
            )


def _merge(nondiff, statics, primals):
    """The full argument list: ``statics`` back at their ``nondiff`` places."""
    statics, primals = iter(statics), list(primals)
    rest = iter(primals)
    return [
        next(statics) if i in nondiff else next(rest)
        for i in range(len(nondiff) + len(primals))
    ]


def _jvp_rule(fn, symmetric, tangent, keep, name, nondiff, statics, primals, tangents):
    y, res = _fwd_call(fn.fwd, statics, nondiff, primals, keep)
    # What the rules below compute is determined by these and the avals.
    rule_key = (fn, fn.fwd, fn.bwd, tangent, symmetric, tuple(statics))
    rule_key = (*rule_key, _avals(primals)) if keep else None
    y_leaves, out_tree = jax.tree.flatten(y)
    res_leaves, res_tree = jax.tree.flatten(res)
    p_leaves = jax.tree.leaves(primals)
    t_leaves = jax.tree.leaves(tangents)
    diff = [i for i, p in enumerate(p_leaves) if _is_float(p)]
    outs = [i for i, v in enumerate(y_leaves) if _is_float(v)]
    out_avals = tuple(jax.typeof(y_leaves[i]).to_tangent_aval() for i in outs)
    t_avals = [jax.typeof(p_leaves[i]).to_tangent_aval() for i in diff]
    # The maps outlive this trace (in jaxprs and JAX's caches): they keep
    # shapes and tree structures, never tracers.
    y_avals = [jax.typeof(v).to_tangent_aval() for v in y_leaves]
    if not outs:
        return y, jax.tree.unflatten(out_tree, _with_float0_zeros(y_avals, [], []))
    skeletons = [jax.tree.map(lambda _: 0, p) for p in primals]

    def user_bwd(res_leaves, cts):
        """bwd on float output cotangents; one cotangent per float input leaf."""
        full = _with_float0_zeros(y_avals, outs, cts)
        g = jax.tree.unflatten(out_tree, full)
        ct_args = fn.bwd(*statics, jax.tree.unflatten(res_tree, res_leaves), g)
        if not isinstance(ct_args, (tuple, list)) or len(ct_args) != len(skeletons):
            raise TypeError(
                f"{name}: bwd must return a tuple of {len(skeletons)} cotangents, "
                "one per non-static argument"
            )
        leaves = []
        for c, p in zip(ct_args, skeletons, strict=True):
            leaves.extend(_ct_leaves(c, p))
        return [leaves[i] for i in diff]

    # Under a transformation the maps are traced here, once each (outside
    # any, they are called as they are), and the traced values they close
    # over (an enclosing jit's or vmap's arguments, a flax or equinox
    # module's parameters, reached through bwd, the static arguments or the
    # tangent hook) join the residuals as operands of the primitive: its
    # parameters outlive this trace, and every transformation must see them.
    # bwd is traced in the context JAX's transposition gives an equation's
    # rule (the one recorded with it), where it traces a custom_vjp's bwd: the
    # jit functions it calls are traced anew (their cache keys hold the
    # context), not reused from the forward pass, as for the custom_vjp.
    with _core.JaxprEqnContext().manager:
        bwd, closed = _closure_convert(
            user_bwd, res_leaves, list(out_avals), key=rule_key and ("bwd", rule_key)
        )
    own, closed_own = None, []
    if tangent is not None:

        def user_tangent(res_leaves, t):
            res = jax.tree.unflatten(res_tree, res_leaves)
            return list(tangent(statics, res, list(t)))

        own, closed_own = _closure_convert(
            user_tangent, res_leaves, t_avals, key=rule_key and ("tangent", rule_key)
        )
    n, m = len(closed), len(closed) + len(closed_own)
    res_leaves = closed + closed_own + res_leaves

    def vjp(res_leaves, cts):
        return bwd(res_leaves[:n], res_leaves[m:], cts)

    def dense_vjp(res_leaves, cts):
        """vjp with zeros made dense, each cotangent of its input's tangent
        type: a bwd may return float32 for a bfloat16 input (reverse mode
        accepts it), which the linear transpose would not."""
        dense = []
        for c, a in zip(vjp(res_leaves, cts), t_avals, strict=True):
            c = ad.instantiate_zeros(_zero_if_none(c, a))
            if np.shape(c) != a.shape:
                raise TypeError(
                    f"{name}: bwd returned a cotangent of shape {np.shape(c)} "
                    f"for an input of shape {a.shape}"
                )
            dense.append(c.astype(a.dtype))
        return dense

    if own is not None:

        def jvp(res_leaves, t):
            return own(res_leaves[n:m], res_leaves[m:], t)

    elif symmetric:
        _check_symmetric(name, t_avals, out_avals)
        jvp = dense_vjp
    else:

        def jvp(res_leaves, t):
            try:
                transposed = jax.linear_transpose(
                    lambda *cts: dense_vjp(res_leaves, list(cts)), *out_avals
                )
                return list(transposed(t))
            except (AssertionError, ValueError, NotImplementedError) as error:
                # JAX's transposition names a non-linear primitive, but
                # fails on a product of two cotangents or a test of one
                # with a bare AssertionError, and on a while_loop with a
                # ValueError about reverse mode.
                raise NotImplementedError(
                    f"{name}: forward mode is bwd transposed, and JAX could not "
                    f"transpose bwd ({type(error).__name__}: {error}). bwd must "
                    "be linear in the cotangent as JAX traces it: no product or "
                    "comparison of cotangents, no masks applied to a product "
                    "with an infinite factor, no while_loop with a traced trip "
                    "count"
                ) from error

    maps = _Maps(name, jvp, vjp, len(res_leaves), out_avals)
    t_in = [t_leaves[i] for i in diff]
    dy = custom_vjp_linear_p.bind(*res_leaves, *t_in, maps=maps)
    full = _with_float0_zeros(y_avals, outs, dy)
    return y, jax.tree.unflatten(out_tree, full)


def _fwd_call(fwd, statics, nondiff, primals, keep):
    """``fwd`` on the merged arguments, as one ``custom_jvp`` call (its JVP:
    JAX's own, of ``fwd``), traced as JAX traces a ``custom_vjp``'s forward.

    Reverse mode linearises the outer ``custom_jvp`` by evaluating its rule
    under a partial-evaluation trace, with the primals known and the tangents
    unknown. Known operations are computed in its parent trace, but a loop is
    not simply computed there: its partial-evaluation rule rewrites it (a scan
    hoists its loop-invariant work out of the body), and ``fwd`` would compile
    to another program than under the bare ``custom_vjp``, whose ``fwd`` JAX
    runs in the parent trace itself. A ``custom_jvp`` call whose inputs are
    all known is bound in the parent trace whole, also when the rule was
    first traced into a jaxpr (the op inside ``jit`` or ``cond``).
    """

    # Residuals that are input arrays leave the call as those inputs, not as
    # its outputs: outside it, jit and the other calls partial evaluation
    # splits see them forwarded, as a custom_vjp's are (not returned again).
    ins = jax.tree.leaves(primals)
    arrays = [isinstance(x, jax.Array) for x in ins]
    forwarded = []

    def call(*primals):
        y, res = fwd(*_merge(nondiff, statics, primals))
        inner = jax.tree.leaves(primals)
        res_leaves, res_tree = jax.tree.flatten(res)
        index = [_position(r, inner, arrays) for r in res_leaves]
        forwarded[:] = [index, res_tree]
        return y, [r for r, i in zip(res_leaves, index, strict=True) if i is None]

    # The traced values fwd closes over are passed to the call: an enclosing
    # jvp whose tangents come only through them (not through the primals)
    # would otherwise bind the call in its parent trace, out of their scope.
    key = ("fwd", fwd, tuple(statics), nondiff, tuple(arrays)) if keep else None
    converted, closed = _closure_convert(call, *primals, key=key, state=forwarded)
    whole = jax.custom_jvp(converted)
    axes = _bound_axes()

    def whole_jvp(primals, tangents):
        # Traced lazily too (a jit, checkpoint or scan around a vmap, whose
        # axis it names, differentiated twice): the names bound here again.
        with _rebound(axes):
            return jax.jvp(converted, primals, tangents)

    whole.defjvp(whole_jvp)
    y, computed = whole(closed, *primals)
    index, res_tree = forwarded
    computed = iter(computed)
    res = [next(computed) if i is None else ins[i] for i in index]
    return y, jax.tree.unflatten(res_tree, res)


def _closure_convert(f, *example_args, key=None, state=None):
    """``f`` traced into a jaxpr on the avals of ``example_args``, as
    ``(converted, closed)``: ``closed`` are the traced values ``f`` closes
    over, and ``converted(closed, *args)`` is ``f(*args)``, evaluating that
    jaxpr with the values given in their place, so that it closes over no
    tracer. Constants that are not traced stay in it; outputs may be None.
    (``jax.closure_convert`` keeps in the closure the tracers it deems unable
    to carry a tangent, a ``vmap``'s among them.) Outside any transformation,
    ``f`` itself, untraced: there is no tracer to close over.

    ``key``, where given, is a hashable value that, with the avals of
    ``example_args`` and JAX's trace context, determines what ``f`` computes
    (the rule and its static arguments), and ``state`` a list ``f`` fills
    while traced. A jaxpr that closes over no traced value is then kept under
    that key and given again, ``state`` restored, to a later call: the
    ``while`` and ``scan`` loops in it keep their jaxprs, whose compiled
    programs JAX caches by identity. (The rules run again at every call of a
    second derivative outside ``jit``, where JAX's ``jvp`` of a ``grad``
    evaluates the first derivative's rules eagerly: a fresh jaxpr each time
    compiled every loop in it again.)"""
    if not _under_a_transformation():
        # Eager, as JAX runs a custom_vjp's fwd and bwd: nothing traced to
        # close over, and Python control flow on values works as for it.
        return lambda closed, *args: f(*args), []
    cache_key = _cache_key(key, example_args)
    kept = _kept.take(cache_key) if cache_key is not None else None
    if kept is not None:
        if state is not None:
            state[:] = kept.state
        _kept.put(cache_key, kept)
        return kept.jitted, []
    jaxpr, shapes = jax.make_jaxpr(f, return_shape=True)(*example_args)
    traced = _Traced(jaxpr, jax.tree.structure(shapes), list(state or []))
    closed = [c for c in jaxpr.consts if isinstance(c, _core.Tracer)]
    if cache_key is None or closed:
        return traced.converted, closed
    traced.jitted = jit_kept(traced.converted)
    _kept.put(cache_key, traced)
    return traced.jitted, []


class _Traced:
    """One traced rule: its jaxpr, whose traced constants are given at each
    call in place of the None left in ``consts`` (it holds no tracer, which
    would outlive its trace), its output tree, and the state it filled."""

    def __init__(self, jaxpr, out_tree, state):
        self.jaxpr = _without_consts(jaxpr)
        self.is_traced = [isinstance(c, _core.Tracer) for c in jaxpr.consts]
        self.consts = [
            None if t else c for c, t in zip(jaxpr.consts, self.is_traced, strict=True)
        ]
        self.out_tree = out_tree
        self.state = state

    def converted(self, hoisted, *args):
        hoisted = iter(hoisted)
        consts = [
            next(hoisted) if t else c
            for c, t in zip(self.consts, self.is_traced, strict=True)
        ]
        out = _core.eval_jaxpr(self.jaxpr, consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(self.out_tree, out)


def _without_consts(closed):
    """The jaxpr of ``make_jaxpr``'s ``closed``, holding no constant value:
    its ``.jaxpr`` up to jax 0.10. From jax 0.11 on, one class is both and
    ``.jaxpr`` is ``closed`` itself, its constants attached: None stands in
    for each (``eval_jaxpr`` takes them as an argument)."""
    body = closed.jaxpr
    if body is closed:
        body = body.with_consts([None] * len(closed.consts))
    return body


class _KeptTraces:
    """The traced rules :func:`_closure_convert` keeps, the least recently
    used first, at most ``size``. Registered with JAX's caches, so that
    ``jax.clear_caches()`` clears it too (after a rule's code changes)."""

    def __init__(self, size):
        self.size = size
        self._items = {}

    def take(self, key):
        """The entry under ``key`` (or None), taken out: put it back."""
        return self._items.pop(key, None)

    def put(self, key, value):
        self._items[key] = value
        while len(self._items) > self.size:
            del self._items[next(iter(self._items))]

    def cache_clear(self):
        self._items.clear()

    def cache_info(self):
        return f"{len(self._items)} traced rules kept, at most {self.size}"

    def cache_keys(self):
        return list(self._items)


_kept = _KeptTraces(256)
_util.register_cache(_kept, "jsoftmax's traced custom_vjp rules")


def _cache_key(key, example_args):
    """``key`` with the avals of ``example_args`` and the trace context, or
    None where nothing may be kept (no key, an unhashable one, or JAX's
    tracer-leak checks on, under which JAX keeps no traces either)."""
    if key is None or _config.check_tracer_leaks.value:
        return None
    # Static arguments equal across types (1, 1.0, True, np.float32(1)) may
    # compute differently: typed, as jax.jit keys its static arguments.
    full = (_typed(key), _avals(example_args), _config.trace_context())
    try:
        hash(full)
    except TypeError:
        return None
    return full


def _typed(x):
    """``x`` with the type of each leaf of its tuples beside it."""
    if isinstance(x, tuple):
        return tuple(_typed(a) for a in x)
    return (type(x), x)


def jit_kept(f, **options) -> Callable:
    """``jax.jit(f, **options)``, inlined into an enclosing staged trace
    (``jit``, ``scan``, ``make_jaxpr``), and a call of its own outside one.

    Under ``jit`` the program is then the one ``f`` itself gives. Outside,
    the transformations of the call (``grad``, ``jvp``, and a second
    derivative around them, which JAX evaluates eagerly) keep it a call,
    whose transformed programs JAX caches: inlined, the loops in it reached
    JAX's eager rules one by one, and their transposes and tangent programs,
    built anew at every call, were compiled again at every call."""
    inlined = jax.jit(f, inline=True, **options)
    called = jax.jit(f, inline=False, **options)

    @functools.wraps(f)
    def call(*args, **kwargs):
        return (inlined if _staged() else called)(*args, **kwargs)

    return call


def _staged() -> bool:
    """Whether this call is being staged into a jaxpr (``jit``, a loop body,
    ``make_jaxpr``), not evaluated, under whatever transformations."""
    trace = _core.trace_ctx.trace
    while trace is not None and not isinstance(trace, _core.EvalTrace):
        if isinstance(trace, pe.DynamicJaxprTrace):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def _under_a_transformation() -> bool:
    """Whether a transformation encloses this rule's call (other than the
    partial evaluation of its own reverse mode), whose traced values the
    rules might close over."""
    trace = _core.trace_ctx.trace
    # (None, as from jax 0.11 on while JAX processes a primitive: none.)
    while trace is not None and not isinstance(trace, _core.EvalTrace):
        if not isinstance(trace, pe.JaxprTrace):
            return True
        trace = trace.parent_trace
    return False


def _avals(tree):
    """The tree structure of ``tree`` and the avals of its leaves."""
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple(
        x if isinstance(x, _core.AbstractValue) else jax.typeof(x) for x in leaves
    )


def _position(leaf, inputs, arrays):
    """The position of ``leaf`` among the array ``inputs``, or None."""
    return next(
        (
            i
            for i, (x, a) in enumerate(zip(inputs, arrays, strict=True))
            if a and leaf is x
        ),
        None,
    )


def _with_float0_zeros(avals, outs, values):
    """``values`` at the float outputs ``outs``, float0 zeros (of the tangent
    ``avals``, whose shapes may be symbolic: jax.export) at the others."""
    full = dict(zip(outs, values, strict=True))
    return [
        full[i] if i in full else ad.zeros_like_aval(aval)
        for i, aval in enumerate(avals)
    ]


def _check_symmetric(name, t_avals, out_avals):
    if [(a.shape, a.dtype) for a in t_avals] != [(a.shape, a.dtype) for a in out_avals]:
        raise TypeError(
            f"{name}: with_forward_mode(symmetric=True) needs its float inputs "
            "and float outputs to correspond one to one in shape and dtype, got "
            f"inputs {[a.str_short() for a in t_avals]} and outputs "
            f"{[a.str_short() for a in out_avals]}"
        )

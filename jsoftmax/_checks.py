"""Argument checks and dtype rules shared by every op.

All checks run at trace time on static shapes and dtypes, so a bad call fails
with a clear message before anything is computed.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax._forward_mode import jit_kept

Axis = int | Sequence[int] | None

_P = ParamSpec("_P")
_R = TypeVar("_R")


def normalize_axis(
    name: str, axis: Axis, ndim: int, shape: tuple[int, ...]
) -> tuple[int, ...]:
    """Returns ``axis`` as a sorted tuple of non-negative ints; ``name`` is the
    op's, for the messages.

    Raises:
      ValueError: an axis is out of range for ``shape`` or named twice.
      TypeError: ``axis`` is not an int, a sequence of ints or None (a bool, a
        float, a string, a traced value).
    """
    if axis is None:
        return tuple(range(ndim))
    scalar = not isinstance(axis, (tuple, list)) and np.ndim(axis) == 0
    axes = tuple(
        static_int(
            name, "axis", a, "an int, a tuple or list of ints or None", shown=axis
        )
        for a in ((axis,) if scalar else axis)
    )
    if ndim == 0:
        raise ValueError(
            f"{name}: axis {axis!r} is out of range for a scalar (shape {shape}): "
            "softmax needs at least one dimension"
        )
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}: axis {a} is out of range for an array of shape {shape} "
                f"(ndim {ndim})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(
            f"{name}: axis {axis!r} names the same axis twice (shape {shape})"
        )
    return tuple(sorted(out))


def number_kind(value) -> str | None:
    """``"i"`` if ``value`` is one integer, ``"f"`` if one real float, else None.

    Python ints and floats, and 0-d NumPy or JAX values of an integer or
    floating dtype of any width (bfloat16 and float8 too, which NumPy's
    issubdtype does not count as numbers), traced ones included. Not a bool,
    a complex number, a string, a datetime or a timedelta (NumPy counts
    timedelta64 as an integer: ``np.timedelta64(2)`` would silently mean 2),
    a sequence or an array of more than one element.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    dtype = getattr(value, "dtype", None)
    if dtype is None or np.ndim(value) != 0 or np.dtype(dtype).kind in "mM":
        return None
    if jnp.issubdtype(dtype, jnp.integer):
        return "i"
    if jnp.issubdtype(dtype, jnp.floating):
        return "f"
    return None


def static_int(name: str, arg: str, value, what: str = "an int", *, shown=None) -> int:
    """A static integer argument (an axis, a size) as a Python int.

    Python ints, NumPy integers and concrete 0-d integer arrays pass. Bools do
    not, although Python counts them as ints: ``True`` would silently mean 1.
    ``shown`` is what the message shows (the whole argument, when ``value`` is
    one entry of it); ``what`` says what the argument may be.

    Raises:
      TypeError: a bool, a non-integer (float, string, sequence, array) or a
        traced value, naming ``arg`` and the op ``name``.
    """
    shown = value if shown is None else shown
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name}: {arg} must be static: got a traced value {shown!r}; pass a "
            f"Python int (under jit, close over it or mark it static with "
            f"static_argnames=({arg!r},))"
        )
    if number_kind(value) == "i":
        return operator.index(value)
    raise TypeError(f"{name}: {arg} must be {what}, got {shown!r}")


def float_input(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """An input of a ``custom_vjp`` op: :func:`refuse_jet`, then
    :func:`real_float`.

    Raises:
      TypeError: ``x`` is complex.
      NotImplementedError: ``x`` is traced by ``jax.experimental.jet``.
    """
    refuse_jet(name, x)
    return real_float(name, x)


def as_input(x: jax.typing.ArrayLike) -> jax.Array:
    """``jnp.asarray(x)``, typed on the context mesh (replicated) where that
    mesh has ``Explicit`` axes and ``x`` has no mesh: an array made before
    :func:`jax.set_mesh` (parameters initialised earlier, NumPy labels,
    constants). The ops give their intermediates the shardings of their
    inputs, and one of no mesh beside one sharded over it conflicts (a
    ``cond``'s branches, a scan's carry, an ``out_sharding``), where plain
    JAX code reads it as replicated."""
    x = jnp.asarray(x)
    if not explicit_axes() or not jax.typeof(x).sharding.mesh.empty:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def as_int_input(name: str, what: str, x, *, saturate: bool) -> jax.Array:
    """:func:`as_input` for integer ids (class labels, sequence lengths,
    segment ids). Where 64-bit types are off (JAX's default), JAX converts a
    NumPy int64 or uint64 array to 32 bits by wrapping: ``2**32 + 1`` reads
    as 1, a valid label or length. Such values are clamped to int32's range
    first (``saturate``: past it, a label is out of range and a length past
    any sequence either way), or refused (segment ids, where clamping could
    merge two segments)."""
    if (
        isinstance(x, (np.ndarray, np.generic))
        and x.dtype.kind in "iu"
        and x.dtype.itemsize == 8
        and jax.dtypes.canonicalize_dtype(x.dtype).itemsize < 8
    ):
        info = np.iinfo(np.int32)
        x = np.asarray(x)
        low = x.size and (x.dtype.kind == "i" and x.min() < info.min)
        high = x.size and x.max() > info.max
        if (low or high) and not saturate:
            raise ValueError(
                f"{name}: {what} hold values past int32's range, which JAX "
                "(64-bit types off) would wrap into it; renumber them, or turn "
                "on jax_enable_x64"
            )
        if x.dtype.kind == "u":
            x = np.minimum(x, np.uint64(info.max))
        x = np.clip(x, info.min, info.max).astype(np.int32)
    return as_input(x)


def share_shardings(arrays: Sequence, dims: Sequence, whole: tuple = ()) -> list:
    """``arrays`` resharded so that each logical dimension is split one way in
    all of them, where the context mesh has ``Explicit`` axes.

    ``dims[i]`` names the logical dimension of each axis of ``arrays[i]``
    (None for an axis to leave alone: a broadcast axis of size 1, a
    contracted one); an array may be None. A dimension split over a mesh axis
    in one array and replicated in another becomes split in both, as plain
    JAX's broadcasting gives the sharded operand's sharding to the result
    (``x + where``): the ops' intermediates, loop carries and ``cond``
    branches are typed from several inputs, and one typed from the main input
    alone would conflict with an auxiliary input split differently (labels or
    a mask split over the batch beside replicated logits). Splitting a
    replicated array is local; its cotangent is gathered back by
    ``reshard``'s transpose. Dimensions whose inputs disagree (two different
    mesh axes), and arrays that would then use one mesh axis twice, are left
    as they are. The dimensions in ``whole`` are gathered wherever split:
    ones the op reduces over block by block (attention's keys).
    """
    if not explicit_axes():
        return list(arrays)
    specs = [None if a is None else mesh_spec(a) for a in arrays]
    chosen: dict = {}
    for spec, names in zip(specs, dims, strict=True):
        if spec is None:
            continue
        for entry, dim in zip(spec, names, strict=True):
            if dim is not None and entry is not None:
                chosen.setdefault(dim, set()).add(entry)
    out = []
    for a, spec, names in zip(arrays, specs, dims, strict=True):
        if a is None:
            out.append(a)
            continue
        want = tuple(
            None
            if dim in whole
            else next(iter(chosen[dim]))
            if len(chosen.get(dim, ())) == 1
            else entry
            for entry, dim in zip(spec, names, strict=True)
        )
        used = [axis for entry in want if entry is not None for axis in entry]
        if want != spec and len(used) == len(set(used)):
            a = jax.sharding.reshard(a, jax.sharding.PartitionSpec(*want))
        out.append(a)
    return out


def in_operands_mesh(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run with the mesh of its array arguments' types as the context
    mesh where none is set: arrays put on an ``Explicit`` mesh and passed to
    ``jit`` outside ``jax.set_mesh``, as plain JAX code may. The ops read
    the mesh from the context (splits, ``reshard`` to a spec,
    ``shard_map``); an arguments' mesh with no ``Explicit`` axis changes
    nothing. Typed to keep ``fn``'s signature for type checkers."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not jax.sharding.get_abstract_mesh().empty:
            return fn(*args, **kwargs)
        for leaf in jax.tree.leaves((args, kwargs)):
            mesh = _mesh(leaf)
            if mesh is not None and explicit_axes(mesh):
                # A concrete array's device mesh (eager calls run on it), a
                # traced one's abstract mesh.
                if isinstance(mesh, jax.sharding.Mesh):
                    context = jax.set_mesh(mesh)
                else:
                    context = jax.sharding.use_abstract_mesh(mesh)
                with context:
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


def traced_once(rule):
    """``rule`` (an op's ``custom_vjp``, or its forward-mode wrapper) under a
    ``jax.jit`` whose static arguments are its ``nondiff_argnums``, inlined
    into an enclosing staged trace and a call of its own outside one
    (:func:`~jsoftmax._forward_mode.jit_kept`): a call traces the rule once
    per argument types and static options, not once per call. Outside
    ``jit`` (eager calls, ``jax.grad`` of them, and second derivatives
    around those) the block loops are then compiled once, not at every
    call; under ``jit`` the program is the same, and a
    rule called again at the same types (a model's layers) is not traced
    again. Keyed on the rule object, so that a rule swapped in is traced
    anew. A new static option value compiles a new program outside ``jit``:
    the per-example losses, whose options a schedule may change at every
    call, call their rules directly."""
    return _jitted(rule, tuple(rule.nondiff_argnums))


@functools.cache
def _jitted(rule, static):
    return jit_kept(rule, static_argnums=static)


def _mesh(x):
    """The mesh of an array's sharding (None for other values)."""
    if not isinstance(x, jax.Array):
        return None
    try:
        sharding = x.sharding  # a concrete array's, on devices
    except AttributeError:  # a traced array's, in its type
        sharding = jax.typeof(x).sharding
    return getattr(sharding, "mesh", None)


def explicit_axes(mesh=None) -> tuple:
    """The names of the ``Explicit`` axes of ``mesh`` (default: the context
    mesh; none outside a mesh, and inside ``shard_map``, whose axes are
    ``Manual``)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    explicit = jax.sharding.AxisType.Explicit
    return tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == explicit
    )


def mesh_spec(x) -> tuple:
    """The mesh axes of each axis of ``x``'s type (an array's, or the abstract
    value itself), each entry None or a tuple of axis names."""
    aval = x if isinstance(x, jax.core.ShapedArray) else jax.typeof(x)
    return spec_entries(aval.sharding.spec, aval.ndim)


def spec_entries(spec, ndim) -> tuple:
    """A ``PartitionSpec``'s entries for ``ndim`` axes as :func:`mesh_spec`
    gives them: None, or a tuple of mesh axis names."""
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(
        None if e is None else (e,) if isinstance(e, str) else tuple(e) or None
        for e in spec
    )


def reshard_to(x, spec):
    """``x`` resharded to ``spec`` (a sequence of :func:`mesh_spec` entries),
    unchanged where it is already split so."""
    spec = tuple(spec)
    spec += (None,) * (jnp.ndim(x) - len(spec))
    if mesh_spec(x) == spec:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec))


def shards(entry, mesh=None) -> int:
    """How many shards a spec entry (a mesh axis name, or a tuple of them as
    :func:`mesh_spec` gives) splits an axis into, on ``mesh`` (default: the
    context mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def broadcast_dims(x, shape: tuple, names: Sequence | None = None) -> tuple | None:
    """The logical dimensions of ``x``'s axes where it broadcasts (NumPy's
    rule, aligned at the right) to an array of ``shape`` whose axes are
    ``names`` (default: their positions), for :func:`share_shardings`; None
    for an axis of size 1 that broadcasts, and for ``x`` None."""
    if x is None:
        return None
    names = tuple(range(len(shape))) if names is None else tuple(names)
    offset = len(shape) - x.ndim
    return tuple(
        names[offset + i] if d == shape[offset + i] else None
        for i, d in enumerate(x.shape)
    )


def real_float(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """Converts ``x`` to a real floating array, promoting ints and bools.

    Integers and booleans become the default float dtype (float32, or float64
    under ``jax.enable_x64``), as ``jax.nn.softmax`` does.

    Raises:
      TypeError: ``x`` is complex.
    """
    x = as_input(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} does not support complex input (got dtype {x.dtype}); "
            "pass the real part or the magnitude instead"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def refuse_jet(name: str, x) -> None:
    """Refuses an input that ``jax.experimental.jet`` traces, naming the op.

    ``jet`` ignores custom derivative rules and evaluates the primal of a
    ``jax.custom_vjp``, which JAX 0.10 does outside the jet trace: every op
    here (a ``custom_vjp``) then fails with an ``UnexpectedTracerError`` that
    names neither the op nor the cause (from JAX 0.11 on, by JAX's source, an
    ``AttributeError`` from inside ``jet``). The jet tracer is looked for inside
    the tracers of transformations nested in ``jet`` (``vmap``, ``grad``,
    ``jvp``), so that ``jet(vmap(op))`` is refused too, while an op whose
    inputs do not depend on the jet's input (a constant, with no series)
    still runs. An op inside
    ``jit`` inside ``jet`` sees only ``jit``'s tracers: JAX's error remains.

    Raises:
      NotImplementedError: ``x`` holds a ``jet`` tracer.
    """
    jet = sys.modules.get("jax.experimental.jet")
    if jet is None or not isinstance(x, jax.core.Tracer):
        return  # no jet tracer can exist before jet is imported
    pending, seen = [x], set()
    while pending:
        t = pending.pop()
        if isinstance(t, jet.JetTracer) and _has_terms(t, jet):
            raise NotImplementedError(
                f"jsoftmax.{name} does not support jax.experimental.jet: jet "
                "drops the custom derivative rules of the op (a custom_vjp) "
                "and JAX then fails with an error that names neither. Use "
                "jax.jvp, jax.jacfwd or jax.hessian instead; nested jax.jvp "
                "calls give the higher-order terms jet would"
            )
        seen.add(id(t))
        # The values a tracer wraps: vmap's val, jvp's primal and tangent.
        for cls in type(t).__mro__:
            slots = getattr(cls, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                v = getattr(t, slot, None)
                if isinstance(v, jax.core.Tracer) and id(v) not in seen:
                    pending.append(v)


def _has_terms(tracer, jet) -> bool:
    """Whether a jet tracer carries a series: one without (a constant that a
    nested vmap lifted into jet) works, as plain arrays do."""
    terms = tracer.terms
    return terms is not jet.zero_series and any(t is not jet.zero_term for t in terms)


def widen_8bit(x: jax.Array) -> jax.Array:
    """``x`` in float32 if it is an 8-bit (or narrower) float, else ``x``.

    Most 8-bit formats (``float8_e4m3fn`` and the ``fnuz`` family) have no
    infinity, so the ``-inf`` fill of masked entries would become NaN in them.
    The ops take such inputs in float32 and cast the result back, so 8-bit
    floats behave like the 16-bit ones: computed in float32, returned (and
    differentiated) in their own dtype.
    """
    if jnp.finfo(x.dtype).bits <= 8:
        return x.astype(jnp.float32)
    return x


def compute_dtype(dtype) -> np.dtype:
    """The dtype the arithmetic runs in: float32 for 16-bit floats."""
    if jnp.finfo(dtype).bits < 32:
        return np.dtype(np.float32)
    return np.dtype(dtype)


def mask_input(
    name: str, where: jax.typing.ArrayLike | None, shape: tuple[int, ...]
) -> jax.Array | None:
    """Checks that ``where`` broadcasts to ``shape`` and makes it boolean.

    The mask is returned unbroadcast so that a small mask stays small when it is
    saved for the backward pass.

    Raises:
      TypeError: ``where`` is not boolean. An additive mask (0 and -inf) or
        float weights would otherwise be read as truth values, silently.
      ValueError: ``where`` does not broadcast to ``shape``.
    """
    if where is None:
        return None
    where = as_input(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"{name}: where must be a boolean mask, got dtype {where.dtype}. An "
            "additive mask (0 / -inf) belongs in the input itself: add it to the "
            "logits (as a bias) instead of passing it as where"
        )
    try:  # jnp's, not NumPy's: it takes symbolic dimensions (jax.export)
        out_shape = jnp.broadcast_shapes(where.shape, tuple(shape))
    except ValueError:
        out_shape = None
    if out_shape != tuple(shape):
        raise ValueError(
            f"{name}: where of shape {where.shape} does not broadcast to the "
            f"input of shape {tuple(shape)}"
        )
    return where


def broadcast_like(v, x):
    """``v`` broadcast to the shape of ``x``, split over the mesh axes ``x``
    is: a row statistic broadcast back over a class axis split on an
    ``Explicit`` mesh keeps the split (``jnp.broadcast_to`` alone would give
    it the statistic's own sharding, replicated along that axis)."""
    return jnp.broadcast_to(v, x.shape, out_sharding=jax.typeof(x).sharding)


def masked_fill(x, where, fill):
    """``x`` where the mask is set and ``fill`` elsewhere; ``x`` if no mask."""
    if where is None:
        return x
    return jnp.where(broadcast_like(where, x), x, fill)


def lowest(dtype):
    """The lowest finite value of a float dtype, as a NumPy scalar."""
    return np.array(jnp.finfo(dtype).min, dtype)


def empty_rows_lifted(s):
    """A row's sum of ``exp(x - max)``, with the 0 of a row that has no valid
    entry lifted to 1/2, so that ``e / s`` is 0 and ``log(s)`` finite there.

    A valid row's sum is at least 1 (its largest entry contributes exp(0)), so
    the floor, below 1, never ties with it: autodiff of the forward pass (the
    residuals' tangents in second derivatives) sees ``s`` itself. A floor of 1
    ties with every row whose other entries underflow (one valid entry, or a
    gap past exp's range) and halves the derivative there. A ``maximum``,
    unlike a select, stays inside XLA:CPU's fused max/exp/sum/scale kernel,
    and a NaN sum stays NaN."""
    return jnp.maximum(s, np.array(0.5, s.dtype))


def log_sum(s):
    """``log(s)`` for a row's sum of exponentials ``s``: ``-inf`` where ``s``
    is 0 (a row with no valid entry), with a zero derivative there. The log
    is taken of 1 in such rows and the ``-inf`` selected after: a select
    over ``log(0)`` has a zero cotangent that meets log's ``1/0`` in reverse
    over reverse, NaN that then spreads to every row (under ``vmap`` too). A
    NaN sum stays NaN."""
    empty = s == 0
    return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1, s)))


def row_max(x, axes):
    """Max of ``x`` over ``axes``, a constant for autodiff, starting from the
    lowest finite value: a row of -inf (no valid entry) gets a finite max,
    so shifting by it keeps -inf instead of making NaN. The start value sits
    in the reduction itself; a ``maximum`` or select on the result splits
    XLA:CPU's fused max/subtract/exp kernel (bench/README.md, item 4)."""
    x = lax.stop_gradient(x)
    return lax.reduce(x, lowest(x.dtype), lax.max, axes)

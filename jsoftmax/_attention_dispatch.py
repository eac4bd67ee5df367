"""The block step of dot_product_attention on the implementation a call's
config names: the XLA block path, or the Pallas kernels where the program is
lowered for CUDA (interpret mode elsewhere under ``"pallas"``). The public
function's rule and context parallelism's pairs both call it.

``forward(config, q, k, v, bias, sinks, mask, q_len, kv_len, q_seg, kv_seg)``
gives ``(out, lse)``; ``backward(config, res, d_out)`` the cotangents of q,
k, v, bias and sinks (the contracts of ``_attention_xla``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jsoftmax import _attention_pallas as pallas
from jsoftmax import _attention_xla as xla
from jsoftmax._platform import by_platform


def _on_platform(xla_fn, kernel_fn):
    """``f(config, *args)``: the implementation ``config.implementation``
    names, chosen by the platform the program is lowered for (not the
    default backend), per platform even in a program lowered for several:
    ``kernel_fn(*args, config=, interpret=False)`` for CUDA, and elsewhere
    ``xla_fn(*args, config=)`` ("auto") or the kernels in interpret mode
    ("pallas"). Its derivatives (forward mode, and second derivatives
    through the backward pass) are ``xla_fn``'s, the same function: a Pallas
    call has none. ``"xla"`` calls ``xla_fn`` itself."""

    def call(config, *args):
        xla_call = partial(xla_fn, config=config)
        if config.implementation == "xla":
            return xla_call(*args)
        kernel = partial(kernel_fn, config=config, interpret=False)
        default, symbolic = xla_call, xla_call
        if config.implementation == "pallas":
            default = partial(kernel_fn, config=config, interpret=True)
            symbolic = _refuse_symbolic
        return by_platform(
            args, cuda=kernel, default=default, symbolic=symbolic, derivative=xla_call
        )

    return call


def _refuse_symbolic(*args):
    """The kernels for CUDA under a ``vmap`` of symbolic size: refused, as the
    kernels refuse symbolic shapes they see."""
    del args
    raise ValueError(
        "dot_product_attention: implementation='pallas' does not support "
        "symbolic shapes (a vmap of symbolic size, lowered for CUDA: the "
        "Triton grid is static)"
    )


def _xla_backward(res, d_out, config):
    return xla.backward(config, res, d_out)


forward = _on_platform(xla.forward, pallas.forward)
backward = _on_platform(_xla_backward, pallas.backward)


def recomputed_tangent(forward_output, res, t_leaves):
    """The output's tangent (and a zero one for ``lse``) in a forward-mode
    rule: ``jax.jvp`` of ``forward_output(*args)`` at the rule's inputs,
    which its residuals hold ahead of ``(out, lse)``. Tangents flow from q,
    k, v, bias and sinks, as cotangents do in the backward pass; ``lse`` has
    none there (its cotangent is ignored), so none here."""
    *args, _, lse = res
    # The float input leaves, in order (None arguments are no leaves).
    floats = [
        i
        for i, a in enumerate(args)
        if a is not None and jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    moved = [i for i in floats if i < 5]  # q, k, v, bias, sinks
    t_moved = [t for i, t in zip(floats, t_leaves, strict=True) if i < 5]

    def output(*xs):
        full = list(args)
        for i, x in zip(moved, xs, strict=True):
            full[i] = x
        return forward_output(*full)

    _, d_out = jax.jvp(output, [args[i] for i in moved], t_moved)
    return [d_out, jnp.zeros(lse.shape, lse.dtype)]

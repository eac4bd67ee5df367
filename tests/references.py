"""Independent plain-autodiff references the tests compare against."""

import jax
import jax.numpy as jnp


def ref_softmax(x, axis=-1, where=None):
    """Plain-autodiff softmax, written independently of jsoftmax."""
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True))
    e = jnp.exp(x - shift)
    y = e / jnp.sum(e, axis, keepdims=True)
    return y if where is None else jnp.where(where, y, 0.0)


def ref_log_softmax(x, axis=-1, where=None):
    """Plain-autodiff log-softmax, written independently of jsoftmax."""
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.max(x, axis, keepdims=True))
    shifted = x - shift
    o = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis, keepdims=True))
    # Masked-out outputs are the constant -inf, as jax.nn documents.
    return o if where is None else jnp.where(where, o, -jnp.inf)


"""The explicit softmax Jacobian, from the softmax output."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsoftmax._checks import compute_dtype, real_float


def softmax_jacobian(y: jax.typing.ArrayLike) -> jax.Array:
    r"""The Jacobian of softmax over the last axis, from its output ``y``.

    .. math::
        J_{ij} = \frac{\partial y_i}{\partial x_j} = y_i (\delta_{ij} - y_j)

    so the diagonal is :math:`y_i (1 - y_i)` and the off-diagonal entries are
    :math:`-y_i y_j`: :math:`J = \mathrm{diag}(y) - y y^\top`, symmetric, with rows
    and columns that sum to 0. Each row equals what ``jax.jacrev`` gives for
    ``softmax`` at the same point.

    Args:
      y: softmax output of shape ``(..., n)``; leading axes are batch axes.
        float16 and bfloat16 are computed in float32 and returned in their own
        dtype.

    Returns:
      An array of shape ``(..., n, n)`` and the dtype of ``y``, with
      ``J[..., i, j] = dy_i / dx_j``.

    Raises:
      TypeError: ``y`` is complex.
      ValueError: ``y`` is a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> jsoftmax.softmax_jacobian(jnp.array([0.25, 0.75]))
      Array([[ 0.1875, -0.1875],
             [-0.1875,  0.1875]], dtype=float32)
    """
    y = real_float("softmax_jacobian", y)  # plain JAX: jet works
    if y.ndim == 0:
        raise ValueError(
            "softmax_jacobian needs y of shape (..., n), got a scalar; the "
            "Jacobian is taken over the last axis"
        )
    y32 = y.astype(compute_dtype(y.dtype))
    n = y.shape[-1]
    eye = jnp.eye(n, dtype=y32.dtype).reshape((1,) * (y.ndim - 1) + (n, n))
    jac = y32[..., :, None] * (eye - y32[..., None, :])
    return jac.astype(y.dtype)

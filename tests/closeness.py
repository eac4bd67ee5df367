"""The closeness check the attention tests share."""

import jax
import numpy as np


def assert_close(got, want, rtol, what="", common_scale=False):
    """Every leaf of ``got`` is finite and within ``rtol`` of ``want``,
    relative to the largest entry of the reference leaf, or with
    ``common_scale`` to the largest entry of all reference leaves (for leaves
    that are 0 in exact arithmetic, where both sides are rounding noise)."""
    got_leaves = jax.tree.leaves(got)
    want_leaves = [np.asarray(w, np.float64) for w in jax.tree.leaves(want)]
    assert len(got_leaves) == len(want_leaves), what
    common = max((float(np.max(np.abs(w), initial=0.0)) for w in want_leaves),
                 default=0.0)  # fmt: skip
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g = np.asarray(g, np.float64)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        assert np.isfinite(g).all(), f"{what} leaf {i}: not finite"
        scale = common if common_scale else float(np.max(np.abs(w), initial=0.0))
        scale = max(scale, 1e-30)
        err = float(np.max(np.abs(g - w), initial=0.0)) / scale
        assert err <= rtol, f"{what} leaf {i}: relative error {err:.3g} > {rtol:.3g}"

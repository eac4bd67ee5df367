"""``jax.checking_leaks`` at the cost of the objects the block makes.

JAX's leak check runs ``gc.collect()`` and ``gc.get_referrers`` at the end of
each trace, over every object the process holds: late in a test run, with the
caches of a thousand tests alive, one such block took 20 s where it took 1.6 s
alone. Objects made before the block are frozen (``gc.freeze``), so both walk
only the block's own; the tracers it makes, leaked or not, are among them.
"""

import contextlib
import gc

import jax


@contextlib.contextmanager
def checking_leaks():
    gc.collect()
    gc.freeze()
    try:
        with jax.checking_leaks():
            yield
    finally:
        gc.unfreeze()

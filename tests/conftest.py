"""Shared test setup.

Strict dtype promotion catches silent upcasts. x64 stays off globally; float64
tests enable it locally with ``jax.enable_x64(True)``.
"""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
collect_ignore = ["sharded_worker.py", "sharding_modes_worker.py"]

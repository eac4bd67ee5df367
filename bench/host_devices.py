"""Host CPU devices for the multi-device benchmarks, asked for before jax is
imported: ``request(n)`` adds ``--xla_force_host_platform_device_count=n`` to
XLA_FLAGS, keeping the flags already there (a dump folder, the test suite's
compile options), unless they already set a count: that one is the user's.
"""

import os

FLAG = "--xla_force_host_platform_device_count"


def request(n):
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()

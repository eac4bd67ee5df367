"""A count of the programs JAX compiles, which the tests of repeated calls
share."""

import contextlib

import jax
from jax._src import dispatch


@contextlib.contextmanager
def compiles():
    """The names of the programs compiled inside the block."""
    names = []

    def listen(event, seconds, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)

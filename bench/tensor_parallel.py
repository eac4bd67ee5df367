"""Attention with the query heads split over an Explicit mesh axis (tensor
parallelism), on 4 host CPU devices.

    python bench/tensor_parallel.py           # bench/results/tensor_parallel_cpu.md
    python bench/tensor_parallel.py --quick   # T=128, 3 rounds, a smoke run

``jit(grad)`` of ``sum(dot_product_attention(q, k, v, is_causal=True))``
w.r.t. q, k and v, the query heads split 4 ways and k, v replicated, against
jax.nn's with k and v repeated to the query heads by hand and split with
them (jax.nn's grouped-query reshape refuses the split heads under an
Explicit mesh). Where the key/value heads are fewer than the shards,
jsoftmax repeats them to ``lcm(K, 4)`` heads split with the queries, so that
each device computes its own query heads only; multi-head attention (K = N)
is the control. A second compiled copy of jsoftmax's program gives the A/A
column. Medians of interleaved rounds in one process; float32, B=1, H=64.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from host_devices import request  # noqa: E402

request(4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402
from bench import interleaved, machine  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HEADS = [(4, 2), (12, 3), (8, 8)]  # query heads, key/value heads
SPLIT = P(None, None, "model")


def programs(n, kv_heads):
    """name -> ``jit(grad)`` of each implementation's summed output."""

    def repeated(x):
        return jax.sharding.reshard(jnp.repeat(x, n // kv_heads, axis=2), SPLIT)

    def ours(q, k, v):
        return jnp.sum(jsoftmax.dot_product_attention(q, k, v, is_causal=True))

    def jax_nn(q, k, v):
        out = jax.nn.dot_product_attention(q, repeated(k), repeated(v), is_causal=True)
        return jnp.sum(out)

    grads = {
        "jsoftmax": jax.grad(ours, (0, 1, 2)),
        "jsoftmax copy": jax.grad(lambda *a: ours(*a) * 1.0, (0, 1, 2)),
        "jax.nn": jax.grad(jax_nn, (0, 1, 2)),
    }
    return {name: jax.jit(f) for name, f in grads.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/tensor_parallel.py")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    t, rounds = (128, 3) if args.quick else (1024, 15)
    mesh = jax.make_mesh((4,), ("model",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    rows = []
    for n, kv_heads in HEADS:
        q = rng.normal(size=(1, t, n, 64)).astype(np.float32)
        k, v = (rng.normal(size=(1, t, kv_heads, 64)).astype(np.float32) for _ in "kv")
        with jax.set_mesh(mesh):
            inputs = (
                jax.device_put(q, NamedSharding(mesh, SPLIT)),
                *(jax.device_put(x, NamedSharding(mesh, P())) for x in (k, v)),
            )
            fns = programs(n, kv_heads)
            want = fns["jax.nn"](*inputs)
            for name, f in fns.items():
                got = f(*inputs)
                for g, w in zip(got, want, strict=True):
                    scale = float(jnp.max(jnp.abs(w)))
                    assert float(jnp.max(jnp.abs(g - w))) <= 1e-4 * scale, name
            times = interleaved(fns, inputs, rounds)
        ours, copy, ref = (times[m] for m in ("jsoftmax", "jsoftmax copy", "jax.nn"))
        rows.append(
            f"| {n} | {kv_heads} | {1e3 * np.median(ours):.1f} | "
            f"{1e3 * np.median(ref):.1f} | {np.median(ours / ref):.2f} | "
            f"{np.median(copy / ours):.2f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "# Attention, query heads split 4 ways (tensor parallelism)",
            "",
            f"{machine()}; 4 host devices (`--xla_force_host_platform_device_count"
            f"=4`), T=S={t}, B=1, H=64, float32, causal, `jit(grad)` w.r.t. q, k, v;"
            f" medians of {rounds} interleaved rounds. jax.nn gets k and v repeated"
            " to the query heads by hand.",
            "",
            "| query heads | key/value heads | jsoftmax ms | jax.nn ms | ratio | A/A |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    out = pathlib.Path(args.out) if args.out else RESULTS
    name = "tensor_parallel_quick.md" if args.quick else "tensor_parallel_cpu.md"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

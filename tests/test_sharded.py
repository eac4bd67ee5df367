"""The ops over a class axis split across 2, 4 and 8 host CPU devices.

Each case runs tests/sharded_worker.py in its own process, because the device
count (XLA_FLAGS) must be set before jax is imported. The worker asserts that
every sharded op, value and gradient, equals the unsharded op (and optax), and
reports the collectives it finds in the compiled HLO. A second worker,
tests/sharding_modes_worker.py, checks every op against plain autodiff of the
same loss written with psum/pmax, in every way JAX can split an axis. A third,
tests/second_derivatives_worker.py, checks every op's second derivatives
against the unsharded op's. A fourth, tests/mixed_sharding_worker.py, puts each
input of each op on its own sharding over an Explicit mesh.
"""

import functools
import json
import pathlib
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax

WORKER = pathlib.Path(__file__).with_name("sharded_worker.py")


def run_worker(name, *args, timeout=600):
    """Runs ``tests/<name>`` with ``args`` in its own process; asserts that it
    passed and returns its report (the JSON of its last line)."""
    out = subprocess.run(
        [sys.executable, str(WORKER.with_name(name)), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_sharded_ops_equal_unsharded_with_fewest_collectives(shards):
    report = run_worker("sharded_worker.py", shards)
    counts = {
        name: c["all-reduce"] + c["all-reduce-start"] for name, c in report.items()
    }
    # softmax / log_softmax: one pmax and one psum forward, one psum backward.
    for op in ("softmax", "log_softmax"):
        assert counts[f"{op}/fwd"] == 2
        assert counts[f"{op}/fwd+bwd"] == 3
    # Cross-entropy: at most pmax + psum forward, and no backward collective.
    assert counts["ce_integer/fwd"] <= 3
    assert counts["ce_integer/fwd+bwd"] == counts["ce_integer/fwd"]
    # Fused linear loss: pmax + psum forward, one psum of dx backward.
    assert counts["linear/fwd"] == 2
    assert counts["linear/fwd+bwd"] == 3
    # Without variation tracking (shard_map(check_vma=False), pmap, vmap) the
    # losses' backward passes sum the loss cotangent over the shards: at most
    # one all-reduce more, of [B] (XLA may merge it into the forward's), and
    # the fused loss then all-reduces no [B, D] dx, only vectors.
    assert counts["ce_integer/no-vma fwd+bwd"] <= counts["ce_integer/no-vma fwd"] + 1
    assert counts["linear/no-vma fwd+bwd"] <= counts["linear/fwd"] + 1
    shapes = " ".join(report["linear/no-vma fwd+bwd"]["shapes"])
    assert all("," not in dims for dims in re.findall(r"\[([\d,]*)\]", shapes))


def test_every_op_equals_psum_autodiff_in_every_sharding_mode():
    # shard_map with and without check_vma, pmap, vmap(axis_name=...),
    # gradients inside and outside, cotangents that differ per shard, data
    # parallelism with replicated parameters, and a data x vocab mesh.
    report = run_worker("sharding_modes_worker.py", timeout=900)
    assert report["checks"] > 0 and not report["failures"], report


@pytest.mark.parametrize("part, at_least", [("xla", 150), ("pallas", 60)])
def test_every_op_with_inputs_split_differently_over_an_explicit_mesh(part, at_least):
    # Each input on its own sharding (replicated, batch, classes or heads,
    # positions), every two inputs in every pair of theirs: labels or masks
    # split beside replicated logits, q/k/v, bias, lengths, segment ids and
    # sinks each their own way; the Pallas kernels shard by shard;
    # Explicit/Auto meshes; lowered for CUDA. Two halves, run side by side.
    report = run_worker("mixed_sharding_worker.py", part, timeout=900)
    assert report["checks"] >= at_least and not report["failures"], report


@pytest.mark.parametrize("shards", [2, 4])
def test_second_derivatives_with_axis_name_equal_unsharded(shards):
    # hessian, jvp of grad and jacrev(jacrev) of every op, inside and around
    # shard_map, check_vma on and off. The fused loss raised "Differentiation
    # rule for 'pmax' not implemented": its running max carried a tangent.
    assert run_worker("second_derivatives_worker.py", shards)["checks"] == 72


def test_vocab_parallel_example_matches_single_device():
    example = WORKER.parent.parent / "examples" / "vocab_parallel_training.py"
    out = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded and single-device losses agree" in out.stdout


def _split(x, axis):
    """``x`` cut in 2 along ``axis``, the halves stacked first (vmap's shards)."""
    return jnp.stack(jnp.split(x, 2, axis=axis))


def test_axis_name_as_a_list_equals_the_name():
    # lax.psum takes a list of names; the ops pass axis_name on as a static,
    # hashable argument, and a list raised (softmax under vmap from the cached
    # rule call; the losses and context parallelism always). vmap's named
    # axis stands in for 2 devices.
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (3, 8))
    labels = jnp.array([1, 6, 3])
    h, w = jax.random.normal(keys[1], (3, 4)), jax.random.normal(keys[2], (4, 8))
    q = jax.random.normal(keys[3], (1, 8, 2, 4))
    ops = {
        "softmax": (lambda a, n: jsoftmax.softmax(a, axis_name=n), (_split(x, 1),)),
        "log_softmax": (
            lambda a, n: jsoftmax.log_softmax(a, axis_name=n),
            (_split(x, 1),),
        ),
        "softmax_cross_entropy": (
            lambda a, n: jsoftmax.softmax_cross_entropy(
                a, jax.nn.softmax(a), axis_name=n
            ),
            (_split(x, 1),),
        ),
        "integer labels": (
            lambda a, n: jsoftmax.softmax_cross_entropy_with_integer_labels(
                a, labels, axis_name=n
            ),
            (_split(x, 1),),
        ),
        "fused loss": (
            lambda w, n: jsoftmax.linear_softmax_cross_entropy(
                h, w, labels, axis_name=n
            ),
            (_split(w, 1),),
        ),
        "context-parallel attention": (
            lambda q, n: jsoftmax.dot_product_attention(
                q, q, q, is_causal=True, axis_name=n
            ),
            (_split(q, 1),),
        ),
    }
    for name, (op, args) in ops.items():
        results = {}
        for axis_name in ("i", ["i"], ("i",)):
            f = jax.vmap(functools.partial(op, n=axis_name), axis_name="i")
            value = f(*args)
            grad = jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))))(*args)
            results[str(axis_name)] = (value, grad)
        for got in results.values():
            chex.assert_trees_all_equal(got, results["i"], custom_message=name)
    want = jax.nn.dot_product_attention(q, q, q, is_causal=True)
    attention = functools.partial(ops["context-parallel attention"][0], n=["i"])
    got = jax.vmap(attention, axis_name="i")(_split(q, 1))
    np.testing.assert_allclose(jnp.concatenate(list(got), axis=1), want, atol=1e-6)

"""Train a small model whose output layer is split over the vocabulary.

    python examples/vocab_parallel_training.py

Uses 8 host CPU devices (set before jax is imported). The output weights
``w [D, V]`` are sharded by vocabulary columns over the mesh axis "vocab"
inside ``jax.shard_map``; the loss is ``jsoftmax.linear_softmax_cross_entropy``
with ``axis_name="vocab"``, so no device ever holds the full logits. The same
model is trained on one device with the unsharded loss, and the script checks
that the two loss curves are equal.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The 8 devices are host CPUs; set JAX_PLATFORMS to run it elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

TOKENS, IN, HIDDEN, VOCAB, STEPS, LR = 256, 32, 64, 1024, 20, 0.5


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "embed": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN),
        "out": jax.random.normal(k2, (HIDDEN, VOCAB)) / np.sqrt(HIDDEN),
        "bias": jnp.zeros((VOCAB,)),
    }


def loss_fn(params, inputs, labels, axis_name=None):
    h = jnp.tanh(inputs @ params["embed"])
    return jsoftmax.linear_softmax_cross_entropy(
        h, params["out"], labels, bias=params["bias"], chunk_size=96,
        axis_name=axis_name,
    )  # fmt: skip


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def main():
    mesh = jax.make_mesh(
        (len(jax.devices()),), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    specs = {"embed": P(), "out": P(None, "vocab"), "bias": P("vocab")}

    @jax.jit
    def sharded_step(params, inputs, labels):
        def local(params, inputs, labels):
            # The loss's backward pass already sums the shards' parts of the
            # gradient w.r.t. its (replicated) input, so the embedding's
            # gradient arrives whole on every device: no psum here.
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels, "vocab")
            return loss, sgd(params, grads)

        return jax.shard_map(
            local, mesh=mesh, in_specs=(specs, P(), P()), out_specs=(P(), specs)
        )(params, inputs, labels)

    @jax.jit
    def single_step(params, inputs, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
        return loss, sgd(params, grads)

    key_data, key_params = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(key_data, (TOKENS, IN))
    teacher = jax.random.normal(jax.random.key(1), (IN, VOCAB))
    labels = jnp.argmax(inputs @ teacher, axis=-1)

    params = init(key_params)
    sharded = jax.tree.map(
        lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, specs
    )
    single, losses = params, []
    for step in range(STEPS):
        loss_sharded, sharded = sharded_step(sharded, inputs, labels)
        loss_single, single = single_step(single, inputs, labels)
        losses.append((float(loss_sharded), float(loss_single)))
        if step % 5 == 0 or step == STEPS - 1:
            print(
                f"step {step:2d}  loss on {len(jax.devices())} devices "
                f"{losses[-1][0]:.6f}  on one device {losses[-1][1]:.6f}"
            )
    print("output weights per device:", sharded["out"].addressable_shards[0].data.shape)
    np.testing.assert_allclose(*np.array(losses).T, rtol=1e-5, atol=1e-6)
    assert losses[-1][0] < losses[0][0] * 0.8, "the loss should fall"
    print("sharded and single-device losses agree")


if __name__ == "__main__":
    main()

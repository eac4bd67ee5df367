"""16-bit attention gradients against float32, as the scores grow.

    python bench/attention_precision_16bit.py  # results/*_16bit_cpu.md

q and k are standard normal times c, v standard normal, causal, B=1, T=64,
N=2, H=64, rounded to bfloat16 or float16. Error of dq and dk from jsoftmax
and from jax.nn ("xla"), both in that dtype, against jax.nn's float32
gradients of the same rounded inputs, relative to the largest entry. The
backward's ``D = rowsum(dO * O)`` comes from the 16-bit output (as in
FlashAttention and cuDNN): where a row's softmax is near one-hot, ``dP - D``
cancels and that rounding shows in dq and dk.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp

import jsoftmax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import machine  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
B, T, N, H = 1, 64, 2, 64


def _error(got, want):
    return float(
        jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))
    )


def _grads(attention, args, ct):
    return jax.vjp(lambda *a: attention(*a, is_causal=True), *args)[1](ct)[:2]


def main():
    keys = jax.random.split(jax.random.key(0), 4)
    nn = jax.nn.dot_product_attention
    setup = " ".join(__doc__.split("\n\n")[2].split())
    lines = [
        "# dot_product_attention: 16-bit gradients as the scores grow",
        "",
        f"Machine: {machine()}. {setup}",
        "",
        "| dtype | c | max\\|s\\| | jsoftmax dq | jsoftmax dk | jax.nn dq "
        "| jax.nn dk |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype in (jnp.bfloat16, jnp.float16):
        for c in (1.0, 3.0, 5.0, 10.0, 20.0):
            q, k = (jax.random.normal(key, (B, T, N, H)) * c for key in keys[:2])
            v = jax.random.normal(keys[2], (B, T, N, H))
            args = [a.astype(dtype) for a in (q, k, v)]
            ct = jax.random.normal(keys[3], (B, T, N, H))
            wide = [a.astype(jnp.float32) for a in args]
            s = jnp.einsum("btnh,bsnh->bnts", wide[0], wide[1]) / H**0.5
            want = _grads(nn, wide, ct)
            ours = _grads(jsoftmax.dot_product_attention, args, ct.astype(dtype))
            theirs = _grads(nn, args, ct.astype(dtype))
            cells = [
                f"{_error(g, w):.1e}"
                for g, w in zip(ours + theirs, want * 2, strict=True)
            ]
            row = [jnp.dtype(dtype).name, f"{c:g}", f"{float(jnp.max(jnp.abs(s))):.0f}"]
            lines.append("| " + " | ".join(row + cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "attention_precision_16bit_cpu.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

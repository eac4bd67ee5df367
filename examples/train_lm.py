"""Train a small byte-level transformer with jsoftmax's attention and loss.

    pip install -e '.[examples]'
    python examples/train_lm.py            # the default run, a few minutes on 2 cores
    python examples/train_lm.py --steps 2 --layers 1 --d-model 32 --seq-len 32

A decoder-only transformer in flax (nnx) learns to predict the next byte of the
Python standard library's own source (vocabulary 256, so every machine has the
data offline). The same model is trained twice, side by side, from the same
initial parameters on the same batches:

- ``jsoftmax``: causal ``jsoftmax.dot_product_attention`` and the fused
  ``jsoftmax.linear_softmax_cross_entropy``, which never materialises the
  logits;
- ``reference``: causal ``jax.nn.dot_product_attention`` and
  ``optax.softmax_cross_entropy_with_integer_labels`` on explicit logits.

The two training steps alternate (which one goes first alternates too), so
both see the same load on a noisy machine. The script prints and plots both
loss curves and their largest difference, the median time per step, and each
compiled step's temporary memory (``memory_analysis().temp_size_in_bytes``),
and writes ``train_lm.png`` and ``train_lm.md`` to ``--out``. It exits non-zero
if the curves differ by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsoftmax

VOCAB = 256  # bytes
# Installed packages, not the standard library.
SKIP_FOLDERS = {"site-packages", "dist-packages"}


def load_text(num_bytes: int) -> np.ndarray:
    """The first ``num_bytes`` bytes of the standard library's ``.py`` files.

    Files are read in sorted order of their paths under the stdlib folder,
    skipping installed packages, so a given Python version always gives the
    same text.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIP_FOLDERS]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort()
    chunks, total = [], 0
    for path in files:
        chunk = path.read_bytes() + b"\n"
        chunks.append(chunk)
        total += len(chunk)
        if total >= num_bytes:
            break
    text = np.frombuffer(b"".join(chunks)[:num_bytes], dtype=np.uint8)
    if len(text) < num_bytes:
        raise ValueError(f"the stdlib at {root} has only {len(text)} bytes of .py")
    return text


class Block(nnx.Module):
    """Pre-LayerNorm block: causal multi-head attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x, attention):
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H]
        x = x + self.proj(attention(q, k, v, is_causal=True).reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
    """Byte embeddings, learned positions, blocks; returns the final hidden state.

    The output layer ``head`` ([d_model, 256], no bias) is applied by the loss:
    as a plain matmul for the reference, inside the fused loss for jsoftmax.
    """

    def __init__(self, *, layers, d_model, heads, seq_len, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, d_model, rngs=rngs)
        positions = 0.02 * jax.random.normal(rngs.params(), (seq_len, d_model))
        self.pos = nnx.Param(positions)
        self.blocks = nnx.List(
            [Block(d_model, heads, rngs=rngs) for _ in range(layers)]
        )
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens, attention):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, attention)
        return self.norm(x)


def jsoftmax_loss(model, inputs, targets):
    h = model(inputs, jsoftmax.dot_product_attention)
    return jsoftmax.linear_softmax_cross_entropy(
        h.reshape(-1, h.shape[-1]), model.head.kernel[...], targets.reshape(-1)
    )


def reference_loss(model, inputs, targets):
    h = model(inputs, jax.nn.dot_product_attention)
    logits = model.head(h)  # [B, T, 256], materialised
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_step(graphdef, optimizer, loss_fn, params, opt_state, batch):
    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params), batch[:, :-1], batch[:, 1:])

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--text-bytes", type=int, default=4_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-2,
        help="largest allowed |loss difference| between the two runs (float32 "
        "on a CPU: about 1e-6)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder for train_lm.png and train_lm.md (default: examples/)",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} is not a multiple of --heads")
    started = time.perf_counter()

    text = load_text(args.text_bytes)
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(text) - args.seq_len - 1, (args.steps, args.batch))
    offsets = np.arange(args.seq_len + 1)

    def batch_at(step):  # [batch, seq_len + 1] int32 windows
        return jnp.asarray(text[starts[step][:, None] + offsets], dtype=jnp.int32)

    # Initialising under jit compiles once instead of once per initializer.
    model = nnx.jit(
        lambda: TransformerLM(
            layers=args.layers,
            d_model=args.d_model,
            heads=args.heads,
            seq_len=args.seq_len,
            rngs=nnx.Rngs(args.seed),
        )
    )()
    graphdef, params = nnx.split(model)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(1, args.steps // 10), max(2, args.steps)
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)

    loss_fns = {"jsoftmax": jsoftmax_loss, "reference": reference_loss}
    names = tuple(loss_fns)
    compiled, memory = {}, {}
    for name, loss_fn in loss_fns.items():
        step = jax.jit(partial(train_step, graphdef, optimizer, loss_fn))
        compiled[name] = step.lower(params, opt_state, batch_at(0)).compile()
        stats = compiled[name].memory_analysis()
        memory[name] = None if stats is None else stats.temp_size_in_bytes
    compile_s = time.perf_counter() - started

    # The same initial parameters for both; jax arrays are immutable, so the
    # two runs share them until their first update.
    state = {name: (params, opt_state) for name in names}
    losses = {name: [] for name in names}
    seconds = {name: [] for name in names}
    print(
        f"{num_params:,} parameters, {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} heads, {args.batch} x {args.seq_len} bytes per step"
    )
    for step in range(args.steps):
        batch = batch_at(step)
        for name in names if step % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            loss, *new_state = compiled[name](*state[name], batch)
            loss = float(loss)  # waits for the step
            seconds[name].append(time.perf_counter() - t0)
            losses[name].append(loss)
            state[name] = tuple(new_state)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss jsoftmax {losses['jsoftmax'][-1]:.5f}  "
                f"reference {losses['reference'][-1]:.5f}"
            )

    curves = {name: np.array(losses[name]) for name in names}
    diff = np.abs(curves["jsoftmax"] - curves["reference"])
    # The first steps run warm caches and allocators in; skip them if there
    # are enough steps left.
    skip = 3 if args.steps > 10 else 0
    median_ms = {name: 1e3 * float(np.median(seconds[name][skip:])) for name in names}
    result = {
        "args": vars(args),
        "num_params": num_params,
        "losses": curves,
        "max_abs_diff": float(diff.max()),
        "median_ms": median_ms,
        "temp_bytes": memory,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - started,
    }
    print(report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, seconds, args.out / "train_lm.png")
    (args.out / "train_lm.md").write_text(report(result, markdown=True))
    print(f"wrote {args.out / 'train_lm.png'} and {args.out / 'train_lm.md'}")
    if not diff.max() <= args.tolerance:
        sys.exit(f"the loss curves differ by {diff.max():.3g} > {args.tolerance}")
    return result


def mib(num_bytes):
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"


def machine() -> str:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), "
        f"{device.platform} device {device.device_kind}"
    )


def report(result, markdown=False) -> str:
    import flax

    args, ms, mem = result["args"], result["median_ms"], result["temp_bytes"]
    argv = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in sorted(result["args"].items())
        if k not in ("out", "tolerance")
    )
    rows = [
        ("attention / loss", "median time per step", "compiled temp memory"),
        *(
            (label, f"{ms[name]:.1f} ms", mib(mem[name]))
            for name, label in (
                ("jsoftmax", "jsoftmax.dot_product_attention / fused loss"),
                ("reference", "jax.nn.dot_product_attention / optax on logits"),
            )
        ),
        (
            "jsoftmax / reference",
            f"{ms['jsoftmax'] / ms['reference']:.2f}x",
            ratio(mem),
        ),
    ]
    losses = result["losses"]
    summary = [
        f"{result['num_params']:,} parameters; {args['steps']} steps of "
        f"{args['batch']} x {args['seq_len']} bytes; float32.",
        f"Final loss: jsoftmax {losses['jsoftmax'][-1]:.4f}, reference "
        f"{losses['reference'][-1]:.4f} (nats per byte; ln 256 = 5.545).",
        f"Largest |loss difference| over all steps: {result['max_abs_diff']:.2e}.",
        f"Wall time {result['wall_s']:.0f} s, of which {result['compile_s']:.0f} s "
        "loading the text and compiling.",
        f"Machine: {machine()}; {len(jax.devices())} device(s); "
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"Python {platform.python_version()}.",
    ]
    if not markdown:
        return "\n".join(
            ["", *(f"{a:48s} {b:>22s} {c:>22s}" for a, b, c in rows), "", *summary]
        )
    table = [f"| {' | '.join(rows[0])} |", "| --- | ---: | ---: |"]
    table += [f"| {' | '.join(r)} |" for r in rows[1:]]
    return "\n".join(
        [
            "# examples/train_lm.py: a default run",
            "",
            "A byte-level decoder-only transformer (flax nnx) trained on the Python",
            "standard library's source, once with jsoftmax's causal attention and",
            "fused loss, once with jax.nn's attention and optax's loss on explicit",
            "logits, from the same initial parameters on the same batches. The two",
            "steps alternate; times are medians over the steps (the first three",
            "left out). Temp memory is the compiled training step's",
            "`memory_analysis().temp_size_in_bytes`.",
            "",
            f"    python examples/train_lm.py {argv}",
            "",
            *table,
            "",
            *(f"- {line}" for line in summary),
            "",
            "![loss curves, time per step and memory](train_lm.png)",
            "",
        ]
    )


def ratio(memory):
    if None in memory.values() or not memory["reference"]:
        return "n/a"
    return f"{memory['jsoftmax'] / memory['reference']:.2f}x"


def plot(result, seconds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = result["losses"]
    steps = np.arange(len(losses["jsoftmax"]))
    colors = {"jsoftmax": "C0", "reference": "C1"}
    labels = {"jsoftmax": "jsoftmax", "reference": "jax.nn + optax"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    for name in losses:
        ax.plot(steps, losses[name], color=colors[name], label=labels[name], lw=1)
    ax.set(xlabel="step", ylabel="training loss (nats per byte)", title="loss")
    ax.legend()
    ax = axes[0, 1]
    diff = np.abs(losses["jsoftmax"] - losses["reference"])
    ax.semilogy(steps, np.maximum(diff, 1e-9), color="k", lw=1)
    ax.set(
        xlabel="step",
        ylabel="|difference| (0 drawn at 1e-9)",
        title=f"|jsoftmax - reference|, max {diff.max():.2g}",
    )
    ax = axes[1, 0]
    for name in seconds:
        ms = 1e3 * np.array(seconds[name])
        median = result["median_ms"][name]
        ax.plot(steps, ms, color=colors[name], lw=0.6, alpha=0.6)
        ax.axhline(median, color=colors[name], label=f"{labels[name]}: {median:.1f}")
    ax.set(xlabel="step", ylabel="ms", title="time per step (median)")
    ax.set_ylim(0, 3 * max(result["median_ms"].values()))
    ax.legend()
    ax = axes[1, 1]
    mem = result["temp_bytes"]
    if None not in mem.values():
        mib_values = [mem[name] / 2**20 for name in mem]
        bars = ax.bar([labels[n] for n in mem], mib_values, color=list(colors.values()))
        ax.bar_label(bars, fmt="%.1f MiB")
        ax.margins(y=0.15)
    ax.set(ylabel="MiB", title="compiled temp memory of a training step")
    a = result["args"]
    fig.suptitle(
        f"byte-level LM: {a['layers']} layers, d_model {a['d_model']}, "
        f"{a['heads']} heads, {a['batch']} x {a['seq_len']} bytes, "
        f"jax {jax.__version__}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

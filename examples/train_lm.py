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
if the loss curves differ by more than ``--tolerance``, or the curves of the
gradients' global norms by more than the same fraction of the largest norm
(AdamW and gradient clipping would hide a gradient off by a constant factor
from the loss).

Context parallelism:

    python examples/train_lm.py --context-parallel 4 --context-layout zigzag

trains the jsoftmax model twice instead: on one device, and with its sequence
split over 4 devices (``jax.shard_map`` over the mesh axis "seq"; on a CPU,
host devices: run as a script, this file sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax is
imported). Each device holds a slice of every sequence's tokens, targets and
positions (with ``--context-layout zigzag``, chunks ``i`` and ``2N - 1 - i``
of ``2N``, put in place once per batch by ``jsoftmax.to_zigzag``); attention
runs across the slices (``axis_name="seq"``, ``--context-mode ring`` or
``all_gather``); each device's loss is its tokens' summed loss over the
global token count, and the loss and the gradients of the replicated
parameters are ``psum``-ed over "seq". The two runs' loss and gradient norm
curves must agree to float32 rounding; the results go to
``train_lm_context_parallel.{png,md}``.
``examples/multiprocess_context_parallel.py`` runs the same split over two
processes (``jax.distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def request_host_devices(argv) -> None:
    """Asks XLA for the ``--context-parallel N`` host devices of ``argv``.

    It sets ``XLA_FLAGS`` (a no-op without the option, or where XLA_FLAGS
    already sets a count), which XLA reads once, when jax is imported: this
    file calls it before its own imports when run as a script.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--context-parallel", type=int, default=0)
    n = pre.parse_known_args(argv)[0].context_parallel
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and HOST_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={n}".strip()


if __name__ == "__main__":
    request_host_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402

VOCAB = 256  # bytes
# Installed packages, not the standard library.
SKIP_FOLDERS = {"site-packages", "dist-packages"}
# The default --tolerance with --context-parallel, in float32 epsilons times
# the largest loss: the two runs add the same numbers in other orders.
ROUNDING_ULPS = 64


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

    ``positions`` ([B, T] ints) are the tokens' places in the whole sequence:
    with the sequence split over devices, each device's slice brings its own
    (under zigzag, two chunks far apart), so the position embeddings see the
    global positions; attention's causal mask gets them from ``axis_name``
    and ``context_layout``. The output layer ``head`` ([d_model, 256], no
    bias) is applied by the loss: as a plain matmul for the reference, inside
    the fused loss for jsoftmax.
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

    def __call__(self, tokens, positions, attention):
        x = self.embed(tokens) + jnp.take(self.pos[...], positions, axis=0)
        for block in self.blocks:
            x = block(x, attention)
        return self.norm(x)


def jsoftmax_loss(model, batch, attention=jsoftmax.dot_product_attention, **loss):
    """The fused loss of the batch's tokens (``loss``: its keywords)."""
    h = model(batch["tokens"], batch["positions"], attention)
    return jsoftmax.linear_softmax_cross_entropy(
        h.reshape(-1, h.shape[-1]),
        model.head.kernel[...],
        batch["targets"].reshape(-1),
        **loss,
    )


def reference_loss(model, batch):
    h = model(batch["tokens"], batch["positions"], jax.nn.dot_product_attention)
    logits = model.head(h)  # [B, T, 256], materialised
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"]
    ).mean()


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def train_step(graphdef, optimizer, loss_fn, params, opt_state, batch):
    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params), batch)

    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return loss, params, opt_state, {"grad_norm": global_norm(grads)}


def context_parallel_step(
    graphdef, optimizer, mesh, mode, layout, params, opt_state, batch
):
    """A training step with every sequence split over the mesh axis "seq".

    ``params`` and ``opt_state`` are replicated, and the batch's arrays split
    along their sequence axis (in the layout's order). Returns what
    :func:`train_step` does (the loss, the new parameters and optimizer
    state, the gradients' global norm), and in the stats the mean loss of
    each device's own tokens ``[N]`` (what a loss without the ``psum`` would
    give).
    """
    attention = partial(
        jsoftmax.dot_product_attention,
        axis_name="seq",
        context_parallel=mode,
        context_layout=layout,
    )
    num_tokens = batch["targets"].size  # over all devices

    def local(params, batch):
        # Each device's share of the loss: its own tokens' summed loss over
        # the global token count; the shares add up to the mean.
        def share_of(params):
            model = nnx.merge(graphdef, params)
            return jsoftmax_loss(model, batch, attention, reduction="sum") / num_tokens

        # Marked varying, each device's copy of the parameters gets the
        # gradient of its own share, and the psum adds them up. (Left
        # invariant, the replicated parameters would get the sum from
        # autodiff already, shard_map transposing their broadcast into a
        # psum, and a psum on top would count it N times.)
        params = jax.tree.map(lambda p: lax.pcast(p, "seq", to="varying"), params)
        share, grads = jax.value_and_grad(share_of)(params)
        n, i = lax.axis_size("seq"), lax.axis_index("seq")
        own = jnp.zeros(n, share.dtype).at[i].set(n * share)  # [N], one entry
        return lax.psum((share, grads, own), "seq")

    loss, grads, device_losses = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(None, "seq")), out_specs=(P(), P(), P())
    )(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats = {"grad_norm": global_norm(grads), "device_losses": device_losses}
    return loss, params, opt_state, stats


def put(tree, sharding):
    """Every leaf as a global array with ``sharding``, each device's part cut
    from this process's copy (so it works across processes too)."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True)
class Run:
    """One of the two trainings the script compares."""

    name: str  # the key of its results
    label: str  # its row of the table
    legend: str  # its line in the plots
    # (params, opt_state, batch) -> (loss, params, opt_state, stats)
    step: Callable
    # The shared initial state and each step's batch (NumPy arrays) as the
    # run's step takes them.
    put_state: Callable = lambda state: state
    put_batch: Callable = lambda batch: jax.tree.map(jnp.asarray, batch)


def sequence_mesh(n):
    """A mesh of the first ``n`` devices, axis "seq"; exits if there are fewer."""
    if jax.device_count() < n:
        flags = os.environ.get("XLA_FLAGS", "")
        if HOST_DEVICES_FLAG in flags:
            how = f"XLA_FLAGS={flags!r} sets the host device count: make it {n}"
        else:
            how = (
                f"Run this file as a script (it sets XLA_FLAGS={HOST_DEVICES_FLAG}"
                f"={n} before importing jax), or set that before jax is imported"
            )
        sys.exit(
            f"--context-parallel {n} needs {n} devices; jax has "
            f"{jax.device_count()} ({jax.default_backend()}). {how}; with "
            "JAX_PLATFORMS=cpu the split is over host CPU devices."
        )
    return jax.make_mesh(
        (n,), ("seq",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


def make_runs(args, graphdef, optimizer) -> tuple[Run, Run]:
    """The run under test, then the run it is compared with."""
    if not args.context_parallel:
        return (
            Run(
                "jsoftmax",
                "jsoftmax.dot_product_attention / fused loss",
                "jsoftmax",
                partial(train_step, graphdef, optimizer, jsoftmax_loss),
            ),
            Run(
                "reference",
                "jax.nn.dot_product_attention / optax on logits",
                "jax.nn + optax",
                partial(train_step, graphdef, optimizer, reference_loss),
            ),
        )
    n, mode, layout = args.context_parallel, args.context_mode, args.context_layout
    mesh = sequence_mesh(n)

    def put_batch(batch):
        if layout == "zigzag":  # once per batch, every per-token array
            batch = jax.tree.map(lambda x: jsoftmax.to_zigzag(x, n), batch)
        return put(batch, NamedSharding(mesh, P(None, "seq")))

    return (
        Run(
            "context_parallel",
            f"sequence split over {n} devices ({mode}, {layout})",
            f"{n} devices, {mode}, {layout}",
            partial(context_parallel_step, graphdef, optimizer, mesh, mode, layout),
            put_state=lambda state: put(state, NamedSharding(mesh, P())),
            put_batch=put_batch,
        ),
        Run(
            "single",
            "one device",
            "one device",
            partial(train_step, graphdef, optimizer, jsoftmax_loss),
        ),
    )


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
        "--context-parallel",
        type=int,
        default=0,
        metavar="N",
        help="compare the jsoftmax model on one device with its sequence split "
        "over N devices (default 0: compare jsoftmax with jax.nn + optax)",
    )
    p.add_argument("--context-mode", choices=("ring", "all_gather"), default="ring")
    p.add_argument(
        "--context-layout", choices=("contiguous", "zigzag"), default="contiguous"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed |loss difference| between the two runs (default: "
        "1e-2 against jax.nn + optax; with --context-parallel, "
        f"{ROUNDING_ULPS} float32 epsilons times the largest loss; float32 on a "
        "CPU: about 1e-6); the gradient norms may differ by the same fraction "
        "of the largest norm",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder for the plot and the report (default: examples/)",
    )
    args = p.parse_args(argv)
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not a multiple of --heads")
    if args.context_parallel < 0:
        p.error(f"--context-parallel {args.context_parallel} is negative")
    chunks = args.context_parallel * (2 if args.context_layout == "zigzag" else 1)
    if chunks and args.seq_len % chunks:
        p.error(
            f"--seq-len {args.seq_len} does not divide into {chunks} chunks "
            f"(--context-parallel {args.context_parallel}, {args.context_layout})"
        )
    return args


def tolerances(args, losses, grad_norms) -> tuple[float, float]:
    """The largest |difference| allowed between the runs' loss curves
    (``--tolerance``, or its default for the comparison made) and between
    their gradient norm curves (the same fraction of the largest norm)."""
    loss_scale = max(np.abs(curve).max() for curve in losses.values())
    norm_scale = max(np.abs(curve).max() for curve in grad_norms.values())
    if args.tolerance is not None:
        tolerance = args.tolerance
    elif args.context_parallel:
        tolerance = ROUNDING_ULPS * float(np.finfo(np.float32).eps) * loss_scale
    else:
        tolerance = 1e-2
    return tolerance, tolerance / loss_scale * norm_scale


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.context_parallel:
        sequence_mesh(args.context_parallel)  # before any work: enough devices?
    started = time.perf_counter()

    text = load_text(args.text_bytes)
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(text) - args.seq_len - 1, (args.steps, args.batch))
    offsets = np.arange(args.seq_len + 1)

    def batch_at(step):  # [batch, seq_len] int32 arrays
        window = text[starts[step][:, None] + offsets].astype(np.int32)
        return {
            "tokens": window[:, :-1],
            "targets": window[:, 1:],
            "positions": np.broadcast_to(offsets[:-1], window[:, 1:].shape),
        }

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

    runs = make_runs(args, graphdef, optimizer)
    names = tuple(run.name for run in runs)
    compiled, memory, state = {}, {}, {}
    for run in runs:
        # The same initial parameters for both.
        state[run.name] = run.put_state((params, opt_state))
        step = jax.jit(run.step)
        compiled[run.name] = step.lower(
            *state[run.name], run.put_batch(batch_at(0))
        ).compile()
        stats = compiled[run.name].memory_analysis()
        memory[run.name] = None if stats is None else stats.temp_size_in_bytes
    compile_s = time.perf_counter() - started

    losses = {name: [] for name in names}
    grad_norms = {name: [] for name in names}
    seconds = {name: [] for name in names}
    device_losses = []
    print(
        f"{num_params:,} parameters, {args.layers} layers, d_model {args.d_model}, "
        f"{args.heads} heads, {args.batch} x {args.seq_len} bytes per step"
    )
    for step in range(args.steps):
        batch = batch_at(step)
        # The two steps alternate, and so does which goes first.
        for run in runs if step % 2 == 0 else runs[::-1]:
            inputs = run.put_batch(batch)
            t0 = time.perf_counter()
            loss, *new_state, stats = compiled[run.name](*state[run.name], inputs)
            loss = float(loss)  # waits for the step
            seconds[run.name].append(time.perf_counter() - t0)
            losses[run.name].append(loss)
            grad_norms[run.name].append(float(stats["grad_norm"]))
            if "device_losses" in stats:
                device_losses.append(np.asarray(stats["device_losses"]))
            state[run.name] = tuple(new_state)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {names[0]} {losses[names[0]][-1]:.6f}  "
                f"{names[1]} {losses[names[1]][-1]:.6f}"
            )

    curves = {name: np.array(losses[name]) for name in names}
    norms = {name: np.array(grad_norms[name]) for name in names}
    diff = np.abs(curves[names[0]] - curves[names[1]])
    norm_diff = np.abs(norms[names[0]] - norms[names[1]])
    tolerance, norm_tolerance = tolerances(args, curves, norms)
    # The first steps run warm caches and allocators in; skip them if there
    # are enough steps left.
    skip = 3 if args.steps > 10 else 0
    median_ms = {name: 1e3 * float(np.median(seconds[name][skip:])) for name in names}
    result = {
        "args": vars(args),
        "runs": runs,
        "num_params": num_params,
        "losses": curves,
        "max_abs_diff": float(diff.max()),
        "tolerance": tolerance,
        "grad_norms": norms,
        "max_grad_norm_diff": float(norm_diff.max()),
        "grad_norm_tolerance": norm_tolerance,
        "median_ms": median_ms,
        "temp_bytes": memory,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - started,
    }
    if device_losses:
        result["device_losses"] = np.stack(device_losses)  # [steps, N]
    print(report(result))
    # Under jax.distributed every process runs this; one writes.
    if jax.process_index() == 0:
        stem = "train_lm_context_parallel" if args.context_parallel else "train_lm"
        png, md = args.out / f"{stem}.png", args.out / f"{stem}.md"
        args.out.mkdir(parents=True, exist_ok=True)
        plot(result, seconds, png)
        md.write_text(report(result, markdown=True))
        print(f"wrote {png} and {md}")
    if not diff.max() <= tolerance:
        sys.exit(f"the loss curves differ by {diff.max():.3g} > {tolerance:.3g}")
    if not norm_diff.max() <= norm_tolerance:
        sys.exit(
            f"the gradient norms differ by {norm_diff.max():.3g} > {norm_tolerance:.3g}"
        )
    return result


def mib(num_bytes):
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"


def machine() -> str:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()} ({cpu}, {os.cpu_count()} "
        f"cores), {device.platform} device {device.device_kind}"
    )


def report(result, markdown=False) -> str:
    import flax

    args, ms, mem = result["args"], result["median_ms"], result["temp_bytes"]
    runs = result["runs"]
    first, second = (run.name for run in runs)
    argv = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in sorted(args.items())
        if k not in ("out", "tolerance")
        and (args["context_parallel"] or not k.startswith("context"))
    )
    short = {"jsoftmax": "jsoftmax", "reference": "reference"}
    short |= {"context_parallel": "context parallel", "single": "one device"}
    rows = [
        ("attention / loss", "median time per step", "compiled temp memory"),
        *((run.label, f"{ms[run.name]:.1f} ms", mib(mem[run.name])) for run in runs),
        (
            f"{short[first]} / {short[second]}",
            f"{ms[first] / ms[second]:.2f}x",
            ratio(mem, first, second),
        ),
    ]
    losses = result["losses"]
    summary = [
        f"{result['num_params']:,} parameters; {args['steps']} steps of "
        f"{args['batch']} x {args['seq_len']} bytes; float32.",
        f"Final loss: {short[first]} {losses[first][-1]:.4f}, {short[second]} "
        f"{losses[second][-1]:.4f} (nats per byte; ln 256 = 5.545).",
        f"Largest |loss difference| over all steps: {result['max_abs_diff']:.2e} "
        f"(allowed: {result['tolerance']:.2e}); of the gradients' global norm: "
        f"{result['max_grad_norm_diff']:.2e} (allowed: "
        f"{result['grad_norm_tolerance']:.2e}, the largest norm being "
        f"{max(v.max() for v in result['grad_norms'].values()):.3g}).",
    ]
    if "device_losses" in result:
        last = result["device_losses"][-1]
        gap = np.abs(result["device_losses"] - losses[first][:, None]).max()
        summary.append(
            "The mean loss of each device's own tokens at the last step: "
            + ", ".join(f"{x:.4f}" for x in last)
            + f"; a loss without the psum over the devices would be off by up to "
            f"{gap:.2e}."
        )
    summary += [
        f"Wall time {result['wall_s']:.0f} s, of which {result['compile_s']:.0f} s "
        "loading the text and compiling.",
        f"Machine: {machine()}; {jax.device_count()} device(s) in "
        f"{jax.process_count()} process(es); jax {jax.__version__}, flax "
        f"{flax.__version__}, optax {optax.__version__}, Python "
        f"{platform.python_version()}.",
    ]
    if not markdown:
        return "\n".join(
            ["", *(f"{a:48s} {b:>22s} {c:>22s}" for a, b, c in rows), "", *summary]
        )
    table = [f"| {' | '.join(rows[0])} |", "| --- | ---: | ---: |"]
    table += [f"| {' | '.join(r)} |" for r in rows[1:]]
    if args["context_parallel"]:
        title = "# examples/train_lm.py --context-parallel: a run"
        about = [
            "The byte-level transformer of `train_lm.md`, with jsoftmax's causal",
            "attention and fused loss, trained on one device and with its",
            "sequence split over several (`jax.shard_map` over the mesh axis",
            '"seq", attention with `axis_name="seq"`, the loss and the',
            "gradients psum-ed over it), from the same initial parameters on the",
            "same batches. The two steps alternate; times are medians over the",
            "steps (the first three left out); host CPU devices share the",
            "machine's cores, so their times say nothing of a real split. Temp",
            "memory is the compiled step's `memory_analysis().temp_size_in_bytes`,",
            "per device.",
        ]
    else:
        title = "# examples/train_lm.py: a default run"
        about = [
            "A byte-level decoder-only transformer (flax nnx) trained on the Python",
            "standard library's source, once with jsoftmax's causal attention and",
            "fused loss, once with jax.nn's attention and optax's loss on explicit",
            "logits, from the same initial parameters on the same batches. The two",
            "steps alternate; times are medians over the steps (the first three",
            "left out). Temp memory is the compiled training step's",
            "`memory_analysis().temp_size_in_bytes`.",
        ]
    stem = "train_lm_context_parallel" if args["context_parallel"] else "train_lm"
    return "\n".join(
        [
            title,
            "",
            *about,
            "",
            f"    python examples/train_lm.py {argv}",
            "",
            *table,
            "",
            *(f"- {line}" for line in summary),
            "",
            f"![loss curves, time per step and memory]({stem}.png)",
            "",
        ]
    )


def ratio(memory, first, second):
    if None in memory.values() or not memory[second]:
        return "n/a"
    return f"{memory[first] / memory[second]:.2f}x"


def plot(result, seconds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, losses = result["runs"], result["losses"]
    first, second = (run.name for run in runs)
    steps = np.arange(len(losses[first]))
    colors = {first: "C0", second: "C1"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    for run in runs:
        ax.plot(steps, losses[run.name], color=colors[run.name], label=run.legend, lw=1)
    ax.set(xlabel="step", ylabel="training loss (nats per byte)", title="loss")
    ax.legend()
    ax = axes[0, 1]
    diff = np.abs(losses[first] - losses[second])
    ax.semilogy(steps, np.maximum(diff, 1e-9), color="k", lw=1)
    ax.set(
        xlabel="step",
        ylabel="|difference| (0 drawn at 1e-9)",
        title=f"|{runs[0].legend} - {runs[1].legend}|, max {diff.max():.2g}",
    )
    ax = axes[1, 0]
    for run in runs:
        ms = 1e3 * np.array(seconds[run.name])
        median = result["median_ms"][run.name]
        ax.plot(steps, ms, color=colors[run.name], lw=0.6, alpha=0.6)
        ax.axhline(median, color=colors[run.name], label=f"{run.legend}: {median:.1f}")
    ax.set(xlabel="step", ylabel="ms", title="time per step (median)")
    ax.set_ylim(0, 3 * max(result["median_ms"].values()))
    ax.legend()
    ax = axes[1, 1]
    mem = result["temp_bytes"]
    if None not in mem.values():
        mib_values = [mem[run.name] / 2**20 for run in runs]
        bars = ax.bar(
            [run.legend for run in runs], mib_values, color=list(colors.values())
        )
        ax.bar_label(bars, fmt="%.1f MiB")
        ax.margins(y=0.15)
    per = " per device" if result["args"]["context_parallel"] else ""
    ax.set(ylabel="MiB", title=f"compiled temp memory of a training step{per}")
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

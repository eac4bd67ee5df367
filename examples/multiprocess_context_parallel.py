"""Train the model of train_lm.py with its sequence split over two processes.

    python examples/multiprocess_context_parallel.py
    python examples/multiprocess_context_parallel.py --steps 20 --seq-len 128

Starts two CPU processes on this machine and joins them with
``jax.distributed`` (the coordinator on 127.0.0.1, at a free port; gloo CPU
collectives), each with 2 host devices: one mesh of 4 devices that spans the
two processes. Each process runs ``train_lm.main`` with
``--context-parallel 4``: the model trained on the process's own first device,
and trained with every sequence split over all 4 devices (attention's K/V
permutes, and the loss's and gradients' psums, cross between the processes).
Each process checks that its two runs' loss and gradient norm curves agree to
float32 rounding (and exits non-zero if not); this script then checks that
both processes saw the same curves, and prints a JSON summary on its last
line.

Options are passed on to train_lm.py, after small defaults (5 steps, 1 layer,
d_model 32, 2 x 64 bytes, zigzag, ring); its plot and report go to a
temporary folder unless ``--out`` is given. The same code runs across real
hosts: start one process per host with ``jax.distributed.initialize`` (on a
GPU cluster its arguments are usually found from the environment) and build
the mesh from ``jax.devices()``, which lists every process's devices.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

PROCESSES, LOCAL_DEVICES = 2, 2
DEFAULTS = [
    "--steps", "5", "--layers", "1", "--d-model", "32", "--heads", "2",
    "--seq-len", "64", "--batch", "2", "--text-bytes", "100000",
    "--context-layout", "zigzag", "--context-mode", "ring",
]  # fmt: skip
TIMEOUT_S = 600


def worker(process_id: int, port: int, argv: list[str]) -> None:
    """One process: join the others, train, print the curves as JSON."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process_id,
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_lm

    n = PROCESSES * LOCAL_DEVICES
    assert jax.device_count() == n and jax.local_device_count() == LOCAL_DEVICES
    result = train_lm.main([*argv, "--context-parallel", str(n)])
    summary = {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "losses": {k: v.tolist() for k, v in result["losses"].items()},
        "max_abs_diff": result["max_abs_diff"],
        "tolerance": result["tolerance"],
        "grad_norms": {k: v.tolist() for k, v in result["grad_norms"].items()},
        "max_grad_norm_diff": result["max_grad_norm_diff"],
    }
    print(json.dumps(summary), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    argv = [*DEFAULTS, *(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory() as tmp:
        if "--out" not in argv:
            argv += ["--out", tmp]
        port = free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(i), str(port), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(PROCESSES)
        ]
        try:
            outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
        finally:
            for p in procs:  # one that failed can leave the other waiting
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        print("".join(f"[process {i}] {line}\n" for line in out.splitlines()))
        if p.returncode:
            sys.exit(f"process {i} exited with {p.returncode}")
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    for curves in ("losses", "grad_norms"):
        if results[0][curves] != results[1][curves]:
            sys.exit(f"the two processes' {curves} differ")
    summary = {
        "processes": PROCESSES,
        "devices": results[0]["devices"],
        "max_abs_diff": [r["max_abs_diff"] for r in results],
        "tolerance": results[0]["tolerance"],
        "max_grad_norm_diff": [r["max_grad_norm_diff"] for r in results],
        "losses": results[0]["losses"],
        "grad_norms": results[0]["grad_norms"],
    }
    print(
        f"{PROCESSES} processes x {LOCAL_DEVICES} devices: in each, the loss "
        f"curve with the sequence split over {summary['devices']} devices "
        "equals the one-device run to "
        + ", ".join(f"{d:.2e}" for d in summary["max_abs_diff"])
        + f" (allowed {summary['tolerance']:.2e}), its gradient norms to "
        + ", ".join(f"{d:.2e}" for d in summary["max_grad_norm_diff"])
        + "; both processes saw the same."
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        main()

"""Smoke runs of the benchmarks in --quick mode: they run and write results.

No timing is asserted here; the numbers live in bench/results/.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import tempfile

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def test_softmax_bench_quick_writes_table_and_plot(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jsoftmax", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "softmax_quick.md").read_text()
    for column in ("fwd / jax.nn", "A/A (fwd, fwd+bwd)", "fwd+bwd / floor"):
        assert column in table
    assert table.count("| softmax |") == 3 and table.count("| log_softmax |") == 3
    assert (tmp_path / "softmax_quick.png").stat().st_size > 0
    rows = json.loads((tmp_path / "softmax_quick.json").read_text())["rows"]
    # Every case timed the control (a second copy of jax.nn) beside the others.
    assert sum(r["impl"] == "jax.nn copy" for r in rows) == 6


def _contents(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_softmax_bench_without_out_leaves_committed_results_alone(
    tmp_path, monkeypatch
):
    # Issue item 15: a run without --out overwrote bench/results/softmax_cpu.*.
    committed = _contents(RESULTS)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bench = runpy.run_path(str(ROOT / "bench" / "bench.py"))
    # The full CPU sweep's code path (no --quick), on one tiny case, once.
    bench["main"].__globals__.update(
        sweep=lambda gpu, quick: [("rows128", (8, 128), "float32", False)],
        _rounds=lambda n, quick: 1,
    )
    assert bench["main"]([]) == 0
    assert _contents(RESULTS) == committed
    (run,) = tmp_path.glob("jsoftmax-bench-*")
    assert {p.name for p in run.iterdir()} == {
        "softmax_cpu.json",
        "softmax_cpu.md",
        "softmax_cpu.png",
    }


def _quick_run(script, out, *flags):
    """Runs ``bench/<script> --quick --out <out> *flags``; asserts that it
    passed."""
    run = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--out", str(out), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_losses_bench_quick_writes_table(tmp_path):
    _quick_run("losses.py", tmp_path)
    table = (tmp_path / "losses_quick.md").read_text()
    assert "jsoftmax (fused)" in table and "optax (unfused)" in table
    assert "| integer |" in table and "| probabilities |" in table


# ---------------------------------------------------------------------------
# The GPU run (bench/gpu.sh) and its modes, at smoke sizes on any backend.


def _bench_module(name, monkeypatch):
    """bench/<name>.py's globals (its `from bench import ...` needs bench/)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return runpy.run_path(str(ROOT / "bench" / f"{name}.py"), run_name=name)


def test_gpu_sh_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    assert subprocess.run(["bash", "-n", "bench/gpu.sh"], cwd=ROOT).returncode == 0
    out = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "GPU_SH_RESULTS": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    for step in ("info", "wheels", "pytest-gpu", "attention-targets", "losses",
                 "attention-blocks", "jsoftmax-check", "softmax-bench"):  # fmt: skip
        assert f"== [{step}]" in out.stdout
    assert "-m gpu" in out.stdout and "-n 0" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_sh_budget_skips_steps_that_would_not_fit(tmp_path):
    out = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "GPU_SH_RESULTS": str(tmp_path),
            "GPU_SH_BUDGET_S": "10",
        },  # fmt: skip
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("SKIPPED") == 8


@pytest.fixture
def standard_promotion():
    """jax.nn's bfloat16 attention fails under the tests' strict promotion; the
    benchmarks compile in threads, which a (thread-local) context would miss."""
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    yield
    jax.config.update("jax_numpy_dtype_promotion", "strict")


def _result(ms):
    return dict(status="ok", temp=None, err=None, ref=None, median=ms / 1e3,
                min=ms / 1e3, max=ms / 1e3)  # fmt: skip


def test_attention_targets_table_marks_each_target(monkeypatch):
    attention = _bench_module("attention", monkeypatch)
    shapes = attention["gpu_shapes"](False)
    nn, ours, cudnn = attention["NN_XLA"], attention["J_NONE"], attention["NN_CUDNN"]
    tk = attention["TK_TRITON"]
    results = {
        ours: _result(10.0),
        nn: _result(25.0),  # 0.40x: met non-causal (0.5), not met causal (0.3)
        cudnn: _result(5.0),  # 2.00x: not met (1.5)
        tk: dict(status="not run: import tokamax failed", temp=None, err=None),
    }
    rows = [dict(t=4096, kv=16, causal=c, mode="fwd+bwd", results=results)
            for c in (False, True)]  # fmt: skip
    table = "\n".join(attention["targets_markdown"](shapes, rows, "# t"))
    no, yes = (line for line in table.splitlines() if line.startswith("| 4096 | 16 |")
               and "met" in line)  # fmt: skip
    assert no.split(" | ")[3:6] == ["0.40 met", "0.40 met", "2.00 **NOT met**"]
    assert yes.split(" | ")[3:6] == ["0.40 met", "0.40 **NOT met**", "2.00 **NOT met**"]
    assert "n/a (tokamax triton: not run: import tokamax failed)" in no
    # TFLOP/s and % of peak beside each time: 3.5 * 4*B*N*T*S*H / 10 ms.
    flops = 3.5 * 4 * 4 * 16 * 4096 * 4096 * 128
    assert f"| {flops / 10e-3 / 1e12:,.0f} |" in table


def test_attention_gpu_targets_and_blocks_run_at_smoke_sizes(
    monkeypatch, standard_promotion
):
    attention = _bench_module("attention", monkeypatch)
    shapes = attention["GpuShapes"](1, 2, 16, (1,), (32,), attention["jnp"].bfloat16,
                                    {32: 1}, 32)  # fmt: skip
    written = []
    rows = attention["gpu_targets"](shapes, 60, 2**30, 2, written.append)
    lines = attention["gpu_block_sweep"](shapes, 32, 60, 2)
    assert written and len(rows) == 2 * 2  # causal, mode
    for row in rows:
        res = row["results"]
        for name in (attention["J_NONE"], attention["J_XLA"], attention["NN_XLA"]):
            assert res[name]["status"] == "ok" and res[name]["median"] > 0
        assert res[attention["MHA"]]["status"].startswith("not run")
    assert sum(line.endswith("| ok |") for line in lines) == 2 * 5  # variants


def test_losses_gpu_mode_runs_at_smoke_sizes(monkeypatch, tmp_path, standard_promotion):
    losses = _bench_module("losses", monkeypatch)
    losses["main_gpu"].__globals__["ROW_OPS"] = ("log_softmax",)
    assert losses["main_gpu"](True, tmp_path, 60, 2) == 0
    table = (tmp_path / "losses_quick_gpu.md").read_text()
    assert "| log_softmax | bfloat16 |" in table and "| optax (unfused) |" in table
    assert "jsoftmax chunk_size=256" in table


def test_tensor_parallel_bench_quick_writes_its_table(tmp_path):
    _quick_run("tensor_parallel.py", tmp_path)
    table = (tmp_path / "tensor_parallel_quick.md").read_text()
    # One row per head count, each timed beside jax.nn and the A/A copy.
    assert table.count("\n| ") == 4 and "| 4 | 2 |" in table, table


def test_eager_bench_quick_writes_its_tables(tmp_path):
    _quick_run("eager.py", tmp_path)
    table = (tmp_path / "eager_quick.md").read_text()
    # Every op called and differentiated beside its baseline and the A/A copy;
    # two layer stacks built.
    assert table.count("| call |") == 6 and table.count("| grad |") == 6, table
    assert "| 1 |" in table and "| 2 |" in table


def test_multi_device_benches_keep_the_flags_already_set(monkeypatch):
    # bench/host_devices.py adds the host device count to XLA_FLAGS. Before,
    # a setdefault left a user's flags (a dump folder; the suite's compile
    # options) without it, and the 4- and 8-device benches found one device.
    host = runpy.run_path(str(ROOT / "bench" / "host_devices.py"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    host["request"](8)
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {host['FLAG']}=8"
    host["request"](4)  # a count already set is the user's
    assert os.environ["XLA_FLAGS"].endswith("=8")
    monkeypatch.delenv("XLA_FLAGS")
    host["request"](4)
    assert os.environ["XLA_FLAGS"] == f"{host['FLAG']}=4"


def test_attention_packed_bench_quick_writes_its_table(tmp_path):
    _quick_run("attention.py", tmp_path, "--packed")
    table = (tmp_path / "attention_packed_quick.md").read_text()
    # One row per document count, ids and mask beside jax.nn and the A/A copy.
    assert table.count("\n| 2 |") == 1 and table.count("\n| 4 |") == 1, table

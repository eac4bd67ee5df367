"""Smoke runs of the benchmarks in --quick mode: they run and write results.

No timing is asserted here; the numbers live in bench/results/.
"""

import json
import pathlib
import runpy
import subprocess
import sys
import tempfile

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


def test_losses_bench_quick_writes_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/losses.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "losses_quick.md").read_text()
    assert "jsoftmax (fused)" in table and "optax (unfused)" in table
    assert "| integer |" in table and "| probabilities |" in table

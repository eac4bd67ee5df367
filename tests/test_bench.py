"""Smoke runs of the benchmarks in --quick mode: they run and write results.

No timing is asserted here; the numbers live in bench/results/.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


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

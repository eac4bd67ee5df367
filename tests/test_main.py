"""python -m jsoftmax: the verification table and its exit code."""

import subprocess
import sys

import jax.numpy as jnp

from jsoftmax import __main__ as cli
from jsoftmax import testing


def test_main_prints_a_passing_row_per_op_transform_and_dtype(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for op in ("softmax", "log_softmax", "softmax[where]", "softmax_jacobian"):
        for transform in ("jit", "vmap"):
            for dtype in ("float32", "bfloat16"):
                line = [
                    row
                    for row in out.splitlines()
                    if row.split(" | ")[0].strip() == op
                    and f"| {transform} " in row
                    and f"| {dtype} " in row
                ]
                assert len(line) == 1, (op, transform, dtype)
                assert line[0].rstrip().endswith("pass")
    assert "0 failed" in out


def test_main_exits_non_zero_when_a_check_fails(monkeypatch, capsys):
    def wrong_cases():
        return [
            (
                "shifted",
                lambda x: testing.reference_softmax(x) + 0.1,
                testing.reference_softmax,
            )
        ]

    monkeypatch.setattr(cli, "_cases", wrong_cases)
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out


def test_format_table_aligns_columns():
    rows = [
        dict(
            op="a",
            backend="cpu",
            transform="jit",
            dtype="float32",
            value_error=0.0,
            jacobian_error=jnp.nan,
            passed=False,
        )
    ]
    lines = cli.format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "FAIL" in lines[-1]


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "jsoftmax", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "bench" in out.stdout

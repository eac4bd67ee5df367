"""python -m jsoftmax: the verification table and its exit code."""

import subprocess
import sys
from pathlib import Path

import cuda_lowering
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import jsoftmax
from jsoftmax import __main__ as cli
from jsoftmax import testing

# Ops whose rows the table test reads: a mask and integer labels. CI runs the
# whole `python -m jsoftmax` right before the suite, so the test runs the
# table for these only (the table of every op takes about 100 s).
TABLE_OPS = ("softmax[where]", "ce_with_integer_labels")


def test_main_prints_a_passing_row_per_op_transform_and_dtype(monkeypatch, capsys):
    cases = [case for case in cli._cases() if case[0] in TABLE_OPS]
    assert {case[0] for case in cases} == set(TABLE_OPS)
    monkeypatch.setattr(cli, "_cases", lambda: cases)
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for op in TABLE_OPS:
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
                # Every op has forward mode: jax.jacfwd checked on its own.
                cells = [c.strip() for c in line[0].split(" | ")]
                assert cells[-2] == "pass", line[0]
                float(cells[-3])
    assert "0 failed" in out


def test_main_exits_non_zero_when_a_check_fails(monkeypatch, capsys):
    def wrong_cases():
        return [
            (
                "shifted",
                lambda x: testing.reference_softmax(x) + 0.1,
                testing.reference_softmax,
                12,
            )
        ]

    monkeypatch.setattr(cli, "_cases", wrong_cases)
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out


def test_main_says_why_each_row_fails(monkeypatch, capsys):
    # The error columns of a failing row can equal a passing run's (a
    # failure seen only in float64): the reason is printed under the table.
    def wrong_cases():
        return [("shifted", lambda x: jsoftmax.softmax(x) + 1e-6, _ref, 12)]

    def _ref(x):
        return testing.reference_softmax(x)

    monkeypatch.setattr(cli, "_cases", wrong_cases)
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    for dtype in ("float32", "bfloat16"):
        assert f"FAIL shifted | cpu | jit | {dtype}: " in out
    assert "in float64: output[" in out


def test_a_check_that_raises_is_an_error_row_and_the_others_still_run(
    monkeypatch, capsys
):
    def raises_under_vmap(x):
        if x.ndim == 1:
            raise RuntimeError("no rows")
        return jsoftmax.softmax(x)

    cases = [
        ("raises", raises_under_vmap, testing.reference_softmax, 12),
        ("softmax", jsoftmax.softmax, testing.reference_softmax, 12),
    ]
    monkeypatch.setattr(cli, "_cases", lambda: cases)
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    result = {
        tuple(c.strip() for c in line.split(" | ")[:3:2]): line.split(" | ")[-1].strip()
        for line in out.splitlines()
        if line.count(" | ") == 8
    }
    assert result[("raises", "vmap")] == "ERROR" and result[("raises", "jit")] == "pass"
    assert result[("softmax", "vmap")] == result[("softmax", "jit")] == "pass"
    assert "ERROR raises | cpu | vmap | float32: RuntimeError: no rows" in out


def test_points_are_drawn_in_float32_whatever_x64_says(monkeypatch):
    # Drawn in float64 under jax_enable_x64, the point moved, and the
    # attention row failed there.
    seen = []

    def record(op, reference, x, transform):
        seen.append(np.asarray(x.astype(jnp.float32)))
        return testing.vjp_errors(op, reference, x, transform=transform, float64=False)

    monkeypatch.setattr(testing, "vjp_errors", record)
    device = jax.devices("cpu")[0]
    args = ("softmax", jsoftmax.softmax, testing.reference_softmax, device, (4, 12))
    cli._rows(*args, ("jit",), ("float32",))
    with jax.enable_x64(True):
        cli._rows(*args, ("jit",), ("float32",))
    np.testing.assert_array_equal(seen[0], seen[1])


def test_the_attention_row_is_compared_in_float64_too():
    # jax.nn's attention computes in float32 whatever its inputs, which
    # skipped the float64 comparison: a backward 2e-6 off passed. The
    # reference is plain JAX now.
    name, op, reference, width = cli._cases()[-1]
    assert name == "dot_product_attention"

    @jax.custom_vjp
    def off(x):
        return op(x)

    def off_bwd(x, g):
        return (jax.vjp(op, x)[1](g)[0] * (1 + 2e-6),)

    off.defvjp(lambda x: (op(x), x), off_bwd)
    x = cli._spread(name) * jax.random.normal(jax.random.key(0), (4, width))
    right = testing.vjp_errors(op, reference, x, transform="jit")
    assert right.passed and right.float64 is not None, right
    wrong = testing.vjp_errors(off, reference, x, transform="jit")
    assert not wrong.passed and "in float64" in wrong.jacobian_mismatch


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    # print into a pipe whose reader has gone raised BrokenPipeError, and the
    # exit code was 1 whatever the checks said.
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from jsoftmax import __main__ as cli\n"
        "row = dict(op='softmax', backend='cpu', transform='jit', dtype='float32',\n"
        "           value_error=0.0, jacobian_error=0.0, passed=True)\n"
        "cli.verify = lambda: [row] * 5000\n"
        "sys.exit(cli.main([]))\n"
    )
    run = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run.stdout.close()  # the reader stops before anything is written
    stderr = run.stderr.read().decode()
    assert run.wait() == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


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
    rows.append(dict(rows[0], jacfwd_error=1.0, jacfwd_passed=False))
    lines = cli.format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "jacfwd" in lines[0]
    # No forward mode: "-"; a failing jax.jacfwd: FAIL in its own column.
    assert [c.strip() for c in lines[-2].split(" | ")][-3:] == ["-", "-", "FAIL"]
    assert [c.strip() for c in lines[-1].split(" | ")][-3:] == [
        "1.00e+00",
        "FAIL",
        "FAIL",
    ]


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "jsoftmax", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "bench" in out.stdout


def _other_project(path):
    """A folder holding another project's bench/bench.py, which has no main()."""
    (path / "bench").mkdir(parents=True)
    (path / "bench" / "bench.py").write_text('print("OTHER PROJECT\'S BENCH RAN")\n')
    return path


def test_bench_ignores_a_bench_in_the_current_directory(tmp_path):
    # Issue item 15: it ran ./bench/bench.py and then failed with KeyError: 'main'.
    out = subprocess.run(
        [sys.executable, "-m", "jsoftmax", "bench", "--help"],
        capture_output=True,
        text=True,
        cwd=_other_project(tmp_path),
    )
    assert "OTHER PROJECT" not in out.stdout + out.stderr
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--quick" in out.stdout and "--out" in out.stdout


def test_rows_say_where_jit_was_disabled():
    # Under JAX_DISABLE_JIT the "jit" rows ran op by op, labelled "jit".
    cpu = jax.devices("cpu")[0]
    args = ("softmax", jsoftmax.softmax, testing.reference_softmax, cpu, (4, 8))
    with jax.disable_jit():
        (row,) = cli._rows(*args, ("jit",), ("float32",))
    assert row["transform"] == "jit (disabled)" and row["passed"], row
    (row,) = cli._rows(*args, ("jit",), ("float32",))
    assert row["transform"] == "jit" and row["passed"], row


def test_options_before_bench_are_refused_as_the_checks_own(capsys):
    # They were handed to bench.py, whose error named them as its own.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--bogus", "bench", "--quick"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m jsoftmax [-h]"), err
    assert "unrecognized arguments: --bogus" in err


def test_bench_out_that_cannot_be_made_is_a_usage_error(tmp_path, monkeypatch, capsys):
    # It was a FileNotFoundError traceback from mkdir.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--out", str(blocker / "results")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'results'}: cannot make that folder" in err


def test_bench_gpu_shapes_off_a_gpu_are_a_usage_error(monkeypatch, capsys):
    # They ran on the CPU (rows of 256k classes), for minutes.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--gpu", "--quick"])
    assert exit_.value.code == 2
    assert "--gpu: the GPU shape set needs a GPU" in capsys.readouterr().err


def test_bench_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    # jsoftmax installed from a wheel: no pyproject.toml or bench/ next to it,
    # though site-packages may hold another distribution's bench/bench.py.
    site = _other_project(tmp_path / "site-packages")
    monkeypatch.setattr(jsoftmax, "__file__", str(site / "jsoftmax" / "__init__.py"))
    monkeypatch.chdir(_other_project(tmp_path / "elsewhere"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["bench", "--quick"]) == 2
    out = capsys.readouterr()
    assert "OTHER PROJECT" not in out.out
    assert "not part of the installed package" in out.err
    assert str(site) in out.err


def test_bench_script_without_main_says_so(tmp_path, monkeypatch, capsys):
    checkout = _other_project(tmp_path / "checkout")
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(
        jsoftmax, "__file__", str(checkout / "jsoftmax" / "__init__.py")
    )
    monkeypatch.chdir(checkout)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.main(["bench"]) == 2
    assert "defines no main(argv)" in capsys.readouterr().err


# The table on 4 host devices, its sharded rows only; with "wrong", its
# attention rows only, the ring's merge keeping the newest step's partial rows.
MESH_SCRIPT = """
import sys
sys.path.insert(0, sys.argv.pop(1))  # tests/
from xla_flags import use_host_devices
use_host_devices(4)
from jsoftmax import __main__ as cli, _context_parallel as cp
cli._cases = lambda: []
if sys.argv[1:] == ["wrong"]:
    cases = cli._mesh_cases
    cli._mesh_cases = lambda mesh: [c for c in cases(mesh) if "attention" in c[0]]
    cp._merge = lambda state, o, lse: (o, lse, (lse > -float("inf")).astype(o.dtype))
sys.exit(cli.main([]))
"""
SHARDED_OPS = [
    f"{op}[axis_name x4]"
    for op in (
        "softmax",
        "log_softmax",
        "softmax_cross_entropy",
        "ce_with_integer_labels",
        "linear_softmax_cross_entropy",
    )
] + ["dot_product_attention[ring x4]", "dot_product_attention[all_gather x4]"]
DTYPES = ("float32", "bfloat16")


def _mesh_table(*args):
    out = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(Path(__file__).parent), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if cells[0] in SHARDED_OPS:
            rows[cells[0], cells[2], cells[3]] = cells[-1]
    return out.returncode, rows, out.stdout + out.stderr


def test_main_checks_the_sharded_ops_over_the_devices():
    # With 2 or more devices on a platform, the table has every op that
    # takes axis_name over them (the largest power of two up to 8), under
    # jit: the classes, the vocabulary or the sequence split.
    code, rows, out = _mesh_table()
    want = {(op, "jit", dtype) for op in SHARDED_OPS for dtype in DTYPES}
    assert code == 0, out[-3000:]
    assert set(rows) == want, out[-3000:]
    assert set(rows.values()) == {"pass"}


def test_main_sharded_rows_catch_a_wrong_ring_merge():
    code, rows, out = _mesh_table("wrong")
    assert code == 1, out[-3000:]
    assert set(rows) == {(op, "jit", d) for op in SHARDED_OPS[-2:] for d in DTYPES}
    for (op, _, _), result in rows.items():
        # Only the ring merges partial rows: all-gather's rows still pass.
        assert result == ("FAIL" if "[ring" in op else "pass"), out[-3000:]


def test_main_attention_rows_run_the_kernels_where_lowered_for_cuda():
    # On a GPU the table checks the kernels, not the XLA path they fall back
    # to for blocks they cannot take (blocks of 2 did): the attention row and
    # the context-parallel ones (over an abstract mesh of 2), lowered for
    # CUDA with their Jacobians, hold the three kernels.
    mesh = jax.sharding.AbstractMesh((2,), ("c",), axis_types=(AxisType.Auto,))
    cases = [c for c in cli._cases() + cli._mesh_cases(mesh) if "attention" in c[0]]
    assert len(cases) == 3
    for name, op, _, width in cases:
        x = jnp.ones((4, width))
        text = cuda_lowering.export(jax.jacrev(op), x).mlir_module()
        for kernel in ("forward", "dkv", "dq"):
            assert f"jsoftmax_attention_{kernel}" in text, (name, kernel)

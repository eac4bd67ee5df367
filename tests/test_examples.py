"""The examples run: examples/train_lm.py for a few steps at tiny sizes, on one
device, with its sequence split over host devices (a separate process: the
device count is set before jax is imported), and over two processes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flax")  # the `examples` extra; CI installs it

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would, so that its dataclasses can resolve
    # their (postponed) annotations.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_lm_two_steps_agree_with_jax_nn_and_optax(tmp_path):
    train_lm = load_example("train_lm")
    # optax's adam mixes Python floats with int32 step counts, which the
    # suite's strict dtype promotion (conftest.py) rejects.
    with jax.numpy_dtype_promotion("standard"):
        result = train_lm.main(
            ["--steps", "2", "--layers", "1", "--d-model", "32", "--heads", "2",
             "--seq-len", "32", "--batch", "2", "--text-bytes", "100000",
             "--out", str(tmp_path)]
        )  # fmt: skip
    losses = result["losses"]
    assert losses["jsoftmax"].shape == losses["reference"].shape == (2,)
    np.testing.assert_allclose(losses["jsoftmax"], losses["reference"], rtol=1e-5)
    assert all(v is None or v > 0 for v in result["temp_bytes"].values())
    assert (tmp_path / "train_lm.png").stat().st_size > 0
    assert "| jsoftmax / reference |" in (tmp_path / "train_lm.md").read_text()


# A separate process with 4 host devices trains with the sequence split over
# 2 and 4 of them, in both modes and both layouts between the two runs.
CONTEXT_PARALLEL_RUNS = """
import json, os, sys
flags = os.environ.get("XLA_FLAGS", "")  # pytest's (tests/conftest.py)
os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import train_lm

report = {}
for n, mode, layout in [(2, "all_gather", "contiguous"), (4, "ring", "zigzag")]:
    result = train_lm.main(
        ["--steps", "3", "--layers", "1", "--d-model", "32", "--heads", "2",
         "--seq-len", "32", "--batch", "2", "--text-bytes", "100000",
         "--context-parallel", str(n), "--context-mode", mode,
         "--context-layout", layout, "--out", sys.argv[2]]
    )
    report[f"{n}/{mode}/{layout}"] = {
        "losses": {k: v.tolist() for k, v in result["losses"].items()},
        "grad_norms": {k: v.tolist() for k, v in result["grad_norms"].items()},
        "device_losses": result["device_losses"].tolist(),
    }
print(json.dumps(report))
"""


def float32_rounding(*curves):
    # The two runs add the same float32 numbers in other orders (the loss
    # over devices, the gradients' psum); a few steps of training keep the
    # difference within a few dozen roundings of the loss.
    scale = max(np.abs(curve).max() for curve in curves)
    return 64 * np.finfo(np.float32).eps * scale


def test_train_lm_context_parallel_equals_one_device(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", CONTEXT_PARALLEL_RUNS, str(EXAMPLES), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report) == 2
    for label, run in report.items():
        one = np.array(run["losses"]["single"])
        split = np.array(run["losses"]["context_parallel"])
        assert one.shape == split.shape == (3,), label
        tolerance = float32_rounding(one, split)
        assert np.abs(split - one).max() <= tolerance, label
        # AdamW and clipping would hide gradients off by a constant factor
        # from the loss curve (the parameters' gradients psum-ed on top of
        # autodiff's own sum: N times too large, the losses still within
        # 1e-6); their norms show it.
        norms = [np.array(run["grad_norms"][k]) for k in ("single", "context_parallel")]
        assert np.abs(norms[1] - norms[0]).max() <= float32_rounding(*norms), label
        # The check can fail: without the psum over the devices, each
        # device's loss is the mean of its own tokens only, which differs
        # from the whole sequence's at every step by far more.
        own = np.array(run["device_losses"])  # [steps, N]
        assert own.shape == (3, int(label[0])), label
        np.testing.assert_allclose(own.mean(axis=1), one, rtol=1e-5)
        assert (np.abs(own - one[:, None]).max(axis=1) > 100 * tolerance).all()
    assert (tmp_path / "train_lm_context_parallel.png").stat().st_size > 0
    md = (tmp_path / "train_lm_context_parallel.md").read_text()
    assert "| context parallel / one device |" in md
    assert "--context-layout zigzag --context-mode ring --context-parallel 4" in md


def test_train_lm_asks_for_host_devices_before_jax_is_imported(monkeypatch):
    train_lm = load_example("train_lm")
    flag = "--xla_force_host_platform_device_count"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    train_lm.request_host_devices(["--steps", "2", "--context-parallel", "4"])
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {flag}=4"
    # A count already set is the user's; without the option nothing changes.
    train_lm.request_host_devices(["--context-parallel", "8"])
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {flag}=4"
    monkeypatch.delenv("XLA_FLAGS")
    train_lm.request_host_devices(["--steps", "2"])
    assert "XLA_FLAGS" not in os.environ


def test_train_lm_context_parallel_bad_options_say_what_is_wrong(tmp_path, capsys):
    train_lm = load_example("train_lm")
    zigzag = ["--context-layout", "zigzag", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        train_lm.main(["--seq-len", "36", "--context-parallel", "4", *zigzag])
    assert "--seq-len 36 does not divide into 8 chunks" in capsys.readouterr().err
    # More devices than this process has: the message says how to get them,
    # before any data is loaded or model built.
    n = jax.device_count() + 1
    with pytest.raises(SystemExit, match=f"needs {n} devices.*XLA_FLAGS"):
        train_lm.main(["--seq-len", str(16 * n), "--context-parallel", str(n),
                       "--out", str(tmp_path)])  # fmt: skip


def test_multiprocess_context_parallel_equals_one_process():
    # 2 processes x 2 host devices, joined by jax.distributed on 127.0.0.1:
    # each checks its curve with the sequence split over the 4 devices
    # against its own one-device run; the script checks the two agree.
    script = EXAMPLES / "multiprocess_context_parallel.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "3", "--seq-len", "32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["devices"] == 4
    one = np.array(summary["losses"]["single"])
    split = np.array(summary["losses"]["context_parallel"])
    assert one.shape == (3,)
    assert np.abs(split - one).max() <= float32_rounding(one, split)
    norms = [np.array(summary["grad_norms"][k]) for k in ("single", "context_parallel")]
    assert np.abs(norms[1] - norms[0]).max() <= float32_rounding(*norms)

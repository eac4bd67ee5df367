"""The examples run: a two-step smoke test of examples/train_lm.py."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flax")  # the `examples` extra; CI installs it

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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

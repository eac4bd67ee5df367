#!/usr/bin/env bash
# Download the wheels that bench/gpu.sh installs on the GPU machine, which has
# no network. Run it here, in the repo root, before calling the device with
# carry=["wheels"]:
#
#     bash bench/fetch_wheels.sh          # -> wheels/ (git-ignored), ~6 MiB
#
# The device image (see the device notes: Python 3.12, jax 0.11.2, flax,
# chex, optax, absl-py, jaxtyping, tqdm, protobuf, pytest, hypothesis,
# matplotlib ... preinstalled) lacks tokamax and some of what tokamax imports.
# So this fetches tokamax, optax and only those missing dependencies, each
# with --no-deps, for that Python and platform; pulling the full dependency
# closure instead would bring jax/jaxlib and the CUDA libraries (far over the
# 64 MiB that may travel). pydantic is fetched with its own dependencies so
# that pydantic-core matches it exactly. Set PYVER for another Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${WHEELS_DIR:-wheels}
mkdir -p "$DEST"
PLATFORM=(--only-binary=:all: --python-version "$PYVER" --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64 -d "$DEST")
PIP=(python3 -m pip download -q --disable-pip-version-check)
# tokamax 0.0.12 needs: absl-py einshape jaxtyping pydantic qwix tqdm
# typing_extensions typeguard==2.13.3 immutabledict tensorboardx; qwix needs
# flax (preinstalled there) and opt_einsum; tensorboardx needs protobuf.
"${PIP[@]}" "${PLATFORM[@]}" --no-deps \
  "tokamax==0.0.12" "optax>=0.2.4" "qwix" "einshape" "typeguard==2.13.3" \
  "immutabledict" "tensorboardx"
"${PIP[@]}" "${PLATFORM[@]}" "pydantic>=2.11"
du -sh "$DEST"
ls "$DEST"

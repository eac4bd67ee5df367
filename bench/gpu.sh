#!/usr/bin/env bash
# The prepared GPU run of issue 19: the GPU-marked tests, `python -m jsoftmax`
# and the GPU benchmarks, in under 8 minutes on one H200, from the repo root:
#
#     bash bench/fetch_wheels.sh      # here, once: wheels/ (tokamax and deps)
#     # then, through the device tool: run(command="bash bench/gpu.sh",
#     #                                    carry=["wheels"], timeout_s=540)
#     bash bench/gpu.sh --dry-run     # (or GPU_SH_DRY_RUN=1) print the steps
#     bash bench/gpu.sh --quick       # every step at smoke sizes, results in a
#                                     # temporary folder (a check of the script
#                                     # on any machine; no numbers to keep)
#
# Each step has its own timeout, and the whole run a budget (GPU_SH_BUDGET_S,
# default 460 s): a step gets at most what is left of it, and a step that
# fails does not stop the next. Everything is logged to
# bench/results/gpu_run.log, and the log plus the result tables are copied to
# $OUT after every step (the device tool brings back only $OUT, at most 8
# files), with everything in one gpu_results.tar.gz.
#
# Order: the tests first (correctness), then the benchmarks the issue's
# targets need, then `python -m jsoftmax` (it did not finish within 120 s on
# an H200 before) and the softmax sweep with whatever time is left.
set -u
cd "$(dirname "$0")/.."
DRY=${GPU_SH_DRY_RUN:-0}
QUICK=
[ "${1:-}" = "--dry-run" ] && DRY=1
[ "${1:-}" = "--quick" ] && QUICK=--quick
BUDGET=${GPU_SH_BUDGET_S:-460}
RESULTS=${GPU_SH_RESULTS:-bench/results}
if [ -n "$QUICK" ] && [ -z "${GPU_SH_RESULTS:-}" ]; then
  RESULTS=$(mktemp -d /tmp/jsoftmax-gpu-sh-XXXXXX)
fi
LOG=$RESULTS/gpu_run.log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# More of the GPU for XLA's pool than its default 75%: jax.nn's xla attention
# at T=8192 needs tens of GiB (bench/attention.py runs only what fits).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
START=$SECONDS

log() { if [ "$DRY" = 1 ]; then echo "$*"; else echo "$*" | tee -a "$LOG"; fi; }

save() {  # copy what came back so far to $OUT (the device tool's folder)
  [ "$DRY" = 1 ] && return 0
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  cp -f "$LOG" "$OUT/" 2>/dev/null
  for f in attention_gpu_targets.md attention_blocks_gpu.md losses_gpu.md \
    attention_quick_targets.md attention_blocks_quick.md losses_quick_gpu.md; do
    [ -f "$RESULTS/$f" ] && cp -f "$RESULTS/$f" "$OUT/"
  done
  tar -czf "$OUT/gpu_results.tar.gz" "$LOG" $(ls "$RESULTS"/*gpu* "$RESULTS"/*quick* \
    "$RESULTS"/softmax_NVIDIA* 2>/dev/null | sort -u) 2>/dev/null
  return 0
}

# step NAME TIMEOUT_S COMMAND...: run with min(TIMEOUT_S, budget left).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local t=$((limit < left ? limit : left))
  if [ "$t" -lt 15 ]; then
    log "== [$name] SKIPPED: ${left}s of the ${BUDGET}s budget left"
    return 0
  fi
  log "== [$name] $(date +%T) timeout ${t}s: $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS
  timeout -k 10 "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "== [$name] rc=$rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  save
}

info() {
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
  "$PY" -c 'import sys, jax, jaxlib; print("python", sys.version.split()[0]); print("jax", jax.__version__, "jaxlib", jaxlib.__version__); print(jax.devices())'
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|jax-cuda|optax|tokamax|flax|chex|triton|pytest|qwix|pydantic) " || true
}

install_wheels() {
  # Wheels from bench/fetch_wheels.sh, carried with carry=["wheels"]. First as
  # the issue says (pip resolves against what the image has and takes only the
  # missing packages from wheels/); if that fails, every carried wheel without
  # its dependencies into /tmp/site, which gpu.sh then puts on PYTHONPATH.
  if [ ! -d wheels ]; then echo "no wheels/ folder: the tokamax peers are skipped"; return 0; fi
  "$PY" -m pip install -q --no-index --find-links wheels optax tokamax \
    || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site wheels/*.whl \
    || echo "wheel install failed (ignored)"
  PYTHONPATH=$PYTHONPATH:/tmp/site "$PY" -c 'import sys; sys.argv = sys.argv[:1]
import optax, tokamax; print("optax", optax.__version__, "tokamax", tokamax.__version__)' \
    || echo "import tokamax failed (ignored): the tokamax peers are skipped"
}

if [ "${1:-}" = "--sub" ]; then "$2"; exit $?; fi  # step's way to run a function

mkdir -p "$RESULTS"
[ "$DRY" = 1 ] || : >"$LOG"

log "== bench/gpu.sh: budget ${BUDGET}s, python: $PY, results in $RESULTS"
step info 40 bash bench/gpu.sh --sub info
if [ -z "$QUICK" ]; then
  step wheels 60 bash bench/gpu.sh --sub install_wheels
else  # never install into the Python of the machine a smoke run is tried on
  log "== [wheels] SKIPPED with --quick"
fi
# Only where the fallback ran: /tmp/site then holds the carried wheels.
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
step pytest-gpu 120 "$PY" -m pytest -q -rfEs -m gpu -p no:cacheprovider -n 0 tests/
step attention-targets 215 "$PY" bench/attention.py --gpu-targets --budget-s 185 $QUICK --out "$RESULTS"
step losses 100 "$PY" bench/losses.py --gpu --budget-s 80 $QUICK --out "$RESULTS"
step attention-blocks 60 "$PY" bench/attention.py --gpu-blocks --budget-s 40 $QUICK --out "$RESULTS"
if [ -z "$QUICK" ]; then
  step jsoftmax-check 90 "$PY" -m jsoftmax
  step softmax-bench 60 "$PY" -m jsoftmax bench --gpu --out "$RESULTS"
else
  step softmax-bench 60 "$PY" -m jsoftmax bench --quick --out "$RESULTS"
fi
log "== done after $((SECONDS - START))s"
save

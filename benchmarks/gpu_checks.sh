#!/usr/bin/env bash
# The checks only a GPU can run. A session gets 15 minutes of device time in all, machine start-up included,
# which leaves room for one call of at most 10 minutes: `all` runs every step in order of need, each within
# what is left of BUDGET seconds (default 570), so the call ends inside its limit (see BENCHMARKS.md):
#   bash benchmarks/gpu_checks.sh all "$OUT"     # first, then more, as far as the budget goes
#   bash benchmarks/gpu_checks.sh first "$OUT"   # install, pytest -m gpu and kernels.py (Triton and Mosaic GPU
#                                                # kernels), scale.py at 16K and 64K,
#                                                # hlo_audit.py (copies in the compiled decode loops)
#   bash benchmarks/gpu_checks.sh more "$OUT"    # offload tests on the GPU, scale.py at 32K and 128K
# Uses the machine's preinstalled jax, flax, orbax, transformers and torch (never reinstalls them).
# Each step has its own time limit and log; the logs and results travel back as one archive, OUT/results.tgz
# (the device tool returns at most 8 files), refreshed every 15 s and after each step, so a step cut short
# still leaves what it printed.
set -u
stage=${1:?usage: gpu_checks.sh all|first|more OUT}
out=${2:?usage: gpu_checks.sh all|first|more OUT}
budget=${BUDGET:-570}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # imports work even if the editable install fails
pack() { tar czf "$out/.results.tgz" -C "$work" . 2>/dev/null && mv "$out/.results.tgz" "$out/results.tgz"; }
(while sleep 15; do pack; done) &
packer=$!
trap 'kill $packer 2>/dev/null; pack' EXIT
step() {  # step NAME SECONDS COMMAND...: runs COMMAND within min(SECONDS, budget left), output to NAME.txt
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "$name: skipped, $left s of the budget left" | tee -a "$work/steps.txt"
    return
  fi
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$work/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$work/steps.txt"
  pack
}
first() {
  # The Mosaic GPU kernel has never run on a GPU: its own step, after Triton's, so a hang costs only itself.
  step pytest_gpu_triton 60 python3 -m pytest -v -m gpu -k "not mosaic_gpu" tests/test_tree_attention.py
  step pytest_gpu_mosaic 50 python3 -m pytest -v -m gpu -k mosaic_gpu tests/test_tree_attention.py
  step kernels 140 python3 benchmarks/kernels.py --out "$work/kernels.json"
  step scale 240 python3 benchmarks/scale.py --contexts 16384 65536 --offload-contexts 65536 \
    --out "$work/scale.json"
  step hlo_audit 30 python3 benchmarks/hlo_audit.py --modes specpv ar --out "$work/hlo_audit.json"
}
more() {
  step pytest_offload 100 python3 -m pytest -q -x tests/test_offload.py
  step scale_more 400 python3 benchmarks/scale.py --contexts 32768 131072 --offload-contexts 131072 \
    --out "$work/scale_more.json"
}
step install 40 python3 -m pip install --no-deps --no-build-isolation -e .
step env 20 python3 -c "import jax, flax, transformers, torch; print(jax.__version__, jax.devices(), flax.__version__, transformers.__version__, torch.__version__)"
case $stage in
  all) first; more ;;
  first) first ;;
  more) more ;;
  *) echo "unknown stage $stage (all, first or more)"; exit 2 ;;
esac

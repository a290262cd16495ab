#!/usr/bin/env bash
# The checks only a GPU can run, as two device calls (about 6 and 8 minutes at most; see BENCHMARKS.md):
#   bash benchmarks/gpu_checks.sh kernels "$OUT"   # install, pytest -m gpu, offload tests on the GPU, kernels.py
#   bash benchmarks/gpu_checks.sh scale "$OUT"     # install, scale.py at Llama-3.1-8B shapes
# Uses the machine's preinstalled jax, flax, orbax, transformers and torch (never reinstalls them).
# Each step has its own time limit and log under OUT, so a failing step leaves the others' results.
set -u
stage=${1:?usage: gpu_checks.sh kernels|scale OUT}
out=${2:?usage: gpu_checks.sh kernels|scale OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a limit, output to OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
step install 120 python3 -m pip install --no-deps --no-build-isolation -e .
step env 60 python3 -c "import jax, flax, transformers, torch; print(jax.__version__, jax.devices(), flax.__version__, transformers.__version__, torch.__version__)"
case $stage in
  kernels)
    step pytest_gpu 120 python3 -m pytest -q -m gpu tests/test_tree_attention.py
    step pytest_offload 100 python3 -m pytest -q -x tests/test_offload.py
    step kernels 150 python3 benchmarks/kernels.py --out "$out/kernels.json" ;;
  scale)
    step scale 480 python3 benchmarks/scale.py --out "$out/scale.json" ;;
  *) echo "unknown stage $stage (kernels or scale)"; exit 2 ;;
esac

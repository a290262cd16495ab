#!/usr/bin/env bash
# The checks only a GPU can run. A session gets 15 minutes of device time in all, machine start-up included,
# which leaves room for one call of at most 10 minutes, so the steps run in order of need, each within what is
# left of BUDGET seconds (default 570) and its own limit, and the call ends inside its 600 s:
#   bash benchmarks/gpu_checks.sh "$OUT"
# Uses the machine's preinstalled jax, flax, orbax, transformers and torch (never reinstalls them).
# Each step has its own log; the logs and results travel back as one archive, OUT/results.tgz (the device tool
# returns at most 8 files), refreshed every 15 s and after each step, so a step cut short still leaves what it
# printed. The order is what the open issues still lack (BENCHMARKS.md says what each step found last time).
set -u
out=${1:?usage: gpu_checks.sh OUT}
budget=${BUDGET:-570}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the checkout's packages, no install needed
pack() {  # to a name of this process's own, then renamed: the packer and a step never share a half-written file
  local partial=$out/.results.$BASHPID.tgz
  tar czf "$partial" -C "$work" . 2>/dev/null && mv "$partial" "$out/results.tgz"
}
(while sleep 15; do pack; done) >/dev/null 2>&1 &  # its output closed: a lingering sleep must not hold the call
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
step env 20 python3 -c "import os, specpv_jax, jax, flax, transformers, torch
print(jax.__version__, jax.devices(), flax.__version__, transformers.__version__, torch.__version__)
print('XLA_FLAGS after import specpv_jax (expected unset on a GPU machine):', repr(os.environ.get('XLA_FLAGS')))
from specpv_jax.attention import resolve_implementation
from pallas_kernels.tree_attention import cuda_capability
print('compute capability', cuda_capability(), 'attention auto ->', resolve_implementation('auto'))"
step attention_kernels 150 python3 benchmarks/attention_kernels.py --out "$work/attention_kernels.json"
step offload_generate 120 python3 benchmarks/offload_generate.py --context 16384 --out "$work/offload_generate.json"
step scale 190 python3 benchmarks/scale.py --contexts 32768 131072 --offload-contexts 131072 \
  --out "$work/scale.json"
step decode_profile 210 python3 benchmarks/decode_profile.py --out "$work/decode_profile.json"
step pytest_gpu 110 python3 -m pytest -v -m gpu --durations=5 tests/test_tree_attention.py
step scale_16k_64k 240 python3 benchmarks/scale.py --contexts 16384 65536 --offload-contexts 65536 \
  --out "$work/scale_16k_64k.json"
step hlo_audit 90 python3 benchmarks/hlo_audit.py --modes specpv ar --out "$work/hlo_audit.json"
step pytest_offload 100 python3 -m pytest -q -x tests/test_offload.py

#!/usr/bin/env bash
# One prepared GPU check: the smoke pipeline on CUDA (device picked at run time, AMP on), then training
# throughput and ONNX Runtime vs torch latency. Prints measured figures; exits non-zero if CUDA is absent
# or a stage fails.   usage: bash scripts/gpu_check.sh   (PY=/path/to/python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONHASHSEED=0
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda:', ok, torch.version.cuda, \
torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 3)"
start=$(date +%s)
"$PY" -m lib.pipeline --profile smoke --run-id "gpu-check-$(date +%Y%m%d-%H%M%S)"
echo "smoke pipeline on CUDA: $(( $(date +%s) - start )) s"
"$PY" scripts/gpu_check.py

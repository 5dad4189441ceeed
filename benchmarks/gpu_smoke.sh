#!/usr/bin/env bash
# The scale benches on a CUDA device: the same code the CPU runs (`prunebench bench depth` and `bench scale`, with
# --device cuda), plus one offloaded prune of a zoo model (its layers really move to the GPU and back) evaluated
# there. Where there is no CUDA device it is skipped and says so (exit 0). Results go to $1 (default gpu-smoke/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-smoke}"
if ! python -c "import torch" 2>/dev/null; then
  echo "error: gpu_smoke: $(command -v python || echo python) has no torch; activate prunebench's environment" >&2
  exit 1
fi
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_smoke: skipped: no CUDA device here (torch $(python -c 'import torch; print(torch.__version__)'))"
  exit 0
fi
python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_smoke: {p.name}, {p.total_memory / 1e9:.0f} GB, {torch.cuda.device_count()} device(s)')"
mkdir -p "$out"
prunebench prune --model zoo:tiny-llama --method slimgpt --sparsity 0.5 --device cuda --out "$out/slimgpt-cuda"
prunebench eval --model "$out/slimgpt-cuda/model" --device cuda --dtype bfloat16 --limit 50
prunebench bench depth --device cuda --out "$out/depth.json"
prunebench bench scale --device cuda --models "${SCALE_MODELS:-llama-3.1-8b,qwen3-30b-a3b,llama-3.1-70b}" --out "$out/scale.json"
echo "gpu_smoke: done -> $out"

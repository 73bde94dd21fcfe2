#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (run from the repository root; nothing installed:
# the machine's own torch, safetensors, click, rich, peft and transformers are used via PYTHONPATH).
#   1. the whole test suite there (the CPU-vs-CUDA extraction test runs only where a GPU is seen);
#   2. `loratools extract --device cuda` and `spectrum --device cuda` on the fixtures;
#   3. benchmarks/bench_extract.py on the GPU (--big) and on 16 CPU threads, for the README's figures.
# Logs go to $OUT (the device tool's output folder) or out/device.
set -uo pipefail
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'transformers', transformers.__version__,
'peft', peft.__version__)" 2>&1 | tee "$out/versions.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -15 | tee "$out/tests.txt"
tmp=$(mktemp -d)
python3 -m loratools extract fixtures/llama-base-bf16 fixtures/llama-tuned-bf16 -o "$tmp/gpu" --energy 0.95 \
  --device cuda --report "$out/extract-cuda.json" 2>&1 | tail -4 | tee "$out/extract-cuda.txt"
python3 -m loratools spectrum fixtures/llama-base fixtures/llama-tuned --ranks 2,4,8 --device cuda --json \
  > "$out/spectrum-cuda.json" 2>&1; echo "spectrum --device cuda exit $?" | tee -a "$out/extract-cuda.txt"
timeout 200 python3 benchmarks/bench_extract.py --device cuda --big --threads 16 2>&1 | tee "$out/bench-cuda.txt"
timeout 110 python3 benchmarks/bench_extract.py --threads 16 --memory-layers 0 2>&1 | tee "$out/bench-cpu16.txt"

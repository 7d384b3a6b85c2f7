#!/usr/bin/env bash
# The one prepared GPU check (issue 6): GPU-marked tests + the throughput benchmark on the device.
# Run from the repository root on a machine with a CUDA GPU, after `bash scripts/install.sh`:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: benchmarks/results)
# It writes OUT_DIR/gpu_tests.txt, OUT_DIR/throughput_gpu.{json,md}; name the GPU beside the numbers
# (the JSON records torch.cuda.get_device_name) when committing them. About 5 minutes on one H100.
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.cuda.get_device_name(0))"
# 1. GPU-marked tests (fp32 / bf16 / fp16 distillation, KD layer on the device vs the CPU, fused vs reference kernel)
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_fused_step.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
# 2. throughput: same pair / methods / batch as the CPU tables, plus batch 256 (GPU-sized)
for B in 64 256; do
  timeout 240 python3 benchmarks/throughput.py --device cuda --models resnet8x4 resnet32x4 --pair resnet32x4:resnet8x4 \
    --methods vanilla kd dkd crd letkd1 letkd2 --precisions fp32 bf16 --batch $B --steps 30 --warmup 10 \
    --out "$OUT/throughput_gpu_b$B.json"
done

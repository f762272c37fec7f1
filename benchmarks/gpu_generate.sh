#!/usr/bin/env bash
# GPU decode benchmark (fits in ~5 minutes on one H100): ours vs KerasHub on a
# 2B-shaped bfloat16 Gemma 2, under jax and torch, plus the HBM roof.
# Needs keras and keras-hub importable (TensorFlow is not needed: no text).
# Usage: bash benchmarks/gpu_generate.sh  (from the repository root)
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY - <<'PYEOF'
import torch, time
x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); start = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize()
bandwidth = 20 * 2 * x.numel() / (time.perf_counter() - start)  # read + write
weights = 2_614_341_888 * 2
print(f"HBM copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write); "
      f"roof {bandwidth / weights:.0f} decode tokens/s for {weights / 1e9:.2f} GB of bf16 weights")
PYEOF
for backend in jax torch; do
    KERAS_BACKEND=$backend timeout 240 $PY benchmarks/gpu_generate.py || echo "{\"backend\": \"$backend\", \"failed\": $?}"
done

#!/usr/bin/env bash
# GPU prefill benchmark (fits in ~5 minutes on one H100): a 2B-shaped bfloat16
# Gemma 2 forward over an 8192-token prompt (last-position logits), ours vs
# KerasHub, under jax (ours "auto": blocked local layers, full global layers;
# and "reference") and torch (ours "flex": compiled FlexAttention with the
# soft-cap score_mod and window block mask). One process per (backend,
# model), so each peak device memory is its own; one JSON line per result,
# a "failed" line where a run errs or exceeds its time.
# Needs keras and keras-hub importable (TensorFlow is not needed).
# Usage: bash benchmarks/gpu_prefill.sh  (from the repository root)
#        GPU_PREFILL_ARGS=--tiny bash benchmarks/gpu_prefill.sh  (CPU check)
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import keras, keras_hub; print('keras', keras.__version__, 'keras-hub', keras_hub.__version__)"
run() {  # backend model implementation seconds
    KERAS_BACKEND=$1 timeout "$4" $PY benchmarks/gpu_prefill.py "$2" "$3" ${GPU_PREFILL_ARGS:-} \
        || echo "{\"backend\": \"$1\", \"model\": \"$2\", \"implementation\": \"$3\", \"failed\": $?}"
}
run jax ours auto 70
run jax keras_hub - 55
run torch ours flex 85
run torch keras_hub - 45
run jax ours reference 40

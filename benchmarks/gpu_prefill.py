"""GPU prefill at 8192 tokens, one (backend, model) per process: ours vs KerasHub.

Run by `benchmarks/gpu_prefill.sh`. Both models have the Gemma 2 2B shape
(26 layers, hidden 2304, 8/4 heads, head_dim 256, vocabulary 256000, window
4096) with random bfloat16 weights (separately drawn: speed does not depend
on the values). Timed: the forward over the whole prompt plus the soft-capped
logits of the last position, as `benchmarks/prefill.py` does (a Keras model
run by `predict_on_batch`: XLA on jax, eager under `no_grad` on torch).
Median of `REPEATS` runs after a compiling warm-up; peak device memory from
the backend's allocator.

Usage: `KERAS_BACKEND=jax python benchmarks/gpu_prefill.py ours auto`
(`ours <attention_implementation>` or `keras_hub -`); `--tiny` runs a small
config at 256 tokens, to check the script on a CPU.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from prefill import (  # noqa: E402
    keras_hub_gemma2_backbone,
    last_logits_model,
    median_seconds,
)

REPEATS = 3
LENGTH = 8192
TINY = {
    "vocabulary_size": 512,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "head_dim": 16,
    "sliding_window_size": 64,
}


def config(tiny):
    from keras_gemma2 import get_preset_config

    if tiny:
        return dict(TINY, query_pre_attn_scalar=16)
    return get_preset_config("gemma2_2b_en")


def build(name, implementation, tiny):
    from keras_gemma2 import Gemma2Backbone

    shape = config(tiny)
    if name == "ours":
        return Gemma2Backbone(
            **shape, attention_implementation=implementation, dtype="bfloat16"
        )
    return keras_hub_gemma2_backbone(shape, dtype="bfloat16")


def peak_device_gb():
    backend = keras.config.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
    elif backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 1e9
    return None


def main():
    tiny = "--tiny" in sys.argv
    name, implementation = [arg for arg in sys.argv[1:] if arg != "--tiny"][:2]
    length = 256 if tiny else LENGTH
    backbone = build(name, implementation, tiny)
    model = last_logits_model(backbone, 30.0)
    ids = np.random.default_rng(0).integers(3, backbone.vocabulary_size, (1, length))
    ids[:, 0] = 2
    inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids)}
    start = time.perf_counter()
    model.predict_on_batch(inputs)
    first = time.perf_counter() - start
    seconds = median_seconds(lambda: model.predict_on_batch(inputs), REPEATS)
    print(
        json.dumps(
            {
                "backend": keras.config.backend(),
                "model": name,
                "implementation": implementation,
                "length": length,
                "first_call_s": first,
                "seconds": seconds,
                "tokens_per_s": length / seconds,
                "peak_device_gb": peak_device_gb(),
                "params": backbone.count_params(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

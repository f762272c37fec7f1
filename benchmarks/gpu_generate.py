"""GPU decode speed, one backend per process: ours vs KerasHub, 2B-shaped bf16.

Run by `benchmarks/gpu_generate.sh`. Both models have the Gemma 2 2B shape
(26 layers, hidden 2304, 8/4 heads, head_dim 256, vocabulary 256000) with
random bfloat16 weights (separately drawn: speed does not depend on values;
greedy decoding, no early stop, so both generate exactly the same count).
Tokens/s = new tokens / end-to-end seconds (the 64-token prefill is a small
part of 256 decode steps), median of 2 runs after a compiling warm-up.
"""

import json
import statistics
import sys
import time

import keras
import keras_hub
import numpy as np

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, get_preset_config

PROMPT, NEW, REPEATS = 64, 256, 2


def keras_hub_model():
    config = get_preset_config("gemma2_2b_en")
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=config["vocabulary_size"],
        num_layers=config["num_layers"],
        num_query_heads=config["num_query_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        hidden_dim=config["hidden_dim"],
        intermediate_dim=2 * config["intermediate_dim"],
        head_dim=config["head_dim"],
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=4096,
        dtype="bfloat16",
    )
    return keras_hub.models.GemmaCausalLM(backbone)


def ours_model():
    return Gemma2CausalLM(
        Gemma2Backbone(**get_preset_config("gemma2_2b_en"), dtype="bfloat16")
    )


def inputs(new):
    token_ids = np.zeros((1, PROMPT + new), "int32")
    token_ids[0, :PROMPT] = np.random.default_rng(0).integers(3, 256000, PROMPT)
    mask = np.zeros_like(token_ids)
    mask[0, :PROMPT] = 1
    return {"token_ids": token_ids, "padding_mask": mask}


def seconds(model, new):
    x = inputs(new)
    model.generate(x, stop_token_ids=None)  # compile / warm up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = model.generate(x, stop_token_ids=None)
        keras.ops.convert_to_numpy(out["token_ids"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    backend = keras.config.backend()
    for name, build in (("ours", ours_model), ("keras_hub", keras_hub_model)):
        model = build()
        model.compile(sampler="greedy")
        full, one = seconds(model, NEW), seconds(model, 1)
        print(
            json.dumps(
                {
                    "backend": backend,
                    "model": name,
                    "decode_tokens_per_s": (NEW - 1) / (full - one),
                    "end_to_end_s": full,
                    "params": model.count_params(),
                }
            ),
            flush=True,
        )
        del model
        keras.backend.clear_session()


if __name__ == "__main__":
    sys.exit(main())

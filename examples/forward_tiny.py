"""Forward pass of a small Gemma 2 shaped like the 2B preset, on any backend.

Run: `KERAS_BACKEND=jax python examples/forward_tiny.py` (or tensorflow, torch).
The weights are random: this shows the architecture running end to end until
the project ships a trained tiny preset.
"""

import keras
import numpy as np

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, get_preset_config


def main():
    config = get_preset_config("gemma2_2b_en")
    # Same structure (26 -> 4 layers, GQA 8/4, both caps, alternating windows),
    # every width divided so it runs in a second on a laptop CPU.
    config.update(
        vocabulary_size=1000,
        num_layers=4,
        hidden_dim=144,
        intermediate_dim=576,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window_size=8,
    )
    keras.utils.set_random_seed(0)
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**config))
    token_ids = np.array([[2, 17, 256, 3, 999, 42, 7, 7, 7, 101, 11, 5]], "int32")
    logits = causal_lm.predict(
        {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}, verbose=0
    )
    print(f"backend: {keras.config.backend()}")
    print(f"parameters: {causal_lm.count_params():,}")
    kinds = [
        "local" if block.attention.sliding_window_size else "global"
        for block in causal_lm.backbone.transformer_layers
    ]
    print(f"layers: {kinds}")
    print(
        f"logits shape: {logits.shape}, |max| {np.abs(logits).max():.3f} "
        f"(final soft cap {config['final_logit_soft_cap']})"
    )
    print(f"next-token argmax per position: {logits[0].argmax(-1).tolist()}")


if __name__ == "__main__":
    main()

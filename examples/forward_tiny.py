"""One forward pass of the shipped tiny Gemma 2, on any backend.

Run: `KERAS_BACKEND=jax python examples/forward_tiny.py` (or tensorflow, torch).
It loads the `gemma2_tiny_python` preset that ships with the package (4
layers, every Gemma 2 feature on, trained by `examples/pretrain_tiny.py` on
the Python standard library), runs one forward pass over a Python prompt and
prints the model's most likely next pieces.
"""

import keras
import numpy as np

from keras_gemma2 import Gemma2CausalLM

PROMPT = "def __init__(self"


def main():
    causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    tokenizer = causal_lm.preprocessor.tokenizer
    pieces = keras.ops.convert_to_numpy(tokenizer.tokenize(PROMPT)).tolist()
    token_ids = np.array([[tokenizer.start_token_id, *pieces]], "int32")
    logits = keras.ops.convert_to_numpy(
        causal_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )  # [1, T, vocabulary_size]

    backbone = causal_lm.backbone
    print(f"backend: {keras.config.backend()}")
    print(f"parameters: {causal_lm.count_params():,}")
    kinds = [
        "local" if block.attention.sliding_window_size else "global"
        for block in backbone.transformer_layers
    ]
    print(f"layers: {kinds}")
    print(
        f"logits shape: {logits.shape}, |max| {np.abs(logits).max():.3f} "
        f"(final soft cap {backbone.final_logit_soft_cap})"
    )
    last = logits[0, -1].astype("float64")
    probabilities = np.exp(last - last.max())
    probabilities /= probabilities.sum()
    print(f"prompt: {PROMPT!r}")
    for index in np.argsort(-probabilities)[:5]:
        piece = tokenizer.detokenize([int(index)])
        print(f"  next {piece!r:>12} p={probabilities[index]:.3f}")


if __name__ == "__main__":
    main()

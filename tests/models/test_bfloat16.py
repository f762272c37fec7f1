"""The model runs in bfloat16 and stays close to float32.

Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2%).
Weights, activations and the residual stream are all rounded, and the error
compounds over 4 blocks, so we bound the logit error relative to the logits'
own spread: max |bf16 - f32| <= 0.1 * std(f32 logits) (about 25x one rounding
step of a unit value), and require the top-1 token to agree on >= 90% of
positions. A layer computing in the wrong dtype (or float16 overflow) breaks
both by far; the measured values are printed.
"""

import numpy as np
import pytest
from keras import ops

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights


def test_bfloat16_logits_close_to_float32():
    float32_lm = randomize_weights(
        Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    )
    bfloat16_lm = Gemma2CausalLM(
        Gemma2Backbone(**TINY_BACKBONE_CONFIG, dtype="bfloat16")
    )
    bfloat16_lm.set_weights(float32_lm.get_weights())
    assert bfloat16_lm.backbone.token_embedding.compute_dtype == "bfloat16"
    token_ids = random_token_ids(
        4, 16, TINY_BACKBONE_CONFIG["vocabulary_size"], seed=11
    )
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    expected = float32_lm.predict(inputs, verbose=0)
    actual = ops.convert_to_numpy(ops.cast(bfloat16_lm(inputs), "float32"))
    assert np.isfinite(actual).all()
    error = np.abs(actual - expected).max() / expected.std()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).mean()
    print(f"BF16 max|d|/std={error:.4f} top1_agreement={agreement:.3f}")
    assert error <= 0.1
    assert agreement >= 0.9


def test_float16_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        Gemma2Backbone(**TINY_BACKBONE_CONFIG, dtype="float16")

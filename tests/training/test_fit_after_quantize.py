"""Token-id helpers on a quantized model with its preprocessor attached.

`quantize` locks a torch model's attributes, so helpers that fed token ids by
setting `causal_lm.preprocessor` aside failed there. They now call
`keras.Model.fit` / `predict_on_batch` and leave the model as it is.
"""

import math

import keras
import numpy as np

from keras_gemma2 import Gemma2CausalLM
from keras_gemma2.data import held_out_perplexity
from keras_gemma2.training import fit_on_windows, fit_resumable


def test_window_and_resumable_fits_after_int8_quantize(tmp_path):
    causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    preprocessor = causal_lm.preprocessor
    causal_lm.quantize("int8")
    causal_lm.backbone.enable_lora(2)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    vocabulary = causal_lm.backbone.vocabulary_size
    windows = rng.integers(3, vocabulary, (4, 9)).astype("int32")

    before = held_out_perplexity(causal_lm, windows, batch_size=2)
    curve = fit_on_windows(causal_lm, windows, batch_size=2, log_every=2, verbose=0)
    assert len(curve) == 1 and math.isfinite(curve[0]["loss"])

    x = {"token_ids": windows[:, :-1], "padding_mask": np.ones((4, 8), "int32")}
    result = fit_resumable(
        causal_lm,
        (x, windows[:, 1:]),
        tmp_path / "run",
        epochs=2,
        batch_size=2,
        verbose=0,
    )
    assert result["steps"] == 4
    # Four more steps on the same windows: their perplexity fell.
    assert held_out_perplexity(causal_lm, windows, batch_size=2) < before
    assert causal_lm.preprocessor is preprocessor

"""A KerasHub Gemma 2 preset with its tokenizer loads as ours, text included."""

import keras_hub
import numpy as np
from keras import ops

from keras_gemma2 import Gemma2CausalLM, Gemma2Tokenizer

TEXT = "def add(a, b):\n    return a + b  # ∑ 🙂"


def test_keras_hub_preset_brings_its_tokenizer(gemma_vocabulary, tmp_path):
    tokenizer = keras_hub.models.GemmaTokenizer(proto=gemma_vocabulary)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=32
    )
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=48,
        head_dim=8,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=4,
    )
    preset = str(tmp_path / "keras_hub_preset")
    keras_hub.models.GemmaCausalLM(backbone, preprocessor).save_to_preset(preset)

    ours = Gemma2CausalLM.from_preset(preset)
    assert ours.preprocessor is not None
    assert ours.preprocessor.sequence_length == 32
    expected = ops.convert_to_numpy(tokenizer.tokenize(TEXT))
    actual = ops.convert_to_numpy(ours.preprocessor.tokenizer.tokenize(TEXT))
    np.testing.assert_array_equal(actual, expected)
    alone = Gemma2Tokenizer.from_preset(preset)
    np.testing.assert_array_equal(ops.convert_to_numpy(alone.tokenize(TEXT)), expected)
    assert alone.end_of_turn_token_id == 107

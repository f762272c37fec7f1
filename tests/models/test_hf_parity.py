"""Logits equal HF `Gemma2ForCausalLM` (eager, float32) through `from_preset`."""

import numpy as np
import pytest

from keras_gemma2 import Gemma2CausalLM
from tests.conftest import TINY_HF_CONFIG, hf_logits, random_token_ids

TOLERANCE = 1e-4
VOCABULARY = TINY_HF_CONFIG["vocab_size"]


def ours(directory, token_ids, padding_mask=None):
    causal_lm = Gemma2CausalLM.from_preset(directory)
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    return causal_lm.predict(
        {"token_ids": token_ids, "padding_mask": padding_mask}, verbose=0
    )


def max_difference(directory, model, token_ids, padding_mask=None):
    expected = hf_logits(model, token_ids, padding_mask)
    actual = ours(directory, token_ids, padding_mask)
    assert actual.shape == expected.shape
    if padding_mask is not None:
        valid = np.asarray(padding_mask, bool)
        return float(np.abs(actual - expected)[valid].max())
    return float(np.abs(actual - expected).max())


# Each case changes the tiny config (already off every default) in one respect.
CASES = {
    "shorter_than_window": ({"sliding_window": 16}, 9),
    "longer_than_window": ({"sliding_window": 4}, 23),
    "27b_style_scaling": (
        # heads * head_dim (32) != hidden (48); scalar = hidden / heads, not head_dim.
        {
            "hidden_size": 48,
            "num_attention_heads": 4,
            "head_dim": 8,
            "num_key_value_heads": 2,
            "query_pre_attn_scalar": 12,
        },
        13,
    ),
    "gqa_group_1": ({"num_key_value_heads": 4}, 13),
    "gqa_group_4": ({"num_key_value_heads": 1}, 13),
    "no_soft_caps": (
        {"attn_logit_softcapping": None, "final_logit_softcapping": None},
        13,
    ),
    "released_defaults": (
        {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "query_pre_attn_scalar": 16,
        },
        13,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(hf_checkpoint, case):
    overrides, length = CASES[case]
    directory, model = hf_checkpoint(seed=len(case), **overrides)
    token_ids = random_token_ids(2, length, VOCABULARY, seed=len(case))
    difference = max_difference(directory, model, token_ids)
    print(f"PARITY {case}: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE


def test_caps_are_active_in_the_reference(hf_checkpoint):
    # Guards the test design: with these weights the caps must change HF's logits.
    directory, model = hf_checkpoint(seed=3)
    _, uncapped = hf_checkpoint(
        seed=3, attn_logit_softcapping=None, final_logit_softcapping=None
    )
    token_ids = random_token_ids(1, 12, VOCABULARY)
    capped_logits = hf_logits(model, token_ids)
    assert np.abs(capped_logits - hf_logits(uncapped, token_ids)).max() > 1.0
    assert np.abs(capped_logits).max() > 0.5 * TINY_HF_CONFIG["final_logit_softcapping"]


def test_right_padded_batch(hf_checkpoint):
    directory, model = hf_checkpoint(seed=5, sliding_window=4)
    token_ids = random_token_ids(3, 15, VOCABULARY, seed=5)
    padding_mask = np.ones_like(token_ids)
    padding_mask[0, 9:] = 0
    padding_mask[2, 3:] = 0
    token_ids[padding_mask == 0] = 0
    difference = max_difference(directory, model, token_ids, padding_mask)
    print(f"PARITY right_padding: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE


def test_padding_does_not_change_valid_positions(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=6)
    token_ids = random_token_ids(1, 10, VOCABULARY, seed=6)
    alone = ours(directory, token_ids[:, :7])
    padded_ids = token_ids.copy()
    padded_ids[:, 7:] = 0
    mask = np.ones_like(token_ids)
    mask[:, 7:] = 0
    padded = ours(directory, padded_ids, mask)
    np.testing.assert_allclose(padded[:, :7], alone, atol=1e-5)


def test_sharded_checkpoint(hf_checkpoint):
    directory, model = hf_checkpoint(seed=7, max_shard_size="40KB")
    import os

    shards = [name for name in os.listdir(directory) if name.endswith(".safetensors")]
    assert len(shards) > 1
    assert "model.safetensors.index.json" in os.listdir(directory)
    token_ids = random_token_ids(2, 11, VOCABULARY, seed=7)
    difference = max_difference(directory, model, token_ids)
    print(f"PARITY sharded: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE


def test_bfloat16_checkpoint_loads_exactly(hf_checkpoint, tmp_path):
    import copy

    import torch

    _, model = hf_checkpoint(seed=8)
    # Round the float32 reference's weights to bfloat16 values, and store a
    # bfloat16 copy. (Casting the reference itself would also round HF's
    # RoPE frequency buffer.)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).to(torch.float32))
    directory = str(tmp_path / "bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)
    token_ids = random_token_ids(2, 11, VOCABULARY, seed=8)
    difference = max_difference(directory, model, token_ids)
    print(f"PARITY bfloat16_stored: max|dlogit|={difference:.2e}")
    assert difference <= TOLERANCE


def test_padded_embedding_rows_are_trimmed(hf_checkpoint):
    import os

    from safetensors.numpy import load_file, save_file

    directory, model = hf_checkpoint(seed=9)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    embedding = tensors["model.embed_tokens.weight"]
    padding = np.full((32, embedding.shape[1]), 7.0, embedding.dtype)
    tensors["model.embed_tokens.weight"] = np.concatenate([embedding, padding])
    save_file(tensors, path, metadata={"format": "pt"})
    token_ids = random_token_ids(1, 9, VOCABULARY, seed=9)
    assert max_difference(directory, model, token_ids) <= TOLERANCE

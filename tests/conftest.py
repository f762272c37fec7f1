"""Shared fixtures: random HF Gemma 2 references saved as real checkpoints."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Eight virtual CPU devices for the distribution tests (tests/distribution),
# set before JAX creates its CPU client. Everything else runs on device 0.
VIRTUAL_DEVICES = 8
_DEVICE_COUNT_FLAG = f"--xla_force_host_platform_device_count={VIRTUAL_DEVICES}"
if os.environ.get("KERAS_BACKEND", "jax") == "jax" and (
    "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_COUNT_FLAG
    ).strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# A tiny config with every Gemma 2 feature on and every value off its default:
# window shorter than the test sequences, GQA, caps small enough to bite,
# query_pre_attn_scalar != head_dim, unusual theta and eps.
TINY_HF_CONFIG = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 12,
    "sliding_window": 5,
    "attn_logit_softcapping": 4.0,
    "final_logit_softcapping": 6.0,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500.0,
    "max_position_embeddings": 128,
}


def randomize_hf_model(model, seed):
    """Give every HF parameter, norms included, a scale where caps and norms matter."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                std = 0.5
            elif "embed" in name:
                std = 1.0
            else:
                std = 2.0 / parameter.shape[-1] ** 0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def make_hf_model(seed=0, **overrides):
    """A random float32 `Gemma2ForCausalLM` with eager (soft-capped) attention."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**{**TINY_HF_CONFIG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config).eval()
    return randomize_hf_model(model, seed)


def hf_logits(model, token_ids, padding_mask=None):
    """Reference logits `[B, T, V]` as float32 numpy."""
    import torch

    kwargs = {}
    if padding_mask is not None:
        kwargs["attention_mask"] = torch.tensor(
            np.asarray(padding_mask), dtype=torch.long
        )
    with torch.no_grad():
        output = model(torch.tensor(np.asarray(token_ids), dtype=torch.long), **kwargs)
    return output.logits.float().numpy()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random HF model; return `(directory, model)`."""

    def make(seed=0, max_shard_size=None, **overrides):
        model = make_hf_model(seed=seed, **overrides)
        directory = tmp_path / f"hf_{seed}_{len(os.listdir(tmp_path))}"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(directory, **kwargs)
        return str(directory), model

    return make


def random_token_ids(batch, length, vocabulary_size, seed=0):
    """Int32 token ids `[batch, length]` from a fixed seed."""
    return (
        np.random.RandomState(seed)
        .randint(0, vocabulary_size, (batch, length))
        .astype("int32")
    )


# Keras-side tiny config with every feature on and every value off its default.
TINY_BACKBONE_CONFIG = {
    "vocabulary_size": 96,
    "num_layers": 4,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "hidden_dim": 32,
    "intermediate_dim": 48,
    "head_dim": 16,
    "query_pre_attn_scalar": 12,
    "attention_logit_soft_cap": 4.0,
    "final_logit_soft_cap": 6.0,
    "sliding_window_size": 5,
    "layer_norm_epsilon": 1e-5,
    "rope_max_wavelength": 500.0,
}


def randomize_weights(model, seed=0):
    """Random weights, norm scales included, big enough for caps and norms to matter."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "scale" in variable.path:
            value = rng.normal(0.0, 0.5, shape)
        elif "embeddings" in variable.path:
            value = rng.normal(0.0, 1.0, shape)
        else:
            value = rng.normal(0.0, 2.0 / np.sqrt(shape[0]), shape)
        variable.assign(value.astype("float32"))
    return model


# Session fixture `gemma_vocabulary`: a small Gemma-style SentencePiece model.
from tests.text_fixtures import gemma_vocabulary  # noqa: E402, F401

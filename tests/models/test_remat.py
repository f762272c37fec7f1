"""`Gemma2Backbone(remat=True)`: same loss and gradients, less memory, config."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2DecoderBlock
from keras_gemma2.layers import attention_causal_blocked, attention_dispatch
from keras_gemma2.models.backbone import JAX_CPU_REMAT_FLAG
from tests.conftest import TINY_BACKBONE_CONFIG

BACKEND = keras.config.backend()


def _causal_lm(remat, dtype=None):
    keras.utils.set_random_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the JAX CPU flag warning
        backbone = Gemma2Backbone(**TINY_BACKBONE_CONFIG, remat=remat, dtype=dtype)
    return Gemma2CausalLM(backbone)


def _batch(length=12):
    rng = np.random.default_rng(0)
    token_ids = rng.integers(3, 96, (2, length)).astype("int32")
    padding_mask = np.ones((2, length), "int32")
    padding_mask[1, length - 4 :] = 0  # right padding
    labels = np.roll(token_ids, -1, axis=1)
    return {"token_ids": token_ids, "padding_mask": padding_mask}, labels


def loss_and_gradients(causal_lm, inputs, labels):
    """Masked mean cross-entropy and its gradients (numpy), on this backend."""
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = inputs["padding_mask"].astype("float32")

    def loss_of(outputs):
        return loss_function(labels, outputs, sample_weight=weights)

    variables = causal_lm.trainable_variables
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in causal_lm.non_trainable_variables]

        def loss(values):
            outputs, _ = causal_lm.stateless_call(
                values, non_trainable, inputs, training=True
            )
            return loss_of(outputs)

        value, grads = jax.jit(jax.value_and_grad(loss))([v.value for v in variables])
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function  # as `fit` runs it; remat is `tf.recompute_grad`
        def step():
            with tf.GradientTape() as tape:
                value = loss_of(causal_lm(inputs, training=True))
            return value, tape.gradient(value, variables)

        value, grads = step()
    else:
        value = loss_of(causal_lm(inputs, training=True))
        value.backward()
        grads = [v.value.grad for v in variables]
    return float(keras.ops.convert_to_numpy(value)), [
        keras.ops.convert_to_numpy(g) for g in grads
    ]


def test_remat_gives_the_same_loss_and_gradients(monkeypatch):
    """Rematerialized blocks change memory, not numbers (float32 tolerance)."""
    remat_calls = []
    original_remat = keras.remat

    def counting_remat(function):
        remat_calls.append(function)
        return original_remat(function)

    monkeypatch.setattr(keras, "remat", counting_remat)
    # Global layers take the causal blocked kernel (blocks of 4 of 12 tokens),
    # whose query blocks are rematerialized too.
    monkeypatch.setattr(attention_dispatch, "GLOBAL_BLOCK_SIZE", 4)
    monkeypatch.setattr(attention_causal_blocked, "GLOBAL_BLOCK_SIZE", 4)
    inputs, labels = _batch()
    plain = _causal_lm(remat=False)
    rematerialized = _causal_lm(remat=True)
    rematerialized.set_weights(plain.get_weights())

    plain_loss, plain_grads = loss_and_gradients(plain, inputs, labels)
    assert not remat_calls
    remat_loss, remat_grads = loss_and_gradients(rematerialized, inputs, labels)
    # Every block, and each query block of the global layers, went through
    # `keras.remat` (torch may trace twice).
    layers = TINY_BACKBONE_CONFIG["num_layers"]
    names = [function.__name__ for function in remat_calls]
    assert names.count("forward") >= layers
    assert names.count("block_attention") >= 3 * (layers // 2)

    assert np.isfinite(plain_loss) and plain_loss > 1.0
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    assert len(remat_grads) == len(plain_grads) == len(plain.trainable_variables)
    for variable, plain_grad, remat_grad in zip(
        plain.trainable_variables, plain_grads, remat_grads, strict=True
    ):
        scale = np.abs(plain_grad).max()
        assert scale > 0, variable.path
        np.testing.assert_allclose(
            remat_grad, plain_grad, rtol=0, atol=1e-5 * scale, err_msg=variable.path
        )


def test_remat_round_trips_through_config_and_is_validated():
    backbone = _causal_lm(remat=True).backbone
    config = backbone.get_config()
    assert config["remat"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = Gemma2Backbone.from_config(json.loads(json.dumps(config)))
    assert restored.remat is True
    assert all(block.remat for block in restored.transformer_layers)
    assert Gemma2Backbone(**TINY_BACKBONE_CONFIG).get_config()["remat"] is False
    block_config = restored.transformer_layers[0].get_config()
    assert Gemma2DecoderBlock.from_config(block_config).remat is True

    with pytest.raises(TypeError, match=r"`remat`.*Received: remat='yes'"):
        Gemma2Backbone(**TINY_BACKBONE_CONFIG, remat="yes")
    with pytest.raises(TypeError, match=r"`remat`.*Received: remat=1"):
        Gemma2DecoderBlock(
            intermediate_dim=8,
            num_query_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            query_pre_attn_scalar=4,
            attention_logit_soft_cap=None,
            sliding_window_size=None,
            remat=1,
        )


def test_remat_warns_on_jax_cpu_without_the_scheduler_flag():
    """The warning fires exactly where remat would silently save nothing."""
    expect_warning = BACKEND == "jax" and JAX_CPU_REMAT_FLAG not in os.environ.get(
        "XLA_FLAGS", ""
    )
    if BACKEND == "jax":
        import jax

        expect_warning = expect_warning and jax.default_backend() == "cpu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Gemma2Backbone(**TINY_BACKBONE_CONFIG, remat=True)
    messages = [str(w.message) for w in caught if JAX_CPU_REMAT_FLAG in str(w.message)]
    assert len(messages) == (1 if expect_warning else 0), messages


_MEMORY_PROBE = """
import json, keras, jax, numpy as np
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
config = dict(vocabulary_size=256, num_layers=4, num_query_heads=4,
              num_key_value_heads=2, hidden_dim=64, intermediate_dim=256,
              head_dim=16, sliding_window_size=64)
inputs = {"token_ids": np.ones((1, 512), "int32"),
          "padding_mask": np.ones((1, 512), "int32")}
loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
sizes = {}
for remat in (False, True):
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**config, remat=remat))
    fixed = [v.value for v in causal_lm.non_trainable_variables]
    def loss(values):
        logits, _ = causal_lm.stateless_call(values, fixed, inputs, training=True)
        return loss_function(inputs["token_ids"], logits)
    values = [v.value for v in causal_lm.trainable_variables]
    compiled = jax.jit(jax.grad(loss)).lower(values).compile()
    sizes[remat] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps({"plain": sizes[False], "remat": sizes[True]}))
"""


def test_remat_shrinks_the_compiled_jax_cpu_training_step():
    """XLA's own memory analysis of the jitted gradient: temporaries shrink.

    Runs in a fresh JAX process (whatever this suite's backend) because the
    scheduler flag is read only when JAX creates its CPU client.
    """
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": JAX_CPU_REMAT_FLAG,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sizes["remat"] < 0.6 * sizes["plain"], sizes

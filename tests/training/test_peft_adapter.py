"""PEFT LoRA adapters both ways, against real `transformers` + `peft`.

Export: our adapter saved with `format="peft"`, applied by
`peft.PeftModel.from_pretrained` to `Gemma2ForCausalLM` loaded from our
`export_to_transformers`, gives our logits. Import: an adapter made and
randomized in `peft` loads into our model converted from the same HF
checkpoint and gives the `PeftModel`'s logits. Both in float32, eager
attention, within `TOLERANCE`.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.training import lora
from tests.conftest import (
    TINY_BACKBONE_CONFIG,
    TINY_HF_CONFIG,
    hf_logits,
    make_hf_model,
    random_token_ids,
    randomize_weights,
)

TOLERANCE = 1e-4
VOCABULARY = TINY_HF_CONFIG["vocab_size"]
# Longer than the sliding window (5): local and global layers differ.
TOKEN_IDS = random_token_ids(2, 12, VOCABULARY, seed=5)


def our_logits(causal_lm):
    inputs = {"token_ids": TOKEN_IDS, "padding_mask": np.ones_like(TOKEN_IDS)}
    return keras.ops.convert_to_numpy(causal_lm(inputs))


def load_hf(directory):
    from transformers import Gemma2ForCausalLM

    return Gemma2ForCausalLM.from_pretrained(
        directory, attn_implementation="eager", torch_dtype="float32"
    ).eval()


def test_exported_adapter_gives_our_logits_in_peft(tmp_path):
    from peft import PeftModel

    causal_lm = Gemma2CausalLM(Gemma2Backbone(**TINY_BACKBONE_CONFIG))
    randomize_weights(causal_lm, seed=2)
    causal_lm.export_to_transformers(str(tmp_path / "base"))  # before LoRA
    backbone = causal_lm.backbone
    backbone.enable_lora(3, "all", alpha=5)
    rng = np.random.RandomState(7)
    for _, _, layer in lora.adapted_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            shape = tuple(variable.shape)
            variable.assign(rng.normal(0, 0.2, shape).astype("float32"))
    ours = our_logits(causal_lm)
    adapter = str(tmp_path / "adapter")
    backbone.save_lora_weights(adapter, format="peft", base_model_name_or_path="base")

    with open(os.path.join(adapter, "adapter_config.json")) as file:
        config = json.load(file)
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    assert (config["r"], config["lora_alpha"]) == (3, 5)
    assert config["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * TINY_HF_CONFIG["num_hidden_layers"]
    key = "base_model.model.model.layers.3.self_attn.q_proj.lora_{}.weight"
    assert tensors[key.format("A")].shape == (3, 32)  # [r, hidden]
    assert tensors[key.format("B")].shape == (64, 3)  # [heads * head_dim, r]

    base = load_hf(str(tmp_path / "base"))
    without_adapter = hf_logits(base, TOKEN_IDS)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    theirs = hf_logits(peft_model, TOKEN_IDS)
    difference = float(np.abs(ours - theirs).max())
    print(f"PEFT export: max |logit difference| = {difference:.2e}")
    assert difference <= TOLERANCE
    assert np.abs(theirs - without_adapter).max() > 0.1  # the adapter matters


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """An HF checkpoint and a randomized PEFT adapter for it, with PEFT's logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    directory = tmp_path_factory.mktemp("peft")
    model = make_hf_model(seed=3)
    model.save_pretrained(directory / "base")
    config = LoraConfig(
        r=4,
        lora_alpha=7,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(noise * 0.2)
    peft_model.save_pretrained(directory / "adapter")
    return str(directory), hf_logits(peft_model, TOKEN_IDS)


def test_peft_adapter_loads_with_peft_logits(peft_adapter, tmp_path):
    directory, expected = peft_adapter
    causal_lm = Gemma2CausalLM.from_preset(os.path.join(directory, "base"))
    causal_lm.backbone.load_lora_weights(os.path.join(directory, "adapter"))
    state = lora.lora_state(causal_lm.backbone)
    assert (state.rank, state.alpha) == (4, 7)
    assert state.targets == ("query", "value", "attention_output", "up", "down")
    difference = float(np.abs(our_logits(causal_lm) - expected).max())
    print(f"PEFT import: max |logit difference| = {difference:.2e}")
    assert difference <= TOLERANCE

    # Written back, it holds PEFT's own tensors.
    causal_lm.backbone.save_lora_weights(str(tmp_path / "again"), format="peft")
    original = load_file(
        os.path.join(directory, "adapter", "adapter_model.safetensors")
    )
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(again[key], value)


def _edited_adapter(source, destination, config=None, tensors=None):
    """Copy PEFT adapter `source`, then apply the edit functions."""
    shutil.copytree(source, destination)
    if config is not None:
        path = os.path.join(destination, "adapter_config.json")
        with open(path) as file:
            values = json.load(file)
        config(values)
        with open(path, "w") as file:
            json.dump(values, file)
    if tensors is not None:
        path = os.path.join(destination, "adapter_model.safetensors")
        values = load_file(path)
        tensors(values)
        save_file(values, path)
    return str(destination)


QPROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _rename_layer(values):
    values[QPROJ_A.replace("layers.0", "layers.4")] = values.pop(QPROJ_A)


def _add_embedding(values):
    values["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros(
        (4, VOCABULARY), "float32"
    )


def _drop_b(values):
    del values[QPROJ_A.replace("lora_A", "lora_B")]


BAD_ADAPTERS = {
    "rank": ({"config": lambda c: c.update(r=8)}, "with r=8 from adapter_config.json"),
    "dora": ({"config": lambda c: c.update(use_dora=True)}, "use_dora"),
    "rslora": ({"config": lambda c: c.update(use_rslora=True)}, "use_rslora"),
    "bias": ({"config": lambda c: c.update(bias="all")}, "bias='all'"),
    "modules_to_save": (
        {"config": lambda c: c.update(modules_to_save=["lm_head"])},
        "modules_to_save",
    ),
    "not_lora": ({"config": lambda c: c.update(peft_type="IA3")}, "'IA3'"),
    "layer_past_num_layers": ({"tensors": _rename_layer}, "layers.4.self_attn"),
    "embedding": ({"tensors": _add_embedding}, "embed_tokens"),
    "half_a_pair": ({"tensors": _drop_b}, "lacks lora_A or lora_B"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_unmappable_peft_adapters_change_nothing(peft_adapter, tmp_path, case):
    directory, _ = peft_adapter
    edits, match = BAD_ADAPTERS[case]
    adapter = _edited_adapter(
        os.path.join(directory, "adapter"), tmp_path / "adapter", **edits
    )
    backbone = Gemma2Backbone(**TINY_BACKBONE_CONFIG)
    before = [keras.ops.convert_to_numpy(v).copy() for v in backbone.weights]
    with pytest.raises(ValueError, match=match):
        backbone.load_lora_weights(adapter)
    assert lora.lora_state(backbone) is None
    after = [keras.ops.convert_to_numpy(v) for v in backbone.weights]
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def test_adapter_for_another_architecture_is_refused(peft_adapter, tmp_path):
    directory, _ = peft_adapter
    # Shapes: the same adapter on a narrower model.
    narrower = Gemma2Backbone(**{**TINY_BACKBONE_CONFIG, "hidden_dim": 24})
    with pytest.raises(ValueError, match="another model"):
        narrower.load_lora_weights(os.path.join(directory, "adapter"))
    assert lora.lora_state(narrower) is None
    # Declared base model: a local checkpoint that is not Gemma 2.
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter = _edited_adapter(
        os.path.join(directory, "adapter"),
        tmp_path / "adapter",
        config=lambda c: c.update(base_model_name_or_path=str(llama)),
    )
    backbone = Gemma2Backbone(**TINY_BACKBONE_CONFIG)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        backbone.load_lora_weights(adapter)
    assert lora.lora_state(backbone) is None
    # Into a model with other adapters enabled: refused, adapters kept.
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="rank 4 .* rank 2"):
        backbone.load_lora_weights(os.path.join(directory, "adapter"))
    assert lora.lora_state(backbone).rank == 2
    unweighted = _edited_adapter(
        os.path.join(directory, "adapter"), tmp_path / "unweighted"
    )
    os.remove(os.path.join(unweighted, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        Gemma2Backbone(**TINY_BACKBONE_CONFIG).load_lora_weights(unweighted)

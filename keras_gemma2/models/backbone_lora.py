"""LoRA methods of `Gemma2Backbone`: thin facades over `keras_gemma2.training`."""

import os


class Gemma2LoraMethods:
    """Mixin holding `Gemma2Backbone`'s LoRA API.

    The work happens in `keras_gemma2.training.lora` (adapters, merge, the
    `.lora.h5` format) and `keras_gemma2.training.peft_adapter` (PEFT).
    """

    def default_lora_layer_names(self):
        """The layers `enable_lora(rank)` targets: `["query", "value"]`."""
        from keras_gemma2.training.lora import DEFAULT_TARGETS

        return list(DEFAULT_TARGETS)

    def enable_lora(self, rank, target_names=None, alpha=None, target_layer_names=None):
        """Freeze the backbone and add trainable low-rank adapters.

        Each targeted projection `W` (read as a matrix `[in, out]`) gets
        `A` `[in, rank]` (He-uniform) and `B` `[rank, out]` (zeros) and
        computes with `W + (alpha / rank) * A @ B`: the same update as Hugging
        Face PEFT's LoRA, so `rank * (in + out)` trainable parameters per
        projection and block, and adapters move to and from PEFT (see
        `save_lora_weights`). Every other weight is frozen. Works on float,
        int8- and int4-quantized projections (QLoRA: quantize first). All
        arguments are checked before anything changes.

        Args:
            rank: int. Rank of the adapters, positive.
            target_names: `None`, `"all"` or a list of names. `None` targets
                query and value (KerasHub's default); `"all"` adds key,
                the attention output and the three feed-forward projections.
                Names may be ours (`"query"`, `"key"`, `"value"`,
                `"attention_output"`, `"gate"`, `"up"`, `"down"`), KerasHub
                Gemma's (`"ffw_gating"`, `"ffw_gating_2"`, `"ffw_linear"`)
                or PEFT's (`"q_proj"`, `"k_proj"`, `"v_proj"`, `"o_proj"`,
                `"gate_proj"`, `"up_proj"`, `"down_proj"`). Defaults to
                `None`.
            alpha: float. Scales the update by `alpha / rank` (PEFT's
                `lora_alpha`, Keras' `lora_alpha`). Defaults to `rank`.
            target_layer_names: KerasHub's spelling of `target_names`.

        Raises:
            ValueError: `rank` is not a positive integer, a name matches no
                projection, or LoRA is already enabled (`merge_lora` first).

        Example:

        >>> import numpy as np
        >>> from keras_gemma2 import Gemma2Backbone
        >>> backbone = Gemma2Backbone(
        ...     vocabulary_size=64, num_layers=2, num_query_heads=4,
        ...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        ...     head_dim=8, sliding_window_size=4)
        >>> backbone.enable_lora(2, ["q_proj", "ffw_gating"])
        >>> # 2 blocks * (query 2 * (16 + 4 * 8) + gate 2 * (16 + 32))
        >>> sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
        384
        """
        from keras_gemma2.training import lora

        if target_layer_names is not None:
            if target_names is not None:
                raise ValueError(
                    "Pass `target_names` or `target_layer_names`, not both. "
                    f"Received: target_names={target_names!r}, "
                    f"target_layer_names={target_layer_names!r}"
                )
            target_names = target_layer_names
        lora.enable(self, rank, target_names, alpha=alpha)

    def merge_lora(self):
        """Fold the adapters into the kernels and remove them.

        Each adapted kernel becomes `W + (alpha / rank) * A @ B` (computed in
        float32, stored in the kernel's dtype), the adapter variables are
        removed and the trainable flags return to what they were before
        `enable_lora`. The model then computes the same outputs as before the
        merge and saves, exports and loads as a plain `Gemma2Backbone`.

        Quantized (int8/int4) projections are refused with a `ValueError`
        before anything changes: re-quantizing a merged kernel would round
        the adapter's small update away. Keep the adapter separate
        (`save_lora_weights`), or load it onto the float model, merge there
        and quantize after.

        Raises:
            ValueError: LoRA is not enabled, or an adapted projection is
                quantized.

        Example:

        >>> import numpy as np
        >>> from keras_gemma2 import Gemma2Backbone
        >>> backbone = Gemma2Backbone(
        ...     vocabulary_size=64, num_layers=2, num_query_heads=4,
        ...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        ...     head_dim=8, sliding_window_size=4)
        >>> backbone.enable_lora(2)
        >>> layer = backbone.transformer_layers[0].attention.query_dense
        >>> _ = layer.lora_kernel_b.assign(np.ones((2, 32), "float32"))
        >>> inputs = {"token_ids": np.ones((1, 5), "int32"),
        ...           "padding_mask": np.ones((1, 5), "int32")}
        >>> before = backbone.predict(inputs, verbose=0)
        >>> backbone.merge_lora()
        >>> after = backbone.predict(inputs, verbose=0)
        >>> bool(np.allclose(before, after, atol=1e-5))
        True
        >>> len(backbone.trainable_weights) == len(backbone.weights)
        True
        """
        from keras_gemma2.training import lora

        _require_lora(self, "merge_lora")
        lora.detach(self, merge=True)

    def save_lora_weights(self, filepath, format="keras", base_model_name_or_path=None):
        """Save the adapters alone, as a Keras `.lora.h5` file or for PEFT.

        `format="keras"` writes `filepath` (which must end in `.lora.h5`, as
        in KerasHub) with the rank, alpha, targets and each adapter.
        `format="peft"` writes the directory `filepath` with
        `adapter_config.json` (LoRA, `r`, `lora_alpha`, Hugging Face
        `target_modules`, task `CAUSAL_LM`) and `adapter_model.safetensors`,
        which `peft.PeftModel.from_pretrained` applies to a
        `transformers.Gemma2ForCausalLM` of the base weights (e.g. the
        original checkpoint, or `export_to_transformers` before
        `enable_lora`; an export with LoRA enabled holds merged kernels).
        Both are written atomically and replace an existing `filepath`.

        Args:
            filepath: string. The `.lora.h5` file, or the PEFT directory.
            format: string. `"keras"` or `"peft"`. Defaults to `"keras"`.
            base_model_name_or_path: optional string recorded in the PEFT
                config. Defaults to `None`.

        Example:

        ```python
        causal_lm.backbone.save_lora_weights("adapter.lora.h5")
        causal_lm.backbone.save_lora_weights("adapter_peft", format="peft")
        ```
        """
        from keras_gemma2.training import lora

        if format not in ("keras", "peft"):
            raise ValueError(
                "Received an invalid value for `format`, expected 'keras' or "
                f"'peft'. Received: format={format!r}"
            )
        _require_lora(self, "save_lora_weights")
        if format == "keras":
            lora.save_keras_file(self, filepath)
        else:
            from keras_gemma2.training.peft_adapter import save_peft_adapter

            save_peft_adapter(self, filepath, base_model_name_or_path)

    def load_lora_weights(self, filepath):
        """Load adapters saved by `save_lora_weights` or by Hugging Face PEFT.

        A directory with `adapter_config.json` is read as a PEFT LoRA
        adapter (for `Gemma2ForCausalLM`); a `.lora.h5` file as ours. If
        LoRA is not enabled, it is enabled with the file's rank, alpha and
        targets; if it is, they must match. Everything is checked before
        any variable changes, so a failed load leaves the model as it was.

        Args:
            filepath: string. A `.lora.h5` file or a PEFT adapter directory.

        Raises:
            FileNotFoundError: `filepath` or a file in the directory is
                missing.
            ValueError: another rank, targets or shapes; PEFT modules or
                settings that do not map onto Gemma 2 (embeddings, the head,
                `modules_to_save`, DoRA, biases, rsLoRA, layers past
                `num_layers`); a base model that is not Gemma 2.

        Example:

        ```python
        causal_lm = Gemma2CausalLM.from_preset("/path/to/gemma-2-2b")
        causal_lm.backbone.load_lora_weights("/path/to/peft_adapter")
        ```
        """
        from keras_gemma2.training import lora

        filepath = os.fspath(filepath)
        if not os.path.exists(filepath):
            raise FileNotFoundError(
                f"No LoRA adapter at {filepath}: expected a `.lora.h5` file or a "
                "PEFT adapter directory."
            )
        if os.path.isdir(filepath):
            from keras_gemma2.training.peft_adapter import (
                CONFIG_FILE,
                read_peft_adapter,
            )

            if not os.path.isfile(os.path.join(filepath, CONFIG_FILE)):
                raise FileNotFoundError(
                    f"The directory {filepath} has no {CONFIG_FILE}; a PEFT "
                    "adapter directory needs one."
                )
            arrays, rank, targets, alpha = read_peft_adapter(self, filepath)
        elif filepath.endswith(lora.KERAS_SUFFIX):
            arrays, rank, targets, alpha = lora.read_keras_file(filepath)
        else:
            raise ValueError(
                "Received an invalid value for `filepath`, expected a file "
                f"ending in `{lora.KERAS_SUFFIX}` or a PEFT adapter directory. "
                f"Received: filepath={filepath}"
            )
        lora.assign_adapters(self, arrays, rank, targets, alpha, filepath)


def _require_lora(backbone, method):
    if getattr(backbone, "_lora_state", None) is None:
        raise ValueError(
            f"`{method}()` needs LoRA adapters, and this backbone has none. Call "
            "`enable_lora(rank)` (or `load_lora_weights`) first."
        )

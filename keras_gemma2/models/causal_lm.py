"""Gemma2CausalLM: the backbone plus the tied, soft-capped output projection."""

import functools

import keras
import keras_hub
from keras import ops

from keras_gemma2.layers import loop_matrices
from keras_gemma2.layers.gemma2_math import embedding_scale
from keras_gemma2.layers.int8_products import int8_head_applies, int8_head_logits
from keras_gemma2.layers.last_axis_product import last_axis_product
from keras_gemma2.layers.soft_capping import SoftCap
from keras_gemma2.layers.validation import (
    check_token_inputs,
    check_token_shapes,
    check_token_values,
    host_values,
)
from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.causal_lm_inputs import Gemma2InputChecks
from keras_gemma2.models.causal_lm_training import Gemma2TrainingMethods
from keras_gemma2.models.preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.models.presets import bundled_presets, classproperty


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLM(
    Gemma2InputChecks, Gemma2TrainingMethods, keras_hub.models.CausalLM
):
    """Gemma 2 language model: next-token logits for every position.

    Logits are the final hidden states times the transposed token embedding,
    then soft-capped with `backbone.final_logit_soft_cap`:
    `cap * tanh(logits / cap)`.

    Inputs are checked before anything runs, the same way on every backend:
    `token_ids` must be an integer `[batch, T]` tensor, `padding_mask` of the
    same shape, and every id in `[0, vocabulary_size)`; a `ValueError` names
    the first bad id, its `[row, column]` and the vocabulary size. Ids are
    checked on the host wherever they have values: direct calls with numpy
    or eager tensors, `fit`/`evaluate`/`predict` data, `score`, `generate`.
    Symbolic or traced ids (inside `jax.jit`, `tf.function`,
    `torch.compile`) get only the shape and dtype checks; see
    `keras_gemma2.models.causal_lm_inputs`.

    Args:
        backbone: `Gemma2Backbone`.
        preprocessor: optional preprocessor; `None` means the model takes a
            dict of `"token_ids"` and `"padding_mask"` directly.

    Example:

    >>> import numpy as np
    >>> backbone = Gemma2Backbone(
    ...     vocabulary_size=64, num_layers=2, num_query_heads=4,
    ...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
    ...     head_dim=8, sliding_window_size=4)
    >>> causal_lm = Gemma2CausalLM(backbone)
    >>> logits = causal_lm.predict(
    ...     {"token_ids": np.array([[2, 5, 9]], "int32"),
    ...      "padding_mask": np.ones((1, 3), "int32")}, verbose=0)
    >>> logits.shape
    (1, 3, 64)
    """

    backbone_cls = Gemma2Backbone
    preprocessor_cls = Gemma2CausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # Written by `get_config` after `quantize`; read back by `load_model`.
        quantization = kwargs.pop("quantization", None)
        if not isinstance(backbone, Gemma2Backbone):
            raise TypeError(
                "Received an invalid value for `backbone`, expected a "
                f"`Gemma2Backbone`. Received: backbone={type(backbone).__name__}"
            )
        tokenizer = getattr(preprocessor, "tokenizer", None)
        # A preset loader attaches the vocabulary after construction.
        if getattr(tokenizer, "proto", None) is not None:
            pieces = tokenizer.vocabulary_size()
            if pieces != backbone.vocabulary_size:
                raise ValueError(
                    f"The tokenizer has {pieces} pieces but the backbone's embedding "
                    f"has vocabulary_size={backbone.vocabulary_size} rows; they must "
                    "be equal (a tokenizer from another model?)."
                )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.logit_soft_cap = SoftCap(
            backbone.final_logit_soft_cap,
            dtype=backbone.dtype_policy,
            name="final_logit_soft_cap",
        )

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        outputs = self.logit_soft_cap(logits)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self._quantization = None
        if quantization is not None:
            self._restore_quantization(quantization)
        self._check_modes_before_keras()

    def _check_modes_before_keras(self):
        """Put the supported-mode check in front of Keras' own.

        Keras wraps `quantize` per instance (in `Layer.__new__`) with a check
        that accepts every Keras mode, `"float8"`, `"gptq"` and `"awq"`
        included, and words its errors for those; refuse them first.
        """
        from keras_gemma2.models.quantization import resolve_mode

        keras_quantize = self.quantize

        @functools.wraps(keras_quantize)
        def quantize(mode=None, config=None, **kwargs):
            resolve_mode(mode, config)
            return keras_quantize(mode=mode, config=config, **kwargs)

        self.quantize = quantize

    @classproperty
    def presets(cls):
        """Presets shipped with keras_gemma2: `{name: {"path", "metadata"}}`."""
        return bundled_presets()

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantize the backbone's weights in place: `"int8"` or `"int4"`.

        Keras' `Model.quantize`, restricted to the backbone (the token
        embedding, which is also the tied output head, and every attention
        and feed-forward projection); the preprocessor is left alone. Norm
        scales stay float.

        - `"int8"`: int8 weights with one scale per output channel, and
          activations quantized to int8 per token (Keras' default).
        - `"int4"`: projections hold int4 weights with a scale and zero point
          per block of 128 input rows (`keras.quantizers.
          Int4QuantizationConfig(block_size=128)`, weight-only); the
          embedding and head stay int8, because int4 there costs the most
          accuracy (measured table in `keras_gemma2.models.quantization`).

        Quantize first, then `backbone.enable_lora(rank)` to fine-tune
        adapters over the frozen quantized base (QLoRA). Everything is
        checked before any layer changes, so a refused call leaves the model
        as it was.

        Args:
            mode: `"int8"` or `"int4"`. Optional when `config` is given.
            config: optional `keras.quantizers.Int8QuantizationConfig` or
                `Int4QuantizationConfig` for the projections (with
                `"int4"`, the embedding stays default int8).
            filters: optional regex string, list of regex strings, or
                callable on a layer, selecting the backbone layers to
                quantize (Keras' `filters`). Defaults to all of them.
            **kwargs: `type_check` (bool, default `True`), as in Keras.

        Example:

        >>> import numpy as np
        >>> backbone = Gemma2Backbone(
        ...     vocabulary_size=64, num_layers=2, num_query_heads=4,
        ...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        ...     head_dim=8, sliding_window_size=4)
        >>> causal_lm = Gemma2CausalLM(backbone)
        >>> causal_lm.quantize("int4")
        >>> backbone.transformer_layers[0].ffw.down_dense.quantization_mode
        'int4'
        >>> backbone.token_embedding.quantization_mode
        'int8'
        """
        from keras_gemma2.models.quantization import quantize_backbone_layers

        type_check = kwargs.pop("type_check", True)
        if kwargs:
            raise TypeError(
                "Unrecognized keyword arguments passed to `quantize`: "
                f"{sorted(kwargs)}. Expected `mode`, `config`, `filters`, "
                "`type_check`."
            )
        mode = quantize_backbone_layers(self, mode, config, filters, type_check)
        self._quantization = {
            "mode": mode,
            "config": keras.saving.serialize_keras_object(config),
        }
        # Traced training, evaluation and generation functions hold the old
        # variables; Keras' `Model.quantize` drops them the same way.
        self.train_function = None
        self.test_function = None
        self.predict_function = None
        self._post_quantize(mode)

    def get_config(self):
        config = super().get_config()
        if self._quantization is not None:
            config["quantization"] = self._quantization
        return config

    def _restore_quantization(self, quantization):
        from keras_gemma2.models.quantization import restore_activation_quantizers

        config = keras.saving.deserialize_keras_object(quantization["config"])
        restore_activation_quantizers(self.backbone, quantization["mode"], config)
        self._quantization = quantization

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Logits for `token_ids` at `cache_update_index`, updating the cache.

        Args:
            token_ids: int tensor `[batch, T]`.
            cache: tuple with one `(key_cache, value_cache)` pair per layer,
                each `[batch, num_key_value_heads, slots, head_dim]` (rings
                for local layers); see `keras_gemma2.generation.kv_cache`.
            cache_update_index: int scalar, position of the first token.

        Returns:
            `(logits [batch, T, vocabulary_size], hidden_states, cache)`.
        """
        hidden_states, cache = self.backbone.compute_hidden_states(
            token_ids, cache=cache, cache_update_index=cache_update_index
        )
        return self.head_logits(hidden_states), hidden_states, cache

    def head_logits(self, hidden_states):
        """Soft-capped logits `[batch, T, vocabulary_size]` of final hidden states.

        The tied head of `call_with_cache`: `hidden_states` `[batch, T,
        hidden_dim]` are the backbone's normalized outputs.
        """
        embedding = self.backbone.token_embedding
        carried = loop_matrices.lookup(embedding)  # set inside generation
        if carried is not None:
            columns = carried["columns"]  # [D, V]
            rows = ops.cast(hidden_states, columns.dtype)
            logits = ops.cast(ops.matmul(rows, columns), hidden_states.dtype)
        elif embedding.quantization_mode is None:
            # Contracting the table's own last axis lets XLA read it in place;
            # `reverse=True` transposes it first, and XLA copies all of it at
            # every decode step (measured: 4.4 of 15 ms per token, jax CPU).
            table = ops.cast(embedding.embeddings, hidden_states.dtype)  # [V, D]
            logits = last_axis_product("btd,vd->btv", hidden_states, table)
        elif int8_head_applies(embedding):
            logits = int8_head_logits(hidden_states, embedding)
        else:
            logits = embedding(hidden_states, reverse=True)
        return self.logit_soft_cap(logits)

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
        target_ids=None,
    ):
        """Score token sequences: per-token logits or per-token losses.

        KerasHub's `CausalLM.score` (as `keras_hub.models.GemmaCausalLM`
        defines it), for evaluation and interpretability code written
        against KerasHub. Logits are soft-capped, as in `causal_lm(x)`.

        Args:
            token_ids: int tensor `[batch, T]`, typically prompt plus
                completion from `generate` after `generate_preprocess`.
            padding_mask: optional `[batch, T]` mask (1 = real token).
                Defaults to all ones.
            scoring_mode: `"logits"` (returns `[batch, T, vocabulary_size]`)
                or `"loss"` (returns the per-token sparse cross-entropy
                `[batch, T]` of `target_ids` under those logits). Defaults to
                `"logits"`.
            layer_intercept_fn: optional `fn(activations, index)` returning
                activations of the same shape, called with index `-1` on the
                token embeddings (before the `sqrt(hidden_dim)` scale) and
                then with `0, 1, ...` on each decoder block's output. Its
                return value replaces the activations at every index (KerasHub
                0.32 discards the value returned at `-1`).
            target_ids: int tensor `[batch, T]`, the token each position
                should predict (e.g. `token_ids` shifted left by one); needed
                by `scoring_mode="loss"`.

        Returns:
            Logits `[batch, T, vocabulary_size]` or losses `[batch, T]`.

        Example:

        >>> import numpy as np
        >>> backbone = Gemma2Backbone(
        ...     vocabulary_size=64, num_layers=2, num_query_heads=4,
        ...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        ...     head_dim=8, sliding_window_size=4)
        >>> causal_lm = Gemma2CausalLM(backbone)
        >>> token_ids = np.array([[2, 5, 9, 7]], "int32")
        >>> losses = causal_lm.score(
        ...     token_ids, scoring_mode="loss",
        ...     target_ids=np.roll(token_ids, -1, axis=1))
        >>> tuple(losses.shape)
        (1, 4)
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(
                "Received an invalid value for `scoring_mode`, expected "
                f"'logits' or 'loss'. Received: scoring_mode={scoring_mode!r}"
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError(
                '`scoring_mode="loss"` needs `target_ids`, the token each '
                "position should predict. Received: target_ids=None"
            )
        if layer_intercept_fn is not None and not callable(layer_intercept_fn):
            raise ValueError(
                "Received an invalid value for `layer_intercept_fn`, expected a "
                "callable `fn(activations, index)`. Received: "
                f"layer_intercept_fn={layer_intercept_fn!r}"
            )
        vocabulary_size = self.backbone.vocabulary_size
        check_token_inputs(token_ids, padding_mask, vocabulary_size)
        if target_ids is not None:
            check_token_shapes(token_ids, target_ids, mask_name="target_ids")
            targets = host_values(target_ids)
            if targets is not None:
                check_token_values(targets, vocabulary_size, name="target_ids")
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids), "int32")
        if layer_intercept_fn is None:

            def layer_intercept_fn(activations, index):
                del index
                return activations

        backbone = self.backbone
        x = layer_intercept_fn(backbone.token_embedding(token_ids), -1)
        x = x * embedding_scale(backbone.hidden_dim, x.dtype)
        for index, block in enumerate(backbone.transformer_layers):
            x = layer_intercept_fn(block(x, padding_mask=padding_mask), index)
        logits = self.logits_from_hidden_states(backbone.final_norm(x))
        if scoring_mode == "logits":
            return logits
        return keras.losses.sparse_categorical_crossentropy(
            target_ids, logits, from_logits=True
        )

    def generate_step(self, inputs, stop_token_ids=None, prefill_length=None):
        """Complete one batch of right-padded prompts as one portable program.

        `generate` runs the same phases compiled separately
        (`keras_gemma2.generation.compiled`); this whole is the reference
        they are tested against.

        Args:
            inputs: dict of `"token_ids"` and `"padding_mask"`, `[batch,
                max_length]`.
            stop_token_ids: tuple of ints or `None`.
            prefill_length: static int >= the longest prompt; defaults to
                `max_length`.
        """
        from keras_gemma2.generation.decode import generate_tokens

        token_ids = inputs["token_ids"]
        if prefill_length is None:
            prefill_length = token_ids.shape[1]
        return generate_tokens(
            self, token_ids, inputs["padding_mask"], stop_token_ids, prefill_length
        )

    def make_generate_function(self):
        """Return the generation function, compiled once per shape and backend.

        The prompt's prefill length is bucketed to a power of two on the host,
        so one set of compiled phases serves every prompt up to its bucket;
        see `keras_gemma2.generation.compiled`.
        """
        from keras_gemma2.generation.compiled import make_generate_function

        if self.generate_function is None:
            self.generate_function = make_generate_function(self)
        return self.generate_function

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="top_k",
        temperature=1.0,
        seed=None,
        **kwargs,
    ):
        """Configure training and the sampler used by `generate`.

        Args:
            optimizer, loss, weighted_metrics, **kwargs: as
                `keras_hub.models.CausalLM.compile`.
            sampler: `"greedy"`, `"top_k"` (k=5), `"top_p"` (p=0.9),
                `"random"`, or a `keras_hub.samplers.Sampler` instance.
                Defaults to `"top_k"`.
            temperature: positive float dividing the logits before sampling
                (ignored by `"greedy"`). Defaults to `1.0`.
            seed: optional int, makes sampling reproducible.

        On the torch backend, `jit_compile=True` (Keras' switch for
        `torch.compile`) also compiles `generate`'s decode step, once per
        batch size, length and bucket of global cache slots. Each such shape
        first costs 10-25 s of compilation on CPU, then each decode step is
        about 15% faster; the default decodes eagerly, which is quicker for
        all but long-running use.
        """
        from keras_gemma2.generation.inputs import make_sampler

        # Read by the chunked loss (`causal_lm_training`), which applies only
        # without loss weights.
        self._loss_weights_argument = kwargs.get("loss_weights")
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=make_sampler(sampler, temperature, seed),
            **kwargs,
        )

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        stream=False,
    ):
        """Complete prompts: strings (with a preprocessor) or token-id dicts.

        Takes what KerasHub's `CausalLM.generate` takes. With a
        `tf.data.Dataset`, every batch is checked first, then each is
        generated in turn and the outputs are concatenated.

        Args:
            inputs: a string, a list, numpy array or TensorFlow tensor of
                strings (needs a preprocessor), a dict of right-padded
                `"token_ids"` and `"padding_mask"` `[batch, max_length]`
                (then `max_length` is their width), or a `tf.data.Dataset`
                of batches of any of these.
            max_length: int, total length of prompt plus completion, at most
                the 8192-token context. Defaults to the preprocessor's
                `sequence_length`.
            stop_token_ids: `"auto"` (`<eos>` and `<end_of_turn>`), a tuple of
                ids, or `None` to always generate `max_length` tokens.
            strip_prompt: bool, return only the completion.
            stream: bool. If `True`, `inputs` must be one string and the call
                returns an iterator of text pieces, yielded as tokens arrive.

        Example:

        ```python
        causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
        causal_lm.compile(sampler="greedy")
        print(causal_lm.generate("def fibonacci(n):", max_length=64))
        for piece in causal_lm.generate("import os", max_length=64, stream=True):
            print(piece, end="", flush=True)
        ```
        """
        from keras_gemma2.generation.inputs import (
            DatasetBatches,
            check_generate_inputs,
            join_batches,
            normalize_generate_inputs,
        )

        stop_token_ids = self._stop_token_ids(stop_token_ids)
        inputs = normalize_generate_inputs(inputs)
        if isinstance(inputs, DatasetBatches):
            if stream:
                raise ValueError(
                    "`stream=True` takes one string prompt. Received: inputs of "
                    "type tf.data.Dataset"
                )
            # Every batch is checked before the first one is generated.
            for batch in inputs:
                check_generate_inputs(self, batch, max_length)
            return join_batches(
                [
                    self._generate_batch(
                        batch, max_length, stop_token_ids, strip_prompt
                    )
                    for batch in inputs
                ]
            )
        check_generate_inputs(self, inputs, max_length)
        if stream:
            return self._stream(inputs, max_length, stop_token_ids)
        return self._generate_batch(inputs, max_length, stop_token_ids, strip_prompt)

    def _generate_batch(self, inputs, max_length, stop_token_ids, strip_prompt):
        """KerasHub's `generate` on one checked batch (data-parallel padded)."""
        from keras_gemma2.generation.inputs import data_parallel_rows, keep_rows

        padded, rows = data_parallel_rows(inputs)
        outputs = super().generate(
            padded,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )
        return keep_rows(outputs, rows, scalar=isinstance(inputs, str))

    def _stop_token_ids(self, stop_token_ids):
        if not (isinstance(stop_token_ids, str) and stop_token_ids == "auto"):
            return stop_token_ids
        if self.preprocessor is None:
            raise ValueError(
                '`stop_token_ids="auto"` needs a preprocessor (its tokenizer knows '
                "the stop tokens). Pass `stop_token_ids=None` to generate to "
                "`max_length`, or a tuple of token ids."
            )
        tokenizer = self.preprocessor.tokenizer
        return (tokenizer.end_token_id, tokenizer.end_of_turn_token_id)

    def _stream(self, prompt, max_length, stop_token_ids):
        from keras_gemma2.generation.compiled import program_for

        if not isinstance(prompt, str):
            raise ValueError(
                "`stream=True` takes one string prompt. Received: "
                f"inputs of type {type(prompt).__name__}"
            )
        if self.sampler is None:
            self.compile()
        inputs = self.preprocessor.generate_preprocess(
            [prompt], sequence_length=max_length
        )
        inputs = {key: ops.convert_to_tensor(value) for key, value in inputs.items()}
        tokenizer = self.preprocessor.tokenizer
        special = set(tokenizer.special_token_ids)

        def pieces():
            generated, text = [], ""
            generate_function = self.make_generate_function()
            program = program_for(
                self, generate_function.programs, inputs, stop_token_ids
            )
            for token in program.stream(inputs):
                if token in special:
                    continue
                generated.append(token)
                # Detokenize the whole completion and hold back a trailing
                # replacement character: byte pieces may end mid-character.
                decoded = tokenizer.detokenize(ops.convert_to_tensor([generated]))
                decoded = _to_text(decoded).rstrip("\ufffd")
                if decoded.startswith(text) and len(decoded) > len(text):
                    yield decoded[len(text) :]
                    text = decoded
            if generated:  # flush what was held back at the very end
                final = tokenizer.detokenize(ops.convert_to_tensor([generated]))
                final = _to_text(final)
                if final.startswith(text) and len(final) > len(text):
                    yield final[len(text) :]

        return pieces()

    def export_to_transformers(
        self,
        path,
        tokenizer=None,
        max_shard_size=5 * 2**30,
        dtype=None,
        overwrite=False,
    ):
        """Write a Hugging Face checkpoint `transformers` loads as Gemma 2.

        Writes `config.json`, `generation_config.json`, safetensors weights
        (sharded past `max_shard_size` bytes, with an index) and, when a
        tokenizer is known, `tokenizer.model` with its configs. The directory
        is staged and renamed into place, so a failure leaves nothing.

        Args:
            path: string. Destination directory.
            tokenizer: optional `Gemma2Tokenizer`; defaults to the
                preprocessor's.
            max_shard_size: int. Bytes per weights file. Defaults to 5 GiB.
            dtype: `"float32"`, `"bfloat16"` or `None` (the model's dtype).
            overwrite: bool. Replace an existing `path`.

        Example:

        ```python
        causal_lm.export_to_transformers("./gemma2-hf", dtype="bfloat16")
        model = transformers.AutoModelForCausalLM.from_pretrained("./gemma2-hf")
        ```
        """
        from keras_gemma2.checkpoints.hf_export import export_to_transformers

        export_to_transformers(
            self,
            path,
            tokenizer=tokenizer,
            max_shard_size_bytes=max_shard_size,
            dtype=dtype,
            overwrite=overwrite,
        )

    def export_to_gguf(
        self,
        path,
        dtype="f32",
        tokenizer=None,
        modelfile=True,
        overwrite=False,
        progress=None,
    ):
        """Write a GGUF file that llama.cpp and Ollama run as `gemma2`.

        Writes the weights (LoRA adapters merged; norms as llama.cpp's
        `1 + scale` in F32), the hyper-parameters and the SentencePiece
        vocabulary, tensor by tensor, staged and renamed into place. With
        `modelfile=True` an Ollama `Modelfile` goes beside it: run the model
        with `ollama create NAME -f Modelfile && ollama run NAME`. A model
        llama.cpp cannot compute (a `query_pre_attn_scalar` other than
        `head_dim`, or `hidden_dim // num_query_heads` at 46 layers; a
        missing soft cap) raises `ValueError` before anything is written.
        See `keras_gemma2.checkpoints.gguf_export.export_to_gguf`.

        Args:
            path: string. The `.gguf` file to write.
            dtype: string. `"f32"`, `"f16"`, `"bf16"` or `"q8_0"`, the type
                of the matrices. Defaults to `"f32"`.
            tokenizer: optional `Gemma2Tokenizer`; defaults to the
                preprocessor's (a GGUF file needs one).
            modelfile: bool. Also write `Modelfile` beside `path`.
                Defaults to `True`.
            overwrite: bool. Replace an existing file. Defaults to `False`.
            progress: optional callable `progress(done, total, name)`, called
                after each tensor.

        Example:

        ```python
        causal_lm.export_to_gguf("./gemma2-ft/gemma2-ft.gguf", dtype="q8_0")
        # shell: cd gemma2-ft && ollama create gemma2-ft -f Modelfile
        ```
        """
        from keras_gemma2.checkpoints.gguf_export import export_to_gguf

        export_to_gguf(
            self,
            path,
            dtype=dtype,
            tokenizer=tokenizer,
            modelfile=modelfile,
            overwrite=overwrite,
            progress=progress,
        )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build a `Gemma2CausalLM` from a preset.

        Args:
            preset: string. A preset directory of any supported format, a
                `.gguf` file or a remote handle; see
                `Gemma2Backbone.from_preset`. When the preset holds a
                tokenizer, the model gets a preprocessor.
            load_weights: bool. If `False`, weights stay randomly initialised.
            **kwargs: backbone overrides such as `dtype="bfloat16"`.

        Example:

        ```python
        causal_lm = Gemma2CausalLM.from_preset("/path/to/gemma-2-2b", dtype="bfloat16")
        ```
        """
        from keras_gemma2.checkpoints.preset_loading import load_causal_lm

        return load_causal_lm(cls, preset, load_weights=load_weights, **kwargs)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras' `load_weights`, refusing NaN/Inf values before any is assigned.

        See `Gemma2Backbone.load_weights`.
        """
        from keras_gemma2.checkpoints.finite_check import checked_weights_file

        with checked_weights_file(filepath):
            super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=5, overwrite=False):
        """Save backbone, task and preprocessor to a preset directory, atomically.

        Args:
            preset_dir: string. Destination directory.
            max_shard_size: float. Weight files are split past this many GB.
                Defaults to `5`.
            overwrite: bool. Replace an existing `preset_dir`. Defaults to
                `False` (an existing directory raises `FileExistsError`).
        """
        from keras_gemma2.checkpoints.atomic import atomic_directory

        with atomic_directory(preset_dir, overwrite=overwrite) as staging:
            super().save_to_preset(staging, max_shard_size=max_shard_size)


def _to_text(decoded):
    """First string of a detokenized batch, as Python `str`."""
    value = decoded[0] if not isinstance(decoded, str) else decoded
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="ignore")
    return str(value)

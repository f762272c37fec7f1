"""Gemma2Backbone: token embedding -> decoder blocks -> final norm."""

import contextvars
import os
import warnings

import keras
import keras_hub

from keras_gemma2.layers.attention_dispatch import validate_attention_implementation
from keras_gemma2.layers.decoder_block import Gemma2DecoderBlock
from keras_gemma2.layers.gemma2_math import embedding_scale
from keras_gemma2.layers.rms_normalization import Gemma2RMSNormalization
from keras_gemma2.layers.soft_capping import validate_soft_cap
from keras_gemma2.layers.validation import (
    non_negative_number,
    positive_int,
    positive_number,
    unit_rate,
)
from keras_gemma2.models.architecture import layer_is_local
from keras_gemma2.models.backbone_lora import Gemma2LoraMethods
from keras_gemma2.models.causal_lm_inputs import check_token_dict
from keras_gemma2.models.layout_map import get_layout_map, prepare_distribution
from keras_gemma2.models.presets import bundled_presets, classproperty

# How `Gemma2Backbone.from_config` constructs: `None` directly, else a
# function `construct(build) -> backbone` that calls `build()` its own way.
# Preset loaders set it (`checkpoints.preset_loading`) while KerasHub builds
# a backbone whose every weight they load next, so that no random initial
# values are drawn first.
BACKBONE_CONSTRUCTION = contextvars.ContextVar(
    "gemma2_backbone_construction", default=None
)


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Backbone(Gemma2LoraMethods, keras_hub.models.Backbone):
    """The Gemma 2 decoder network, without the language-model head.

    Embeds `token_ids`, multiplies by `sqrt(hidden_dim)` (cast to the compute
    dtype first), runs `num_layers` `Gemma2DecoderBlock`s that alternate
    local (sliding window; layers 0, 2, 4, ...) and global attention, and
    applies a final RMS norm. The embedding matrix is tied to the output
    projection of `Gemma2CausalLM`.

    Args:
        vocabulary_size: int. Number of token ids.
        num_layers: int. Number of decoder blocks.
        num_query_heads: int. Query heads per block.
        num_key_value_heads: int. Key/value heads per block (divides
            `num_query_heads`).
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of each GeGLU branch (HF
            `intermediate_size`).
        head_dim: int. Width of one attention head.
        query_pre_attn_scalar: float. Queries are scaled by its `** -0.5`.
            Defaults to `head_dim` (the 27B uses `hidden_dim / num_query_heads`).
        attention_logit_soft_cap: float or `None`. Defaults to `50.0`.
        final_logit_soft_cap: float or `None`. Used by `Gemma2CausalLM` on the
            output logits. Defaults to `30.0`.
        sliding_window_size: int. Window of the local layers. Defaults to
            `4096`.
        layer_norm_epsilon: float. Epsilon of every RMS norm. Defaults to `1e-6`.
        rope_max_wavelength: float. RoPE theta. Defaults to `10000.0`.
        dropout: float. Attention-probability dropout in training.
            Defaults to `0.0`.
        attention_implementation: string. How every block computes attention:
            `"auto"` (the fastest exact path for the backend), `"reference"`,
            `"blocked"` (`O(T * window)` local layers, causal query blocks
            on global ones), `"flex"` (PyTorch) or
            `"fused"` (`keras.ops.dot_product_attention`); all give the same
            result. See `SlidingWindowAttention`. Defaults to `"auto"`.
        remat: bool. Rematerialize every decoder block in training
            (gradient checkpointing with `keras.remat`): the backward pass
            recomputes a block's activations from its input instead of
            keeping them all, so activation memory falls from every block's
            intermediates to one `[batch, T, hidden_dim]` tensor per block
            plus one block's intermediates, for about one more forward pass
            of compute. Losses and gradients are unchanged. Generation never
            rematerializes. On the JAX CPU backend, XLA's default scheduler
            undoes the saving; start the process with
            `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`
            (it must be set before JAX creates its CPU client; a warning says
            so when it is missing). Defaults to `False`.
        dtype: string or `keras.DTypePolicy`. `"float32"` or `"bfloat16"`
            (float16 overflows on Gemma 2). Defaults to the Keras default.

    Example:

    >>> import numpy as np
    >>> backbone = Gemma2Backbone(
    ...     vocabulary_size=64, num_layers=2, num_query_heads=4,
    ...     num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
    ...     head_dim=8, sliding_window_size=4)
    >>> hidden = backbone.predict(
    ...     {"token_ids": np.ones((1, 6), "int32"),
    ...      "padding_mask": np.ones((1, 6), "int32")}, verbose=0)
    >>> hidden.shape
    (1, 6, 16)
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_pre_attn_scalar=None,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        sliding_window_size=4096,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000.0,
        dropout=0.0,
        attention_implementation="auto",
        remat=False,
        dtype=None,
        **kwargs,
    ):
        vocabulary_size = positive_int(vocabulary_size, "vocabulary_size")
        num_layers = positive_int(num_layers, "num_layers")
        hidden_dim = positive_int(hidden_dim, "hidden_dim")
        head_dim = positive_int(head_dim, "head_dim")
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = head_dim
        query_pre_attn_scalar = positive_number(
            query_pre_attn_scalar, "query_pre_attn_scalar"
        )
        final_logit_soft_cap = validate_soft_cap(
            final_logit_soft_cap, "final_logit_soft_cap"
        )
        sliding_window_size = positive_int(sliding_window_size, "sliding_window_size")
        layer_norm_epsilon = non_negative_number(
            layer_norm_epsilon, "layer_norm_epsilon"
        )
        dropout = unit_rate(dropout, "dropout")
        attention_implementation = validate_attention_implementation(
            attention_implementation
        )
        _check_dtype(dtype)
        if not isinstance(remat, bool):
            raise TypeError(
                "Received an invalid value for `remat`, expected a bool. "
                f"Received: remat={remat!r}"
            )
        if remat:
            _warn_if_jax_cpu_remat_is_ineffective()
        prepare_distribution(
            {
                "vocabulary_size": vocabulary_size,
                "num_layers": num_layers,
                "num_query_heads": num_query_heads,
                "num_key_value_heads": num_key_value_heads,
                "hidden_dim": hidden_dim,
                "intermediate_dim": intermediate_dim,
                "head_dim": head_dim,
            }
        )

        # === Layers ===
        self.token_embedding = keras.layers.ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal", seed=None
            ),
            dtype=dtype,
            name="token_embedding",
        )
        self.transformer_layers = [
            Gemma2DecoderBlock(
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                query_pre_attn_scalar=query_pre_attn_scalar,
                attention_logit_soft_cap=attention_logit_soft_cap,
                sliding_window_size=sliding_window_size if layer_is_local(i) else None,
                layer_norm_epsilon=layer_norm_epsilon,
                rope_max_wavelength=rope_max_wavelength,
                dropout=dropout,
                attention_implementation=attention_implementation,
                remat=remat,
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = Gemma2RMSNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm"
        )

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        outputs, _ = self.compute_hidden_states(token_ids, padding_mask=padding_mask)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.sliding_window_size = sliding_window_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.dropout = dropout
        self.attention_implementation = attention_implementation
        self.remat = remat

    @classproperty
    def presets(cls):
        """Presets shipped with keras_gemma2: `{name: {"path", "metadata"}}`."""
        return bundled_presets()

    def compute_hidden_states(
        self,
        token_ids,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
    ):
        """Embedding -> decoder blocks -> final norm; the one forward pass.

        Serves the functional model (`call`, training, scoring) and cached
        generation alike.

        Args:
            token_ids: int tensor `[batch, T]`.
            padding_mask: optional `[batch, S]` key mask (1 = real token).
            cache: optional tuple with one `(key_cache, value_cache)` pair
                per layer, each `[batch, num_key_value_heads, slots,
                head_dim]`; see `keras_gemma2.generation.kv_cache`.
            cache_update_index: position of the first of the `T` tokens.
            training: bool, enables dropout.

        Returns:
            `(hidden_states [batch, T, hidden_dim], updated cache or None)`.
        """
        x = self.token_embedding(token_ids)
        x = x * embedding_scale(self.token_embedding.output_dim, x.dtype)
        new_cache = []
        for index, block in enumerate(self.transformer_layers):
            if cache is None:
                x = block(x, padding_mask=padding_mask, training=training)
                continue
            x, layer_cache = block(
                x,
                padding_mask=padding_mask,
                cache=cache[index],
                cache_update_index=cache_update_index,
                training=training,
            )
            new_cache.append(layer_cache)
        hidden_states = self.final_norm(x)
        return hidden_states, None if cache is None else tuple(new_cache)

    def __call__(self, *args, **kwargs):
        # Bad ids or masks get the causal LM's `ValueError` on every backend,
        # not a backend's gather error (or NaN on JAX).
        inputs = args[0] if args else kwargs.get("inputs")
        check_token_dict(inputs, self.vocabulary_size)
        return super().__call__(*args, **kwargs)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Load weights from a file; NaN/Inf values are refused first.

        Keras' `load_weights`, after scanning the file: a tensor holding
        NaN or Inf raises a `ValueError` naming the file and the tensor, and
        the model keeps its weights. `KERAS_GEMMA2_CHECK_FINITE=0` turns the
        scan off.
        """
        from keras_gemma2.checkpoints.finite_check import checked_weights_file

        with checked_weights_file(filepath):
            super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def load_own_variables(self, store):
        """Refuse NaN/Inf weights before Keras assigns any (`.keras` files).

        `keras.models.load_model` and `load_weights` call this before any
        sublayer reads its values, so the whole backbone's part of the file
        is scanned here first. `KERAS_GEMMA2_CHECK_FINITE=0` turns it off.
        """
        from keras_gemma2.checkpoints.finite_check import check_keras_store_finite

        check_keras_store_finite(self, store)
        super().load_own_variables(store)

    @classmethod
    def from_config(cls, config):
        construct = BACKBONE_CONSTRUCTION.get()
        parent = super()
        if construct is None:
            return parent.from_config(config)
        return construct(lambda: parent.from_config(config))

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "final_logit_soft_cap": self.final_logit_soft_cap,
            "sliding_window_size": self.sliding_window_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "rope_max_wavelength": self.rope_max_wavelength,
            "dropout": self.dropout,
            "attention_implementation": self.attention_implementation,
            "remat": self.remat,
        }

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A layout map sharding any Gemma 2 backbone over `device_mesh` (JAX).

        KerasHub's signature: pass the result to
        `keras.distribution.ModelParallel(layout_map=...)`, then build or
        `from_preset` the model under it. The rule, per weight:

        - token embedding (also the tied output head) `[vocabulary, hidden]`:
          `(model, batch)`;
        - query, key and value `[hidden, heads, head_dim]`:
          `(batch, model, None)`: whole heads over the model axis;
        - attention output `[heads, head_dim, hidden]`: `(model, None, batch)`;
        - feed-forward gate and up `[hidden, intermediate]`:
          `(batch, model)`; down `[intermediate, hidden]`: `(model, batch)`;
        - RMS-norm scales: replicated.

        A dimension the mesh axis does not divide is replicated along that
        axis instead (e.g. 2 key/value heads on a model axis of 8): the map
        learns each backbone's shapes when the backbone is built under it,
        so one map fits every mesh shape and head count. Entries set by hand
        (`layout_map[regex] = axes`) take precedence.

        Args:
            device_mesh: `keras.distribution.DeviceMesh`.
            model_parallel_dim_name: string, the mesh axis that splits
                heads and the feed-forward width. Defaults to `"model"`.
            data_parallel_dim_name: string, the mesh axis of the batch,
                which also splits `hidden` (fully sharded data parallel).
                Defaults to `"batch"`.

        Returns:
            A `keras_gemma2.models.layout_map.Gemma2LayoutMap`.

        Raises:
            NotImplementedError: on tensorflow or torch, where Keras'
                distribution API is not implemented.
            ValueError: when the mesh lacks a named axis.

        Example:

        ```python
        import keras
        from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

        devices = keras.distribution.list_devices()  # e.g. 8
        mesh = keras.distribution.DeviceMesh(
            (2, 4), axis_names=["batch", "model"], devices=devices)
        layout_map = Gemma2Backbone.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map,
                                             batch_dim_name="batch"))
        causal_lm = Gemma2CausalLM.from_preset("gemma2_tiny_python")
        causal_lm.generate("def fibonacci(n):", max_length=32)
        ```
        """
        return get_layout_map(
            device_mesh, model_parallel_dim_name, data_parallel_dim_name
        )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build a `Gemma2Backbone` from a preset.

        Args:
            preset: string. One of: a local directory saved by
                `save_to_preset`; a local Hugging Face Gemma 2 checkpoint
                (`config.json` with `model_type` `"gemma2"`, `model.safetensors`
                or shards with `model.safetensors.index.json`); a local
                KerasHub/Kaggle Gemma 2 preset; a `.gguf` file (llama.cpp's
                format; F32, F16, BF16 or Q8_0 tensors, dequantised); a
                handle `"hf://owner/name"` or
                `"kaggle://keras/gemma2/keras/<name>/<version>"` (needs
                network).
            load_weights: bool. If `False`, the weights stay randomly
                initialised. Defaults to `True`.
            **kwargs: overrides for the constructor, e.g. `dtype="bfloat16"`.

        Example:

        ```python
        backbone = Gemma2Backbone.from_preset("/path/to/gemma-2-2b")
        ```
        """
        from keras_gemma2.checkpoints.preset_loading import load_backbone

        return load_backbone(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=5, overwrite=False):
        """Save config and weights to a preset directory, atomically.

        The preset is written into a temporary sibling directory and renamed
        into place, so an interrupted save leaves no partial preset.

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


_SUPPORTED_DTYPES = ("float32", "bfloat16")


def _check_dtype(dtype):
    """Reject compute dtypes Gemma 2 does not run in (float16 overflows)."""
    if dtype is None:
        return
    policy = keras.dtype_policies.get(dtype)
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return
    if policy.compute_dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            "Received an invalid value for `dtype`, expected a policy computing in "
            f"one of {_SUPPORTED_DTYPES} (float16 overflows on Gemma 2). "
            f"Received: dtype={dtype!r}"
        )


JAX_CPU_REMAT_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _warn_if_jax_cpu_remat_is_ineffective():
    """Warn when XLA's CPU scheduler will keep what `remat=True` should free.

    XLA's concurrency-optimized CPU scheduler (the default) hoists the
    recomputed forward passes so that they overlap, which keeps every block's
    activations alive at once: measured on the mid config at T=2048, the
    step peak is the same with and without remat. The flag is read once,
    when JAX creates its CPU client, so the package cannot set it for a
    process that already runs JAX code (and setting it at import would change
    the scheduling of every other JAX program in the process); it warns.
    """
    if keras.config.backend() != "jax":
        return
    import jax

    if jax.default_backend() != "cpu":
        return
    if JAX_CPU_REMAT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    warnings.warn(
        "`remat=True` saves no memory on the JAX CPU backend unless XLA's "
        "concurrency-optimized scheduler is off. Start the process with "
        f"`XLA_FLAGS={JAX_CPU_REMAT_FLAG}` (set before JAX starts).",
        stacklevel=3,
    )

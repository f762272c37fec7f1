"""Gemma2CausalLMPreprocessor: text to packed token ids, labels and weights."""

import contextlib
import os

import keras
import keras_hub
import numpy as np

from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.sft_packing import ResponsePacker
from keras_gemma2.models.sft_rows import is_sft_input, python_rows
from keras_gemma2.models.tokenizer import Gemma2Tokenizer, read_compatible_config
from keras_gemma2.models.truncating_packer import TruncatingStartEndPacker

TRUNCATE_POLICIES = ("error", "left", "right")
PREPROCESSOR_CONFIG_FILE = "preprocessor.json"
COMPATIBLE_CLASSES = (
    "keras_gemma2>Gemma2CausalLMPreprocessor",
    "keras_hub>GemmaCausalLMPreprocessor",
    "keras_nlp>GemmaCausalLMPreprocessor",  # saved before KerasNLP's rename
)
# Arguments of a KerasHub `GemmaCausalLMPreprocessor` config that carry over.
_KERAS_HUB_ARGUMENTS = ("sequence_length", "add_start_token", "add_end_token")


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2CausalLMPreprocessor(keras_hub.models.CausalLMPreprocessor):
    """Causal language-model preprocessing for Gemma 2.

    Calling the layer on a string or a batch of strings tokenizes them with a
    `Gemma2Tokenizer`, prepends `<bos>` (`add_start_token`), appends `<eos>`
    (`add_end_token`), pads with `<pad>` to `sequence_length + 1` and returns
    `(x, y, sample_weight)` for `fit`: `x["token_ids"]` and
    `x["padding_mask"]` are the first `sequence_length` positions, `y` is the
    same sequence shifted left by one (each position's next token) and
    `sample_weight` is the padding mask of `y`, so padding adds no loss.
    Gemma scores far worse without `<bos>`; keep `add_start_token=True`.

    **Fine-tuning rows (SFT).** Besides plain text, `x` may be:

    - `{"prompts": ..., "responses": ...}` (KerasHub's convention): two
      strings (one row) or two equally long lists of strings / rank-1 string
      tensors (a batch);
    - a chat conversation (a list of `{"role", "content"}` dicts, as
      `format_chat` takes) or a list of conversations, each ending with a
      model turn; rendered with `format_chat(..., add_generation_prompt=
      False)` and cut by `format_chat_segments`;
    - `{"prompt_segments": ..., "response_segments": ...}`, what
      `format_chat_segments` returns: per row, equally many prompt and
      response segments, alternating, prompt first (a list of strings for
      one row; a list of lists or a `tf.RaggedTensor` for a batch).

    Each prompt and response is tokenized on its own and the ids are
    concatenated, so the boundary is exact (SentencePiece may tokenize the
    joined text differently at the seam; separate tokenization is the usual
    SFT practice and KerasHub Gemma 3's). A row is packed as `<bos>`, its
    segments in order, then `<eos>`. `sample_weight` is 1 only on labels
    that are response tokens, and on the final `<eos>` (when
    `add_end_token`) so the model learns to stop; prompt tokens, `<bos>` and
    padding get 0. In a chat every model turn is a response: its content,
    its `<end_of_turn>` and the `"\\n"` after it (the whole turn but its
    opening `<start_of_turn>model\\n`; generation stops at `<end_of_turn>`,
    so the newline changes no answer). User turns, system text and turn
    openings get 0. All three forms work eagerly and inside `tf.data`
    (`dataset.map(preprocessor)`) on every backend; conversations (dicts)
    cannot be tensors, so pass `format_chat_segments(conversations)` to
    `tf.data` (`tf.ragged.constant` on each value), which packs identically.

    A text longer than fits is handled by the `truncate` policy, never
    silently: `"error"` raises, `"left"` drops tokens from the start (keeps
    the most recent context, the usual choice for chat prompts), `"right"`
    drops them from the end (KerasHub's behaviour). "Fits" means the text's
    tokens plus `<bos>` and, for training, `<eos>` fill at most
    `sequence_length` inputs plus the one extra label position; with both
    special tokens that is `sequence_length - 1` text tokens. For
    fine-tuning rows the policy acts on everything after `<bos>` (`<eos>`
    included): `"error"` raises naming the row, its prompt and response token
    counts; `"left"` drops prompt tokens from the start first and keeps the
    response (a response longer than the room keeps its end and `<eos>`);
    `"right"` cuts from the end, so the response loses its end and `<eos>`
    (a cut answer must not teach the model to stop there). A row that would
    keep no response token (its prompt fills the room under `"right"`)
    raises a `ValueError` naming the row rather than adding no loss. Inside a
    `tf.data` pipeline these checks run in the TensorFlow graph and surface
    as `tf.errors.InvalidArgumentError` with the same facts (row or text
    index within the batch, token counts).

    Tokenization runs in Python when called eagerly and in the TensorFlow
    graph inside `tf.data` (`dataset.map(preprocessor)`), on every Keras
    backend.

    Args:
        tokenizer: `Gemma2Tokenizer`.
        sequence_length: int. Length of the packed inputs. Defaults to `1024`.
        add_start_token: bool. Prepend `<bos>`. Defaults to `True`.
        add_end_token: bool. Append `<eos>` when called for training
            (never in `generate_preprocess`). Defaults to `True`.
        truncate: string. What to do with a text or row that does not fit:
            `"error"` (raise a `ValueError` naming `sequence_length`, the text
            or row index and its token counts), `"left"` or `"right"` (drop
            tokens from that side; see above for fine-tuning rows). Plain
            texts always keep `<bos>`/`<eos>`. Defaults to `"error"`.
        **kwargs: passed to `keras_hub.models.CausalLMPreprocessor`.

    Call arguments:
        x: string, list of strings or string tensor; or a fine-tuning row
            form (see above).
        y: must be `None`; labels are made from `x`.
        sample_weight: must be `None`; weights are made from `x`.
        sequence_length: int. Overrides `sequence_length` for this call.

    Raises:
        ValueError: a row without a response (missing `"responses"`,
            `None` or `""`), `prompts` and `responses` of different lengths,
            unequal segment counts, a chat whose last turn is not the
            model's, an empty model turn, a text or row that does not fit
            under `truncate="error"`, or a row left without response tokens.
            The message names the row (or conversation) index.
        TypeError: a non-string prompt or response, or a conversation that
            is not a list of dicts.

    Example:

    >>> import keras
    >>> from keras_gemma2.data import train_sentencepiece
    >>> proto = train_sentencepiece(
    ...     ["the quick brown fox jumps over the lazy dog"],
    ...     vocabulary_size=40,
    ...     control_pieces=[],
    ...     byte_fallback=False,
    ... )
    >>> tokenizer = Gemma2Tokenizer(proto=proto)
    >>> preprocessor = Gemma2CausalLMPreprocessor(tokenizer, sequence_length=12)
    >>> x, y, sample_weight = preprocessor(["the fox", "the lazy dog"])
    >>> token_ids = keras.ops.convert_to_numpy(x["token_ids"])
    >>> labels = keras.ops.convert_to_numpy(y)
    >>> bool((token_ids[:, 0] == tokenizer.start_token_id).all())
    True
    >>> bool((labels[:, :-1] == token_ids[:, 1:]).all())
    True
    >>> keras.ops.convert_to_numpy(sample_weight).astype(int).tolist()[0]
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    >>> prompts = preprocessor.generate_preprocess(["the fox"])
    >>> preprocessor.generate_postprocess(prompts)
    ['the fox']

    Prompt/response rows: only the response's tokens and `<eos>` weigh.

    >>> x, y, sample_weight = preprocessor(
    ...     {"prompts": ["the fox"], "responses": ["jumps"]}
    ... )
    >>> labels = keras.ops.convert_to_numpy(y)[0].tolist()
    >>> weights = keras.ops.convert_to_numpy(sample_weight)[0].tolist()
    >>> [tokenizer.id_to_token(t) for t, w in zip(labels, weights) if w]
    ['j', 'u', 'm', 'p', 's', '<eos>']
    >>> [int(w) for w in weights]
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0]

    Chats: pass conversations eagerly, or `format_chat_segments(...)` in
    `tf.data`:

    ```python
    import tensorflow as tf
    from keras_gemma2.models.sft_rows import format_chat_segments

    chats = [[
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "model", "content": "4"},
    ]]
    x, y, sample_weight = preprocessor(chats)
    segments = format_chat_segments(chats)
    dataset = tf.data.Dataset.from_tensor_slices(
        {key: tf.ragged.constant(value) for key, value in segments.items()}
    ).map(preprocessor).batch(8)
    ```
    """

    backbone_cls = Gemma2Backbone
    tokenizer_cls = Gemma2Tokenizer

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        truncate="error",
        **kwargs,
    ):
        if (
            isinstance(sequence_length, bool)
            or not isinstance(sequence_length, (int, np.integer))
            or sequence_length < 1
        ):
            raise ValueError(
                "Received an invalid value for `sequence_length`, expected a "
                f"positive integer. Received: sequence_length={sequence_length!r}"
            )
        if truncate not in TRUNCATE_POLICIES:
            raise ValueError(
                "Received an invalid value for `truncate`, expected one of "
                f"{list(TRUNCATE_POLICIES)}. Received: truncate={truncate!r}"
            )
        super().__init__(
            tokenizer=tokenizer,
            sequence_length=int(sequence_length),
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )
        self.truncate = truncate

    def build(self, input_shape):
        # Built here, not in `__init__`, so that tokenizer assets restored
        # after construction (saved models) are in place.
        self.packer = TruncatingStartEndPacker(
            truncate=self.truncate,
            start_value=self.tokenizer.start_token_id,
            end_value=self.tokenizer.end_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.sequence_length,
            return_padding_mask=True,
        )
        self.built = True

    @contextlib.contextmanager
    def _packing(self, label_positions):
        """Tell the packer how many packed positions are labels only."""
        if not self.built:
            self.build(None)
        self.packer.label_positions = label_positions
        try:
            yield
        finally:
            self.packer.label_positions = 0

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if y is not None or sample_weight is not None:
            raise ValueError(
                f"`{type(self).__name__}` makes labels and weights from `x`; "
                "expected `y=None` and `sample_weight=None`. Received: "
                f"y={y!r}, sample_weight={sample_weight!r}"
            )
        if is_sft_input(x):
            return self._call_fine_tuning(x, sequence_length or self.sequence_length)
        # Training packs one position more than `sequence_length`: the last
        # token is a label only.
        with self._packing(label_positions=1):
            return super().call(x, sequence_length=sequence_length)

    def _call_fine_tuning(self, x, sequence_length):
        """`(x, y, sample_weight)` of fine-tuning rows, response-only weights."""
        packer = ResponsePacker(
            truncate=self.truncate,
            start_id=self.tokenizer.start_token_id,
            end_id=self.tokenizer.end_token_id,
            pad_id=self.tokenizer.pad_token_id,
            add_start_token=self.add_start_token,
            add_end_token=self.add_end_token,
            sequence_length=sequence_length,
            packed_length=sequence_length + 1,
        )
        if _in_tensorflow_graph():
            token_ids, padding_mask, weights = packer.pack_graph(x, self.tokenizer)
        else:
            rows, batched = python_rows(x)
            arrays = packer.pack_python(rows, self.tokenizer)
            if not batched:
                arrays = [array[0] for array in arrays]
            token_ids, padding_mask, weights = (
                keras.ops.convert_to_tensor(array) for array in arrays
            )
        x = {
            "token_ids": token_ids[..., :-1],
            "padding_mask": padding_mask[..., :-1],
        }
        return keras.utils.pack_x_y_sample_weight(
            x, token_ids[..., 1:], weights[..., 1:]
        )

    def generate_preprocess(self, x, sequence_length=None):
        """Tokenize and pack prompts for generation.

        Prepends `<bos>` (when `add_start_token`), never appends `<eos>`, and
        pads to `sequence_length`; a prompt that does not fit follows the
        `truncate` policy.

        Args:
            x: string, list of strings, or string tensor.
            sequence_length: int. Packed length; defaults to the layer's.

        Returns:
            A dict of `"token_ids"` and `"padding_mask"`.
        """
        with self._packing(label_positions=0):
            return super().generate_preprocess(x, sequence_length=sequence_length)

    def get_config(self):
        config = super().get_config()
        config["truncate"] = self.truncate
        return config

    @classmethod
    def from_preset(cls, preset, config_file=PREPROCESSOR_CONFIG_FILE, **kwargs):
        """Build a `Gemma2CausalLMPreprocessor` from a preset directory.

        The tokenizer loads with `Gemma2Tokenizer.from_preset` (our presets,
        KerasHub/Kaggle Gemma presets, Hugging Face checkpoints). Settings
        come from the preset's `preprocessor.json` when it holds a
        `keras_gemma2>Gemma2CausalLMPreprocessor` (all of them) or a
        `keras_hub>GemmaCausalLMPreprocessor` (`sequence_length`,
        `add_start_token`, `add_end_token`); otherwise the defaults apply.

        Args:
            preset: string. A local preset directory or remote handle.
            config_file: string. Name of the preprocessor config in the preset.
                Defaults to `"preprocessor.json"`.
            **kwargs: constructor arguments overriding the saved ones, e.g.
                `sequence_length=2048`, `truncate="left"`, or a ready
                `tokenizer`.

        Example:

        ```python
        preprocessor = Gemma2CausalLMPreprocessor.from_preset(
            "/path/to/gemma-2-2b", sequence_length=256
        )
        ```
        """
        from keras_gemma2.checkpoints.gguf_import import is_gguf_file
        from keras_gemma2.checkpoints.preset_loading import resolve_preset

        directory = resolve_preset(preset)
        config_path = os.path.join(directory, config_file)
        saved = None
        if not is_gguf_file(directory):  # a .gguf file has no preprocessor config
            saved = read_compatible_config(
                config_path, COMPATIBLE_CLASSES, _KERAS_HUB_ARGUMENTS
            )
        config = {} if saved is None else saved[1]
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            tokenizer = cls.tokenizer_cls.from_preset(directory)
        config.update(kwargs)
        config["tokenizer"] = tokenizer
        return cls.from_config(config)


def _in_tensorflow_graph():
    """Whether a TensorFlow graph is being traced (`tf.data`, `tf.function`)."""
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return not tf.executing_eagerly()

"""Gemma2Tokenizer: Gemma's SentencePiece vocabulary and its special tokens."""

import os

import keras
import keras_hub

from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.chat_template import (
    BOS,
    END_OF_TURN,
    EOS,
    PAD,
    START_OF_TURN,
)
from keras_gemma2.models.json_file import read_json

# Attribute name -> vocabulary piece. Each piece is looked up in the
# vocabulary; the ids in the comments are where Gemma's own vocabulary has it.
SPECIAL_TOKENS = {
    "pad_token": PAD,  # 0
    "end_token": EOS,  # 1
    "start_token": BOS,  # 2
    "start_of_turn_token": START_OF_TURN,  # 106
    "end_of_turn_token": END_OF_TURN,  # 107
}

TOKENIZER_CONFIG_FILE = "tokenizer.json"
VOCABULARY_FILE = "vocabulary.spm"  # under assets/<config stem>/ in a Keras preset
HF_VOCABULARY_FILE = "tokenizer.model"
# Saved tokenizer classes whose vocabulary asset is a Gemma SentencePiece proto.
# `keras_nlp>` is the same KerasHub class saved before the library's rename
# (older Kaggle presets).
COMPATIBLE_CLASSES = (
    "keras_gemma2>Gemma2Tokenizer",
    "keras_hub>GemmaTokenizer",
    "keras_nlp>GemmaTokenizer",
)
# Constructor arguments of a KerasHub `GemmaTokenizer` config that carry over.
_KERAS_HUB_ARGUMENTS = (
    "name",
    "trainable",
    "dtype",
    "sequence_length",
    "add_bos",
    "add_eos",
)


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Tokenizer(keras_hub.tokenizers.SentencePieceTokenizer):
    """Gemma 2 tokenizer: a SentencePiece model with Gemma's special tokens.

    Tokenizes strings into integer ids and back with
    `keras_hub.tokenizers.SentencePieceTokenizer` (pure Python by default;
    inside `tf.data` it runs in the TensorFlow graph on every backend). On
    top of that it finds Gemma's special tokens by their piece in the
    vocabulary and exposes their ids: `pad_token_id` (`<pad>`, 0 in Gemma's
    vocabulary), `end_token_id` (`<eos>`, 1), `start_token_id` (`<bos>`, 2),
    `start_of_turn_token_id` (`<start_of_turn>`, 106) and
    `end_of_turn_token_id` (`<end_of_turn>`, 107). A vocabulary lacking any of
    these pieces is rejected with a `ValueError` naming it.

    The tokenizer adds no `<bos>`/`<eos>` itself; `Gemma2CausalLMPreprocessor`
    does. Literal `<start_of_turn>`/`<end_of_turn>` in the text map to their
    single ids (they are user-defined pieces in Gemma's vocabulary), so a
    string from `format_chat` tokenizes as Gemma expects.

    Args:
        proto: string or bytes. Path to a SentencePiece model file (Hugging
            Face's `tokenizer.model`, KerasHub's `vocabulary.spm`) or its
            serialized bytes. `None` leaves the vocabulary unset until
            `set_proto`/`load_assets`.
        **kwargs: passed to `keras_hub.tokenizers.SentencePieceTokenizer`
            (`sequence_length`, `dtype`, `name`, ...).

    Example:

    >>> import io
    >>> import sentencepiece
    >>> model = io.BytesIO()
    >>> sentencepiece.SentencePieceTrainer.train(
    ...     sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"]),
    ...     model_writer=model, model_type="bpe", vocab_size=40,
    ...     hard_vocab_limit=False, add_dummy_prefix=False,
    ...     pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
    ...     eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    ...     user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    ...     minloglevel=2)
    >>> tokenizer = Gemma2Tokenizer(proto=model.getvalue())
    >>> tokenizer.start_token_id, tokenizer.end_of_turn_token_id
    (2, 5)
    >>> token_ids = tokenizer("<start_of_turn>the fox")
    >>> int(token_ids[0]) == tokenizer.start_of_turn_token_id
    True
    >>> tokenizer.detokenize(token_ids)
    '<start_of_turn>the fox'

    Load a vocabulary from a preset directory (ours, KerasHub's or a Hugging
    Face checkpoint):

    ```python
    tokenizer = Gemma2Tokenizer.from_preset("/path/to/gemma-2-2b")
    ```
    """

    backbone_cls = Gemma2Backbone

    # Pieces, as class attributes so they exist before a vocabulary is set.
    pad_token = PAD
    end_token = EOS
    start_token = BOS
    start_of_turn_token = START_OF_TURN
    end_of_turn_token = END_OF_TURN

    def set_proto(self, proto):
        """Set the SentencePiece model and look up the special token ids.

        Args:
            proto: string path, bytes or `None`; see the class arguments.
        """
        super().set_proto(proto)
        if proto is None:
            for attribute in SPECIAL_TOKENS:
                setattr(self, f"{attribute}_id", None)
            return
        wanted = set(SPECIAL_TOKENS.values())
        found = {
            piece: index
            for index, piece in enumerate(self.get_vocabulary())
            if piece in wanted
        }
        missing = [piece for piece in SPECIAL_TOKENS.values() if piece not in found]
        if missing:
            raise ValueError(
                f"The SentencePiece vocabulary given to `{type(self).__name__}` "
                f"lacks the piece(s) {missing}. Gemma 2 needs all of "
                f"{list(SPECIAL_TOKENS.values())} (ids 0, 1, 2, 106 and 107 in "
                f"Gemma's vocabulary). Received a vocabulary of "
                f"{self.vocabulary_size()} pieces without them."
            )
        for attribute, piece in SPECIAL_TOKENS.items():
            setattr(self, f"{attribute}_id", found[piece])

    @property
    def special_tokens(self):
        """The five special pieces, in the order pad, eos, bos, turn start, end."""
        return list(SPECIAL_TOKENS.values())

    @property
    def special_token_ids(self):
        """Ids of `special_tokens`; stripped by `generate_postprocess`."""
        ids = [getattr(self, f"{attribute}_id") for attribute in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(
                "Cannot access `special_token_ids` before a vocabulary has been "
                f"set on `{type(self).__name__}`; pass `proto` or call "
                "`set_proto`."
            )
        return ids

    @property
    def end_token2_id(self):
        """`end_of_turn_token_id`, under the name KerasHub's generate reads.

        `keras_hub.models.CausalLM.generate(stop_token_ids="auto")` stops on
        `end_token_id` and, when the tokenizer has one, `end_token2_id`; so
        generation stops on `<end_of_turn>` (instruction models) as well as
        `<eos>`.
        """
        return self.end_of_turn_token_id

    @classmethod
    def from_preset(cls, preset, config_file=TOKENIZER_CONFIG_FILE, **kwargs):
        """Load the vocabulary of a preset into a `Gemma2Tokenizer`.

        Three layouts are recognised, in this order:

        1. a preset saved by `save_to_preset` (this package's or KerasHub's
           layout): `tokenizer.json` naming a `keras_gemma2>Gemma2Tokenizer`
           and `assets/tokenizer/vocabulary.spm`;
        2. a KerasHub/Kaggle Gemma preset: the same layout with a
           `keras_hub>GemmaTokenizer` (or `keras_nlp>GemmaTokenizer`, saved
           before KerasNLP became KerasHub); its vocabulary (and `sequence_length`,
           `add_bos`, `add_eos`) load into this class;
        3. a Hugging Face checkpoint directory with `tokenizer.model`
           (a `tokenizer.json` there is Hugging Face's own format and is
           not read);
        4. a `.gguf` file (llama.cpp's format): the SentencePiece model is
           rebuilt from its `tokenizer.ggml.*` keys.

        Args:
            preset: string. A local directory, or a remote handle
                (`"hf://..."`, `"kaggle://..."`) resolved as by
                `Gemma2CausalLM.from_preset`.
            config_file: string. Name of the Keras tokenizer config in the
                preset. Defaults to `"tokenizer.json"`.
            **kwargs: constructor arguments that override the saved ones,
                e.g. `sequence_length`.

        Raises:
            FileNotFoundError: the directory is missing, or holds none of the
                files above (the message lists the files looked for).
            ValueError: the saved tokenizer is of another class, or its JSON is
                unreadable, or the vocabulary lacks a Gemma special token.

        Example:

        ```python
        tokenizer = Gemma2Tokenizer.from_preset("/path/to/gemma-2-2b")
        tokenizer.end_of_turn_token_id  # 107
        ```
        """
        # Imported here: checkpoints/ sits above models/ in the package.
        from keras_gemma2.checkpoints.preset_loading import resolve_preset

        directory = resolve_preset(preset)
        gguf_proto = _gguf_vocabulary(directory)
        if gguf_proto is not None:
            return cls(proto=gguf_proto, **kwargs)
        config_path = os.path.join(directory, config_file)
        saved = read_compatible_config(
            config_path, COMPATIBLE_CLASSES, _KERAS_HUB_ARGUMENTS
        )
        if saved is not None:
            registered_name, config = saved
            asset_directory = os.path.splitext(config_file)[0]
            vocabulary_path = os.path.join(
                directory, "assets", asset_directory, VOCABULARY_FILE
            )
            if not os.path.isfile(vocabulary_path):
                raise FileNotFoundError(
                    f"{config_path} names a {registered_name!r}, but its "
                    f"vocabulary file {vocabulary_path} does not exist."
                )
            config.update(kwargs)
            config["proto"] = _read_bytes(vocabulary_path)
            return cls.from_config(config)
        hf_path = os.path.join(directory, HF_VOCABULARY_FILE)
        if os.path.isfile(hf_path):
            return cls(proto=_read_bytes(hf_path), **kwargs)
        raise FileNotFoundError(
            f"Found no Gemma tokenizer in {directory}. Looked for {config_file} "
            f"with assets/{os.path.splitext(config_file)[0]}/{VOCABULARY_FILE} "
            f"(a keras_gemma2 or KerasHub preset) and {HF_VOCABULARY_FILE} (a "
            "Hugging Face checkpoint; its tokenizer.json alone is not enough)."
        )


def _read_bytes(path):
    """The contents of `path` as bytes."""
    with open(path, "rb") as file:
        return file.read()


def read_compatible_config(path, compatible_classes, keras_hub_arguments):
    """`(registered_name, config)` of a saved object we can rebuild, or `None`.

    Args:
        path: a Keras config file (e.g. `tokenizer.json`); `None` is
            returned when it is absent or is no serialized Keras object.
        compatible_classes: registered names accepted, ours first.
        keras_hub_arguments: the arguments kept from a KerasHub config (ours
            keeps all of its own).

    Raises:
        ValueError: the file describes another class (the message names the
            file, the class and the ones expected).
    """
    saved = read_keras_config(path)
    if saved is None:
        return None
    registered_name = saved.get("registered_name")
    if registered_name not in compatible_classes:
        raise ValueError(
            f"{path} describes a {registered_name!r}, expected one of "
            f"{list(compatible_classes)}."
        )
    config = dict(saved.get("config") or {})
    if registered_name != compatible_classes[0]:
        config = {k: v for k, v in config.items() if k in keras_hub_arguments}
    return registered_name, config


def read_keras_config(path):
    """A serialized Keras object in `path`, or `None` if absent or not one."""
    if not os.path.isfile(path):
        return None
    config = read_json(path)
    # Hugging Face's tokenizer.json has "model"/"added_tokens", no "class_name".
    if isinstance(config, dict) and "class_name" in config and "config" in config:
        return config
    return None


def _gguf_vocabulary(path):
    """The SentencePiece model a `.gguf` file holds, `None` for other presets."""
    from keras_gemma2.checkpoints import gguf_import

    if not gguf_import.is_gguf_file(path):
        return None
    proto = gguf_import.read_gguf_tokenizer(gguf_import.GGUFFile(path))
    if proto is None:
        raise FileNotFoundError(
            f"{path} holds no vocabulary: it has no `tokenizer.ggml.tokens` key."
        )
    return proto

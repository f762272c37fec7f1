"""`TruncatingStartEndPacker`: `StartEndPacker` with a truncation policy.

`Gemma2CausalLMPreprocessor` packs with it: `"error"` refuses a sequence
longer than `sequence_length` (naming what was received), `"left"` keeps
its end, `"right"` its start. Works on Python lists and on TensorFlow
ragged tensors (inside `tf.data`).
"""

import keras
import keras_hub
import numpy as np


class TruncatingStartEndPacker(keras_hub.layers.StartEndPacker):
    """`StartEndPacker` that applies a `truncate` policy before packing.

    `label_positions` is set by the preprocessor while it packs for training
    (1: the packed sequence is one longer than `sequence_length`), so that
    errors name the `sequence_length` the user chose.
    """

    def __init__(self, truncate, **kwargs):
        super().__init__(**kwargs)
        self.truncate = truncate
        self.label_positions = 0

    def call(
        self,
        inputs,
        sequence_length=None,
        add_start_value=True,
        add_end_value=True,
    ):
        packed_length = sequence_length or self.sequence_length
        specials = []
        if add_start_value and self.start_value is not None:
            specials += self.start_value
        if add_end_value and self.end_value is not None:
            specials += self.end_value
        room = max(packed_length - len(specials), 0)
        policy = _TruncationPolicy(
            self.truncate,
            room=room,
            sequence_length=packed_length - self.label_positions,
            special_count=len(specials),
        )
        inputs = policy.apply(inputs)
        return super().call(
            inputs,
            sequence_length=sequence_length,
            add_start_value=add_start_value,
            add_end_value=add_end_value,
        )


class _TruncationPolicy:
    """Check or cut token rows `[batch, None]` (or one row) to `room` tokens."""

    HEAD = "Received a text longer than `sequence_length` allows: text"

    def __init__(self, truncate, room, sequence_length, special_count):
        self.truncate = truncate
        self.room = room
        self.sequence_length = sequence_length
        self.special_count = special_count

    def tail(self):
        """The part of the error message after the token count."""
        return (
            f"tokens, but `sequence_length={self.sequence_length}` leaves room "
            f"for {self.room} text tokens beside {self.special_count} special "
            "token(s) (<bos>, <eos>). Pass a larger `sequence_length`, shorten "
            "the text, or construct the preprocessor with `truncate='left'` "
            "(drop the start) or `truncate='right'` (drop the end)."
        )

    def apply(self, inputs):
        tf = _tensorflow()
        if (
            tf is not None
            and isinstance(inputs, (tf.Tensor, tf.RaggedTensor))
            and not tf.executing_eagerly()
        ):
            return self._apply_graph(tf, inputs)
        rows, batched = _python_rows(inputs)
        rows = [self._cut(index, row) for index, row in enumerate(rows)]
        return rows if batched else rows[0]

    def _cut(self, index, row):
        if len(row) <= self.room:
            return row
        if self.truncate == "error":
            raise ValueError(f"{self.HEAD} {index} has {len(row)} {self.tail()}")
        if self.truncate == "right":
            return row[: self.room]
        return row[len(row) - self.room :]

    def _apply_graph(self, tf, inputs):
        """The same policy on `tf.RaggedTensor` rows inside a traced graph."""
        unbatched = isinstance(inputs, tf.Tensor) and inputs.shape.rank == 1
        if isinstance(inputs, tf.RaggedTensor):
            rows = inputs
        else:
            rows = tf.RaggedTensor.from_tensor(
                inputs[tf.newaxis] if unbatched else inputs
            )
        lengths = rows.row_lengths()  # [batch]
        if self.truncate == "error":
            too_long = lengths > self.room  # [batch]
            # A sentinel row keeps argmax/gather defined on an empty batch.
            flags = tf.concat([tf.cast(too_long, "int32"), [1]], axis=0)
            index = tf.argmax(flags)  # first text that is too long
            count = tf.gather(tf.concat([lengths, [0]], axis=0), index)
            check = tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(too_long)),
                [self.HEAD, index, "has", count, self.tail()],
            )
            with tf.control_dependencies([check]):
                rows = rows.with_values(tf.identity(rows.values))
        elif self.truncate == "right":
            rows = rows[:, : self.room]
        else:
            limits = rows.row_limits()
            starts = limits - tf.minimum(lengths, self.room)
            rows = tf.gather(rows.values, tf.ragged.range(starts, limits))
        return rows[0] if unbatched else rows


def _python_rows(inputs):
    """Token rows as Python lists; return `(rows, batched)`."""
    tf = _tensorflow()
    if tf is not None and isinstance(inputs, tf.RaggedTensor):
        return inputs.to_list(), True
    if tf is not None and isinstance(inputs, tf.Tensor):
        inputs = inputs.numpy()
    if isinstance(inputs, np.ndarray) or keras.ops.is_tensor(inputs):
        array = keras.ops.convert_to_numpy(inputs)
        if array.ndim == 1:
            return [array.tolist()], False
        return array.tolist(), True
    inputs = list(inputs)
    if inputs and isinstance(inputs[0], (list, tuple, np.ndarray)):
        return [list(np.asarray(row).tolist()) for row in inputs], True
    return [inputs], False


def _tensorflow():
    """The `tensorflow` module when installed, else `None`."""
    try:
        import tensorflow
    except ImportError:
        return None
    return tensorflow

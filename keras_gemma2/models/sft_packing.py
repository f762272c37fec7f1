"""`ResponsePacker`: prompt/response segments to packed ids and loss weights.

`Gemma2CausalLMPreprocessor` packs fine-tuning rows with it. Each segment is
tokenized on its own and the token lists are concatenated, so the boundary
between prompt and response is exact. Works on Python rows (eagerly) and on
string tensors inside a TensorFlow graph (`tf.data`), with the same
truncation policy and the same errors.
"""

import numpy as np

from keras_gemma2.models.sft_rows import PAIR_KEYS, RESPONSE_SEGMENTS, sft_keys

_TOO_LONG = "Received a fine-tuning row longer than `sequence_length` allows: row"
_NO_RESPONSE = "A fine-tuning row keeps no response token after truncation: row"


class ResponsePacker:
    """Pack rows of `(prompt, response)` segments with response-only weights.

    A row is packed as `<bos>` (when `add_start_token`), then each segment's
    tokens in order, then `<eos>` (when `add_end_token`), then `<pad>` up to
    `packed_length`. Weight 1 marks response tokens and the final `<eos>`;
    `<bos>`, prompt tokens and padding get 0. Everything after `<bos>` (the
    "content") is checked or cut by `truncate`: `"error"` raises, `"left"`
    keeps the content's last tokens (prompt tokens go first), `"right"` its
    first tokens (the response's end and `<eos>` go first). A row left with
    no weighted token raises instead of silently adding no loss.

    Args:
        truncate: string. `"error"`, `"left"` or `"right"`.
        start_id, end_id, pad_id: ints. `<bos>`, `<eos>` and `<pad>` ids.
        add_start_token, add_end_token: bools.
        sequence_length: int. The user's `sequence_length` (for messages).
        packed_length: int. Length of the packed rows (`sequence_length + 1`
            when training: the last position is a label only).
    """

    def __init__(
        self,
        truncate,
        start_id,
        end_id,
        pad_id,
        add_start_token,
        add_end_token,
        sequence_length,
        packed_length,
    ):
        self.truncate = truncate
        self.start_id, self.end_id, self.pad_id = start_id, end_id, pad_id
        self.prefix = [start_id] if add_start_token else []
        self.suffix = [end_id] if add_end_token else []
        self.sequence_length = sequence_length
        self.packed_length = packed_length
        self.room = packed_length - len(self.prefix)

    # === Messages ===

    def too_long_tail(self):
        """The end of the "too long" message, after the row's counts."""
        eos = " plus <eos>" if self.suffix else ""
        return (
            f"response tokens{eos}), but `sequence_length={self.sequence_length}` "
            f"leaves room for {self.room} tokens after <bos>. Pass a larger "
            "`sequence_length`, shorten the row, or construct the preprocessor "
            "with `truncate='left'` (drops prompt tokens from the start and "
            "keeps the response's end) or `truncate='right'` (cuts the "
            "response's end and its <eos>)."
        )

    def no_response_tail(self):
        """The end of the "no response left" message, after the row's counts."""
        return (
            f"prompt tokens fill the room for {self.room} tokens that "
            f"`sequence_length={self.sequence_length}` leaves after <bos> under "
            f"`truncate={self.truncate!r}`, so the row would add no loss. Pass a "
            "larger `sequence_length`, shorten the prompt, or use "
            "`truncate='left'`, which keeps the response."
        )

    # === Python rows ===

    def pack_python(self, rows, tokenize):
        """Pack Python rows.

        Args:
            rows: list of rows, each a list of `(prompt, response)` strings.
            tokenize: a function from a list of strings to lists of ids.

        Returns:
            `(token_ids, padding_mask, weights)` NumPy arrays
            `[len(rows), packed_length]` (int32, bool, bool).
        """
        prompts = [prompt for row in rows for prompt, _ in row]
        responses = [response for row in rows for _, response in row]
        prompt_ids = iter(_as_lists(tokenize(prompts)) if prompts else [])
        response_ids = iter(_as_lists(tokenize(responses)) if responses else [])
        shape = (len(rows), self.packed_length)
        token_ids = np.full(shape, self.pad_id, dtype="int32")
        padding_mask = np.zeros(shape, dtype=bool)
        weights = np.zeros(shape, dtype=bool)
        for index, row in enumerate(rows):
            ids, flags = [], []
            prompt_count = response_count = 0
            for _ in row:
                prompt, response = next(prompt_ids), next(response_ids)
                prompt_count += len(prompt)
                response_count += len(response)
                ids += prompt + response
                flags += [False] * len(prompt) + [True] * len(response)
            ids += self.suffix
            flags += [True] * len(self.suffix)
            ids, flags = self._cut(index, ids, flags, prompt_count, response_count)
            ids = self.prefix + ids
            flags = [False] * len(self.prefix) + flags
            token_ids[index, : len(ids)] = ids
            padding_mask[index, : len(ids)] = True
            weights[index, : len(flags)] = flags
        return token_ids, padding_mask, weights

    def _cut(self, index, ids, flags, prompt_count, response_count):
        """Apply `truncate` to one row's content; raise as documented."""
        if len(ids) > self.room:
            if self.truncate == "error":
                raise ValueError(
                    f"{_TOO_LONG} {index} has {len(ids)} tokens after <bos> "
                    f"({prompt_count} prompt and {response_count} "
                    f"{self.too_long_tail()}"
                )
            kept = (
                slice(len(ids) - self.room, None)
                if self.truncate == "left"
                else slice(None, self.room)
            )
            ids, flags = ids[kept], flags[kept]
        if not any(flags):
            raise ValueError(
                f"{_NO_RESPONSE} {index} has {prompt_count} prompt tokens; they "
                f"(with {response_count} response tokens after them) "
                f"{self.no_response_tail()}"
            )
        return ids, flags

    # === TensorFlow graph ===

    def pack_graph(self, x, tokenize):
        """Pack a dict of string tensors inside a TensorFlow graph.

        Args:
            x: `{"prompts", "responses"}` string tensors of rank 0 (one row)
                or 1 (a batch), or `{"prompt_segments", "response_segments"}`
                of rank 1 (one row) or 2 (a batch, dense or ragged).
            tokenize: a function from a rank-1 string tensor to a
                `tf.RaggedTensor` of ids `[n, None]`.

        Returns:
            `(token_ids, padding_mask, weights)` tensors `[batch,
            packed_length]`, or `[packed_length]` for one row.
        """
        import tensorflow as tf

        keys = sft_keys(x)
        prompts, responses, unbatched = _graph_segments(tf, x, keys)
        checks = _graph_row_checks(tf, prompts, responses)
        with tf.control_dependencies(checks):
            prompt_ids = tokenize(tf.identity(prompts.flat_values))  # [n, None]
            response_ids = tokenize(tf.identity(responses.flat_values))
        segment_rows = prompts.value_rowids()  # [n]
        batch_size = prompts.nrows()
        prompt_counts, response_counts = (
            tf.math.unsorted_segment_sum(ids.row_lengths(), segment_rows, batch_size)
            for ids in (prompt_ids, response_ids)
        )  # [batch] each
        ids, flags = _interleave(tf, prompt_ids, response_ids)  # [tokens]
        lengths = prompt_counts + response_counts  # [batch]
        ids = tf.RaggedTensor.from_row_lengths(ids, lengths, validate=False)
        flags = tf.RaggedTensor.from_row_lengths(flags, lengths, validate=False)
        # One spare column: room for <eos>, and a valid column to gather
        # from when every row is empty.
        ids = ids.to_tensor(default_value=self.pad_id)  # [batch, width]
        ids = tf.pad(ids, [[0, 0], [0, 1]], constant_values=self.pad_id)
        flags = tf.pad(flags.to_tensor(default_value=0), [[0, 0], [0, 1]])
        if self.suffix:
            at_end = (
                tf.range(tf.shape(ids)[1])[tf.newaxis]
                == tf.cast(lengths, "int32")[:, tf.newaxis]
            )  # [batch, width]
            ids = tf.where(at_end, tf.cast(self.end_id, ids.dtype), ids)
            flags = tf.where(at_end, tf.ones_like(flags), flags)
            lengths += 1
        ids, flags, lengths = self._cut_graph(
            tf, ids, flags, lengths, prompt_counts, response_counts
        )  # [batch, room] each, lengths [batch]
        if self.prefix:
            column = tf.fill([batch_size, 1], tf.cast(self.start_id, ids.dtype))
            ids = tf.concat([column, ids], axis=1)
            flags = tf.concat([tf.zeros_like(column, flags.dtype), flags], axis=1)
            lengths += 1
        positions = tf.range(self.packed_length, dtype=lengths.dtype)
        padding_mask = positions[tf.newaxis] < lengths[:, tf.newaxis]
        token_ids = tf.cast(ids, "int32")
        weights = tf.cast(flags, "bool")
        if unbatched:
            return token_ids[0], padding_mask[0], weights[0]
        return token_ids, padding_mask, weights

    def _cut_graph(self, tf, ids, flags, lengths, prompt_counts, response_counts):
        """`_cut` on dense rows `[batch, width]` of `lengths` tokens.

        Returns `(ids, flags, lengths)`: rows `[batch, room]`, padded.
        """
        checks = []
        if self.truncate == "error":
            index, count, prompt_count, response_count = _first(
                tf, lengths > self.room, lengths, prompt_counts, response_counts
            )
            checks.append(
                tf.debugging.Assert(
                    tf.reduce_all(lengths <= self.room),
                    [
                        _TOO_LONG,
                        index,
                        "has",
                        count,
                        "tokens after <bos> (",
                        prompt_count,
                        "prompt and",
                        response_count,
                        self.too_long_tail(),
                    ],
                )
            )
        kept = tf.minimum(lengths, self.room)  # [batch]
        starts = lengths - kept if self.truncate == "left" else tf.zeros_like(kept)
        columns = tf.range(self.room, dtype=lengths.dtype)[tf.newaxis]  # [1, room]
        valid = columns < kept[:, tf.newaxis]  # [batch, room]
        last_column = tf.cast(tf.shape(ids)[1] - 1, lengths.dtype)
        gathered = tf.minimum(starts[:, tf.newaxis] + columns, last_column)
        ids = tf.gather(ids, gathered, batch_dims=1)  # [batch, room]
        flags = tf.gather(flags, gathered, batch_dims=1)
        ids = tf.where(valid, ids, tf.cast(self.pad_id, ids.dtype))
        flags = tf.where(valid, flags, tf.zeros_like(flags))
        empty = tf.reduce_sum(tf.cast(flags, "int32"), axis=1) == 0  # [batch]
        index, prompt_count, response_count = _first(
            tf, empty, prompt_counts, response_counts
        )
        checks.append(
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(empty)),
                [
                    _NO_RESPONSE,
                    index,
                    "has",
                    prompt_count,
                    "prompt tokens; they (with",
                    response_count,
                    "response tokens after them)",
                    self.no_response_tail(),
                ],
            )
        )
        with tf.control_dependencies(checks):
            return tf.identity(ids), flags, kept


def _as_lists(token_ids):
    """Token rows (lists, arrays or a ragged tensor) as lists of ints."""
    if hasattr(token_ids, "to_list"):
        return token_ids.to_list()
    return [list(np.asarray(row).tolist()) for row in token_ids]


def _graph_segments(tf, x, keys):
    """`(prompts, responses, unbatched)`: ragged string rows `[batch, None]`."""
    prompts, responses = (_string_tensor(tf, x[key], key) for key in keys)
    ranks = (prompts.shape.rank, responses.shape.rank)
    batched_rank = 1 if keys == PAIR_KEYS else 2
    if ranks[0] != ranks[1] or ranks[0] not in (batched_rank - 1, batched_rank):
        raise ValueError(
            f"Received `{keys[0]}` of rank {ranks[0]} and `{keys[1]}` of rank "
            f"{ranks[1]}, expected both of rank {batched_rank - 1} (one row) or "
            f"{batched_rank} (a batch of rows)."
        )
    unbatched = ranks[0] == batched_rank - 1
    if unbatched:
        prompts, responses = prompts[tf.newaxis], responses[tf.newaxis]
    if keys == PAIR_KEYS:
        prompts, responses = prompts[:, tf.newaxis], responses[:, tf.newaxis]
    rows = [
        tensor
        if isinstance(tensor, tf.RaggedTensor)
        else tf.RaggedTensor.from_tensor(tensor)
        for tensor in (prompts, responses)
    ]
    return rows[0], rows[1], unbatched


def _string_tensor(tf, value, key):
    """`value` as a string `tf.Tensor`/`tf.RaggedTensor`, else `TypeError`."""
    if not isinstance(value, tf.RaggedTensor):
        value = tf.convert_to_tensor(value)
    if value.dtype != tf.string:
        raise TypeError(
            f"Received a `{key}` tensor of dtype {value.dtype.name}, expected strings."
        )
    return value


def _graph_row_checks(tf, prompts, responses):
    """Assertions: equal row counts, equal segment counts, no empty response."""
    row_count = (
        "Received `prompts`/`prompt_segments` and `responses`/"
        "`response_segments` with different numbers of rows:"
    )
    checks = [
        tf.debugging.Assert(
            tf.equal(prompts.nrows(), responses.nrows()),
            [row_count, prompts.nrows(), "and", responses.nrows()],
        )
    ]
    # Only compare rows when the counts agree (else the check above fires).
    prompt_lengths = prompts.row_lengths()
    response_lengths = tf.cond(
        tf.equal(prompts.nrows(), responses.nrows()),
        responses.row_lengths,
        lambda: prompt_lengths,
    )
    bad = (prompt_lengths != response_lengths) | (response_lengths == 0)
    index, prompt_count, response_count = _first(
        tf, bad, prompt_lengths, response_lengths
    )
    checks.append(
        tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(bad)),
            [
                "Row",
                index,
                "has",
                prompt_count,
                "prompt segments and",
                response_count,
                "response segments, expected the same number, at least one.",
            ],
        )
    )
    empty = tf.equal(responses.flat_values, "")  # [segments]
    _, row = _first(tf, empty, responses.value_rowids())
    checks.append(
        tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(empty)),
            [
                "Row",
                row,
                f"has no response: an empty string in `responses`/"
                f"`{RESPONSE_SEGMENTS}`, expected a non-empty string (the text "
                "the model learns).",
            ],
        )
    )
    return checks


def _first(tf, flags, *values):
    """`(index, *value)`: the first `True` in `flags` and each of `values` there.

    A sentinel keeps it defined when no flag is set (or the batch is empty):
    the index is then `len(flags)` and the values 0.
    """
    index = tf.argmax(tf.concat([tf.cast(flags, "int32"), [1]], axis=0))
    picked = (
        tf.gather(tf.concat([value, tf.zeros([1], value.dtype)], axis=0), index)
        for value in values
    )
    return (index, *picked)


def _interleave(tf, prompt_ids, response_ids):
    """Segment tokens in row order: `(ids, flags)`, both `[tokens]`.

    Segment i contributes its prompt tokens, then its response tokens
    (flag 1); segments follow each other in order, so the rows' tokens
    come out one row after another.
    """
    prompt_values = prompt_ids.flat_values
    values = tf.concat([prompt_values, response_ids.flat_values], axis=0)
    prompt_size = tf.shape(prompt_values, out_type="int64")[0]
    starts = tf.stack(
        [prompt_ids.row_starts(), response_ids.row_starts() + prompt_size], axis=1
    )  # [n, 2]
    sizes = tf.stack([prompt_ids.row_lengths(), response_ids.row_lengths()], axis=1)
    starts, sizes = tf.reshape(starts, [-1]), tf.reshape(sizes, [-1])  # [2n]
    index = tf.ragged.range(starts, starts + sizes).flat_values  # [tokens]
    flags = tf.cast(index >= prompt_size, "int32")
    return tf.gather(values, index), flags

"""The attention core behind one dispatch function, `attention`.

Self-attention over `T` positions (a forward pass, or a prefill that fills
its cache). `"reference"` is the portable masked computation (full `[T, T]`
logits) and the definition of the result; every other implementation must equal it:

- `"blocked"`: portable `keras.ops`. The queries are cut into blocks of
  `block_size`. On local (sliding-window) layers a block attends only to
  the key blocks its window can reach, so logits cost `O(T * window)`
  instead of `O(T^2)`, in memory and in FLOPs. On global layers a block
  attends to the keys up to its end (`causal_blocked_attention`): half the
  FLOPs of the full masked computation, and `O(T * block)` logits alive at
  once. Global blocks need a static length.
- `"flex"`: PyTorch `flex_attention` (compiled), local and global layers; see
  `torch_flex_attention`.
- `"fused"`: `keras.ops.dot_product_attention`. Keras applies
  `attn_logits_soft_cap` only with JAX on TPU, so with a soft cap it runs
  there only; without one it runs on every backend.
- `"auto"`: the fastest exact choice for the backend and device.

Masked-row semantics (kept by every implementation): masked logits are a
finite `-1e9`, so a query with no visible key (possible only with a padding
mask) gets a uniform softmax over all `T` keys. Fast paths compute such rows
as the mean of the values, as the reference does.
"""

import warnings

import keras
from keras import ops

from keras_gemma2.layers.attention_masks import (
    attention_mask,
    sliding_window_mask,
    visible_key_counts,
)
from keras_gemma2.layers.soft_capping import soft_cap as apply_soft_cap

ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "blocked", "flex", "fused")

# Logits of masked positions. Finite so that a row with no visible key (a
# padded query) gives a uniform softmax instead of NaN.
MASKED_LOGIT = -1e9

# "auto" uses compiled flex attention on torch from this many tokens. Each
# new length compiles once per process, 10-20 s on a 2-core CPU with a cold
# cache. At 4096 tokens (window 512, 8/4 heads, head_dim 64) flex took 0.11 s
# per local and 0.53 s per global layer against 0.23 s blocked and 1.33 s
# reference: a model with a dozen global layers pays the compilation back in
# one or two calls there, while at 2048 the savings are a quarter of that
# (see benchmarks/prefill.py).
FLEX_MIN_LENGTH = 4096

# Query block of the causal blocked kernel (global layers), which "auto" uses
# from two blocks on. Per global layer (8 query / 4 key-value heads, head_dim
# 64, soft cap, 2-core CPU), full masked attention vs blocks of 256 / 512 /
# 1024: at 2048 tokens jax 0.38 s vs 0.18 / 0.21 / 0.26, tensorflow 0.14 vs
# 0.07 / 0.08 / 0.11, torch 0.48 vs 0.12 / 0.22 / 0.34; at 8192 tokens jax
# 10.2 vs 2.9 / 3.0 / 3.1 s, tensorflow 2.2 vs 1.1 s for each block, torch
# 8.5 vs 3.3 / 3.9 / 4.3 s, with peak memory 8.4 -> 2.7 GB (jax) and 7.6 ->
# 1.8 GB (torch). At 512 tokens (two blocks) it is already no slower.
GLOBAL_BLOCK_SIZE = 256


def validate_attention_implementation(value, name="attention_implementation"):
    """Return `value` if it names an implementation, else raise `ValueError`."""
    if not isinstance(value, str) or value not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected one of "
            f"{ATTENTION_IMPLEMENTATIONS}. Received: {name}={value!r}"
        )
    return value


def default_block_size(sliding_window_size):
    """Query block of the blocked kernel: a power of two near `window / 2`, <= 512.

    A block reads `window + block - 1` keys per query (rounded up to whole
    blocks), so smaller blocks waste less but make more, smaller matmuls. At
    window 512 and 2048 tokens (2-core CPU), blocks of 256 measured fastest
    under XLA (jax 122 ms, tensorflow 36 ms vs 164 / 79 ms at 128 and 157 /
    50 ms at 512); torch eager was within noise of 128. Capped at 512 so that
    Gemma's 4096 window reads 4608 keys per query, not 6144. Never below 16 or
    above the window.
    """
    block = 16
    while block * 4 <= sliding_window_size and block < 512:
        block *= 2
    return min(block, sliding_window_size)


def _block_geometry(length, sliding_window_size, block_size):
    """`(block, num_blocks, previous_blocks)` for `length` queries.

    `length` may be a Python int or a scalar tensor (dynamic shapes on
    TensorFlow); only a static length shrinks the block to the sequence.
    """
    block = block_size or default_block_size(sliding_window_size)
    static = isinstance(length, int)
    if static:
        block = min(block, length)
    num_blocks = (length + block - 1) // block
    previous = -(-(sliding_window_size - 1) // block)
    if static:
        previous = min(previous, num_blocks - 1)
    return block, num_blocks, previous


def blocked_pays_off(length, sliding_window_size, block_size=None):
    """Whether the blocked kernel computes fewer logits than the reference.

    For a Python int, compares `padded_length * (previous_blocks + 1) *
    block` with `length ** 2`. For a scalar tensor (dynamic length), uses
    `length > (previous_blocks + 2) * block`, which implies it.
    """
    if isinstance(length, int):
        block, num_blocks, previous = _block_geometry(
            length, sliding_window_size, block_size
        )
        return num_blocks * block * (previous + 1) * block < length * length
    block = block_size or default_block_size(sliding_window_size)
    previous = -(-(sliding_window_size - 1) // block)
    return length > (previous + 2) * block


def _static_length(x):
    length = x.shape[1]
    return length if isinstance(length, int) else None


def choose_implementation(
    implementation,
    query,
    sliding_window_size=None,
    soft_cap=None,
    padding=False,
    dropout=False,
    block_size=None,
):
    """The implementation `attention` runs for these inputs.

    Args:
        implementation: one of `ATTENTION_IMPLEMENTATIONS`.
        query: tensor `[B, T, N, H]` (its length, backend and device count).
        sliding_window_size: int or `None` (a global layer).
        soft_cap: float or `None`.
        padding: bool. Whether a key padding mask is given.
        dropout: bool. Whether dropout acts on the probabilities.
        block_size: int or `None`; see `attention`.

    Returns:
        `"reference"`, `"blocked"`, `"flex"` or `"fused"`. A requested
        backend-specific path that cannot run here falls back to the portable
        choice with a warning saying why.
    """
    validate_attention_implementation(implementation, "implementation")
    if implementation == "reference":
        return "reference"
    length = _static_length(query)
    local = sliding_window_size is not None
    if local and length is None:
        portable = "blocked"  # decided at run time, see `attention`
    elif local and (
        implementation == "blocked"
        or blocked_pays_off(length, sliding_window_size, block_size)
    ):
        portable = "blocked"
    elif (
        not local
        and length is not None
        and (
            implementation == "blocked"
            or length >= 2 * (block_size or GLOBAL_BLOCK_SIZE)
        )
    ):
        portable = "blocked"  # causal blocks, see `causal_blocked_attention`
    else:
        portable = "reference"
    if implementation == "blocked":
        return portable
    if implementation == "auto":
        if length is not None and length >= FLEX_MIN_LENGTH and not dropout:
            if _flex_reason(query, length) is None:
                return "flex"
        return portable
    if implementation == "flex":
        reason = "dropout needs explicit probabilities" if dropout else None
        reason = reason or _flex_reason(query, length)
    else:
        reason = _fused_reason(query, length, soft_cap, padding, dropout)
    if reason is None:
        return implementation
    warnings.warn(
        f"attention_implementation={implementation!r} cannot run here: {reason}. "
        f"Using {portable!r}.",
        stacklevel=3,
    )
    return portable


def _flex_reason(query, length):
    if length is None:
        return "the sequence length is not static"
    from keras_gemma2.layers.torch_flex_attention import flex_unavailable_reason

    return flex_unavailable_reason(query)


def _fused_reason(query, length, soft_cap, padding, dropout):
    if dropout:
        return "dropout needs explicit probabilities"
    if length is None:
        return "the sequence length is not static"
    if soft_cap is None:
        return None
    if keras.config.backend() != "jax":
        return "keras.ops.dot_product_attention applies a soft cap only with JAX on TPU"
    import jax

    if jax.devices()[0].platform != "tpu":
        return "keras.ops.dot_product_attention applies a soft cap only with JAX on TPU"
    if padding:
        # Keras' TPU path keeps only batch row 0 of a mask.
        return "the TPU kernel takes one mask for the whole batch, not a padding mask"
    if query.shape[0] is None:
        return "the TPU kernel needs a static batch size"
    if length % 128 or query.shape[-1] % 128:
        # Keras catches the Splash kernel's error and silently runs XLA
        # attention without the cap instead; refuse before that happens.
        return "the TPU kernel needs a length and head_dim that are multiples of 128"
    return None


def attention(
    query,
    key,
    value,
    padding_mask=None,
    sliding_window_size=None,
    soft_cap=None,
    implementation="auto",
    dropout=None,
    block_size=None,
):
    """Grouped-query self-attention with Gemma 2's soft cap and masks.

    Queries, keys and values are the same `T` positions (a forward pass, or
    a prefill that fills its cache; decode steps over a cache use
    `cached_attention`). `logits = q . k`, soft-capped `cap * tanh(logits /
    cap)`, masked (causal, sliding window, key padding), float32 softmax,
    weighted sum of values. Each of the `K` key/value heads serves `N / K`
    consecutive query heads.

    Args:
        query: `[B, T, N, H]`, already scaled by `query_pre_attn_scalar ** -0.5`.
        key: `[B, T, K, H]`.
        value: `[B, T, K, H]`.
        padding_mask: optional `[B, T]`, nonzero/True for real keys.
        sliding_window_size: int or `None`. A query at position `i` sees keys
            `j` with `i - sliding_window_size < j <= i`; `None` is causal.
        soft_cap: float or `None`.
        implementation: string, one of `ATTENTION_IMPLEMENTATIONS`; see
            `choose_implementation`. Defaults to `"auto"`.
        dropout: optional callable applied to the attention probabilities
            (training); fast paths without explicit probabilities step aside.
        block_size: optional int, query block of the blocked kernels.
            Defaults to `default_block_size(sliding_window_size)` on local
            layers and `GLOBAL_BLOCK_SIZE` on global ones.

    Returns:
        `[B, T, N, H]` in the dtype of `value`.

    Example:

    >>> import numpy as np
    >>> q = np.random.normal(size=(1, 12, 4, 8)).astype("float32")
    >>> kv = np.random.normal(size=(1, 12, 2, 8)).astype("float32")
    >>> full = attention(q, kv, kv, sliding_window_size=3, soft_cap=50.0,
    ...                  implementation="reference")
    >>> blocked = attention(q, kv, kv, sliding_window_size=3, soft_cap=50.0,
    ...                     implementation="blocked")
    >>> bool(np.allclose(full, blocked, atol=1e-6))
    True
    """
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 1
    ):
        raise ValueError(
            "Received an invalid value for `block_size`, expected a positive "
            f"integer or None. Received: block_size={block_size!r}"
        )
    query = ops.convert_to_tensor(query)
    key = ops.convert_to_tensor(key)
    value = ops.convert_to_tensor(value)
    if padding_mask is not None:
        padding_mask = ops.convert_to_tensor(padding_mask)
    chosen = choose_implementation(
        implementation,
        query,
        sliding_window_size=sliding_window_size,
        soft_cap=soft_cap,
        padding=padding_mask is not None,
        dropout=dropout is not None,
        block_size=block_size,
    )
    if chosen == "reference":
        positions = ops.arange(ops.shape(query)[1], dtype="int32")
        mask = attention_mask(
            positions, positions, sliding_window_size, padding_mask
        )  # [B or 1, T, T]
        return reference_attention(query, key, value, mask, soft_cap, dropout)

    def exact_rows(outputs):
        if padding_mask is None:
            return outputs  # every query sees at least itself
        return _average_rows_without_keys(
            outputs, value, padding_mask, sliding_window_size
        )

    if chosen == "blocked" and sliding_window_size is None:
        return exact_rows(
            causal_blocked_attention(
                query, key, value, padding_mask, soft_cap, dropout, block_size
            )
        )
    if chosen == "blocked":

        def blocked():
            return exact_rows(
                blocked_attention(
                    query,
                    key,
                    value,
                    padding_mask,
                    sliding_window_size,
                    soft_cap,
                    dropout,
                    block_size,
                )
            )

        if _static_length(query) is not None or implementation != "auto":
            return blocked()
        # Dynamic length (TensorFlow graphs): pick the kernel at run time.
        return ops.cond(
            blocked_pays_off(ops.shape(query)[1], sliding_window_size, block_size),
            blocked,
            lambda: attention(
                query,
                key,
                value,
                padding_mask,
                sliding_window_size,
                soft_cap,
                implementation="reference",
                dropout=dropout,
            ),
        )
    if chosen == "flex":
        from keras_gemma2.layers.torch_flex_attention import flex_attention

        return exact_rows(
            flex_attention(
                query, key, value, padding_mask, sliding_window_size, soft_cap
            )
        )
    return exact_rows(
        fused_attention(query, key, value, padding_mask, sliding_window_size, soft_cap)
    )


def _average_rows_without_keys(outputs, value, padding_mask, sliding_window_size):
    """Rows with no visible key become the reference's uniform average of `value`.

    outputs: `[B, T, N, H]`; value: `[B, T, K, H]`; padding_mask: `[B, T]`.
    """
    num_heads = outputs.shape[2]
    kv_heads = value.shape[2]
    empty = visible_key_counts(padding_mask, sliding_window_size) == 0  # [B, T]
    # The reference weighs every key by 1/S rounded to the value dtype.
    weight = ops.cast(1.0 / ops.cast(ops.shape(value)[1], "float32"), value.dtype)
    uniform = ops.sum(ops.cast(value, "float32"), axis=1) * ops.cast(weight, "float32")
    uniform = ops.repeat(uniform, num_heads // kv_heads, axis=1)  # [B, N, H]
    uniform = ops.cast(uniform, outputs.dtype)[:, None]  # [B, 1, N, H]
    return ops.where(empty[:, :, None, None], uniform, outputs)


def masked_probabilities(logits, mask, soft_cap, dtype, dropout):
    """Soft cap, mask and float32 softmax over the last axis, cast to `dtype`.

    logits: `[..., S]`; mask: bool, broadcastable to `logits`.
    """
    logits = apply_soft_cap(ops.cast(logits, "float32"), soft_cap)
    logits = ops.where(mask, logits, MASKED_LOGIT)
    if len(logits.shape) > 5:
        # TensorFlow's CPU softmax takes at most 5-D: use a 2-D view.
        shape = ops.shape(logits)
        logits = ops.reshape(logits, (-1, logits.shape[-1]))
        probabilities = ops.reshape(ops.softmax(logits, axis=-1), shape)
    else:
        probabilities = ops.softmax(logits, axis=-1)
    probabilities = ops.cast(probabilities, dtype)
    if dropout is not None:
        probabilities = dropout(probabilities)
    return probabilities


def reference_attention(query, key, value, mask, soft_cap=None, dropout=None):
    """Masked full attention: the definition every fast path must equal.

    query: `[B, T, N, H]`; key, value: `[B, S, K, H]`; mask: bool
    `[B or 1, T, S]`. Returns `[B, T, N, H]`.
    """
    batch_size = ops.shape(query)[0]
    length = ops.shape(query)[1]
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads = key.shape[2]
    query = ops.reshape(
        query, (batch_size, length, kv_heads, num_heads // kv_heads, head_dim)
    )  # [B, T, K, G, H]
    logits = ops.einsum("btkgh,bskh->bkgts", query, key)  # [B, K, G, T, S]
    probabilities = masked_probabilities(
        logits, mask[:, None, None], soft_cap, value.dtype, dropout
    )
    attended = ops.einsum("bkgts,bskh->btkgh", probabilities, value)
    return ops.reshape(attended, (batch_size, length, num_heads, head_dim))


def blocked_attention(
    query,
    key,
    value,
    padding_mask=None,
    sliding_window_size=None,
    soft_cap=None,
    dropout=None,
    block_size=None,
):
    """Sliding-window self-attention in query blocks: `O(T * window)` logits.

    The `T` queries are padded to `num_blocks * block`. Block `b` covers
    positions `[b * block, (b + 1) * block)` and needs keys from
    `b * block - (window - 1)` on: its own block and the `previous` blocks
    before it (`previous = ceil((window - 1) / block)`). Relative to the
    block, a query at `previous * block + qi` and a key at `si` are as far
    apart in every block, so one static `[block, (previous + 1) * block]`
    window mask serves all blocks; keys before 0, past `T` or padded are
    masked per block. Rows with no visible key are fixed by the caller.

    Args:
        query: `[B, T, N, H]` (scaled).
        key, value: `[B, T, K, H]`, the same positions as the queries.
        padding_mask: optional `[B, T]`.
        sliding_window_size: int, the window.
        soft_cap: float or `None`.
        dropout: optional callable on the probabilities.
        block_size: optional int; see `default_block_size`.

    Returns:
        `[B, T, N, H]`.
    """
    if sliding_window_size is None:
        raise ValueError(
            "The blocked kernel serves sliding-window layers only. Received: "
            "sliding_window_size=None"
        )
    batch_size = ops.shape(query)[0]
    length = _static_length(query) or ops.shape(query)[1]
    num_heads, head_dim = query.shape[2], query.shape[3]
    kv_heads = key.shape[2]
    groups = num_heads // kv_heads
    block, num_blocks, previous = _block_geometry(
        length, sliding_window_size, block_size
    )
    span = (previous + 1) * block  # keys seen by one query block
    tail = num_blocks * block - length

    # Heads lead and each block's queries are contiguous, so both products
    # are plain batched matmuls over (B, K, nb), forward and backward (an
    # einsum over the [B, nb, c, K, G, H] layout was 3x slower in torch's
    # backward).
    query = ops.pad(query, [[0, 0], [0, tail], [0, 0], [0, 0]])
    query = ops.reshape(
        query, (batch_size, num_blocks, block, kv_heads, groups, head_dim)
    )
    query = ops.transpose(query, (0, 3, 1, 4, 2, 5))  # [B, K, nb, G, c, H]
    query = ops.reshape(
        query, (batch_size, kv_heads, num_blocks, groups * block, head_dim)
    )  # [B, K, nb, G*c, H]

    def key_windows(x):
        """`[B, K, T, ...]` -> `[B, K, nb, span, ...]`: each query block's keys."""
        rest = [[0, 0]] * (len(x.shape) - 3)
        x = ops.pad(x, [[0, 0], [0, 0], [previous * block, tail]] + rest)
        x = ops.reshape(
            x,
            (ops.shape(x)[0], x.shape[1], num_blocks + previous, block)
            + tuple(x.shape[3:]),
        )  # [B, K, nb + previous, c, ...]
        parts = [x[:, :, s : s + num_blocks] for s in range(previous + 1)]
        return ops.concatenate(parts, axis=3) if previous else parts[0]

    keys = key_windows(ops.transpose(key, (0, 2, 1, 3)))  # [B, K, nb, span, H]
    values = key_windows(ops.transpose(value, (0, 2, 1, 3)))  # [B, K, nb, span, H]
    if padding_mask is None:
        real = ops.ones((1, 1, length), "int32")
    else:
        real = ops.cast(ops.cast(padding_mask, "bool"), "int32")[:, None]
    keys_real = ops.cast(key_windows(real), "bool")  # [B or 1, 1, nb, span]
    window = sliding_window_mask(
        ops.arange(block, dtype="int32") + previous * block,
        ops.arange(span, dtype="int32"),
        sliding_window_size,
    )  # [c, span]
    window = ops.tile(window, (groups, 1))  # [G*c, span]: rows g*c + qi
    mask = ops.logical_and(window, keys_real[:, :, :, None, :])

    logits = ops.matmul(query, ops.swapaxes(keys, -1, -2))  # [B, K, nb, G*c, span]
    probabilities = masked_probabilities(logits, mask, soft_cap, value.dtype, dropout)
    attended = ops.matmul(probabilities, values)  # [B, K, nb, G*c, H]
    attended = ops.reshape(
        attended, (batch_size, kv_heads, num_blocks, groups, block, head_dim)
    )
    attended = ops.transpose(attended, (0, 2, 4, 1, 3, 5))  # [B, nb, c, K, G, H]
    attended = ops.reshape(
        attended, (batch_size, num_blocks * block, num_heads, head_dim)
    )
    return attended[:, :length]


def causal_blocked_attention(
    query,
    key,
    value,
    padding_mask=None,
    soft_cap=None,
    dropout=None,
    block_size=None,
):
    """Causal (global-layer) self-attention in query blocks: half the logits.

    Query block `b` (positions `[b * block, (b + 1) * block)`) attends to the
    keys `[0, (b + 1) * block)`, so the blocks together compute the causal
    triangle, `T * (T + block) / 2` logits instead of `T^2`, and at most
    `block * T` of them exist at once instead of `T^2`. Each block is the
    reference computation on its key prefix (every key a query may see is in
    it), so its softmax is exact. Blocks have different shapes: the length
    must be static (the loop is unrolled). Rows with no visible key are fixed
    by the caller.

    Args:
        query: `[B, T, N, H]` (scaled).
        key, value: `[B, T, K, H]`, the same positions as the queries.
        padding_mask: optional `[B, T]`.
        soft_cap: float or `None`.
        dropout: optional callable on the probabilities.
        block_size: optional int; defaults to `GLOBAL_BLOCK_SIZE`.

    Returns:
        `[B, T, N, H]`.
    """
    length = _static_length(query)
    if length is None:
        raise ValueError(
            "The causal blocked kernel needs a static sequence length. "
            f"Received: query of shape {tuple(query.shape)}"
        )
    block = block_size or GLOBAL_BLOCK_SIZE
    positions = ops.arange(length, dtype="int32")
    outputs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        mask = attention_mask(
            positions[start:end],
            positions[:end],
            None,
            None if padding_mask is None else padding_mask[:, :end],
        )
        outputs.append(
            reference_attention(
                query[:, start:end],
                key[:, :end],
                value[:, :end],
                mask,
                soft_cap,
                dropout,
            )
        )
    return ops.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


def fused_attention(
    query, key, value, padding_mask=None, sliding_window_size=None, soft_cap=None
):
    """Self-attention through `keras.ops.dot_product_attention`.

    With a soft cap this runs only with JAX on TPU (Keras' Splash kernel,
    which applies `cap * tanh(logits / cap)`); the mask is then a concrete
    host array, because Keras falls back to XLA attention without the cap
    when it is traced, and `scale=None`, because that path multiplies the
    queries by `scale * sqrt(head_dim)` while Splash itself does not scale.
    Keras runs XLA attention without the cap whenever Splash raises, so
    `choose_implementation` only sends it shapes Splash takes (untested here:
    no TPU; `test_fused_with_soft_cap_equals_reference` runs on one).
    Without a soft cap it runs on every backend with `scale=1`.

    query: `[B, T, N, H]` (scaled); key, value: `[B, T, K, H]`;
    padding_mask: optional `[B, T]` (not with a soft cap). Returns
    `[B, T, N, H]`; rows with no visible key are fixed by the caller.
    """
    length = query.shape[1]
    if soft_cap is not None:
        import numpy as np

        positions = np.arange(length)
        distance = positions[:, None] - positions[None, :]
        visible = distance >= 0
        if sliding_window_size is not None:
            visible &= distance < sliding_window_size
        mask = np.broadcast_to(visible, (query.shape[0], length, length))
        return ops.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=None,
            attn_logits_soft_cap=soft_cap,
        )
    positions = ops.arange(length, dtype="int32")
    mask = attention_mask(positions, positions, sliding_window_size, padding_mask)
    if padding_mask is not None:
        # A row with no visible key gets its own key, so no kernel sees an
        # empty row (some return NaN there); the caller overwrites it.
        empty = visible_key_counts(padding_mask, sliding_window_size) == 0
        diagonal = ops.eye(length, dtype="bool")
        mask = ops.logical_or(mask, ops.logical_and(empty[:, :, None], diagonal[None]))
    outputs = ops.dot_product_attention(
        query, key, value, mask=mask[:, None], scale=1.0
    )
    return ops.cast(outputs, value.dtype)


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "attention",
    "blocked_attention",
    "causal_blocked_attention",
    "choose_implementation",
    "default_block_size",
    "fused_attention",
    "reference_attention",
    "validate_attention_implementation",
]

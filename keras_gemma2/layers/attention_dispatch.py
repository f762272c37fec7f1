"""The attention core behind one dispatch function, `attention`.

Self-attention over `T` positions (a forward pass, or a prefill that fills
its cache). `"reference"` is the portable masked computation (full `[T, T]`
logits, `attention_reference`) and the definition of the result; every
other implementation must equal it:

- `"blocked"`: portable `keras.ops`. The queries are cut into blocks. On
  local (sliding-window) layers a block attends only to the key blocks its
  window can reach (`attention_blocked`), so logits cost `O(T * window)`
  instead of `O(T^2)`, in memory and in FLOPs. On global layers a block
  attends to the keys up to its end (`attention_causal_blocked`): half the
  FLOPs of the full masked computation, and `O(T * block)` logits alive at
  once. Global blocks need a static length.
- `"flex"`: PyTorch `flex_attention` (compiled), local and global layers; see
  `torch_flex_attention`.
- `"fused"`: `keras.ops.dot_product_attention` (`attention_fused`). Keras
  applies `attn_logits_soft_cap` only with JAX on TPU, so with a soft cap it
  runs there only; without one it runs on every backend.
- `"auto"`: the fastest exact choice for the backend and device, by the
  measured thresholds in `attention_policy`.

Masked-row semantics (kept by every implementation): masked logits are a
finite `MASKED_LOGIT` (`-1e9`), so a query with no visible key (possible only
with a padding mask) gets a uniform softmax over all `T` keys. Fast paths
compute such rows as the mean of the values, as the reference does.
"""

import warnings

from keras import ops

from keras_gemma2.layers.attention_blocked import blocked_attention, blocked_pays_off
from keras_gemma2.layers.attention_causal_blocked import causal_blocked_attention
from keras_gemma2.layers.attention_fused import (
    fused_attention,
    fused_unavailable_reason,
)
from keras_gemma2.layers.attention_masks import attention_mask, visible_key_counts
from keras_gemma2.layers.attention_policy import (
    FLEX_MIN_LENGTH,
    GLOBAL_BLOCK_SIZE,
    MIN_GLOBAL_BLOCKS,
)
from keras_gemma2.layers.attention_reference import reference_attention
from keras_gemma2.layers.torch_flex_attention import (
    flex_attention,
    flex_unavailable_reason,
)

ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "blocked", "flex", "fused")


def validate_attention_implementation(value, name="attention_implementation"):
    """Return `value` if it names an implementation, else raise `ValueError`.

    Example:

    >>> validate_attention_implementation("blocked")
    'blocked'
    """
    if not isinstance(value, str) or value not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected one of "
            f"{ATTENTION_IMPLEMENTATIONS}. Received: {name}={value!r}"
        )
    return value


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
            or length >= MIN_GLOBAL_BLOCKS * (block_size or GLOBAL_BLOCK_SIZE)
        )
    ):
        portable = "blocked"  # causal blocks, see `causal_blocked_attention`
    else:
        portable = "reference"
    if implementation == "blocked":
        return portable
    if implementation == "auto":
        if length is not None and length >= FLEX_MIN_LENGTH and not dropout:
            if flex_unavailable_reason(query) is None:
                return "flex"
        return portable
    if dropout:
        reason = "dropout needs explicit probabilities"
    elif length is None:
        reason = "the sequence length is not static"
    elif implementation == "flex":
        reason = flex_unavailable_reason(query)
    else:
        reason = fused_unavailable_reason(query, soft_cap, padding)
    if reason is None:
        return implementation
    warnings.warn(
        f"attention_implementation={implementation!r} cannot run here: {reason}. "
        f"Using {portable!r}.",
        stacklevel=3,
    )
    return portable


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
    remat=False,
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
        remat: bool. On global layers' causal blocks, rematerialize each
            query block (see `causal_blocked_attention`); ignored with
            dropout and by the other kernels. Defaults to `False`.

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
                query,
                key,
                value,
                padding_mask,
                soft_cap,
                dropout,
                block_size,
                remat=remat and dropout is None,
            )
        )
    # The leading arguments of the local and fused kernels and of `attention`.
    inputs = (query, key, value, padding_mask, sliding_window_size, soft_cap)
    if chosen == "blocked":

        def blocked():
            return exact_rows(blocked_attention(*inputs, dropout, block_size))

        if _static_length(query) is not None or implementation != "auto":
            return blocked()
        # Dynamic length (TensorFlow graphs): pick the kernel at run time.
        return ops.cond(
            blocked_pays_off(ops.shape(query)[1], sliding_window_size, block_size),
            blocked,
            lambda: attention(*inputs, implementation="reference", dropout=dropout),
        )
    if chosen == "flex":
        return exact_rows(flex_attention(*inputs))
    return exact_rows(fused_attention(*inputs))


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

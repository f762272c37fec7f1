"""PyTorch FlexAttention for Gemma 2: soft-cap score_mod, window block mask.

The one backend-specific attention kernel of the package; only
`attention_dispatch.attention` calls it, and only where
`flex_unavailable_reason` returns `None`. Torch is imported lazily, so the
module imports on every backend.

Measured on torch 2.13 CPU: without `torch.compile`, `flex_attention` runs an
unfused fallback that builds the full score matrix (slower than the
reference); compiled, it is several times faster than the reference, but
each new sequence length costs a compilation of seconds to tens of seconds,
and the CPU kernel has no backward pass.
"""

import functools

from keras import ops

from keras_gemma2.layers import gemma2_math as math
from keras_gemma2.layers.attention_masks import visible_key_counts
from keras_gemma2.layers.torch_ops import TORCH_OPS

# FlexAttention's tile: query and key lengths are padded to a multiple of it.
FLEX_BLOCK = 128


def flex_unavailable_reason(query, needs_gradient=None):
    """Why the flex kernel cannot run on `query`'s device, or `None` if it can.

    Args:
        query: tensor `[B, T, N, H]`.
        needs_gradient: bool or `None` (decide from torch's autograd state).
    """
    import keras

    if keras.config.backend() != "torch":
        return "it needs the torch backend"
    import torch

    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    device = getattr(query, "device", None)
    if device is None or device.type not in ("cpu", "cuda"):
        return f"FlexAttention does not run on device {device}"
    if needs_gradient is None:
        needs_gradient = torch.is_grad_enabled() and query.requires_grad
    if needs_gradient and device.type == "cpu":
        return "FlexAttention has no backward pass on CPU"
    return None


@functools.cache
def _compiled_flex_attention():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    # Without compilation flex_attention materialises the full score matrix.
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _block_layout(padded_length, window_size, full_blocks, device):
    """Tile lists of a causal (+ window) mask: `(kv_num, kv_idx, full_num, full_idx)`.

    Tile `(a, b)` covers queries `[a*128, a*128+127]` and keys
    `[b*128, b*128+127]`. It is visited if some pair in it is visible, and
    "full" (no mask_mod call needed) if every pair is. With `full_blocks`
    false every visited tile is partial, so the mask_mod (padding) applies
    everywhere.
    """
    import torch

    tiles = padded_length // FLEX_BLOCK
    first = torch.arange(tiles, device=device) * FLEX_BLOCK
    last = first + FLEX_BLOCK - 1
    q_first, q_last = first[:, None], last[:, None]  # [tiles, 1]
    k_first, k_last = first[None, :], last[None, :]  # [1, tiles]
    window = padded_length + 1 if window_size is None else window_size
    visited = (q_last >= k_first) & (q_first - k_last < window)
    full = (q_first >= k_last) & (q_last - k_first < window)
    if not full_blocks:
        full = torch.zeros_like(full)
    partial = visited & ~full

    def as_lists(tile_mask):
        counts = tile_mask.sum(-1).to(torch.int32)  # [tiles]
        # Visible tile indices first (stable sort of "not visible").
        order = torch.argsort((~tile_mask).to(torch.int8), dim=-1, stable=True)
        return counts[None, None], order.to(torch.int32)[None, None]

    kv_num, kv_idx = as_lists(partial)
    full_num, full_idx = as_lists(full)
    return kv_num, kv_idx, full_num, full_idx


def flex_attention(
    query, key, value, padding_mask=None, sliding_window_size=None, soft_cap=None
):
    """Masked, soft-capped attention through compiled `flex_attention`.

    Args:
        query: `[B, T, N, H]`, already scaled (the kernel uses `scale=1`).
        key, value: `[B, T, K, H]`, the same `T` positions as the queries.
        padding_mask: optional `[B, T]`, nonzero for real keys.
        sliding_window_size: int or `None` (causal).
        soft_cap: float or `None`: scores become `cap * tanh(score / cap)`.

    Returns:
        `[B, T, N, H]`. Rows with no visible key attend to their own key here
        (FlexAttention would return zeros); the caller replaces them.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    batch_size, length, num_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    padded = -(-length // FLEX_BLOCK) * FLEX_BLOCK
    tail = padded - length

    def heads_first(x):  # [B, T, heads, H] -> [B, heads, padded, H]
        x = x.permute(0, 2, 1, 3)
        return torch.nn.functional.pad(x, (0, 0, 0, tail)).contiguous()

    q, k, v = heads_first(query), heads_first(key), heads_first(value)
    window = sliding_window_size

    def window_and_causal(b, h, q_index, kv_index):
        visible = q_index >= kv_index
        if window is not None:
            visible = visible & (q_index - kv_index < window)
        return visible

    mask_mod = window_and_causal
    if padding_mask is not None:
        real = torch.nn.functional.pad(padding_mask.to(torch.bool), (0, tail))
        counts = visible_key_counts(real, window)  # [B, padded]
        lonely = counts == 0  # rows the reference averages uniformly

        def mask_mod(b, h, q_index, kv_index):
            visible = window_and_causal(b, h, q_index, kv_index) & real[b, kv_index]
            # Give rows without any visible key their own key so no row is
            # empty; the caller overwrites those rows.
            return visible | (lonely[b, q_index] & (q_index == kv_index))

    kv_num, kv_idx, full_num, full_idx = _block_layout(
        padded, window, padding_mask is None, q.device
    )
    block_mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(padded, padded),
    )
    score_mod = None
    if soft_cap is not None:
        cap = float(soft_cap)

        def score_mod(score, b, h, q_index, kv_index):
            return math.soft_cap(score, cap, TORCH_OPS)

    out = _compiled_flex_attention()(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=1.0,
        enable_gqa=num_heads != kv_heads,
    )  # [B, N, padded, H]
    return ops.convert_to_tensor(out[:, :, :length].permute(0, 2, 1, 3))

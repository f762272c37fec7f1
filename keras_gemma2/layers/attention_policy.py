"""The measured numbers behind `implementation="auto"` and the block sizes.

Every threshold that `attention_dispatch.choose_implementation` and the
blocked kernels read lives here, next to the measurement it rests on. Unless
an item says otherwise: a 2-core CPU, one layer's attention core with 8 query /
4 key-value heads, head_dim 64 and a soft cap; `benchmarks/prefill.py`
prints the comparison.

| Name                 | Value | What it decides                                |
| -------------------- | ----- | ---------------------------------------------- |
| FLEX_MIN_LENGTH      | 4096  | torch, where flex runs (no dropout, no         |
|                      |       | gradients on CPU): compiled flex from this     |
|                      |       | many tokens on, local and global layers        |
| GLOBAL_BLOCK_SIZE    | 256   | query block of the causal blocked kernel       |
| MIN_GLOBAL_BLOCKS    | 2     | global layers: causal blocks from this many    |
|                      |       | blocks on, the reference below                 |
| MIN_LOCAL_BLOCK_SIZE | 16    | bounds of `default_block_size`, the query      |
| MAX_LOCAL_BLOCK_SIZE | 512   | block of the sliding-window blocked kernel     |

Local layers take the blocked kernel as soon as it computes fewer logits than
the reference; that is a count, not a measurement
(`attention_blocked.blocked_pays_off`).

Measurements:

- `FLEX_MIN_LENGTH`: each new length compiles once per process, 10-20 s with
  a cold cache. At 4096 tokens (window 512) flex took 0.11 s per local and
  0.53 s per global layer, against 0.23 s blocked and 1.33 s reference: a
  model with a dozen global layers pays the compilation back in one or two
  calls there, while at 2048 the savings are a quarter of that.
- `GLOBAL_BLOCK_SIZE`, `MIN_GLOBAL_BLOCKS`: full masked attention vs causal
  blocks of 256 / 512 / 1024. At 2048 tokens: jax 0.38 s vs 0.18 / 0.21 /
  0.26, tensorflow 0.14 vs 0.07 / 0.08 / 0.11, torch 0.48 vs 0.12 / 0.22 /
  0.34. At 8192 tokens: jax 10.2 vs 2.9 / 3.0 / 3.1 s, tensorflow 2.2 vs
  1.1 s for each block, torch 8.5 vs 3.3 / 3.9 / 4.3 s, with peak memory
  8.4 -> 2.7 GB (jax) and 7.6 -> 1.8 GB (torch). At 512 tokens (two blocks
  of 256) the blocks are already no slower. Since the blocks work heads
  first (one transpose per layer), one global layer at 2048 tokens takes,
  for blocks of 128 / 256 / 512: jax 92 / 97 / 131 ms, tensorflow 55 / 59 /
  60 ms; torch eager 113 ms at 256 (247 before).
- `default_block_size`: a block reads `window + block - 1` keys per query
  (rounded up to whole blocks), so smaller blocks waste less but make more,
  smaller matmuls. At window 512 and 2048 tokens, blocks of 256 measured
  fastest under XLA (jax 122 ms, tensorflow 36 ms vs 164 / 79 ms at 128 and
  157 / 50 ms at 512); torch eager was within noise of 128. The cap of 512
  makes Gemma's 4096 window read 4608 keys per query, not 6144.
"""

FLEX_MIN_LENGTH = 4096
GLOBAL_BLOCK_SIZE = 256
MIN_GLOBAL_BLOCKS = 2
MIN_LOCAL_BLOCK_SIZE = 16
MAX_LOCAL_BLOCK_SIZE = 512


def default_block_size(sliding_window_size):
    """Query block of the blocked kernel: a power of two near `window / 2`.

    Between `MIN_LOCAL_BLOCK_SIZE` and `MAX_LOCAL_BLOCK_SIZE`, and never
    above the window; see the module docstring for the measurements.

    Example:

    >>> [default_block_size(window) for window in (5, 64, 512, 4096)]
    [5, 32, 256, 512]
    """
    block = MIN_LOCAL_BLOCK_SIZE
    while block * 4 <= sliding_window_size and block < MAX_LOCAL_BLOCK_SIZE:
        block *= 2
    return min(block, sliding_window_size)

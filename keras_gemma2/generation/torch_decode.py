"""PyTorch fast path of the decode loop: the layers' math on raw tensors.

On the torch backend nothing compiles the Keras layers, and per-layer call
dispatch costs more than the arithmetic of one token (measured: ~13 tokens/s
through the layers against ~90 for the same matmuls on raw tensors, mid
config on 2 CPU cores). `TorchDecoder` runs one decode step as plain torch
operations on the model's own variables (views, no copies), writing into
the prefilled caches in place (`[batch, kv_heads, slots, head_dim]`, read
without transposes). `TorchDecoder.write_prompt` fills those caches the same
way from the prompt, in chunks (60 -> 25 ms for 32 tokens there; for int8
models it also avoids the layers' int32 `einsum`).

Nothing of the model's arithmetic is written here: the RMS norm, RoPE, soft
caps, masked softmax, GeGLU and embedding scale are the functions of
`keras_gemma2.layers.gemma2_math` that the layers call, given raw torch
primitives (`keras_gemma2.layers.torch_ops.TORCH_OPS`). The prompt's long
attention rows take `gemma2_math.biased_softmax` instead, in place (a 2048-
token prompt: 1.8 -> 1.2-1.4 s), their logits written into one scratch
buffer (no page faults for fresh tensors), and the prompt's last block only
writes its keys and values (1.38 -> 1.23 s; see `docs/decode_speed.md`);
float32 weights multiply one row through
`torch_matmul` (sliced over threads, set up once per decode:
`torch_matmul.RowProduct`), and the weights a step streams lie in huge
pages (`huge_pages`: 7.4 -> 6.0 ms per token). The weights come
from `keras_gemma2.models.weight_table` (float32 projection kernels with
an `[out, in]` copy, `torch_matmul.transposed_copies`: 8.7-10.0 -> 6.7-7.8
ms per token); the ring slots from `kv_cache`; the
choice of the next token from `decode.choose_token` (greedy: the same
kernels in raw torch calls, `choose_token`).
`tests/generation/test_torch_decode.py` holds the decoder to the portable
path in float32 and bfloat16 on several configs.

int8 layers (`Gemma2CausalLM.quantize("int8")`, QLoRA adapters included)
are multiplied from their int8 codes with torch's int8 kernels
(`torch_int8.Int8Matrix`); nothing dequantizes a whole kernel.

Prefill and steps run under `torch.inference_mode()`, not `no_grad`: it
skips autograd's version counting and view tracking on every operation
(per token, mid config: 8.7 -> 7.8 ms, same process, alternating). So the
caches and the tokens are inference tensors; `GenerationProgram` hands
the caller a normal copy of the finished ids.

`supports(causal_lm)` says when it applies: the torch backend, not
`run_eagerly`, and no layer that `unsupported_layers` names (int4 layers);
otherwise the portable decode step runs eagerly.
`compiles(causal_lm)` says when the step runs through `torch.compile`:
with the eager step's products, FBGEMM's packs reached through
`keras_gemma2::fbgemm_product` (`torch_matmul.number_packs`), so inductor
fuses only the work between them.
"""

import functools
import warnings

import keras
import numpy as np
from keras import ops

from keras_gemma2.generation import (
    decode,
    huge_pages,
    torch_half,
    torch_int8,
    torch_matmul,
)
from keras_gemma2.generation.kv_cache import empty_cache, ring_positions, ring_size
from keras_gemma2.generation.torch_int8 import Int8Matrix, products
from keras_gemma2.layers import gemma2_math as math
from keras_gemma2.layers.torch_ops import TORCH_OPS, TORCH_OPS_IN_PLACE
from keras_gemma2.models import weight_table
from keras_gemma2.models.architecture import layer_is_local
from keras_gemma2.models.quantization import weight_layer


def supports(causal_lm):
    """Whether `TorchDecoder` can decode for `causal_lm`."""
    if keras.config.backend() != "torch" or causal_lm.run_eagerly:
        return False
    return not unsupported_layers(causal_lm)


def unsupported_layers(causal_lm):
    """`{layer path: reason}` for the layers `TorchDecoder` cannot multiply.

    Float and int8 layers (with or without a `keras_gemma2` LoRA adapter)
    it can; int4 layers, Keras' own adapters on int8 layers and int8
    layers with an activation quantizer other than `AbsMaxQuantizer`, it
    cannot.
    """
    backbone = causal_lm.backbone
    layers = [(backbone, weight_table.EMBEDDING)]
    for block in backbone.transformer_layers:
        layers += [
            (block, w) for w in weight_table.BLOCK_WEIGHTS if not w.is_norm_scale
        ]
    reasons = {}
    for owner, weight in layers:
        layer = weight_layer(weight, owner)
        mode = getattr(layer, "quantization_mode", None)
        if mode not in (None, "int8"):
            reasons[layer.path] = f"quantization_mode={mode!r}"
        elif mode != "int8":
            continue
        elif getattr(layer, "lora_enabled", False) and not hasattr(
            layer, "_lora_update"
        ):
            reasons[layer.path] = "a Keras LoRA adapter over int8 weights"
        elif not isinstance(
            layer.inputs_quantizer, (type(None), keras.quantizers.AbsMaxQuantizer)
        ):
            name = type(layer.inputs_quantizer).__name__
            reasons[layer.path] = f"activation quantizer {name}"
    return reasons


def compiles(causal_lm):
    """Whether `TorchDecoder` steps run through `torch.compile`.

    Opt-in with `causal_lm.compile(jit_compile=True)` (Keras' own switch for
    `torch.compile` on this backend). Eager is the default: each new shape
    (batch, length, global bucket) first costs 10-25 s of compilation on 2
    CPU cores, more than a short generation takes in all. After it, a token
    of the mid config of `benchmarks/generate.py` (same process, eager and
    compiled decoders alternating, 7 rounds of 30 tokens): bfloat16 7.2 ->
    5.0 ms, int8 6.7 -> 4.2 ms, float32 6.8 -> 5.4 ms. Inductor fuses the
    work between the products (its share of a bfloat16 token: 2.3 -> 0.12
    ms with every product replaced by a cached result); the products stay
    the eager step's (`_row_products`).
    """
    return supports(causal_lm) and causal_lm.jit_compile is True


# Set once `torch.compile` failed in this process (say, no C++ compiler
# for its CPU code): later steps decode eagerly instead of retrying.
_COMPILE_FAILURES = []


@functools.cache
def _compiled_append(device_type):
    """`TorchDecoder.program` through `torch.compile`, one per shape.

    The decoder's tensors are inputs of the program, not constants: a new
    decoder (the next `generate` call) with the same shapes reuses it. On
    CPU, inductor writes the program's wrapper in C++ (`cpp_wrapper`), not
    Python: mid config, same decoder, the two alternating over 9 rounds of
    30 tokens, int8 3.20 -> 3.02 ms, bfloat16 4.46 -> 4.28, float32 6.69
    -> 6.54; its first compilation takes up to 10 s longer.
    """
    import torch

    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(TorchDecoder.program, dynamic=False, options=options)


def start(causal_lm, token_ids, padding_mask, prefill_length):
    """Prefill the prompts for `TorchDecoder`: `(state, decoder)`.

    `state` is what `decode.prefill` returns; `decoder` the `TorchDecoder`
    over its caches, built once for the whole generation. The decoder writes
    the prompts itself (`TorchDecoder.write_prompt`, straight into the
    decode layout; per-layer Keras call overhead is most of a short
    prefill's cost, and the layers of an int8 model multiply int8 codes
    with torch's int32 `einsum`, which has no fast CPU kernel) when the
    prompt fits in a local layer's ring (`prefill_length <= ring`), or when
    every row's prompt has the same length. Prompts of uneven lengths longer
    than the ring go through the layers (`decode.prefill`).
    """
    import torch

    backbone = causal_lm.backbone
    batch_size, max_length = token_ids.shape
    ring = ring_size(backbone, max_length)
    lengths = padding_mask.bool().sum(dim=-1)
    # First position to generate: every row has a real token before it.
    index = int(lengths.min())
    if prefill_length > ring and index != int(lengths.max()):
        state = decode.prefill(causal_lm, token_ids, padding_mask, prefill_length)
        return state, TorchDecoder(causal_lm, state[1])
    decoder = TorchDecoder(
        causal_lm, empty_cache(backbone, batch_size, ring, max_length)
    )
    # Within the ring, the bucket's padding positions may be written too:
    # decoding overwrites each before any query can reach it. Past the
    # ring, a padding key could stay in a ring slot, so only real ones.
    written = prefill_length if prefill_length <= ring else index
    decoder.write_prompt(token_ids[:, :written])
    done = torch.zeros((batch_size,), dtype=torch.bool, device=token_ids.device)
    index = torch.tensor(index, dtype=torch.int32, device=token_ids.device)
    return (token_ids, decoder.caches, index, done), decoder


def choose_token(sampler, logits, prompt, prompt_mask, index, done, stop_token_ids):
    """`decode.choose_token` for an int `index`, raw torch calls when greedy.

    A greedy sampler's pick is `argmax(softmax(logits / temperature))` in
    float32 (KerasHub's `Sampler.compute_probabilities`, then
    `GreedySampler.get_next_token`): the same torch kernels here, without
    `keras.ops`' dispatch on each of a dozen calls (mid config, in the decode
    loop: 0.43 ms per token through `decode.choose_token`). `prompt` is
    written in place. Other samplers (and their seeds) go through
    `decode.choose_token`. `tests/generation/test_torch_decode.py` holds
    both to the same tokens, prompts and `done`.
    """
    if not decode.plain_greedy(sampler):
        return decode.choose_token(
            sampler, logits, prompt, prompt_mask, index, done, stop_token_ids
        )
    token = greedy_token(logits, sampler.temperature)
    return place_token(token, prompt, prompt_mask, index, done, stop_token_ids)


def greedy_token(logits, temperature):
    """A greedy sampler's pick from `logits [B, vocabulary]`: int64 `[B]`.

    Not `argmax(logits)`: the softmax may round near-equal logits to one
    probability, and the sampler then picks the first of them.
    """
    import torch

    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return probabilities.argmax(dim=-1)


def place_token(token, prompt, prompt_mask, index, done, stop_token_ids):
    """`choose_token`'s result for a sampled `token [B]`: the prompt's own
    token where `prompt_mask` forces one, written into `prompt` at `index`;
    rows that sampled a stop token are `done`."""
    import torch

    token = token.to(prompt.dtype)
    forced = prompt_mask[:, index]
    token = torch.where(forced, prompt[:, index], token)
    prompt[:, index] = token
    if stop_token_ids is not None:
        stops = torch.tensor(stop_token_ids, dtype=token.dtype, device=token.device)
        done = done | (torch.isin(token, stops) & ~forced)
    return prompt, done, token


def _tensor(variable, dtype):
    """The tensor behind a Keras variable (or a merged LoRA kernel) in `dtype`.

    A view when the variable already has the compute dtype; under a mixed
    policy, the same rounding the layers' autocasting applies.
    """
    return TORCH_OPS.cast(ops.convert_to_tensor(variable).detach(), dtype)


def _weights(owner, weights, sizes, dtype):
    """`{weight.name: tensor}`, each in the decoder's matrix layout.

    Norm scales become float32 gains `1 + scale` (with their epsilon); int8
    layers an `Int8Matrix` over their codes (the embedding: its table, read
    as the head `[hidden, vocabulary]`).
    """
    tensors = {}
    for weight in weights:
        layer = weight_layer(weight, owner)
        shape = weight_table.shape(weight.matrix_axes, sizes)
        if getattr(layer, "quantization_mode", None) == "int8":
            torch_dtype = TORCH_OPS.cast(0, dtype).dtype
            if weight is weight_table.EMBEDDING:
                tensor = Int8Matrix.of_embedding(layer, torch_dtype)
            else:
                tensor = Int8Matrix.of_dense(layer, shape, torch_dtype)
        elif weight.is_norm_scale:
            tensor = _tensor(weight.variable(owner), dtype)
            tensor = (1.0 + tensor.float(), layer.epsilon)
        else:
            tensor = _tensor(weight.variable(owner), dtype).reshape(shape)
        tensors[weight.name] = tensor
    return tensors


_BLOCK_WEIGHTS = {w.name: w for w in weight_table.BLOCK_WEIGHTS}
# A block's projections, grouped by the rows they multiply.
_SHARED_ROWS = (("query", "key", "value"), ("output",), ("gate", "up"), ("down",))


class _Layer:
    """One decoder block's weights (from the weight table) and settings."""

    def __init__(self, block, sizes, dtype):
        self.__dict__.update(_weights(block, weight_table.BLOCK_WEIGHTS, sizes, dtype))
        attention = block.attention
        # Rounded to the compute dtype first, as the layer does.
        self.scale = _tensor(attention.query_pre_attn_scalar**-0.5, dtype)
        self.cap = attention.attention_logit_soft_cap


def _write(cache, slot, value):
    """Write `value [B, K, H]` into slot `slot` (int or 0-d tensor) of `cache`."""
    if isinstance(slot, int):
        # `copy_` casts to the cache dtype; `cache[:, :, slot] = value` does
        # the same through Python's indexing (6.7 against about 2 us).
        cache.select(2, slot).copy_(value)
    else:
        cache.index_copy_(2, slot.reshape(1), value.unsqueeze(2).to(cache.dtype))


def _rms_norm(x, gain_and_epsilon):
    gain, epsilon = gain_and_epsilon
    return math.rms_norm(x, gain, epsilon, TORCH_OPS)


class TorchDecoder:
    """Decode one token at a time with raw torch operations.

    Args:
        causal_lm: a `Gemma2CausalLM` on the torch backend.
        caches: the caches of a decode state (see `kv_cache`), as
            `decode.prefill` returns them: rings for local layers,
            `max_length` slots for global ones. The decoder writes new keys
            and values into them in place.

    `step(...)` behaves as `decode.decode_step`. Eager, it reads exactly
    the written slots; compiled (`compiles`), fixed buckets of them, masked.
    """

    def __init__(self, causal_lm, caches):
        backbone = causal_lm.backbone
        self.causal_lm = causal_lm
        self.caches = caches
        dtype = backbone.compute_dtype
        sizes = weight_table.dimensions(backbone)
        self.layers = [
            _Layer(block, sizes, dtype) for block in backbone.transformer_layers
        ]
        self._transpose_projections(backbone)
        self.local = [layer_is_local(i) for i in range(len(self.layers))]
        own = _weights(
            backbone, (weight_table.EMBEDDING, weight_table.FINAL_NORM), sizes, dtype
        )
        self.embeddings, self.final_norm = own["token_embedding"], own["final_norm"]
        self._row_products(backbone)
        huge_pages.collapse(self._streamed(backbone))
        self.dtype = TORCH_OPS.cast(0, dtype).dtype
        self.embedding_scale = math.embedding_scale(
            backbone.hidden_dim, self.dtype, TORCH_OPS
        ).to(caches[0][0].device)
        self.final_cap = backbone.final_logit_soft_cap
        self.kv_heads, self.head_dim = backbone.num_key_value_heads, backbone.head_dim
        self.groups = backbone.num_query_heads // self.kv_heads
        self.ring = caches[0][0].shape[2]  # layer 0 is local
        self.window = backbone.sliding_window_size
        # Scratch buffers of `write_prompt`, by dtype (see `_scratch`).
        self._buffers, self._scratch_size = {}, 0
        self.inverse_frequencies = math.rope_inverse_frequencies(
            self.head_dim, backbone.rope_max_wavelength, TORCH_OPS
        ).to(caches[0][0].device)

    def _sourced(self, backbone):
        """Per layer and `_SHARED_ROWS` group, `(matrix, source)` pairs:
        `source` the variable's tensor behind the matrix, or `None` for a
        matrix made per call (a LoRA-merged kernel) or not a tensor."""
        import torch

        groups = []
        for block, layer in zip(backbone.transformer_layers, self.layers, strict=True):
            for names in _SHARED_ROWS:
                group = []
                for name in names:
                    variable = _BLOCK_WEIGHTS[name].variable(block)
                    matrix = getattr(layer, name)
                    cached = isinstance(variable, keras.Variable)
                    cached = cached and torch.is_tensor(matrix)
                    group.append((matrix, variable.value if cached else None))
                groups.append(group)
        return groups

    def _transpose_projections(self, backbone):
        """Float32 projection kernels as `torch_matmul.Transposed`, if they fit.

        Few rows multiply an `[out, in]` copy faster than the `[in, out]`
        kernel (see `torch_matmul`); the copies are cached per variable,
        those of query, key and value stacked into one, as are gate and
        up's. LoRA-merged kernels (fresh each call) are not copied.
        """
        copies = iter(torch_matmul.transposed_copies(self._sourced(backbone)))
        for layer in self.layers:
            for names in _SHARED_ROWS:
                for name, matrix in zip(names, next(copies), strict=True):
                    setattr(layer, name, matrix)

    def _row_products(self, backbone):
        """Each layer's `rows`, one per `_SHARED_ROWS` group, and the head's,
        `self.head_rows`: what multiplies few rows by the group's matrices
        side by side, or `None` where nothing applies.

        - int8 matrices: `torch_int8.RowProduct` (FBGEMM int8 packs);
        - bfloat16 kernels: `torch_half.HalfRowProduct` (FBGEMM float16
          packs);
        - float32: `torch_matmul.RowProduct` (sliced `[out, in]` tables).

        A compiled decoder (`compiles`) has the same products; its FBGEMM
        packs are numbered (`torch_matmul.number_packs`) and lent to the
        compiled step for each call (`self.packs`, see `_compiled`).
        """
        import torch

        sourced = self._sourced(backbone)
        groups = [[matrix for matrix, _ in group] for group in sourced]
        with_head = groups + [[self.embeddings]]
        packed = torch_int8.packed_products(with_head)
        # `[out, in]` rows: the kernels' transposes, the head's table.
        rows = [
            [(m.T if s is not None else m, s) for m, s in group] for group in sourced
        ]
        table = weight_table.EMBEDDING.variable(backbone)
        own = isinstance(table, keras.Variable) and torch.is_tensor(self.embeddings)
        rows.append([(self.embeddings, table.value if own else None)])
        half = torch_half.half_products(rows)
        width = len(_SHARED_ROWS)
        for index, layer in enumerate(self.layers):
            layer.rows = tuple(
                packed[i] or half[i] or torch_matmul.row_product(groups[i])
                for i in range(index * width, (index + 1) * width)
            )
        # What the packs stand in for (`_streamed` leaves it in place).
        self._on_packs = {
            id(matrix)
            for index, group in enumerate(with_head)
            for matrix in group
            if packed[index]
            or half[index]
            or getattr(matrix, "fbgemm", None) is not None
        }
        self.head_rows = half[-1]
        if self.head_rows is None and not isinstance(self.embeddings, Int8Matrix):
            self.head_rows = torch_matmul.row_product([self.embeddings])
        self.packs = []
        if compiles(self.causal_lm):
            products = [rows for layer in self.layers for rows in layer.rows]
            self.packs = torch_matmul.number_packs(
                [(p, getattr(p, "pack", None)) for p in products + [self.head_rows]]
                + [
                    (matrix, matrix.fbgemm)
                    for group in with_head
                    for matrix in group
                    if isinstance(matrix, Int8Matrix)
                ]
            )

    def _streamed(self, backbone):
        """The model's tensors a decode step reads whole: weights, codes.

        `__init__` moves them into huge pages (`huge_pages.collapse`, once
        per variable: mid config, 7.43 -> 6.0 ms per token, the copies
        included). Not the copies of `torch_matmul.transposed_copies`: they
        are made in huge pages; nor what FBGEMM packs stand in for.
        """
        blocks = zip(backbone.transformer_layers, self.layers, strict=True)
        matrices = [(self.embeddings, weight_table.EMBEDDING, backbone)] + [
            (getattr(layer, weight.name), weight, block)
            for block, layer in blocks
            for weight in weight_table.BLOCK_WEIGHTS
            if not weight.is_norm_scale
        ]
        for matrix, weight, owner in matrices:
            if id(matrix) in self._on_packs:
                continue
            if isinstance(matrix, Int8Matrix):
                yield matrix.codes
            elif isinstance(matrix, torch_matmul.Transposed):
                continue  # made in huge pages (`huge_pages.empty`)
            elif isinstance(weight.variable(owner), keras.Variable):
                yield matrix  # not a LoRA-merged kernel, made anew each call

    def _products(self, layer, group, x):
        """`x @ m` for the matrices of `_SHARED_ROWS[group]`, in order."""
        rows = layer.rows[group]
        if rows is not None and rows.takes(x):
            return rows.split(x)
        return products(x, *(getattr(layer, name) for name in _SHARED_ROWS[group]))

    def _rotation(self, position):
        """RoPE `(cos, signed_sin)` `[..., H]` at `position` (int or tensor)."""
        if isinstance(position, int):
            position = self.inverse_frequencies.new_tensor(position)
        return math.rope_rotation(
            position, self.inverse_frequencies, self.dtype, TORCH_OPS
        )

    def _attention_inputs(self, layer, x, rotation, queries=True):
        """`(query, key, value)` `[..., heads, H]` of `x [..., D]`.

        Queries come rotated and scaled, keys rotated; `rotation` must
        broadcast against `[..., heads, H]`. With `queries=False`, the
        query is `None` (and not computed).
        """
        import torch

        h = _rms_norm(x, layer.pre_attention_norm)
        heads = tuple(x.shape[:-1]) + (-1, self.head_dim)
        if not queries:
            key, value = products(h, layer.key, layer.value)
            key = math.rope_rotate(key.view(heads), rotation, TORCH_OPS)
            return None, key, value.view(heads)
        # Queries and keys rotate together: one set of kernels, not two.
        rows, query_heads = layer.rows[0], self.kv_heads * self.groups
        if rows is not None and rows.takes(h):
            # One stacked product: its queries and keys are already side by
            # side, `[..., (N + K) * H]`, no `cat`.
            width = (query_heads + self.kv_heads) * self.head_dim
            pair, value = rows(h).split_with_sizes(
                [width, self.kv_heads * self.head_dim], -1
            )
        else:
            query, key, value = products(h, layer.query, layer.key, layer.value)
            pair = torch.cat([query, key], dim=-1)
        pair = math.rope_rotate(pair.view(heads), rotation, TORCH_OPS)
        # `split_with_sizes`: `split` is a Python wrapper around it.
        query, key = pair.split_with_sizes([query_heads, self.kv_heads], -2)
        return query * layer.scale, key, value.view(heads)

    def _block_output(self, layer, x, attended):
        """The block after attention: `x [..., D]`, `attended [..., N * H]`."""
        (output,) = self._products(layer, 1, attended)
        x = x + _rms_norm(output, layer.post_attention_norm)
        h = _rms_norm(x, layer.pre_ffw_norm)
        gated = math.geglu(*self._products(layer, 2, h), TORCH_OPS)
        (down,) = self._products(layer, 3, gated)
        return x + _rms_norm(down, layer.post_ffw_norm)

    def _embed(self, token_ids):
        """Scaled embeddings `[..., D]` of `token_ids [...]`."""
        import torch

        if isinstance(self.embeddings, Int8Matrix):
            rows = self.embeddings.lookup(token_ids)
        else:
            rows = torch.nn.functional.embedding(token_ids, self.embeddings)
        return rows * self.embedding_scale

    def _logits(self, x):
        """Soft-capped logits `[B, vocabulary]` of the final hidden `x [B, D]`."""
        x = _rms_norm(x, self.final_norm)
        if isinstance(self.embeddings, Int8Matrix):
            (logits,) = products(x, self.embeddings)
        elif self.head_rows is not None and self.head_rows.takes(x):
            logits = self.head_rows(x)
        else:
            logits = torch_matmul.transposed_product(x, self.embeddings)
        return math.soft_cap(logits, self.final_cap, TORCH_OPS)

    def _attend(self, layer, query, keys, values, valid=None, bias=None):
        """`query [B, K, G, H]` over `keys, values [B, K, S, H]`; `valid [S]`.

        Also `query [B, K, G, L, H]` over `[B, K, 1, S, H]`, `valid [L, S]`.
        With `bias` (`math.masking_bias` of `valid`) instead of `valid`, the
        probabilities come from `math.biased_softmax` (every row must see a
        key): the prompt's long rows, where `masked_softmax`'s `tanh` and
        `where` cost more than the products.
        """
        import torch

        if query.dim() == 4:
            # One row per sequence: 3-D `bmm`s over `B * K` (views of the
            # caches), a third fewer torch calls than 4-D `matmul`s.
            # The caches as views, not `reshape`s (about 3 us a call): their
            # leading axes merge. (A batch's queries may not.)
            batch, kv_heads, groups, head_dim = query.shape
            span = keys.shape[2]
            # Compiled, bfloat16: products and sums that inductor fuses
            # (in float32, rounded once, as `bmm` sums), not `bmm`, whose
            # bfloat16 calls are slow on CPU (mid config, a token: 4.51 ->
            # 4.12 ms, same decoder, alternating). Not for float32, whose
            # `bmm` is fast (int8 model: 3.79 against 4.03 ms).
            reduced = query.dtype != torch.float32 and torch.compiler.is_compiling()
            if reduced:
                # A view of itself (free eagerly), which inductor writes out
                # once (`as_strided` is among the ops it gives realized
                # inputs): else it computes the rotated query again inside
                # the sum, for every key (its `cos` and `roll` included):
                # mid config, a token's work besides the products 0.63 ->
                # 0.37 ms, same process, alternating.
                query = query.as_strided(query.shape, query.stride())
                logits = (query[:, :, :, None, :] * keys[:, :, None]).sum(-1)
            else:
                logits = torch.bmm(
                    query.reshape(-1, groups, head_dim),
                    keys.view(-1, span, head_dim).transpose(1, 2),
                ).view(batch, kv_heads, groups, span)
            if valid is None and not isinstance(layer.query, Int8Matrix):
                # Every key visible (eager steps): `biased_softmax`'s
                # sigmoid cap, in place, not `tanh` (mid config, 2000 keys:
                # 87 -> 30 us per layer; 256 keys: 20 -> 15 us). Not for
                # int8 layers: they quantize their inputs per row, and a
                # float32 rounding apart from the layers' `tanh` can move
                # an input across a quantization step (tiny test model:
                # 0.013 on the logits).
                probabilities = math.biased_softmax(
                    logits, None, layer.cap, TORCH_OPS_IN_PLACE
                )
            else:
                probabilities = math.masked_softmax(logits, valid, layer.cap, TORCH_OPS)
            if reduced:
                weights = probabilities.to(values.dtype)[..., None]
                return (weights * values[:, :, None]).sum(-2)
            attended = torch.bmm(
                probabilities.to(values.dtype).view(-1, groups, span),
                values.view(-1, span, head_dim),
            )
            return attended.view(query.shape)
        # A key head's query groups as the rows of one product: the keys and
        # values are not broadcast to every group (2048-token prompt, mid
        # config: 1.40 -> 1.33 s).
        batch, kv_heads, groups, length, head_dim = query.shape
        span = keys.shape[-2]
        rows = (batch * kv_heads, groups * length)
        logits = torch.bmm(
            query.reshape(rows + (head_dim,)),
            keys.reshape(-1, span, head_dim).transpose(1, 2),
            out=self._scratch(rows + (span,), query.dtype),
        ).view(batch, kv_heads, groups, length, span)
        if bias is None:
            probabilities = math.masked_softmax(logits, valid, layer.cap, TORCH_OPS)
        else:
            # `logits` is this call's own: overwritten in place.
            probabilities = math.biased_softmax(
                logits, bias, layer.cap, TORCH_OPS_IN_PLACE
            )
        probabilities = probabilities.to(values.dtype)
        attended = torch.matmul(
            probabilities.view(batch, kv_heads, groups * length, span),
            values.squeeze(2),
        )
        return attended.view(query.shape)  # [B, K, G, L, H]

    def write_prompt(self, token_ids, chunk=512):
        """Run `token_ids [B, L]` (positions `0 .. L - 1`) into the caches.

        In chunks of at most `min(chunk, ring)` positions: each chunk's
        queries attend to the keys the caches hold from earlier chunks (a
        ring's previous contents, the global caches' prefix) and to the
        chunk's own, masked by position (causal; local layers also by the
        sliding window), before the chunk's keys overwrite ring slots. The
        logits of a chunk are `[B, N, chunk, keys]`, so the chunk bounds
        the memory of long prompts.
        """
        batch, length = token_ids.shape
        size = max(1, min(chunk, self.ring))
        # The chunks' attention logits share one buffer, sized for the
        # widest (the last chunk's global keys, or a ring and a chunk): a
        # fresh tensor of that size is page-faulted in as the product first
        # writes it, on every layer of every chunk (2048-token prompt, mid
        # config: 32640 faults and 0.1 s of system time per prompt).
        keys = max(length, self.ring + size) if length > size else length
        heads = self.kv_heads * self.groups
        self._scratch_size = batch * heads * min(size, length) * keys
        try:
            for begin in range(0, length, size):
                self._write_chunk(token_ids[:, begin : begin + size], begin)
        finally:
            self._buffers.clear()

    def _scratch(self, shape, dtype):
        """A tensor `shape` of `dtype` over a buffer kept for the prompt.

        Its contents are whatever the last user left; callers overwrite it.
        """
        import torch

        elements = int(np.prod(shape))
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < elements:
            size = max(elements, self._scratch_size)
            buffer = torch.empty(size, dtype=dtype, device=self.embedding_scale.device)
            self._buffers[dtype] = buffer
        return buffer[:elements].view(shape)

    def _write_chunk(self, token_ids, begin):
        """Write positions `begin .. begin + L - 1` (`token_ids [B, L]`)."""
        import torch

        batch, length = token_ids.shape
        x = self._embed(token_ids)  # [B, L, D]
        positions = torch.arange(begin, begin + length, device=x.device)
        rotation = self._rotation(positions[:, None])  # [L, 1, H] each
        slots = torch.arange(self.ring, device=x.device)
        # What the rings held before this chunk (negative: never written).
        held = ring_positions(begin - 1, slots, self.ring)
        ring_keys = torch.cat([held, positions])
        ring_valid = (
            (ring_keys[None, :] >= 0)
            & (ring_keys[None, :] <= positions[:, None])
            & (ring_keys[None, :] > positions[:, None] - self.window)
        )  # [L, ring + L]
        global_keys = torch.arange(begin + length, device=x.device)
        global_valid = global_keys[None, :] <= positions[:, None]  # [L, begin + L]
        # Every query sees at least its own key.
        ring_bias = math.masking_bias(ring_valid, TORCH_OPS)
        global_bias = math.masking_bias(global_valid, TORCH_OPS)
        # The last block's output feeds nothing: the first step after the
        # prompt runs the prompt's last position again for the logits. So
        # that block writes its keys and values and stops there (2048-token
        # prompt, mid config, same process, alternating: 1.38 -> 1.23 s).
        last = len(self.layers) - 1
        for index, (layer, local, (key_cache, value_cache)) in enumerate(
            zip(self.layers, self.local, self.caches, strict=True)
        ):
            query, key, value = self._attention_inputs(
                layer, x, rotation, queries=index < last
            )
            key = key.transpose(1, 2).to(key_cache.dtype)  # [B, K, L, H]
            value = value.transpose(1, 2).to(value_cache.dtype)
            if local:
                if not begin:  # nothing written before: the chunk's keys alone
                    keys, values, bias = key, value, ring_bias[:, self.ring :]
                elif query is not None:  # the ring's earlier keys, then the chunk's
                    keys = torch.cat([key_cache, key], dim=2)
                    values = torch.cat([value_cache, value], dim=2)
                    bias = ring_bias
                key_cache[:, :, positions % self.ring] = key
                value_cache[:, :, positions % self.ring] = value
            else:
                key_cache[:, :, begin : begin + length] = key
                value_cache[:, :, begin : begin + length] = value
                keys = key_cache[:, :, : begin + length]
                values = value_cache[:, :, : begin + length]
                bias = global_bias
            if query is None:  # the last block: its keys and values only
                break
            query = query.transpose(1, 2)  # [B, N, L, H]
            query = query.reshape(batch, self.kv_heads, self.groups, length, -1)
            attended = self._attend(
                layer, query, keys[:, :, None], values[:, :, None], bias=bias
            )  # [B, K, G, L, H]
            attended = attended.reshape(batch, -1, length, self.head_dim)
            attended = attended.transpose(1, 2).reshape(batch, length, -1)
            x = self._block_output(layer, x, attended)

    def append(self, token, position, global_span=None):
        """Append `token [B]` at `position` to the caches; its next-token logits.

        Writes the token's keys and values into every layer's cache (slot
        `position % ring` of local layers, `position` of global ones), then
        returns the logits `[B, vocabulary]` that follow it.

        Args:
            token: int `[B]`.
            position: an int, or (with `global_span`) an int 0-d tensor.
            global_span: `None` to read exactly the written slots (eager);
                otherwise a static int `> position`: global layers read that
                many slots and rings as many (at most all of theirs),
                masking the unwritten ones, so the shapes stay fixed from one
                position to the next (what `torch.compile` needs to compile
                once per bucket).
        """
        import torch

        batch = token.shape[0]
        x = self._embed(token)  # [B, D]
        if torch.is_tensor(position):  # a CPU scalar for a model on a GPU
            position = position.to(x.device)
        if global_span is None:
            # Slot s of a ring holds position s until the ring wraps, so a
            # local layer reads the written prefix, as a global one does;
            # once wrapped, every slot is in the window. No slot is masked.
            spans = (min(position + 1, self.ring), position + 1)
            valid = (None, None)
        else:
            # Until it wraps, a ring holds positions `0 .. position` in
            # slots of the same numbers, all below `global_span`: the slots
            # past it would only be masked (case (a) of `vs_llamacpp.py`, a
            # ring of 256, spans of 64 or 96).
            ring_span = min(self.ring, global_span)
            spans = (ring_span, global_span)
            slots = torch.arange(ring_span, device=x.device)
            valid = (
                ring_positions(position, slots, self.ring) >= 0,
                torch.arange(global_span, device=x.device) <= position,
            )
        rotation = self._rotation(position)
        for layer, local, (key_cache, value_cache) in zip(
            self.layers, self.local, self.caches, strict=True
        ):
            query, key, value = self._attention_inputs(layer, x, rotation)
            slot = position % self.ring if local else position
            _write(key_cache, slot, key)  # [B, K, S, H]
            _write(value_cache, slot, value)
            span = spans[0] if local else spans[1]
            query = query.view(batch, self.kv_heads, self.groups, self.head_dim)
            attended = self._attend(
                layer,
                query,
                key_cache.narrow(2, 0, span),
                value_cache.narrow(2, 0, span),
                valid[0] if local else valid[1],
            )
            x = self._block_output(layer, x, attended.view(batch, -1))
        return self._logits(x)

    def program(self, token, position, global_span, temperature=None):
        """What the compiled step computes: `append`'s logits, or, given a
        greedy sampler's `temperature`, its pick from them (`greedy_token`,
        in the same program: 64 µs a token eagerly, mid config)."""
        logits = self.append(token, position, global_span)
        if temperature is None:
            return logits
        return greedy_token(logits, temperature)

    def _compiled(self, token, position, global_span, temperature=None):
        """`program` compiled; eager if it cannot compile."""
        import torch

        if not _COMPILE_FAILURES:
            try:
                compiled = _compiled_append(token.device.type)
                with torch_matmul.lent(self.packs):
                    return compiled(self, token, position, global_span, temperature)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                _COMPILE_FAILURES.append(error)
                warnings.warn(
                    "jit_compile=True: torch.compile could not compile the "
                    f"decode step ({error}); decoding eagerly instead.",
                    stacklevel=2,
                )
        return self.program(token, position, global_span, temperature)

    def step(self, prompt, prompt_mask, index, done, stop_token_ids, global_span=None):
        """As `decode.decode_step` for an int `index`: `(prompt, done, token)`.

        With `global_span` (a static int `>= index`), the logits come from the
        compiled, bucketed program (see `compiles`), and so does a greedy
        sampler's pick.
        """
        import torch

        sampler = self.causal_lm.sampler
        with torch.inference_mode():
            token = prompt[:, index - 1]
            if global_span is None:
                logits = self.append(token, index - 1)
            else:
                position = torch.tensor(index - 1, device=token.device)
                if decode.plain_greedy(sampler):
                    token = self._compiled(
                        token, position, global_span, sampler.temperature
                    )
                    return place_token(
                        token, prompt, prompt_mask, index, done, stop_token_ids
                    )
                logits = self._compiled(token, position, global_span)
            return choose_token(
                sampler, logits, prompt, prompt_mask, index, done, stop_token_ids
            )

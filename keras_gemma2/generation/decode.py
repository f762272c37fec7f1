"""The compiled generation loop: prefill once, then one token per step.

Phases (as in gpt-fast): `prefill` runs the prompt through every layer in one
pass with linear caches of the prompt's bucketed length, then local layers
keep only a window-sized ring; `decode` appends one token per step. Global
layers read only a prefix of their cache: the loop runs in segments whose
prefix length doubles (`bucket_edges`), so a step at position `p` reads at
most `2 p` global slots and `sliding_window_size` local slots, never all of
`max_length`.
"""

import functools

import keras
from keras import ops

from keras_gemma2.generation.kv_cache import decode_cache, empty_cache
from keras_gemma2.layers import loop_matrices
from keras_gemma2.models.architecture import layer_is_local

MIN_PREFILL_BUCKET = 16


def prefill_bucket(prompt_length, max_length):
    """Static prefill length: the next power of two >= `prompt_length` (min 16)."""
    bucket = MIN_PREFILL_BUCKET
    while bucket < prompt_length:
        bucket *= 2
    return min(bucket, max_length)


def bucket_edges(prefill_length, max_length):
    """Global-prefix lengths of the decode segments: doubling up to `max_length`."""
    edges = [min(prefill_length, max_length)]
    while edges[-1] < max_length:
        edges.append(min(2 * edges[-1], max_length))
    return edges


def _any_equal(tokens, stop_token_ids):
    """`[batch]` bool: does each token equal one of `stop_token_ids`."""
    hits = [ops.equal(tokens, stop) for stop in stop_token_ids]
    result = hits[0]
    for hit in hits[1:]:
        result = ops.logical_or(result, hit)
    return result


def prefill(causal_lm, token_ids, padding_mask, prefill_length):
    """Fill the caches from the prompts in one pass; the first decode state.

    Args:
        token_ids: int `[batch, max_length]`, right-padded prompts.
        padding_mask: `[batch, max_length]`, true on prompt tokens.
        prefill_length: static int >= the longest prompt.

    Returns:
        The state `(prompt, caches, index, done)`: `prompt` is `token_ids`;
        `caches` as in `kv_cache`, local layers holding the window that ends
        at `index - 1` in rings of `min(window, max_length)` slots, global
        layers `max_length` slots; `index` (int32 scalar) is the first
        position to generate, the shortest prompt's length; `done` is
        `[batch]` false.
    """
    state, _ = _prefill_hidden(causal_lm, token_ids, padding_mask, prefill_length)
    return state


def _prefill_hidden(causal_lm, token_ids, padding_mask, prefill_length):
    """`(prefill's state, the prefill's final hidden states)`."""
    backbone = causal_lm.backbone
    batch_size, max_length = ops.shape(token_ids)[0], token_ids.shape[1]
    prompt_mask = ops.cast(padding_mask, "bool")
    # First position to generate: every row has a real token before it.
    index = ops.min(ops.sum(ops.cast(prompt_mask, "int32"), axis=-1))
    caches = empty_cache(backbone, batch_size, prefill_length, prefill_length)
    hidden_states, caches = backbone.compute_hidden_states(
        token_ids[:, :prefill_length], cache=caches, cache_update_index=0
    )
    # The step that produces `index` re-reads position index - 1, so the
    # rings hold the window ending there.
    caches = decode_cache(backbone, caches, index - 1, max_length)
    done = ops.zeros((batch_size,), "bool")
    return (token_ids, caches, index, done), hidden_states


def prefill_and_choose(
    causal_lm, token_ids, padding_mask, prefill_length, stop_token_ids
):
    """`prefill`, and the token at its `index` chosen from the prefill itself.

    The prefill already computed the final hidden state of position
    `index - 1`; the first decode step would run that position through
    every layer again, one row at a time. Here only the head and the
    sampler run on it.

    It also builds the matrices that decode loops carry (`_loop_matrices`),
    and runs through them itself, so a generation call builds them once:
    `decode_segment` and `step_with_prefix` take them as `matrices`.

    Returns:
        `(state, token, matrices)`: the state as `prefill` returns it, but
        one position on (its `index` is `prefill`'s plus one, at most
        `max_length`; the rings still end at `prefill`'s `index - 1`, which
        is what a step at that position reads); `token` `[batch]` is the
        token written at `prefill`'s `index` (a row's own prompt token where
        its prompt is longer); `matrices` a tuple of dicts of tensors.
    """
    # Copies made only to read kernels in a faster layout pay for themselves
    # over a number of decode steps (`LAYOUT_COPY_MIN_STEPS`).
    max_length = token_ids.shape[1]
    steps = max_length - prefill_length
    relayout = steps >= loop_matrices.LAYOUT_COPY_MIN_STEPS
    matrices = _loop_matrices(causal_lm, "copies", relayout)
    with _carrying(*_program_matrices(causal_lm, matrices)):
        state, hidden_states = _prefill_hidden(
            causal_lm, token_ids, padding_mask, prefill_length
        )
        prompt, caches, index, done = state
        # A prompt that fills `max_length` leaves nothing to generate: the
        # write goes to the last position, where `choose_token` keeps the
        # prompt's own token, and the index stays at `max_length`.
        position = ops.minimum(index, max_length - 1)
        last = ops.take(hidden_states, position - 1, axis=1)[:, None, :]
        logits = causal_lm.head_logits(last)
    prompt, done, token = choose_token(
        causal_lm.sampler,
        logits[:, 0],
        prompt,
        ops.cast(padding_mask, "bool"),
        position,
        done,
        stop_token_ids,
    )
    state = (prompt, caches, ops.minimum(index + 1, max_length), done)
    return state, token, matrices


def _global_prefixes(caches, edge):
    """Caches with each global layer cut to its first `edge` slots."""
    return tuple(
        pair if layer_is_local(i) else tuple(array[:, :, :edge] for array in pair)
        for i, pair in enumerate(caches)
    )


def _write_prefixes(caches, prefixes):
    """Global layers' full caches with their prefixes written back."""
    return tuple(
        prefix
        if layer_is_local(i)
        else tuple(
            ops.slice_update(array, [0, 0, 0, 0], part)
            for array, part in zip(pair, prefix, strict=True)
        )
        for i, (pair, prefix) in enumerate(zip(caches, prefixes, strict=True))
    )


def decode_step(causal_lm, prompt, prompt_mask, caches, index, done, stop_token_ids):
    """Produce the token at `index` from position `index - 1`.

    Prompt positions (`prompt_mask`) are kept, not sampled, so a batch of
    prompts of different lengths decodes in lockstep.

    Returns `(prompt, caches, index + 1, done, next_token)`.
    """
    batch_size = ops.shape(prompt)[0]
    position = index - 1
    current = ops.slice(prompt, [0, position], [batch_size, 1])
    logits, _, caches = causal_lm.call_with_cache(current, caches, position)
    prompt, done, next_token = choose_token(
        causal_lm.sampler,
        logits[:, 0],
        prompt,
        prompt_mask,
        index,
        done,
        stop_token_ids,
    )
    return prompt, caches, index + 1, done, next_token


def choose_token(sampler, logits, prompt, prompt_mask, index, done, stop_token_ids):
    """Write the token at `index`: sampled from `logits`, or the prompt's own.

    Prompt positions (`prompt_mask`) keep their token, so a batch of prompts
    of different lengths decodes in lockstep; a sampled stop token marks its
    row done. Every decode path (the portable step, `TorchDecoder`) ends
    here.

    Args:
        sampler: a `keras_hub.samplers.Sampler`.
        logits: `[batch, vocabulary]` next-token logits.
        prompt: int `[batch, max_length]`.
        prompt_mask: bool `[batch, max_length]`.
        index: int or int scalar tensor, the position to write.
        done: bool `[batch]`.
        stop_token_ids: tuple of ints or `None`.

    Returns:
        `(prompt, done, token [batch])`.
    """
    probabilities = sampler.compute_probabilities(logits)
    if plain_greedy(sampler):
        token = first_max_index(probabilities)
    else:
        token = sampler.get_next_token(probabilities)
    token = ops.cast(token, prompt.dtype)
    # Gathers, not `[:, index]`: TensorFlow's XLA bridge wants a strided
    # slice's bounds as compile-time constants and would recompile the step
    # for every index.
    forced = ops.take(prompt_mask, index, axis=1)
    token = ops.where(forced, ops.take(prompt, index, axis=1), token)
    prompt = ops.slice_update(prompt, [0, index], token[:, None])
    if stop_token_ids is not None:
        stopped = _any_equal(token, stop_token_ids)
        done = ops.logical_or(done, ops.logical_and(stopped, ops.logical_not(forced)))
    return prompt, done, token


def plain_greedy(sampler):
    """Whether `sampler` is KerasHub's `GreedySampler`, its arithmetic unchanged.

    Its pick is then `argmax(softmax(logits / temperature))` in float32
    (`Sampler.compute_probabilities`, `GreedySampler.get_next_token`), which
    `first_max_index` and `torch_decode.greedy_token` compute faster.
    """
    import keras_hub

    greedy = keras_hub.samplers.GreedySampler
    kind = type(sampler)
    return (
        issubclass(kind, greedy)
        and kind.get_next_token is greedy.get_next_token
        and kind.compute_probabilities is greedy.compute_probabilities
    )


def first_max_index(values):
    """`ops.argmax(values, axis=-1)` as two plain reductions: int32 `[...]`.

    The first index of the largest value, or of the first NaN where a row
    has one (numpy's `argmax`). XLA (CPU) compiles an argmax to one reduce
    over (value, index) pairs that it does not vectorize: 144 us a token on
    a 32000-entry vocabulary in a jax profile of the mid model's decode
    loop. A max, then the smallest index that holds it, took 225 -> 75 us a
    token for the whole pick (soft cap, softmax and argmax) in a `jax.jit`
    loop (`docs/decode_speed.md`).

    Example:

    >>> import numpy as np
    >>> values = np.array([[0.1, 0.7, 0.7], [0.2, np.nan, 0.9]], "float32")
    >>> ops.convert_to_numpy(first_max_index(values)).tolist()
    [1, 1]
    """
    values = ops.convert_to_tensor(values)
    size = values.shape[-1]
    top = ops.max(values, axis=-1, keepdims=True)
    hit = ops.logical_or(ops.equal(values, top), ops.isnan(values))
    positions = ops.arange(size, dtype="int32")
    return ops.min(ops.where(hit, positions, size), axis=-1)


def step_with_prefix(
    causal_lm, state, prompt_mask, edge, stop_token_ids, matrices=None
):
    """One decode step reading the first `edge` global slots.

    It is `decode_segment` stopped after one step: inside a loop the index
    is a loop variable, while as an input of a TensorFlow XLA program it is
    taken for a compile-time constant, recompiling the step at every index.
    `matrices`: as `decode_segment`'s.

    Returns `(state, next_token)`; the state is as `prefill` returns it.
    """
    index = state[2]
    state = decode_segment(
        causal_lm, state, prompt_mask, edge, stop_token_ids, index, matrices
    )
    return state, ops.take(state[0], index, axis=1)


def decode_segment(
    causal_lm,
    state,
    prompt_mask,
    edge,
    stop_token_ids,
    last_index=None,
    matrices=None,
):
    """Decode while `index <= edge` (and not every row is done), as one loop.

    Every step of the segment attends to the first `edge` global slots, so
    the loop body has static shapes. `last_index` (int or int scalar tensor,
    at most `edge`) stops the loop earlier. `matrices`: what
    `prefill_and_choose` built for the loop to carry; `None` builds them
    here (a loop), or carries none (one step, `last_index`, which would pay
    their copies per token). Returns the new state.
    """
    prompt, caches, index, done = state
    limit = min(edge, prompt.shape[1] - 1)
    if last_index is not None:
        limit = ops.minimum(last_index, limit)

    if matrices is None and last_index is None:
        matrices = _loop_matrices(causal_lm, "copies")
    layers, matrices = _program_matrices(causal_lm, matrices)

    def cond(prompt, caches, index, done, matrices):
        return ops.logical_and(index <= limit, ops.logical_not(ops.all(done)))

    def body(prompt, caches, index, done, matrices):
        with _carrying(layers, matrices):
            prompt, caches, index, done, _ = decode_step(
                causal_lm, prompt, prompt_mask, caches, index, done, stop_token_ids
            )
        return prompt, caches, index, done, matrices

    prompt, prefixes, index, done, _ = causal_lm.sampler.run_loop(
        cond,
        body,
        loop_vars=(prompt, _global_prefixes(caches, edge), index, done, matrices),
        model=causal_lm,
    )
    return prompt, _write_prefixes(caches, prefixes), index, done


def _loop_candidates(causal_lm, relayout=True):
    """`[(layer, build)]`: the layers generation may carry matrices for.

    See `layers.loop_matrices`: on XLA (jax, tensorflow) on one CPU device,
    where they were measured; elsewhere (other devices, a
    `keras.distribution`, torch) none, and the layers read their kernels.
    Every attention layer, every feed-forward layer (its down kernel as
    `[hidden, intermediate]` rows) and the tied head (its table as
    `[hidden, vocabulary]` columns). With bfloat16 compute (`_loop_dtype`)
    all are converted to float32; kernels kept in their dtype get the
    feed-forward's and the head's copies only with `relayout` and while
    they fit `loop_matrices.LAYOUT_COPY_LIMIT_BYTES`.
    """
    if keras.distribution.distribution() is not None or not _xla_on_cpu():
        return []
    backbone = causal_lm.backbone
    limit = loop_matrices.LAYOUT_COPY_LIMIT_BYTES
    relayout = relayout and loop_matrices.layout_copy_bytes(backbone) <= limit
    feed_forward = functools.partial(
        loop_matrices.feed_forward_matrices, relayout=relayout
    )
    head = functools.partial(loop_matrices.head_matrices, relayout=relayout)
    candidates = []
    for block in backbone.transformer_layers:
        candidates.append((block.attention, loop_matrices.matrices))
        candidates.append((block.ffw, feed_forward))
    candidates.append((backbone.token_embedding, head))
    return candidates


def _loop_matrices(causal_lm, part, relayout=True):
    """One entry per `_loop_candidates` layer: its matrices, or `None` (it
    does not qualify: LoRA, quantized, ...). `part` as in
    `loop_matrices.matrices`."""
    dtype = _loop_dtype(causal_lm.backbone)
    candidates = _loop_candidates(causal_lm, relayout)
    return tuple(build(layer, dtype, part) for layer, build in candidates)


def _program_matrices(causal_lm, copies):
    """`(layers, matrices)` a program runs through, from the `copies` handed
    to it (`_loop_matrices(..., "copies")`; `None` or empty: none).

    Each layer handed copies gets them completed with its views, built
    here: reshapes of the kernels cost nothing inside a program but a copy
    each when a program returns them. Layers handed `None` read their own
    kernels.
    """
    if not copies:
        return (), ()
    dtype = _loop_dtype(causal_lm.backbone)
    layers, matrices = [], []
    candidates = _loop_candidates(causal_lm)
    for (layer, build), copied in zip(candidates, copies, strict=True):
        if copied is not None:
            layers.append(layer)
            matrices.append({**build(layer, dtype, "views"), **copied})
    return tuple(layers), tuple(matrices)


def _loop_dtype(backbone):
    """`"float32"` for bfloat16 compute, else `None`.

    XLA (CPU) multiplies bfloat16 kernels as float32 copies anyway, made
    again in every program (see `layers.loop_matrices`).
    """
    compute = keras.backend.standardize_dtype(backbone.compute_dtype)
    return "float32" if compute == "bfloat16" else None


def _carrying(layers, matrices):
    """`loop_matrices.carried` for these layers and their matrices."""
    mapping = {id(layer): m for layer, m in zip(layers, matrices, strict=True)}
    return loop_matrices.carried(mapping)


def _xla_on_cpu():
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return all(d.device_type == "CPU" for d in tf.config.list_logical_devices())
    return False


def generate_tokens(causal_lm, token_ids, padding_mask, stop_token_ids, prefill_length):
    """Complete right-padded prompts in one program; `{"token_ids", "padding_mask"}`.

    The portable whole: `prefill`, then one `decode_segment` per bucket edge.
    `keras_gemma2.generation.compiled` runs the same phases as separately
    compiled programs from a host loop.

    Args:
        causal_lm: a `Gemma2CausalLM` with a compiled `sampler`.
        token_ids: int `[batch, max_length]`, prompts followed by padding.
        padding_mask: `[batch, max_length]`, true on prompt tokens.
        stop_token_ids: tuple of ints or `None`.
        prefill_length: static int >= the longest prompt.
    """
    prompt_mask = ops.cast(padding_mask, "bool")
    state = prefill(causal_lm, token_ids, padding_mask, prefill_length)
    for edge in bucket_edges(prefill_length, token_ids.shape[1]):
        state = decode_segment(causal_lm, state, prompt_mask, edge, stop_token_ids)
    return finish(state[0], prompt_mask, stop_token_ids)


def finish(token_ids, prompt_mask, stop_token_ids):
    """The outputs dict: tokens and a mask ending at each row's stop token."""
    return {
        "token_ids": token_ids,
        "padding_mask": _output_mask(token_ids, prompt_mask, stop_token_ids),
    }


def _output_mask(token_ids, prompt_mask, stop_token_ids):
    """True up to and including the first generated stop token of each row."""
    if stop_token_ids is None:
        return ops.ones_like(prompt_mask, dtype="bool")
    stops = ops.logical_and(
        _any_equal(token_ids, stop_token_ids), ops.logical_not(prompt_mask)
    )
    stops = ops.cast(stops, "int32")
    after = ops.cumsum(stops, axis=-1) - stops
    return ops.logical_not(ops.cast(after, "bool"))

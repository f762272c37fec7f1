"""The attention dispatch: each fast path equals the reference, values and gradients."""

import contextlib
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_gemma2.layers import attention_causal_blocked
from keras_gemma2.layers.attention_blocked import blocked_attention, blocked_pays_off
from keras_gemma2.layers.attention_dispatch import (
    ATTENTION_IMPLEMENTATIONS,
    attention,
    choose_implementation,
    validate_attention_implementation,
)
from keras_gemma2.layers.attention_policy import (
    FLEX_MIN_LENGTH,
    GLOBAL_BLOCK_SIZE,
    default_block_size,
)

BACKEND = keras.config.backend()


def numpy_attention(q, k, v, window, cap, padding=None):
    """Float64 Gemma 2 attention with the package's masked-row semantics.

    Masked logits are -1e9 (finite), so a row with no visible key averages
    all values uniformly.
    """
    q, k, v = (x.astype("float64") for x in (q, k, v))
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    visible = j <= i
    if window is not None:
        visible &= i - j < window
    out = np.zeros_like(q)
    for b in range(batch):
        rows = visible if padding is None else visible & padding[b][None].astype(bool)
        for n in range(heads):
            logits = q[b, :, n] @ k[b, :, n // group].T
            if cap is not None:
                logits = cap * np.tanh(logits / cap)
            logits = np.where(rows, logits, -1e9)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, n] = (weights / weights.sum(-1, keepdims=True)) @ v[
                b, :, n // group
            ]
    return out


def random_inputs(batch, length, heads, kv_heads, head_dim=8, seed=0):
    rng = np.random.RandomState(seed)
    # Scaled so that logits reach the soft cap.
    q = rng.normal(0, 1.5, (batch, length, heads, head_dim)).astype("float32")
    k = rng.normal(0, 1.5, (batch, length, kv_heads, head_dim)).astype("float32")
    v = rng.normal(0, 1.0, (batch, length, kv_heads, head_dim)).astype("float32")
    return q, k, v


def holes(batch, length, window):
    """Padding with left padding, a hole wider than the window and a short hole.

    Some local rows then see no key at all (the uniform-average case).
    """
    mask = np.ones((batch, length), "int32")
    mask[0, :3] = 0
    mask[-1, 4 : 4 + (window or 3) + 1] = 0
    mask[-1, length - 2] = 0
    return mask


@contextlib.contextmanager
def no_fallback():
    """Fail if the dispatch falls back from the requested implementation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot run here.*")
        yield


def forward(function, *arrays):
    """`function(*arrays)` as numpy; jitted on JAX (eager JAX compiles every op)."""
    if BACKEND == "jax":
        import jax

        function = jax.jit(function)
    return ops.convert_to_numpy(function(*arrays))


def value_and_grads(function, arrays, seed=1):
    """`(output, [d sum(output * r) / d array])` as numpy, on this backend."""
    cotangent = None

    def weighted(output):
        nonlocal cotangent
        if cotangent is None:
            shape = tuple(output.shape)
            cotangent = np.random.RandomState(seed).normal(size=shape)
        return ops.sum(output * ops.cast(cotangent, output.dtype))

    if BACKEND == "jax":
        import jax

        def loss(*xs):
            output = function(*xs)
            return weighted(output), output

        # Jitted: eager JAX compiles every small op separately (slow).
        (_, output), grads = jax.jit(
            jax.value_and_grad(loss, argnums=tuple(range(len(arrays))), has_aux=True)
        )(*arrays)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(x) for x in arrays]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            output = function(*tensors)
            loss = weighted(output)
        grads = tape.gradient(loss, tensors)
    else:
        import torch

        tensors = [torch.tensor(x, requires_grad=True) for x in arrays]
        output = function(*tensors)
        weighted(output).backward()
        grads = [t.grad for t in tensors]
    return ops.convert_to_numpy(output), [ops.convert_to_numpy(g) for g in grads]


BLOCKED_CASES = {
    # name: (length, window, heads, kv_heads, cap, padded, block_size)
    "block_is_window_gqa2_padded": (13, 5, 4, 2, 3.0, True, None),
    "window_not_dividing_length_gqa1": (13, 4, 2, 2, None, False, 4),
    "block_smaller_than_window": (17, 6, 4, 2, 3.0, True, 4),
    "block_not_dividing_window": (19, 7, 4, 1, 2.0, False, 3),
    "length_shorter_than_window": (4, 7, 4, 2, 3.0, True, None),
    "window_one": (9, 1, 2, 1, 3.0, True, None),
    "long_left_padding": (24, 4, 4, 2, 3.0, True, 8),
    # Global layers (window None): causal blocks over key prefixes.
    "global_blocks_divide_length_padded": (16, None, 4, 2, 3.0, True, 4),
    "global_short_last_block_gqa1": (13, None, 2, 2, None, False, 5),
    "global_one_query_per_block": (6, None, 4, 1, 2.0, True, 1),
    "global_one_block": (7, None, 4, 2, 3.0, True, 8),
    "global_long_left_padding": (24, None, 4, 2, 3.0, True, 8),
}


@pytest.mark.parametrize("case", sorted(BLOCKED_CASES))
def test_blocked_equals_reference_forward_and_gradients(case):
    length, window, heads, kv_heads, cap, padded, block = BLOCKED_CASES[case]
    q, k, v = random_inputs(2, length, heads, kv_heads)
    padding = holes(2, length, window) if padded else None
    if case.endswith("long_left_padding"):
        padding[0, :13] = 0  # rows 0..12 (and a window after them) see nothing

    def run(implementation):
        def function(q, k, v):
            return attention(
                q,
                k,
                v,
                padding_mask=padding,
                sliding_window_size=window,
                soft_cap=cap,
                implementation=implementation,
                block_size=block,
            )

        return value_and_grads(function, (q, k, v))

    with no_fallback():
        reference, reference_grads = run("reference")
        blocked, blocked_grads = run("blocked")
    expected = numpy_attention(q, k, v, window, cap, padding)
    np.testing.assert_allclose(reference, expected, atol=1e-5)
    np.testing.assert_allclose(blocked, expected, atol=1e-5)
    for name, got, want in zip("qkv", blocked_grads, reference_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}")


def test_causal_blocked_computes_only_the_triangle(monkeypatch):
    """Each query block sees only its key prefix: the logits are a triangle."""
    widths = []
    probabilities = attention_causal_blocked.masked_probabilities

    def recording(logits, mask, soft_cap, dtype, dropout):
        widths.append(tuple(logits.shape[-2:]))  # [B, K, G, queries, keys]
        return probabilities(logits, mask, soft_cap, dtype, dropout)

    monkeypatch.setattr(attention_causal_blocked, "masked_probabilities", recording)
    q, k, v = random_inputs(1, 10, 2, 1)
    attention(q, k, v, implementation="blocked", block_size=4)
    assert widths == [(4, 4), (4, 8), (2, 10)]  # 72 logits, not 100


def test_causal_blocked_needs_a_static_length():
    with pytest.raises(ValueError, match="static sequence length"):
        attention_causal_blocked.causal_blocked_attention(
            keras.KerasTensor((1, None, 2, 4)),
            keras.KerasTensor((1, None, 2, 4)),
            keras.KerasTensor((1, None, 2, 4)),
        )


def test_rows_without_visible_keys_average_all_values():
    q, k, v = random_inputs(1, 10, 2, 1)
    padding = np.ones((1, 10), "int32")
    padding[0, 2:6] = 0  # window 3: rows 4 and 5 see no real key
    out = forward(
        lambda q, k, v: attention(
            q, k, v, padding, sliding_window_size=3, implementation="blocked"
        ),
        q,
        k,
        v,
    )
    mean = v[0, :, 0].mean(0)
    for row in (4, 5):
        np.testing.assert_allclose(out[0, row, 0], mean, atol=1e-6)
    assert np.all(np.isfinite(out))


def test_blocked_compiles():
    q, k, v = random_inputs(2, 21, 4, 2)
    padding = holes(2, 21, 4)

    def function(q, k, v, padding):
        return attention(
            q, k, v, padding, 4, 3.0, implementation="blocked", block_size=4
        )

    if BACKEND == "jax":
        import jax

        compiled = jax.jit(function)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(function, jit_compile=True)
    else:
        pytest.skip("torch runs the blocked kernel eagerly; nothing to compile")
    expected = numpy_attention(q, k, v, 4, 3.0, padding)
    out = ops.convert_to_numpy(compiled(q, k, v, padding))
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "blocked"])
def test_dynamic_length_graph_equals_reference(implementation):
    if BACKEND != "tensorflow":
        pytest.skip("only TensorFlow graphs trace with an unknown sequence length")
    import tensorflow as tf

    spec = [
        tf.TensorSpec((None, None, 4, 8), "float32"),
        tf.TensorSpec((None, None, 2, 8), "float32"),
        tf.TensorSpec((None, None, 2, 8), "float32"),
        tf.TensorSpec((None, None), "int32"),
    ]

    @tf.function(input_signature=spec)
    def function(q, k, v, padding):
        return attention(q, k, v, padding, 3, 3.0, implementation=implementation)

    for length in (5, 40):  # the run-time choice: reference, then blocked
        q, k, v = random_inputs(2, length, 4, 2)
        padding = holes(2, length, 3)
        out = function(q, k, v, padding)
        expected = numpy_attention(q, k, v, 3, 3.0, padding)
        np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)


def _skip_unless_flex():
    if BACKEND != "torch":
        pytest.skip("flex attention is PyTorch's kernel; this backend is " + BACKEND)
    from keras_gemma2.layers.torch_flex_attention import flex_unavailable_reason

    reason = flex_unavailable_reason(ops.zeros((1, 1, 1, 2)), needs_gradient=False)
    if reason is not None:
        pytest.skip(f"flex attention unavailable: {reason}")


@pytest.mark.parametrize(
    "window, padded", [(5, True), (None, False)], ids=["local_padded", "global"]
)
def test_flex_equals_reference(window, padded):
    _skip_unless_flex()
    import torch

    # Longer than one 128-token tile and not a multiple of it.
    q, k, v = random_inputs(2, 150, 4, 2)
    padding = holes(2, 150, window) if padded else None
    with torch.no_grad():
        expected = attention(q, k, v, padding, window, 3.0, implementation="reference")
        with no_fallback():
            out = attention(q, k, v, padding, window, 3.0, implementation="flex")
    np.testing.assert_allclose(
        ops.convert_to_numpy(out), ops.convert_to_numpy(expected), atol=1e-5
    )


def test_flex_with_gradients_on_cpu_falls_back_to_portable():
    _skip_unless_flex()
    import torch

    q = torch.zeros((1, 16, 2, 8), requires_grad=True)
    if q.device.type != "cpu":
        pytest.skip("flex attention has a backward pass off CPU")
    with pytest.warns(UserWarning, match="no backward pass on CPU"):
        chosen = choose_implementation("flex", q, sliding_window_size=4)
    assert chosen == "blocked"


def test_fused_without_soft_cap_equals_reference():
    # keras.ops.dot_product_attention runs everywhere when there is no cap.
    q, k, v = random_inputs(2, 11, 4, 2)
    padding = holes(2, 11, 3)
    expected = numpy_attention(q, k, v, 3, None, padding)
    with no_fallback():
        out = forward(
            lambda q, k, v: attention(
                q, k, v, padding, 3, None, implementation="fused"
            ),
            q,
            k,
            v,
        )
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_fused_with_soft_cap_equals_reference():
    if BACKEND != "jax":
        pytest.skip("keras.ops.dot_product_attention soft-caps only with JAX on TPU")
    import jax

    if jax.devices()[0].platform != "tpu":
        pytest.skip(
            "keras.ops.dot_product_attention soft-caps only on TPU; this is "
            + jax.devices()[0].platform
        )
    # Splash kernel tiles: a length of whole 128-blocks, head_dim 128.
    q, k, v = random_inputs(2, 512, 4, 2, head_dim=128)
    q = q / np.sqrt(128)
    expected = numpy_attention(q, k, v, 128, 5.0)
    out = jax.jit(
        lambda q, k, v: attention(q, k, v, None, 128, 5.0, implementation="fused")
    )(q, k, v)
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, atol=1e-5)


def test_fused_with_soft_cap_off_tpu_falls_back():
    if BACKEND == "jax":
        import jax

        if jax.devices()[0].platform == "tpu":
            pytest.skip("on TPU the fused path runs (tested above)")
    q = ops.zeros((1, 64, 2, 8))
    with pytest.warns(UserWarning, match="only with JAX on TPU"):
        chosen = choose_implementation("fused", q, sliding_window_size=4, soft_cap=5.0)
    assert chosen == "blocked"


def query_of(length):
    return ops.zeros((1, length, 2, 4))


def _flex_runs_for_auto():
    if BACKEND != "torch":
        return False
    from keras_gemma2.layers.torch_flex_attention import flex_unavailable_reason

    return flex_unavailable_reason(query_of(1), needs_gradient=False) is None


def test_auto_choice():
    # Local layers: blocked once it computes fewer logits than the full path.
    assert choose_implementation("auto", query_of(64), sliding_window_size=16) == (
        "blocked"
    )
    assert choose_implementation("auto", query_of(20), sliding_window_size=16) == (
        "reference"
    )
    # Global layers: causal blocks from two blocks on, else the reference.
    block = GLOBAL_BLOCK_SIZE
    assert choose_implementation("auto", query_of(2 * block - 1)) == "reference"
    assert choose_implementation("auto", query_of(2 * block)) == "blocked"
    assert choose_implementation("auto", query_of(64), block_size=32) == "blocked"
    # Long inputs without gradients: compiled flex on torch.
    long_query = query_of(FLEX_MIN_LENGTH)
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            chosen = choose_implementation("auto", long_query, sliding_window_size=16)
            global_chosen = choose_implementation("auto", long_query)
        if _flex_runs_for_auto():
            assert (chosen, global_chosen) == ("flex", "flex")
        with torch.enable_grad():
            grad_query = long_query.clone().requires_grad_(True)
            chosen = choose_implementation("auto", grad_query, sliding_window_size=16)
        assert chosen == "blocked"
    else:
        chosen = choose_implementation("auto", long_query, sliding_window_size=16)
        assert chosen == "blocked"


def test_explicit_choices():
    assert choose_implementation("reference", query_of(64), 16) == "reference"
    # "blocked" is honoured on every local layer, however short.
    assert choose_implementation("blocked", query_of(4), 16) == "blocked"
    assert choose_implementation("blocked", query_of(64), None) == "blocked"
    dynamic = keras.KerasTensor((1, None, 2, 4))
    assert choose_implementation("blocked", dynamic, None) == "reference"
    if BACKEND != "torch":
        with pytest.warns(UserWarning, match="needs the torch backend"):
            assert choose_implementation("flex", query_of(64), 16) == "blocked"


def test_default_block_size_is_a_half_window_power_of_two_up_to_512():
    assert [default_block_size(w) for w in (5, 64, 512, 4096)] == [5, 32, 256, 512]


def test_blocked_pays_off_exactly_when_it_computes_fewer_logits():
    # Window 4096, blocks of 512: 8 previous blocks, 4608 keys per query.
    assert not blocked_pays_off(4608, 4096)
    assert blocked_pays_off(8192, 4096)  # 8192 * 4608 < 8192**2
    # Window 16, blocks of 16: one previous block, 32 keys per query.
    assert not blocked_pays_off(39, 16)  # 48 * 32 > 39**2
    assert blocked_pays_off(40, 16)  # 48 * 32 < 40**2


@pytest.mark.parametrize("value", ["fast", None, 3, "Blocked"])
def test_unknown_implementation_names_the_argument(value):
    with pytest.raises(ValueError, match="attention_implementation"):
        validate_attention_implementation(value)
    q = query_of(8)
    with pytest.raises(ValueError, match="implementation"):
        attention(q, q, q, implementation=value)


def test_bad_arguments():
    q = query_of(8)
    with pytest.raises(ValueError, match="block_size"):
        attention(q, q, q, sliding_window_size=2, block_size=0)
    with pytest.raises(ValueError, match="sliding_window_size"):
        blocked_attention(q, q, q)


@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
def test_every_listed_implementation_gives_the_float64_result(implementation):
    """Each name the dispatch lists is accepted and equals a numpy computation.

    A path that cannot run on this backend falls back (with a warning) to a
    portable one, which must give the same numbers. Unknown names are
    refused in `test_unknown_implementation_names_the_argument`.
    """
    # The shapes of `test_flex_equals_reference`: torch compiles flex once.
    q, k, v = random_inputs(2, 150, 4, 2)
    padding = holes(2, 150, 5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot run here.*")
        out = forward(
            lambda q, k, v: attention(
                q, k, v, padding, 5, 3.0, implementation=implementation
            ),
            q,
            k,
            v,
        )
    expected = numpy_attention(q, k, v, 5, 3.0, padding)
    np.testing.assert_allclose(out, expected, atol=1e-5)

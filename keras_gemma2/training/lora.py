"""LoRA on `Gemma2Backbone`'s projections: targets, adapters, merge.

An adapter on a projection `W` (our kernel, read as a matrix `[in, out]`)
adds `(alpha / rank) * A @ B`, with `A` `[in, rank]` and `B` `[rank, out]`:
the low-rank update of the whole matrix, as Hugging Face PEFT defines it
(PEFT's `lora_A.weight` is `A.T`, `lora_B.weight` is `B.T`). Keras'
built-in `EinsumDense.enable_lora` factors only the kernel's last axis
(`[hidden, heads, rank] @ [rank, head_dim]` for a query kernel), which
neither matches PEFT nor has `rank * (in + out)` parameters, so the
targeted `EinsumDense` layers switch to `LoraEinsumDense` while they hold
an adapter and back to `EinsumDense` when it is merged.

Which projections exist, their names (ours, KerasHub's, Hugging Face's)
and their `in`/`out` axes come from `keras_gemma2.models.weight_table`.
"""

import json
import math
import os

import keras
import numpy as np
from keras import ops

from keras_gemma2.models import weight_table

# KerasHub's choice for `enable_lora(rank)`.
DEFAULT_TARGETS = ("query", "value")
ALL_TARGETS = "all"


class LoraEinsumDense(keras.layers.EinsumDense):
    """An `EinsumDense` holding a full-matrix low-rank adapter.

    Never built directly: `enable` gives a built `EinsumDense` this class and
    adds `lora_kernel_a` `[in, rank]` and `lora_kernel_b` `[rank, out]`
    (float32, like Keras' own adapters). The kernel reads
    `W + (lora_alpha / lora_rank) * reshape(A @ B, W.shape)`; on an int8 or
    int4 layer the quantized product gets the adapter's product added.
    Saving writes the merged float kernel, as Keras does for its adapters.
    """

    def _lora_update(self):
        """`(alpha / rank) * A @ B` in the kernel's shape, float32."""
        update = ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
        update = ops.reshape(update, self.lora_kernel_shape)
        return ops.multiply(update, self.lora_alpha / self.lora_rank)

    @property
    def kernel(self):
        kernel = super().kernel
        if self.quantization_mode is not None:
            return kernel  # quantized_call adds the adapter
        return ops.cast(ops.add(kernel, self._lora_update()), self.compute_dtype)

    def quantized_call(self, inputs, training=None):
        outputs = super().quantized_call(inputs, training=training)
        update = ops.cast(self._lora_update(), self.compute_dtype)
        return ops.add(outputs, ops.einsum(self.equation, inputs, update))

    def enable_lora(self, *args, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' already holds a LoRA adapter of rank "
            f"{self.lora_rank}. Call `backbone.merge_lora()` before enabling "
            "another."
        )

    def quantize(self, *args, **kwargs):
        raise ValueError(
            f"Layer '{self.name}' holds a LoRA adapter. Quantize before "
            "`enable_lora` (QLoRA), or call `backbone.merge_lora()` first."
        )

    def save_own_variables(self, store):
        if self.quantization_mode is not None:
            raise ValueError(
                f"Layer '{self.name}' is {self.quantization_mode}-quantized and "
                "holds a LoRA adapter, which a weights file cannot hold. Save the "
                "adapter with `backbone.save_lora_weights(...)` instead."
            )
        super().save_own_variables(store)  # the merged kernel

    def _check_load_own_variables(self, store):
        adapters = {id(self.lora_kernel_a), id(self.lora_kernel_b)}
        count = sum(id(v) not in adapters for v in self.variables)
        if len(store.keys()) != count:
            raise ValueError(
                f"Layer '{self.name}' expects {count} variables (besides its "
                f"LoRA adapter) but the weights file holds {len(store.keys())}."
            )

    def load_own_variables(self, store):
        super().load_own_variables(store)
        # A loaded kernel is complete (a saved one has its adapter merged).
        self.lora_kernel_b.assign(ops.zeros(self.lora_kernel_b.shape))


def projection_weights():
    """The weight-table rows LoRA can target: every block projection kernel."""
    return tuple(w for w in weight_table.BLOCK_WEIGHTS if w.attribute[-1] == "kernel")


def projection_layer(block, weight):
    """The `EinsumDense` layer of `weight` in decoder `block`."""
    layer = block
    for name in weight.attribute[:-1]:
        layer = getattr(layer, name)
    return layer


def hf_module(weight):
    """The Hugging Face / PEFT module name of `weight`, e.g. `"q_proj"`."""
    return weight.hf.split(".")[-2]


def matrix_sizes(weight, sizes):
    """`(in, out)` sizes of `weight` read as a matrix (HF layout is `[out, in]`).

    Our kernel must hold the input axes first, in HF's order, then the
    output axes, so `reshape(A @ B)` is our kernel layout.
    """
    out_axes, in_axes = weight.hf_axes
    ours = [name for group in weight.axes for name in group]
    if ours != list(in_axes) + list(out_axes):
        raise ValueError(
            f"The kernel layout of `{weight.name}` ({weight.axes}) does not "
            "list its input axes before its output axes; LoRA cannot reshape "
            "its update."
        )
    return (
        math.prod(sizes[name] for name in in_axes),
        math.prod(sizes[name] for name in out_axes),
    )


def target_aliases(backbone):
    """`{accepted name: our layer name}` for every LoRA-able projection.

    Accepts our layer names (`"attention_output"`), the weight table's names
    (`"output"`), KerasHub Gemma's (`"ffw_gating"`) and PEFT's (`"o_proj"`).
    """
    block = backbone.transformer_layers[0]
    aliases = {}
    for weight in projection_weights():
        ours = projection_layer(block, weight).name
        keras_hub = weight.keras_hub.split("/")[-2]
        for alias in (ours, weight.name, keras_hub, hf_module(weight)):
            aliases[alias] = ours
    return aliases


def resolve_targets(backbone, target_names):
    """Our layer names for `target_names`, in weight-table order.

    Args:
        backbone: `Gemma2Backbone`.
        target_names: `None` (query and value), `"all"`, one name, or a list
            of names (see `target_aliases`).
    """
    aliases = target_aliases(backbone)
    if target_names is None:
        target_names = DEFAULT_TARGETS
    elif target_names == ALL_TARGETS:
        target_names = tuple(aliases)
    elif isinstance(target_names, str):
        target_names = (target_names,)
    if not isinstance(target_names, (list, tuple)) or not target_names:
        raise ValueError(
            "Received an invalid value for `target_names`, expected None, "
            f"'all' or a non-empty list of layer names. Received: "
            f"target_names={target_names!r}"
        )
    unknown = [n for n in target_names if not isinstance(n, str) or n not in aliases]
    if unknown:
        raise ValueError(
            "Received an invalid value for `target_names`: no projection of "
            f"Gemma2Backbone is named {unknown}. Expected names among "
            f"{sorted(aliases)}, or 'all'. Received: target_names={target_names!r}"
        )
    chosen = {aliases[name] for name in target_names}
    order = list(dict.fromkeys(aliases.values()))
    return tuple(name for name in order if name in chosen)


def check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(
            "Received an invalid value for `rank`, expected a positive integer. "
            f"Received: rank={rank!r}"
        )
    return int(rank)


def check_alpha(alpha, rank):
    if alpha is None:
        return float(rank)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.number))
        or not alpha > 0
    ):
        raise ValueError(
            "Received an invalid value for `alpha`, expected a positive number. "
            f"Received: alpha={alpha!r}"
        )
    return float(alpha)


def adapter_plan(backbone, targets):
    """List `(block_index, weight, layer, (in, out))` for `targets`, in order."""
    sizes = weight_table.dimensions(backbone)
    chosen = [
        weight
        for weight in projection_weights()
        if projection_layer(backbone.transformer_layers[0], weight).name in targets
    ]
    return [
        (index, weight, projection_layer(block, weight), matrix_sizes(weight, sizes))
        for index, block in enumerate(backbone.transformer_layers)
        for weight in chosen
    ]


class LoraState:
    """What `enable` did: targets, rank, alpha, and the trainable flags before.

    A plain object (not a tuple or list), so Keras' attribute tracking does
    not adopt the layers it refers to.
    """

    def __init__(self, targets, rank, alpha, previous_trainable):
        self.targets = targets
        self.rank = rank
        self.alpha = alpha
        self.previous_trainable = previous_trainable


def lora_state(backbone):
    """The `LoraState` of `backbone`, or `None` without adapters."""
    return getattr(backbone, "_lora_state", None)


def enable(backbone, rank, target_names=None, alpha=None):
    """Add adapters to `target_names` of every block; freeze everything else.

    Checks every argument before changing anything. Returns the targets.
    """
    rank = check_rank(rank)
    alpha = check_alpha(alpha, rank)
    targets = resolve_targets(backbone, target_names)
    state = lora_state(backbone)
    if state is not None:
        raise ValueError(
            f"LoRA is already enabled on {list(state.targets)} with rank "
            f"{state.rank}. "
            "Call `merge_lora()` before enabling it again."
        )
    plan = adapter_plan(backbone, targets)
    for _, _, layer, _ in plan:
        if type(layer) is not keras.layers.EinsumDense or not layer.built:
            raise ValueError(
                f"Layer '{layer.path}' is a {type(layer).__name__} (built: "
                f"{layer.built}); LoRA needs a built keras.layers.EinsumDense."
            )
        if layer.quantization_mode not in (None, "int8", "int4"):
            raise ValueError(
                f"Layer '{layer.path}' is {layer.quantization_mode}-quantized; "
                "LoRA supports float, int8 and int4 layers."
            )
    previous_trainable = _trainable_flags(backbone)
    backbone.trainable = True
    for layer in _all_layers(backbone):
        layer.trainable = False
    for _, _, layer, (in_size, out_size) in plan:
        _attach(layer, rank, alpha, in_size, out_size)
    backbone._lora_state = LoraState(targets, rank, alpha, previous_trainable)
    return targets


def _attach(layer, rank, alpha, in_size, out_size):
    """Give `layer` an adapter `[in, rank] @ [rank, out]` and its class."""
    kernel_shape = _kernel_shape(layer)
    layer.trainable = True
    for variable in layer.variables:
        variable.trainable = False
    # Keras locks a built layer's state; its own enable_lora unlocks likewise.
    layer._tracker.unlock()
    layer.lora_kernel_a = layer.add_weight(
        name="lora_kernel_a",
        shape=(in_size, rank),
        initializer=_he_uniform,
        dtype="float32",
    )
    layer.lora_kernel_b = layer.add_weight(
        name="lora_kernel_b",
        shape=(rank, out_size),
        initializer="zeros",
        dtype="float32",
    )
    layer._tracker.lock()
    layer.lora_kernel_shape = kernel_shape
    layer.lora_rank = rank
    layer.lora_alpha = alpha
    layer.__class__ = LoraEinsumDense


def _he_uniform(shape, dtype=None):
    """He-uniform `[in, rank]` values (Keras' choice for adapters), from numpy.

    numpy's global generator, which `keras.utils.set_random_seed` seeds, so
    runs repeat; drawing here avoids compiling one random kernel per adapter
    shape on JAX.
    """
    limit = np.sqrt(6.0 / shape[0])
    return np.random.uniform(-limit, limit, shape).astype(dtype or "float32")


def _kernel_shape(layer):
    """The logical kernel shape of `layer` (int4 stores a packed one)."""
    if layer.quantization_mode == "int4":
        return tuple(layer.original_kernel_shape)
    return tuple(layer.kernel.shape)


def adapted_layers(backbone):
    """`(block_index, weight, layer)` for every layer holding an adapter."""
    state = lora_state(backbone)
    if state is None:
        return []
    return [
        (index, weight, layer)
        for index, weight, layer, _ in adapter_plan(backbone, state.targets)
    ]


def detach(backbone, merge):
    """Remove every adapter, folding it into the kernel first if `merge`.

    Restores each layer's class and the trainable flags from before
    `enable`.
    """
    layers = adapted_layers(backbone)
    if merge:
        quantized = [
            f"{layer.path} ({layer.quantization_mode})"
            for _, _, layer in layers
            if layer.quantization_mode is not None
        ]
        if quantized:
            raise ValueError(
                "merge_lora() cannot fold adapters into quantized kernels without "
                "re-quantizing them, which would lose most of what the adapter "
                f"learned: {quantized}. Keep the adapter (save_lora_weights), or "
                "load the float model, enable_lora and load_lora_weights on it, "
                "merge there, and quantize after."
            )
        # In float32 even under mixed precision, cast once to the variable.
        merged = [
            ops.convert_to_numpy(
                ops.add(
                    ops.cast(_kernel_variable(layer), "float32"), layer._lora_update()
                )
            )
            for _, _, layer in layers
        ]
    for position, (_, _, layer) in enumerate(layers):
        layer.__class__ = keras.layers.EinsumDense
        if merge:
            kernel = _kernel_variable(layer)
            kernel.assign(merged[position].astype(kernel.dtype))
        _remove_variable(layer, "lora_kernel_a")
        _remove_variable(layer, "lora_kernel_b")
        del layer.lora_kernel_shape
        layer.lora_rank = None
        layer.lora_alpha = None
    _restore_trainable_flags(lora_state(backbone).previous_trainable)
    backbone._lora_state = None


def _remove_variable(layer, name):
    """Untrack and delete variable attribute `name` of `layer`.

    What `Layer.__delattr__` does, without the `gc.collect()` it runs for
    every variable (about a second each with three backends imported).
    """
    layer._untrack_variable(getattr(layer, name))
    super(keras.layers.Layer, layer).__delattr__(name)


def _kernel_variable(layer):
    return next(v for v in layer.variables if v.name == "kernel")


def _all_layers(backbone):
    """Every layer under `backbone`, parents before children."""
    return backbone._flatten_layers(include_self=False)


def _trainable_flags(backbone):
    layers = [(layer, layer.trainable) for layer in [backbone, *_all_layers(backbone)]]
    return layers, [(v, v.trainable) for v in backbone.variables]


def _restore_trainable_flags(flags):
    layers, variables = flags
    for layer, trainable in layers:  # a parent's flag cascades; children follow
        layer.trainable = trainable
    for variable, trainable in variables:
        variable.trainable = trainable


def trainable_parameter_count(backbone):
    """Number of trainable scalars of `backbone`."""
    return int(sum(np.prod(v.shape) for v in backbone.trainable_variables))


def adapter_arrays(backbone):
    """`{(block_index, layer name): (A [in, r], B [r, out])}` as float32 numpy."""
    return {
        (index, layer.name): (
            ops.convert_to_numpy(layer.lora_kernel_a),
            ops.convert_to_numpy(layer.lora_kernel_b),
        )
        for index, _, layer in adapted_layers(backbone)
    }


def assign_adapters(backbone, arrays, rank, target_names, alpha, source):
    """Enable (if needed) and assign `arrays`, checked first; all or nothing.

    Args:
        backbone: `Gemma2Backbone`.
        arrays: `{(block_index, layer name): (A [in, r], B [r, out])}`.
        rank, alpha: the adapter's rank and scaling numerator.
        target_names: our layer names the adapter covers.
        source: the file or directory, for error messages.
    """
    rank = check_rank(rank)
    alpha = check_alpha(alpha, rank)
    targets = resolve_targets(backbone, list(target_names))
    state = lora_state(backbone)
    if state is not None and (state.targets, state.rank) != (targets, rank):
        raise ValueError(
            f"The adapter in {source} has rank {rank} on {list(targets)}, but this "
            f"model has LoRA enabled with rank {state.rank} on "
            f"{list(state.targets)}. "
            "Call `merge_lora()` first, or enable the same rank and targets."
        )
    plan = adapter_plan(backbone, targets)
    expected = {(index, layer.name): sizes for index, _, layer, sizes in plan}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"The adapter in {source} does not cover the same layers as its "
            f"targets {list(targets)} on {backbone.num_layers} blocks: missing "
            f"{_names(missing)}, unexpected {_names(extra)}."
        )
    for key, (in_size, out_size) in expected.items():
        a, b = arrays[key]
        if a.shape != (in_size, rank) or b.shape != (rank, out_size):
            raise ValueError(
                f"The adapter for {_names([key])[0]} in {source} has shapes "
                f"A {a.shape}, B {b.shape} (ours: [in, rank], [rank, out]); "
                f"this model needs A {(in_size, rank)}, B {(rank, out_size)}. "
                "It was made for another model or another rank."
            )
    enabled_here = state is None
    if enabled_here:
        enable(backbone, rank, targets, alpha)
    try:
        for index, _, layer in adapted_layers(backbone):
            a, b = arrays[(index, layer.name)]
            layer.lora_kernel_a.assign(np.asarray(a, "float32"))
            layer.lora_kernel_b.assign(np.asarray(b, "float32"))
            layer.lora_alpha = alpha
        lora_state(backbone).alpha = alpha
    except BaseException:
        if enabled_here:
            detach(backbone, merge=False)
        raise


def _names(keys):
    return [f"decoder_block_{index}/{name}" for index, name in keys]


KERAS_SUFFIX = ".lora.h5"


def save_keras_file(backbone, path):
    """Write the adapters to a KerasHub-style `.lora.h5` file, atomically.

    Group `lora` holds `rank`, attributes `alpha` and `targets`, and one
    group `decoder_block_{i}/{layer name}` per adapter with `lora_kernel_a`
    `[in, rank]` and `lora_kernel_b` `[rank, out]`.
    """
    import h5py

    path = os.fspath(path)
    if not path.endswith(KERAS_SUFFIX):
        raise ValueError(
            f"The filename must end in `{KERAS_SUFFIX}`. Received: filepath={path}"
        )
    state = lora_state(backbone)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.partial")
    try:
        with h5py.File(temporary, "w") as file:
            group = file.create_group("lora")
            group["rank"] = state.rank
            group.attrs["alpha"] = state.alpha
            group.attrs["targets"] = json.dumps(list(state.targets))
            for (index, layer), (a, b) in adapter_arrays(backbone).items():
                adapter = group.create_group(f"decoder_block_{index}/{layer}")
                adapter["lora_kernel_a"] = a
                adapter["lora_kernel_b"] = b
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_keras_file(path):
    """Read a `.lora.h5` file of `save_keras_file`: `(arrays, rank, targets, alpha)`."""
    import h5py

    with h5py.File(path, "r") as file:
        group = file.get("lora")
        if group is None or "rank" not in group or "targets" not in group.attrs:
            raise ValueError(
                f"{path} is not a keras_gemma2 LoRA file: it lacks the `lora` group "
                "with `rank` and `targets` (KerasHub's own files factor the kernel "
                "differently and cannot be loaded)."
            )
        rank = int(group["rank"][()])
        alpha = float(group.attrs["alpha"])
        targets = json.loads(group.attrs["targets"])
        arrays = {}
        for block_name, block in group.items():
            if block_name == "rank":
                continue
            index = int(block_name.rsplit("_", 1)[-1])
            for layer, adapter in block.items():
                arrays[(index, layer)] = (
                    np.asarray(adapter["lora_kernel_a"]),
                    np.asarray(adapter["lora_kernel_b"]),
                )
    return arrays, rank, targets, alpha

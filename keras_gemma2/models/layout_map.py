"""Sharding Gemma 2 over a device mesh: one layout map for every mesh and head count.

`Gemma2Backbone.get_layout_map(device_mesh)` returns a `Gemma2LayoutMap`, a
`keras.distribution.LayoutMap` for `keras.distribution.ModelParallel`. Keras
asks a layout map for a variable's layout by its path only, but whether an
axis can be sharded depends on the variable's shape: JAX refuses to shard a
dimension the mesh axis does not divide (KerasHub's fixed map fails that way
wherever the model axis does not divide the key/value heads). So the map
learns the shapes from the backbone: a `Gemma2Backbone` built while a
`ModelParallel` with a `Gemma2LayoutMap` is active binds its config first
(`bind`), and the map then answers for every weight path of that config.
Backbones built one after another (a teacher, then a student) each bind
their own; their weights are laid out while they are built or loaded.

The rule (`weight_layout`), with `model` and `batch` the two mesh axes:

| weight | shape | axes |
|---|---|---|
| token embedding (tied head) | `[vocabulary, hidden]` | `(model, batch)` |
| query, key, value | `[hidden, heads, head_dim]` | `(batch, model, None)` |
| attention output | `[heads, head_dim, hidden]` | `(model, None, batch)` |
| feed-forward gate, up | `[hidden, intermediate]` | `(batch, model)` |
| feed-forward down | `[intermediate, hidden]` | `(model, batch)` |
| RMS-norm scales | `[hidden]` | replicated |

Any axis whose mesh size does not divide the dimension is replicated along
that mesh axis instead: with 2 key/value heads on a model axis of 8, the
key and value kernels are split along `hidden` over `batch` only and copied
over `model`. Heads are never split inside a head, so attention needs no
communication within a head. Sharding `hidden` over the batch axis is
fully sharded data parallelism: each weight lives on `1 / (model * batch)`
of the devices when both axes divide it.
"""

import keras

MODEL_AXIS = "model"
BATCH_AXIS = "batch"


def _check_mesh(device_mesh, model_parallel_dim_name, data_parallel_dim_name):
    if keras.config.backend() != "jax":
        raise NotImplementedError(
            "Keras' distribution API (`keras.distribution.ModelParallel`, "
            "`DataParallel`, `DeviceMesh`) is implemented for the JAX backend "
            f"only; this process runs Keras on {keras.config.backend()!r}. "
            "Set KERAS_BACKEND=jax to shard a Gemma 2 model."
        )
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "Received an invalid value for `device_mesh`, expected a "
            "`keras.distribution.DeviceMesh`. Received: "
            f"device_mesh={type(device_mesh).__name__}"
        )
    names = tuple(device_mesh.axis_names)
    for argument, name in (
        ("model_parallel_dim_name", model_parallel_dim_name),
        ("data_parallel_dim_name", data_parallel_dim_name),
    ):
        if name not in names:
            raise ValueError(
                f"Received an invalid value for `{argument}`: the device mesh "
                f"has no axis {name!r}. Its axes are {list(names)} (shape "
                f"{tuple(device_mesh.shape)}). Name the mesh axes, e.g. "
                "`DeviceMesh(shape, axis_names=['batch', 'model'], devices)`, "
                "or pass the names it uses."
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise ValueError(
            "`model_parallel_dim_name` and `data_parallel_dim_name` must name "
            f"two different mesh axes. Received: {model_parallel_dim_name!r} "
            "for both."
        )


def weight_shapes(config):
    """`{variable path: shape}` of a `Gemma2Backbone` built from `config`.

    Args:
        config: dict with the backbone's `vocabulary_size`, `num_layers`,
            `num_query_heads`, `num_key_value_heads`, `hidden_dim`,
            `intermediate_dim` and `head_dim` (`Gemma2Backbone.get_config()`
            holds them).

    Returns:
        A dict from variable path (as `keras.Variable.path`) to shape tuple.

    Example:

    >>> shapes = weight_shapes({"vocabulary_size": 64, "num_layers": 1,
    ...     "num_query_heads": 4, "num_key_value_heads": 2, "hidden_dim": 16,
    ...     "intermediate_dim": 32, "head_dim": 8})
    >>> shapes["decoder_block_0/attention/key/kernel"]
    (16, 2, 8)
    >>> len(shapes)
    13
    """
    hidden, heads = config["hidden_dim"], config["num_query_heads"]
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    intermediate = config["intermediate_dim"]
    shapes = {"token_embedding/embeddings": (config["vocabulary_size"], hidden)}
    for index in range(config["num_layers"]):
        block = f"decoder_block_{index}"
        shapes.update(
            {
                f"{block}/pre_attention_norm/scale": (hidden,),
                f"{block}/attention/query/kernel": (hidden, heads, head_dim),
                f"{block}/attention/key/kernel": (hidden, kv_heads, head_dim),
                f"{block}/attention/value/kernel": (hidden, kv_heads, head_dim),
                f"{block}/attention/attention_output/kernel": (
                    heads,
                    head_dim,
                    hidden,
                ),
                f"{block}/post_attention_norm/scale": (hidden,),
                f"{block}/pre_ffw_norm/scale": (hidden,),
                f"{block}/ffw/gate/kernel": (hidden, intermediate),
                f"{block}/ffw/up/kernel": (hidden, intermediate),
                f"{block}/ffw/down/kernel": (intermediate, hidden),
                f"{block}/post_ffw_norm/scale": (hidden,),
            }
        )
    shapes["final_norm/scale"] = (hidden,)
    return shapes


def weight_layout(path, shape, mesh_shape, model="model", batch="batch"):
    """The mesh axes of one backbone weight: the rule of `Gemma2LayoutMap`.

    Args:
        path: variable path, e.g. `"decoder_block_0/attention/key/kernel"`.
        shape: the variable's shape.
        mesh_shape: dict `{axis name: size}` of the device mesh.
        model: name of the model-parallel mesh axis. Defaults to `"model"`.
        batch: name of the data-parallel mesh axis. Defaults to `"batch"`.

    Returns:
        A tuple with one mesh axis name or `None` per dimension of `shape`.

    Example:

    >>> weight_layout("decoder_block_0/attention/key/kernel", (16, 2, 8),
    ...               {"batch": 2, "model": 4})
    ('batch', None, None)
    >>> weight_layout("decoder_block_0/attention/query/kernel", (16, 4, 8),
    ...               {"batch": 2, "model": 4})
    ('batch', 'model', None)
    """
    name = path.rsplit("/", 2)
    kind = "/".join(name[-2:])
    if kind == "token_embedding/embeddings":
        axes = (model, batch)
    elif kind in ("query/kernel", "key/kernel", "value/kernel"):
        axes = (batch, model, None)
    elif kind == "attention_output/kernel":
        axes = (model, None, batch)
    elif kind in ("gate/kernel", "up/kernel"):
        axes = (batch, model)
    elif kind == "down/kernel":
        axes = (model, batch)
    else:
        axes = (None,) * len(shape)
    return tuple(
        axis if axis is not None and size % mesh_shape[axis] == 0 else None
        for axis, size in zip(axes, shape, strict=True)
    )


class Gemma2LayoutMap(keras.distribution.LayoutMap):
    """A `keras.distribution.LayoutMap` for Gemma 2 backbones on any mesh.

    Made by `Gemma2Backbone.get_layout_map`; see `keras_gemma2.models.
    layout_map` for the rule. Entries set by hand (`layout_map[regex] =
    (...)`) take precedence over the rule. Until a backbone binds its
    config, the rule answers nothing.

    Args:
        device_mesh: `keras.distribution.DeviceMesh` with the two axes.
        model_parallel_dim_name: string. Defaults to `"model"`.
        data_parallel_dim_name: string. Defaults to `"batch"`.
    """

    def __init__(
        self,
        device_mesh,
        model_parallel_dim_name=MODEL_AXIS,
        data_parallel_dim_name=BATCH_AXIS,
    ):
        _check_mesh(device_mesh, model_parallel_dim_name, data_parallel_dim_name)
        super().__init__(device_mesh)
        self.model_parallel_dim_name = model_parallel_dim_name
        self.data_parallel_dim_name = data_parallel_dim_name
        self._shapes = {}

    @property
    def mesh_shape(self):
        """`{axis name: size}` of the device mesh."""
        mesh = self.device_mesh
        return dict(zip(mesh.axis_names, mesh.shape, strict=True))

    def bind(self, config):
        """Answer for the weights of a backbone built from `config` from now on.

        `Gemma2Backbone` calls this itself when it is built under a
        `ModelParallel` that holds this map.

        Args:
            config: a `Gemma2Backbone` config dict.
        """
        self._shapes = weight_shapes(config)

    def __getitem__(self, key):
        layout = super().__getitem__(key)
        if layout is not None or key not in self._shapes:
            return layout
        axes = weight_layout(
            key,
            self._shapes[key],
            self.mesh_shape,
            self.model_parallel_dim_name,
            self.data_parallel_dim_name,
        )
        return keras.distribution.TensorLayout(axes, self.device_mesh)


def get_layout_map(
    device_mesh,
    model_parallel_dim_name=MODEL_AXIS,
    data_parallel_dim_name=BATCH_AXIS,
):
    """`Gemma2Backbone.get_layout_map`: see its docstring."""
    return Gemma2LayoutMap(device_mesh, model_parallel_dim_name, data_parallel_dim_name)


def prepare_distribution(config):
    """Bind the active `ModelParallel`'s layout map to `config`; check a foreign one.

    Called at the start of `Gemma2Backbone.__init__`, before any weight is
    made. Under `ModelParallel` with a `Gemma2LayoutMap`, binds it. With any
    other layout map, checks each weight's layout against its shape first
    and raises a `ValueError` naming the weight, instead of JAX's error in
    the middle of the build; a map none of whose keys names a Gemma 2
    weight is refused as a layout map for another model.
    """
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.ModelParallel):
        return
    layout_map = distribution._layout_map
    if isinstance(layout_map, Gemma2LayoutMap):
        layout_map.bind(config)
        return
    shapes = weight_shapes(config)
    mesh = layout_map.device_mesh
    mesh_shape = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    matched = False
    for path, shape in shapes.items():
        layout = layout_map[path]
        if layout is None:
            continue
        matched = True
        axes = tuple(layout.axes)
        problem = None
        if len(axes) != len(shape):
            problem = f"{len(axes)} axes for a rank-{len(shape)} weight"
        else:
            for axis, size in zip(axes, shape, strict=True):
                if axis is not None and size % mesh_shape.get(axis, 1):
                    problem = (
                        f"mesh axis {axis!r} of size {mesh_shape[axis]} does "
                        f"not divide its dimension of size {size}"
                    )
                    break
        if problem is not None:
            raise ValueError(
                f"The active layout map does not fit `Gemma2Backbone` weight "
                f"{path!r} of shape {shape}: its layout {axes} has {problem}. "
                "Use `Gemma2Backbone.get_layout_map(device_mesh)`, which "
                "fits every mesh and head count."
            )
    if not matched and len(layout_map):
        raise ValueError(
            "The active `ModelParallel` layout map names none of "
            "`Gemma2Backbone`'s weights (its keys: "
            f"{sorted(layout_map)[:4]}...): it is a layout map for another "
            "model. Use `Gemma2Backbone.get_layout_map(device_mesh)`."
        )

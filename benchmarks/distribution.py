"""Weight bytes per device under `Gemma2Backbone.get_layout_map`, per mesh of 8.

Usage: `python benchmarks/distribution.py [--dtype bfloat16]` (jax; sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` itself when the
variable is unset).

For the released 2B, 9B and 27B configs, the shipped `gemma2_tiny_python`
config and a 1-key/value-head variant of it, and every (batch, model) mesh
of 8 devices, it asks the layout map for each weight's layout and JAX's
`NamedSharding.shard_shape` for the shape one device holds, without
allocating anything, and prints the largest device's weight bytes as MB and
as a fraction of the model. 1/8 = 0.125 is a fully sharded model; the norm
scales, and any heads the model axis does not divide, stay replicated.
`tests/distribution/test_layout_map.py` checks on real arrays that the
shards are what the layout says.
"""

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def device_bytes(config, mesh_shape, itemsize):
    """(total bytes, bytes on the fullest device) of a backbone's weights."""
    import keras
    import numpy as np

    from keras_gemma2 import Gemma2Backbone
    from keras_gemma2.models.layout_map import weight_shapes

    mesh = keras.distribution.DeviceMesh(
        mesh_shape, ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = Gemma2Backbone.get_layout_map(mesh)
    layout_map.bind(config)
    shapes = weight_shapes(config)
    per_device = {}
    for path, shape in shapes.items():
        sharding = layout_map[path].backend_layout
        for device, index in sharding.devices_indices_map(shape).items():
            size = np.prod(
                [len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)]
            )
            per_device[device.id] = per_device.get(device.id, 0) + size * itemsize
    total = sum(int(np.prod(shape)) for shape in shapes.values()) * itemsize
    return total, max(per_device.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()
    import keras

    from keras_gemma2 import Gemma2CausalLM
    from keras_gemma2.models.presets import get_preset_config

    if keras.config.backend() != "jax":
        raise SystemExit(
            "Keras' distribution API is JAX-only; run with KERAS_BACKEND=jax"
        )
    configs = {
        name: get_preset_config(f"gemma2_{name}_en") for name in ("2b", "9b", "27b")
    }
    tiny = Gemma2CausalLM.from_preset("gemma2_tiny_python").backbone.get_config()
    configs["tiny_python"] = tiny
    configs["tiny_python, 1 kv head"] = {**tiny, "num_key_value_heads": 1}
    itemsize = 2 if args.dtype == "bfloat16" else 4
    print(f"# {args.dtype} weights, 8 devices; (batch, model) mesh")
    print("| model | heads q/kv | mesh | model MB | per-device MB | fraction |")
    print("|---|---|---|---|---|---|")
    for name, config in configs.items():
        heads = f"{config['num_query_heads']}/{config['num_key_value_heads']}"
        for mesh_shape in MESHES:
            total, largest = device_bytes(config, mesh_shape, itemsize)
            print(
                f"| {name} | {heads} | {mesh_shape} | {total / 1e6:,.1f} | "
                f"{largest / 1e6:,.1f} | {largest / total:.3f} |"
            )


if __name__ == "__main__":
    main()

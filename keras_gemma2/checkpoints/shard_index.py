"""Index the tensors of a weights directory: one file, or shards and an index.

Hugging Face checkpoints (`model.safetensors`, or shards named by
`model.safetensors.index.json`) and Keras presets (`model.weights.h5`, or
shards named by `model.weights.json`) share this shape; each format brings
the function that lists one file's tensors and says which index key names a
tensor's shard.
"""

import json
import os


def index_shards(directory, single_file, index_file, list_tensors, shard_key):
    """Return `({tensor name: entry}, weight_map or None)` over every file.

    Every shard the index names must exist and hold exactly the tensors the
    index maps to it; no tensor may be stored twice.

    Args:
        directory: string. The weights directory.
        single_file: string. File name of unsharded weights.
        index_file: string. File name of the shard index, a JSON object whose
            `"weight_map"` maps keys to shard file names.
        list_tensors: callable `list_tensors(path) -> {name: entry}` listing
            one file's tensors.
        shard_key: callable `shard_key(name) -> key`, the index key that
            names a tensor's shard.

    Raises:
        FileNotFoundError: no weights file, or a shard named in the index is
            missing.
        ValueError: the index is malformed, or a tensor is not in the shard
            the index names, or is stored twice.
    """
    index_path = os.path.join(directory, index_file)
    single_path = os.path.join(directory, single_file)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as file:
                weight_map = json.load(file)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index_path} is not a valid index: {error!r}") from None
    elif os.path.isfile(single_path):
        weight_map, shards = None, [single_file]
    else:
        raise FileNotFoundError(
            f"No weights in {directory}: expected {single_file}, or {index_file} "
            "with its shards."
        )
    entries = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The weights shard {path} named in {index_path} does not exist."
            )
        for name, entry in list_tensors(path).items():
            if weight_map is not None and weight_map.get(shard_key(name)) != shard:
                raise ValueError(
                    f"Tensor `{name}` is stored in {path} but {index_path} maps it "
                    f"to {weight_map.get(shard_key(name))!r}."
                )
            if name in entries:
                raise ValueError(
                    f"Tensor `{name}` is stored twice: in {entries[name].path} and "
                    f"in {path}."
                )
            entries[name] = entry
    return entries, weight_map

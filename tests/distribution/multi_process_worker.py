"""One process of a multi-process data-parallel `fit` (JAX, CPU collectives).

Started by `tests/distribution/test_multi_process.py`, once per process:

    python tests/distribution/multi_process_worker.py --coordinator=localhost:PORT
        --num-processes=2 --process-id=I --local-devices=2
        --problem=problem.npz --output=result_I.npz

`problem.npz` holds the global batch (`token_ids`, `padding_mask`,
`labels`, `sample_weight`), the backbone config (`config`, JSON), the
number of steps, the learning rate and the initial weights (`weight_0`,
`weight_1`, ... in `model.weights` order). The process joins the cluster
through `keras.distribution.initialize`, builds the model under
`keras.distribution.DataParallel` over every device of every process, and
trains one step per epoch on the global batch, fed in both ways Keras 3.15
accepts in a multi-process run (see `Distribution.distribute_dataset` and
`keras.src.trainers.data_adapters.get_data_adapter`):

- `"arrays"`: `auto_shard_dataset=False`; this process passes only its own
  contiguous share of the rows, and Keras assembles the global batch with
  `jax.make_array_from_process_local_data`.
- `"dataset"`: `auto_shard_dataset=True`; every process passes the same
  `tf.data.Dataset` of global batches, and Keras rebatches it and keeps
  this process's share. The batches need `drop_remainder=True`: KerasHub's
  `fit` maps over the dataset, and TensorFlow cannot see the batch size
  through that map otherwise.

It writes, per mode, the loss of each step, the final weights, and facts
that show the run really spanned the processes. The test runs `train`
itself in mode `"single"` (no distribution) for the reference.
"""

import argparse
import json
import os
import sys

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="host:port")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--local-devices", type=int, required=True)
    parser.add_argument("--problem", required=True, help="input .npz")
    parser.add_argument("--output", required=True, help="result .npz")
    return parser.parse_args(argv)


def configure_jax(local_devices):
    """JAX on CPU with `local_devices` devices and Gloo collectives."""
    os.environ["KERAS_BACKEND"] = "jax"
    # A device count forced through XLA_FLAGS (the test process sets 8)
    # would override `jax_num_cpu_devices`.
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(
        flag for flag in flags if not flag.startswith(_DEVICE_COUNT_FLAG)
    )
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", local_devices)
    # Gloo is jax 0.10's default for CPU; named so that a change shows.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def replicated_value(variable):
    """A replicated variable's value as numpy, from this process's first shard.

    `np.asarray` of an array that spans other processes' devices fails;
    every shard of a replicated one holds the whole value.
    """
    import numpy as np

    return np.asarray(variable.value.addressable_shards[0].data)


def train(mode, problem, process_id=0, num_processes=1):
    """Fit one step per epoch; return `(losses, final weights, facts)`.

    `mode` is `"single"` (no distribution), `"arrays"` or `"dataset"`.
    """
    import keras
    import numpy as np

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM

    rows = problem["token_ids"].shape[0]
    steps = int(problem["steps"])
    if mode == "single":
        distribution = None
    else:
        distribution = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(),
            auto_shard_dataset=(mode == "dataset"),
        )
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        causal_lm = Gemma2CausalLM(Gemma2Backbone(**json.loads(str(problem["config"]))))
        causal_lm.set_weights(
            [problem[f"weight_{i}"] for i in range(len(causal_lm.weights))]
        )
        causal_lm.compile(
            optimizer=keras.optimizers.SGD(
                float(problem["learning_rate"]), momentum=0.9
            ),
            # A sum, not a mean: a global batch with rows missing or doubled
            # changes the loss and the gradients.
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="sum"
            ),
            weighted_metrics=[],
        )
        inputs = {
            "token_ids": problem["token_ids"],
            "padding_mask": problem["padding_mask"],
        }
        labels, weights = problem["labels"], problem["sample_weight"]
        if mode == "dataset":
            import tensorflow as tf

            dataset = tf.data.Dataset.from_tensor_slices(
                (inputs, labels, weights)
            ).batch(rows, drop_remainder=True)
            history = causal_lm.fit(dataset, epochs=steps, verbose=0)
        else:
            share = rows // num_processes
            mine = slice(process_id * share, (process_id + 1) * share)
            history = causal_lm.fit(
                {name: value[mine] for name, value in inputs.items()},
                labels[mine],
                sample_weight=weights[mine],
                batch_size=share,
                epochs=steps,
                shuffle=False,
                verbose=0,
            )
    finally:
        keras.distribution.set_distribution(previous)
    sharding = causal_lm.weights[0].value.sharding
    facts = {
        "variable_devices": len(sharding.device_set),
        "variable_fully_replicated": bool(sharding.is_fully_replicated),
    }
    return (
        np.asarray(history.history["loss"], "float64"),
        [replicated_value(v) for v in causal_lm.weights],
        facts,
    )


def main(argv=None):
    args = parse_arguments(argv)
    configure_jax(args.local_devices)
    import jax
    import keras
    import numpy as np

    keras.distribution.initialize(
        job_addresses=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    problem = dict(np.load(args.problem))
    results = {}
    facts = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "device_ids_by_process": [
            [device.id for device in jax.devices() if device.process_index == index]
            for index in range(jax.process_count())
        ],
    }
    for mode in ("arrays", "dataset"):
        losses, weights, facts[mode] = train(
            mode, problem, args.process_id, args.num_processes
        )
        results[f"{mode}_losses"] = losses
        for index, value in enumerate(weights):
            results[f"{mode}_weight_{index}"] = value
    results["facts"] = np.array(json.dumps(facts))
    temporary = args.output + ".partial"
    with open(temporary, "wb") as file:
        np.savez(file, **results)
    os.replace(temporary, args.output)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two JAX processes train data-parallel together and equal one process.

Two subprocesses (`multi_process_worker.py`) with 2 CPU devices each join
one cluster through `keras.distribution.initialize` (jax.distributed with
Gloo CPU collectives, a coordinator on a free local port) and train a tiny
`Gemma2CausalLM` for three SGD steps under `keras.distribution.DataParallel`
over all 4 devices, the global batch fed both ways Keras accepts across
processes: each process its own half of the rows as arrays
(`auto_shard_dataset=False`), and every process the same `tf.data`
dataset, sharded by Keras (`auto_shard_dataset=True`). This test process
trains the same model on the whole batch on one device, with no
distribution. Losses of every step and final weights must agree to float32
rounding. The loss is a sum over tokens, so a global batch with a process's
rows missing or counted twice would not match; and in the array mode no
process ever holds the other half of the data, so agreement means the
gradients crossed processes.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from tests.conftest import TINY_BACKBONE_CONFIG, random_token_ids, randomize_weights
from tests.distribution import multi_process_worker

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="Keras 3.15 implements keras.distribution (and so "
    "keras.distribution.initialize) for JAX only; the one-process reference "
    "runs in this test process",
)

PROCESSES, LOCAL_DEVICES = 2, 2
ROWS, LENGTH, STEPS = 8, 12, 3
MODES = ("arrays", "dataset")
# Two layers (one sliding-window, one global) keep the compiles short.
CONFIG = {**TINY_BACKBONE_CONFIG, "num_layers": 2}
WORKER_TIMEOUT_SECONDS = 300
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _problem():
    """The shared inputs: global batch, config, steps and initial weights."""
    keras.utils.set_random_seed(0)
    causal_lm = Gemma2CausalLM(Gemma2Backbone(**CONFIG))
    randomize_weights(causal_lm, seed=2)
    vocabulary = CONFIG["vocabulary_size"]
    padding_mask = np.ones((ROWS, LENGTH), "int32")
    padding_mask[1, 7:] = 0
    padding_mask[6, 3:] = 0
    sample_weight = padding_mask.astype("float32")
    sample_weight[::3, :4] = 0.0
    problem = {
        "token_ids": random_token_ids(ROWS, LENGTH, vocabulary, seed=6),
        "padding_mask": padding_mask,
        "labels": random_token_ids(ROWS, LENGTH, vocabulary, seed=7),
        "sample_weight": sample_weight,
        "config": np.array(json.dumps(causal_lm.backbone.get_config())),
        "steps": np.array(STEPS),
        # Summed over ~80 tokens: a small rate keeps the steps stable.
        "learning_rate": np.array(0.002),
    }
    for index, weight in enumerate(causal_lm.get_weights()):
        problem[f"weight_{index}"] = weight
    return problem


def _free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _tail(path, characters=4000):
    with open(path, errors="replace") as file:
        return file.read()[-characters:]


def _run_workers(directory, problem_path):
    """Start the worker processes, wait for all; return their result files."""
    environment = dict(os.environ)
    environment["KERAS_BACKEND"] = "jax"
    environment["PYTHONPATH"] = os.pathsep.join(
        [REPOSITORY] + [p for p in [environment.get("PYTHONPATH")] if p]
    )
    coordinator = f"localhost:{_free_port()}"
    workers = []
    for process_id in range(PROCESSES):
        log = directory / f"worker_{process_id}.log"
        output = directory / f"result_{process_id}.npz"
        command = [
            sys.executable,
            multi_process_worker.__file__,
            f"--coordinator={coordinator}",
            f"--num-processes={PROCESSES}",
            f"--process-id={process_id}",
            f"--local-devices={LOCAL_DEVICES}",
            f"--problem={problem_path}",
            f"--output={output}",
        ]
        with open(log, "w") as file:
            process = subprocess.Popen(
                command, stdout=file, stderr=subprocess.STDOUT, env=environment
            )
        workers.append((process, log, output))

    deadline = time.monotonic() + WORKER_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        codes = [process.poll() for process, _, _ in workers]
        if all(code is not None for code in codes):
            break
        # One worker failed: the other would wait for it until the deadline.
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    for process, _, _ in workers:
        if process.poll() is None:
            process.kill()
        process.wait()

    failed = [w for w in workers if w[0].returncode != 0 or not w[2].exists()]
    if failed:
        report = "\n".join(
            f"--- worker {index}: exit code {process.returncode} "
            f"(timeout {WORKER_TIMEOUT_SECONDS} s) ---\n{_tail(log)}"
            for index, (process, log, _) in enumerate(workers)
        )
        pytest.fail(f"A worker process failed:\n{report}", pytrace=False)
    return [dict(np.load(output)) for _, _, output in workers]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both workers' results and the one-process reference."""
    directory = tmp_path_factory.mktemp("multi_process")
    problem = _problem()
    problem_path = directory / "problem.npz"
    np.savez(problem_path, **problem)
    workers = _run_workers(directory, problem_path)
    reference_losses, reference_weights, _ = multi_process_worker.train(
        "single", problem
    )
    return {
        "workers": workers,
        "facts": [json.loads(str(w["facts"])) for w in workers],
        "reference": (reference_losses, reference_weights),
        "initial_weights": [
            problem[f"weight_{i}"] for i in range(len(reference_weights))
        ],
    }


def test_the_processes_form_one_cluster_of_all_devices(results):
    facts = results["facts"]
    devices = PROCESSES * LOCAL_DEVICES
    assert [f["process_index"] for f in facts] == list(range(PROCESSES))
    for fact in facts:
        assert fact["process_count"] == PROCESSES
        assert fact["global_devices"] == devices
        assert fact["local_devices"] == LOCAL_DEVICES
        owned = fact["device_ids_by_process"]
        assert [len(ids) for ids in owned] == [LOCAL_DEVICES] * PROCESSES
        assert len({i for ids in owned for i in ids}) == devices
        for mode in MODES:
            # Replicated over the devices of both processes.
            assert fact[mode]["variable_devices"] == devices, mode
            assert fact[mode]["variable_fully_replicated"], mode


@pytest.mark.parametrize("mode", MODES)
def test_losses_of_every_step_equal_one_process(results, mode):
    reference, _ = results["reference"]
    assert len(reference) == STEPS
    assert abs(reference[-1] - reference[0]) > 0.05 * abs(reference[0]), reference
    for index, worker in enumerate(results["workers"]):
        np.testing.assert_allclose(
            worker[f"{mode}_losses"],
            reference,
            rtol=1e-5,
            atol=0,
            err_msg=f"worker {index}",
        )


@pytest.mark.parametrize("mode", MODES)
def test_final_weights_equal_one_process(results, mode):
    _, reference = results["reference"]
    moved = [
        np.abs(after - before).max()
        for after, before in zip(reference, results["initial_weights"], strict=True)
    ]
    assert min(moved) > 1e-4, "some weight did not train"
    for index, worker in enumerate(results["workers"]):
        for weight, expected in enumerate(reference):
            np.testing.assert_allclose(
                worker[f"{mode}_weight_{weight}"],
                expected,
                rtol=0,
                atol=1e-5,
                err_msg=f"worker {index}, weight {weight}",
            )

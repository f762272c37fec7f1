"""fit_resumable: a SIGKILLed run resumes exactly; damaged checkpoints never load.

The kill test runs `tests/training/resumable_run.py` (a LoRA `Gemma2CausalLM`
with dropout, on text rows through its preprocessor) three times: A straight
through; B killed with SIGKILL while writing checkpoint 4, after step 4; C, the
same command as B, resuming. 6 rows, batch 2, 2 epochs: 6 steps, a checkpoint
every 2, so B leaves checkpoint 2 (epoch 0 after batch 1 of 3: mid-epoch) and
a half-written checkpoint 4; C must redo steps 3 and 4 (lost) and nothing else.

Tolerance: none. A and C run the same computations in the same order on CPU
(no nondeterministic kernels), and the checkpoint stores float32 weights,
Adam moments and RNG states bit for bit, so the SHA-256 of the trainable
weights after every step and the final weights must be identical.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest

from keras_gemma2.training.resumable_fit import fit_resumable, latest_checkpoint

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
PROCESS_TIMEOUT = 300


def start_run(tmp_path, directory, name, *extra):
    """Start `resumable_run` in a subprocess; its output goes to files."""
    command = [
        sys.executable,
        "-m",
        "tests.training.resumable_run",
        str(tmp_path / directory),
        str(tmp_path / f"{name}.jsonl"),
        str(tmp_path / f"{name}.npz"),
        *extra,
    ]
    environment = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # The restart reuses the first runs' XLA executables (jax): ~10 s less.
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    stdout = open(tmp_path / f"{name}.out", "w")
    stderr = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(
        command, cwd=REPOSITORY, env=environment, stdout=stdout, stderr=stderr
    )


def finish(process, tmp_path, name):
    """Wait for `process`; return its stdout's last line as JSON."""
    returncode = process.wait(timeout=PROCESS_TIMEOUT)
    error = (tmp_path / f"{name}.err").read_text()
    assert returncode == 0, f"run {name} failed:\n{error[-3000:]}"
    return json.loads((tmp_path / f"{name}.out").read_text().splitlines()[-1])


def read_log(tmp_path, name):
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_sigkill_while_saving_then_restart_equals_uninterrupted_run(tmp_path):
    uninterrupted = start_run(tmp_path, "a", "a")
    killed = start_run(tmp_path, "b", "b", "--stall-while-saving", "4")
    marker = tmp_path / "b.jsonl.stalled"
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not marker.exists():
        assert killed.poll() is None, (tmp_path / "b.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "run b never reached checkpoint 4"
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL

    # Killed mid-write: checkpoint 4 exists only as a staging directory.
    names = sorted(os.listdir(tmp_path / "b"))
    assert names[-1] == "step-00000002", names
    (staging,) = glob.glob(str(tmp_path / "b" / ".step-00000004.partial-*"))
    assert os.listdir(staging) == ["variables.npz"]

    resumed = finish(start_run(tmp_path, "b", "c"), tmp_path, "c")
    assert resumed["resumed_from_step"] == 2
    assert resumed["steps"] == 6
    assert "unfinished checkpoint write" in (tmp_path / "c.err").read_text()
    assert not glob.glob(str(tmp_path / "b" / ".step-*"))  # leftover removed
    finish(uninterrupted, tmp_path, "a")

    reference, before_kill, after_restart = (
        read_log(tmp_path, name) for name in ("a", "b", "c")
    )
    assert [line["step"] for line in reference] == [1, 2, 3, 4, 5, 6]
    # B got past its last checkpoint: steps 3 and 4 were done, then lost.
    assert [line["step"] for line in before_kill] == [1, 2, 3, 4]
    assert [line["step"] for line in after_restart] == [3, 4, 5, 6]
    # Each step's trainable weights equal the uninterrupted run's, bit for bit.
    assert before_kill[:2] + after_restart == reference
    # Step 3 after the restart redoes step 3 before the kill exactly.
    assert after_restart[:2] == before_kill[2:]

    with np.load(tmp_path / "a.npz") as expected, np.load(tmp_path / "c.npz") as got:
        assert len(expected.files) == len(got.files) > 0
        for name in expected.files:
            np.testing.assert_array_equal(got[name], expected[name])


# === In-process: a small Keras model (the file logic does not care) ===

ROWS = 6  # batch 2: 3 steps an epoch
X = np.linspace(-1.0, 1.0, ROWS * 3, dtype="float32").reshape(ROWS, 3)
Y = np.sin(X.sum(axis=1, keepdims=True))


def make_model(dropout=0.25):
    """Seeded dense model; with dropout, RNG state matters to the result."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


class CountSteps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def assert_same_weights(model, expected):
    got = model.get_weights()
    assert len(got) == len(expected)
    for value, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(value, reference)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`(directory, final weights)` of 2 epochs, batch 2, seed 5, all 6 kept."""
    directory = tmp_path_factory.mktemp("resumable") / "run"
    model = make_model()
    fit_resumable(
        model, (X, Y), directory, 2, 2, seed=5, every_n_steps=1, keep=6, verbose=0
    )
    return directory, model.get_weights()


def test_batches_follow_seeded_permutation_per_epoch(tmp_path):
    # Reference: plain `fit` on the rows in the documented order of each epoch.
    # No dropout: on torch `fit_resumable` keeps the data loaders' draws off
    # the dropout generator, and plain `fit` does not.
    reference = make_model(dropout=0.0)
    for epoch in range(2):
        order = np.random.default_rng([5, epoch]).permutation(ROWS)
        reference.fit(X[order], Y[order], batch_size=2, shuffle=False, verbose=0)
    model = make_model(dropout=0.0)
    run = fit_resumable(model, (X, Y), tmp_path, 2, 2, seed=5, verbose=0)
    assert (run["steps"], run["steps_per_epoch"]) == (6, 3)
    assert_same_weights(model, reference.get_weights())


def test_one_checkpoint_per_step_position_and_completion(finished_run):
    directory, _ = finished_run
    names = [f"step-{step:08d}" for step in range(1, 7)]
    assert sorted(os.listdir(directory)) == names
    for step in range(1, 7):
        state = json.loads((directory / names[step - 1] / "state.json").read_text())
        assert (state["step"], state["epoch"], state["batch"]) == (
            step,
            step // 3,
            step % 3,
        )
        assert state["complete"] is (step == 6)


def damage(checkpoint, how):
    weights_file = checkpoint / "variables.npz"
    state_file = checkpoint / "state.json"
    if how == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[:-100])
    elif how == "one weights byte changed":
        data = bytearray(weights_file.read_bytes())
        data[len(data) // 2] ^= 1
        weights_file.write_bytes(bytes(data))
    elif how == "truncated state":
        state_file.write_text(state_file.read_text()[:50])
    else:
        state_file.unlink()


def test_damaged_checkpoints_are_skipped_with_a_warning(finished_run, tmp_path):
    source, expected = finished_run
    directory = tmp_path / "run"
    shutil.copytree(source, directory)
    damages = {
        6: "no state",
        5: "truncated state",
        4: "one weights byte changed",
        3: "truncated weights",
    }
    for step, how in damages.items():
        damage(directory / f"step-{step:08d}", how)
    # A write killed before its rename.
    os.makedirs(directory / ".step-00000007.partial-x1y2")

    with pytest.warns(UserWarning) as caught:
        path, state = latest_checkpoint(directory)
    assert os.path.basename(path) == "step-00000002"
    assert (state["step"], state["epoch"], state["batch"]) == (2, 0, 2)
    messages = [str(warning.message) for warning in caught]
    assert "unfinished checkpoint write" in messages[0]
    problems = [message.split(": ", 1)[1] for message in messages[1:]]
    assert problems[0] == "no state.json"
    assert problems[1].startswith("unreadable state.json (Unterminated string")
    assert (
        problems[2:]
        == ["variables.npz does not match its recorded size and SHA-256"] * 2
    )
    assert [m.split(": ", 1)[0].split("/")[-1] for m in messages[1:]] == [
        f"step-{step:08d}" for step in (6, 5, 4, 3)
    ]

    model, counter = make_model(), CountSteps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = fit_resumable(
            model,
            (X, Y),
            directory,
            2,
            2,
            seed=5,
            every_n_steps=1,
            keep=2,
            callbacks=[counter],
            verbose=0,
        )
    assert run["resumed_from_step"] == 2 and counter.steps == 4
    assert_same_weights(model, expected)
    assert sorted(os.listdir(directory)) == ["step-00000005", "step-00000006"]
    assert latest_checkpoint(directory)[1]["complete"] is True


def test_finished_run_is_not_trained_again(finished_run, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(finished_run[0], directory)
    model, counter = make_model(), CountSteps()
    run = fit_resumable(model, (X, Y), directory, 2, 2, seed=5, callbacks=[counter])
    assert (run["resumed_from_step"], run["steps"], counter.steps) == (6, 6, 0)
    assert_same_weights(model, finished_run[1])  # loaded, not trained
    # More epochs later: the run goes on from where it ended.
    run = fit_resumable(
        model, (X, Y), directory, 3, 2, seed=5, callbacks=[counter], verbose=0
    )
    assert (run["resumed_from_step"], run["steps"], counter.steps) == (6, 9, 3)


@pytest.fixture(scope="module")
def untrained_model():
    return make_model()


@pytest.mark.parametrize(
    "change, named",
    [
        ({"batch_size": 3}, "batch_size=2"),
        ({"seed": 1}, "seed=5"),
        ({"shuffle": False}, "shuffle=True"),
        ({"data": (X[:-1], Y[:-1])}, "num_rows=6"),
        ({"data": (X, Y + 1)}, "data_sha256"),
    ],
)
def test_checkpoint_of_another_run_is_refused(
    finished_run, untrained_model, change, named
):
    directory = finished_run[0]
    before = sorted(os.listdir(directory))
    arguments = {"data": (X, Y), "batch_size": 2, "seed": 5, **change}
    data = arguments.pop("data")
    with pytest.raises(ValueError, match=named):
        fit_resumable(untrained_model, data, directory, epochs=2, **arguments)
    assert sorted(os.listdir(directory)) == before


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"epochs": 0}, ValueError, "`epochs`.*Received: epochs=0"),
        ({"batch_size": 1.5}, ValueError, "`batch_size`.*Received: batch_size=1.5"),
        ({"every_n_steps": -1}, ValueError, "Received: every_n_steps=-1"),
        ({"keep": 0}, ValueError, "Received: keep=0"),
        ({"seed": -2}, ValueError, "Received: seed=-2"),
        ({"data": "one string"}, TypeError, "`data`.*not one string"),
        ({"data": (X, Y, Y, Y)}, ValueError, "`data`.*a tuple of 4 elements"),
        ({"data": (X, Y[:3])}, ValueError, r"`data`.*row counts: \[3, 6\]"),
    ],
)
def test_invalid_arguments_are_named(
    tmp_path, untrained_model, arguments, error, message
):
    call = {"data": (X, Y), "epochs": 1, "batch_size": 2, **arguments}
    with pytest.raises(error, match=message):
        fit_resumable(untrained_model, directory=tmp_path / "run", **call)
    assert not os.path.exists(tmp_path / "run")


def test_uncompiled_model_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="uncompiled `causal_lm`"):
        fit_resumable(model, (X, Y), tmp_path, 1, 2)


class StopAtStep(keras.callbacks.Callback):
    """Interrupts `fit` once the optimizer has done `step` steps."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        done = keras.ops.convert_to_numpy(self.model.optimizer.iterations)
        if int(done) == self.step:
            raise KeyboardInterrupt


def make_int8_lora_bfloat16_model():
    """QLoRA-style int8 layer with a rank-2 adapter, then a bfloat16 layer."""
    keras.utils.set_random_seed(2)
    quantized = keras.layers.Dense(8, activation="tanh")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            quantized,
            keras.layers.Dropout(0.25),
            keras.layers.Dense(1, dtype="bfloat16"),
        ]
    )
    quantized.quantize("int8")
    quantized.enable_lora(2)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def test_int8_lora_and_bfloat16_variables_resume_exactly(tmp_path):
    uninterrupted = make_int8_lora_bfloat16_model()
    fit_resumable(uninterrupted, (X, Y), tmp_path / "a", 2, 2, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        fit_resumable(
            make_int8_lora_bfloat16_model(),
            (X, Y),
            tmp_path / "b",
            2,
            2,
            every_n_steps=1,
            callbacks=[StopAtStep(5)],
            verbose=0,
        )
    path, state = latest_checkpoint(tmp_path / "b")
    assert (state["step"], state["epoch"], state["batch"]) == (4, 1, 1)
    dtypes = {entry["dtype"] for entry in state["variables"]}
    assert {"int8", "bfloat16", "float32"} <= dtypes
    model, counter = make_int8_lora_bfloat16_model(), CountSteps()
    run = fit_resumable(model, (X, Y), tmp_path / "b", 2, 2, callbacks=[counter])
    assert (run["resumed_from_step"], counter.steps) == (4, 2)
    # LoRA adapters trained (not reloaded as zeros), base kernel still int8.
    assert np.abs(model.layers[0].lora_kernel_b.numpy()).max() > 0
    assert_same_weights(model, uninterrupted.get_weights())

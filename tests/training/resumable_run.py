"""One `fit_resumable` run for test_resumable_fit: LoRA, dropout, text rows.

Run as `python -m tests.training.resumable_run DIRECTORY LOG WEIGHTS
[--stall-while-saving STEP]`. Each optimizer step appends a JSON line
`{"step", "trainable_sha256"}` to LOG (step read from the optimizer's iteration
counter, the SHA-256 over the trainable weights' bytes after the step); at the
end the model's weights go to WEIGHTS (`.npz`). With `--stall-while-saving`,
the write of checkpoint STEP stops after its variables file is written and
before the checkpoint is complete: the run creates `LOG.stalled` and sleeps,
waiting for the test's SIGKILL.
"""

import argparse
import hashlib
import json
import os
import time

import keras
import numpy as np

from keras_gemma2.models.backbone import Gemma2Backbone
from keras_gemma2.models.causal_lm import Gemma2CausalLM
from keras_gemma2.models.preprocessor import Gemma2CausalLMPreprocessor
from keras_gemma2.training import resumable_fit
from tests.conftest import TINY_BACKBONE_CONFIG

EPOCHS = 2
BATCH_SIZE = 2
EVERY_N_STEPS = 2
ROWS = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "import os\nprint(os.getcwd())",
    "class Point:\n    pass",
    "x = [n * n for n in range(5)]",
    "print(sorted({3, 1, 2}))",
]


def build_causal_lm():
    """The same model every time: seeded weights, dropout on, LoRA rank 4."""
    keras.utils.set_random_seed(7)
    preprocessor = Gemma2CausalLMPreprocessor.from_preset(
        "gemma2_tiny_python", sequence_length=16, truncate="right"
    )
    backbone = Gemma2Backbone(
        **{
            **TINY_BACKBONE_CONFIG,
            "vocabulary_size": preprocessor.tokenizer.vocabulary_size(),
            "num_layers": 1,  # one compile of the train step costs ~5 s per layer
            "dropout": 0.25,
        }
    )
    causal_lm = Gemma2CausalLM(backbone=backbone, preprocessor=preprocessor)
    backbone.enable_lora(4)
    causal_lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=0.05))
    return causal_lm


class StepLog(keras.callbacks.Callback):
    """Appends `{"step", "trainable_sha256"}` to a JSON lines file each step."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # syncs the jax state
        sha256 = hashlib.sha256()
        for variable in model.trainable_variables:
            sha256.update(keras.ops.convert_to_numpy(variable).tobytes())
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        with open(self.path, "a") as file:
            file.write(
                json.dumps({"step": step, "trainable_sha256": sha256.hexdigest()})
            )
            file.write("\n")


def stall_while_saving(step, marker):
    """Make the write of checkpoint `step` hang between its two files.

    `fit_resumable` writes `variables.npz`, then `state.json`, in a staging
    directory it renames when both are there; the hang comes before
    `state.json`.
    """
    write_json = resumable_fit.atomic_write_json

    def stall_then_write(path, value):
        if value["step"] == step:
            open(marker, "w").close()
            time.sleep(600)
        write_json(path, value)

    resumable_fit.atomic_write_json = stall_then_write


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("log")
    parser.add_argument("weights")
    parser.add_argument("--stall-while-saving", type=int, default=None)
    args = parser.parse_args()
    causal_lm = build_causal_lm()
    if args.stall_while_saving is not None:
        stall_while_saving(args.stall_while_saving, args.log + ".stalled")
    run = resumable_fit.fit_resumable(
        causal_lm,
        ROWS,
        args.directory,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        seed=3,
        every_n_steps=EVERY_N_STEPS,
        callbacks=[StepLog(args.log)],
        verbose=0,
    )
    weights = [keras.ops.convert_to_numpy(v) for v in causal_lm.weights]
    np.savez(args.weights, *weights)
    print(json.dumps(run))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()

"""A write killed with SIGKILL leaves its destination absent or complete.

Each case forks the test process; the child runs a real write
(`save_to_preset`, `export_to_transformers` or `keras-gemma2 convert`) and
sends itself SIGKILL at a named point, armed by patching, in the child only,
the function that reaches that point (no hook in the package). The parent
checks that the child died of SIGKILL, that the destination is absent or
loads with the weights of one whole model (the old or the new one), that
what the kill left beside it has hidden names, and that the next write to
the same destination completes and removes it.

Kill points:

- `staging-created`: the staging directory exists, still empty;
- `weights-half-written`: `save_to_preset` has written 5 datasets of the h5
  weights file, which is still open;
- `first-shard-written`: `export_to_transformers` has written the first of
  several safetensors shards;
- `staged`: every file is written; the rename into place is next;
- `old-retired`: overwriting, the old destination was moved aside and the
  new one not yet renamed in (the destination is absent);
- `installed`: the new destination is in place; the old one, moved aside,
  is not yet removed.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import h5py
import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.checkpoints import hf_export
from keras_gemma2.cli import main as cli_main

NAME = "written"


@pytest.fixture(scope="module")
def models():
    """`(old, new)`: the tiny preset, and a copy with other weights."""
    old = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    new = Gemma2CausalLM.from_preset("gemma2_tiny_python")
    for variable in new.backbone.weights:
        variable.assign(variable * 0.5 + 0.25)
    return old, new


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after(module, name, calls, when=lambda *args, **kwargs: True):
    """Patch `module.name` to SIGKILL once `calls` matching calls returned."""
    original = getattr(module, name)
    count = [0]

    def patched(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            count[0] += 1
            if count[0] >= calls:
                _kill()
        return result

    setattr(module, name, patched)


def _kill_before(module, name, when):
    original = getattr(module, name)

    def patched(*args, **kwargs):
        if when(*args, **kwargs):
            _kill()
        return original(*args, **kwargs)

    setattr(module, name, patched)


def _is_staging(path, *args, **kwargs):
    return os.path.basename(os.fspath(path)).startswith(f".{NAME}.partial-")


def _is_retired(path, *args, **kwargs):
    return os.path.basename(os.fspath(path)).startswith(f".{NAME}.old-")


def _arm(point):
    """Install, in the child, the patch that kills it at `point`."""
    if point == "staging-created":
        _kill_after(
            tempfile,
            "mkdtemp",
            1,
            lambda *a, prefix="", **k: prefix.startswith(f".{NAME}.partial-"),
        )
    elif point == "weights-half-written":
        _kill_after(h5py.Group, "create_dataset", 5)
    elif point == "first-shard-written":
        _kill_after(hf_export, "save_file", 1)
    elif point == "staged":
        # Before the first rename: when overwriting, that of the old
        # destination into `.<name>.old-*/<name>`.
        _kill_before(
            os,
            "replace",
            lambda src, dst: _is_staging(src) or _is_retired(os.path.dirname(dst)),
        )
    elif point == "old-retired":
        # The old destination is renamed aside first, then the staging
        # directory into place: kill between the two.
        _kill_before(os, "replace", lambda src, dst: _is_staging(src))
    elif point == "installed":
        _kill_before(shutil, "rmtree", lambda path, **k: _is_retired(path))
    else:
        raise ValueError(f"Unknown kill point {point!r}")


def _run_killed(write, point):
    """Fork; the child arms `point` and writes; return how it ended."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # JAX warns on fork
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            _arm(point)
            write()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def _weights(backbone):
    return [keras.ops.convert_to_numpy(v).astype("float32") for v in backbone.weights]


def _same(loaded, model):
    expected = _weights(model.backbone)
    actual = _weights(loaded)
    return len(actual) == len(expected) and all(
        np.array_equal(a, b) for a, b in zip(actual, expected, strict=True)
    )


def _check_destination(destination, allowed):
    """Absent, or loadable with exactly the weights of a model in `allowed`."""
    if not os.path.exists(destination):
        with pytest.raises(FileNotFoundError):
            Gemma2Backbone.from_preset(destination)
        return "absent"
    loaded = Gemma2Backbone.from_preset(destination)
    names = [name for name, model in allowed.items() if _same(loaded, model)]
    assert names, f"{destination} holds weights of no whole model"
    return names[0]


def _check_kill(tmp_path, write, point, allowed, overwrite_old=None, killed=None):
    """Kill `write` at `point` (or run `killed`), then check and rewrite."""
    destination = str(tmp_path / NAME)
    if overwrite_old is not None:
        overwrite_old(destination)
    if killed is not None:
        killed(destination)
    else:
        status = _run_killed(lambda: write(destination), point)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the write was not killed at {point!r} (status {status})"
        )
    state = _check_destination(destination, allowed)
    leftovers = sorted(set(os.listdir(tmp_path)) - {NAME})
    assert all(name.startswith(f".{NAME}.") for name in leftovers), leftovers
    # The next write to the same destination completes and cleans up.
    write(destination)
    assert os.listdir(tmp_path) == [NAME]
    assert _check_destination(destination, {"new": allowed["new"]}) == "new"
    return state, leftovers


POINTS = {
    "save_to_preset": ["staging-created", "weights-half-written", "staged"],
    "export_to_transformers": ["staging-created", "first-shard-written", "staged"],
}


def _writer(kind, model):
    if kind == "save_to_preset":
        return lambda path: model.save_to_preset(path, overwrite=True)
    # ~40 KB shards: the tiny model's weights span several files.
    return lambda path: model.export_to_transformers(
        path, max_shard_size=40_000, overwrite=True
    )


@pytest.mark.parametrize(
    "kind, point",
    [(kind, point) for kind, points in POINTS.items() for point in points],
)
def test_killed_new_write_leaves_nothing(models, tmp_path, kind, point):
    _, new = models
    state, leftovers = _check_kill(tmp_path, _writer(kind, new), point, {"new": new})
    assert state == "absent"
    assert leftovers and all(".partial-" in name for name in leftovers)


@pytest.mark.parametrize(
    "kind, point, expected",
    [
        ("save_to_preset", "weights-half-written", "old"),
        ("save_to_preset", "old-retired", "absent"),
        ("save_to_preset", "installed", "new"),
        ("export_to_transformers", "staged", "old"),
        ("export_to_transformers", "old-retired", "absent"),
        ("export_to_transformers", "installed", "new"),
    ],
)
def test_killed_overwrite_keeps_old_or_new(models, tmp_path, kind, point, expected):
    old, new = models
    state, _ = _check_kill(
        tmp_path,
        _writer(kind, new),
        point,
        {"old": old, "new": new},
        overwrite_old=_writer(kind, old),
    )
    assert state == expected


@pytest.mark.parametrize("to, point", [("keras", "weights-half-written")])
def test_killed_convert(models, tmp_path, to, point):
    # A new Python process (~20 s of imports, so one case; the writers it
    # calls are killed at every point above): the conversion loads its
    # source, and computations deadlock in a forked child of a process whose
    # JAX or torch thread pools already run.
    old, _ = models
    source = str(tmp_path / "source")
    old.save_to_preset(source)
    work = tmp_path / "out"
    work.mkdir()
    arguments = ["convert", source, None, "--to", to, "--dtype", "float32"]
    arguments += ["--overwrite"]
    if to == "transformers":  # several shards (Keras refuses a tensor > a shard)
        arguments += ["--max-shard-gb", "0.00004"]

    def killed_convert(path):
        script = (
            "import sys\n"
            "from tests.checkpoints.test_killed_writes import _arm\n"
            "from keras_gemma2.cli import main\n"
            f"_arm({point!r})\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
        command = [sys.executable, "-c", script, *arguments]
        command[command.index(None)] = path
        root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        finished = subprocess.run(command, cwd=root, capture_output=True, timeout=300)
        assert finished.returncode == -signal.SIGKILL, finished.stderr[-2000:]

    def convert(path):
        assert cli_main([path if a is None else a for a in arguments]) == 0

    state, _ = _check_kill(work, convert, None, {"new": old}, killed=killed_convert)
    assert state == "absent"

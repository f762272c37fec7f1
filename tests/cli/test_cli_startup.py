"""`keras-gemma2` start-up, each case in a fresh process as a user starts it.

What is imported (`-X importtime` lists every module a process imports),
what reaches the terminal's stderr, the missing-backend line, and the
compilation cache directory with and without `--no-compile-cache`.
"""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

CLI = [sys.executable, "-m", "keras_gemma2.cli"]
BACKENDS = ("jax", "tensorflow", "torch")
HEAVY = {"keras", "keras_hub", "jax", "tensorflow", "torch"}


def environment(tmp_path, **extra):
    """The test's environment without its backend choice; caches under tmp."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)
    return env


def imported_packages(importtime_stderr):
    """Top-level packages named in `python -X importtime` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["--help"], 0, None),
        (["run", "--help"], 0, None),
        (["run", "p", "x", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
        (["chat", "p", "--temperature", "-1"], 2, "--temperature"),
        (["run", "p"], 2, "prompt"),  # argparse: the prompt is missing
    ],
)
def test_help_and_argument_errors_import_no_backend(argv, code, says, tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *CLI[1:], *argv],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == code, result.stderr[-2000:]
    imported = imported_packages(result.stderr)
    assert "argparse" in imported  # the parse shows up: the listing works
    assert not imported & HEAVY, imported & HEAVY
    if says is not None:
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and says in errors[0], errors


# A CLI process (the package sees `-m keras_gemma2.cli` in `sys.orig_argv`)
# whose `import NAME` finds nothing, as where the package is not installed.
MISSING = """
import sys
sys.orig_argv = [sys.executable, "-m", "keras_gemma2.cli"]
sys.modules[{name!r}] = None
from keras_gemma2.cli import main
code = main(["run", "gemma2_tiny_python", "x", "--backend", {name!r}])
print(code, "keras" in sys.modules)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_backend_is_one_line_naming_the_extra(backend, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", MISSING.format(name=backend)],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"keras-gemma2: error: the {backend} backend is not installed; install "
        f'it with pip install "keras-gemma2[{backend}]"'
    ]


def test_backend_that_fails_to_import_is_one_line(tmp_path):
    # A `torch` package that raises on import shadows the real one.
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("broken torch build")\n')
    result = subprocess.run(
        [*CLI, "run", "gemma2_tiny_python", "x", "--backend", "torch"],
        env=environment(tmp_path, PYTHONPATH=str(shadow.parent)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "keras-gemma2: error: the torch backend failed to import (broken torch "
        'build); install it with pip install "keras-gemma2[torch]"'
    ]


# Native code (TensorFlow, XLA, CUDA probing) writes to file descriptor 2;
# the command's own messages go through `sys.stderr`.
DIVERT = """
import os, sys
sys.orig_argv = [sys.executable, "-m", "keras_gemma2.cli"]
from keras_gemma2 import cli
cli.divert_native_stderr()
os.write(2, b"native log line\\n")
sys.stderr.write("command message\\n")
"""


def test_native_stderr_goes_to_the_log_and_python_stderr_stays(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DIVERT)],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "command message\n"
    log = tmp_path / "cache" / "keras_gemma2" / "backend.log"
    assert log.read_text() == "native log line\n"


def run_tiny(tmp_path, home, *flags):
    return subprocess.run(
        [*CLI, "run", "gemma2_tiny_python", "def f(", "--max-new-tokens", "3"]
        + ["--temperature", "0", "--backend", keras.config.backend(), *flags],
        env=environment(tmp_path / home),
        capture_output=True,
        text=True,
        timeout=600,
    )


def cache_entries(cache):
    """Files in the compilation cache directories (not `backend.log`)."""
    return sorted(
        os.path.relpath(os.path.join(root, name), cache)
        for root, _, names in os.walk(cache)
        for name in names
        if name != "backend.log"
    )


def test_run_is_quiet_and_fills_the_compile_cache_unless_told_not_to(tmp_path):
    backend = keras.config.backend()
    cached = run_tiny(tmp_path, "a")
    uncached = run_tiny(tmp_path, "b", "--no-compile-cache")
    for result in (cached, uncached):
        assert result.returncode == 0, result.stderr[-3000:]
        # Backend logging stays off the terminal: only the command's line.
        assert result.stderr.splitlines() == [
            f"Loading gemma2_tiny_python (Keras backend: {backend})"
        ]
        assert result.stdout.startswith("def f(")
    # The cache changes where programs come from, not what they compute.
    assert cached.stdout == uncached.stdout
    cache = tmp_path / "a" / "cache" / "keras_gemma2"
    assert (cache / "backend.log").exists()
    entries = cache_entries(cache)
    if backend == "jax":
        assert any(entry.startswith("jax/") for entry in entries), entries
    elif backend == "tensorflow":
        assert any(entry.startswith("tensorflow_xla/") for entry in entries), entries
    else:
        # Eager decoding compiles nothing; torch.compile would write here.
        assert all(entry.startswith("torchinductor/") for entry in entries)
    assert cache_entries(tmp_path / "b" / "cache" / "keras_gemma2") == []


REGISTERED = """
import sys
import keras_gemma2
import keras
print(keras.saving.get_registered_object("keras_gemma2>Gemma2CausalLM") is not None)
"""


def test_plain_import_still_registers_the_classes(tmp_path):
    # Outside the command, `import keras_gemma2` alone lets
    # `keras.models.load_model` find the classes, as before.
    result = subprocess.run(
        [sys.executable, "-c", REGISTERED],
        env=environment(tmp_path, KERAS_BACKEND=keras.config.backend()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.split() == ["True"], result.stderr[-2000:]


DYNAMO = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)  # the module alone: no keras_gemma2 package import
with cli._dynamo_deferred(True):
    import keras
print("dynamo imported with keras:", "torch._dynamo" in sys.modules)
import torch
import torch._dynamo
print("real dynamo afterwards:", hasattr(torch._dynamo, "exc"))
double = torch.compile(lambda x: x * 2, backend="eager")
print("torch.compile usable:", double(torch.ones(2)).tolist())
print("keras random:", tuple(keras.random.uniform((2, 3), seed=1).shape))
"""


def test_torch_keras_imports_without_dynamo_and_dynamo_still_loads(tmp_path):
    # `run`/`chat` on torch skip `torch._dynamo` while Keras imports (about
    # 1.2 s); a later `import torch._dynamo` must still give the real one.
    from keras_gemma2 import cli

    result = subprocess.run(
        [sys.executable, "-c", DYNAMO, cli.__file__],
        env=environment(tmp_path, KERAS_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "dynamo imported with keras: False",
        "real dynamo afterwards: True",
        "torch.compile usable: [2.0, 2.0]",
        "keras random: (2, 3)",
    ]


def test_run_on_torch_never_imports_dynamo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "keras_gemma2.cli", "run"]
        + ["gemma2_tiny_python", "def f(", "--max-new-tokens", "3"]
        + ["--temperature", "0", "--backend", "torch", "--verbose"],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def f(")
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "keras.src.backend.torch.image" in modules  # the import happened
    assert "torch._dynamo" not in modules

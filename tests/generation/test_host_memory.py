"""`keep_freed_host_memory`: a JAX program's working memory stays faulted in.

The probe runs, in a fresh process, a JAX program whose intermediate
(`[6144, 6144]` float32, 151 MB) XLA must hold between its two products, and
counts the minor page faults of each later run (`resource.getrusage`). With
the setting, `import keras_gemma2` keeps that memory and a run faults almost
none of its pages in; without it (`KERAS_GEMMA2_KEEP_HOST_MEMORY=0`, the
control), glibc maps the block afresh for every run and every page faults.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import pytest

from keras_gemma2.generation import host_memory

PROBE = textwrap.dedent(
    """
    import resource

    import keras_gemma2  # noqa: F401  (before JAX runs anything)
    import jax
    import jax.numpy as jnp

    x = jnp.ones((6144, 64), jnp.float32)
    program = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum(axis=0))
    program(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        program(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)
INTERMEDIATE_PAGES = 6144 * 6144 * 4 // 4096


def _faults_per_run(setting):
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        host_memory.ENVIRONMENT_VARIABLE: setting,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.strip().splitlines()[-1])


def _maps_large_blocks_afresh():
    """Whether this platform's default faults a fresh mapping in page by page."""
    setting = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge_always = setting.exists() and "[always]" in setting.read_text()
    return host_memory._glibc() is not None and not huge_always


@pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="the setting acts on the JAX backend only; the jax lane runs this",
)
@pytest.mark.skipif(host_memory._glibc() is None, reason="needs Linux with glibc")
def test_jax_programs_reuse_their_working_memory():
    kept = _faults_per_run("1")
    assert kept < 0.05 * INTERMEDIATE_PAGES, (kept, INTERMEDIATE_PAGES)
    control = _faults_per_run("0")
    if _maps_large_blocks_afresh():
        assert control > 0.5 * INTERMEDIATE_PAGES, (control, INTERMEDIATE_PAGES)
    else:
        print(f"MEASURED control faults per run: {control} (THP always)")


@pytest.fixture
def mallopt_calls(monkeypatch):
    """The `(parameter, value)` of every `mallopt` call, glibc stood in for.

    JAX counts as on CPU alone and the switch starts unset; a call returns
    what `refused` (a set of parameters) says: 0 for those, else 1.
    """
    monkeypatch.delenv(host_memory.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    class Calls(list):
        refused = frozenset()

    calls = Calls()

    class Recorder:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 0 if parameter in calls.refused else 1

    monkeypatch.setattr(host_memory, "_glibc", Recorder)
    return calls


def test_only_jax_on_cpu_is_changed(monkeypatch, mallopt_calls):
    calls = mallopt_calls
    assert host_memory.keep_freed_host_memory("tensorflow") is False
    assert host_memory.keep_freed_host_memory("torch") is False
    assert calls == []
    assert host_memory.keep_freed_host_memory("jax") is True
    # One arena, no mappings for large blocks, trim only past 2 GiB.
    assert calls == [(-8, 1), (-4, 0), (-1, 2**31 - 1)]
    calls.clear()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # an accelerator: left alone
    assert host_memory.keep_freed_host_memory("jax") is False
    assert calls == []


def test_turned_off_and_refused_values(monkeypatch, mallopt_calls):
    monkeypatch.setenv(host_memory.ENVIRONMENT_VARIABLE, "0")
    assert host_memory.keep_freed_host_memory("jax") is False
    assert mallopt_calls == []
    monkeypatch.setenv(host_memory.ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ValueError, match="KERAS_GEMMA2_KEEP_HOST_MEMORY.*'yes'"):
        host_memory.keep_freed_host_memory("jax")


def test_a_refused_setting_is_reported(mallopt_calls):
    mallopt_calls.refused = {-4}  # M_MMAP_MAX
    assert host_memory.keep_freed_host_memory("jax") is False

"""Start-up latency of the `keras-gemma2` command line, in fresh processes.

Usage: `python benchmarks/cli_latency.py [--backends jax,tensorflow,torch]
[--repeats 3] [--preset gemma2_tiny_python] [--max-new-tokens 64]`

Each number is one new process of
`keras-gemma2 run PRESET "def fibonacci(n):" --max-new-tokens 64 --backend B`
(`KERAS_BACKEND` unset, as a user types it):

- `--help s`: `keras-gemma2 --help`, whole process (median of `--repeats`);
- `first start`: an empty compilation cache (a new `XDG_CACHE_HOME`): time
  to the first streamed token (the first byte on stdout past the echoed
  prompt) and to the end of the process;
- `second start`: the same cache again (medians of `--repeats`);
- `no cache`: a second start with `--no-compile-cache`, where the CLI has
  the flag (what every start cost before the cache existed);
- `stderr lines`: lines the first start wrote to stderr (backend logging
  shows up here; the CLI's own "Loading ..." line is one).

With KERAS_GEMMA2_TIMINGS=1 the CLI prints its phase timings (backend
import, model load, first token, the rest) on exit; the last second start's
are listed under the table. `--source DIR` runs the package in DIR instead
(an older checkout, for before/after numbers).

Each cell is `wall (cpu)`: wall-clock seconds and the process' user + system
CPU seconds to that point (read from /proc at the first token), which moves
less than wall time when other work shares the CPUs.

Timings on a shared machine drift; compare numbers from one run.
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "def fibonacci(n):"
TIMINGS = "timings: "


SOURCE = None  # --source: another checkout's package directory


def command(*arguments):
    """The console script when installed beside this Python, else `-m`."""
    script = os.path.join(os.path.dirname(sys.executable), "keras-gemma2")
    if os.path.exists(script) and SOURCE is None:
        return [script, *arguments]
    return [sys.executable, "-m", "keras_gemma2.cli", *arguments]


def environment(cache_home):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if SOURCE is not None:
        env["PYTHONPATH"] = SOURCE
    env["XDG_CACHE_HOME"] = cache_home
    env["KERAS_GEMMA2_TIMINGS"] = "1"  # the CLI's phase timings, where it has them
    # Where an older CLI leaves torch.compile's cache: keep it per run too.
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_home, "torchinductor")
    return env


def timed_help(cache_home):
    start = time.perf_counter()
    subprocess.run(
        command("--help"),
        env=environment(cache_home),
        cwd=SOURCE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - start


def cpu_seconds(pid):
    """User + system CPU seconds of process `pid` so far (Linux), else nan."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_run(backend, cache_home, args, extra=()):
    """Seconds to the first token and to exit, wall and CPU; stderr; text."""
    argv = command(
        "run",
        args.preset,
        PROMPT,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--backend",
        backend,
        *extra,
    )
    start = time.perf_counter()
    process = subprocess.Popen(
        argv,
        env=environment(cache_home),
        cwd=SOURCE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    echoed = len(PROMPT.encode())
    received, first, first_cpu = b"", None, float("nan")
    while True:
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        received += chunk
        if first is None and len(received) > echoed:
            first = time.perf_counter() - start
            first_cpu = cpu_seconds(process.pid)
    errors = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - start
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {returncode}:\n{errors}")
    return {
        "token": first,
        "token_cpu": first_cpu,
        "exit": total,
        "exit_cpu": usage.ru_utime + usage.ru_stime,
        "stderr": len([x for x in errors.splitlines() if not x.startswith(TIMINGS)]),
        "phases": [x for x in errors.splitlines() if x.startswith(TIMINGS)],
        "text": received.decode(errors="replace"),
    }


def cell(runs, key):
    """`"wall (cpu)"` medians of `runs[i][key]` and `runs[i][key + "_cpu"]`."""
    wall = statistics.median(run[key] for run in runs)
    cpu = statistics.median(run[f"{key}_cpu"] for run in runs)
    return f"{wall:.2f} ({cpu:.2f})"


def has_cache_flag(cache_home):
    help_text = subprocess.run(
        command("run", "--help"),
        env=environment(cache_home),
        cwd=SOURCE,
        capture_output=True,
        text=True,
    ).stdout
    return "--no-compile-cache" in help_text


def versions():
    import importlib.metadata as metadata

    names = ("keras", "keras-hub", "jax", "tensorflow", "torch")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="gemma2_tiny_python")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--show-text", action="store_true", help="print each backend's completion"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="run the keras_gemma2 package found in this directory instead "
        "(started there, so `python -m` finds it first) "
        "(e.g. an older checkout, for a before/after table)",
    )
    args = parser.parse_args()
    global SOURCE
    SOURCE = args.source
    print(
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), "
        f"Python {platform.python_version()}; {versions()}"
    )
    print(
        f'keras-gemma2 run {args.preset} "{PROMPT}" --max-new-tokens '
        f"{args.max_new_tokens} --backend B; seconds; medians of {args.repeats}"
    )
    scratch = tempfile.mkdtemp(prefix="cli_latency_")
    try:
        help_home = os.path.join(scratch, "help")
        cache_flag = has_cache_flag(help_home)
        help_s = statistics.median(timed_help(help_home) for _ in range(args.repeats))
        rows, breakdown = [], []
        for backend in args.backends.split(","):
            home = os.path.join(scratch, backend)
            first = timed_run(backend, home, args)
            seconds = [timed_run(backend, home, args) for _ in range(args.repeats)]
            uncached = "n/a"
            if cache_flag:
                runs = [
                    timed_run(backend, home, args, ["--no-compile-cache"])
                    for _ in range(args.repeats)
                ]
                uncached = cell(runs, "token")
            rows.append(
                (
                    backend,
                    cell([first], "token"),
                    cell([first], "exit"),
                    cell(seconds, "token"),
                    cell(seconds, "exit"),
                    uncached,
                    str(first["stderr"]),
                )
            )
            if args.show_text:
                print(f"[{backend}] {first['text']!r}")
            for phases in seconds[-1]["phases"]:
                breakdown.append(f"{backend}: {phases.removeprefix(TIMINGS)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n--help: {help_s:.2f} s\n")
    header = (
        "backend",
        "first start: token",
        "first: exit",
        "second start: token",
        "second: exit",
        "no cache: token",
        "stderr lines",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if breakdown:
        print("\nPhases of the last second start (wall s, cpu s), from the CLI:")
        print("\n".join(breakdown))


if __name__ == "__main__":
    main()

"""Atomic writes: build in a temporary sibling, rename into place.

A write killed at any point (SIGKILL, power cut aside) leaves the
destination absent or complete: the writer only fills a hidden sibling
`.<name>.partial-<pid>-<random>`, and an existing destination is moved to
`.<name>.old-<pid>-<random>` just before the new one is renamed in. Such
leftovers are hidden names that no loader looks at; the next write to the
same destination removes those whose process is gone.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

# Staging directories being written now. A nested save into one of them (a
# task saving its backbone and preprocessor) writes in place: the outermost
# save owns the rename.
_ACTIVE_STAGING = set()


def _prepare(destination, overwrite, kind):
    """Refuse an existing `destination` unless `overwrite`; clear dead staging.

    Returns `(parent directory, base name)`; the parent exists afterwards.
    """
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(
            f"The destination {destination} already exists. Pass overwrite=True "
            f"to replace it, or choose another {kind}."
        )
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(destination)
    return parent, os.path.basename(destination)


@contextlib.contextmanager
def atomic_directory(destination, overwrite=False):
    """Yield a temporary directory that replaces `destination` on success.

    The temporary directory is a sibling of `destination` (same file system,
    so the final `os.replace` is atomic). If the body raises, the temporary
    directory is removed and `destination` is left as it was.

    Args:
        destination: path of the directory to produce.
        overwrite: bool. Replace an existing `destination`. If `False`, an
            existing `destination` raises `FileExistsError` before anything
            is written.
    """
    destination = os.path.abspath(os.fspath(destination))
    if destination in _ACTIVE_STAGING:
        yield destination
        return
    parent, name = _prepare(destination, overwrite, "directory")
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent)
    _ACTIVE_STAGING.add(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _ACTIVE_STAGING.discard(staging)
    if os.path.exists(destination):
        retired = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
        os.replace(destination, os.path.join(retired, name))
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, destination)


@contextlib.contextmanager
def atomic_file(destination, overwrite=False):
    """Yield a temporary file path that replaces the file `destination` on success.

    The temporary file `.<name>.partial-<pid>-<random>` is a sibling of
    `destination` (so the final `os.replace` is atomic) and exists, empty,
    when the body starts. If the body raises, it is removed and `destination`
    is left as it was.

    Args:
        destination: path of the file to produce.
        overwrite: bool. Replace an existing `destination`. If `False`, an
            existing `destination` raises `FileExistsError` before anything
            is written.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "model.bin")
    >>> with atomic_file(path) as staging:
    ...     with open(staging, "wb") as file:
    ...         _ = file.write(b"weights")
    >>> open(path, "rb").read()
    b'weights'
    """
    destination = os.path.abspath(os.fspath(destination))
    if os.path.isdir(destination):
        raise IsADirectoryError(
            f"The destination {destination} is a directory; expected a file path."
        )
    parent, name = _prepare(destination, overwrite, "path")
    handle, staging = tempfile.mkstemp(
        prefix=f".{name}.partial-{os.getpid()}-", dir=parent
    )
    os.close(handle)
    _ACTIVE_STAGING.add(staging)
    try:
        yield staging
        os.replace(staging, destination)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
    finally:
        _ACTIVE_STAGING.discard(staging)


def remove_leftovers(destination):
    """Remove what killed writes to `destination` left beside it.

    Staging (`.<name>.partial-<pid>-*`, directories or files) and retired
    (`.<name>.old-<pid>-*`) siblings are removed unless process `<pid>`
    still runs (another writer, or a save of this process in progress).
    Returns the removed paths.

    Args:
        destination: path of the directory the writes were producing.

    Example:

    >>> import os, tempfile
    >>> parent = tempfile.mkdtemp()
    >>> os.mkdir(os.path.join(parent, ".preset.partial-999999999-x1"))
    >>> [os.path.basename(p) for p in remove_leftovers(f"{parent}/preset")]
    ['.preset.partial-999999999-x1']
    """
    destination = os.path.abspath(os.fspath(destination))
    parent, name = os.path.split(destination)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:partial|old)-(\d+)-")
    try:
        siblings = os.listdir(parent)
    except FileNotFoundError:
        return []
    removed = []
    for sibling in sorted(siblings):
        match = pattern.match(sibling)
        path = os.path.join(parent, sibling)
        if match is None or path in _ACTIVE_STAGING:
            continue
        if _process_runs(int(match.group(1))):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)  # a file staged by `atomic_file`
        removed.append(path)
    return removed


def _process_runs(pid):
    """True when process `pid` exists (this process's own saves are tracked)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    except OverflowError:
        return False
    return True


def atomic_write_json(path, value):
    """Write `value` to the file `path` as indented JSON, all or nothing.

    The JSON (indent 2, a final newline) goes to a temporary sibling first,
    which `os.replace` then renames to `path`: a reader sees the old file or
    the whole new one, and a value that is not JSON leaves `path` as it was.

    Args:
        path: path of the file to write.
        value: the JSON-serializable value.

    Example:

    >>> import os, tempfile
    >>> from keras_gemma2.checkpoints.atomic import atomic_write_json
    >>> path = os.path.join(tempfile.mkdtemp(), "metadata.json")
    >>> atomic_write_json(path, {"steps": 5})
    >>> print(open(path).read())
    {
      "steps": 5
    }
    <BLANKLINE>
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.partial")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise

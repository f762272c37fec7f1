"""Atomic writes: build in a temporary sibling, rename into place."""

import contextlib
import json
import os
import shutil
import tempfile

# Staging directories being written now. A nested save into one of them (a
# task saving its backbone and preprocessor) writes in place: the outermost
# save owns the rename.
_ACTIVE_STAGING = set()


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
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(
            f"The destination {destination} already exists. Pass overwrite=True "
            "to replace it, or choose another directory."
        )
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(destination)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    _ACTIVE_STAGING.add(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _ACTIVE_STAGING.discard(staging)
    if os.path.exists(destination):
        retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.replace(destination, os.path.join(retired, name))
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, destination)


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

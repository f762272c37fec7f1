"""List and read the text files of a corpus directory."""

import fnmatch
import os

from keras_gemma2.data.validation import check_texts


def list_text_files(root, suffix, exclude=()):
    """Relative POSIX paths of the files under `root` whose names end in `suffix`.

    The paths are sorted and use `/` on every system, so that they name the
    same documents on every machine, as `held_out_split` needs. A path that
    matches one of the `exclude` patterns (shell-style, as `fnmatch` reads
    them, against the whole relative path) is left out; a directory that
    matches is left out with everything under it. Links to directories are
    not followed.

    Args:
        root: path of the corpus directory.
        suffix: string or tuple of strings. File name endings to keep, e.g.
            `".py"`.
        exclude: sequence of strings. Patterns of relative paths to leave
            out, e.g. `("test", "config-*")`: `"test"` matches `root/test`,
            not `root/a/test`. Defaults to `()`.

    Returns:
        Sorted list of strings.

    Example:

    >>> import os, tempfile
    >>> from keras_gemma2.data import list_text_files
    >>> root = tempfile.mkdtemp()
    >>> for path in ["a.py", "b.txt", "pkg/c.py", "test/d.py", "pkg/test/e.py"]:
    ...     os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    ...     open(os.path.join(root, path), "w").close()
    >>> list_text_files(root, ".py", exclude=["test"])
    ['a.py', 'pkg/c.py', 'pkg/test/e.py']
    """
    check_texts(exclude, "exclude")
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Received an invalid value for `root`, expected a directory. "
            f"Received: root={root!r}"
        )

    def excluded(relative):
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in exclude)

    paths = []
    for directory, subdirectories, names in os.walk(root):
        relative = os.path.relpath(directory, root).replace(os.sep, "/")
        prefix = "" if relative == "." else f"{relative}/"
        subdirectories[:] = [n for n in subdirectories if not excluded(prefix + n)]
        paths += [
            prefix + name
            for name in names
            if name.endswith(suffix) and not excluded(prefix + name)
        ]
    return sorted(paths)


def read_text_files(root, paths):
    """Read files under `root` as UTF-8 text, with bytes that are not UTF-8 replaced.

    A byte sequence that is not valid UTF-8 becomes U+FFFD, so that one odd
    file in a large corpus does not stop the run.

    Args:
        root: path of the corpus directory.
        paths: list of strings. Paths relative to `root`, e.g. from
            `list_text_files`.

    Returns:
        List of strings, in the order of `paths`.

    Example:

    >>> import os, tempfile
    >>> from keras_gemma2.data import read_text_files
    >>> root = tempfile.mkdtemp()
    >>> with open(os.path.join(root, "a.txt"), "wb") as file:
    ...     _ = file.write(b"caf\\xc3\\xa9 \\xff")
    >>> read_text_files(root, ["a.txt"]) == ["caf\\u00e9 \\ufffd"]
    True
    """
    check_texts(paths, "paths")
    texts = []
    for path in paths:
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts

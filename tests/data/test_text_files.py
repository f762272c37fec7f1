"""list_text_files and read_text_files on a literal directory tree."""

import os

import pytest

from keras_gemma2.data import list_text_files, read_text_files

TREE = {
    "os.py": "import sys\n",
    "README.txt": "not code",
    "json/__init__.py": "",
    "json/tool.py": "",
    "test/test_os.py": "",
    "email/test/data.py": "",
    "config-3.11-x86_64/makesetup.py": "",
    "__pycache__/os.cpython-311.pyc": "",
    "notes.py.bak": "",
}


@pytest.fixture
def root(tmp_path):
    for path, text in TREE.items():
        os.makedirs(os.path.dirname(tmp_path / path), exist_ok=True)
        (tmp_path / path).write_text(text)
    return str(tmp_path)


def test_sorted_relative_posix_paths_with_the_suffix(root):
    assert list_text_files(root, ".py") == [
        "config-3.11-x86_64/makesetup.py",
        "email/test/data.py",
        "json/__init__.py",
        "json/tool.py",
        "os.py",
        "test/test_os.py",
    ]
    assert list_text_files(root, (".txt", ".bak")) == ["README.txt", "notes.py.bak"]


def test_patterns_match_the_whole_relative_path(root):
    # "test" is root/test only; "config-*" a glob; a file pattern drops the file.
    assert list_text_files(root, ".py", exclude=["test", "config-*", "os.py"]) == [
        "email/test/data.py",
        "json/__init__.py",
        "json/tool.py",
    ]
    assert list_text_files(root, ".py", exclude=["*/test", "json/t*"]) == [
        "config-3.11-x86_64/makesetup.py",
        "json/__init__.py",
        "os.py",
        "test/test_os.py",
    ]


def test_missing_root_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_text_files(missing, ".py")


def test_one_pattern_string_is_refused(root):
    with pytest.raises(TypeError, match="`exclude`"):
        list_text_files(root, ".py", exclude="test")


def test_read_in_order_with_invalid_utf8_replaced(tmp_path):
    (tmp_path / "a.py").write_bytes(b"caf\xc3\xa9 \xff\xfe end\n")
    (tmp_path / "b.py").write_text("second")
    texts = read_text_files(str(tmp_path), ["b.py", "a.py"])
    assert texts == ["second", "caf\u00e9 \ufffd\ufffd end\n"]


def test_read_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.py"):
        read_text_files(str(tmp_path), ["gone.py"])
    with pytest.raises(TypeError, match="`paths`"):
        read_text_files(str(tmp_path), "a.py")

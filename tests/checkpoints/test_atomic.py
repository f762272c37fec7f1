"""atomic_write_json: the whole file or the old one, never a partial file."""

import os

import pytest

from keras_gemma2.checkpoints.atomic import atomic_write_json


def test_writes_indented_json_and_a_newline(tmp_path):
    path = tmp_path / "metadata.json"
    atomic_write_json(path, {"steps": 5, "curve": [1.5, 2], "name": "tiny"})
    assert path.read_text() == (
        '{\n  "steps": 5,\n  "curve": [\n    1.5,\n    2\n  ],\n  "name": "tiny"\n}\n'
    )
    assert os.listdir(tmp_path) == ["metadata.json"]


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text("old")
    atomic_write_json(str(path), [])
    assert path.read_text() == "[]\n"
    assert os.listdir(tmp_path) == ["metadata.json"]


def test_a_value_that_is_not_json_leaves_the_old_file(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text('{"kept": true}\n')
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"ok": 1, "bad": object()})
    assert path.read_text() == '{"kept": true}\n'
    assert os.listdir(tmp_path) == ["metadata.json"]


def test_a_failed_rename_leaves_no_partial_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "taken", {"a": 1})
    assert os.listdir(tmp_path) == ["taken"]

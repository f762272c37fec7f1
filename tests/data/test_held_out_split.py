"""is_held_out / held_out_split against SHA-256 buckets computed here."""

import hashlib

import pytest

from keras_gemma2.data import held_out_split, is_held_out

NAMES = ["os.py", "re/__init__.py", "enum.py", "json/encoder.py", "doc5.txt"]
# int(sha256(name)) % 10000 of each name, computed with `hashlib` by hand.
BUCKETS = {
    "os.py": 6863,
    "re/__init__.py": 2048,
    "enum.py": 2765,
    "json/encoder.py": 7797,
    "doc5.txt": 2123,
}


def bucket(name):
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 10000


def test_buckets_are_sha256_mod_10000():
    assert {name: bucket(name) for name in NAMES} == BUCKETS


@pytest.mark.parametrize("percent", [0.01, 5.0, 20.48, 20.49, 25, 50.0, 99.99])
def test_held_out_below_percent_times_100(percent):
    for name, value in BUCKETS.items():
        assert is_held_out(name, percent) == (value < percent * 100), (name, percent)


def test_boundary_is_exclusive():
    # re/__init__.py sits in bucket 2048: held out from 20.49 percent on.
    assert not is_held_out("re/__init__.py", 20.48)
    assert is_held_out("re/__init__.py", 20.49)


def test_split_keeps_order_and_partitions():
    train, held_out = held_out_split(NAMES, 30.0)
    assert train == ["os.py", "json/encoder.py"]
    assert held_out == ["re/__init__.py", "enum.py", "doc5.txt"]
    train, held_out = held_out_split(reversed(NAMES), 30.0)
    assert train == ["json/encoder.py", "os.py"]
    assert held_out == ["doc5.txt", "enum.py", "re/__init__.py"]


def test_adding_names_moves_no_old_name():
    names = [f"file_{i}.py" for i in range(200)]
    train, held_out = held_out_split(names, 10.0)
    more_train, more_held_out = held_out_split(names + ["new_a.py", "new_b.py"], 10.0)
    assert more_train[: len(train)] == train
    assert more_held_out[: len(held_out)] == held_out
    # About 10 percent held out (binomial, 200 draws).
    assert 5 <= len(held_out) <= 40


@pytest.mark.parametrize("percent", [0, 100, -5, 150, "5", None, True])
def test_percent_outside_0_100_is_rejected(percent):
    with pytest.raises(ValueError, match="held_out_percent"):
        is_held_out("os.py", percent)
    with pytest.raises(ValueError, match="held_out_percent"):
        held_out_split(["os.py"], percent)

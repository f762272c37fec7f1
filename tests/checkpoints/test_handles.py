"""Remote handles: unknown schemes and offline use fail fast and say what to do."""

import socket

import pytest

from keras_gemma2 import Gemma2CausalLM
from keras_gemma2.checkpoints import handles


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme 's3'"):
        Gemma2CausalLM.from_preset("s3://bucket/gemma-2-2b")


def test_handle_without_a_name():
    with pytest.raises(ValueError, match="names no model"):
        Gemma2CausalLM.from_preset("hf://")


@pytest.mark.parametrize(
    "handle", ["hf://google/gemma-2-2b", "kaggle://keras/gemma2/keras/gemma2_2b_en/1"]
)
def test_offline_switch_fails_fast(handle, monkeypatch):
    monkeypatch.setenv(handles.OFFLINE_VARIABLE, "1")

    def no_connection(*args, **kwargs):
        raise AssertionError("the offline switch must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    with pytest.raises(ConnectionError, match="no network.*local directory"):
        Gemma2CausalLM.from_preset(handle)


def test_unreachable_host_fails_fast(monkeypatch):
    monkeypatch.delenv(handles.OFFLINE_VARIABLE, raising=False)
    hosts = []

    def refuse(address, timeout=None):
        hosts.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ConnectionError, match="huggingface.co is unreachable"):
        Gemma2CausalLM.from_preset("hf://google/gemma-2-2b")
    assert hosts == [("huggingface.co", 443)]


def test_keras_hub_name_offline_points_to_handles(monkeypatch):
    monkeypatch.setenv(handles.OFFLINE_VARIABLE, "1")
    with pytest.raises(ConnectionError, match="gemma2_9b_en/4.*hf://google/gemma-2-9b"):
        Gemma2CausalLM.from_preset("gemma2_9b_en")

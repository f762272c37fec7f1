"""Remote preset handles (`hf://`, `kaggle://`) resolved to local directories."""

import os
import socket

SCHEMES = {
    "hf": "huggingface.co",
    "kaggle": "www.kaggle.com",
}
# Set to "1" to refuse every remote handle without touching the network.
OFFLINE_VARIABLE = "KERAS_GEMMA2_OFFLINE"


def split_handle(preset):
    """Return `(scheme, path)` of `"scheme://path"`, or `(None, preset)`."""
    if "://" not in preset:
        return None, preset
    scheme, path = preset.split("://", 1)
    if scheme not in SCHEMES:
        raise ValueError(
            f"Received a preset handle with an unknown scheme {scheme!r}. Expected "
            f"one of {[s + '://' for s in SCHEMES]} or a local directory. "
            f"Received: preset={preset!r}"
        )
    if not path.strip("/"):
        raise ValueError(f"The handle {preset!r} names no model after '{scheme}://'.")
    return scheme, path


def host_reachable(host, timeout=3.0):
    """True when a TCP connection to `host:443` opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_handle(preset):
    """Download a remote handle and return its local directory.

    `hf://owner/name` goes through `huggingface_hub.snapshot_download`;
    `kaggle://owner/model/framework/variation[/version]` through
    `kagglehub.model_download`. Without network (or with
    `KERAS_GEMMA2_OFFLINE=1`) it fails at once with a `ConnectionError` that
    says how to pass a local directory instead.
    """
    scheme, path = split_handle(preset)
    host = SCHEMES[scheme]
    offline = os.environ.get(OFFLINE_VARIABLE) == "1"
    if offline or not host_reachable(host):
        reason = f"{OFFLINE_VARIABLE}=1 is set" if offline else f"{host} is unreachable"
        raise ConnectionError(
            f"Cannot fetch {preset!r}: there is no network ({reason}). Download the "
            "checkpoint on a machine with network access, copy it here, and pass "
            "its local directory, e.g. Gemma2CausalLM.from_preset('/path/to/dir')."
        )
    if scheme == "hf":
        import huggingface_hub

        return huggingface_hub.snapshot_download(path)
    import kagglehub

    return kagglehub.model_download(path)

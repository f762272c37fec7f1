"""Remote preset handles (`hf://`, `kaggle://`) resolved to local directories."""

import os
import socket

from keras_gemma2.models.presets import KERAS_HUB_PRESETS

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


def resolve_handle(preset, instead=None):
    """Download a remote handle and return its local directory.

    `hf://owner/name` goes through `huggingface_hub.snapshot_download`;
    `kaggle://owner/model/framework/variation[/version]` through
    `kagglehub.model_download` (as KerasHub downloads its presets). Without
    network (or with `KERAS_GEMMA2_OFFLINE=1`) it fails at once with a
    one-line `ConnectionError` that says what to pass instead; a failed
    download (no credentials, no licence consent, a bad name) is reported
    the same way, the cause chained.

    Args:
        preset: string. A `"hf://..."` or `"kaggle://..."` handle.
        instead: optional string. What to pass instead when offline; by
            default, a local directory of the checkpoint.
    """
    scheme, path = split_handle(preset)
    host = SCHEMES[scheme]
    offline = os.environ.get(OFFLINE_VARIABLE) == "1"
    instead = instead or (
        "download the checkpoint on a machine with network access, copy it here "
        "and pass its local directory, e.g. Gemma2CausalLM.from_preset('/path/to/dir')"
    )
    if offline or not host_reachable(host):
        reason = f"{OFFLINE_VARIABLE}=1 is set" if offline else f"{host} is unreachable"
        raise ConnectionError(
            f"Cannot fetch {preset!r}: there is no network ({reason}). Instead, "
            f"{instead}."
        )
    try:
        if scheme == "hf":
            import huggingface_hub

            return huggingface_hub.snapshot_download(path)
        import kagglehub

        return kagglehub.model_download(path)
    except Exception as error:
        # Network, authentication and not-found errors of either client.
        detail = " ".join(str(error).split()) or type(error).__name__
        credentials = (
            "set HF_TOKEN and accept the Gemma licence on huggingface.co"
            if scheme == "hf"
            else "set KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json) "
            "and accept the Gemma licence on kaggle.com"
        )
        raise ConnectionError(
            f"Downloading {preset!r} from {host} failed ({type(error).__name__}: "
            f"{detail}). For gated models {credentials}; or, instead, {instead}."
        ) from error


def resolve_keras_hub_preset(name):
    """Download KerasHub's Gemma 2 preset `name` (e.g. `"gemma2_2b_en"`).

    The name resolves to its Kaggle handle (the one KerasHub's own
    `from_preset` downloads); offline, the `ConnectionError` says what to
    pass instead: a local copy of the preset, or the Hugging Face
    checkpoint of the same weights.

    Args:
        name: string. A key of `keras_gemma2.models.presets.KERAS_HUB_PRESETS`.

    Example:

    >>> import os
    >>> os.environ[OFFLINE_VARIABLE] = "1"
    >>> try:
    ...     resolve_keras_hub_preset("gemma2_2b_en")
    ... except ConnectionError as error:
    ...     print(str(error)[:72])
    Cannot fetch 'kaggle://keras/gemma2/keras/gemma2_2b_en/2': there is no n
    >>> del os.environ[OFFLINE_VARIABLE]
    """
    if name not in KERAS_HUB_PRESETS:
        raise ValueError(
            "Received an unknown KerasHub Gemma 2 preset name. Expected one of "
            f"{sorted(KERAS_HUB_PRESETS)}. Received: name={name!r}"
        )
    handle, hf_repository = KERAS_HUB_PRESETS[name]
    _, path = split_handle(handle)
    instead = (
        f"pass a local directory: KerasHub's {name!r} preset, fetched elsewhere "
        f"with kagglehub.model_download({path!r}) and copied here"
    )
    if hf_repository:
        instead += (
            f", or the Hugging Face checkpoint {hf_repository} (a local copy, or "
            f"'hf://{hf_repository}' where huggingface.co is reachable)"
        )
    return resolve_handle(handle, instead=instead)

"""Access to the Hugging Face hub, decided once per process before any library reads its settings.

Offline (HF_HUB_OFFLINE=1, or the hub's host does not answer a connection within a few seconds), every library is put
in its offline mode, so a model or dataset that is not cached fails at once with one line instead of after a round
of retries; one that is cached loads from the cache as usual.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0
TRUE = {"1", "true", "yes", "on"}
_offline_reason: str | None = None  # set by settle_offline_mode when the process works offline


def settle_offline_mode(environ: MutableMapping[str, str] = os.environ, timeout: float = PROBE_SECONDS) -> bool:
    """Whether this process works offline; when it does, every library's offline variable is set in ``environ``.

    With a proxy configured the hub is assumed reachable (the proxy, not a direct connection, would carry it)."""
    global _offline_reason
    endpoint = environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if any(environ.get(name, "").strip().lower() in TRUE for name in OFFLINE_VARIABLES):
        _offline_reason = "the process is offline (HF_HUB_OFFLINE)"
    elif not any(environ.get(name) for name in PROXY_VARIABLES) and not reachable(endpoint, timeout):
        _offline_reason = f"the hub ({urlparse(endpoint).hostname}) cannot be reached from here"
    if _offline_reason is not None:
        environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    return _offline_reason is not None


def reachable(endpoint: str, timeout: float) -> bool:
    """One TCP connection to the endpoint's host (name lookup included), no request."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def is_offline(environ: MutableMapping[str, str] = os.environ) -> bool:
    return environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def not_cached(variable: str, name: str, what: str, local: str) -> str:
    """The one line for a hub id that is not in the cache while the process works offline."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    why = _offline_reason or "the process is offline (HF_HUB_OFFLINE)"
    return (
        f"{variable}={name!r} is not in the local Hugging Face cache ({cache}) and {why}: download the {what} once "
        f"where there is network (it is then cached), or set {variable} to {local}"
    )

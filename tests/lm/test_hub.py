"""Whether a process uses the hub is settled once, before any library reads its offline variables."""

from __future__ import annotations

import socket

import pytest

from sae_pipeline.lm import hub


@pytest.fixture
def listening():
    """A real local server socket: a connection to it succeeds."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def closed_port() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: a connection is refused at once
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def fresh_reason(monkeypatch):
    monkeypatch.setattr(hub, "_offline_reason", None)


def test_an_unreachable_hub_puts_every_library_offline_and_says_why():
    env = {"HF_ENDPOINT": closed_port()}
    assert hub.settle_offline_mode(env, timeout=2)
    assert all(env[name] == "1" for name in hub.OFFLINE_VARIABLES)
    message = hub.not_cached("MODEL_ID", "org/model", "model", "a local folder")
    assert message.startswith("MODEL_ID='org/model' is not in the local Hugging Face cache")
    assert "the hub (127.0.0.1) cannot be reached from here" in message and "set MODEL_ID to a local folder" in message


def test_a_reachable_hub_is_left_alone(listening):
    env = {"HF_ENDPOINT": listening}
    assert not hub.settle_offline_mode(env, timeout=2)
    assert not any(name in env for name in hub.OFFLINE_VARIABLES)


def test_offline_by_choice_needs_no_probe_and_a_proxy_is_trusted():
    env = {"TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": closed_port()}
    assert hub.settle_offline_mode(env) and hub.is_offline(env)
    assert "(HF_HUB_OFFLINE)" in hub.not_cached("HF_DATASET", "org/data", "dataset", "a file")
    hub._offline_reason = None
    proxied = {"HTTPS_PROXY": "http://proxy.example:3128", "HF_ENDPOINT": closed_port()}
    assert not hub.settle_offline_mode(proxied)

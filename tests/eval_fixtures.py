"""Shared by the evaluation tests: a briefly trained tiny model and a real headless Chromium.

A random-weight model predicts every token with CE ≈ log(vocab) whatever the hooked layer does, so ablating it
barely moves the loss (in either direction). ``train_tiny_lm`` fits the tiny Llama to the sample corpus for a few
seconds, which makes the layer matter: zero-ablating it must then raise the loss clearly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sae_pipeline.demo.tiny_model import load_sample_texts

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
]


def train_tiny_lm(src: Path, out: Path, steps: int = 150, seed: int = 0) -> Path:
    """Copy of the tiny model at ``src``, trained ``steps`` Adam steps on the whole sample corpus."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    texts = [t for t in load_sample_texts() if t.strip()]
    enc = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, ids.shape[0], (32,), generator=gen)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_or_install_chromium() -> str:
    """The Chromium binary; installs Debian's ``chromium`` when missing. Skips (fails in CI) when impossible."""

    def found() -> str | None:
        return shutil.which("chromium") or shutil.which("chromium-browser")

    reason = ""
    if found() is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            reason = "chromium is not installed and cannot be installed here (needs root and apt-get)"
        else:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                if res.returncode != 0:
                    reason = f"`{' '.join(cmd)}` failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}"
                    break
    binary = found()
    if binary is None:
        reason = reason or "chromium was installed but is not on PATH"
        if in_ci():
            pytest.fail(f"the browser tests must run in CI, but {reason}", pytrace=False)
        pytest.skip(f"headless Chromium unavailable: {reason}")
    return binary


def artifacts_dir(tmp_path_factory) -> Path:
    """TEST_ARTIFACTS_DIR when set (CI can upload it), else a folder under pytest's temporary base."""
    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path_factory.getbasetemp() / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_chromium(binary: str, profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
    )


class Page:
    """A page open in a real headless Chromium, driven over the DevTools protocol: ``evaluate`` runs JavaScript in it
    (a click, a read of the DOM) and returns the value; ``errors`` are the page's uncaught exceptions so far."""

    def __init__(self, socket) -> None:
        import websocket  # noqa: F401  (websocket-client, a dev dependency)

        self.socket, self.ids, self.errors = socket, itertools.count(1), []
        self.call("Runtime.enable")

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.socket.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.socket.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(msg["params"]["exceptionDetails"].get("text", "exception"))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text", "exception") + ": " + expression)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.05)


@contextlib.contextmanager
def open_page(binary: str, profile: Path, url: str, width: int = 1280, height: int = 1000) -> Iterator[Page]:
    """``url`` in a headless Chromium with a DevTools port; the browser is stopped afterwards."""
    import websocket

    proc = subprocess.Popen(
        [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if (found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)) is not None:
                port = found.group(1)
                break
        assert port, "Chromium did not open its DevTools port"
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        try:
            opened = Page(socket)
            opened.call("Page.navigate", url=url)
            opened.wait_for("location.href !== 'about:blank' && document.readyState === 'complete'")
            yield opened
        finally:
            socket.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def console_errors(stderr: str) -> list[str]:
    """Console messages of the page that are errors (uncaught exceptions, console.error, failed loads)."""
    lines = [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    return [ln for ln in lines if "ERROR" in ln.upper() or "Uncaught" in ln]


@pytest.fixture(scope="session")
def trained_tiny_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama after 120 training steps on the sample corpus (cached on disk for the whole session)."""
    out = tmp_path_factory.getbasetemp() / "trained_tiny_llama"
    if not (out / "config.json").is_file():
        train_tiny_lm(tiny_model, out.with_name(out.name + ".tmp"), steps=120)
        os.replace(out.with_name(out.name + ".tmp"), out)
    return out


@pytest.fixture(scope="session")
def chromium() -> str:
    return find_or_install_chromium()

"""Helpers the tests share (importable as ``tests.helpers``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "polish_sample.jsonl"


def run_script(script: str, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a top-level script exactly as a user would, in the repo root."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (a tmpfs, e.g. "300k") mounted at ``path``, unmounted after: where writes
    fail with ENOSPC the way a full scratch disk makes them fail. ``resize`` frees space."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def resize(path: Path, size: str) -> None:
    _mount("-o", f"remount,size={size}", str(path))


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` bind-mounted read-only on itself (EROFS for every write, root's included), restored after."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """``path`` with the immutable attribute: EPERM for every write, root's included (chmod does not stop root)."""
    _root_only("chattr", "+i", str(path))
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _mount(*args: str) -> None:
    _root_only("mount", *args)


def _root_only(*command: str) -> None:
    """Tests of full and read-only filesystems need root (CI runs as root): elsewhere they skip, in CI they fail."""
    res = subprocess.run(command, capture_output=True, text=True)
    if res.returncode != 0:
        message = f"`{' '.join(command)}` failed ({res.stderr.strip()}); these tests need root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


SAELENS_ENV = REPO / "tests" / "saelens_env"
DELPHI_ENV = REPO / "tests" / "delphi_env"


def run_saelens(checks: dict[Path, Path], timeout: float = 900) -> list[dict]:
    """SAELens itself on exports, in its own environment (tests/saelens_env; uv installs it from its lock on first
    use): one result per ``{export folder: inputs file}``, see tests/saelens_env/check_export.py."""
    stdout = run_in_env(
        SAELENS_ENV, "check_export.py", [f"{folder}={inputs}" for folder, inputs in checks.items()], timeout
    )
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_delphi(raw_dir: Path, tokenizer: Path | None = None, timeout: float = 900) -> dict:
    """delphi's own loader on a latent cache, in its own environment (tests/delphi_env): what it yields, see
    tests/delphi_env/check_cache.py."""
    stdout = run_in_env(DELPHI_ENV, "check_cache.py", [str(raw_dir)] + ([str(tokenizer)] if tokenizer else []), timeout)
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


def run_in_env(project: Path, script: str, args: list[str], timeout: float) -> str:
    """stdout of ``project/script`` run in that uv project's own environment, installed from its lock on first use
    (the field's tools pin dependencies this project cannot share)."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, f"uv is needed to run {project.name}'s checks in their own environment (README: Try it)"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    res = subprocess.run(
        [uv, "run", "--frozen", "--project", str(project), "python", str(project / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    return res.stdout


def train_env(store: Path, settings: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment of a step-2 subprocess: this one's, less every variable of the pipeline, SLURM and torchrun
    that could leak in, plus STORE_DIR, one thread and ``settings``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SAE_", "WANDB_", "RUN_ID", "TRAIN_", "TORCHELASTIC_", "LAYER_"))
        and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update({"STORE_DIR": str(store), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **settings, **overrides})
    return env


def pipeline_env(model: Path, store: Path | None = None, **overrides: str) -> dict[str, str]:
    """The environment of a small, fast, offline run of the scripts, as a user would export it: this shell's own
    pipeline variables removed, ``model`` as MODEL_ID, ``store`` as STORE_DIR (when given), then ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAE_", "WANDB_", "EVAL_", "BROWSER_"))}
    for name in ("SCRATCH", "RUN_ID", "LAYER_SIGNATURE", "CAPTURE_TASK_ID", "CAPTURE_TASK_COUNT"):
        env.pop(name, None)
    env.update(
        MODEL_ID=str(model),
        HF_DATASET=str(SAMPLE),
        DEVICE="cpu",
        DATA_LIMIT="120",
        MAX_LENGTH="32",
        BATCH_SIZE_SAVE="8",
        DOCS_PER_SHARD="40",
        LAYER_NUM="2",
        EPOCHS="2",
        BATCH_SIZE_TRAIN="256",
        N_LATENTS_MULTIPLIER="2",
        TOP_K="4",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if store is not None:
        env["STORE_DIR"] = str(store)
    env.update(overrides)
    return env

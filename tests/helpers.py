"""Helpers the tests share (importable as ``tests.helpers``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "polish_sample.jsonl"


def run_script(script: str, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a top-level script exactly as a user would, in the repo root."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


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

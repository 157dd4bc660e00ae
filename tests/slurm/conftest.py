"""Fixtures for the tests on a live single-node SLURM cluster (see cluster.py).

The cluster is started once per session in a temp dir and stopped at the end, also when a test fails. Where SLURM
cannot be installed or started (no root / no apt-get), the tests are skipped with the reason; with CI=true they
fail instead, so CI never passes by skipping them. Deselect them with ``-m "not slurm"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, pipeline_env
from tests.slurm.cluster import ClusterError, SlurmCluster, ensure_slurm


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so the marker is known when this dir is run on its own.
    config.addinivalue_line(
        "markers",
        "slurm: runs jobs on a real single-node SLURM cluster started by the test "
        "(installs Debian's slurm + munge when missing; needs root)",
    )


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"SLURM tests must run in CI, but SLURM is unavailable: {reason}", pytrace=False)
    pytest.skip(f"SLURM unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = ensure_slurm(install=os.environ.get("SAE_SLURM_INSTALL", "1") != "0")
    if reason:
        _unavailable(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (ClusterError, OSError) as exc:
        cluster.stop()
        _unavailable(f"could not start a local cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def job_dir(tmp_path) -> Path:
    """The submit dir of a test: jobs' logs land here (SLURM's default for relative --output)."""
    d = tmp_path / "submit"
    d.mkdir()
    return d


def base_env(tiny_model: Path, store: Path, **overrides: str) -> dict[str, str]:
    """What a user would export before sbatch: ``pipeline_env``'s small, fast, offline run, sized for the jobs here,
    without this shell's sbatch, pytest and virtualenv variables.

    VENV points at the project's environment (the default `uv run` path is covered by one test), SAE_MODULES is
    empty (no module system here).
    """
    sized = dict(
        DATA_LIMIT="200",
        BATCH_SIZE_SAVE="16",
        DOCS_PER_SHARD="25",
        BATCH_SIZE_TRAIN="128",
        EVAL_LIMIT="40",
        BROWSER_LATENTS="10",
        VENV=str(REPO / ".venv"),
        SAE_MODULES="",
        OMP_NUM_THREADS="1",
    )
    env = pipeline_env(tiny_model, store, **{**sized, **overrides})
    for name in [k for k in env if k.startswith(("SBATCH_", "PYTEST_"))] + ["PIPELINE_DIR", "VIRTUAL_ENV"]:
        if name not in overrides:
            env.pop(name, None)
    return env

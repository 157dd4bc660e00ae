"""The code is formatted and linted with ruff as configured in pyproject.toml (line length 120)."""

import subprocess
import sys

from tests.helpers import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_format_leaves_every_file_unchanged():
    res = _ruff("format", "--check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_lint_passes():
    res = _ruff("check", ".")
    assert res.returncode == 0, res.stdout + res.stderr

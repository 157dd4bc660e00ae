"""Every file, folder and README section that the code, the scripts or the README cite exists.

A user who meets ``see docs/x.md`` in an error message, or a developer following a docstring, must find it. Cited:
repository paths (``benchmarks/RESULTS.md``, ``slurm/common.sh``), bare file names (``distributed.py``) and README
sections (``README.md, "Training on several GPUs"``). Other projects' files are cited by URL or module name.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import REPO

TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".html"}
URL = re.compile(r"https?://\S+")
# not after a shell variable ($PIPELINE_DIR/x.sh) or inside another path
CITED_PATH = re.compile(r"(?<![\w./\\${}-])((?:[\w.-]+/)+[\w.-]+\.(?:md|py|sh|toml|jsonl|html))\b")
CITED_NAME = re.compile(r"(?<![\w./\\${}-])([\w-]+\.(?:md|py|sh))\b")
CITED_SECTION = re.compile(r"README(?:\.md)?, [\"“]([^\"”]+)[\"”]")
OUTSIDE = ("shared/", "notes/")  # the developers' notes, kept beside the repository (GUIDE.md), not in it


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


TRACKED = _tracked()
NAMES = {f.rsplit("/", 1)[-1] for f in TRACKED}
# the code, the scripts and the docs; tests name files they create themselves
FILES = [f for f in TRACKED if (REPO / f).suffix in TEXT_SUFFIXES and not f.startswith("tests/")]
README_HEADINGS = [
    line.lstrip("#").strip() for line in (REPO / "README.md").read_text().splitlines() if line[:1] == "#"
]


def _citations(rel: str) -> list[tuple[str, str]]:
    text = URL.sub("", (REPO / rel).read_text(encoding="utf-8"))
    found = [("path", m) for m in CITED_PATH.findall(text) if not m.startswith(OUTSIDE)]
    found += [("name", m) for m in CITED_NAME.findall(text)]
    found += [("section", m) for m in CITED_SECTION.findall(text)]
    return found


def _exists(rel: str, kind: str, cited: str) -> bool:
    if kind == "section":
        return any(cited in heading for heading in README_HEADINGS)
    here = (REPO / rel).parent
    if kind == "name" and cited in NAMES:
        return True
    return (REPO / cited).exists() or (here / cited).exists()


def test_the_scan_sees_citations():
    """The patterns find what they are meant to (else the test below would pass on nothing)."""
    cites = set(_citations("README.md"))
    assert ("path", "benchmarks/RESULTS.md") in cites and ("name", "02_train_sae.py") in cites
    assert ("section", "Training on several GPUs") in set(_citations("sae_pipeline/distributed.py"))
    assert len(FILES) > 30


@pytest.mark.parametrize("rel", FILES)
def test_every_cited_path_exists(rel):
    missing = [f"{kind} {cited!r}" for kind, cited in _citations(rel) if not _exists(rel, kind, cited)]
    assert not missing, f"{rel} cites what the repository does not have: {', '.join(missing)}"

"""Every file, folder, section and anchor that the code, the scripts, the README or docs/ cite exists.

A user who meets ``see docs/x.md`` in an error message, or a developer following a docstring, must find it. Cited:
repository paths (``benchmarks/RESULTS.md``, ``slurm/common.sh``), bare file names (``02_train_sae.py``), sections
of the README or of a docs page (``docs/training.md, "Training on several GPUs"``) and the anchors of Markdown links
(``[SLURM](slurm.md#logs)`` in a Markdown file). Other projects' files are cited by URL or module name.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import REPO

TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".html"}
URL = re.compile(r"https?://\S+")
# not after a shell variable ($PIPELINE_DIR/x.sh) or inside another path
CITED_PATH = re.compile(r"(?<![\w./\\${}-])((?:[\w.-]+/)+[\w.-]+\.(?:md|py|sh|toml|jsonl|html))\b")
CITED_NAME = re.compile(r"(?<![\w./\\${}-])([\w-]+\.(?:md|py|sh))\b")
CITED_SECTION = re.compile(r"(README(?:\.md)?|docs/[\w-]+\.md), [\"“]([^\"”]+)[\"”]")
LINK_ANCHOR = re.compile(r"\]\(([^()\s#]*)#([^()\s]+)\)")
OUTSIDE = ("shared/", "notes/")  # the developers' notes, kept beside the repository (GUIDE.md), not in it


def _files() -> list[str]:
    """Tracked files and new ones git does not ignore (so a page is checked before its first commit)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted({f for f in out.splitlines() if (REPO / f).is_file()})


ALL = _files()
NAMES = {f.rsplit("/", 1)[-1] for f in ALL}
# the code, the scripts and the docs; tests name files they create themselves
FILES = [f for f in ALL if (REPO / f).suffix in TEXT_SUFFIXES and not f.startswith("tests/")]


@cache
def headings(path: Path) -> tuple[str, ...]:
    """The Markdown headings of a file, outside fenced code blocks."""
    found, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    return tuple(found)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return frozenset(out)


def citations(text: str, markdown: bool = True) -> list[tuple[str, ...]]:
    text = URL.sub("", text)
    found: list[tuple[str, ...]] = [("path", m) for m in CITED_PATH.findall(text) if not m.startswith(OUTSIDE)]
    found += [("name", m) for m in CITED_NAME.findall(text)]
    found += [("section", "README.md" if f == "README" else f, s) for f, s in CITED_SECTION.findall(text)]
    found += [("anchor", f, a) for f, a in LINK_ANCHOR.findall(text) if markdown]
    return found


def _exists(rel: str, cite: tuple[str, ...]) -> bool:
    here = (REPO / rel).parent
    kind, cited = cite[0], cite[1]
    if kind == "section":
        page = REPO / cited
        return page.is_file() and any(cite[2] in heading for heading in headings(page))
    if kind == "anchor":
        page = (here / cited) if cited else REPO / rel
        return page.is_file() and cite[2] in anchors(page.resolve())
    if kind == "name" and cited in NAMES:
        return True
    # in the package, a module is cited by its path within the package (infra/distributed.py)
    return any((root / cited).exists() for root in (REPO, here, REPO / "sae_pipeline"))


def test_the_scan_sees_citations():
    """The patterns find what they are meant to (else the test below would pass on nothing)."""
    text = (
        'see docs/training.md, "Training on several GPUs" or README.md, "Try it"; run 02_train_sae.py; '
        "numbers in benchmarks/RESULTS.md; [logs](slurm.md#logs), [here](#the-store)"
    )
    assert set(citations(text)) == {
        ("path", "docs/training.md"),
        ("path", "benchmarks/RESULTS.md"),
        ("name", "02_train_sae.py"),
        ("name", "README.md"),
        ("name", "slurm.md"),
        ("section", "docs/training.md", "Training on several GPUs"),
        ("section", "README.md", "Try it"),
        ("anchor", "slurm.md", "logs"),
        ("anchor", "", "the-store"),
    }
    assert slug("Evaluating a sweep: the frontier report") == "evaluating-a-sweep-the-frontier-report"
    assert slug("The hook point: `post_attention_layernorm` (resid_mid)") == (
        "the-hook-point-post_attention_layernorm-resid_mid"
    )
    assert "docs/configuration.md" in FILES and len(FILES) > 30


@pytest.mark.parametrize("rel", FILES)
def test_every_cited_path_exists(rel):
    text = (REPO / rel).read_text(encoding="utf-8")
    cites = citations(text, markdown=rel.endswith(".md"))
    missing = [" ".join(map(repr, cite)) for cite in cites if not _exists(rel, cite)]
    assert not missing, f"{rel} cites what the repository does not have: {', '.join(missing)}"


def package_map() -> dict[str, set[str]]:
    """{folder of sae_pipeline/ ("" for the package itself): module files the package map in docs/design.md names
    there}; what a description says in parentheses (other files it mentions) is left out."""
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    block = text.split("## The package map", 1)[1].split("```", 2)[1]
    lines = block.split("sae_pipeline/\n", 1)[1].splitlines()
    groups: dict[str, str] = {}
    folder = None
    for line in lines:
        if not line.startswith("  "):
            break
        if (head := re.match(r"^  (\w+)/\s+(.*)$", line)) is not None:
            folder, line = head.group(1), head.group(2)
        elif (module := re.match(r"^  (\w+\.py)\s", line)) is not None:
            folder, line = "", module.group(1)
        groups[folder] = groups.get(folder, "") + " " + line
    named = {}
    for folder, words in groups.items():
        while re.search(r"\([^()]*\)", words):
            words = re.sub(r"\([^()]*\)", "", words)
        named[folder] = set(re.findall(r"\b(\w+\.(?:py|html))\b", words))
    return named


def test_the_package_map_matches_the_folders():
    """docs/design.md names every module of sae_pipeline/ in its folder, and nothing that is not there."""
    documented = package_map()
    package = REPO / "sae_pipeline"
    actual = {
        folder: {p.name for p in (package / folder).iterdir() if p.suffix in (".py", ".html")}
        - {"__init__.py", "__main__.py"}
        for folder in ("steps", "lm", "sae", "store", "outputs", "infra", "demo")
    }
    actual[""] = {p.name for p in package.glob("*.py")} - {"__init__.py"}
    assert {k: v for k, v in documented.items() if k in actual} == actual

"""The README is the front door: short, and its first screen gives the two commands a fresh machine needs."""

from tests.helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DEMO = "uv run python -m sae_pipeline.demo"
TESTS = "uv run pytest"
FIRST_SCREEN = 40  # lines
MAX_LINES = 150


def _first_line_with(text: str, lines: list[str]) -> int:
    return next((i for i, line in enumerate(lines) if text in line), len(lines))


def test_first_screen_gives_the_demo_then_the_tests():
    lines = README.splitlines()[:FIRST_SCREEN]
    demo, tests = _first_line_with(DEMO, lines), _first_line_with(TESTS, lines)
    assert demo < len(lines), f"the README's first {FIRST_SCREEN} lines do not give `{DEMO}`"
    assert tests < len(lines), f"the README's first {FIRST_SCREEN} lines do not give `{TESTS}`"
    assert demo < tests, f"the README gives `{TESTS}` before `{DEMO}`"


def test_ci_runs_the_readme_test_command():
    assert TESTS in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_is_short():
    n = len(README.splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines, more than {MAX_LINES}: move reference material to docs/"

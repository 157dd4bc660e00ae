"""The README documents every variable with the default the code uses."""

import re

import pytest

from sae_pipeline.settings import CaptureSettings, CommonSettings, EvalSettings, TrainSettings
from tests.helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
FIELDS = {
    **CommonSettings.model_fields,
    **CaptureSettings.model_fields,
    **TrainSettings.model_fields,
    **EvalSettings.model_fields,
}


def documented_default(field) -> str:
    if field.default_factory is not None or field.default is None:
        return ""
    if isinstance(field.default, bool):
        return f"`{int(field.default)}`"
    return f"`{field.default}`"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_variable_is_in_the_readme_table_with_its_default(name):
    row = re.search(rf"^\| `{name.upper()}` \|(.*)$", README, flags=re.MULTILINE)
    assert row, f"{name.upper()} has no row in the README's variable tables"
    assert documented_default(FIELDS[name]) in row.group(1)


def test_readme_gives_the_two_commands_ci_runs():
    assert "uv run python 01_save_activations.py" in README
    assert "uv run pytest" in README
    assert "uv run pytest" in (REPO / ".ci" / "run").read_text()

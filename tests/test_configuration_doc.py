"""docs/configuration.md is what scripts/configuration_doc.py writes from the settings schema now: every variable,
with the default the code uses."""

import re
import subprocess
import sys

import pytest

from sae_pipeline.settings import CaptureSettings, CommonSettings, EvalSettings, TrainSettings
from tests.helpers import REPO

PAGE = REPO / "docs" / "configuration.md"
SCRIPT = "scripts/configuration_doc.py"
FIELDS = {
    **CommonSettings.model_fields,
    **CaptureSettings.model_fields,
    **TrainSettings.model_fields,
    **EvalSettings.model_fields,
}


def test_the_page_is_what_the_script_writes(tmp_path):
    out = tmp_path / "configuration.md"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
    assert current == out.read_text(encoding="utf-8"), (
        f"docs/configuration.md is out of date with sae_pipeline/settings.py: run `uv run python {SCRIPT}`"
    )


def documented_default(field) -> str:
    if field.default_factory is not None or field.default is None:
        return ""
    if isinstance(field.default, bool):
        return f"`{int(field.default)}`"
    return f"`{field.default}`"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_variable_has_a_row_with_its_default(name):
    rows = re.findall(rf"^\| `{name.upper()}` \|(.*)$", PAGE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert rows, f"{name.upper()} has no row in docs/configuration.md: run `uv run python {SCRIPT}`"
    assert any(documented_default(FIELDS[name]) in row for row in rows)

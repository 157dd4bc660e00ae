"""interpretation/'s rows: synced one by one, a torn last line cut off, another configuration refused."""

from __future__ import annotations

import pytest

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.interpret.io import InterpretationFolder


def test_a_torn_last_row_is_cut_and_the_complete_rows_kept(tmp_path):
    folder = InterpretationFolder(tmp_path)
    folder.start({"latents": [1, 2]})
    folder.latents.append({"latent": 1, "explanation": "lata w historii Polski"})
    with folder.latents.path.open("ab") as f:
        f.write(b'{"latent": 2, "expla')  # a kill in the middle of a write
    assert folder.latents.rows() == [{"latent": 1, "explanation": "lata w historii Polski"}]
    folder.latents.append({"latent": 2, "explanation": "x"})
    assert [r["latent"] for r in folder.latents.rows()] == [1, 2]


def test_rows_of_other_settings_are_never_mixed(tmp_path):
    folder = InterpretationFolder(tmp_path)
    folder.start({"latents": [1, 2], "explainer_model": "a"})
    folder.start({"latents": [1, 2], "explainer_model": "b"})  # nothing written yet: a fresh start
    folder.explanations.append({"latent": 1, "explanation": "x"})
    with pytest.raises(PipelineError, match="explainer_model differ"):
        folder.start({"latents": [1, 2], "explainer_model": "c"})
    assert folder.explanations.rows() == [{"latent": 1, "explanation": "x"}]

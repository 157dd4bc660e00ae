"""Step 4's bad input through the real script: one `error:` line naming the variable or file and what is valid, a
non-zero exit, and the store exactly as it was (nothing of interpretation/ written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.test_bad_input import snapshot
from tests.helpers import pipeline_env, run_script

STEP4 = "04_interpret_sae.py"


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> tuple[dict[str, str], Path]:
    """A capture and a trained SAE of the tiny model (whose tokenizer has no chat template)."""
    store = tmp_path_factory.mktemp("interpret_bad") / "store"
    env = pipeline_env(tiny_model, store)
    for script, args in (
        ("01_save_activations.py", ("--run_id", "acts")),
        ("02_train_sae.py", ("--sae_run_id", "sae")),
    ):
        res = run_script(script, env, *args)
        assert res.returncode == 0, f"{script}: {res.stderr[-3000:]}"
    return env, store


def no_shards(store: Path) -> None:
    for shard in (store / "runs" / "acts").glob("batch_*"):
        shutil.rmtree(shard)


CASES = {
    "no_chat_template": ({}, None, ("EXPLAINER_MODEL=", "has no chat template", "instruct")),
    "missing_folder": (
        {"EXPLAINER_MODEL": "/nonexistent/explainer"},
        None,
        ("EXPLAINER_MODEL='/nonexistent/explainer'",),
    ),
    "uncached_hub_id": (
        {"SCORER_MODEL": "nobody/no-such-model"},
        None,
        ("SCORER_MODEL='nobody/no-such-model'", "cache"),
    ),
    "no_stored_activations": (
        {},
        no_shards,
        ("activation run 'acts' has no stored activations", "01_save_activations"),
    ),
    "limit_zero": ({"INTERPRET_LIMIT": "0"}, None, ("INTERPRET_LIMIT='0' is not valid", "greater than or equal to 1")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step4_bad_input_is_one_line_and_writes_nothing(trained, smollm2_model, tmp_path, case):
    env, src = trained
    overrides, prepare, expect = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(src, store)
    if prepare is not None:
        prepare(store)
    if case in ("no_stored_activations", "uncached_hub_id"):  # a valid explainer, so the case's own check is reached
        overrides = {"EXPLAINER_MODEL": str(smollm2_model), **overrides}
    before = snapshot(store)
    res = run_script(STEP4, {**env, "STORE_DIR": str(store), **overrides})
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.stderr.splitlines()[-1] == errors[0], res.stderr[-3000:]
    for part in expect:
        assert part in errors[0], errors[0]
    assert snapshot(store) == before

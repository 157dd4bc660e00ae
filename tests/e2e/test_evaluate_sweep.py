"""Step 3 on a sweep through the real scripts: capture, `TOP_K=4,8 SEED=1,2` training, evaluation of the sweep by
default (sae_run_id.txt), then one member evaluated alone: its numbers equal those it got in the sweep."""

from __future__ import annotations

import json

from tests.e2e.test_evaluate_script import STEP1, STEP2, STEP3, _env
from tests.eval_fixtures import trained_tiny_model  # noqa: F401  (fixture)
from tests.helpers import run_script

MEMBERS = ["sw.L2.k4.x2.topk.s1", "sw.L2.k4.x2.topk.s2", "sw.L2.k8.x2.topk.s1", "sw.L2.k8.x2.topk.s2"]
FAST = {"EPOCHS": "1", "EVAL_LIMIT": "24", "EVAL_SCAN_TOKENS": "1500", "BROWSER_LATENTS": "4"}


def _metrics(store, sae_run_id: str) -> dict:
    return json.loads((store / "runs" / sae_run_id / "evaluation" / "metrics.json").read_text(encoding="utf-8"))


def test_a_sweep_is_evaluated_into_one_report_and_each_member_as_alone(trained_tiny_model, tmp_path):
    store = tmp_path / "store"
    env = {**_env(trained_tiny_model, store), **FAST}
    steps = (
        (STEP1, {}, ("--run_id", "acts")),
        (STEP2, {"TOP_K": "4,8", "SEED": "1,2"}, ("--sae_run_id", "sw")),
        (STEP3, {}, ()),  # the sweep, from sae_run_id.txt
    )
    for script, extra, args in steps:
        res = run_script(script, {**env, **extra}, *args)
        assert res.returncode == 0, f"{script}: {res.stderr[-3000:]}"
    out = store / "runs" / "sw" / "evaluation"
    report = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    assert [m["sae_run_id"] for m in report["members"]] == MEMBERS
    assert [(g["top_k"], g["n_seeds"]) for g in report["groups"]] == [(4, 2), (8, 2)]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for member in MEMBERS:
        assert (store / "runs" / member / "evaluation" / "feature_browser.html").is_file()
    assert "Evaluated sweep sw: 4 SAEs at 1 layer(s)" in res.stdout and "time per stage: load" in res.stdout
    in_sweep = _metrics(store, MEMBERS[3])

    alone = run_script(STEP3, env, "--sae_run_id", MEMBERS[3])
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = _metrics(store, MEMBERS[3])
    assert single["sweep_id"] is None and in_sweep["sweep_id"] == "sw"
    for key in ("downstream", "reconstruction", "firing_frequency", "browser", "eval_data"):
        assert single[key] == in_sweep[key], key
    assert "time per stage: load" in alone.stdout


def test_the_threshold_architectures_are_evaluated_like_topk(trained_tiny_model, tmp_path):
    """A sweep over SAE_ARCHITECTURE (TopK beside Matryoshka BatchTopK and JumpReLU) through steps 1-3: every
    member gets the same metrics, browser and place in the report."""
    store = tmp_path / "store"
    env = {**_env(trained_tiny_model, store), **FAST}
    steps = (
        (STEP1, {}, ("--run_id", "acts")),
        (STEP2, {"SAE_ARCHITECTURE": "topk,matryoshka_batchtopk,jumprelu"}, ("--sae_run_id", "arch")),
        (STEP3, {}, ()),
    )
    for script, extra, args in steps:
        res = run_script(script, {**env, **extra}, *args)
        assert res.returncode == 0, f"{script}: {res.stderr[-3000:]}"
    members = ["arch.L2.k4.x2.topk.s42", "arch.L2.k4.x2.matryoshka_batchtopk.s42", "arch.L2.k4.x2.jumprelu.s42"]
    report = json.loads((store / "runs" / "arch" / "evaluation" / "sweep.json").read_text(encoding="utf-8"))
    assert [m["sae_run_id"] for m in report["members"]] == members
    metrics = [_metrics(store, member) for member in members]
    for m in metrics:
        assert set(m) == set(metrics[0])
        assert 0 < m["reconstruction"]["eval_texts"]["fvu"] < 1, m["reconstruction"]
        assert 0 < m["downstream"]["ce_loss_recovered"] <= 1, m["downstream"]
    for member in members:
        assert (store / "runs" / member / "evaluation" / "feature_browser.html").is_file()

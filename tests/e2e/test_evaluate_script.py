"""Step 3 through the real scripts: capture and train on the briefly trained tiny Llama, evaluate, open the browser.

One pipeline (steps 1-3) runs once per module; the bad-input cases then run against its store, which must stay
byte-for-byte as it was (a finished evaluation is present, so "nothing overwritten" means something).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts
from sae_pipeline.sae.model import PipelineSae
from tests.eval_fixtures import artifacts_dir, chromium, console_errors, run_chromium, trained_tiny_model  # noqa: F401
from tests.helpers import SAMPLE, pipeline_env, run_script

STEP1, STEP2, STEP3 = "01_save_activations.py", "02_train_sae.py", "03_evaluate_sae.py"
SIG = "llamaforcausallm_model_layers_2_post_attention_layernorm"


def _env(model: Path, store: Path) -> dict[str, str]:
    """The conftest's pipeline_env (function-scoped there), for a module-scoped run."""
    return pipeline_env(model, store, BROWSER_LATENTS="12")


@pytest.fixture(scope="module")
def evaluated(trained_tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("eval_e2e") / "store"
    env = _env(trained_tiny_model, store)
    results = {}
    for script, args in ((STEP1, ("--run_id", "acts")), (STEP2, ("--sae_run_id", "sae")), (STEP3, ())):
        results[script] = res = run_script(script, env, *args)
        assert res.returncode == 0, f"{script}: {res.stderr[-3000:]}"
    return env, store, results


def test_metrics_follow_the_documented_formulas(evaluated):
    env, store, results = evaluated
    res = results[STEP3]
    out = store / "runs" / "sae" / "evaluation"
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    d = m["downstream"]
    assert m["sae_run_id"] == "sae" and m["activation_run_id"] == "acts" and m["layer_signature"] == SIG
    # the trained model needs the layer: zero ablation costs loss, and the SAE recovers part of it
    assert d["ce_zero"] > d["ce_clean"] + 0.05
    assert d["ce_clean"] < d["ce_sae"] < d["ce_zero"]
    assert d["ce_loss_recovered"] == pytest.approx(
        (d["ce_zero"] - d["ce_sae"]) / (d["ce_zero"] - d["ce_clean"]), rel=1e-12
    )
    assert 0 < d["ce_loss_recovered"] < 1
    assert d["ce_loss_recovered_mean_ablation"] == pytest.approx(
        (d["ce_mean"] - d["ce_sae"]) / (d["ce_mean"] - d["ce_clean"]), rel=1e-12
    )
    assert d["delta_loss"] == pytest.approx(d["ce_sae"] - d["ce_clean"], rel=1e-12)
    assert d["kl_sae"] > 0 and d["kl_zero"] > d["kl_sae"]
    # held-out documents: the rows capture did not use
    n_rows = len(load_sample_texts())
    assert m["eval_data"]["rows"] == [120, min(n_rows, 120 + 200)]
    r = m["reconstruction"]["eval_texts"]
    assert 0 < r["fvu"] < 1 and r["l0"] == pytest.approx(4.0) and r["n_tokens"] == d["n_spliced_tokens"]
    assert d["n_spliced_tokens"] < d["n_real_tokens"]  # BOS is not stored by step 1, so not replaced either
    assert m["reconstruction"]["training_holdout"]["n_tokens"] > 0
    assert m["settings"]["eval_limit"] == 200
    assert (out / "firing_frequency.png").read_bytes()[:4] == b"\x89PNG"
    browser = json.loads((out / "feature_browser.json").read_text(encoding="utf-8"))
    assert len(browser["latents"]["frequency"]) == m["n_latents"] == 128
    assert 0 < len(browser["details"]) <= 12 and m["browser"]["context_mismatches"] == 0
    assert f"CE-loss recovered {d['ce_loss_recovered']:.4f}" in res.stdout  # the printed summary


def test_one_number_per_thing_in_terminal_metrics_and_browser(evaluated):
    """L0 and the never-fired figure read the same in the terminal, metrics.json and the browser's data, each
    never-fired figure with the tokens it was counted on; logs (not a terminal here) have no carriage returns."""
    _, store, results = evaluated
    out = store / "runs" / "sae" / "evaluation"
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    summary = json.loads((out / "feature_browser.json").read_text(encoding="utf-8"))["summary"]
    l0, nf = m["reconstruction"]["eval_texts"]["l0"], m["never_fired"]
    assert summary["reconstruction"]["l0"] == l0 and summary["never_fired"] == nf
    assert nf["tokens"] == m["browser"]["scanned_tokens"] > 0 and nf["n_latents"] == 128
    assert nf["latents"] == round(nf["fraction"] * 128)
    printed = results[STEP3].stdout
    assert f"L0 {l0:.2f}" in printed
    assert f"never fired on {nf['tokens']:,} stored tokens: {nf['fraction']:.1%} of 128 latents" in printed
    assert "never_fired_fraction" not in m["reconstruction"]["eval_texts"]  # one figure in step 3, not three
    train = json.loads((store / "runs" / "sae" / "meta.json").read_text(encoding="utf-8"))["final_metrics"]["holdout"]
    held_out = f"never fired on {train['n_tokens']:,} held-out tokens: {train['never_fired_fraction']:.1%}"
    assert held_out in results[STEP2].stdout  # training's own figure, with its own tokens
    for script, res in results.items():
        assert "\r" not in res.stderr, script
    assert re.search(r"^capture \S+: \d+/\d+ doc \(100\.0%\), [\d,]+ tokens/s, elapsed", results[STEP1].stderr, re.M)


def test_feature_browser_renders_in_chromium(evaluated, chromium, tmp_path, tmp_path_factory):
    _, store, _ = evaluated
    page = store / "runs" / "sae" / "evaluation" / "feature_browser.html"
    data = json.loads(page.with_suffix(".json").read_text(encoding="utf-8"))
    res = run_chromium(chromium, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(re.findall(r'<tr class="latent-row" data-latent="\d+"', res.stdout)) == 128
    assert len(re.findall(r'<div class="latent-card" id="latent-\d+"', res.stdout)) == len(data["details"]) > 0
    assert console_errors(res.stderr) == []
    shot = artifacts_dir(tmp_path_factory) / "feature_browser_e2e.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000


def _snapshot(root: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_bad_inputs_fail_in_one_line_and_change_nothing(evaluated, tmp_path):
    env, store, _ = evaluated
    # an SAE file of another width, in an otherwise valid training run
    shutil.copytree(store / "runs" / "sae", store / "runs" / "sae_narrow")
    shutil.rmtree(store / "runs" / "sae_narrow" / "evaluation")
    PipelineSae(96, 48, 4).save("model", store / "runs" / "sae_narrow")
    other = build_tiny_llama(
        tmp_path / "narrow_llama",
        load_sample_texts(SAMPLE),
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )
    before = _snapshot(store)
    cases = {
        "eval_limit": ({"EVAL_LIMIT": "0"}, (), "EVAL_LIMIT"),
        "missing_run": ({}, ("--sae_run_id", "nope"), "nope"),
        "sae_width": ({}, ("--sae_run_id", "sae_narrow"), "d_in=48"),
        "model_width": ({"MODEL_ID": str(other)}, ("--sae_run_id", "sae"), "width 32"),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda c: run_script(STEP3, {**env, **c[0]}, *c[1]), cases.values())))
    for name, (_, _, needle) in cases.items():
        res = results[name]
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0, name
        assert "Traceback" not in res.stderr, f"{name}: {res.stderr[-2000:]}"
        assert lines and lines[-1].startswith("error: ") and needle in lines[-1], f"{name}: {res.stderr[-2000:]}"
    assert _snapshot(store) == before
    assert not (store / "runs" / "sae_narrow" / "evaluation").exists()

"""The summary's real-against-control statistics and the Neuronpedia feature of one latent, on known values."""

from __future__ import annotations

import torch

from sae_pipeline.interpret.examples import Context, LatentExamples
from sae_pipeline.interpret.neuronpedia import feature
from sae_pipeline.interpret.summary import _stats, _values, interpretation_of


def row(latent, detection, fuzzing, control_detection):
    scores = {"detection": {"balanced_accuracy": detection}, "fuzzing": {"balanced_accuracy": fuzzing}}
    control = {"detection": {"balanced_accuracy": control_detection}, "fuzzing": {"balanced_accuracy": None}}
    return {"latent": latent, "explanation": f"e{latent}", "scores": scores, "control": {"scores": control}}


def test_real_and_control_are_summarized_side_by_side_and_unscored_latents_left_out():
    rows = [row(1, 0.9, 0.7, 0.5), row(2, 0.7, None, 0.6), row(3, None, 0.5, 0.4)]
    real, control = _stats(_values(rows, "detection", False)), _stats(_values(rows, "detection", True))
    assert (real["n"], real["mean"], real["median"]) == (2, 0.8, 0.8)
    assert (control["n"], control["mean"], control["median"]) == (3, 0.5, 0.5)
    assert sum(real["histogram"]["counts"]) == 2 and real["histogram"]["counts"][9] == 1  # 0.9 in the last bin
    shown = interpretation_of(rows)
    assert shown["2"] == {"explanation": "e2", "detection": 0.7, "fuzzing": None, "control_detection": 0.6,
                          "control_fuzzing": None}  # fmt: skip


def test_a_neuronpedia_feature_carries_the_examples_logits_and_histograms():
    top = [Context(0, 3, 1, ["a", " b", " c"], [0.0, 2.0, 1.0]), Context(4, 0, 0, ["x", " y"], [1.5, 0.0])]
    test = [Context(5, 2, 1, ["p", " q"], [0.0, 0.5], quantile=0.25)]
    ex = LatentExamples(9, 0.01, top, test, [], sample_values=[0.5, 1.0, 1.5, 2.0])

    class Tok:
        def decode(self, ids):
            return f"t{ids[0]}"

    logits = torch.arange(20, dtype=torch.float32) - 5
    feat = feature(ex, logits, Tok(), n_tokens=1000)
    assert feat["feature_index"] == 9 and feat["frac_nonzero"] == 0.01
    assert feat["pos_str"][0] == "t19" and feat["pos_values"][0] == 14.0 and feat["neg_str"][0] == "t0"
    assert [a["bin_min"] for a in feat["activations"]] == [-1, -1, 0.5]
    assert feat["activations"][0]["bin_max"] == 2.0 and feat["activations"][2]["bin_contains"] == 0.25
    assert sum(feat["freq_hist_data_bar_heights"]) == 10.0  # the sample scaled to 0.01 x 1000 firings
    assert sum(feat["logits_hist_data_bar_heights"]) == 20.0


def test_step3_finds_step4s_rows_for_its_browser(tmp_path):
    from types import SimpleNamespace

    from sae_pipeline.interpret.io import InterpretationFolder
    from sae_pipeline.interpret.summary import interpretation_for_browser

    run = SimpleNamespace(dir=tmp_path)
    assert interpretation_for_browser(run) == {}  # step 4 never ran: the browser has no columns for it
    InterpretationFolder(tmp_path).start({"latents": [1]})
    InterpretationFolder(tmp_path).latents.append(row(1, 0.9, 0.7, 0.5))
    assert interpretation_for_browser(run)["interpretation"]["1"]["detection"] == 0.9

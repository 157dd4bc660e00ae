"""delphi's prompts, its parsing and balanced accuracy, on hand-made examples whose right answers are known."""

from __future__ import annotations

import json

from sae_pipeline.interpret import scorers
from sae_pipeline.interpret.examples import Context, LatentExamples
from sae_pipeline.interpret.explainer import UNPARSED, explainer_prompt, parse_explanation
from sae_pipeline.interpret.prompts import PROMPTS_FILE, scorer_messages


def ctx(pieces, acts, center=1):
    return Context(0, center, center, pieces, acts)


EXAMPLES = LatentExamples(
    latent=7,
    frequency=0.01,
    top=[ctx(["W", " roku", " 1944", " Polska"], [0.0, 0.5, 4.0, 0.0]), ctx(["w", " 1918"], [0.0, 2.0])],
    test=[ctx(["od", " 1410", " r"], [0.0, 3.0, 0.2]), ctx(["rok", " 966"], [0.0, 1.0])],
    non_activating=[ctx(["Ala", " ma", " kota"], [0.0, 0.0, 0.0]), ctx(["pies", " biegnie"], [0.0, 0.0])],
)


def test_the_prompts_are_delphis_with_the_language_named():
    prompts = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))
    assert prompts["source"].startswith("EleutherAI/delphi@")
    messages = explainer_prompt(EXAMPLES, "Polish")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "meticulous AI researcher" in messages[0]["content"] and "in Polish" in messages[0]["content"]
    # delphi's format: marked tokens above 0.3 of the example's maximum, then their activations scaled to 0..10
    assert messages[-1]["content"] == (
        '\nW roku<< 1944>> Polska\nActivations: (" 1944" : 10), \nw<< 1918>>\nActivations: (" 1918" : 5), \n'
    )
    detection = scorer_messages("detection", "years", ["a", "b"], "Polish")
    assert detection[-1]["content"] == "Latent explanation: years\n\nText examples:\n\nExample 0: a\nExample 1: b\n"
    assert "in Polish" in detection[0]["content"]


def test_explanations_are_parsed_like_delphi():
    assert parse_explanation("Step 1...\n[EXPLANATION]: Years in Polish history.\nExample 4: x") == (
        "Years in Polish history."
    )
    assert parse_explanation("no marker here") == UNPARSED


def test_samples_are_marked_as_delphi_marks_them():
    detection = scorers.detection_samples(EXAMPLES)
    assert [(s.text, s.activating) for s in detection] == [
        ("Ala ma kota", False),
        ("pies biegnie", False),
        ("od 1410 r", True),
        ("rok 966", True),
    ]
    fuzz = scorers.fuzzing_samples(EXAMPLES)
    # activating: tokens at or above 0.3 of the example's max; non-activating: ceil(mean active tokens) = 2 marked,
    # the centre token first
    assert [s.text for s in fuzz[2:]] == ["od<< 1410>> r", "rok<< 966>>"]
    assert not fuzz[0].activating and fuzz[0].text in ("<<Ala ma>> kota", "Ala<< ma kota>>")
    assert not fuzz[1].activating and fuzz[1].text == "<<pies biegnie>>"


def test_balanced_accuracy_counts_each_class_alike_and_leaves_failed_answers_out():
    plan = scorers.plan("detection", EXAMPLES, "years", per_prompt=2, language="Polish", seed=0)
    truth = [[s.activating for s in batch] for batch in plan.batches]
    perfect = [json.dumps([int(t) for t in batch]) for batch in truth]
    assert scorers.score(plan, perfect)["balanced_accuracy"] == 1.0
    always_yes = ["[1, 1]"] * len(plan.batches)
    assert scorers.score(plan, always_yes)["balanced_accuracy"] == 0.5  # saying yes to all is chance
    broken = scorers.score(plan, ["I think [1, 0, 1]", perfect[1]])  # wrong length: the batch is failed
    assert broken["failed"] == 2 and broken["true_positives"] + broken["true_negatives"] == 2
    assert scorers.parse_answer("[1,0,2]", 3) is None and scorers.parse_answer("x [0, 1] y", 2) == [False, True]
    rare = LatentExamples(7, 1e-5, EXAMPLES.top, [], EXAMPLES.non_activating)  # its firings all among the top
    silent_only = scorers.plan("detection", rare, "years", per_prompt=2, language="Polish", seed=0)
    assert scorers.score(silent_only, ["[0,0]"])["balanced_accuracy"] is None  # no activating text: no score

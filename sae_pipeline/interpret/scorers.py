"""Detection and fuzzing, as delphi defines them, and their score: balanced accuracy per latent.

* **Detection** (delphi ``DetectionScorer``): the scorer reads the explanation and plain texts, some where the latent
  fires (its quantile samples) and some where it does not, and answers 1 or 0 for each: does the text have the
  latent?
* **Fuzzing** (``FuzzingScorer``, ``fuzz_type="default"``): the same texts with tokens marked << >>: in an
  activating text the tokens where the latent is above 0.3 of the text's maximum, in a non-activating text as many
  tokens as activating texts have active tokens on average (rounded up): are the marked tokens what the
  explanation says?

Samples are shuffled with ``random.Random(seed)`` and asked ``examples_per_prompt`` at a time; an answer that is not
a Python list of that many 0/1 counts as failed for those samples (delphi's ``_parse``) and is left out. Balanced
accuracy = (true positives / positives + true negatives / negatives) / 2 over the answered samples (delphi's
``compute_classification_metrics``); 0.5 is chance. It is left out (None) where the samples lack one class.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from sae_pipeline.interpret.examples import Context, LatentExamples
from sae_pipeline.interpret.prompts import HIGHLIGHT_THRESHOLD, Messages, highlight, scorer_messages

SCORERS = ("detection", "fuzzing")
FUZZ_SEED = 22  # delphi reseeds Python's random with 22 before choosing each false highlight
DEFAULT_MESSAGE = "<<NNsight>> is the best library for <<interpretability>> on huge models!"  # delphi's fallback


@dataclass
class Sample:
    text: str
    activating: bool


def detection_samples(examples: LatentExamples) -> list[Sample]:
    return [Sample(c.text(), False) for c in examples.non_activating] + [Sample(c.text(), True) for c in examples.test]


def fuzzing_samples(examples: LatentExamples) -> list[Sample]:
    n_incorrect = math.ceil(sum(sum(a > 0 for a in c.activations) for c in examples.test) / max(len(examples.test), 1))
    wrong = [Sample(_false_highlight(c, n_incorrect), False) for c in examples.non_activating]
    right = []
    for c in examples.test:
        threshold = HIGHLIGHT_THRESHOLD * c.max_activation
        right.append(Sample(highlight(c.pieces, [a >= threshold for a in c.activations]), True))
    return wrong + right


def _false_highlight(c: Context, n_incorrect: int) -> str:
    """``n_incorrect`` tokens below the threshold marked; the centre token first (delphi marks the position its
    activating token would hold), the rest at random."""
    threshold = HIGHLIGHT_THRESHOLD * c.max_activation
    below = [i for i, a in enumerate(c.activations) if a <= threshold]
    if not below or n_incorrect == 0:
        return DEFAULT_MESSAGE if not below else c.text()
    n = min(n_incorrect, len(below))
    rng = random.Random(FUZZ_SEED)
    if c.center in below:
        chosen = {c.center} | set(rng.sample([i for i in below if i != c.center], n - 1))
    else:
        chosen = set(rng.sample(below, n))
    return highlight(c.pieces, [i in chosen for i in range(len(c.pieces))])


SAMPLERS = {"detection": detection_samples, "fuzzing": fuzzing_samples}


@dataclass
class ScoringPlan:
    """The prompts of one scorer for one latent and explanation, and the samples each one asks about."""

    kind: str
    batches: list[list[Sample]]
    prompts: list[Messages]


def plan(kind: str, examples: LatentExamples, explanation: str, per_prompt: int, language: str, seed: int):
    samples = SAMPLERS[kind](examples)
    random.Random(seed).shuffle(samples)
    batches = [samples[i : i + per_prompt] for i in range(0, len(samples), per_prompt)]
    prompts = [scorer_messages(kind, explanation, [s.text for s in b], language) for b in batches]
    return ScoringPlan(kind, batches, prompts)


def parse_answer(text: str, n: int) -> list[bool] | None:
    """The first ``[...]`` of the answer as n 0/1 values, or None (delphi's ``_parse``)."""
    match = re.search(r"\[.*?\]", text, re.DOTALL)
    if match is None:
        return None
    try:
        values = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) for v in values):
        return None
    return [bool(v) for v in values]


def score(plan_: ScoringPlan, answers: list[str]) -> dict[str, Any]:
    """Balanced accuracy of the answers to a plan's prompts, with its confusion counts."""
    tp = tn = fp = fn = failed = 0
    for batch, answer in zip(plan_.batches, answers):
        predictions = parse_answer(answer, len(batch))
        if predictions is None:
            failed += len(batch)
            continue
        for sample, predicted in zip(batch, predictions):
            tp += sample.activating and predicted
            fn += sample.activating and not predicted
            fp += not sample.activating and predicted
            tn += not sample.activating and not predicted
    pos, neg = tp + fn, tn + fp
    # without an activating or a silent text (a rare latent whose few firings are all top examples) one rate is
    # undefined; delphi counted it as 0, which puts a latent below chance for what it was never asked
    balanced = (tp / pos + tn / neg) / 2 if pos and neg else None
    return {
        "balanced_accuracy": None if balanced is None else round(balanced, 4),
        "true_positives": tp,
        "true_negatives": tn,
        "false_positives": fp,
        "false_negatives": fn,
        "failed": failed,
    }

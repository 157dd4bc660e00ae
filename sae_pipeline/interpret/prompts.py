"""delphi's explainer and scorer prompts, as chat messages, with one line added that names the texts' language.

The texts of the prompts (system prompts, few-shot examples, the final user message) are delphi's own, copied
verbatim into ``delphi_prompts.json`` from EleutherAI/delphi (Apache-2.0; the commit and files are named in its
``source`` field): ``DefaultExplainer`` with ``activations=True, cot=False`` and the detection and fuzzing
classifiers. How examples are written into them follows delphi's ``Explainer._highlight``,
``Explainer._join_activations`` and ``Classifier._build_prompt`` (docs/interpretation.md says why delphi itself is
not imported).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

PROMPTS_FILE = Path(__file__).with_name("delphi_prompts.json")
HIGHLIGHT_THRESHOLD = 0.3  # delphi: tokens above this share of the example's maximum are marked << >>
MAX_ACTIVATIONS_LISTED = 10  # delphi lists the first 11 marked tokens of an example ("> 10" breaks)
L, R = "<<", ">>"

Messages = list[dict[str, str]]


@cache
def delphi_prompts() -> dict[str, Any]:
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def language_line(language: str, task: str) -> str:
    """The one line delphi lacks: the examples are not in English (the few-shot examples are)."""
    if task == "explain":
        return f"\nThe text examples are in {language}. Write the explanation in English.\n"
    return f"\nThe text examples are in {language}; the latent explanation is in English.\n"


def highlight(pieces: list[str], marked: list[bool]) -> str:
    """Runs of marked tokens between << and >> (delphi's ``_highlight``)."""
    out, i = [], 0
    while i < len(pieces):
        if marked[i]:
            out.append(L)
            while i < len(pieces) and marked[i]:
                out.append(pieces[i])
                i += 1
            out.append(R)
        else:
            out.append(pieces[i])
            i += 1
    return "".join(out)


def explainer_example(pieces: list[str], activations: list[float], latent_max: float) -> str:
    """One top example as delphi writes it: the text with its marked tokens, then a line of their activations
    normalized to 0..10 by the latent's largest activation among the examples shown."""
    threshold = max(activations) * HIGHLIGHT_THRESHOLD
    marked = [a > threshold for a in activations]
    listed = []
    for piece, act, mark in zip(pieces, activations, marked):
        if mark:
            if len(listed) > MAX_ACTIVATIONS_LISTED:
                break
            listed.append(f'("{piece}" : {math.floor(act * 10 / latent_max) if latent_max > 0 else 0}), ')
    return highlight(pieces, marked) + "\nActivations: " + "".join(listed)


def explainer_messages(examples: list[tuple[list[str], list[float]]], language: str) -> Messages:
    """delphi's DefaultExplainer prompt: system, three few-shot pairs, the latent's examples."""
    p = delphi_prompts()["explainer"]
    latent_max = max((max(acts) for _, acts in examples), default=0.0)
    shown = "\n".join(explainer_example(pieces, acts, latent_max) for pieces, acts in examples)
    messages = [{"role": "system", "content": p["system"].format(prompt="") + language_line(language, "explain")}]
    for user, assistant in p["examples"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": f"\n{shown}\n"}]


def scorer_messages(kind: str, explanation: str, texts: list[str], language: str) -> Messages:
    """delphi's detection or fuzzing prompt for one batch of example texts."""
    p = delphi_prompts()[kind]
    messages = [{"role": "system", "content": p["system"] + language_line(language, "score")}]
    for user, assistant in p["examples"]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    examples = "\n".join(f"Example {i}: {text}" for i, text in enumerate(texts))
    return messages + [{"role": "user", "content": p["generation"].format(explanation=explanation, examples=examples)}]

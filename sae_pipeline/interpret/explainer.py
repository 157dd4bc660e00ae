"""A latent's explanation: delphi's DefaultExplainer prompt on its top examples, the answer's ``[EXPLANATION]:``."""

from __future__ import annotations

import re

from sae_pipeline.interpret.examples import LatentExamples
from sae_pipeline.interpret.prompts import Messages, explainer_messages

UNPARSED = "Explanation could not be parsed."  # delphi's text for an answer without [EXPLANATION]:


def explainer_prompt(examples: LatentExamples, language: str) -> Messages:
    return explainer_messages([(c.pieces, c.activations) for c in examples.top], language)


def parse_explanation(text: str) -> str:
    """What follows ``[EXPLANATION]:`` (delphi's ``parse_explanation``), on its first line: a small model often
    goes on with more examples after it."""
    match = re.search(r"\[EXPLANATION\]:\s*(.*)", text, re.DOTALL)
    if not match:
        return UNPARSED
    first = match.group(1).strip().splitlines()
    return first[0].strip() if first and first[0].strip() else UNPARSED


def explanation_complete(text: str) -> bool:
    """True once the answer's first line after ``[EXPLANATION]:`` has ended: nothing generated after it can change
    ``parse_explanation``'s result, so generation stops there (a small model otherwise goes on to the token limit)."""
    match = re.search(r"\[EXPLANATION\]:\s*(.*)", text, re.DOTALL)
    return bool(match) and len((match.group(1) + "x").splitlines()) > 1

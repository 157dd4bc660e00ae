"""The scorer's constrained answers and the explainer's early stop, on the real SmolLM2-135M-Instruct.

Constrained decoding must be what it claims: greedy decoding restricted to delphi's answer format, so wherever the
model's free greedy answer already is such a list, the constrained answer is the same list; batched chats after a
shared cached prefix answer as each chat alone; and stopping the explanation early never changes what is parsed.
"""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.interpret import scorers
from sae_pipeline.interpret.chat import ChatModel
from sae_pipeline.interpret.explainer import UNPARSED, explanation_complete, parse_explanation
from sae_pipeline.interpret.prompts import scorer_messages

TEXTS = ["W roku 1944 Polska odzyskała", "Ala ma kota", "def f(x): return x", "rok 966, chrzest Polski", "pies"]
COPY = [  # a chat a small model answers with a list of mixed digits: it copies the pattern of its examples
    {"role": "system", "content": "Repeat the list the user gives, exactly."},
    {"role": "user", "content": "[0,1,1,0,1]"},
    {"role": "assistant", "content": "[0,1,1,0,1]"},
    {"role": "user", "content": "[1,1,0,0,0]"},
    {"role": "assistant", "content": "[1,1,0,0,0]"},
    {"role": "user", "content": "[1,0,0,1,0]"},
]


@pytest.fixture(scope="module")
def chat(smollm2_model):
    return ChatModel.load(str(smollm2_model), "SCORER_MODEL", torch.device("cpu"), "float32", 8)


def scoring_chats() -> list:
    explanations = ["Years in dates.", "Animals.", "Python code."]
    return [
        scorer_messages(kind, e, TEXTS[i:] + TEXTS[:i], "Polish")
        for kind in scorers.SCORERS
        for i, e in enumerate(explanations)
    ]


def test_constrained_answers_equal_free_greedy_answers_where_those_parse(chat):
    chats = scoring_chats() + [COPY]
    free = chat.answer(chats, 20)
    constrained = chat.classify(chats, [5] * len(chats))
    parsed = [scorers.parse_answer(a, 5) for a in free]
    assert free[-1] == "[1,0,0,1,0]" and constrained[-1] == "[1,0,0,1,0]"  # zeros and ones are both chosen
    assert sum(p is not None for p in parsed) >= 2
    for p, c in zip(parsed, constrained):
        assert scorers.parse_answer(c, 5) is not None  # always delphi's format
        if p is not None:
            assert c == "[" + ",".join(str(int(v)) for v in p) + "]"


def test_batched_chats_after_a_shared_prefix_answer_as_each_alone(chat):
    chats = scoring_chats() + [COPY]
    sizes = [5, 3, 5, 2, 5, 4, 5]  # shorter answers are the first digits of longer ones
    batched = chat.classify(chats, sizes)
    chat.batch_size = 1
    try:
        alone = chat.classify(chats, sizes)
    finally:
        chat.batch_size = 8
    assert batched == alone
    assert [len(scorers.parse_answer(a, n)) for a, n in zip(batched, sizes)] == sizes


def test_an_early_stop_never_changes_the_parsed_explanation():
    answers = [
        "[EXPLANATION]: Years in Polish history.\nExample 4: x<<y>>\n[EXPLANATION]: other",
        "Step 1.\n[EXPLANATION]:\n\n  Dates\r\nmore",
        "[EXPLANATION]:   \n",
        "no marker\nat all\n",
        '[EXPLANATION]: The token "er" at the end.',
    ]
    for text in answers:
        for cut in range(len(text) + 1):
            if explanation_complete(text[:cut]):
                assert parse_explanation(text[:cut]) == parse_explanation(text) != UNPARSED
    assert explanation_complete(answers[0]) and not explanation_complete(answers[4])

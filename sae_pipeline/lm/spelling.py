"""The first-letter task that feature-absorption studies use (Chanin et al. 2024; SAEBench): the single-token words of
a tokenizer's vocabulary, and the model's activations at a layer on each word in a short fixed context.

What a tokenizer needs: a vocabulary (``get_vocab``) whose word-initial tokens carry a word-start marker, ``Ġ``
(byte-level BPE: GPT-2, SmolLM2, Bielik) or ``▁`` (SentencePiece), and ``convert_tokens_to_string`` to turn a token
into text (it decodes byte-level Polish letters). A word is a token that starts with the marker and whose remaining
characters, lower-cased, are all in the alphabet (``ABSORPTION_LETTERS``); its class is its first letter.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.splice import make_splice

WORD_START_MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece
CONTEXT_EXAMPLES = 5  # worked examples before the word (SAEBench draws up to 10 at random per prompt)
TEMPLATE = "{word} has the first letter:"  # SAEBench's prompt_template
TRAIN_FRACTION = 0.8  # SAEBench's train_test_fraction, split by word


@dataclass(frozen=True)
class Words:
    """Words of one split, with their token ids and first-letter classes (indices into the alphabet)."""

    token_ids: list[int]
    words: list[str]
    letters: torch.Tensor  # [n] long


def vocabulary_words(tokenizer, alphabet: str) -> list[tuple[int, str]]:
    """Every (token id, word) of the vocabulary that is a whole word of the alphabet's letters, sorted by id."""
    special = set(tokenizer.all_special_ids)
    found = []
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special or not token.startswith(WORD_START_MARKERS) or len(token) < 2:
            continue
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if word and all(c in alphabet for c in word.lower()):
            found.append((token_id, word))
    return sorted(found)


def split_words(tokenizer, alphabet: str, limit: int, seed: int) -> tuple[Words, Words]:
    """Up to ``limit`` words drawn at random (seeded), split by word into train and test (SAEBench's 80/20)."""
    found = vocabulary_words(tokenizer, alphabet)
    if len(found) < 10:
        raise PipelineError(
            f"the tokenizer has {len(found)} single-token words of ABSORPTION_LETTERS={alphabet!r} with a word-start "
            f"marker {WORD_START_MARKERS}: too few for the absorption probe; set EVAL_ABSORPTION=0 or other letters"
        )
    chosen = random.Random(seed).sample(found, min(limit, len(found)))
    cut = int(len(chosen) * TRAIN_FRACTION)

    def words(rows: list[tuple[int, str]]) -> Words:
        letters = torch.tensor([alphabet.index(w[0].lower()) for _, w in rows], dtype=torch.long)
        return Words([i for i, _ in rows], [w for _, w in rows], letters)

    return words(chosen[:cut]), words(chosen[cut:])


def context_ids(tokenizer, examples: list[str]) -> list[int]:
    """The token ids before every word: worked examples in SAEBench's template, one per line, then a newline."""
    lines = [TEMPLATE.format(word=" " + w) + " " + w[0].upper() for w in examples]
    return tokenizer("\n" + "\n".join(lines) + "\n")["input_ids"]


class _Recorder(torch.nn.Module):
    """An engine for the splice that keeps what it sees and hands it back unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor):
        self.rows.append(x.detach().float().cpu())
        return None, None, x


def word_activations(
    lm, layer: str, hook_side: str, prefix: list[int], token_ids: list[int], device: torch.device, batch_size: int
) -> torch.Tensor:
    """[n, d] float32: the layer's activation at each word's position, the word placed after ``prefix``. Every word
    shares the prefix, so its keys and values are computed once and each word costs one token's forward."""
    with torch.inference_mode():
        prefix_cache = lm.model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache
    recorder = _Recorder()
    splice = make_splice(layer, hook_side, {"record": recorder})
    splice.mode = "record"
    lm.layers.register_hook(layer, splice)
    try:
        for start in range(0, len(token_ids), batch_size):
            words = torch.tensor(token_ids[start : start + batch_size], device=device)[:, None]
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(words))
            splice.keep = torch.ones(words.shape, dtype=torch.bool, device=device)
            mask = torch.ones(len(words), len(prefix) + 1, dtype=torch.long, device=device)
            with torch.inference_mode():
                lm.model(input_ids=words, attention_mask=mask, cache=cache, use_cache=True)
    finally:
        lm.layers.unregister_hook(splice.id)
    return torch.cat(recorder.rows)

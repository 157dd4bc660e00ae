"""Tokens as every step sees them: padded batches, position ids from the attention mask, and the positions a run
stores (real tokens; special tokens only when asked for). Capture, evaluation and streaming all use these, so each
sees exactly the tokens the others do."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the tokenizer's side (Bielik pads on the left)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def keep_mask(ids: torch.Tensor, mask: torch.Tensor, special_ids: torch.Tensor, keep_special: bool) -> torch.Tensor:
    """The positions a run stores: real tokens from the attention mask (never from the pad id: Bielik pads with
    EOS), special tokens (BOS, ...) only when asked for. Evaluation splices exactly these positions."""
    keep = mask.bool()
    if not keep_special:
        keep &= ~torch.isin(ids, special_ids)
    return keep


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from the attention mask, as in generation: a left-padded document keeps its positions."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def special_ids_of(tokenizer) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


@dataclass
class TokenBatch:
    ids: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, T] long, 1 = real token
    positions: torch.Tensor  # [B, T] position ids (left padding does not shift them), as in capture
    keep: torch.Tensor  # [B, T] bool, the positions the SAE replaces

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.ids, self.mask, self.positions, self.keep)))

    @property
    def n_real(self) -> int:
        return int(self.mask.sum())


def token_batches(
    tokenizer, texts: Iterable[str], max_length: int, batch_size: int, keep_special: bool
) -> list[TokenBatch]:
    """Tokenized like capture (truncation at the run's max length), sorted by length, padded on the tokenizer's side."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    encoded = [e for e in encoded if e]
    encoded.sort(key=len, reverse=True)
    special = special_ids_of(tokenizer)
    left = tokenizer.padding_side == "left"
    batches = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id, left)
        positions = positions_of(mask)
        batches.append(TokenBatch(ids, mask, positions, keep_mask(ids, mask, special, keep_special)))
    return batches

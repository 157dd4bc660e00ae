"""Step 1's plan: a shard's documents, tokenised, sorted longest first and padded into batches, each stored row's
place in the shard known before the forward (so rows go straight into the shard's buffers)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sae_pipeline.infra.timing import StageClock
from sae_pipeline.lm.tokens import keep_mask, pad_batch, positions_of
from sae_pipeline.settings import CaptureSettings


@dataclass
class ShardPlan:
    """A shard before any forward: its document range and the provenance of its stored rows in document order."""

    index: int
    info: dict[str, Any]  # index, doc_start, doc_stop, n_tokens, n_empty (the shard's metadata.json entry)
    provenance: torch.Tensor  # int32 [n_tokens, 3]: document index, position, token id


@dataclass
class Batch:
    """One forward's input, and where each of its stored rows goes in the shard."""

    shard: ShardPlan
    ids: torch.Tensor  # [docs, width], padded
    mask: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor  # the stored positions as flat indices into [docs * width], row by row
    runs: list[tuple[int, int, int, int]]  # stretches of stored rows: (flat index, index in rows, shard row, length)
    n_docs: int  # 0 for the one placeholder batch of a shard without documents
    last: bool  # the shard's last batch


class Planner:
    """Turns a shard's documents into batches: tokenised like evaluation, longest first (less padding), sized by
    BATCH_SIZE_SAVE documents or BATCH_TOKENS_SAVE padded tokens."""

    def __init__(self, texts, tokenizer, settings: CaptureSettings, special_ids: torch.Tensor, pin: bool) -> None:
        self.texts, self.tokenizer, self.settings = texts, tokenizer, settings
        self.special_ids, self.pin = special_ids, pin
        self.left = tokenizer.padding_side == "left"

    def documents(self, index: int) -> tuple[list[int], list[list[int]], int, int]:
        """(document indices, token ids, rows in the shard, empty rows) of the non-empty documents of shard i."""
        per = self.settings.docs_per_shard
        rows = self.texts[index * per : (index + 1) * per][self.settings.text_field]
        docs = [(index * per + j, t) for j, t in enumerate(rows) if isinstance(t, str) and t.strip()]
        encoded = self.encode([t for _, t in docs])
        return [d for d, _ in docs], encoded, len(rows), len(rows) - len(docs)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, truncation=True, max_length=self.settings.max_length)["input_ids"]

    def stored(self, doc_ids: list[int], encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The provenance of the stored tokens in document order, and how many each document has."""
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        ids = torch.tensor(list(itertools.chain.from_iterable(encoded)), dtype=torch.long)
        doc = torch.repeat_interleave(torch.arange(len(encoded)), lengths)
        position = torch.arange(len(ids)) - (lengths.cumsum(0) - lengths)[doc]
        keep = keep_mask(ids, torch.ones_like(ids), self.special_ids, self.settings.keep_special_tokens)
        provenance = torch.stack([torch.tensor(doc_ids, dtype=torch.long)[doc], position, ids], dim=1)[keep]
        return provenance.to(torch.int32), torch.bincount(doc[keep], minlength=len(encoded))

    def shard(self, index: int) -> list[Batch]:
        doc_ids, encoded, n_rows, n_empty = self.documents(index)
        provenance, per_doc = self.stored(doc_ids, encoded)
        offsets = per_doc.cumsum(0) - per_doc  # each document's first row in the shard
        start = index * self.settings.docs_per_shard
        info = {
            "index": index,
            "doc_start": start,
            "doc_stop": start + n_rows,
            "n_tokens": int(provenance.shape[0]),
            "n_empty": n_empty,
        }
        plan = ShardPlan(index, info, provenance)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        groups = list(self.groups([len(encoded[i]) for i in order]))
        if not groups:
            empty = torch.empty(0, dtype=torch.long)
            return [Batch(plan, empty[None], empty[None], empty[None], empty, empty, 0, True)]
        return [self.batch(plan, encoded, order[g], offsets, last=n == len(groups) - 1) for n, g in enumerate(groups)]

    def groups(self, lengths: list[int]) -> Iterator[slice]:
        """Consecutive documents of a longest-first list, one slice per forward."""
        budget, start = self.settings.batch_tokens_save, 0
        while start < len(lengths):
            size = max(1, budget // lengths[start]) if budget else self.settings.batch_size_save
            yield slice(start, start + size)
            start += size

    def batch(self, plan: ShardPlan, encoded: list[list[int]], docs: list[int], offsets, last: bool) -> Batch:
        ids, mask = pad_batch([encoded[i] for i in docs], self.tokenizer.pad_token_id, self.left)
        positions = positions_of(mask)
        keep = keep_mask(ids, mask, self.special_ids, self.settings.keep_special_tokens)
        rows = keep.flatten().nonzero().squeeze(1)
        counts = keep.sum(1)
        first = counts.cumsum(0) - counts  # each document's first row within this batch
        dest = torch.repeat_interleave(offsets[docs] - first, counts) + torch.arange(len(rows))
        tensors = [ids, mask, positions, rows]
        if self.pin:  # pinned: the copies to the GPU do not wait for the host
            tensors = [t.pin_memory() for t in tensors]
        return Batch(plan, *tensors, runs(rows, dest), len(docs), last)

    def batches(self, shards: list[int], clock: StageClock) -> Iterator[Batch]:
        for index in shards:
            with clock.stage("tokenise"):
                batches = self.shard(index)
            yield from batches


def runs(rows: torch.Tensor, dest: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """The stretches where consecutive stored rows are consecutive in the batch and in the shard (a document's
    tokens, unless a special token splits them): one copy each, from the forward's output into the shard."""
    if len(rows) == 0:
        return []
    breaks = ((rows[1:] - rows[:-1] != 1) | (dest[1:] - dest[:-1] != 1)).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    lengths = torch.diff(starts, append=torch.tensor([len(rows)]))
    return list(zip(rows[starts].tolist(), starts.tolist(), dest[starts].tolist(), lengths.tolist(), strict=True))

"""Training tokens of an activation run: shuffled across shards, bounded memory, reproducible, resumable.

Split. Each shard's last ``round(n_tokens x HOLDOUT_FRACTION)`` tokens are held out and never trained on. Shards
hold consecutive documents, so the held-out slice is (nearly) whole documents; it depends only on the run and the
fraction, not on SEED, so SAEs trained with different seeds are evaluated on the same tokens.

Order. Every epoch draws a new order of the shards from (SEED, epoch) and packs them into groups of at most
SHUFFLE_BUFFER_TOKENS training tokens (at least one shard). Each group's tokens are permuted together with a
generator seeded by (SEED, epoch, group), and the epoch is the concatenation of the permuted groups, cut into
batches of BATCH_SIZE_TRAIN (the last one may be shorter). Every training token appears exactly once per epoch.
Memory: the group being consumed plus the next one, loaded in a background thread while the trainer works.

Resume. Batch ``b`` of an epoch is a pure function of (run, SEED, epoch, b), so a resumed run skips to its position
by counting tokens per group without reading the skipped shards.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from sae_pipeline.errors import PipelineError
from sae_pipeline.store import ActivationRun


@dataclass(frozen=True)
class ShardSplit:
    index: int
    n_tokens: int
    n_train: int  # the first n_train tokens are trained on, the rest are held out

    @property
    def n_holdout(self) -> int:
        return self.n_tokens - self.n_train


def split_shard(index: int, n_tokens: int, holdout_fraction: float) -> ShardSplit:
    return ShardSplit(index, n_tokens, n_tokens - int(round(n_tokens * holdout_fraction)))


class TokenLoader:
    """Batches of training tokens (in the stored dtype, on the CPU) and the held-out slice of one run."""

    def __init__(self, run: ActivationRun, layer_signature: str, d_model: int, batch_size: int,
                 holdout_fraction: float, seed: int, buffer_tokens: int):
        if not 0 < holdout_fraction <= 0.5:
            raise PipelineError(f"HOLDOUT_FRACTION={holdout_fraction} is not valid: use a value in (0, 0.5]")
        self.run, self.layer_signature, self.d_model = run, layer_signature, d_model
        self.batch_size, self.seed, self.buffer_tokens = batch_size, seed, buffer_tokens
        indices = sorted(run.completed_shards())
        if not indices:
            raise PipelineError(f"activation run {run.run_id!r} has no shards in {run.dir}")
        self.shards = [split_shard(i, int(run.shard_info(i)["n_tokens"]), holdout_fraction) for i in indices]
        self.n_train = sum(s.n_train for s in self.shards)
        self.n_holdout = sum(s.n_holdout for s in self.shards)
        if self.n_train == 0 or self.n_holdout == 0:
            raise PipelineError(f"activation run {run.run_id!r} has {self.n_train + self.n_holdout} tokens: too few "
                                f"to split with HOLDOUT_FRACTION={holdout_fraction}; capture more (DATA_LIMIT)")
        self.steps_per_epoch = math.ceil(self.n_train / batch_size)

    # -- reading ---------------------------------------------------------------------------------------------------
    def read(self, shard: ShardSplit) -> torch.Tensor:
        """All tokens of one shard, checked against its manifest (a corrupted shard is named, never skipped)."""
        acts, _ = self.run.read_shard(shard.index, self.layer_signature)
        if acts.shape != (shard.n_tokens, self.d_model):
            raise PipelineError(f"{self.run.shard_dir(shard.index)} holds activations of shape {tuple(acts.shape)}, "
                                f"expected ({shard.n_tokens}, {self.d_model}); the run is corrupted")
        return acts

    # -- training order --------------------------------------------------------------------------------------------
    def groups(self, epoch: int) -> list[list[ShardSplit]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        groups: list[list[ShardSplit]] = []
        size = 0
        for i in order:
            shard = self.shards[int(i)]
            if not groups or size + shard.n_train > self.buffer_tokens:
                groups.append([])
                size = 0
            groups[-1].append(shard)
            size += shard.n_train
        return groups

    def _load_group(self, epoch: int, g: int, group: list[ShardSplit]) -> torch.Tensor:
        """The group's training tokens, permuted, written straight to their shuffled places (peak: group + shard)."""
        n = sum(s.n_train for s in group)
        positions = torch.from_numpy(np.random.default_rng([self.seed, epoch, g]).permutation(n))
        out: torch.Tensor | None = None
        start = 0
        for shard in group:
            acts = self.read(shard)[: shard.n_train]
            if out is None:
                out = torch.empty((n, self.d_model), dtype=acts.dtype)
            out[positions[start: start + shard.n_train]] = acts
            start += shard.n_train
        assert out is not None
        return out

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Batches ``start_step``.. of ``epoch``; the next group is read in the background while one is consumed."""
        skip = start_step * self.batch_size
        todo = []
        for g, group in enumerate(self.groups(epoch)):
            n = sum(s.n_train for s in group)
            if skip >= n:
                skip -= n
                continue
            todo.append((g, group))
        if not todo:
            return
        pending: list[torch.Tensor] = []
        pending_n = 0
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._load_group, epoch, *todo[0])
            for i in range(len(todo)):
                tokens = future.result()
                if i + 1 < len(todo):
                    future = pool.submit(self._load_group, epoch, *todo[i + 1])
                if skip:
                    tokens, skip = tokens[skip:], 0
                while tokens.shape[0]:
                    take = min(self.batch_size - pending_n, tokens.shape[0])
                    pending.append(tokens[:take])
                    pending_n += take
                    tokens = tokens[take:]
                    if pending_n == self.batch_size:
                        yield pending[0] if len(pending) == 1 else torch.cat(pending)
                        pending, pending_n = [], 0
            if pending_n:
                yield torch.cat(pending)

    def sample(self, n: int) -> torch.Tensor:
        """Up to ``n`` training tokens from the start of epoch 0's order (a random sample of the first group)."""
        parts, got = [], 0
        for batch in self.iter_epoch(0):
            parts.append(batch[: n - got])
            got += parts[-1].shape[0]
            if got >= n:
                break
        return torch.cat(parts)

    # -- held-out slice --------------------------------------------------------------------------------------------
    def iter_holdout(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The held-out tokens in store order, in batches of at most ``batch_size``."""
        for shard in self.shards:
            if shard.n_holdout:
                held = self.read(shard)[shard.n_train:]
                yield from held.split(batch_size)

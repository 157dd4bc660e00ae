"""Training tokens of an activation run: shuffled across shards, bounded memory, reproducible, resumable.

Split. Each shard's last ``round(n_tokens x HOLDOUT_FRACTION)`` tokens are held out and never trained on. Shards
hold consecutive documents, so the held-out slice is (nearly) whole documents; it depends only on the run and the
fraction, not on the seeds, so SAEs trained with different seeds are evaluated on the same tokens.

Order. Every epoch draws a new order of the shards from (DATA_SEED, epoch) and packs them into groups of at most
SHUFFLE_BUFFER_TOKENS training tokens (at least one shard). Each group's tokens are permuted together with a
generator seeded by (DATA_SEED, epoch, group), and the epoch is the concatenation of the permuted groups, cut into
batches of BATCH_SIZE_TRAIN (the last one may be shorter). Every training token appears exactly once per epoch.
Memory: the group being consumed plus the next one, loaded in a background thread while the trainer works; the
shards of a group are read (memory maps) and copied row by row to their shuffled places by several threads at once.
For a GPU the groups are allocated in pinned memory and sent in chunks of 16 batches on a side stream, one chunk
ahead of the trainer. A sweep gives every layer its own loader with the same seed: the same token order.

Resume. Batch ``b`` of an epoch is a pure function of (run, DATA_SEED, epoch, b), so a resumed run skips to its position
by counting tokens per group without reading the skipped shards.

Several processes (torchrun, ``rank`` of ``world_size``). BATCH_SIZE_TRAIN stays the global batch; each rank
trains on BATCH_SIZE_TRAIN / world_size tokens per step. Every epoch, the shards in that epoch's order are laid end
to end and cut into one contiguous token range per rank, sized so that every rank takes the same number of steps
(the epoch's last, partial step is split evenly; if it has fewer tokens than ranks they are dropped). A rank then
packs, shuffles and batches its range exactly as above (its own permutation seeds). So a rank reads only about
1/world_size of the shards per epoch (plus at most two it shares at the range ends), memory per rank is the same
as for one process, every training token is still seen once per epoch, and the ranges move with the epoch's shard
order, so which tokens share a step changes from epoch to epoch as with one process. Alternatives rejected: a
slice of every global batch (every rank would read the whole run), or fixed shards per rank (unequal token
counts, hence unequal steps, and the same rank/data pairing every epoch). The held-out slice is split by shard
(rank r evaluates shards r, r + world_size, ...) and the statistics are merged exactly. Since a rank's range
depends on world_size, a checkpoint resumes only with the world size that wrote it (train.py refuses another).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.store.activations import ActivationRun

DEVICE_CHUNK_BATCHES = 16  # batches per host-to-GPU copy
READ_THREADS = 8  # shards of a group read and shuffled at once (at most the CPUs this process may use)


@dataclass(frozen=True)
class Piece:
    """Training rows [start, stop) of one shard: a whole shard with one process, maybe a part with several."""

    shard: ShardSplit
    start: int
    stop: int

    @property
    def n_train(self) -> int:
        return self.stop - self.start


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

    def __init__(
        self,
        run: ActivationRun,
        layer_signature: str,
        d_model: int,
        batch_size: int,
        holdout_fraction: float,
        seed: int,
        buffer_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if not 0 < holdout_fraction <= 0.5:
            raise PipelineError(f"HOLDOUT_FRACTION={holdout_fraction} is not valid: use a value in (0, 0.5]")
        self.run, self.layer_signature, self.d_model = run, layer_signature, d_model
        self.batch_size, self.seed, self.buffer_tokens = batch_size, seed, buffer_tokens
        self.pin_memory = pin_memory
        self.dtype: torch.dtype = getattr(torch, run.read_meta().get("store_dtype", "float32"))
        self.itemsize = self.dtype.itemsize
        self._readers = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(os.sched_getaffinity(0))))
        indices = sorted(run.completed_shards())
        if not indices:
            raise PipelineError(f"activation run {run.run_id!r} has no shards in {run.dir}")
        self.shards = [split_shard(i, int(run.shard_info(i)["n_tokens"]), holdout_fraction) for i in indices]
        self.n_train = sum(s.n_train for s in self.shards)
        self.n_holdout = sum(s.n_holdout for s in self.shards)
        if self.n_train == 0 or self.n_holdout == 0:
            raise PipelineError(
                f"activation run {run.run_id!r} has {self.n_train + self.n_holdout} tokens: too few "
                f"to split with HOLDOUT_FRACTION={holdout_fraction}; capture more (DATA_LIMIT)"
            )
        if batch_size % world_size:
            raise PipelineError(
                f"BATCH_SIZE_TRAIN={batch_size} is the global batch and must be divisible by the "
                f"{world_size} training processes"
            )
        self.rank, self.world_size, self.local_batch = rank, world_size, batch_size // world_size
        full, rem = divmod(self.n_train, batch_size)
        # A remainder under half a batch joins the epoch's last full step: a step of a few tokens has almost no
        # variance to normalise its FVU by. A larger one is a step of its own if every rank gets a token.
        self.fold_last = full > 0 and 0 < rem < batch_size // 2
        last = rem if self.fold_last or rem >= world_size else 0
        self.steps_per_epoch = full + (last > 0 and not self.fold_last)
        if self.steps_per_epoch == 0:
            raise PipelineError(
                f"activation run {run.run_id!r} has {self.n_train} training tokens: fewer than the "
                f"{world_size} training processes"
            )
        sizes = [full * self.local_batch + last // world_size + (r < last % world_size) for r in range(world_size)]
        self.token_range = (sum(sizes[:rank]), sum(sizes[: rank + 1]))  # of each epoch's shard order

    # -- memory ----------------------------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        """Host memory at most: the group being consumed, the next one, and the shard being read into it."""
        largest = max(s.n_tokens for s in self.shards)
        group = max(min(self.buffer_tokens, self.n_train), largest)
        return (2 * group + largest) * self.d_model * self.itemsize

    def device_bytes(self) -> int:
        """GPU memory of the copies in flight (two chunks) and a batch cast to float32."""
        return (2 * DEVICE_CHUNK_BATCHES * self.itemsize + 4) * self.local_batch * self.d_model

    # -- reading ---------------------------------------------------------------------------------------------------
    def read(self, shard: ShardSplit) -> torch.Tensor:
        """All tokens of one shard, checked against its manifest (a corrupted shard is named, never skipped)."""
        acts, _ = self.run.read_shard(shard.index, self.layer_signature)
        if acts.shape != (shard.n_tokens, self.d_model):
            raise PipelineError(
                f"{self.run.shard_dir(shard.index)} holds activations of shape {tuple(acts.shape)}, "
                f"expected ({shard.n_tokens}, {self.d_model}); the run is corrupted"
            )
        return acts

    # -- training order --------------------------------------------------------------------------------------------
    def groups(self, epoch: int) -> list[list[Piece]]:
        """This rank's pieces of the epoch's shard order, packed into groups of at most SHUFFLE_BUFFER_TOKENS."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        lo, hi = self.token_range
        groups: list[list[Piece]] = []
        size = pos = 0
        for i in order:
            shard = self.shards[int(i)]
            piece = Piece(shard, min(max(lo - pos, 0), shard.n_train), max(min(hi - pos, shard.n_train), 0))
            pos += shard.n_train
            if piece.n_train <= 0 and self.world_size > 1:
                continue  # another rank's shard
            if not groups or size + piece.n_train > self.buffer_tokens:
                groups.append([])
                size = 0
            groups[-1].append(piece)
            size += piece.n_train
        return groups

    def _load_group(self, epoch: int, g: int, group: list[Piece]) -> torch.Tensor:
        """The group's training tokens, permuted: each shard read (a memory map of the file) and written straight to
        its tokens' shuffled places, several shards at once (they fill disjoint rows)."""
        n = sum(p.n_train for p in group)
        key = [self.seed, epoch, g] + ([self.rank] if self.world_size > 1 else [])
        positions = np.random.default_rng(key).permutation(n)
        # pinned when the batches go to a GPU: the copies are then asynchronous DMA
        out = torch.empty((n, self.d_model), dtype=self.dtype, pin_memory=self.pin_memory)
        starts = np.cumsum([0] + [p.n_train for p in group[:-1]]).tolist()

        def place(piece: Piece, start: int) -> None:
            rows = self.read(piece.shard)[piece.start : piece.stop]
            _numpy(out)[positions[start : start + piece.n_train]] = _numpy(rows)  # a row copy: 3x torch's index_put

        list(self._readers.map(place, group, starts))
        return out

    def iter_epoch(self, epoch: int, start_step: int = 0, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """Batches ``start_step``.. of ``epoch`` (this rank's part of each step, BATCH_SIZE_TRAIN / world_size
        tokens), on ``device`` when it is a GPU (else on the CPU, in the stored dtype)."""
        if start_step >= self.steps_per_epoch:
            return iter(())
        blocks = self._shuffled_groups(epoch, start_step * self.local_batch)
        if device is not None and device.type == "cuda":
            blocks = to_device(blocks, device, DEVICE_CHUNK_BATCHES * self.local_batch)
        return rebatch(blocks, self.local_batch, fold_last=self.fold_last)

    def _shuffled_groups(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        """The epoch's permuted groups, less the first ``skip`` tokens (already trained on: whole leading groups
        are never read, then part of one); the next group is read in the background while one is consumed."""
        todo = list(enumerate(self.groups(epoch)))
        while todo and skip >= (n := sum(p.n_train for p in todo[0][1])):
            skip -= n
            todo.pop(0)
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._load_group, epoch, *todo[0])
            for i in range(len(todo)):
                tokens = future.result()
                if i + 1 < len(todo):
                    future = pool.submit(self._load_group, epoch, *todo[i + 1])
                yield tokens[skip:] if i == 0 else tokens

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
        """The held-out tokens in store order, in batches of at most ``batch_size`` (this rank's shards only)."""
        for shard in self.shards[self.rank :: self.world_size]:
            if shard.n_holdout:
                held = self.read(shard)[shard.n_train :]
                yield from held.split(batch_size)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array (bfloat16 as int16: numpy has no bfloat16, a copy is a copy)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def rebatch(blocks: Iterator[torch.Tensor], batch_size: int, fold_last: bool = False) -> Iterator[torch.Tensor]:
    """Consecutive blocks of tokens cut into batches of ``batch_size``; a batch that spans two blocks is
    concatenated, every other one is a view. The remainder is a shorter last batch, or with ``fold_last`` is
    appended to the batch before it."""
    pending: list[torch.Tensor] = []
    pending_n = 0
    held: torch.Tensor | None = None  # with fold_last, the latest full batch waits to see if a remainder follows
    for tokens in blocks:
        while tokens.shape[0]:
            take = min(batch_size - pending_n, tokens.shape[0])
            pending.append(tokens[:take])
            pending_n += take
            tokens = tokens[take:]
            if pending_n == batch_size:
                batch = pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, pending_n = [], 0
                if not fold_last:
                    yield batch
                    continue
                if held is not None:
                    yield held
                held = batch
    if held is not None:
        yield torch.cat([held, *pending]) if pending_n else held
    elif pending_n:
        yield torch.cat(pending)


def to_device(blocks: Iterator[torch.Tensor], device: torch.device, chunk_tokens: int) -> Iterator[torch.Tensor]:
    """Pinned host blocks to the GPU in chunks of ``chunk_tokens``, each copied on a side stream while the trainer
    works on the previous one (the trainer's stream waits for a chunk's copy only when it reaches it)."""
    copy_stream, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    in_flight: tuple[torch.Tensor, torch.cuda.Event] | None = None
    for block in blocks:
        for part in block.split(chunk_tokens):
            with torch.cuda.stream(copy_stream):
                moved = part.to(device, non_blocking=True)
            copied = copy_stream.record_event()
            if in_flight is not None:
                yield _on_stream(*in_flight, compute)
            in_flight = (moved, copied)
    if in_flight is not None:
        yield _on_stream(*in_flight, compute)


def _on_stream(tensor: torch.Tensor, copied: torch.cuda.Event, stream: torch.cuda.Stream) -> torch.Tensor:
    stream.wait_event(copied)
    tensor.record_stream(stream)  # allocated on the copy stream, used on this one: not reused before it is done
    return tensor

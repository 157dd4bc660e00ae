"""Step 1's write stage: host buffers that take turns (one shard filling, one being written) and the writer that
stores complete shards atomically (``ActivationRun.write_shard``)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.stages import Worker
from sae_pipeline.infra.timing import StageClock
from sae_pipeline.lm.batches import ShardPlan
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.store.activations import ActivationRun


@dataclass
class HostBuffers:
    """One shard's rows of every layer, in document order; ``full`` keeps the capacity for the next shard."""

    full: dict[str, torch.Tensor]
    n_tokens: int = 0

    def views(self) -> dict[str, torch.Tensor]:
        return {sig: buf[: self.n_tokens] for sig, buf in self.full.items()}


class BufferPool:
    """Buffers that take turns (one shard filling, one being written): host memory holds two shards at most and
    reuses the same pages shard after shard. Pinned on CUDA, so the copies from the GPU land in them directly."""

    def __init__(self, layers: list[LayerSpec], dtype: torch.dtype, pin: bool, writer: Worker, sets: int = 2) -> None:
        self.layers, self.dtype, self.pin, self.writer = layers, dtype, pin, writer
        self._free: queue.Queue[HostBuffers] = queue.Queue()
        for _ in range(sets):
            self._free.put(HostBuffers({}))

    def take(self, n_tokens: int) -> tuple[HostBuffers, float]:
        """A free set grown to ``n_tokens`` rows, and the seconds spent waiting while the writer held every set
        (it fails with the writer)."""
        started = time.perf_counter()
        while True:
            self.writer.raise_if_failed()
            try:
                buffers = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                pass
        waited = time.perf_counter() - started
        for layer in self.layers:
            held = buffers.full.get(layer.signature)
            if held is None or held.shape[0] < n_tokens:
                buffers.full[layer.signature] = torch.empty(
                    n_tokens, layer.d_model, dtype=self.dtype, pin_memory=self.pin
                )
        buffers.n_tokens = n_tokens
        return buffers, waited

    def give_back(self, buffers: HostBuffers) -> None:
        self._free.put(buffers)


class ShardWriter:
    """Writes complete shards (in the write thread) and keeps what the summary needs."""

    def __init__(self, run: ActivationRun, clock: StageClock) -> None:
        self.run, self.clock = run, clock
        self.pool: BufferPool | None = None
        self.written: list[tuple[dict[str, Any], int]] = []  # (shard info, bytes)

    def __call__(self, item: tuple[ShardPlan, HostBuffers, Any]) -> None:
        plan, buffers, copied = item
        if copied is not None:
            with self.clock.stage("copy"):
                copied.synchronize()
        try:
            with self.clock.stage("write"):
                size = self.run.write_shard(plan.index, buffers.views(), plan.provenance, plan.info)
        except OSError as exc:
            raise PipelineError(
                f"could not write shard {plan.index} into {self.run.dir} ({exc.strerror or exc}); free space in "
                f"STORE_DIR or choose another one, then rerun with --run_id {self.run.run_id} to resume"
            ) from None
        self.written.append((plan.info, size))
        self.pool.give_back(buffers)

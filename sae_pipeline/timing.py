"""Where a step's time goes: wall seconds per stage (for training: read, step, checkpoint, evaluate), kept over a
whole run across resumes; on CUDA also the GPU's busy fraction (CUDA events around the work of each step: the time
from its first kernel to its last) and the peak GPU memory. The summary line and meta.json print ``summary()``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch


class StageClock:
    """Seconds per stage of one run (``stage``, ``reading``: time spent waiting for an iterator), the GPU time of
    the work inside ``gpu_busy`` and the peak GPU memory; ``state_dict`` / ``load_state_dict`` carry them across a
    resume, so the totals cover the whole run."""

    def __init__(self, device: torch.device, stages: tuple[str, ...]):
        self.device, self.stages = device, stages
        self.seconds = dict.fromkeys(stages, 0.0)
        self.before_s, self.started = 0.0, time.perf_counter()  # wall time of earlier sessions, this one's start
        self.gpu_s, self.peak_bytes = 0.0, 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def reading(self, batches: Iterable) -> Iterator:
        """``batches``, with the time spent waiting for each counted as "read"."""
        it = iter(batches)
        while True:
            with self.stage("read"):
                item = next(it, None)
            if item is None:
                return
            yield item

    @contextlib.contextmanager
    def gpu_busy(self) -> Iterator[None]:
        if self.device.type != "cuda":
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))
        if len(self._events) > 256:
            self._collect()

    def _collect(self) -> None:
        for start, end in self._events:
            end.synchronize()
            self.gpu_s += start.elapsed_time(end) / 1000
        self._events.clear()
        self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    def summary(self) -> dict[str, Any]:
        total = self.before_s + time.perf_counter() - self.started
        out: dict[str, Any] = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()} | {"total_s": round(total, 3)}
        if self.device.type == "cuda":  # busy: the GPU time from each step's first kernel to its last
            self._collect()
            loop = total - self.seconds.get("evaluate", 0.0)  # the training loop
            out |= {"gpu_busy_fraction": round(self.gpu_s / max(loop, 1e-9), 4), "peak_memory_bytes": self.peak_bytes}
        return out

    def state_dict(self) -> dict[str, Any]:
        summary = self.summary()
        return {
            "seconds": dict(self.seconds),
            "total_s": summary["total_s"],
            "gpu_s": self.gpu_s,
            "peak_bytes": self.peak_bytes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds = dict(state["seconds"])
        self.before_s, self.started = state["total_s"], time.perf_counter()
        self.gpu_s, self.peak_bytes = state["gpu_s"], state["peak_bytes"]


def describe(timing: dict[str, Any]) -> str:
    """``read 1.2 s, step 30.1 s, checkpoint 0.4 s, evaluate 0.9 s; GPU busy 93%, peak 11.2 GiB``"""
    text = ", ".join(
        f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timing.items() if k.endswith("_s") and k != "total_s"
    )
    if "gpu_busy_fraction" in timing:
        text += f"; GPU busy {timing['gpu_busy_fraction']:.0%}, peak {timing['peak_memory_bytes'] / (1 << 30):.1f} GiB"
    return text

"""Where a step's time goes: wall seconds per named stage, and on CUDA how busy the GPU was and its peak memory.

Every step reports the same way (capture: start-up, tokenise, forward, copy, write, waiting; training: read, step,
checkpoint, evaluate), in its summary line and its meta.json. Stages may run in different threads at once, so their
seconds can add up to more than the wall time; the stage whose seconds come close to the wall time sets the pace::

    clock = StageClock(("read", "step"), device)
    with clock.stage("step"), clock.gpu_busy():
        ...
    report = clock.report()           # {"wall_s", "stages_s", "gpu_busy", "gpu_peak_memory_bytes"} (GPU keys on CUDA)
    StageClock.describe(report)       # its one-line form
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def process_start() -> float:
    """When this process started (``time.time()``): start-up counted from here includes the imports."""
    import psutil

    return psutil.Process().create_time()


class GpuClock:
    """GPU time of each unit of work, from CUDA events recorded around it on the current stream.

    busy = the sum of those spans: the GPU is idle between them (waiting for the CPU side); the spans themselves may
    hold short gaps while the host launches kernels. Reading the events waits for them, so call ``busy_seconds``
    once the work is done. Off CUDA every method is a cheap no-op.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.device = device
        self._spans: deque[tuple[Any, Any]] = deque()
        self._busy_ms = 0.0
        if self.enabled:
            torch.cuda.reset_peak_memory_stats(device)

    def begin(self) -> Any:
        if not self.enabled:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def end(self, start: Any) -> Any:
        """Records the end of the span begun with ``start``; returns the end event (to wait on the work)."""
        if not self.enabled:
            return None
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self._spans.append((start, stop))
        self._fold(wait=False)
        return stop

    def busy_seconds(self) -> float:
        self._fold(wait=True)
        return self._busy_ms / 1000

    def _fold(self, wait: bool) -> None:
        """Adds finished spans to the total, so a long run holds only the few spans still in flight."""
        while self._spans and (wait or self._spans[0][1].query()):
            start, stop = self._spans.popleft()
            stop.synchronize()
            self._busy_ms += start.elapsed_time(stop)

    def peak_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.enabled else None


class StageClock:
    """Wall seconds per stage (from any thread), the wall time since the clock started and the GPU's busy time
    (``gpu``); ``state_dict`` / ``load_state_dict`` carry them across a resume, so a report covers the whole run."""

    def __init__(self, stages: tuple[str, ...] = (), device: torch.device | None = None) -> None:
        """``stages``: the order the report lists them in (others follow in the order first seen)."""
        self.device = device or torch.device("cpu")
        self.gpu = GpuClock(self.device)
        self._seconds: dict[str, float] = defaultdict(float, dict.fromkeys(stages, 0.0))
        self._lock = threading.Lock()
        self._started, self._before_s = time.perf_counter(), 0.0  # this session's start, wall time of earlier ones
        self._gpu_before_s, self._peak_before = 0.0, 0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] += seconds

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def reading(self, batches: Iterable, stage: str = "read") -> Iterator:
        """``batches``, with the time spent waiting for each counted as ``stage``."""
        it = iter(batches)
        while True:
            with self.stage(stage):
                item = next(it, None)
            if item is None:
                return
            yield item

    @contextlib.contextmanager
    def gpu_busy(self) -> Iterator[None]:
        """Counts the GPU time of the work queued inside (from its first kernel to its last)."""
        mark = self.gpu.begin()
        yield
        self.gpu.end(mark)

    def wall_seconds(self) -> float:
        return self._before_s + time.perf_counter() - self._started

    def report(self, wall_s: float | None = None, gpu_span_s: float | None = None, **extra: Any) -> dict[str, Any]:
        """``{"wall_s", "stages_s": {stage: s}, "gpu_busy", "gpu_peak_memory_bytes", **extra}`` (GPU keys on CUDA).

        ``wall_s`` defaults to the clock's own (all sessions); ``gpu_busy`` is the GPU's busy time over
        ``gpu_span_s`` (default: the wall time), e.g. the time after start-up, during which the GPU had work to do."""
        wall_s = self.wall_seconds() if wall_s is None else wall_s
        out: dict[str, Any] = {"wall_s": round(wall_s, 3)}
        out["stages_s"] = {name: round(s, 3) for name, s in self.seconds().items()}
        if self.gpu.enabled:
            span = gpu_span_s if gpu_span_s is not None else wall_s
            busy = self._gpu_before_s + self.gpu.busy_seconds()
            out["gpu_busy"] = round(busy / span, 3) if span > 0 else None
            out["gpu_peak_memory_bytes"] = max(self._peak_before, self.gpu.peak_memory_bytes())
        return {**out, **extra}

    @staticmethod
    def describe(report: dict[str, Any]) -> str:
        """``tokenise 3.1 s, forward 30.2 s, ...; GPU busy 92%, peak GPU memory 12.3 GiB``."""
        text = ", ".join(f"{name} {s:,.1f} s" for name, s in report["stages_s"].items())
        if report.get("gpu_busy") is not None:
            text += f"; GPU busy {report['gpu_busy']:.0%}"
        if report.get("gpu_peak_memory_bytes") is not None:
            text += f", peak GPU memory {report['gpu_peak_memory_bytes'] / 2**30:,.1f} GiB"
        return text

    def state_dict(self) -> dict[str, Any]:
        return {
            "stages_s": self.seconds(),
            "wall_s": self.wall_seconds(),
            "gpu_busy_s": self._gpu_before_s + self.gpu.busy_seconds(),
            "gpu_peak_memory_bytes": max(self._peak_before, self.gpu.peak_memory_bytes() or 0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._seconds = defaultdict(float, state["stages_s"])
        self._started, self._before_s = time.perf_counter(), state["wall_s"]
        self._gpu_before_s, self._peak_before = state["gpu_busy_s"], state["gpu_peak_memory_bytes"]

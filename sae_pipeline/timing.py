"""Where a step's time goes: wall seconds per named stage, and on CUDA how busy the GPU was and its peak memory.

Stages may run in different threads at once, so their seconds can add up to more than the wall time; the stage whose
seconds come close to the wall time is the one that sets the pace. Usage::

    clock = StageClock()
    with clock.stage("forward"):
        ...
    gpu = GpuClock(device)             # does nothing off CUDA
    mark = gpu.begin(); ...; gpu.end(mark)
    report = clock.report(wall_s, gpu)  # a JSON-able dict; clock.describe(report) is its one-line form
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

import torch


def process_start() -> float:
    """When this process started (``time.time()``): start-up counted from here includes the imports."""
    import psutil

    return psutil.Process().create_time()


class StageClock:
    """Accumulates wall seconds per stage, from any thread."""

    def __init__(self, stages: tuple[str, ...] = ()) -> None:
        """``stages``: the order the report lists them in (others follow in the order first seen)."""
        self._seconds: dict[str, float] = defaultdict(float, {name: 0.0 for name in stages})
        self._lock = threading.Lock()

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

    def report(
        self, wall_s: float, gpu: GpuClock | None = None, gpu_span_s: float | None = None, **extra: Any
    ) -> dict[str, Any]:
        """``{"wall_s", "stages_s": {stage: s}, "gpu_busy", "gpu_peak_memory_bytes", **extra}`` (GPU keys on CUDA).

        ``gpu_busy`` is the GPU's busy time over ``gpu_span_s`` (default: the wall time), e.g. the time after
        start-up, during which the GPU had work to do."""
        out: dict[str, Any] = {"wall_s": round(wall_s, 3)}
        out["stages_s"] = {name: round(s, 3) for name, s in self.seconds().items()}
        if gpu is not None and gpu.enabled:
            span = gpu_span_s if gpu_span_s is not None else wall_s
            out["gpu_busy"] = round(gpu.busy_seconds() / span, 3) if span > 0 else None
            out["gpu_peak_memory_bytes"] = gpu.peak_memory_bytes()
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

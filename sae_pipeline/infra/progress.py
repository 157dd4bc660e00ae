"""Progress of a long loop: a bar in a terminal; in a log file (a SLURM job's .out), one plain line every
PROGRESS_EVERY_SECONDS seconds, since a bar's carriage returns make a log file unreadable."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO


class ProgressMeter:
    """Counts ``unit`` (documents, tokens) towards ``total``; ``tokens`` per update give the tokens/s shown.

    A line reads ``capture: 1,200/10,000 doc (12.0%), 5,432 tokens/s, elapsed 0:01:02, ETA 0:07:40``; a last line
    is written when the meter closes. ``enabled=False`` shows nothing (the ranks other than 0).
    """

    def __init__(
        self,
        name: str,
        total: int,
        unit: str,
        *,
        initial: int = 0,
        every_s: float = 60.0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.name, self.total, self.unit, self.every_s, self.enabled = name, total, unit, every_s, enabled
        self.stream = stream or sys.stderr
        self.done = self.initial = initial
        self.tokens = 0
        self.fields = ""
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                desc=name,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def update(self, n: int, tokens: int | None = None, fields: str = "") -> None:
        """``n`` more units done, ``tokens`` of them (default: ``n`` when the unit is tokens); ``fields``: extra
        text shown after the rate (e.g. the loss)."""
        self.done += n
        self.tokens += n if tokens is None and self.unit == "tok" else tokens or 0
        self.fields = fields or self.fields
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(", ".join(filter(None, [self._rate(), self.fields])), refresh=False)
        elif self.enabled and time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def _rate(self) -> str:
        return f"{self.tokens / max(time.monotonic() - self.started, 1e-9):,.0f} tokens/s"

    def _line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        new = self.done - self.initial
        share = f" ({self.done / self.total:.1%})" if self.total else ""
        eta = ""
        if new > 0 and self.total:
            eta = f", ETA {timedelta(seconds=round(elapsed * max(self.total - self.done, 0) / new))}"
        parts = [f"{self.name}: {self.done:,}/{self.total:,} {self.unit}{share}", self._rate()]
        parts += [f"elapsed {timedelta(seconds=round(elapsed))}{eta}"] + ([self.fields] if self.fields else [])
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done > self.initial:
            self._line()
        self.enabled = False

    def __enter__(self) -> ProgressMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

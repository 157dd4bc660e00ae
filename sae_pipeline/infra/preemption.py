"""Graceful stop on SIGUSR1/SIGTERM: long loops finish their unit of work, save it, and exit resumable.

SLURM sends the warning signal before a time limit or preemption (``--signal=B:USR1@120``); the sbatch wrapper
forwards it to Python and requeues the job once Python has exited with ``EXIT_RESUMABLE``.
"""

from __future__ import annotations

import signal
import threading

from sae_pipeline.infra.errors import PipelineError

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request, state saved, rerun the same command to continue


class StopRequested(PipelineError):
    """Raised by a loop after it saved its state in response to a stop signal."""

    exit_code = EXIT_RESUMABLE


class StopFlag:
    """Set by the signal handler, polled by loops between units of work (a shard, a training step)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def request(self, reason: str = "request") -> None:
        self.signal_name = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

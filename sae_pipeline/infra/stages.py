"""Background stages joined by bounded queues, so that a step's CPU work, its GPU work and its disk writes overlap.

* ``Producer`` runs a generator in a thread; the consumer iterates over what it yields (work ahead, e.g. tokenising).
* ``Worker`` applies a function to every item put into it, in order, in a thread (work behind, e.g. writing).
* ``InlineProducer`` has ``Producer``'s interface without the thread, for work that has nothing to overlap with.

Queues are bounded, so a fast stage waits for a slow one instead of piling up memory. An exception in a stage is
re-raised, as the same exception object, in the thread that next hands it an item or waits for it; a stage that
failed or was cancelled drains its queue, so nothing blocks for ever. A stage's own thread waits without a timeout
(``cancel`` wakes it): a thread that woke up ten times a second would take a core from a CPU forward whose threads
wait for each other. Threads are daemons: a process that exits (an error, Ctrl-C) does not wait for them beyond
``cancel``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_DONE = object()
_POLL_S = 0.1  # how often the calling thread, while it waits for a stage, checks whether the stage failed
_CANCEL_WAIT_S = 60.0  # a cancelled stage gets this long to finish its current item (e.g. a shard being written)


class _Stage:
    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # handed to the other side, re-raised there
            self._error = exc
            self._drain()

    def _run(self) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop after the current item and drop the rest; waits (bounded) for the thread to end."""
        self._cancelled.set()
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._drain()  # a producer blocked on a full queue gets room, and sees the flag
            self._wake()
            self._thread.join(_POLL_S)
        self._drain()

    def _wake(self) -> None:
        """Wake the stage's thread if it waits for an item (a worker)."""


class Producer(_Stage, Generic[T]):
    """Iterates ``items()`` in a background thread, at most ``maxsize`` items ahead of the consumer."""

    def __init__(self, name: str, items: Callable[[], Iterator[T]], maxsize: int) -> None:
        super().__init__(name, maxsize)
        self._items = items
        self._thread.start()

    def _run(self) -> None:
        for item in self._items():
            if not self._offer(item):
                return
        self._offer(_DONE)

    def _offer(self, item: Any) -> bool:
        if self._cancelled.is_set():
            return False
        self._queue.put(item)
        return not self._cancelled.is_set()

    def get(self) -> tuple[T | None, float]:
        """The next item (None after the last) and the seconds spent waiting for it."""
        started = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                self.raise_if_failed()
                if not self._thread.is_alive() and self._queue.empty():
                    self.raise_if_failed()
                    raise RuntimeError(f"background stage {self.name!r} ended without finishing") from None
        return (None if item is _DONE else item), time.perf_counter() - started


class InlineProducer(Generic[T]):
    """``Producer``'s interface, computing each item in the caller's thread when asked for it: beside a CPU
    forward whose threads already take every core, a thread working ahead gains nothing and pre-empts them."""

    def __init__(self, name: str, items: Callable[[], Iterator[T]]) -> None:
        self.name = name
        self._items = items()

    def get(self) -> tuple[T | None, float]:
        """The next item (None after the last); no time is spent waiting, only computing."""
        return next(self._items, None), 0.0

    def cancel(self) -> None:
        """Nothing runs between calls."""


class Worker(_Stage, Generic[T]):
    """Calls ``work(item)`` in a background thread for every item put, in order, at most ``maxsize`` waiting."""

    def __init__(self, name: str, work: Callable[[T], None], maxsize: int) -> None:
        super().__init__(name, maxsize)
        self._work = work
        self._thread.start()

    def _wake(self) -> None:
        try:
            self._queue.put_nowait(_DONE)  # an idle worker wakes up, and sees the flag
        except queue.Full:
            pass

    def _run(self) -> None:
        while not self._cancelled.is_set():
            item = self._queue.get()
            if item is _DONE or self._cancelled.is_set():
                return
            self._work(item)

    def put(self, item: T) -> float:
        """Hand ``item`` over, waiting while the queue is full; returns the seconds waited."""
        started = time.perf_counter()
        while True:
            self.raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError(f"background stage {self.name!r} is not running")
            try:
                self._queue.put(item, timeout=_POLL_S)
                return time.perf_counter() - started
            except queue.Full:
                pass

    def close(self) -> None:
        """Wait until every item put so far is processed; re-raise the stage's error if it failed."""
        self.put(_DONE)  # type: ignore[arg-type]
        while self._thread.is_alive():
            self._thread.join(_POLL_S)
        self.raise_if_failed()

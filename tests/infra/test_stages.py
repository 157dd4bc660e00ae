"""stages.py: background threads keep order, stay a bounded distance ahead, and hand their errors over, never hang."""

from __future__ import annotations

import threading
import time

import pytest

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.stages import InlineProducer, Producer, Worker


def drain(producer: Producer | InlineProducer) -> list:
    out = []
    while True:
        item, _ = producer.get()
        if item is None:
            return out
        out.append(item)


def test_producer_yields_everything_in_order_and_stays_bounded():
    made = []

    def items():
        for i in range(50):
            made.append(i)
            yield i

    producer = Producer("count", items, maxsize=3)
    time.sleep(0.3)
    assert len(made) <= 3 + 1, "a producer may run at most maxsize items (plus the one in hand) ahead"
    assert drain(producer) == list(range(50))


def test_producer_error_is_raised_in_the_consumer_as_the_same_exception():
    error = PipelineError("TEXT_FIELD='x' is not a column")

    def items():
        yield 1
        raise error

    producer = Producer("failing", items, maxsize=2)
    with pytest.raises(PipelineError) as info:
        drain(producer)
    assert info.value is error


def test_an_inline_producer_computes_each_item_only_when_asked_and_raises_its_error():
    made, error = [], PipelineError("TEXT_FIELD='x' is not a column")

    def items():
        for i in range(3):
            made.append(i)
            yield i
        raise error

    producer = InlineProducer("inline", items)
    assert made == [], "nothing is computed before the first get"
    assert producer.get() == (0, 0.0) and made == [0]
    with pytest.raises(PipelineError) as info:
        drain(producer)
    assert info.value is error and made == [0, 1, 2]


def test_worker_processes_every_item_in_order_before_close_returns():
    seen = []
    worker = Worker("collect", lambda item: (time.sleep(0.001), seen.append(item)), maxsize=2)
    waited = sum(worker.put(i) for i in range(30))
    worker.close()
    assert seen == list(range(30))
    assert waited > 0, "with a queue of 2 the producer must have waited for the slow worker"


def test_worker_error_surfaces_in_put_and_close_instead_of_hanging():
    error = OSError(28, "No space left on device")

    def work(item):
        if item == 3:
            raise error

    worker = Worker("write", work, maxsize=1)
    with pytest.raises(OSError) as info:
        for i in range(1000):  # a dead worker with a full queue would block here for ever
            worker.put(i)
    assert info.value is error
    with pytest.raises(OSError):
        worker.close()


def test_a_failure_down_the_chain_reaches_the_first_stage():
    """write fails -> assemble, which feeds it, fails with the same error -> the main thread sees it."""
    error = PipelineError("could not write shard 2")

    def write(item):
        if item == 2:
            raise error

    write_stage = Worker("write", write, maxsize=1)
    assemble = Worker("assemble", write_stage.put, maxsize=1)
    with pytest.raises(PipelineError) as info:
        for i in range(1000):
            assemble.put(i)
        assemble.close()
    assert info.value is error


def test_cancel_stops_a_blocked_producer_and_an_idle_worker():
    gate = threading.Event()

    def endless():
        i = 0
        while True:
            i += 1
            yield i

    producer = Producer("endless", endless, maxsize=1)
    worker = Worker("idle", lambda item: gate.wait(), maxsize=1)
    started = time.perf_counter()
    producer.cancel()
    worker.cancel()
    assert time.perf_counter() - started < 5
    assert not producer._thread.is_alive() and not worker._thread.is_alive()

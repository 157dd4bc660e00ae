"""timing.py: seconds per stage from several threads and of an iterator's waits, in a fixed order, totals that
survive a resume, the report and its line."""

from __future__ import annotations

import threading
import time

import torch

from sae_pipeline.infra.timing import GpuClock, StageClock, process_start


def _slow(n: int, pause: float):
    for i in range(n):
        time.sleep(pause)
        yield i


def test_stages_add_up_from_several_threads_in_the_given_order():
    clock = StageClock(("start-up", "forward", "write"))

    def write():
        for _ in range(5):
            with clock.stage("write"):
                time.sleep(0.01)

    thread = threading.Thread(target=write)
    thread.start()
    with clock.stage("forward"):
        time.sleep(0.05)
    thread.join()
    clock.add("start-up", 1.5)
    clock.add("other", 0.25)
    seconds = clock.seconds()
    assert list(seconds) == ["start-up", "forward", "write", "other"]
    assert seconds["forward"] >= 0.05 and seconds["write"] >= 0.05 and seconds["start-up"] == 1.5


def test_waiting_for_an_iterator_is_counted_and_totals_survive_a_resume():
    clock = StageClock(("read", "step"))
    assert list(clock.reading(_slow(3, 0.02))) == [0, 1, 2]
    with clock.stage("step"), clock.gpu_busy():
        time.sleep(0.03)
    first = clock.report()
    assert 0.06 <= first["stages_s"]["read"] < 0.5 and 0.03 <= first["stages_s"]["step"] < 0.5
    assert first["wall_s"] >= first["stages_s"]["read"] + first["stages_s"]["step"]
    resumed = StageClock(("read", "step"))
    resumed.load_state_dict(clock.state_dict())
    with resumed.stage("step"):
        time.sleep(0.01)
    again = resumed.report()
    assert again["stages_s"]["read"] == first["stages_s"]["read"]
    assert again["stages_s"]["step"] >= first["stages_s"]["step"] + 0.01 and again["wall_s"] >= first["wall_s"] + 0.01


def test_report_and_its_line():
    clock = StageClock(("tokenise", "forward"))
    clock.add("forward", 2.0)
    report = clock.report(4.0, shards=3)
    assert report == {"wall_s": 4.0, "stages_s": {"tokenise": 0.0, "forward": 2.0}, "shards": 3}  # CPU: no GPU keys
    assert StageClock.describe(report) == "tokenise 0.0 s, forward 2.0 s"
    gpu = {**report, "gpu_busy": 0.93, "gpu_peak_memory_bytes": 3 * 2**30}
    assert StageClock.describe(gpu).endswith("; GPU busy 93%, peak GPU memory 3.0 GiB")


def test_gpu_clock_is_a_no_op_off_cuda():
    gpu = GpuClock(torch.device("cpu"))
    assert gpu.end(gpu.begin()) is None
    assert gpu.busy_seconds() == 0.0 and gpu.peak_memory_bytes() is None


def test_process_start_is_before_now():
    assert 0 < time.time() - process_start() < 24 * 3600

"""timing.py: seconds per stage, waiting time of an iterator, totals that survive a resume, the printed line."""

import time

import torch

from sae_pipeline.timing import StageClock, describe


def _slow(n: int, pause: float):
    for i in range(n):
        time.sleep(pause)
        yield i


def test_stages_and_waiting_are_counted_and_survive_a_resume():
    clock = StageClock(torch.device("cpu"), ("read", "step"))
    assert list(clock.reading(_slow(3, 0.02))) == [0, 1, 2]
    with clock.stage("step"):
        time.sleep(0.03)
    s = clock.summary()
    assert 0.06 <= s["read_s"] < 0.5 and 0.03 <= s["step_s"] < 0.5 and s["total_s"] >= s["read_s"] + s["step_s"]
    assert "gpu_busy_fraction" not in s  # CPU: no GPU fields
    resumed = StageClock(torch.device("cpu"), ("read", "step"))
    resumed.load_state_dict(clock.state_dict())
    with resumed.stage("step"):
        time.sleep(0.01)
    r = resumed.summary()
    assert r["read_s"] == s["read_s"] and r["step_s"] >= s["step_s"] + 0.01 and r["total_s"] >= s["total_s"]
    line = describe(r)
    assert line.startswith("read 0.") and ", step 0." in line and "total" not in line
    gpu = describe({**r, "gpu_busy_fraction": 0.93, "peak_memory_bytes": 3 << 30})
    assert gpu.endswith("; GPU busy 93%, peak 3.0 GiB")

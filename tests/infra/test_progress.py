"""Progress reads well in a SLURM log (plain lines, no carriage returns) and stays a bar in a terminal."""

from __future__ import annotations

import io
import os
import pty

from sae_pipeline.infra.progress import ProgressMeter


def test_a_log_file_gets_plain_lines_with_rate_and_eta():
    log = io.StringIO()  # not a terminal, as a SLURM job's .out file
    with ProgressMeter("capture layers", 1000, "doc", every_s=0.0, stream=log) as meter:
        meter.update(250, tokens=5000)
        meter.update(250, tokens=5000, fields="FVU 0.300")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 3  # one per update (every 0 s), one when it closes
    assert lines[0].startswith("capture layers: 250/1,000 doc (25.0%), ") and "tokens/s" in lines[0]
    assert "ETA " in lines[0] and "elapsed " in lines[0]
    assert lines[1].startswith("capture layers: 500/1,000 doc (50.0%)") and lines[1].endswith("FVU 0.300")


def test_lines_are_spaced_in_time_and_a_disabled_meter_is_silent():
    log = io.StringIO()
    with ProgressMeter("train", 10_000, "tok", every_s=3600, stream=log) as meter:
        for _ in range(100):
            meter.update(100)
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[-1]]  # only the closing line
    assert log.getvalue().startswith("train: 10,000/10,000 tok (100.0%)")
    quiet = io.StringIO()
    with ProgressMeter("train", 10, "tok", every_s=0, stream=quiet, enabled=False) as meter:
        meter.update(10)
    assert quiet.getvalue() == ""


def test_a_terminal_keeps_the_bar():
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        with ProgressMeter("capture", 10, "doc", stream=tty) as meter:
            assert meter.bar is not None
            meter.update(10, tokens=100)
    os.close(leader)

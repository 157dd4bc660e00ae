"""A killed and resumed training run ends with the model of the uninterrupted run: the real script, real signals.

``02_train_sae.py`` runs as a subprocess and is killed (SIGKILL) or stopped (SIGUSR1, exit 75) at points chosen by
watching its commit file on disk (``checkpoint.json``: the step every SAE's checkpoint is at): right after a
checkpoint mid-epoch, then, resumed, mid-way through a later epoch, then resumed again to the end; a sweep of four
SAEs over two layers is killed and resumed too. Each start costs seconds of imports, hence few of them. The
uninterrupted reference runs in this process with the same settings and one thread, like the subprocesses. Every
tensor of every final ``model.pt`` must equal the reference's (≤ 1e-6; on CPU they are bit for bit the same), and
so must the history. Kills land wherever the process is when the test sees the commit, possibly in the middle of
the next checkpoint: whatever was not committed is ignored on resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_pipeline.settings import TrainSettings
from sae_pipeline.steps.train import train_sae
from sae_pipeline.store.runs import SAE_RUN_ID_FILE, Store
from sae_pipeline.store.training import training_runs
from tests.helpers import REPO, run_script, train_env
from tests.sae_fixtures import LAYER, LAYER3, RUN_FOLDER, make_run

SHARDS = (1400, 1200, 1600, 1300, 1500, 1200)  # 122 steps of 64 tokens per epoch
SETTINGS = dict(
    DEVICE="cpu",
    EPOCHS="4",
    BATCH_SIZE_TRAIN="64",
    TOP_K="4",
    N_LATENTS_MULTIPLIER="4",
    LR="2e-3",
    CHECKPOINT_EVERY_STEPS="25",
    LOG_EVERY_STEPS="10",
    SHUFFLE_BUFFER_TOKENS="5000",
)


def _start(env: dict[str, str], sae_run_id: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "02_train_sae.py"), "--sae_run_id", sae_run_id]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(commit: Path) -> dict | None:
    try:
        return json.loads(commit.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for_commit(proc: subprocess.Popen, commit: Path, until, timeout: float = 600) -> dict:
    """Poll the commit file until ``until(record)``; the process must still be running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = _committed(commit)
        if record is not None and until(record):
            return record
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before the kill point:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no commit matching the kill point within {timeout} s")


def _kill(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return err


def _resumed_at(err: str) -> int:
    assert "resumed from step " in err, err[-3000:]
    return int(err.split("resumed from step ")[1].split()[0])


def _reference(store: Path, sae_run_id: str, **overrides: str) -> Path:
    """The uninterrupted run, in this process, single-threaded like the subprocesses."""
    values = {**SETTINGS, **overrides}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_sae(TrainSettings(store_dir=store, **{k.lower(): v for k, v in values.items()}), None, sae_run_id)
    finally:
        torch.set_num_threads(threads)


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    return {}


def assert_same_training(got: Path, want: Path) -> None:
    """Every tensor of model.pt within 1e-6 (absolute), and the same history, step by step."""
    a = _tensors(torch.load(got / "model.pt", weights_only=True))
    b = _tensors(torch.load(want / "model.pt", weights_only=True))
    assert a.keys() == b.keys() and len(a) >= 6
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{got.name} {key}: {m}")
    assert json.loads((got / "history.json").read_text()) == json.loads((want / "history.json").read_text())


def test_a_kill_then_a_stop_in_a_later_epoch_end_with_the_uninterrupted_model(tmp_path):
    make_run(tmp_path, shard_sizes=SHARDS)
    env = train_env(tmp_path, SETTINGS)
    out = tmp_path / "runs" / "killed"
    commit = out / "checkpoint.json"

    # 1. SIGKILL mid-epoch 1, right after the second checkpoint is committed
    proc = _start(env, "killed")
    first = _wait_for_commit(proc, commit, lambda r: r["step"] >= 50)
    _kill(proc)
    assert json.loads((out / "meta.json").read_text())["status"] == "running"
    assert not (tmp_path / SAE_RUN_ID_FILE).exists()

    # 2. resumed, then SIGUSR1 (SLURM's warning) mid-way through a later epoch (the 3rd): a checkpoint at the
    #    current step and exit 75
    proc = _start(env, "killed")
    _wait_for_commit(proc, commit, lambda r: r["epoch"] >= 2 and r["step_in_epoch"] > 0)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    assert _resumed_at(err) >= first["step"] and "stopped by SIGUSR1" in err
    stopped = _committed(commit)
    assert stopped["epoch"] >= 2 and stopped["step_in_epoch"] > 0
    assert f"stopped by SIGUSR1 at step {stopped['step']} " in err

    # 3. resumed to the end
    done = run_script("02_train_sae.py", env, "--sae_run_id", "killed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resumed_at(done.stderr) == stopped["step"]
    steps_per_epoch = (stopped["step"] - stopped["step_in_epoch"]) // stopped["epoch"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["total_steps"] == 4 * steps_per_epoch
    assert sorted(p.name for p in out.iterdir()) == RUN_FOLDER
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "killed"
    assert_same_training(out, _reference(tmp_path, "reference"))


def test_a_killed_sweep_resumes_every_sae_at_the_same_step_and_ends_like_the_uninterrupted_sweep(tmp_path):
    make_run(tmp_path, shard_sizes=SHARDS, layers=(LAYER, LAYER3))
    sweep = dict(TOP_K="4,8", EPOCHS="2")
    env = train_env(tmp_path, SETTINGS, **sweep)
    commit = tmp_path / "runs" / "sw" / "checkpoint.json"
    proc = _start(env, "sw")
    record = _wait_for_commit(proc, commit, lambda r: r["step"] >= 75)
    _kill(proc)
    assert len(record["members"]) == 4

    done = run_script("02_train_sae.py", env, "--sae_run_id", "sw")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resumed_at(done.stderr) >= record["step"]
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "sw"
    assert not commit.exists()
    reference = _reference(tmp_path, "ref", **sweep)
    got, want = training_runs(Store(tmp_path), "sw"), training_runs(Store(tmp_path), "ref")
    assert [r.run_id.removeprefix("sw.") for r in got] == [r.run_id.removeprefix("ref.") for r in want]
    assert [r.run_id.removeprefix("sw.") for r in got] == [
        "L1.k4.x4.topk.s42",
        "L1.k8.x4.topk.s42",
        "L3.k4.x4.topk.s42",
        "L3.k8.x4.topk.s42",
    ]
    assert reference == tmp_path / "runs" / "ref"
    for a, b in zip(got, want):
        assert_same_training(a.dir, b.dir)


def test_a_killed_sweep_of_the_threshold_architectures_ends_like_the_uninterrupted_sweep(tmp_path):
    """Matryoshka BatchTopK and JumpReLU as one sweep's axis: their extra state (the BatchTopK threshold, the
    JumpReLU thresholds and bandwidth, Adam's moments for them) survives a kill bit for bit."""
    make_run(tmp_path, shard_sizes=SHARDS)
    sweep = dict(SAE_ARCHITECTURE="matryoshka_batchtopk,jumprelu", EPOCHS="2")
    env = train_env(tmp_path, SETTINGS, **sweep)
    commit = tmp_path / "runs" / "arch" / "checkpoint.json"
    proc = _start(env, "arch")
    record = _wait_for_commit(proc, commit, lambda r: r["step"] >= 75)
    _kill(proc)

    done = run_script("02_train_sae.py", env, "--sae_run_id", "arch")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resumed_at(done.stderr) >= record["step"]
    _reference(tmp_path, "ref", **sweep)
    got, want = training_runs(Store(tmp_path), "arch"), training_runs(Store(tmp_path), "ref")
    assert [r.run_id for r in got] == ["arch.L1.k4.x4.matryoshka_batchtopk.s42", "arch.L1.k4.x4.jumprelu.s42"]
    for a, b in zip(got, want):
        assert_same_training(a.dir, b.dir)
    matryoshka, jumprelu = (torch.load(r.dir / "model.pt", weights_only=True)["pipeline_sae"] for r in got)
    assert matryoshka["matryoshka_widths"] == [2, 8, 32, 128] and matryoshka["threshold"] > 0
    assert jumprelu["thresholds"].unique().numel() > 64 and jumprelu["bandwidth"] > 0
    last = json.loads((got[1].dir / "history.json").read_text())["steps"][-1]
    # neither collapsed nor dense; 244 steps at LR 2e-3 are too few to reach TOP_K = 4 (docs/architectures.md)
    assert 1 < last["l0"] < 8, last

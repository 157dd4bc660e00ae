"""A capture killed mid-run resumes to exactly the run an uninterrupted capture writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.steps.capture import save_activations
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store
from tests.helpers import REPO, SAMPLE, run_script


@pytest.fixture(scope="module")
def slower_model(tmp_path_factory):
    """Wide enough that a capture takes seconds, so it can be killed in the middle."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("wide"), load_sample_texts(SAMPLE), hidden_size=256, intermediate_size=512, num_layers=4
    )


def all_shards(store_dir, run_id):
    run = ActivationRun(Store(store_dir), run_id)
    meta = run.open()
    return meta, [run.read_shard(i, meta["layer_signatures"][0]) for i in range(meta["n_shards"])]


def start(env, run_id):
    return subprocess.Popen(
        [sys.executable, str(REPO / "01_save_activations.py"), "--run_id", run_id],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_shards(run: ActivationRun, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(run.completed_shards()) < n:
        assert proc.poll() is None, f"capture ended before it could be interrupted: {proc.communicate()}"
        assert time.time() < deadline, "capture made no progress"
        time.sleep(0.01)


@pytest.fixture
def env(pipeline_env, slower_model):
    return {
        **pipeline_env,
        "MODEL_ID": str(slower_model),
        "DATA_LIMIT": "120",
        "MAX_LENGTH": "96",
        "BATCH_SIZE_SAVE": "2",
        "DOCS_PER_SHARD": "6",
        "LAYER_NUM": "3",
        "OMP_NUM_THREADS": "1",
    }


def test_sigkill_then_resume_equals_uninterrupted(env, tmp_path):
    store = Store(tmp_path / "store")
    run = ActivationRun(store, "killed")
    proc = start(env, "killed")
    wait_for_shards(run, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run.status() != "complete" and not (store.root / "run_id.txt").exists()
    partial = run.completed_shards()
    assert 2 <= len(partial) < 20

    resumed = run_script("01_save_activations.py", env, "--run_id", "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run 'killed'" in resumed.stderr
    assert (store.root / "run_id.txt").read_text().strip() == "killed"
    assert not list(run.dir.glob(".tmp*")), "temporaries of the killed writer must be cleaned up"

    same_settings = {k.lower(): v for k, v in env.items() if k.lower() in CaptureSettings.model_fields}
    save_activations(CaptureSettings(**same_settings), run_id="straight")
    meta_a, shards_a = all_shards(store.root, "killed")
    meta_b, shards_b = all_shards(store.root, "straight")
    assert meta_a["n_tokens"] == meta_b["n_tokens"] > 0
    for (acts_a, prov_a), (acts_b, prov_b) in zip(shards_a, shards_b, strict=True):
        assert torch.equal(prov_a, prov_b)
        assert torch.equal(acts_a, acts_b)


def test_stop_signal_saves_the_shard_and_exits_resumable(env, tmp_path):
    """SIGUSR1 (SLURM's warning before a time limit) ends the run after the current shard with exit code 75."""
    run = ActivationRun(Store(tmp_path / "store"), "stopped")
    proc = start(env, "stopped")
    wait_for_shards(run, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped:" in err and "--run_id stopped" in err
    assert run.status() != "complete" and 1 <= len(run.completed_shards()) < 20
    assert not list(run.dir.glob(".tmp*")), "the writer is flushed before the exit: no shard is left half-written"
    assert len(list((run.dir / "timing").glob("*.json"))) == 1, "the stopped process leaves its time report"
    finished = run_script("01_save_activations.py", env, "--run_id", "stopped")
    assert finished.returncode == 0, finished.stderr
    assert run.status() == "complete"

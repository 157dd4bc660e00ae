"""A killed and resumed streaming sweep (STREAM=1) ends with the SAEs of the uninterrupted one: the real script, real
signals, the tiny model forwarded at every epoch.

As in test_train_resume.py: ``02_train_sae.py`` runs as a subprocess, is killed (SIGKILL) right after a committed
checkpoint of its first epoch, resumed and stopped (SIGUSR1, exit 75) mid-way through a later epoch, then resumed to
the end. Shuffle groups of a few shards make the resumes start inside a group (forwarded again) after groups that
are skipped without a forward. Every tensor of every model.pt and every history must equal the in-process reference.
"""

from __future__ import annotations

import json
import signal

import torch

from sae_pipeline.settings import StreamSettings
from sae_pipeline.steps.stream import stream_sae
from sae_pipeline.store.runs import RUN_ID_FILE, SAE_RUN_ID_FILE, Store
from sae_pipeline.store.training import training_runs
from tests.e2e.test_train_resume import _committed, _kill, _resumed_at, _start, _wait_for_commit, assert_same_training
from tests.helpers import SAMPLE, run_script, train_env

SETTINGS = dict(
    STREAM="1",
    HF_DATASET=str(SAMPLE),
    DATA_LIMIT="300",
    MAX_LENGTH="32",
    BATCH_SIZE_SAVE="16",
    DOCS_PER_SHARD="30",
    STREAM_BUFFER_TOKENS="2000",  # about three shards a group: several groups an epoch
    LAYER_NUM="1,2",
    TOP_K="4,8",
    N_LATENTS_MULTIPLIER="2",
    DEVICE="cpu",
    EPOCHS="3",
    BATCH_SIZE_TRAIN="96",  # 8,321 training tokens an epoch: a last batch of 65 (one token would give FVU inf)
    LR="2e-3",
    CHECKPOINT_EVERY_STEPS="20",
    LOG_EVERY_STEPS="10",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
)


def _reference(tiny_model, store, sae_run_id: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values = {k.lower(): v for k, v in SETTINGS.items() if not k.endswith("_OFFLINE")}
        return stream_sae(StreamSettings(model_id=str(tiny_model), store_dir=store, **values), sae_run_id)
    finally:
        torch.set_num_threads(threads)


def test_a_killed_then_stopped_streaming_sweep_ends_with_the_uninterrupted_saes(tiny_model, tmp_path):
    env = train_env(tmp_path, SETTINGS, MODEL_ID=str(tiny_model))
    commit = tmp_path / "runs" / "st" / "checkpoint.json"

    # 1. SIGKILL in epoch 1, right after the second checkpoint
    proc = _start(env, "st")
    first = _wait_for_commit(proc, commit, lambda r: r["step"] >= 40)
    _kill(proc)
    assert len(first["members"]) == 4 and first["epoch"] == 0

    # 2. resumed, then SIGUSR1 mid-way through epoch 2: a checkpoint at the current step and exit 75
    proc = _start(env, "st")
    _wait_for_commit(proc, commit, lambda r: r["epoch"] >= 1 and r["step_in_epoch"] > 0)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert _resumed_at(err) >= first["step"] and "stopped by SIGUSR1" in err
    stopped = _committed(commit)
    assert stopped["epoch"] >= 1 and stopped["step_in_epoch"] > 0

    # 3. resumed to the end
    done = run_script("02_train_sae.py", env, "--sae_run_id", "st")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resumed_at(done.stderr) == stopped["step"]
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "st" and not (tmp_path / RUN_ID_FILE).exists()
    assert not commit.exists()

    _reference(tiny_model, tmp_path, "ref")
    got, want = training_runs(Store(tmp_path), "st"), training_runs(Store(tmp_path), "ref")
    assert [r.run_id.removeprefix("st.") for r in got] == [r.run_id.removeprefix("ref.") for r in want]
    for a, b in zip(got, want):
        assert json.loads((a.dir / "meta.json").read_text())["status"] == "complete"
        assert_same_training(a.dir, b.dir)

"""A full, read-only or unwritable filesystem through the real scripts: one `error:` line naming the file, the free
space and the command that resumes; a non-zero exit; no traceback; what was complete stays intact; and once space
is freed the printed command finishes the step.

The filesystems are real (tests.helpers: a small tmpfs, a read-only bind mount, the immutable attribute), mounted
where the step writes: STORE_DIR for capture, the training run's folder for checkpoints, its evaluation/ folder for
step 3. One normal capture and training per module feed the step 2 and 3 cases.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store
from tests.helpers import immutable, pipeline_env, read_only, resize, run_script, small_filesystem

STEP1, STEP2, STEP3 = "01_save_activations.py", "02_train_sae.py", "03_evaluate_sae.py"


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 74, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-5000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """(env, store): a complete capture 'acts' and a finished training run 'sae' on an ordinary disk."""
    store = tmp_path_factory.mktemp("storage") / "store"
    env = {**pipeline_env(tiny_model), "STORE_DIR": str(store), "EVAL_LIMIT": "16", "BROWSER_LATENTS": "8"}
    for script, args in ((STEP1, ("--run_id", "acts")), (STEP2, ("--run_id", "acts", "--sae_run_id", "sae"))):
        res = run_script(script, env, *args)
        assert res.returncode == 0, f"{script}: {res.stderr[-3000:]}"
    return env, store


def test_capture_on_a_full_disk_keeps_its_shards_and_resumes(pipeline_env, tmp_path):
    """Refused up front when the disk is smaller than the estimate; stopped mid-run when it fills up anyway (here:
    the estimate counts the data, and tmpfs rounds each of the 30 shards' three files up to 4 KiB pages)."""
    env = {**pipeline_env, "DATA_LIMIT": "60", "DOCS_PER_SHARD": "2"}  # about 235 KB of data, about 480 KB on disk
    with small_filesystem(tmp_path / "store", "160k") as disk:
        run = ActivationRun(Store(disk), "full1")
        res = run_script(STEP1, env, "--run_id", "full1")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert (
            res.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: STORE_DIR={str(disk)!r} has 160.0 KiB free, but this capture needs about ")
        )
        assert not run.dir.exists()

        resize(disk, "320k")
        res = run_script(STEP1, env, "--run_id", "full1")
        line = _error_line(res)
        done = sorted(run.completed_shards())
        assert 1 <= len(done) < 30 and done == list(range(len(done)))
        failed = run.shard_dir(len(done))
        assert line.startswith(f"error: cannot write {failed}: No space left on device (ENOSPC); ")
        assert f"free of 320.0 KiB on {disk}: free space there" in line
        assert line.endswith(
            "then rerun `uv run python 01_save_activations.py --run_id full1` "
            "(it keeps the complete shards and captures the rest)"
        )
        assert sorted(p.name for p in run.dir.iterdir()) == sorted(["meta.json", *(f"batch_{i}" for i in done)])
        kept = _files(run.dir)

        resize(disk, "4m")
        res = run_script(STEP1, env, "--run_id", "full1")
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resuming run 'full1': {len(done)} of 30 shards already on disk" in res.stderr
        meta = ActivationRun(Store(disk), "full1").open()
        assert meta["n_shards"] == 30 and (disk / "run_id.txt").read_text().strip() == "full1"
        now = _files(run.dir)
        assert all(now[name] == digest for name, digest in kept.items() if name.startswith("batch_"))


def test_training_on_a_full_disk_keeps_its_last_checkpoint_and_resumes(trained):
    env, store = trained
    env = {**env, "CHECKPOINT_EVERY_STEPS": "3"}  # a checkpoint is about 215 KB; the next one is written beside it
    with small_filesystem(store / "runs" / "sae_full", "300k") as out:
        res = run_script(STEP2, env, "--run_id", "acts", "--sae_run_id", "sae_full")
        line = _error_line(res)
        assert line.startswith(f"error: cannot write {out / 'checkpoint_6.pt'}: No space left on device (ENOSPC); ")
        assert line.endswith(
            "then rerun `uv run python 02_train_sae.py --sae_run_id sae_full` (it continues from the last checkpoint)"
        )
        assert sorted(p.name for p in out.iterdir()) == [
            "checkpoint.json",
            "checkpoint_3.pt",
            "meta.json",
        ]  # no temporary
        assert json.loads((out / "meta.json").read_text())["status"] == "running"

        resize(out, "4m")
        res = run_script(STEP2, env, "--run_id", "acts", "--sae_run_id", "sae_full")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resumed from step 3" in res.stderr  # the first checkpoint survived the failed second one
        assert (out / "model.pt").is_file() and not list(out.glob("checkpoint*"))


# EROFS: a read-only bind mount; EPERM: the immutable attribute, which stops root too (chmod does not)
REFUSING = {
    "read-only": (read_only, "Read-only file system (EROFS); {out} is mounted read-only: remount it writable"),
    "immutable": (immutable, "Operation not permitted (EPERM); no permission to write in {out}: fix its permissions"),
}


@pytest.mark.parametrize("kind", REFUSING)
def test_training_into_a_folder_that_refuses_writes(trained, kind):
    env, store = trained
    refuse, expected = REFUSING[kind]
    out = store / "runs" / f"sae_{kind}"
    out.mkdir()
    with refuse(out):
        res = run_script(STEP2, env, "--run_id", "acts", "--sae_run_id", out.name)
    line = _error_line(res)
    assert line.startswith(f"error: cannot write {out}/") and expected.format(out=out) in line
    assert list(out.iterdir()) == []


def test_evaluation_on_a_full_disk_writes_no_metrics_and_reruns(trained):
    env, store = trained
    with small_filesystem(store / "runs" / "sae" / "evaluation", "32k") as out:
        res = run_script(STEP3, env, "--sae_run_id", "sae")
        line = _error_line(res)
        assert f"{out}/" in line and "No space left on device (ENOSPC)" in line
        assert line.endswith(
            "then rerun `uv run python 03_evaluate_sae.py --sae_run_id sae` "
            "(the trained SAE is untouched; evaluation starts over)"
        )
        assert not (out / "metrics.json").exists()  # written last: its presence means a complete evaluation
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left

        resize(out, "4m")
        res = run_script(STEP3, env, "--sae_run_id", "sae")
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out / "metrics.json").is_file() and (out / "feature_browser.html").is_file()

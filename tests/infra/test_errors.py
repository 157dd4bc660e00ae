"""errors.py: a filesystem that refuses a write (full, read-only, no permission, gone) becomes one line that names
the file, the reason, the free space and what to do; anything else stays a traceback. Writes go to real small
filesystems (tests.helpers.small_filesystem), so the errors are the ones torch and safetensors really raise."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import sae_pipeline.store.files as store_mod
from sae_pipeline.cli import CAPTURE_RESUME, TRAIN_RESUME, exit_on_error
from sae_pipeline.infra.errors import PipelineError, StorageError, os_error_of, storage_error
from sae_pipeline.sae.model import PipelineSae
from sae_pipeline.store.files import atomic_save_tensors, atomic_torch_save, atomic_write_json, read_json
from tests.helpers import small_filesystem

BIG = torch.zeros(256, 1024)  # 1 MiB: more than the small filesystems below hold


@pytest.fixture
def full_disk(tmp_path):
    with small_filesystem(tmp_path / "disk", "256k") as disk:
        yield disk


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_torch_and_safetensors_errors_lead_back_to_the_os_error(full_disk):
    """torch.save raises RuntimeError('unexpected pos ...') and safetensors a SafetensorError with a text: both
    are traced back to ENOSPC."""
    with pytest.raises(Exception) as torch_info, open(full_disk / "a.pt", "wb") as f:
        torch.save({"t": BIG}, f)
    assert type(torch_info.value) is RuntimeError
    from safetensors.torch import save_file

    with pytest.raises(Exception) as st_info:
        save_file({"t": BIG}, str(full_disk / "a.safetensors"))
    for exc in (torch_info.value, st_info.value):
        assert os_error_of(exc).errno == errno.ENOSPC


@pytest.mark.parametrize("writer", ["tensors", "torch", "json"])
def test_a_full_disk_names_the_file_and_the_free_space_and_keeps_the_old_file(full_disk, writer):
    target = full_disk / {"tensors": "w.safetensors", "torch": "checkpoint.pt", "json": "meta.json"}[writer]
    atomic_write_json(target, {"old": True})
    with pytest.raises(StorageError) as info:
        if writer == "tensors":
            atomic_save_tensors(target, {"t": BIG})
        elif writer == "torch":
            atomic_torch_save({"t": BIG}, target)
        else:
            atomic_write_json(target, {"x": "y" * 2_000_000})
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: No space left on device (ENOSPC); ")
    assert f"free of 256.0 KiB on {full_disk}: free space there" in message and "\n" not in message
    assert info.value.exit_code == 74  # not 75: the sbatch wrappers would requeue a job onto a full disk
    assert _files(full_disk) == [target.name]  # no temporary left behind
    assert read_json(target) == {"old": True}  # the previous version is intact


def test_model_save_on_a_full_disk(full_disk):
    sae = PipelineSae(4096, 64, 4)
    with pytest.raises(StorageError, match=r"model\.pt: No space left on device"):
        sae.save("model", full_disk)
    assert _files(full_disk) == []


def test_no_permission_is_named(tmp_path_factory):
    """A real EACCES: the write runs with an unprivileged effective uid (root ignores file modes)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch the effective uid")
    top = Path(tempfile.mkdtemp(prefix="sae_eacces_"))
    top.chmod(0o755)
    locked = top / "locked"
    locked.mkdir(mode=0o555)
    os.seteuid(65534)
    try:
        with pytest.raises(StorageError) as info:
            atomic_write_json(locked / "meta.json", {"a": 1})
    finally:
        os.seteuid(0)
    assert str(info.value) == (
        f"cannot write {locked / 'meta.json'}: Permission denied (EACCES); no permission to write in {locked}: "
        "fix its permissions or set STORE_DIR to a folder you own"
    )
    assert _files(locked) == []


def test_a_vanished_mount_is_not_probed_and_leaves_nothing(tmp_path, monkeypatch):
    """ESTALE (a lost NFS server) cannot be made here: the rename is made to fail with it."""
    target = tmp_path / "runs" / "sae_1" / "history.json"

    def stale(src, dst):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    monkeypatch.setattr(store_mod.os, "replace", stale)
    monkeypatch.setattr(shutil, "disk_usage", None)  # a hard NFS mount can hang on statfs: never called
    with pytest.raises(StorageError) as info:
        atomic_write_json(target, {})
    assert "(ESTALE); the filesystem did not answer (a lost network mount?)" in str(info.value)
    assert info.value.run_id == "sae_1"
    assert _files(target.parent) == []


def test_other_errors_stay_errors():
    assert storage_error(ValueError("a bug")) is None
    assert storage_error(FileNotFoundError(errno.ENOENT, "gone")) is None  # missing inputs have their own messages
    assert storage_error(RuntimeError("unexpected pos 1 vs 2")) is None  # no OS error behind it
    try:  # a message the code chose stays that message, whatever OS error it was raised while handling
        try:
            raise OSError(errno.EIO, "I/O error")
        except OSError:
            raise PipelineError("shard 3 is corrupted") from None
    except PipelineError as exc:
        assert storage_error(exc) is None


def test_run_id_of_the_failed_path():
    assert StorageError("/s/runs/act_1/batch_3", OSError(errno.ENOSPC, "x")).run_id == "act_1"
    assert StorageError("/data/runs/store/runs/sae_2/checkpoint.pt", OSError(errno.ENOSPC, "x")).run_id == "sae_2"
    assert StorageError("/s/runs/.write_probe.x", OSError(errno.ENOSPC, "x")).run_id is None
    assert StorageError("/s/run_id.txt", OSError(errno.ENOSPC, "x")).run_id is None


def test_the_script_prints_one_line_with_the_command_that_resumes(full_disk, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["01_save_activations.py"])
    shard = full_disk / "runs" / "act_x" / "batch_3"
    with pytest.raises(SystemExit) as info:
        exit_on_error(lambda: atomic_save_tensors(shard / "a.safetensors", {"t": BIG}), CAPTURE_RESUME)
    err = capsys.readouterr().err
    assert info.value.code == 74 and err.count("\n") == 1
    assert err.startswith(f"error: cannot write {shard / 'a.safetensors'}: No space left on device (ENOSPC); ")
    assert err.endswith(
        "; then rerun `uv run python 01_save_activations.py --run_id act_x` "
        "(it keeps the complete shards and captures the rest)\n"
    )


def test_a_library_write_on_a_full_disk_is_one_line_too(full_disk, capsys, monkeypatch):
    """Python's write() errors name no file: the line says where to look instead of a wrong free-space figure."""
    monkeypatch.setattr("sys.argv", ["02_train_sae.py"])

    def library_write():
        with open(full_disk / "cache.bin", "wb") as f:
            f.write(b"\0" * 2**20)

    with pytest.raises(SystemExit) as info:
        exit_on_error(library_write, TRAIN_RESUME)
    assert info.value.code == 74
    assert capsys.readouterr().err == (
        "error: cannot write: No space left on device (ENOSPC); check the free space and permissions of STORE_DIR, "
        "TMPDIR and HF_HOME (`df -h`); then rerun the same command with the same --sae_run_id (it continues from "
        "the last checkpoint)\n"
    )


def test_a_bug_still_shows_its_traceback():
    def bug():
        raise KeyError("x")

    with pytest.raises(KeyError):
        exit_on_error(bug, CAPTURE_RESUME)

"""store.py: run ids that stay inside the store, atomic files and shards, pointers, and mi_crow reading our runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import sae_pipeline.store.activations as store_mod
from sae_pipeline.infra.errors import PipelineError, StorageError
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.files import atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json
from sae_pipeline.store.runs import META_FILE, RUN_ID_FILE, SAE_RUN_ID_FILE, Store, new_run_id, validate_run_id
from sae_pipeline.store.training import Sweep, TrainingRun, training_runs

LAYER = "llamaforcausallm_model_layers_2_post_attention_layernorm"
D = 8


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _shard_tensors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, D, generator=g).to(torch.bfloat16)
    prov = torch.stack([torch.arange(n) // 4, torch.arange(n) % 4 + 1, torch.randint(3, 500, (n,), generator=g)], 1)
    return acts, prov.to(torch.int32)


def _write_run(store: Store, run_id: str, shard_sizes=(5, 7, 3), complete: bool = True) -> ActivationRun:
    """A small activation run written through the store's own API, as capture writes it."""
    run = ActivationRun(store, run_id)
    run.write_meta(
        {
            "kind": "activations",
            "status": "capturing",
            "run_id": run_id,
            "layer_signature": LAYER,
            "d_model": D,
            "n_shards": len(shard_sizes),
        }
    )
    for i, n in enumerate(shard_sizes):
        acts, prov = _shard_tensors(n, seed=i)
        run.write_shard(i, {LAYER: acts}, prov, {"index": i, "n_tokens": n, "n_empty": 0})
    if complete:
        meta = run.read_meta()
        meta.update(status="complete", n_tokens=sum(shard_sizes))
        run.write_meta(meta)
        store.write_pointer(run_id)
    return run


# ---------------------------------------------------------------------------------------------------- run ids


@pytest.mark.parametrize(
    "bad",
    ["../escape", "a/b", ".", "..", "", "x" * 129, "/abs", "..\\x", ".hidden", "-dash", "a b", "a\nb", "ok/../.."]
    + ["ü"],
)
def test_bad_run_ids_are_rejected(bad):
    with pytest.raises(PipelineError) as info:
        validate_run_id(bad)
    assert "--run_id" in str(info.value) and "\n" not in str(info.value)


def test_rejection_names_the_source():
    with pytest.raises(PipelineError, match=r"^RUN_ID='\.\./x'"):
        validate_run_id("../x", what="RUN_ID")


@pytest.mark.parametrize("good", ["act_20250101_120000_abcdef", "run1", "A.b-c_d", "x" * 128, "0", "my.run.v2"])
def test_normal_run_ids_are_accepted(good):
    assert validate_run_id(good) == good


def test_run_dir_stays_inside_runs(tmp_path):
    store = Store(tmp_path)
    assert store.run_dir("abc") == tmp_path / "runs" / "abc"
    with pytest.raises(PipelineError):
        store.run_dir("../abc")


def test_new_run_ids_are_valid_and_unique():
    ids = {new_run_id("act") for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert validate_run_id(i).startswith("act_")


# ---------------------------------------------------------------------------------------------------- atomic files


def test_atomic_writes_leave_no_temporaries(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello\n")
    atomic_write_text(tmp_path / "a.txt", "again\n")  # replacing an existing file
    atomic_write_json(tmp_path / "sub" / "b.json", {"ł": 1})
    atomic_save_tensors(tmp_path / "c.safetensors", {"t": torch.arange(6).view(2, 3)}, metadata={"k": "v"})
    assert _tree(tmp_path) == ["a.txt", "c.safetensors", "sub", "sub/b.json"]
    assert (tmp_path / "a.txt").read_text() == "again\n"
    assert read_json(tmp_path / "sub" / "b.json") == {"ł": 1}
    assert torch.equal(load_tensors(tmp_path / "c.safetensors")["t"], torch.arange(6).view(2, 3))


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"v": 1})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", broken_replace)
    with pytest.raises(StorageError, match=f"cannot write {target}: No space left on device"):
        atomic_write_json(target, {"v": 2})
    with pytest.raises(StorageError, match="t.safetensors"):
        atomic_save_tensors(tmp_path / "t.safetensors", {"t": torch.zeros(2)})
    assert _tree(tmp_path) == ["meta.json"]
    assert read_json(target) == {"v": 1}


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(PipelineError, match=str(tmp_path / "nope.json")):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PipelineError, match="bad.json.*not valid JSON"):
        read_json(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------------- pointers


def test_pointer_round_trip(tmp_path):
    store = Store(tmp_path)
    _write_run(store, "r1")
    assert (tmp_path / RUN_ID_FILE).read_text() == "r1\n"
    assert store.read_pointer() == "r1"
    store.write_pointer("r1", SAE_RUN_ID_FILE)
    assert store.read_pointer(SAE_RUN_ID_FILE) == "r1"


def test_pointer_missing(tmp_path):
    with pytest.raises(PipelineError, match=rf"{RUN_ID_FILE} not found"):
        Store(tmp_path).read_pointer()


@pytest.mark.parametrize("content", ["", "\n", "   \n"])
def test_pointer_empty(tmp_path, content):
    (tmp_path / RUN_ID_FILE).write_text(content)
    with pytest.raises(PipelineError, match=rf"{RUN_ID_FILE} is empty"):
        Store(tmp_path).read_pointer()


def test_pointer_names_a_missing_run(tmp_path):
    (tmp_path / RUN_ID_FILE).write_text("ghost\n")
    with pytest.raises(PipelineError) as info:
        Store(tmp_path).read_pointer()
    assert "'ghost'" in str(info.value) and str(tmp_path / "runs" / "ghost") in str(info.value)


@pytest.mark.parametrize("content", ["../escape", "a/b", ".."])
def test_pointer_with_invalid_id_names_the_file(tmp_path, content):
    (tmp_path / "runs").mkdir()
    (tmp_path / RUN_ID_FILE).write_text(content + "\n")
    with pytest.raises(PipelineError) as info:
        Store(tmp_path).read_pointer()
    assert str(tmp_path / RUN_ID_FILE) in str(info.value) and "not a valid run id" in str(info.value)


# ---------------------------------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    store = Store(tmp_path)
    run = _write_run(store, "r", shard_sizes=(5, 0, 9))
    assert run.completed_shards() == {0, 1, 2}
    for i, n in enumerate((5, 0, 9)):
        acts, prov = run.read_shard(i, LAYER)
        want_acts, want_prov = _shard_tensors(n, seed=i)
        assert acts.dtype == torch.bfloat16 and torch.equal(acts, want_acts)
        assert prov.dtype == torch.int32 and torch.equal(prov, want_prov)
        assert run.shard_info(i) == {"index": i, "n_tokens": n, "n_empty": 0}
    assert [i for i, _, _ in run.iter_shards(LAYER)] == [0, 1, 2]
    meta = json.loads((run.shard_dir(2) / "metadata.json").read_text())
    assert meta[LAYER]["activations_shape"] == [9, D]
    assert not list(run.dir.glob(".tmp*"))


def test_shard_write_returns_its_size(tmp_path):
    run = ActivationRun(Store(tmp_path), "r")
    acts, prov = _shard_tensors(10)
    size = run.write_shard(0, {LAYER: acts}, prov, {})
    assert size == sum(f.stat().st_size for f in run.shard_dir(0).rglob("*") if f.is_file())
    assert size >= 10 * D * 2 + 10 * 3 * 4


def test_shard_appears_only_complete(tmp_path, monkeypatch):
    """A failure after the first file is written leaves neither batch_0 nor any temporary behind."""
    store = Store(tmp_path)
    run = ActivationRun(store, "r")
    run.write_meta({"kind": "activations", "status": "capturing"})
    real_save = store_mod.save_file
    calls = []

    def flaky_save(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(store_mod, "save_file", flaky_save)
    acts, prov = _shard_tensors(6)
    with pytest.raises(StorageError, match=f"cannot write {run.shard_dir(0)}: No space"):
        run.write_shard(0, {LAYER: acts}, prov, {})
    assert len(calls) == 2
    assert Path(calls[0]).parent.parent != run.shard_dir(0)  # the first file went to a temporary folder
    assert _tree(run.dir) == [META_FILE]
    assert run.completed_shards() == set()

    monkeypatch.setattr(store_mod, "save_file", real_save)
    run.write_shard(0, {LAYER: acts}, prov, {})  # the retry succeeds
    assert run.completed_shards() == {0}
    assert torch.equal(run.read_shard(0, LAYER)[0], acts)


def test_stale_temporaries_are_not_shards_and_are_removed(tmp_path):
    run = _write_run(Store(tmp_path), "r", shard_sizes=(3,), complete=False)
    (run.dir / ".tmp_batch_1_123_ab" / LAYER).mkdir(parents=True)
    (run.dir / "batch_x").mkdir()  # not a shard index
    assert run.completed_shards() == {0}
    run.remove_stale_temporaries()
    assert not list(run.dir.glob(".tmp_batch_*"))
    assert run.completed_shards() == {0}


def test_an_array_task_removes_only_its_own_temporaries(tmp_path):
    run = _write_run(Store(tmp_path), "r", shard_sizes=(3,), complete=False)
    for name in (".tmp_batch_1_123_ab", ".tmp_batch_2_456_cd"):
        (run.dir / name).mkdir()
    run.remove_stale_temporaries({1, 3})
    assert [p.name for p in run.dir.glob(".tmp_batch_*")] == [".tmp_batch_2_456_cd"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_shard_names_the_file(tmp_path, damage):
    run = _write_run(Store(tmp_path), "r", shard_sizes=(16,))
    path = run.shard_dir(0) / LAYER / "activations.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00\xffnot a safetensors file" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(PipelineError) as info:
        run.read_shard(0, LAYER)
    assert str(path) in str(info.value) and "corrupted" in str(info.value)


def test_missing_shard_file_names_the_file(tmp_path):
    run = _write_run(Store(tmp_path), "r", shard_sizes=(4,))
    path = run.shard_dir(0) / "tokens" / "provenance.safetensors"
    path.unlink()
    with pytest.raises(PipelineError) as info:
        run.read_shard(0, LAYER)
    assert str(path) in str(info.value)


def test_shard_with_mismatched_shapes_is_refused(tmp_path):
    """Rows of every layer and of the provenance go together: refused when written, and when a file was replaced."""
    run = ActivationRun(Store(tmp_path), "r")
    acts, _ = _shard_tensors(5)
    _, prov = _shard_tensors(4)
    with pytest.raises(ValueError, match="5 rows for 4 provenance rows"):
        run.write_shard(0, {LAYER: acts}, prov, {})
    assert run.completed_shards() == set()
    run.write_shard(0, {LAYER: acts[:4]}, prov, {})
    atomic_save_tensors(run.shard_dir(0) / LAYER / "activations.safetensors", {"tensor": acts})
    with pytest.raises(PipelineError, match="unexpected shapes"):
        run.read_shard(0, LAYER)


def test_a_shard_holds_every_layer_row_for_row(tmp_path):
    """Several layers in one shard: one file each, one provenance, metadata naming each; mi_crow reads each."""
    from mi_crow.store.local_store import LocalStore
    from mi_crow.store.store_dataloader import StoreDataloader

    other = "llamaforcausallm_model_layers_3_post_attention_layernorm"
    run = ActivationRun(Store(tmp_path), "r")
    acts, prov = _shard_tensors(6)
    wide = torch.randn(6, 2 * D).to(torch.float32)
    run.write_shard(0, {LAYER: acts, other: wide}, prov, {"index": 0})
    assert torch.equal(run.read_shard(0, LAYER)[0], acts) and torch.equal(run.read_shard(0, other)[0], wide)
    assert torch.equal(run.read_shard(0, other)[1], prov)
    meta = json.loads((run.shard_dir(0) / "metadata.json").read_text())
    assert meta[LAYER]["activations_shape"] == [6, D] and meta[other]["activations_shape"] == [6, 2 * D]
    loader = StoreDataloader(LocalStore(base_path=tmp_path), "r", other, batch_size=4, dtype=torch.float32)
    assert torch.equal(torch.cat(list(loader)), wide)


def test_bytes_per_token_counts_every_layer_and_the_provenance():
    layers = [LayerSpec(LAYER, 1536), LayerSpec("x", 512)]
    assert ActivationRun.bytes_per_token(layers, "bfloat16") == (1536 + 512) * 2 + 12
    assert ActivationRun.bytes_per_token(layers[:1], "float32") == 1536 * 4 + 12


# ---------------------------------------------------------------------------------------------------- mi_crow


def test_mi_crow_store_dataloader_reads_our_run(tmp_path):
    from mi_crow.store.local_store import LocalStore
    from mi_crow.store.store_dataloader import StoreDataloader

    sizes = (5, 7, 3)
    _write_run(Store(tmp_path), "r", shard_sizes=sizes)
    mc = LocalStore(base_path=tmp_path)
    assert sorted(mc.list_run_batches("r")) == [0, 1, 2]
    loader = StoreDataloader(mc, "r", LAYER, key="activations", batch_size=4, dtype=torch.float32)
    got = torch.cat(list(loader))
    ours = torch.cat([a for _, a, _ in ActivationRun(Store(tmp_path), "r").iter_shards(LAYER)]).float()
    assert got.shape == (sum(sizes), D)
    # mi_crow orders batches its own way; every token must be there exactly once
    assert torch.equal(got[got[:, 0].argsort()], ours[ours[:, 0].argsort()])
    assert torch.cat(list(loader)).shape == got.shape  # re-iterable, as overcomplete's trainer needs
    assert mc.get_run_metadata("r")["run_id"] == "r"


# ---------------------------------------------------------------------------------------------------- writability


def test_ensure_writable_creates_runs(tmp_path):
    store = Store(tmp_path / "new" / "store")
    store.ensure_writable()
    assert store.runs_dir.is_dir() and _tree(store.runs_dir) == []


def test_ensure_writable_under_a_file(tmp_path):
    """As root chmod does not stop writes; a path below a regular file cannot be created by anyone."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    root = blocker / "store"
    with pytest.raises(PipelineError) as info:
        Store(root).ensure_writable()
    msg = str(info.value)
    assert msg.startswith(f"STORE_DIR={str(root)!r} is not writable") and "\n" not in msg
    assert blocker.read_text() == "not a folder\n"


def test_ensure_writable_on_a_read_only_folder(tmp_path):
    """A folder nobody may write: chmod for ordinary users, the immutable attribute for root."""
    import subprocess

    store = Store(tmp_path / "store")
    store.runs_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(store.runs_dir)], check=True)
    else:
        store.runs_dir.chmod(0o500)
    try:
        with pytest.raises(PipelineError, match=r"^STORE_DIR=.* is not writable"):
            store.ensure_writable()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(store.runs_dir)], check=True)
        else:
            store.runs_dir.chmod(0o700)
    assert _tree(store.runs_dir) == []


# ---------------------------------------------------------------------------------------------------- complete runs


def test_open_complete_run(tmp_path):
    store = Store(tmp_path)
    _write_run(store, "r", shard_sizes=(2, 3))
    run = ActivationRun(store, "r")
    meta = run.open()
    assert run.dir == tmp_path / "runs" / "r" and meta["n_tokens"] == 5 and run.status() == "complete"


def test_open_incomplete_run_says_how_to_resume(tmp_path):
    store = Store(tmp_path)
    run = _write_run(store, "part", shard_sizes=(2, 3, 4), complete=False)
    meta = run.read_meta()
    (run.shard_dir(2) / LAYER / "activations.safetensors").unlink()
    os.rename(run.shard_dir(2), run.dir / ".tmp_batch_2_1_aa")  # as a killed writer leaves it
    with pytest.raises(PipelineError) as info:
        ActivationRun(store, "part").open()
    msg = str(info.value)
    assert "01_save_activations.py --run_id part" in msg and "2/3" in msg
    assert meta["status"] == "capturing" and run.status() != "complete"


def test_open_missing_or_foreign_run(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(PipelineError, match="'ghost' not found"):
        ActivationRun(store, "ghost").open()
    atomic_write_json(store.run_dir("sae1") / META_FILE, {"kind": "sae", "status": "complete"})
    with pytest.raises(PipelineError, match="not an activation run"):
        ActivationRun(store, "sae1").open()
    store.run_dir("bare").mkdir()
    with pytest.raises(PipelineError, match="has no meta.json: it is not an activation run"):
        ActivationRun(store, "bare").open()
    with pytest.raises(PipelineError, match="not a valid run id"):
        ActivationRun(store, "../x").open()


# ---------------------------------------------------------------------------------------------------- training runs


def test_training_run_status_and_foreign_folders(tmp_path):
    store = Store(tmp_path)
    run = TrainingRun(store, "sae_x")
    assert run.status() is None  # nothing there
    run.dir.mkdir(parents=True)
    run.checkpoint_path(5).write_bytes(b"x")  # a kill before the first commit leaves only checkpoints
    assert run.status() is None
    run.write_meta({"status": "running"})
    assert run.status() == "running" and run.read_meta()["kind"] == "sae"
    (run.dir / "notes.txt").write_text("mine")
    run.meta_path.unlink()
    with pytest.raises(PipelineError, match=r"'sae_x': .* exists and is not a training run"):
        run.status()
    _write_run(store, "acts")
    with pytest.raises(PipelineError, match="holds a run of kind 'activations'"):
        TrainingRun(store, "acts").status()


def test_checkpoints_of_other_steps_and_temporaries_are_removed(tmp_path):
    run = TrainingRun(Store(tmp_path), "r")
    run.dir.mkdir(parents=True)
    for step in (10, 20, 30):
        run.checkpoint_path(step).write_bytes(b"x")
    (run.dir / ".checkpoint_40.pt.abc.tmp").write_bytes(b"half")
    assert run.checkpoint_steps() == [10, 20, 30]
    run.remove_checkpoints(keep=20)
    assert sorted(p.name for p in run.dir.iterdir()) == ["checkpoint_20.pt"]
    run.remove_checkpoints()
    assert list(run.dir.iterdir()) == []


def test_a_sweep_lists_its_members_and_names_its_commit_files(tmp_path):
    store = Store(tmp_path)
    sweep = Sweep(store, "sw")
    assert not sweep.exists() and training_runs(store, "sw")[0].run_id == "sw"  # not a sweep: the run
    sweep.write_meta({"status": "running", "members": [{"sae_run_id": "sw.a"}, {"sae_run_id": "sw.b"}]})
    assert [r.run_id for r in sweep.members()] == ["sw.a", "sw.b"]
    assert [r.run_id for r in training_runs(store, "sw")] == ["sw.a", "sw.b"]
    assert sweep.commit().path.name == "checkpoint.json"
    assert sweep.commit(1, 4).path.name == "checkpoint.task1of4.json"
    sweep.commit(1, 4).write({"step": 3, "members": ["sw.b"]})
    assert [c.read()["step"] for c in sweep.commits()] == [3]
    (sweep.dir / "sweep.json").write_text('{"kind": "sae", "status": "complete"}')
    with pytest.raises(PipelineError, match="holds a run of kind 'sae', not a sweep"):
        sweep.status()

"""The store on disk: run folders, pointers, manifests and shards, every file written atomically.

Layout (mi_crow's ``LocalStore`` layout, so ``mi_crow.store.StoreDataloader`` reads our activation runs)::

    STORE_DIR/run_id.txt                      last complete activation run
    STORE_DIR/sae_run_id.txt                  last finished training run
    STORE_DIR/runs/<run_id>/meta.json         manifest: mi_crow's run keys plus everything needed without the model
    STORE_DIR/runs/<run_id>/batch_<i>/metadata.json
    STORE_DIR/runs/<run_id>/batch_<i>/<layer_signature>/activations.safetensors   {"tensor": [n_tokens, d_model]}
    STORE_DIR/runs/<run_id>/batch_<i>/tokens/provenance.safetensors              {"tensor": int32 [n_tokens, 3]}
    STORE_DIR/runs/<run_id>/timing/<time>_<host>_<pid>_<random>.json   where each capture process spent its time
    STORE_DIR/runs/<sae_run_id>/              one SAE: TrainingRun (meta.json kind "sae", model.pt, saelens/, ...)
    STORE_DIR/runs/<sweep_id>/sweep.json      several SAEs: Sweep; each member a TrainingRun <sweep_id>.<suffix>/

A shard holds one activations file per captured layer, row for row with the provenance they share. It is built in a
hidden temporary folder and renamed into place, so ``batch_<i>`` exists only when complete. Provenance columns are
(document index, position in the tokenized document, token id).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_pipeline.errors import PipelineError, StorageError, storage_error, storage_errors

if TYPE_CHECKING:
    from sae_pipeline.settings import CaptureSettings

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_ID_FILE = "run_id.txt"
SAE_RUN_ID_FILE = "sae_run_id.txt"
META_FILE = "meta.json"
TIMING_DIR = "timing"
PROVENANCE_KEY = "tokens"
PROVENANCE_COLUMNS = ("doc_index", "position", "token_id")
FORMAT_VERSION = 2  # 2: per-layer entries under "layers" (1 had one "layer_signature" and "d_model")
BLOCK_INDEX = re.compile(r"_(?:layers|layer|h|blocks|block)_(\d+)(?:_|$)")
# Settings that change what an activation run contains: a resume must match them exactly.
RUN_DEFINING_KEYS = (
    "model_id",
    "layers",
    "hook_side",
    "model_dtype",
    "store_dtype",
    "keep_special_tokens",
    "max_length",
    "docs_per_shard",
    "dataset",
    "n_documents",
    "n_shards",
)


def validate_run_id(run_id: str, what: str = "--run_id") -> str:
    """Ids become folder names, so only plain names that stay inside ``runs/`` are accepted."""
    if not RUN_ID_PATTERN.match(run_id) or run_id in (".", ".."):
        raise PipelineError(
            f"{what}={run_id!r} is not a valid run id: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return run_id


def new_run_id(prefix: str) -> str:
    """Sortable by time and unique across concurrent jobs."""
    return f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, synced and renamed onto it when the block succeeds and removed when it
    fails, so a reader (or a run resumed after a kill) sees the old file or the new one, never half of one. A full
    disk or a refused write surfaces as a StorageError naming ``path``."""
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            _fsync(Path(tmp))  # a write the disk refuses late (delayed allocation, quotas) fails here, not later
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):  # a vanished mount must not hide the first error
                Path(tmp).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); the run may be corrupted") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A missing or corrupted file is named in the error, never skipped silently."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; the run is incomplete or was modified") from None
    except (SafetensorError, OSError, ValueError) as exc:
        unreadable = storage_error(exc, path, action="read")
        if unreadable is not None:
            raise unreadable from None
        raise PipelineError(f"{path} cannot be read ({exc}); the file is corrupted") from None


@dataclass(frozen=True)
class Store:
    """STORE_DIR: the pointers at its top and the run folders under ``runs/``."""

    root: Path

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / validate_run_id(run_id)

    def ensure_writable(self) -> None:
        """Fail before any work is done, naming STORE_DIR, rather than after hours of compute."""
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.runs_dir, prefix=".write_probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise StorageError(self.runs_dir, exc, subject=f"STORE_DIR={str(self.root)!r} is not writable") from None

    def read_pointer(self, name: str = RUN_ID_FILE) -> str:
        """The run id a previous step left in ``name``, checked to exist."""
        path = self.root / name
        if not path.is_file():
            raise PipelineError(f"{path} not found: run the previous step first, or pass the run id explicitly")
        run_id = path.read_text(encoding="utf-8").strip()
        if not run_id:
            raise PipelineError(f"{path} is empty: run the previous step again, or pass the run id explicitly")
        validate_run_id(run_id, what=str(path))
        if not self.run_dir(run_id).is_dir():
            raise PipelineError(f"{path} names run {run_id!r}, but {self.run_dir(run_id)} does not exist")
        return run_id

    def write_pointer(self, run_id: str, name: str = RUN_ID_FILE) -> None:
        atomic_write_text(self.root / name, run_id + "\n")


def block_index(signature: str) -> int | None:
    """The transformer block a hook name lies in (``..._layers_16_post_attention_layernorm`` -> 16), if any."""
    found = BLOCK_INDEX.search(signature)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class LayerSpec:
    """One hook point of an activation run: its mi_crow signature (the shard subfolder), the module's path in the
    Hugging Face model, its block index when it lies in a numbered block, and the width it produces."""

    signature: str
    d_model: int
    hf_module: str | None = None
    layer_num: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "hf_module": self.hf_module,
            "layer_num": self.layer_num,
            "d_model": self.d_model,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LayerSpec:
        return cls(str(obj["signature"]), int(obj["d_model"]), obj.get("hf_module"), obj.get("layer_num"))


class ActivationRun:
    """One activation run: its manifest and its shards."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.dir = store.run_dir(run_id)

    @property
    def meta_path(self) -> Path:
        return self.dir / META_FILE

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        if not self.dir.is_dir():
            raise PipelineError(f"activation run {self.run_id!r} not found: {self.dir} does not exist")
        return read_json(self.meta_path)

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.meta_path, meta)

    @staticmethod
    def layer_specs(meta: dict[str, Any]) -> list[LayerSpec]:
        """The hooked layers of a manifest, in capture order (format 1 manifests hold one, without hf_module)."""
        if "layers" in meta:
            return [LayerSpec.from_json(layer) for layer in meta["layers"]]
        sig = str(meta["layer_signature"])
        return [LayerSpec(sig, int(meta["d_model"]), None, meta.get("layer_num", block_index(sig)))]

    @staticmethod
    def new_manifest(
        settings: CaptureSettings,
        run_id: str,
        layers: list[LayerSpec],
        *,
        model_dtype: str,
        n_documents: int,
        n_layers: int | None,
        special_token_ids: list[int],
        prepend_bos: bool,
    ) -> dict[str, Any]:
        """The manifest of a new run (status "capturing"); the one builder, used by capture and by test fixtures."""
        return {
            "kind": "activations",
            "format_version": FORMAT_VERSION,
            "status": "capturing",
            "run_id": run_id,
            # mi_crow's own run keys, so its tools recognise the run
            "run_name": run_id,
            "model": settings.model_id,
            "layer_signatures": [layer.signature for layer in layers],
            "num_layers": n_layers,
            "options": {
                "dtype": settings.store_dtype,
                "max_length": settings.max_length,
                "batch_size": settings.batch_size_save,
                "stop_after_last_layer": True,
            },
            # ours: enough to use the run without the model
            "model_id": settings.model_id,
            "layers": [layer.to_json() for layer in layers],
            "hook_side": settings.hook_side,
            "model_dtype": model_dtype,
            "store_dtype": settings.store_dtype,
            "keep_special_tokens": settings.keep_special_tokens,
            "special_token_ids": special_token_ids,
            "prepend_bos": prepend_bos,
            "max_length": settings.max_length,
            "docs_per_shard": settings.docs_per_shard,
            "dataset": {
                "name": settings.hf_dataset,
                "split": settings.data_split,
                "text_field": settings.text_field,
                "limit": settings.data_limit,
                "shuffle": settings.data_shuffle,
                "shuffle_seed": settings.seed if settings.data_shuffle else None,
            },
            "n_documents": n_documents,
            "n_shards": -(-n_documents // settings.docs_per_shard),
            "provenance_columns": list(PROVENANCE_COLUMNS),
            "seed": settings.seed,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": package_versions(),
        }

    def check_same_run(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """A resume must capture what the run holds: every run-defining setting equal."""
        changed = [k for k in RUN_DEFINING_KEYS if old.get(k) != new.get(k)]
        if changed:
            diffs = "; ".join(f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in changed)
            raise PipelineError(
                f"run {self.run_id!r} exists with other settings ({diffs}); resume it with its own settings "
                "or start a new run with another --run_id"
            )

    def finalize_if_complete(self) -> dict[str, Any] | None:
        """Mark the run complete once every shard is on disk (whichever process gets there last) and point
        STORE_DIR/run_id.txt to it; None while shards are missing."""
        meta = self.read_meta()
        if not set(range(meta["n_shards"])) <= self.completed_shards():
            return None
        infos = [self.shard_info(i) for i in range(meta["n_shards"])]
        meta.update(
            status="complete",
            n_tokens=sum(i["n_tokens"] for i in infos),
            n_empty_documents=sum(i["n_empty"] for i in infos),
            bytes=self.size_bytes(),
            completed=datetime.now(UTC).isoformat(timespec="seconds"),
            timing=[read_json(p) for p in sorted((self.dir / TIMING_DIR).glob("*.json"))],
        )
        self.write_meta(meta)
        self.store.write_pointer(self.run_id)
        return meta

    def is_complete(self) -> bool:
        return self.exists() and self.read_meta().get("status") == "complete"

    def shard_dir(self, index: int) -> Path:
        return self.dir / f"batch_{index}"

    def completed_shards(self) -> set[int]:
        """Shard folders exist only once complete (they are renamed into place)."""
        done = set()
        for p in self.dir.glob("batch_*"):
            suffix = p.name[len("batch_") :]
            if p.is_dir() and suffix.isdigit():
                done.add(int(suffix))
        return done

    def remove_stale_temporaries(self, shards: set[int] | None = None) -> None:
        """Left behind by a killed writer, never read. In an array only a task's own ``shards`` are touched, since
        the other tasks may be writing theirs right now."""
        for p in self.dir.glob(".tmp_batch_*"):
            index = p.name.split("_")[2]
            if shards is None or (index.isdigit() and int(index) in shards):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def bytes_per_token(layers: list[LayerSpec], store_dtype: str) -> int:
        """Disk bytes of one stored token: its vector in every layer plus its provenance row (headers aside)."""
        itemsize = torch.empty(0, dtype=getattr(torch, store_dtype)).element_size()
        return sum(layer.d_model for layer in layers) * itemsize + 4 * len(PROVENANCE_COLUMNS)

    def write_shard(
        self,
        index: int,
        activations: Mapping[str, torch.Tensor],
        provenance: torch.Tensor,
        info: dict[str, Any],
    ) -> int:
        """Write shard ``index`` atomically: each layer's activations [n, d_model] (keyed by layer signature) and the
        provenance [n, 3] they share, row for row; returns its size in bytes."""
        for signature, acts in activations.items():
            if acts.shape[0] != provenance.shape[0]:
                raise ValueError(f"{signature}: {acts.shape[0]} rows for {provenance.shape[0]} provenance rows")
        final = self.shard_dir(index)
        tmp = self.dir / f".tmp_batch_{index}_{os.getpid()}_{secrets.token_hex(2)}"
        try:
            with storage_errors(final):
                tmp.mkdir(parents=True)
                for signature, acts in activations.items():
                    (tmp / signature).mkdir()
                    save_file({"tensor": acts.contiguous()}, str(tmp / signature / "activations.safetensors"))
                (tmp / PROVENANCE_KEY).mkdir()
                save_file(
                    {"tensor": provenance.to(torch.int32).contiguous()},
                    str(tmp / PROVENANCE_KEY / "provenance.safetensors"),
                )
                metadata = {
                    **{sig: {"activations_shape": list(acts.shape)} for sig, acts in activations.items()},
                    PROVENANCE_KEY: {"provenance_shape": list(provenance.shape), "columns": list(PROVENANCE_COLUMNS)},
                    "shard": info,
                    "_tensor_metadata_names": {
                        **{sig: ["activations"] for sig in activations},
                        PROVENANCE_KEY: ["provenance"],
                    },
                }
                (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
                files = [f for f in tmp.rglob("*") if f.is_file()]
                for f in files:
                    _fsync(f)
                size = sum(f.stat().st_size for f in files)
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return size

    def write_timing(self, report: dict[str, Any]) -> None:
        """One file per capture process (a job, an array task, a resumed part), gathered into meta.json's
        ``timing`` list when the run completes: array tasks never write the manifest at the same time."""
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}_{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(3)}.json"
        atomic_write_json(self.dir / TIMING_DIR / name, report)

    def shard_info(self, index: int) -> dict[str, Any]:
        return read_json(self.shard_dir(index) / "metadata.json")["shard"]

    def read_shard(self, index: int, layer_signature: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations [n, d_model], provenance int32 [n, 3]) of one shard."""
        shard = self.shard_dir(index)
        acts = load_tensors(shard / layer_signature / "activations.safetensors")["tensor"]
        prov = load_tensors(shard / PROVENANCE_KEY / "provenance.safetensors")["tensor"]
        if acts.ndim != 2 or prov.shape != (acts.shape[0], len(PROVENANCE_COLUMNS)):
            raise PipelineError(
                f"{shard} holds tensors of unexpected shapes {tuple(acts.shape)} and "
                f"{tuple(prov.shape)}; the run is corrupted"
            )
        return acts, prov

    def iter_shards(self, layer_signature: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for index in sorted(self.completed_shards()):
            acts, prov = self.read_shard(index, layer_signature)
            yield index, acts, prov

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())


def open_complete_run(store: Store, run_id: str) -> tuple[ActivationRun, dict[str, Any]]:
    """The run step 2 and later steps read: it must exist and be complete."""
    run = ActivationRun(store, run_id)
    if not run.dir.is_dir():
        raise PipelineError(f"activation run {run_id!r} not found in {store.runs_dir}")
    meta = run.read_meta()
    if meta.get("kind") != "activations":
        raise PipelineError(f"run {run_id!r} in {store.runs_dir} is not an activation run")
    if meta.get("status") != "complete":
        done, total = len(run.completed_shards()), meta.get("n_shards", "?")
        raise PipelineError(
            f"activation run {run_id!r} is incomplete ({done}/{total} shards); resume it with "
            f"`uv run python 01_save_activations.py --run_id {run_id}` and the same settings"
        )
    return run, meta


def package_versions() -> dict[str, str]:
    """Recorded in every manifest so a run can be reproduced or explained later."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "mi-crow", "overcomplete", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# -- training runs and sweeps -----------------------------------------------------------------------------------------
SWEEP_FILE = "sweep.json"
CHECKPOINT_COMMIT = "checkpoint.json"
CHECKPOINT_STEM = "checkpoint_"
MEMBER_RUN_STATES = ("running", "complete")


class TrainingRun:
    """One SAE's folder, ``runs/<sae_run_id>/``, alone or as a member of a sweep (what step 3 evaluates)::

    meta.json              kind "sae"; status "running" (with the settings) while training, "complete" with
                           the final metrics, the member's values (layer, k, ...) and the sweep id, if any
    model.pt               the SAE (sae.py's payload: mi_crow's TopKSae.load and PipelineSae.load open it)
    saelens/               SAELens export (export.py)
    history.json           metrics every LOG_EVERY_STEPS steps and per epoch, held-out metrics
    training_curves.png
    checkpoint_<step>.pt   this SAE's trainer state at a step, while training; the step that counts is the one
                           named by the commit file (``CheckpointCommit``) of the process that trains it
    evaluation/            step 3's outputs
    """

    def __init__(self, store: Store, sae_run_id: str):
        self.store, self.run_id = store, validate_run_id(sae_run_id, "--sae_run_id")
        self.dir = store.run_dir(sae_run_id)

    meta_path = property(lambda self: self.dir / META_FILE)
    model_path = property(lambda self: self.dir / "model.pt")
    saelens_dir = property(lambda self: self.dir / "saelens")
    history_path = property(lambda self: self.dir / "history.json")
    curves_path = property(lambda self: self.dir / "training_curves.png")

    def status(self) -> str | None:
        """None (nothing there yet), "running" or "complete"; a folder holding something else is refused."""
        if not self.meta_path.is_file():
            if not self.dir.is_dir():
                return None
            leftovers = [p for p in self.dir.iterdir() if not p.name.startswith(("checkpoint", "."))]
            if leftovers:
                raise PipelineError(
                    f"--sae_run_id {self.run_id!r}: {self.dir} exists and is not a training run; choose another id"
                )
            return None
        meta = self.read_meta()
        if meta.get("kind") != "sae" or meta.get("status") not in MEMBER_RUN_STATES:
            raise PipelineError(
                f"--sae_run_id {self.run_id!r}: {self.dir} holds a run of kind {meta.get('kind')!r}, not an SAE "
                "training run; choose another id"
            )
        return meta["status"]

    def read_meta(self) -> dict[str, Any]:
        return read_json(self.meta_path)

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.meta_path, {"kind": "sae", **meta})

    def write_history(self, history: dict[str, Any]) -> None:
        atomic_write_json(self.history_path, history)

    def checkpoint_path(self, step: int) -> Path:
        return self.dir / f"{CHECKPOINT_STEM}{step}.pt"

    def checkpoint_steps(self) -> list[int]:
        steps = (p.name[len(CHECKPOINT_STEM) : -len(".pt")] for p in self.dir.glob(f"{CHECKPOINT_STEM}*.pt"))
        return sorted(int(s) for s in steps if s.isdigit())

    def remove_checkpoints(self, keep: int | None = None) -> None:
        """Every checkpoint but step ``keep``'s, and temporaries a kill left mid-write."""
        for step in self.checkpoint_steps():
            if step != keep:
                self.checkpoint_path(step).unlink(missing_ok=True)
        for stale in self.dir.glob(f".{CHECKPOINT_STEM}*.tmp"):
            stale.unlink(missing_ok=True)


class CheckpointCommit:
    """The one file that says which step's checkpoints count for the SAEs one process trains together.

    Protocol: write every SAE's ``checkpoint_<step>.pt`` (each atomically), then this file (atomically: the commit),
    then delete the older checkpoints. A kill before the commit leaves the previous step committed and all of its
    checkpoints on disk, so every SAE resumes at the same step; files of an uncommitted step are deleted on resume.
    Record: ``{"step", "epoch", "step_in_epoch", "tokens", "elapsed_s", "world_size", "members"}``.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, Any] | None:
        return read_json(self.path) if self.path.is_file() else None

    def write(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.path, record)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Sweep:
    """A sweep's folder, ``runs/<sweep_id>/``::

    sweep.json                  kind "sweep": the grid, the data seed, every member's id and values, the status;
                                once complete, every member's held-out metrics from training
    frontier.png                once complete: held-out FVU against L0 (training's)
    checkpoint.json             while training, the commit file of the process training it (in a SLURM array,
                                ``checkpoint.task<t>of<T>.json``, one per task)
    evaluation/sweep.json       step 3's report, kind "sweep_evaluation": per member L0, FVU, CE-loss recovered
                                (null with the reason when the ablation gap is noise), KL; per group of seeds the
                                mean and standard deviation; the shared clean/ablated references; time per stage
    evaluation/frontier.png     step 3's frontier: L0 against FVU and against CE-loss recovered

    Each member is an ordinary ``TrainingRun`` in ``runs/<sweep_id>.<member suffix>/``, evaluable on its own (its
    ``evaluation/metrics.json`` and feature browser). Readers (step 3): ``training_runs(store, id)`` gives the
    members of a sweep id, or the run itself.
    """

    def __init__(self, store: Store, sweep_id: str):
        self.store, self.sweep_id = store, validate_run_id(sweep_id, "--sae_run_id")
        self.dir = store.run_dir(sweep_id)

    @property
    def path(self) -> Path:
        return self.dir / SWEEP_FILE

    @property
    def frontier_path(self) -> Path:
        """Held-out FVU against L0 of every member (plots.plot_sweep_frontier), once the sweep is complete."""
        return self.dir / "frontier.png"

    @property
    def evaluation_path(self) -> Path:
        return self.dir / "evaluation" / SWEEP_FILE

    @property
    def evaluation_frontier_path(self) -> Path:
        return self.dir / "evaluation" / "frontier.png"

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        sweep = read_json(self.path)
        if sweep.get("kind") != "sweep":
            raise PipelineError(f"{self.path} is not a sweep file (kind {sweep.get('kind')!r})")
        return sweep

    def write(self, sweep: dict[str, Any]) -> None:
        atomic_write_json(self.path, {"kind": "sweep", **sweep})

    def members(self) -> list[TrainingRun]:
        """Every SAE of the sweep, in grid order."""
        return [TrainingRun(self.store, m["sae_run_id"]) for m in self.read()["members"]]

    def commit(self, task_id: int = 0, task_count: int = 1) -> CheckpointCommit:
        name = CHECKPOINT_COMMIT if task_count == 1 else f"checkpoint.task{task_id}of{task_count}.json"
        return CheckpointCommit(self.dir / name)

    def commits(self) -> list[CheckpointCommit]:
        return [CheckpointCommit(p) for p in sorted(self.dir.glob("checkpoint*.json"))]


def training_runs(store: Store, sae_run_id: str) -> list[TrainingRun]:
    """The SAEs an id names: a sweep's members (grid order), or the one training run."""
    sweep = Sweep(store, sae_run_id)
    return sweep.members() if sweep.exists() else [TrainingRun(store, sae_run_id)]

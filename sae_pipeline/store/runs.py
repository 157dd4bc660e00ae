"""STORE_DIR: the pointers at its top, run ids, and ``RunFolder``, the one class that opens and checks a run of any
kind. The kinds (each in its own module, writing and reading its own files)::

    STORE_DIR/run_id.txt            the last complete activation run
    STORE_DIR/sae_run_id.txt        the last finished training run (one SAE) or sweep (several)
    STORE_DIR/runs/<run_id>/        ActivationRun (store/activations.py): meta.json kind "activations", shards
    STORE_DIR/runs/<sae_run_id>/    TrainingRun (store/training.py): meta.json kind "sae", model.pt, exports
    STORE_DIR/runs/<sweep_id>/      Sweep (store/training.py): sweep.json kind "sweep"; members are TrainingRuns
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sae_pipeline.infra.errors import PipelineError, StorageError
from sae_pipeline.store.files import atomic_write_json, atomic_write_text, read_json

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_ID_FILE = "run_id.txt"
SAE_RUN_ID_FILE = "sae_run_id.txt"
META_FILE = "meta.json"
# what sets each pointer, and the flag that picks a run instead of it
POINTER_STEPS = {
    RUN_ID_FILE: ("01_save_activations.py", "--run_id"),
    SAE_RUN_ID_FILE: ("02_train_sae.py", "--sae_run_id"),
}


def validate_run_id(run_id: str, what: str = "--run_id") -> str:
    """Ids become folder names, so only plain names that stay inside ``runs/`` are accepted."""
    if not RUN_ID_PATTERN.match(run_id) or run_id in (".", ".."):
        raise PipelineError(
            f"{what}={run_id!r} is not a valid run id: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return run_id


def new_run_id(prefix: str) -> str:
    """Sortable by time (UTC) and unique across concurrent jobs."""
    return f"{prefix}_{datetime.now(UTC):%Y%m%d_%H%M%S}_{secrets.token_hex(3)}"


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
        """The run id a previous step left in ``name``, checked to exist; a missing one says which step writes it and
        which flag picks a run instead."""
        path = self.root / name
        step, flag = POINTER_STEPS.get(name, ("the previous step", "the run id flag"))
        if not path.is_file():
            raise PipelineError(
                f"{path} not found: run `uv run python {step}` first (it writes this file), or pick a run with "
                f"{flag} <id> (the runs are in {self.runs_dir})"
            )
        run_id = path.read_text(encoding="utf-8").strip()
        if not run_id:
            raise PipelineError(f"{path} is empty: run `uv run python {step}` again, or pick a run with {flag} <id>")
        validate_run_id(run_id, what=str(path))
        if not self.run_dir(run_id).is_dir():
            raise PipelineError(f"{path} names run {run_id!r}, but {self.run_dir(run_id)} does not exist")
        return run_id

    def write_pointer(self, run_id: str, name: str = RUN_ID_FILE) -> None:
        atomic_write_text(self.root / name, run_id + "\n")


class RunFolder:
    """A run's folder, ``runs/<id>/``, with the checks every kind shares: the id is valid, the folder holds a run of
    this kind (never another kind's, never a stranger's folder), and a run that must be complete is, or the message
    names the command that completes it.

    Subclasses set ``KIND`` (the ``kind`` in their record file), ``NAME`` (how messages call them, with its
    article), ``FLAG`` (the flag that names them), ``STEP`` (the script that writes them) and ``STATES``.
    """

    KIND: ClassVar[str]
    NAME: ClassVar[str]
    FLAG: ClassVar[str]
    STEP: ClassVar[str]
    STATES: ClassVar[tuple[str, ...]]
    META: ClassVar[str] = META_FILE

    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, validate_run_id(run_id, self.FLAG)
        self.dir = store.run_dir(run_id)

    @property
    def meta_path(self) -> Path:
        return self.dir / self.META

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        return read_json(self.meta_path)

    def write_meta(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.meta_path, {"kind": self.KIND, **record})

    def status(self) -> str | None:
        """None when nothing is there yet (no folder, or only what a killed start left); else the run's status. A
        folder holding anything else is refused: a run is never written over another kind of folder."""
        if not self.exists():
            leftovers = [p for p in self.dir.iterdir() if not self.is_leftover(p)] if self.dir.is_dir() else []
            if leftovers:
                raise PipelineError(
                    f"{self.FLAG} {self.run_id!r}: {self.dir} exists and is not {self.NAME}; {self._other}"
                )
            return None
        record = self.read_meta()
        if record.get("kind") != self.KIND or record.get("status") not in self.STATES:
            raise PipelineError(
                f"{self.FLAG} {self.run_id!r}: {self.dir} holds a run of kind {record.get('kind')!r}, not {self.NAME}; "
                f"{self._other}"
            )
        return record["status"]

    def open(self) -> dict[str, Any]:
        """The record of a complete run of this kind; a missing, foreign or incomplete one is refused in one line."""
        if not self.dir.is_dir():
            raise PipelineError(
                f"{self.NAME.split(' ', 1)[1]} {self.run_id!r} not found: {self.dir} does not exist (run "
                f"`uv run python {self.STEP}` first, or pass an existing {self.FLAG})"
            )
        if not self.exists():
            raise PipelineError(f"{self.dir} has no {self.META}: it is not {self.NAME}")
        record = self.read_meta()
        if record.get("kind") != self.KIND:
            raise PipelineError(f"run {self.run_id!r} in {self.store.runs_dir} is not {self.NAME}")
        if record.get("status") != "complete":
            raise PipelineError(
                f"{self.NAME.split(' ', 1)[1]} {self.run_id!r} is incomplete ({self.progress(record)}); resume it "
                f"with `uv run python {self.STEP} {self.FLAG} {self.resume_id(record)}`{self.resume_note}"
            )
        return record

    @property
    def _other(self) -> str:
        return f"choose another {self.FLAG}"

    @staticmethod
    def is_leftover(path: Path) -> bool:
        """What a start killed before its first record may leave (hidden temporaries); a subclass adds its own."""
        return path.name.startswith(".")

    def progress(self, record: dict[str, Any]) -> str:
        return f"status {record.get('status')!r}"

    def resume_id(self, record: dict[str, Any]) -> str:
        return self.run_id

    resume_note: ClassVar[str] = ""

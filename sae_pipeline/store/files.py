"""Files of the store: every write atomic (a reader sees the old file or the new one, never half), every read that
fails named in one line, one timestamp format."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_pipeline.infra.errors import PipelineError, storage_error, storage_errors


def now() -> str:
    """The time recorded in every file of the store: ISO 8601, UTC, whole seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


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
            fsync(Path(tmp))  # a write the disk refuses late (delayed allocation, quotas) fails here, not later
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):  # a vanished mount must not hide the first error
                Path(tmp).unlink(missing_ok=True)


def fsync(path: Path) -> None:
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_torch_file(path: Path) -> dict[str, Any]:
    """torch.load on CPU with tensors and plain containers only; a missing or corrupted file is named."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist") from None
    except Exception as exc:  # torch raises many types for truncated/garbled files
        raise PipelineError(f"{path} cannot be read ({type(exc).__name__}); the file is corrupted") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} does not hold a dictionary payload; it is not one of this pipeline's files")
    return obj


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

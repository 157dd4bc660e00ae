"""The errors users see: the scripts print their message as a single line and exit non-zero.

``StorageError`` is what a filesystem failure becomes (a full disk, a quota, a read-only or vanished mount, a
permission): one line naming the file, the reason and the free space, instead of a library's traceback. Every write
of the store goes through ``storage_errors`` (store.atomic_path, ActivationRun.write_shard); cli.exit_on_error turns
any other OS error the same way and adds the command that resumes the step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class PipelineError(Exception):
    """A problem the user can fix: the message names the variable or file and what would be valid."""

    exit_code = 2


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
UNREACHABLE = {errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ENODEV, errno.ENXIO, errno.ETIMEDOUT, errno.EHOSTDOWN}
STORAGE_ERRNOS = FULL | DENIED | UNREACHABLE
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an OS error: no errno attribute


class StorageError(PipelineError):
    """A read or write the filesystem refused. ``run_id``: the run folder the path lies in, for the resume hint."""

    exit_code = 74  # EX_IOERR; not 75, which the sbatch wrappers requeue: a full disk stays full

    def __init__(self, path: Path | str | None, error: OSError, action: str = "write", subject: str | None = None):
        self.path = Path(path) if path is not None else None
        self.errno = error.errno
        self.run_id = _run_id_of(self.path)
        code = errno.errorcode.get(error.errno, str(error.errno))
        subject = subject or f"cannot {action}" + (f" {self.path}" if self.path is not None else "")
        super().__init__(f"{subject}: {os.strerror(error.errno)} ({code}); {self._advice()}")

    def _advice(self) -> str:
        if self.path is None:  # a library's write that did not say where (Python's write() errors carry no name)
            return "check the free space and permissions of STORE_DIR, TMPDIR and HF_HOME (`df -h`)"
        if self.errno in UNREACHABLE:  # probing a lost network mount can hang: nothing is looked up here
            return f"the filesystem did not answer (a lost network mount?): check that `df {self.path.parent}` works"
        folder = _existing_ancestor(self.path)
        mount = _mount_point(folder)
        if self.errno == errno.EROFS:
            return f"{mount} is mounted read-only: remount it writable or set STORE_DIR to a writable filesystem"
        if self.errno in DENIED:
            return f"no permission to write in {folder}: fix its permissions or set STORE_DIR to a folder you own"
        if self.errno == errno.EFBIG:
            return f"the file exceeds the size limit of {mount} or of this process (`ulimit -f`)"
        if self.errno in FULL:
            return f"{_free_space(folder)} on {mount}: free space there (or raise your quota)"
        return "set STORE_DIR to a folder you can write"


def os_error_of(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc``: itself, one it was raised while handling (torch.save wraps the file's OSError
    in a RuntimeError), or the one a Rust library (safetensors) names in its message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        found = RUST_OS_ERROR.search(str(current))
        if found:
            code = int(found[1])
            return OSError(code, os.strerror(code))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def storage_error(exc: BaseException, path: Path | str | None = None, action: str = "write") -> StorageError | None:
    """``exc`` as a StorageError when a filesystem refused the operation, else None (a bug stays a traceback)."""
    if isinstance(exc, PipelineError):  # already says what to do
        return exc if isinstance(exc, StorageError) else None
    error = os_error_of(exc)
    if error is None or error.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(path if path is not None else error.filename, error, action)


@contextlib.contextmanager
def storage_errors(path: Path, action: str = "write") -> Iterator[None]:
    """Inside: a filesystem failure surfaces as a StorageError naming ``path``."""
    try:
        yield
    except Exception as exc:
        translated = storage_error(exc, path, action)
        if translated is None or translated is exc:
            raise
        raise translated from exc


def _run_id_of(path: Path | None) -> str | None:
    """``<id>`` when ``path`` lies in a run folder ``.../runs/<id>/...`` of a store."""
    if path is None:
        return None
    for p in (path, *path.parents):
        if p.parent.name == "runs" and not p.name.startswith("."):
            return p.name
    return None


def _existing_ancestor(path: Path | None) -> Path:
    for p in (path, *path.parents) if path is not None else ():
        with contextlib.suppress(OSError):
            if p.is_dir():
                return p
    return Path.cwd()


def _mount_point(path: Path) -> Path:
    """The filesystem ``path`` lies on: the longest mount point above it (/proc/self/mounts also knows bind mounts,
    which os.path.ismount cannot tell from their parent)."""
    p = path.resolve()
    try:
        mounts = [
            Path(line.split()[1].replace("\\040", " ")) for line in Path("/proc/self/mounts").read_text().splitlines()
        ]
    except OSError:
        mounts = []
    above = [m for m in mounts if m == p or m in p.parents]
    if above:
        return max(above, key=lambda m: len(m.parts))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _free_space(path: Path) -> str:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"


def human_bytes(n: float) -> str:
    """``512 B``, ``160.0 KiB``, ``1.2 GiB``: a size a person reads at a glance."""
    if n < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:,.1f} {unit}"
    return f"{n / 1024:,.1f} TiB"

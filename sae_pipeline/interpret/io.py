"""``interpretation/`` in a training run's folder, written and read here only::

    config.json          what the rows depend on (models, latents, example counts, prompts' language); a rerun
                         with other values is refused instead of mixing rows of two configurations
    explanations.jsonl   one row per latent as soon as it is explained: latent, explanation, the raw answer
    latents.jsonl        one row per latent as soon as it is scored: explanation, detection and fuzzing scores,
                         the control's, the examples used, the model ids
    summary.json         real against control: mean, median and distribution of each score (written last)
    scores.png           the scores' distributions, real and control, and each score against firing frequency
    delphi_cache/        with INTERPRET_DELPHI_CACHE=1: the codes as delphi's latent cache (``delphi_cache.py``)

A JSONL row is appended and synced (fsync) before the next latent starts, so a killed step 4 loses at most the
latent it was working on; a rerun reads the complete rows (a torn last line is cut off) and continues after them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sae_pipeline.infra.errors import PipelineError, storage_errors
from sae_pipeline.store.files import atomic_write_json, read_json

INTERPRETATION_DIR = "interpretation"


class JsonlLog:
    """Rows appended one at a time, each synced to disk; reading cuts a torn last line (a kill mid-write)."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with storage_errors(self.path), self.path.open("r+b") as f:
                f.truncate(len(complete))
        try:
            return [json.loads(line) for line in complete.decode("utf-8").splitlines()]
        except json.JSONDecodeError as exc:
            raise PipelineError(
                f"{self.path} line {exc.lineno} is not JSON: the file was modified; move it away to start step 4 over"
            ) from None

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        with storage_errors(self.path), self.path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class InterpretationFolder:
    """One SAE's ``interpretation/`` folder (module docstring)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / INTERPRETATION_DIR
        self.config_path = self.dir / "config.json"
        self.summary_path = self.dir / "summary.json"
        self.explanations = JsonlLog(self.dir / "explanations.jsonl")
        self.latents = JsonlLog(self.dir / "latents.jsonl")
        self.delphi_cache = self.dir / "delphi_cache"

    def exists(self) -> bool:
        return self.latents.path.is_file()

    def start(self, config: dict[str, Any]) -> None:
        """Record the configuration, or check that an earlier run of step 4 here had the same."""
        if self.config_path.is_file():
            old = read_json(self.config_path)
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if changed and (self.explanations.rows() or self.latents.rows()):
                raise PipelineError(
                    f"{self.dir} holds rows of step 4 run with other values ({', '.join(changed)} differ); move "
                    "that folder away to interpret this SAE again with the new values, or rerun with the old ones"
                )
        self.summary_path.unlink(missing_ok=True)  # a summary is only ever of every row
        atomic_write_json(self.config_path, config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

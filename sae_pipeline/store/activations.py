"""An activation run (step 1's output): its manifest and its shards, written and read here only.

Layout (mi_crow's ``LocalStore`` layout, so ``mi_crow.store.StoreDataloader`` reads our activation runs)::

    runs/<run_id>/meta.json         manifest: mi_crow's run keys plus everything needed without the model
    runs/<run_id>/batch_<i>/metadata.json
    runs/<run_id>/batch_<i>/<layer_signature>/activations.safetensors   {"tensor": [n_tokens, d_model]}
    runs/<run_id>/batch_<i>/tokens/provenance.safetensors              {"tensor": int32 [n_tokens, 3]}
    runs/<run_id>/timing/<time>_<host>_<pid>_<random>.json   where each capture process spent its time

Shard i is the folder ``batch_<i>`` (mi_crow's name for it). It holds one activations file per captured layer, row
for row with the provenance they share, and is built in a hidden temporary folder and renamed into place, so it
exists only when complete. Provenance columns are (document index, position in the tokenized document, token id).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from sae_pipeline.infra.errors import PipelineError, storage_errors
from sae_pipeline.lm.layers import LayerSpec, block_index
from sae_pipeline.store.files import atomic_write_json, fsync, load_tensors, now, package_versions, read_json
from sae_pipeline.store.runs import RUN_ID_FILE, RunFolder

if TYPE_CHECKING:
    from sae_pipeline.settings import CaptureSettings

TIMING_DIR = "timing"
SHARD_PREFIX = "batch_"  # mi_crow's folder name for a shard
PROVENANCE_KEY = "tokens"
PROVENANCE_COLUMNS = ("doc_index", "position", "token_id")
FORMAT_VERSION = 2  # 2: per-layer entries under "layers" (1 had one "layer_signature" and "d_model")
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


class ActivationRun(RunFolder):
    """One activation run: its manifest and its shards."""

    KIND, NAME, FLAG, STEP = "activations", "an activation run", "--run_id", "01_save_activations.py"
    STATES = ("capturing", "complete")
    resume_note = " and the same settings"

    def progress(self, meta: dict[str, Any]) -> str:
        return f"{len(self.completed_shards())}/{meta.get('n_shards', '?')} shards"

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
            "created": now(),
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
            completed=now(),
            timing=[read_json(p) for p in sorted((self.dir / TIMING_DIR).glob("*.json"))],
        )
        self.write_meta(meta)
        self.store.write_pointer(self.run_id, RUN_ID_FILE)
        return meta

    def shard_dir(self, index: int) -> Path:
        return self.dir / f"{SHARD_PREFIX}{index}"

    def completed_shards(self) -> set[int]:
        """Shard folders exist only once complete (they are renamed into place)."""
        done = set()
        for p in self.dir.glob(f"{SHARD_PREFIX}*"):
            suffix = p.name[len(SHARD_PREFIX) :]
            if p.is_dir() and suffix.isdigit():
                done.add(int(suffix))
        return done

    def remove_stale_temporaries(self, shards: set[int] | None = None) -> None:
        """Left behind by a killed writer, never read. In an array only a task's own ``shards`` are touched, since
        the other tasks may be writing theirs right now."""
        for p in self.dir.glob(f".tmp_{SHARD_PREFIX}*"):
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
        tmp = self.dir / f".tmp_{SHARD_PREFIX}{index}_{os.getpid()}_{secrets.token_hex(2)}"
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
                    fsync(f)
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

"""Text datasets from the hub or local files, cut to DATA_LIMIT rows the same way every time."""

from __future__ import annotations

from pathlib import Path

import datasets

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm import hub

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
LOCAL_CHOICES = "a local file (" + ", ".join(LOCAL_BUILDERS) + ") or a folder of them"


def looks_like_path(name: str) -> bool:
    """Hub ids are ``org/name``; anything absolute, relative-dotted, home-relative or with a file suffix is a path."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in LOCAL_BUILDERS


def load_texts(name: str, split: str, text_field: str, limit: int, shuffle: bool, seed: int) -> datasets.Dataset:
    """The first ``limit`` rows of ``split`` (optionally after a seeded shuffle); row i is document i everywhere.

    Rows stay memory-mapped by Arrow, so memory does not grow with the dataset.
    """
    path = Path(name).expanduser()
    try:
        if path.exists():
            dataset = _load_local(path, split)
        elif looks_like_path(name):
            raise PipelineError(
                f"HF_DATASET={name!r} does not exist; give an existing file "
                f"({', '.join(LOCAL_BUILDERS)}), a folder of such files, or a hub dataset id"
            )
        else:
            dataset = datasets.load_dataset(name, split=split)
    except PipelineError:
        raise
    except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as exc:  # empty or malformed file
        if "split" in str(exc).lower():
            raise PipelineError(
                f"DATA_SPLIT={split!r} is not a split of HF_DATASET={name!r}: {_first_line(exc)}"
            ) from None
        raise PipelineError(f"HF_DATASET={name!r} could not be loaded: {_first_line(exc)}") from None
    except (OSError, ConnectionError, FileNotFoundError) as exc:
        if hub.is_offline():
            raise PipelineError(hub.not_cached("HF_DATASET", name, "dataset", LOCAL_CHOICES)) from None
        raise PipelineError(
            f"HF_DATASET={name!r} could not be loaded (offline, a typo, or a private dataset "
            f"needing HF_TOKEN): {_first_line(exc)}"
        ) from None
    if text_field not in dataset.column_names:
        raise PipelineError(
            f"TEXT_FIELD={text_field!r} is not a column of HF_DATASET={name!r}; "
            f"its columns are: {', '.join(dataset.column_names)}"
        )
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.select(range(min(limit, len(dataset)))).select_columns([text_field])
    if len(dataset) == 0:
        raise PipelineError(f"HF_DATASET={name!r} split {split!r} has no rows")
    return dataset


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if path.is_dir():
        loaded = datasets.load_dataset(str(path))
    else:
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PipelineError(
                f"HF_DATASET={str(path)!r} has an unsupported suffix; "
                f"use one of {', '.join(LOCAL_BUILDERS)} or a folder"
            )
        loaded = datasets.load_dataset(builder, data_files={"train": str(path)})
    if split not in loaded:
        raise PipelineError(
            f"DATA_SPLIT={split!r} is not a split of HF_DATASET={str(path)!r}; "
            f"available: {', '.join(loaded)} (a single local file is the split 'train')"
        )
    return loaded[split]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

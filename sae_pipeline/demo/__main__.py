"""``uv run python -m sae_pipeline.demo``: the offline demo (see pipeline.py)."""

from sae_pipeline.demo.pipeline import main

main()

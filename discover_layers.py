"""Helper: how many layers a model has, which hook points exist and which layer to pick.

Configured by environment variables; see docs/layers.md. The logic lives in the sae_pipeline package.
"""

from sae_pipeline.cli import discover_layers_main

if __name__ == "__main__":
    discover_layers_main()

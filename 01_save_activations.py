"""Step 1: capture the hooked layer's activations of a text dataset into the store.

Configured by environment variables; see docs/configuration.md. The logic lives in the sae_pipeline package.
"""

from sae_pipeline.cli import save_activations_main

if __name__ == "__main__":
    save_activations_main()

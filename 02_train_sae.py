"""Step 2: train a TopK sparse autoencoder, or a sweep of them in one pass, on a captured activation run.

Configured by environment variables; see docs/configuration.md. The logic lives in the sae_pipeline package.
"""

from sae_pipeline.cli import train_sae_main

if __name__ == "__main__":
    train_sae_main()

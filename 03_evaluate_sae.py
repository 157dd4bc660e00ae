"""Step 3: evaluate a trained SAE, or every SAE of a sweep: CE-loss recovered, reconstruction, feature browser.

Configured by environment variables; see docs/configuration.md. The logic lives in the sae_pipeline package.
"""

from sae_pipeline.cli import evaluate_sae_main

if __name__ == "__main__":
    evaluate_sae_main()

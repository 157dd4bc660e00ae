"""Step 4: explain a trained SAE's latents with a local instruct model and score the explanations (delphi's
detection and fuzzing, against a control), or every SAE's of a sweep.

Configured by environment variables; see docs/configuration.md. The logic lives in the sae_pipeline package.
"""

from sae_pipeline.cli import interpret_sae_main

if __name__ == "__main__":
    interpret_sae_main()

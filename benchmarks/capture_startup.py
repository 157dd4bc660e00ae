"""Start-up of step 1: what leaving out torchvision and scipy (which transformers imports whenever they are
installed) saves, up to a loaded model.

    uv run python benchmarks/capture_startup.py

Each run is a fresh process that imports step 1, reads the model config and loads the tiny model through mi_crow,
with and without ``cli.skip_unused_imports()``; runs alternate, and the CPU seconds of each child (user + system,
from the kernel) are compared, which other load on a shared machine disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts

CHILD = """
import sys
if sys.argv[1] == "skip":
    from sae_pipeline.cli import skip_unused_imports
    skip_unused_imports()
import torch
from sae_pipeline.steps.capture import save_activations
from sae_pipeline.lm.loading import load_config, load_language_model
load_config(sys.argv[2])
load_language_model(sys.argv[2], sys.argv[3], torch.device("cpu"), torch.float32)
print(sorted(m for m in ("torchvision", "scipy") if sys.modules.get(m) is not None))
"""


def cpu_seconds(mode: str, model: Path, store: Path) -> tuple[float, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(model), str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {mode} child failed")
    return usage.ru_utime + usage.ru_stime, proc.stdout.read().strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capture_startup_"))
    model = build_tiny_llama(tmp / "model", load_sample_texts())
    seconds: dict[str, list[float]] = {"import all": [], "skip": []}
    imported = {}
    for _ in range(args.repeats):
        for mode in seconds:
            s, imported[mode] = cpu_seconds(mode, model, tmp / "store")
            seconds[mode].append(s)
    for mode, values in seconds.items():
        print(
            f"{mode:10s} CPU s to a loaded model: median {statistics.median(values):.2f} "
            f"({', '.join(f'{v:.2f}' for v in values)}); imported of torchvision/scipy: {imported[mode]}"
        )
    saved = statistics.median(seconds["import all"]) - statistics.median(seconds["skip"])
    print(f"saved by skip_unused_imports: {saved:.2f} CPU s per start-up")


if __name__ == "__main__":
    main()

"""Several layers in one capture: one run with LAYER_NUM=a,b,c against three runs with one layer each.

    uv run python benchmarks/capture_layers.py

Random Llama hidden 512, 8 layers (CPU), layers 2, 4 and 6 by default, the real step 1 called in this process (model
loading included, imports not), interleaved, median of --repeats. One run pays the forward up to the deepest layer
once; three runs pay it up to each layer, so the ratio (three runs' wall time / one run's) is what a sweep over layers
saves. Both must store the same activations; the script checks that they do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline.demo.tiny_model import BENCHMARK_SHAPES, build_tiny_llama, load_sample_texts
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.steps.capture import save_activations
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="2,4,6")
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layers = tuple(int(x) for x in args.layers.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="capture_layers_"))
    sample = [t for t in load_sample_texts() if t.strip()]
    model_dir = build_tiny_llama(tmp / "model", sample, **BENCHMARK_SHAPES["cpu"])
    data = tmp / "docs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(args.docs):
            f.write(json.dumps({"text": sample[i % len(sample)]}, ensure_ascii=False) + "\n")
    store = Store(tmp / "store")

    def capture(layer_num: tuple[int, ...], run_id: str) -> float:
        settings = CaptureSettings(
            model_id=str(model_dir),
            hf_dataset=str(data),
            store_dir=store.root,
            device="cpu",
            data_limit=args.docs,
            layer_num=layer_num,
            store_dtype="bfloat16",
        )
        started = time.perf_counter()
        save_activations(settings, run_id=run_id)
        return time.perf_counter() - started

    one, three = [], []
    for repeat in range(args.repeats):
        one.append(capture(layers, f"all_{repeat}"))
        three.append(sum(capture((layer,), f"l{layer}_{repeat}") for layer in layers))
    together = ActivationRun(store, "all_0")
    for layer in layers:
        (signature,) = ActivationRun.layer_specs(ActivationRun(store, f"l{layer}_0").read_meta())
        alone = torch.cat([a for _, a, _ in ActivationRun(store, f"l{layer}_0").iter_shards(signature.signature)])
        both = torch.cat([a for _, a, _ in together.iter_shards(signature.signature)])
        assert torch.equal(alone, both), f"layer {layer} differs between the runs"
    ratios = [b / a for a, b in zip(one, three)]
    print(
        f"hidden 512, 8 layers, CPU, {args.docs} documents, layers {args.layers}, torch threads "
        f"{torch.get_num_threads()}: one run {statistics.median(one):.1f} s, three runs "
        f"{statistics.median(three):.1f} s; ratio (three / one) median {statistics.median(ratios):.2f} "
        f"(each repeat: {', '.join(f'{r:.2f}' for r in ratios)}); activations identical"
    )


if __name__ == "__main__":
    main()

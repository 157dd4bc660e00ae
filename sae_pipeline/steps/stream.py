"""Step 2 with STREAM=1: train the sweep from the model's forward, with no activation run (docs/streaming.md).

Read top to bottom, ``stream_sae``:

1. opens the source (``open_source``): the dataset cut as step 1 cuts it, the model with step 1's hooks on every
   listed layer (``steps/capture.load_capturer``), every shard's stored-token count from tokenising alone, and a
   ``StreamedRun`` (lm/stream.py) that forwards a shard when the loader asks for it;
2. plans the sweep on it (``plan_stream``): the grid, ids, this task's share, and a config that also holds what
   defines the tokens (model, dataset, layers, lengths), so a resume with others is refused;
3. trains exactly as step 2 does on a cached run (``steps/train.train_planned``), with one ``StreamLoader`` per
   layer: step 1's shards, grouped into STREAM_BUFFER_TOKENS and shuffled as sae/loader.py shuffles stored ones.

Exact resume comes with it: which tokens a step trains on is a pure function of (documents, DATA_SEED, epoch, step),
so a resumed run forwards again the shuffle group it stopped in and skips the ones before it without a forward.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.infra.distributed import Dist
from sae_pipeline.infra.preemption import StopFlag
from sae_pipeline.lm.batches import Planner
from sae_pipeline.lm.data import load_texts
from sae_pipeline.lm.stream import StreamedRun
from sae_pipeline.sae.loader import TokenLoader
from sae_pipeline.sae.sweep import (
    RESUME_MAY_CHANGE,
    SweepPlan,
    build_grid,
    member_ids,
    task_share,
)
from sae_pipeline.settings import StreamSettings
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store, new_run_id, validate_run_id

# With STREAM=1 the model and layers define the training tokens: a resume must not change them.
STREAM_MAY_CHANGE = RESUME_MAY_CHANGE - {"model_id", "model_dtype", "layer_num", "stream"}
FORWARD_BYTES_PER_TOKEN_AND_WIDTH = 16  # float32 hidden states alive in a truncated forward, per token and d_model


def stream_sae(
    settings: StreamSettings, sae_run_id: str | None = None, stop: StopFlag | None = None, dist: Dist | None = None
) -> Path:
    """Train (or resume) the SAEs the settings describe from the model's forward; returns the folder of the one
    SAE, or of the sweep."""
    from sae_pipeline.steps.train import train_planned

    dist = dist or Dist()
    source = open_source(settings, dist.device(settings.device))
    plan = plan_stream(settings, source, sae_run_id)
    return train_planned(plan, dist, stop, loaders=open_stream_loaders)


def open_source(settings: StreamSettings, device: torch.device) -> StreamedRun:
    """The model with step 1's hooks, its planner over the documents, and the shards' token counts."""
    from sae_pipeline.steps.capture import load_capturer

    texts = load_texts(
        settings.hf_dataset,
        settings.data_split,
        settings.text_field,
        settings.data_limit,
        settings.data_shuffle,
        settings.seed[0],
    )
    capture_settings = settings.model_copy(update={"device": str(device)})
    capturer, manifest = load_capturer(capture_settings, "streamed", len(texts))
    manifest = {**manifest, "kind": "stream", "run_id": None, "run_name": None, "status": "streamed"}
    planner = Planner(texts, capturer.tokenizer, settings, capturer.special_ids, pin=capturer.device.type == "cuda")
    print(
        f"stream: {manifest['n_documents']:,} documents of {settings.hf_dataset} in {manifest['n_shards']} shard(s), "
        f"forwarded by {settings.model_id} on {capturer.device} at every epoch; nothing is stored",
        file=sys.stderr,
    )
    return StreamedRun.plan(capturer, planner, manifest)


@dataclass
class StreamPlan(SweepPlan):
    """A sweep trained from the model's forward: ``run`` is the StreamedRun, ``act_meta`` the manifest step 1
    would have written; every meta.json says the run streamed, and from what."""

    source: dict[str, Any] = field(default_factory=dict)

    def member_meta(self, spec, run_id: str) -> dict[str, Any]:
        meta = super().member_meta(spec, run_id)
        forwarded = {"shards_forwarded_by_this_process": self.run.shards_forwarded}
        return {**meta, "streamed": {**self.source, **forwarded, "forward_s": round(self.run.forward_seconds, 3)}}

    def sweep_record(self, status: str) -> dict[str, Any]:
        return {**super().sweep_record(status), "streamed": self.source}


def stream_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a streamed SAE was trained on: what an activation run's meta.json would have said about its tokens."""
    keys = ("model_id", "model_dtype", "layers", "hook_side", "store_dtype", "keep_special_tokens")
    keys += ("special_token_ids", "prepend_bos", "max_length", "docs_per_shard", "dataset", "n_documents", "n_shards")
    return {k: manifest.get(k) for k in keys}


def plan_stream(settings: StreamSettings, source: StreamedRun, sae_run_id: str | None) -> StreamPlan:
    """plan_sweep's checks and ids, for the layers the model was hooked at (steps/train.py's plan, streamed)."""
    store = Store(settings.store_dir)
    layers = ActivationRun.layer_specs(source.manifest)
    grid = build_grid(settings, layers)
    sweep_id = validate_run_id(sae_run_id or settings.sae_run_id or new_run_id("sae"), "--sae_run_id")
    data_seed = settings.data_seed if settings.data_seed is not None else settings.seed[0]
    record = stream_record(source.manifest)
    config = {
        **{k: v for k, v in settings.model_dump(mode="json").items() if k not in STREAM_MAY_CHANGE},
        "layer_signature": [layer.signature for layer in layers],
        "data_seed": data_seed,
        "activation_run_id": None,
        "streamed": record,
    }
    task_id, task_count = settings.train_task_id or 0, settings.train_task_count or 1
    share = task_share(len(grid), task_id, task_count)
    ids = member_ids(sweep_id, grid, settings)
    plan = StreamPlan(
        settings, store, source, source.manifest, sweep_id, grid, ids, share, [], task_id, task_count, data_seed, config
    )
    plan.source = record
    store.ensure_writable()
    plan.check_existing()
    plan.todo = [i for i, run in zip(plan.share, plan.own_runs()) if run.status() != "complete"]
    return plan


class StreamLoader(TokenLoader):
    """A layer's training batches and held-out slice from a StreamedRun: TokenLoader's order, split and resume,
    with STREAM_BUFFER_TOKENS as the shuffle group; the held-out slice forwarded alone (lm/stream.py)."""

    run: StreamedRun

    def sample(self, n: int) -> torch.Tensor:
        """TokenLoader.sample's tokens, forwarding no group beyond the ones they come from; the groups are kept for
        the first epoch, which starts with them (a forward, not two)."""
        parts, got = [], 0
        self._kept: dict[tuple[int, int], torch.Tensor] = {}
        for g, group in enumerate(self.groups(0)):
            self._kept[0, g] = self._load_group(0, g, group)
            parts.append(self._kept[0, g][: n - got])
            got += parts[-1].shape[0]
            if got >= n:
                break
        return torch.cat(parts)

    def _load_group(self, epoch: int, g: int, group) -> torch.Tensor:
        kept = getattr(self, "_kept", {}).pop((epoch, g), None)
        return kept if kept is not None else super()._load_group(epoch, g, group)

    def iter_holdout(self, batch_size: int) -> Iterator[torch.Tensor]:
        for shard in self.shards[self.rank :: self.world_size]:
            if shard.n_holdout:
                yield from self.run.read_holdout(shard.index, self.layer_signature, shard.n_train).split(batch_size)

    def host_bytes(self) -> int:
        """TokenLoader's groups, plus the shards forwarded and kept for the other layers (lm/stream.py), plus one
        forward's hidden states when the model runs on the CPU."""
        largest = max(s.n_tokens for s in self.shards)
        kept = self.run.cache_bytes(largest) // max(len(self.run.signatures), 1)
        return super().host_bytes() + kept + (self.forward_bytes() if self.run.capturer.device.type == "cpu" else 0)

    def device_bytes(self) -> int:
        return super().device_bytes() + (self.forward_bytes() if self.run.capturer.device.type != "cpu" else 0)

    def forward_bytes(self) -> int:
        """A rough bound of one truncated forward's working memory, counted once (for the first layer's loader)."""
        if self.layer_signature != self.run.signatures[0]:
            return 0
        settings = self.run.planner.settings
        tokens = settings.batch_tokens_save or settings.batch_size_save * settings.max_length
        return tokens * self.d_model * FORWARD_BYTES_PER_TOKEN_AND_WIDTH


def open_stream_loaders(plan: StreamPlan, device: torch.device, dist: Dist) -> dict[str, StreamLoader]:
    """One loader per layer the process trains, all on the one StreamedRun (one forward feeds them all)."""
    s, source = plan.settings, plan.run
    loaders = {
        layer.signature: StreamLoader(
            source,
            layer.signature,
            layer.d_model,
            s.batch_size_train,
            s.holdout_fraction,
            plan.data_seed,
            s.stream_buffer_tokens,
            dist.rank,
            dist.world_size,
            pin_memory=device.type == "cuda",
        )
        for layer in plan.layers_trained()
    }
    first = next(iter(loaders.values()))
    source.keep = min(len(first.shards), max(len(group) for group in first.groups(0)) + 1)
    source.signatures = list(loaders)  # only the layers still trained wait for each other
    return loaders

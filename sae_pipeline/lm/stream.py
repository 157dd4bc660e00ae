"""Step 1's shards computed on demand instead of read from disk (STREAM=1).

``StreamedRun`` stands in for an ``ActivationRun`` where step 2's loader (sae/loader.py) reads one: shard i is
forwarded when asked for, with step 1's own ``Planner`` (same documents, batches, kept tokens: no padding, BOS and
special tokens excluded as step 1 does) and ``Capturer`` (same hooks, stop after the deepest layer, rows cast to
STORE_DTYPE, in document order). So a streaming run trains on exactly the tokens, values and order a cached run with
the same settings would, and everything built on the loader (shuffle groups, resume, ranks, the held-out split)
works unchanged; nothing is written.

One forward serves every layer: the loaders of a sweep's layers ask for the same shards in the same order, so a
forwarded shard is kept until every layer took it (or, bounded, until newer ones push it out: then it is forwarded
again, with the same result). The held-out slice (each shard's last tokens) is forwarded alone, from the first
document that holds held-out tokens, so evaluation costs about HOLDOUT_FRACTION of an epoch per layer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from sae_pipeline.lm.batches import Planner
from sae_pipeline.lm.capture import Capturer


class StreamedRun:
    """A virtual activation run: ``read_shard`` forwards the shard (module docstring). ``run_id`` is None: nothing
    is stored; ``manifest`` is what step 1 would have written as the run's meta.json."""

    run_id = None

    def __init__(self, capturer: Capturer, planner: Planner, manifest: dict[str, Any], counts: list[int]):
        self.capturer, self.planner, self.manifest, self.counts = capturer, planner, manifest, counts
        self.signatures = [layer.signature for layer in capturer.layers]
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor, set[str]]] = OrderedDict()
        self.keep = 2  # forwarded shards kept for the other layers, at most (the job sets a shuffle group's worth)
        self.shards_forwarded, self.forward_seconds = 0, 0.0  # by this process

    @classmethod
    def plan(cls, capturer: Capturer, planner: Planner, manifest: dict[str, Any]) -> StreamedRun:
        """Every shard's stored-token count, from tokenising alone (the loader needs them before any forward)."""
        counts = []
        for index in range(manifest["n_shards"]):
            doc_ids, encoded, _, _ = planner.documents(index)
            counts.append(int(planner.stored(doc_ids, encoded)[0].shape[0]))
        return cls(capturer, planner, manifest, counts)

    # -- what the loader reads of an activation run -----------------------------------------------------------------
    def read_meta(self) -> dict[str, Any]:
        return self.manifest

    def completed_shards(self) -> set[int]:
        return set(range(len(self.counts)))

    def shard_info(self, index: int) -> dict[str, Any]:
        return {"index": index, "n_tokens": self.counts[index]}

    def shard_dir(self, index: int) -> str:
        return f"shard {index} forwarded by {self.manifest['model_id']}"

    def read_shard(self, index: int, signature: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations [n_tokens, d_model], provenance [n_tokens, 3]) of one shard, as step 1 would store them."""
        return self._take(("shard", index), signature, lambda: self.planner.shard(index))

    def read_holdout(self, index: int, signature: str, n_train: int) -> torch.Tensor:
        """The activations of shard ``index``'s rows from ``n_train`` on (its held-out slice), forwarding only the
        documents that hold them."""
        planner, skip = self._holdout_planner(index, n_train)
        acts, _ = self._take(("holdout", index), signature, lambda: planner.shard(0))
        return acts[skip:]

    def cache_bytes(self, largest_shard: int) -> int:
        """Host memory of the shards kept for the other layers, at most."""
        width = sum(x.d_model for x in self.capturer.layers) * self.capturer.dtype.itemsize
        return self.keep * largest_shard * width

    # -- forwarding ------------------------------------------------------------------------------------------------
    def _take(self, key: tuple, signature: str, batches) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:  # one forward at a time; the loaders' reader threads wait here
            if key not in self._cache:
                self._cache[key] = (*self._forward(batches()), set(self.signatures))
                while len(self._cache) > self.keep:
                    self._cache.popitem(last=False)
            acts, provenance, waiting = self._cache[key]
            waiting.discard(signature)
            if not waiting:
                del self._cache[key]
            return acts[signature], provenance

    def _forward(self, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        started = time.perf_counter()
        shard = batches[0].shard
        n, capturer = shard.info["n_tokens"], self.capturer
        pin = capturer.copy_stream is not None
        buffers = {
            x.signature: torch.empty((n, x.d_model), dtype=capturer.dtype, pin_memory=pin) for x in capturer.layers
        }
        for batch in batches:
            if batch.n_docs:
                capturer.forward(batch, buffers)
        copied = capturer.shard_copied()
        if copied is not None:
            copied.synchronize()
        self.shards_forwarded += 1
        self.forward_seconds += time.perf_counter() - started
        return buffers, shard.provenance

    def _holdout_planner(self, index: int, n_train: int) -> tuple[Planner, int]:
        """A planner whose one shard is shard ``index``'s documents from the first with a held-out row, and how many
        of its rows come before the held-out ones."""
        planner = self.planner
        doc_ids, encoded, _, _ = planner.documents(index)
        _, per_doc = planner.stored(doc_ids, encoded)
        ends = per_doc.cumsum(0)
        first = int((ends <= n_train).sum())  # the first document with a row at or after n_train
        skip = n_train - (int(ends[first - 1]) if first else 0)
        docs = doc_ids[first:]
        settings = planner.settings.model_copy(update={"docs_per_shard": max(len(docs), 1)})
        sub = Planner(planner.texts.select(docs), planner.tokenizer, settings, planner.special_ids, planner.pin)
        return sub, skip

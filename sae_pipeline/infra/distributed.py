"""Data-parallel training across processes (torchrun): who I am, and the few collectives the trainer needs.

``Dist.from_env`` is called by the cli layer with the environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK);
nothing below it reads the environment. With one process (``Dist()``) every method is a no-op, so the
single-process trainer runs exactly as before.

Why an explicit all-reduce rather than DistributedDataParallel: one collective per SAE and step carries the
gradients (weighted by each rank's token count, so an uneven last batch of an epoch averages like one big batch),
the per-latent fire counts (so the dead-latent counters, and with them AuxK, are global and identical on every
rank), the loss for the log and the BatchTopK threshold; one more per step agrees on a stop signal (``any``), so
all ranks stop at the same step. It runs
after backward and before the unscale / decoder-gradient projection / clipping / Adam step, which then see the
same gradients on every rank and keep the replicas identical (the projection is linear: averaging first changes
nothing). DDP would need the extra collectives anyway, and would overwrite every rank's BatchTopK threshold with
rank 0's at each forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.sae.metrics import ReconstructionStats


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Dist:
        """The process's place in a torchrun launch; one process when WORLD_SIZE is absent or 1."""
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            if world <= 1:
                return cls()
            return cls(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")))
        except (KeyError, ValueError):
            raise PipelineError(
                "WORLD_SIZE/RANK/LOCAL_RANK are malformed; launch several processes with torchrun "
                '(see docs/training.md, "Training on several GPUs")'
            ) from None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, setting: str) -> torch.device:
        """DEVICE for this process: cuda/auto mean cuda:LOCAL_RANK under torchrun (one GPU per process)."""
        from sae_pipeline.lm.loading import resolve_device

        if not self.enabled:
            return resolve_device(setting)
        if setting.startswith("cuda:"):
            raise PipelineError(
                f"DEVICE={setting!r} names one GPU, but {self.world_size} processes were launched: "
                "use DEVICE=cuda (process i uses cuda:LOCAL_RANK) or auto"
            )
        if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
            return resolve_device(f"cuda:{self.local_rank}")
        return resolve_device(setting)

    def init(self, device: torch.device) -> None:
        """Join the process group: NCCL on CUDA, gloo on CPU."""
        if not self.enabled or tdist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")
        if tdist.get_world_size() != self.world_size:
            raise PipelineError(f"process group has {tdist.get_world_size()} ranks, WORLD_SIZE={self.world_size}")

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.enabled:
            tdist.all_reduce(t)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any (a stop signal reaches one process, all of them stop)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        tdist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (after a fresh initialisation)."""
        if self.enabled:
            for t in module.state_dict().values():
                tdist.broadcast(t, 0)

    def gather_stats(self, stats: ReconstructionStats) -> ReconstructionStats:
        """Every rank's accumulator merged in rank order (exact), returned on every rank; ``stats`` itself alone."""
        if not self.enabled:
            return stats
        s = stats.state_dict()
        flat = torch.cat(
            [
                s["n"].double().view(1),
                s["mean"],
                s["m2"],
                s["sse"].view(1),
                s["nonzero"].view(1),
                s["fire_counts"].double(),
            ]
        ).to(stats.mean.device)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        tdist.all_gather(parts, flat)
        merged = ReconstructionStats(stats.d_in, stats.n_latents, stats.device)
        d = stats.d_in
        for p in parts:
            one = ReconstructionStats(stats.d_in, stats.n_latents, stats.device)
            one.load_state_dict(
                {
                    "n": p[0],
                    "mean": p[1 : 1 + d],
                    "m2": p[1 + d : 1 + 2 * d],
                    "sse": p[1 + 2 * d],
                    "nonzero": p[2 + 2 * d],
                    "fire_counts": p[3 + 2 * d :].round().long(),
                }
            )
            merged.merge(one)
        return merged

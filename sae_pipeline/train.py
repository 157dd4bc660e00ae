"""Step 2: train a TopK / BatchTopK SAE on an activation run, resumably, the way the reference trainers do.

Read top to bottom, ``train_sae`` does:

1. resolve the activation run and the training run id; refuse TOP_K >= n_latents; a finished run is left alone;
2. build the SAE (``sae.PipelineSae``, a mi_crow TopKSae) and the shuffled loader (``train_data.TokenLoader``);
3. resume from ``checkpoint.pt`` if one exists (refused if it came from other settings), else initialise:
   b_dec = geometric median of a sample, random unit-norm decoder, encoder = decoder transpose;
4. train: loss = FVU of the batch + AUXK_ALPHA x AuxK + L1_LAMBDA x mean|z|; Adam with linear warm-up and final
   linear decay; the decoder-norm-changing part of its gradient removed, gradient clipping, unit-norm decoder
   after every step; autocast on CUDA; a checkpoint every CHECKPOINT_EVERY_STEPS steps, at each epoch end and on
   SIGUSR1/SIGTERM (then exit 75 so the sbatch wrapper requeues);
5. evaluate on the held-out slice, write model.pt, saelens/, history.json, training_curves.png, meta.json, then
   STORE_DIR/sae_run_id.txt, and delete the checkpoint.

AuxK (Gao et al. 2024): e = (x − x̂) detached; ê = W_dec · TopK_{k_aux}(pre-activations of dead latents), without
b_dec; loss = Σ‖e − ê‖² / Σ‖e − mean e‖² (normalised like the main FVU loss) x min(n_dead / k_aux, 1), with
k_aux = d_in / 2. A latent is dead when it has not fired in the last DEAD_TOKENS_WINDOW training tokens, a window
capped at a tenth of the run's training tokens so that short runs get one too (meta.json records the one used).

Several processes (torchrun; see distributed.py and README.md, "Training on several GPUs"): every rank holds
the whole SAE and trains on its part of each global step's batch (train_data.py says which tokens); one all-reduce
per step makes gradients, dead-latent counters, logged loss, BatchTopK threshold and the stop flag global, so every
rank steps identically and stops at the same step. Metrics are merged across ranks, so history.json is the global
one. Every rank loads the checkpoint; rank 0 alone writes checkpoints and outputs while the others wait at a
barrier. With one process nothing of this runs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_pipeline.distributed import Dist
from sae_pipeline.errors import PipelineError
from sae_pipeline.metrics import ReconstructionStats, dead_fraction, fvu
from sae_pipeline.preemption import StopFlag, StopRequested
from sae_pipeline.settings import TrainSettings
from sae_pipeline.store import (
    META_FILE,
    RUN_ID_FILE,
    SAE_RUN_ID_FILE,
    ActivationRun,
    Store,
    atomic_write_json,
    new_run_id,
    open_complete_run,
    read_json,
    validate_run_id,
)

if TYPE_CHECKING:
    from sae_pipeline.sae import BiasedTopKEngine
from sae_pipeline.train_data import TokenLoader

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
B_DEC_SAMPLE_TOKENS = 32_768
# settings that may change between a kill and the resume; every other one must match the checkpoint
RESUME_MAY_CHANGE = {
    "device",
    "store_dir",
    "run_id",
    "sae_run_id",
    "checkpoint_every_steps",
    "log_every_steps",
    "wandb_project",
    "model_id",
    "model_dtype",
    "layer_num",
    "layer_signature",
}
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def train_sae(
    settings: TrainSettings,
    run_id: str | None = None,
    sae_run_id: str | None = None,
    stop: StopFlag | None = None,
    dist: Dist | None = None,
) -> Path:
    """Train (or resume) one SAE; returns its folder STORE_DIR/runs/<sae_run_id>. ``dist``: this process's place
    in a torchrun launch (default: the only process)."""
    dist = dist or Dist()
    store = Store(settings.store_dir)
    run_id = validate_run_id(run_id or settings.run_id or store.read_pointer(RUN_ID_FILE))
    run, act_meta = open_complete_run(store, run_id)
    if (
        max(
            map(
                len,
                (settings.top_k, settings.n_latents_multiplier, settings.sae_architecture, settings.seed, settings.lr),
            )
        )
        > 1
    ):
        raise PipelineError("sweeps (lists of values) are not supported yet; give one value per variable")
    specs = ActivationRun.layer_specs(act_meta)
    if len(specs) > 1:
        raise PipelineError("training on a run of several layers is not supported yet")
    layer, d_in = specs[0].signature, specs[0].d_model
    data_seed = settings.data_seed if settings.data_seed is not None else settings.seed[0]
    n_latents = d_in * settings.n_latents_multiplier[0]
    if settings.top_k[0] >= n_latents:
        raise PipelineError(
            f"TOP_K={settings.top_k[0]} is not valid: use 1..{n_latents - 1} (below n_latents = "
            f"d_model {d_in} x N_LATENTS_MULTIPLIER {settings.n_latents_multiplier[0]})"
        )
    sae_run_id = validate_run_id(sae_run_id or settings.sae_run_id or new_run_id("sae"), "--sae_run_id")
    out = store.run_dir(sae_run_id)
    store.ensure_writable()
    if _finished(out, sae_run_id):
        if dist.is_main:
            store.write_pointer(sae_run_id, SAE_RUN_ID_FILE)
            print(f"training run {sae_run_id!r} is already finished ({out}); nothing to do", file=sys.stderr)
        return out

    # mi_crow, overcomplete, torchvision and matplotlib take seconds to import: only once the inputs are known good
    from sae_pipeline.export import export_saelens
    from sae_pipeline.plots import plot_training_curves
    from sae_pipeline.sae import PipelineSae, atomic_torch_save, load_torch_file

    device = dist.device(settings.device)
    dist.init(device)
    dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it

    loader = TokenLoader(
        run,
        layer,
        d_in,
        settings.batch_size_train,
        settings.holdout_fraction,
        data_seed,
        settings.shuffle_buffer_tokens,
        dist.rank,
        dist.world_size,
    )
    total_steps = loader.steps_per_epoch * settings.epochs
    window = min(settings.dead_tokens_window, max(settings.batch_size_train, loader.n_train * settings.epochs // 10))
    config = {
        **{k: v for k, v in settings.model_dump(mode="json").items() if k not in RESUME_MAY_CHANGE},
        "activation_run_id": run_id,
        "d_in": d_in,
        "n_latents": n_latents,
    }

    sae = PipelineSae(n_latents, d_in, settings.top_k[0], settings.sae_architecture[0])
    sae.context.lm_layer_signature, sae.context.model_id = layer, act_meta.get("model_id")
    eng: BiasedTopKEngine = sae.to_device(device).sae_engine
    opt = torch.optim.Adam(eng.parameters(), lr=settings.lr[0], fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, settings.lr_warmup_fraction, settings.lr_decay_fraction)
    )
    amp = AMP_DTYPES.get(settings.amp_dtype) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)  # training tokens since each fired
    epoch_stats, log_stats = ReconstructionStats(d_in, n_latents, device), ReconstructionStats(d_in, n_latents, device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, auxk loss, steps since last log, epoch loss
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "tokens": 0,
        "elapsed_s": 0.0,
        "history": {"steps": [], "epochs": []},
    }

    ckpt_path = out / CHECKPOINT_FILE
    for stale in out.glob(f".{CHECKPOINT_FILE}.*.tmp") if dist.is_main else ():  # left by a kill mid-write
        stale.unlink(missing_ok=True)
    if ckpt_path.is_file():
        ckpt = load_torch_file(ckpt_path)
        _check_same_config(ckpt.get("config", {}), config, sae_run_id)
        eng.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        since_fired.copy_(ckpt["since_fired"])
        epoch_stats.load_state_dict(ckpt["epoch_stats"])
        if dist.is_main:  # it holds every rank's tokens since the last log line; the other ranks start empty
            log_stats.load_state_dict(ckpt["log_stats"])
        sums.copy_(ckpt["sums"])
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        if dist.is_main:
            print(
                f"resumed from step {state['step']} of {total_steps} (epoch {state['epoch'] + 1}) using {ckpt_path}",
                file=sys.stderr,
            )
    else:
        torch.manual_seed(settings.seed[0])
        eng.initialize(geometric_median(loader.sample(B_DEC_SAMPLE_TOKENS).float()), settings.seed[0])
        dist.broadcast_module(eng)  # rank 0's b_dec (from its own sample) on every rank
        if dist.is_main:
            _write_meta(
                out,
                {
                    "status": "running",
                    "sae_run_id": sae_run_id,
                    "activation_run_id": run_id,
                    "config": config,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )

    def save_checkpoint() -> None:
        pending = dist.gather_stats(log_stats)  # every rank's tokens since the last log line
        if dist.is_main:
            atomic_torch_save(
                {
                    "config": config,
                    "model": eng.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "since_fired": since_fired,
                    "epoch_stats": epoch_stats.state_dict(),
                    "log_stats": pending.state_dict(),
                    "sums": sums,
                    "rng": torch.get_rng_state(),
                    "state": {**state, "elapsed_s": state["elapsed_s"] + time.time() - t_start},
                },
                ckpt_path,
            )

    def log_line() -> dict[str, Any]:
        n = max(float(sums[2]), 1.0)
        stats = dist.gather_stats(log_stats)  # log_stats itself with one process
        entry = {
            "step": state["step"],
            "epoch": state["epoch"],
            "tokens": state["tokens"],
            "loss": float(sums[0]) / n,
            "auxk_loss": float(sums[1]) / n,
            **_round(stats.result()),
            "dead_fraction": dead_fraction(since_fired, window),
            "lr": sched.get_last_lr()[0],
        }
        sums[:3] = 0
        epoch_stats.merge(stats)
        log_stats.reset()
        return entry

    wandb_run = _start_wandb(settings, sae_run_id, config) if dist.is_main else None
    stop = stop or StopFlag().install()
    k_aux = max(d_in // 2, 1)
    t_start = time.time()
    progress = _progress(loader.n_train * settings.epochs, state["tokens"], sae_run_id, disable=not dist.is_main)
    eng.train()
    while state["epoch"] < settings.epochs:
        for batch in loader.iter_epoch(state["epoch"], state["step_in_epoch"]):
            x = batch.to(device, non_blocking=True).float()
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                pre, z, x_hat = eng(x)
            x_hat, pre, z = x_hat.float(), pre.float(), z.float()
            main = fvu(x, x_hat)
            dead = since_fired >= window
            aux = auxk_loss(eng, pre, x, x_hat, dead, k_aux) if settings.auxk_alpha > 0 else main.new_zeros(())
            loss = main + settings.auxk_alpha * aux + settings.l1_lambda * z.abs().mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if dist.enabled:  # before unscale_: every rank then sees the same gradients (and inf check)
                fired, loss_v, aux_v, n_tokens, stopping = _all_reduce_step(dist, eng, x, z, loss, aux, stop)
            else:
                fired, loss_v, aux_v, n_tokens, stopping = (
                    (z != 0).any(dim=0),
                    loss.detach(),
                    aux.detach(),
                    x.shape[0],
                    None,
                )
            scaler.unscale_(opt)
            eng.remove_parallel_gradient()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(eng.parameters(), settings.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            eng.normalize_decoder()

            since_fired.add_(n_tokens).masked_fill_(fired, 0)
            log_stats.update(x, x_hat.detach(), z.detach())
            sums += torch.stack([loss_v, aux_v, loss.new_ones(()), loss_v]).double()
            state["step"] += 1
            state["step_in_epoch"] += 1
            state["tokens"] += n_tokens
            progress.update(n_tokens)
            if state["step"] % settings.log_every_steps == 0:
                entry = log_line()
                state["history"]["steps"].append(entry)
                progress.set_postfix(
                    fvu=f"{entry['fvu']:.3f}",
                    l0=f"{entry['l0']:.1f}",
                    dead=f"{entry['dead_fraction']:.2f}",
                    refresh=False,
                )
                if wandb_run is not None:
                    wandb_run.log(entry, step=state["step"])
            if state["step"] % settings.checkpoint_every_steps == 0:
                save_checkpoint()
            if stop.requested if stopping is None else stopping:
                save_checkpoint()
                progress.close()
                dist.barrier()  # no rank exits (and makes torchrun kill the others) before rank 0 has saved
                raise StopRequested(
                    f"stopped by {stop.signal_name or 'another rank'} at step {state['step']} of {total_steps}; "
                    f"checkpoint saved, rerun with --sae_run_id {sae_run_id} to continue"
                )
        if state["step"] % settings.log_every_steps:
            state["history"]["steps"].append(log_line())
        n_epoch_steps = max(state["step_in_epoch"], 1)
        state["history"]["epochs"].append(
            {
                "epoch": state["epoch"],
                "step": state["step"],
                "tokens": state["tokens"],
                "loss": float(sums[3]) / n_epoch_steps,
                **_round(epoch_stats.result()),
                "dead_fraction": dead_fraction(since_fired, window),
            }
        )
        sums[3] = 0
        epoch_stats.reset()
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        save_checkpoint()
    progress.close()
    elapsed = state["elapsed_s"] + time.time() - t_start

    holdout = evaluate_holdout(eng, loader, settings.batch_size_train, device, amp, dist)
    holdout["dead_fraction"] = dead_fraction(since_fired, window)
    if not dist.is_main:
        dist.barrier()  # rank 0 writes the outputs
        return out
    history = {**state["history"], "holdout": holdout}
    final = {"train": state["history"]["epochs"][-1], "holdout": holdout}
    if wandb_run is not None:
        wandb_run.log({f"holdout/{k}": v for k, v in holdout.items()}, step=state["step"])
        wandb_run.finish()

    sae.save(MODEL_FILE.removesuffix(".pt"), out)
    export_saelens(
        sae, out / "saelens", specs[0], act_meta, extra={"sae_run_id": sae_run_id, "activation_run_id": run_id}
    )
    atomic_write_json(out / "history.json", history)
    plot_training_curves(history, out / "training_curves.png", title=f"{sae_run_id} on {run_id}")
    _write_meta(
        out,
        {
            "status": "complete",
            "sae_run_id": sae_run_id,
            "activation_run_id": run_id,
            "model_id": act_meta.get("model_id"),
            "layer_signature": layer,
            "hook_side": act_meta.get("hook_side"),
            "d_in": d_in,
            "n_latents": n_latents,
            "k": settings.top_k[0],
            "architecture": settings.sae_architecture[0],
            "settings": settings.model_dump(mode="json"),
            "dead_tokens_window_used": window,
            "k_aux": k_aux,
            "total_steps": state["step"],
            "tokens_trained": state["tokens"],
            "n_train_tokens": loader.n_train,
            "n_holdout_tokens": loader.n_holdout,
            "device": str(device),
            "processes": dist.world_size,
            "elapsed_s": round(elapsed, 1),
            "final_metrics": final,
            "files": {
                "model": MODEL_FILE,
                "saelens": "saelens/",
                "history": "history.json",
                "curves": "training_curves.png",
            },
            "versions": _versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    store.write_pointer(sae_run_id, SAE_RUN_ID_FILE)
    ckpt_path.unlink(missing_ok=True)
    print(
        f"Trained SAE {sae_run_id}: {settings.sae_architecture[0]} with {n_latents} latents (k={settings.top_k[0]}) on "
        f"layer {layer} of activation run {run_id}, {state['step']} steps over {settings.epochs} epochs "
        f"({state['tokens']:,} tokens, {state['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s, {elapsed:.0f} s on "
        f"{device}). Held-out ({loader.n_holdout:,} tokens): FVU {holdout['fvu']:.4f}, L0 {holdout['l0']:.1f}, "
        f"never fired {holdout['never_fired_fraction']:.1%}; dead at the end (not fired in {window:,} tokens) "
        f"{holdout['dead_fraction']:.1%}. Outputs in {out}: model.pt (mi_crow TopKSae.load), saelens/, "
        f"history.json, meta.json, training_curves.png; {store.root / SAE_RUN_ID_FILE} updated."
    )
    dist.barrier()
    return out


def lr_factor(step: int, total: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up over the first steps, constant, then linear decay to 0 over the last steps."""
    warmup, decay = int(total * warmup_fraction), int(total * decay_fraction)
    if step < warmup:
        return (step + 1) / warmup
    if decay and step >= total - decay:
        return max(total - step, 0) / decay
    return 1.0


def auxk_loss(
    eng: BiasedTopKEngine, pre: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """Gao et al.'s AuxK on dead latents (module docstring); exactly 0 when nothing is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    e = (x - x_hat).detach()
    top = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    e_hat = codes @ eng.W_dec  # no decoder bias
    return fvu(e, e_hat) * min(n_dead / k_aux, 1.0)


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm; a robust centre for b_dec (outlier tokens barely move it, unlike the mean)."""
    guess = points.mean(dim=0)
    for _ in range(iters):
        weights = 1 / (points - guess).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - guess).norm() <= eps * max(float(guess.norm()), 1.0):
            return new
        guess = new
    return guess


def _all_reduce_step(
    dist: Dist,
    eng: BiasedTopKEngine,
    x: torch.Tensor,
    z: torch.Tensor,
    loss: torch.Tensor,
    aux: torch.Tensor,
    stop: StopFlag,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """One collective: gradients (token-weighted mean), latents fired anywhere, global loss and AuxK loss, the
    BatchTopK threshold (token-weighted mean), global token count and "any rank asked to stop"."""
    n = float(x.shape[0])
    params = [p for p in eng.parameters() if p.grad is not None]
    scalars = torch.stack(
        [
            loss.detach() * n,
            aux.detach() * n,
            eng.threshold.float() * n,
            loss.new_tensor(n),
            loss.new_tensor(float(stop.requested)),
        ]
    )
    flat = torch.cat([p.grad.flatten() * n for p in params] + [(z != 0).sum(dim=0).float(), scalars.float()])
    dist.all_reduce(flat)
    total, stopping = flat[-2:].tolist()
    at = 0
    for p in params:
        p.grad.copy_(flat[at : at + p.numel()].view_as(p) / total)
        at += p.numel()
    with torch.no_grad():
        eng.threshold.copy_(flat[-3] / total)
    return flat[at : at + z.shape[1]] > 0, flat[-5] / total, flat[-4] / total, int(total), stopping > 0


@torch.no_grad()
def evaluate_holdout(
    eng: BiasedTopKEngine,
    loader: TokenLoader,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """FVU, MSE, L0 and never-fired fraction on the held-out slice, in inference mode (BatchTopK: threshold);
    with several processes each rank measures its share of the shards and the statistics are merged."""
    eng.eval()
    stats = ReconstructionStats(eng.W_dec.shape[1], eng.W_dec.shape[0], device)
    for batch in loader.iter_holdout(batch_size):
        x = batch.to(device).float()
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            _, z, x_hat = eng(x)
        stats.update(x, x_hat.float(), z.float())
    eng.train()
    return _round((dist or Dist()).gather_stats(stats).result())


def _finished(out: Path, sae_run_id: str) -> bool:
    if not (out / META_FILE).is_file():
        if out.is_dir() and not (out / CHECKPOINT_FILE).is_file() and any(out.iterdir()):
            raise PipelineError(
                f"--sae_run_id {sae_run_id!r}: {out} exists and is not a training run; choose another id"
            )
        return False
    meta = read_json(out / META_FILE)
    if meta.get("kind") != "sae":
        raise PipelineError(
            f"--sae_run_id {sae_run_id!r}: {out} holds a run of kind {meta.get('kind')!r}, not an "
            "SAE training run; choose another id"
        )
    return meta.get("status") == "complete"


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], sae_run_id: str) -> None:
    def shown(value: Any) -> str:  # as the variable is written: TOP_K=16,32
        return ",".join(map(str, value)) if isinstance(value, list | tuple) else repr(value)

    diffs = [
        f"{k.upper()}={shown(current.get(k))} (checkpoint: {shown(saved.get(k))})"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise PipelineError(
            f"training run {sae_run_id!r} was started with other settings: {', '.join(diffs)}; "
            "rerun with the original settings, or choose a new --sae_run_id"
        )


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(out / META_FILE, {"kind": "sae", **meta})


def _round(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _versions() -> dict[str, str]:
    try:
        from sae_pipeline.store import package_versions
    except ImportError:  # older store.py
        return {"torch": torch.__version__}
    return package_versions()


def _progress(total_tokens: int, done: int, name: str, disable: bool = False):
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
        initial=done,
        unit="tok",
        unit_scale=True,
        desc=f"train {name}",
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )


def _start_wandb(settings: TrainSettings, sae_run_id: str, config: dict[str, Any]):
    """Only when WANDB_PROJECT is set; the same W&B run continues after a resume."""
    if not settings.wandb_project:
        return None
    import wandb

    return wandb.init(project=settings.wandb_project, id=sae_run_id, name=sae_run_id, resume="allow", config=config)


__all__ = ["train_sae", "auxk_loss", "geometric_median", "lr_factor", "evaluate_holdout"]

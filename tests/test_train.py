"""The trainer: AuxK, schedule, b_dec init, outputs, bad input, stop/resume in-process and after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae

from sae_pipeline.errors import PipelineError
from sae_pipeline.preemption import StopFlag, StopRequested
from sae_pipeline.sae import PipelineSae
from sae_pipeline.settings import TrainSettings
from sae_pipeline.store import SAE_RUN_ID_FILE
from sae_pipeline.train import auxk_loss, geometric_median, lr_factor, train_sae
from tests.helpers import REPO
from tests.sae_fixtures import LAYER, make_run

SMALL = dict(
    batch_size_train=128,
    epochs=3,
    lr=2e-3,
    top_k=4,
    n_latents_multiplier=4,
    log_every_steps=5,
    checkpoint_every_steps=20,
    device="cpu",
)


def _settings(store, **kw):
    return TrainSettings(store_dir=store, **{**SMALL, **kw})


def _engine(n=64, d=16, k=4):
    sae = PipelineSae(n, d, k)
    sae.sae_engine.initialize(torch.randn(d), seed=0)
    return sae.sae_engine


# -- pieces ---------------------------------------------------------------------------------------------------------
def test_auxk_is_zero_when_nothing_is_dead():
    eng = _engine()
    x = torch.randn(32, 16)
    pre, z, x_hat = eng(x)
    loss = auxk_loss(eng, pre, x, x_hat, torch.zeros(64, dtype=torch.bool), k_aux=8)
    assert float(loss) == 0.0


def test_auxk_matches_gao_definition_without_decoder_bias():
    torch.manual_seed(0)
    eng = _engine()
    with torch.no_grad():
        eng.b_dec.fill_(5.0)  # a b_dec inside ê would make this loss huge
    x = torch.randn(32, 16) + 5
    pre, z, x_hat = eng(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    loss = auxk_loss(eng, pre, x, x_hat, dead, k_aux=8)
    e = (x - x_hat).detach()
    top = pre[:, :10].topk(8, dim=-1)
    codes = torch.zeros(32, 10).scatter(-1, top.indices, torch.relu(top.values))
    e_hat = codes @ eng.W_dec[:10]
    expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * min(10 / 8, 1.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # fewer dead latents than k_aux: scaled down by n_dead / k_aux
    few = torch.zeros(64, dtype=torch.bool)
    few[:2] = True
    small = auxk_loss(eng, pre, x, x_hat, few, k_aux=8)
    top2 = pre[:, :2].topk(2, dim=-1)
    e_hat2 = torch.zeros(32, 2).scatter(-1, top2.indices, torch.relu(top2.values)) @ eng.W_dec[:2]
    assert float(small) == pytest.approx(
        float((e - e_hat2).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * 2 / 8), rel=1e-5
    )
    # the gradient reaches only the dead latents' encoder rows
    loss.backward()
    grad_rows = eng.W_enc.grad.abs().sum(1)
    assert (grad_rows[10:] == 0).all() and (grad_rows[:10] > 0).any()


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:80])
    assert f[80] == pytest.approx(1.0) and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))
    assert lr_factor(5, 100, 0.0, 0.0) == 1.0


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.randn(200, 4) * 0.1 + 1.0, torch.full((20, 4), 500.0)])
    assert (geometric_median(pts) - 1.0).abs().max() < 0.2
    assert (pts.mean(0) - 1.0).abs().max() > 40


# -- the whole step -------------------------------------------------------------------------------------------------
def test_train_writes_every_output_and_mi_crow_loads_the_model(tmp_path, capsys):
    make_run(tmp_path, shard_sizes=(1500, 1000, 1200))
    out = train_sae(_settings(tmp_path), None, "sae_a")
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "sae_a"
    assert not (out / "checkpoint.pt").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "sae" and meta["status"] == "complete" and meta["k"] == 4
    assert (meta["d_in"], meta["n_latents"], meta["activation_run_id"]) == (32, 128, "acts")
    assert meta["total_steps"] == 3 * -(-meta["n_train_tokens"] // 128)
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["epochs"]) == 3 and hist["steps"][-1]["step"] == meta["total_steps"]
    for key in ("loss", "mse", "fvu", "l0", "dead_fraction"):
        assert key in hist["epochs"][-1] and key in hist["steps"][0]
    assert hist["epochs"][-1]["fvu"] < hist["epochs"][0]["fvu"] < 1.0
    ho = meta["final_metrics"]["holdout"]
    assert ho["fvu"] < 0.8 and ho["l0"] == pytest.approx(4.0) and 0 <= ho["never_fired_fraction"] <= 1
    assert ho == hist["holdout"]
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "saelens" / "cfg.json").is_file() and (out / "saelens" / "sae_weights.safetensors").is_file()
    plain = TopKSae.load(out / "model.pt")
    assert plain.context.lm_layer_signature == LAYER and plain.sae_engine.top_k == 4
    ours = PipelineSae.load(out / "model.pt")
    ours.sae_engine.eval()
    x = torch.randn(20, 32)
    torch.testing.assert_close(plain.encode(x), ours.encode(x), atol=1e-4, rtol=1e-4)
    summary = capsys.readouterr().out
    assert "Held-out" in summary and "sae_a" in summary
    # rerunning a finished run changes nothing
    mtime = (out / "model.pt").stat().st_mtime_ns
    train_sae(_settings(tmp_path), None, "sae_a")
    assert (out / "model.pt").stat().st_mtime_ns == mtime


def test_batchtopk_trains_end_to_end(tmp_path):
    make_run(tmp_path, shard_sizes=(1500, 1000))
    out = train_sae(_settings(tmp_path, sae_architecture="batchtopk", epochs=2), None, "btk")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["architecture"] == "batchtopk"
    assert PipelineSae.load(out / "model.pt").sae_engine.threshold > 0
    assert 1.0 < meta["final_metrics"]["holdout"]["l0"] < 12.0  # k on average, via the threshold


def test_top_k_not_below_n_latents_is_refused(tmp_path):
    make_run(tmp_path, d=8)
    with pytest.raises(PipelineError, match=r"TOP_K=32 .*1\.\.31"):
        train_sae(_settings(tmp_path, top_k=32), None, "bad")
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / SAE_RUN_ID_FILE).exists()


def test_id_of_an_activation_run_is_refused(tmp_path):
    make_run(tmp_path)
    with pytest.raises(PipelineError, match="not an SAE training run"):
        train_sae(_settings(tmp_path), None, "acts")


def test_corrupted_shard_is_named_and_nothing_is_written(tmp_path):
    run = make_run(tmp_path)
    shard = run.shard_dir(1) / LAYER / "activations.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(PipelineError, match="batch_1"):
        train_sae(_settings(tmp_path), None, "c")
    assert not (tmp_path / SAE_RUN_ID_FILE).exists()
    assert not (tmp_path / "runs" / "c" / "model.pt").exists()


def test_stop_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    make_run(tmp_path)
    reference = train_sae(_settings(tmp_path), None, "ref")
    ref_meta = json.loads((reference / "meta.json").read_text())

    class StopAt(StopFlag):
        """Requests a stop once the trainer has asked ``requested`` n times (once per step)."""

        def __init__(self, n):
            super().__init__()
            self.n = n

        @property
        def requested(self):
            self.n -= 1
            if self.n == 0:
                self.signal_name = "test"
            return self.n <= 0

    with pytest.raises(StopRequested, match="stopped by test at step 31 "):
        train_sae(_settings(tmp_path), None, "res", stop=StopAt(31))
    assert (tmp_path / "runs" / "res" / "checkpoint.pt").is_file()
    with pytest.raises(PipelineError, match=r"LR=0.0005 \(checkpoint: 0.002\)"):
        train_sae(_settings(tmp_path, lr=5e-4), None, "res")
    capsys.readouterr()
    out = train_sae(_settings(tmp_path, checkpoint_every_steps=7), None, "res")
    assert "resumed from step 31" in capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["total_steps"] == ref_meta["total_steps"]
    for split in ("train", "holdout"):
        for key in ("fvu", "mse", "l0"):
            assert meta["final_metrics"][split][key] == pytest.approx(
                ref_meta["final_metrics"][split][key], rel=1e-3, abs=1e-4
            )


def test_sigkill_mid_training_then_rerun_resumes(tmp_path):
    """The real script as a subprocess: killed with SIGKILL after a checkpoint, rerun with the same id."""
    make_run(tmp_path, shard_sizes=(3000, 2500, 3500))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAE_", "WANDB_", "RUN_ID"))}
    env.update(
        STORE_DIR=str(tmp_path),
        DEVICE="cpu",
        EPOCHS="8",
        BATCH_SIZE_TRAIN="64",
        TOP_K="4",
        LR="2e-3",
        N_LATENTS_MULTIPLIER="4",
        CHECKPOINT_EVERY_STEPS="150",
        LOG_EVERY_STEPS="50",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, str(REPO / "02_train_sae.py"), "--sae_run_id", "killed"]
    ckpt = tmp_path / "runs" / "killed" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished (or failed) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / SAE_RUN_ID_FILE).exists()
    assert json.loads((tmp_path / "runs" / "killed" / "meta.json").read_text())["status"] == "running"

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step " in done.stderr
    resumed_at = int(done.stderr.split("resumed from step ")[1].split()[0])
    assert resumed_at > 0  # a checkpoint existed: periodic (every 150 steps) or at the end of epoch 1
    meta = json.loads((tmp_path / "runs" / "killed" / "meta.json").read_text())
    steps_per_epoch = -(-meta["n_train_tokens"] // 64)
    assert meta["status"] == "complete" and meta["total_steps"] == 8 * steps_per_epoch > resumed_at
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "killed"

    # the same settings without a kill (in-process, to save a second interpreter start) give the same result
    ref_out = train_sae(
        _settings(tmp_path, epochs=8, batch_size_train=64, checkpoint_every_steps=150, log_every_steps=50),
        None,
        "clean",
    )
    ref = json.loads((ref_out / "meta.json").read_text())
    assert ref["total_steps"] == meta["total_steps"]
    for key in ("fvu", "l0"):
        assert meta["final_metrics"]["holdout"][key] == pytest.approx(
            ref["final_metrics"]["holdout"][key], rel=1e-2, abs=1e-3
        )

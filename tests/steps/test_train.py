"""The trainer: AuxK, schedule, b_dec init, outputs, bad input, exact stop/resume and the checkpoint commit, sweeps
(equal to their SAEs trained alone), layers, SLURM array shares, memory. Kills of the real script: tests/e2e."""

import json

import pytest
import torch
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.preemption import StopFlag, StopRequested
from sae_pipeline.sae.loader import TokenLoader
from sae_pipeline.sae.model import PipelineSae
from sae_pipeline.sae.trainer import auxk_loss, geometric_median, lr_factor
from sae_pipeline.settings import TrainSettings
from sae_pipeline.steps.train import train_sae
from sae_pipeline.store.runs import SAE_RUN_ID_FILE, Store
from sae_pipeline.store.training import training_runs
from tests.sae_fixtures import LAYER, LAYER3, RUN_FOLDER, make_run

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
    assert small.item() == pytest.approx(
        ((e - e_hat2).pow(2).sum() / (e - e.mean(0)).pow(2).sum() * 2 / 8).item(), rel=1e-5
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
def _tensors(path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, weights_only=True)
    out = {f"sae/{k}": v for k, v in payload["sae_state_dict"].items()}
    out.update({f"extra/{k}": v for k, v in payload["pipeline_sae"].items() if isinstance(v, torch.Tensor)})
    out["extra/threshold"] = torch.tensor(payload["pipeline_sae"]["threshold"])
    return out


def assert_same_model(a, b) -> None:
    """Two runs' model.pt equal in every tensor (on CPU the trainer is deterministic: bit for bit) and histories."""
    ta, tb = _tensors(a / "model.pt"), _tensors(b / "model.pt")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), (a.name, b.name, key)
    assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())


def test_train_writes_every_output_and_mi_crow_loads_the_model(tmp_path, capsys):
    make_run(tmp_path, shard_sizes=(1500, 1000, 1200))
    out = train_sae(_settings(tmp_path), None, "sae_a")
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "sae_a"
    assert sorted(p.name for p in out.iterdir()) == RUN_FOLDER
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "sae" and meta["status"] == "complete" and meta["top_k"] == 4 and meta["sweep_id"] is None
    assert (meta["d_in"], meta["n_latents"], meta["activation_run_id"]) == (32, 128, "acts")
    assert (meta["layer_signature"], meta["layer_num"], meta["seed"], meta["data_seed"]) == (LAYER, 1, 42, 42)
    full, rem = divmod(meta["n_train_tokens"], 128)  # a remainder under half a batch joins the last step
    assert meta["total_steps"] == 3 * (full + (rem >= 64))
    timing = meta["timing"]
    assert list(timing["stages_s"]) == ["read", "step", "checkpoint", "evaluate"]
    assert 0 < timing["stages_s"]["step"] < timing["wall_s"] and "gpu_busy" not in timing  # CPU: no GPU fields
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
    assert "Held-out" in summary and "sae_a" in summary and "read " in summary and "checkpoint " in summary
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
    with pytest.raises(PipelineError, match=r"TOP_K=40 .*1\.\.31"):  # one value of a sweep
        train_sae(_settings(tmp_path, top_k=(4, 40)), None, "bad")
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / SAE_RUN_ID_FILE).exists()


def test_id_of_an_activation_run_is_refused(tmp_path):
    make_run(tmp_path)
    with pytest.raises(PipelineError, match="not a training run"):
        train_sae(_settings(tmp_path), None, "acts")


def test_corrupted_shard_is_named_and_nothing_is_written(tmp_path):
    run = make_run(tmp_path)
    shard = run.shard_dir(1) / LAYER / "activations.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(PipelineError, match="batch_1"):
        train_sae(_settings(tmp_path), None, "c")
    assert not (tmp_path / SAE_RUN_ID_FILE).exists()
    assert not (tmp_path / "runs" / "c" / "model.pt").exists()


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


def test_stop_then_resume_is_the_uninterrupted_run_bit_for_bit(tmp_path, capsys):
    make_run(tmp_path)
    reference = train_sae(_settings(tmp_path), None, "ref")
    with pytest.raises(StopRequested, match="stopped by test at step 31 "):
        train_sae(_settings(tmp_path), None, "res", stop=StopAt(31))
    res = tmp_path / "runs" / "res"
    assert json.loads((res / "checkpoint.json").read_text())["step"] == 31
    assert sorted(p.name for p in res.glob("checkpoint_*.pt")) == ["checkpoint_31.pt"]  # older ones deleted
    with pytest.raises(PipelineError, match=r"LR=0.0005 \(started with 0.002\)"):
        train_sae(_settings(tmp_path, lr=5e-4), None, "res")
    capsys.readouterr()
    out = train_sae(_settings(tmp_path, checkpoint_every_steps=7), None, "res")
    assert "resumed from step 31" in capsys.readouterr().err
    assert_same_model(out, reference)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == []


class Killed(BaseException):
    """What a SIGKILL does to the process at this point (nothing after it runs)."""


def test_a_kill_between_two_saes_checkpoints_resumes_both_from_the_committed_step(tmp_path, monkeypatch):
    """The window the commit protocol exists for: one SAE's checkpoint of step 40 written, the other's not, no
    commit. Both resume from the step before (38, an epoch end: 19 steps per epoch) and end like the uninterrupted
    sweep; a kill after the last commit (57), before the older checkpoints are deleted, resumes from it."""
    import sae_pipeline.steps.train as sae_mod
    import sae_pipeline.store.training as store_mod

    make_run(tmp_path)
    sweep = dict(top_k=(4, 8), checkpoint_every_steps=20)
    train_sae(_settings(tmp_path, **sweep), None, "ref")
    real_save = sae_mod.atomic_torch_save
    writes = []

    def save_then_die(obj, path):
        writes.append(path.name)
        if path.name == "checkpoint_40.pt" and writes.count("checkpoint_40.pt") == 2:
            raise Killed
        real_save(obj, path)

    monkeypatch.setattr(sae_mod, "atomic_torch_save", save_then_die)
    with pytest.raises(Killed):
        train_sae(_settings(tmp_path, **sweep), None, "sw")
    first, second = tmp_path / "runs" / "sw.L1.k4.x4.topk.s42", tmp_path / "runs" / "sw.L1.k8.x4.topk.s42"
    assert json.loads((tmp_path / "runs" / "sw" / "checkpoint.json").read_text())["step"] == 38
    assert [p.name for p in sorted(first.glob("checkpoint_*.pt"))] == ["checkpoint_38.pt", "checkpoint_40.pt"]
    assert [p.name for p in sorted(second.glob("checkpoint_*.pt"))] == ["checkpoint_38.pt"]
    monkeypatch.setattr(sae_mod, "atomic_torch_save", real_save)

    real_remove = store_mod.TrainingRun.remove_checkpoints

    def remove_then_die(self, keep=None):
        if keep == 57:
            raise Killed
        real_remove(self, keep)

    monkeypatch.setattr(store_mod.TrainingRun, "remove_checkpoints", remove_then_die)
    with pytest.raises(Killed):
        train_sae(_settings(tmp_path, **sweep), None, "sw")
    assert json.loads((tmp_path / "runs" / "sw" / "checkpoint.json").read_text())["step"] == 57
    assert [p.name for p in sorted(second.glob("checkpoint_*.pt"))] == ["checkpoint_40.pt", "checkpoint_57.pt"]
    monkeypatch.setattr(store_mod.TrainingRun, "remove_checkpoints", real_remove)

    train_sae(_settings(tmp_path, **sweep), None, "sw")
    for member in ("L1.k4.x4.topk.s42", "L1.k8.x4.topk.s42"):
        assert_same_model(tmp_path / "runs" / f"sw.{member}", tmp_path / "runs" / f"ref.{member}")


def test_an_sae_of_a_sweep_equals_the_same_sae_trained_alone(tmp_path, capsys):
    """One pass, four SAEs (k 4, 8 x seeds 1, 2): each equals the SAE trained alone with its k, its seed and the
    sweep's data seed (the first SEED); sweep.json lists them with their held-out metrics."""
    make_run(tmp_path)
    out = train_sae(_settings(tmp_path, top_k=(4, 8), seed=(1, 2), epochs=2), None, "sw")
    assert out == tmp_path / "runs" / "sw" and sorted(p.name for p in out.iterdir()) == ["frontier.png", "sweep.json"]
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "sw"
    assert "Sweep sw complete: 4 SAEs" in capsys.readouterr().out
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["kind"] == "sweep" and sweep["status"] == "complete" and sweep["data_seed"] == 1
    ids = [m["sae_run_id"] for m in sweep["members"]]
    assert ids == ["sw.L1.k4.x4.topk.s1", "sw.L1.k4.x4.topk.s2", "sw.L1.k8.x4.topk.s1", "sw.L1.k8.x4.topk.s2"]
    assert [r.run_id for r in training_runs(Store(tmp_path), "sw")] == ids
    assert all(0 < m["holdout"]["fvu"] < 1 for m in sweep["members"])
    meta = json.loads((tmp_path / "runs" / ids[3] / "meta.json").read_text())
    assert (meta["sweep_id"], meta["top_k"], meta["seed"], meta["data_seed"]) == ("sw", 8, 2, 1)
    alone = train_sae(_settings(tmp_path, top_k=8, seed=2, data_seed=1, epochs=2), None, "alone")
    assert_same_model(tmp_path / "runs" / ids[3], alone)
    other = tmp_path / "runs" / ids[1]
    assert not torch.equal(
        _tensors(other / "model.pt")["sae/dictionary._weights"], _tensors(alone / "model.pt")["sae/dictionary._weights"]
    )


def test_layers_default_to_every_layer_of_the_run_and_a_subset_must_be_in_it(tmp_path):
    make_run(tmp_path, layers=(LAYER, LAYER3))
    out = train_sae(_settings(tmp_path, epochs=1), None, "all")
    assert [m["layer_num"] for m in json.loads((out / "sweep.json").read_text())["members"]] == [1, 3]
    sub = train_sae(_settings(tmp_path, epochs=1, layer_num=3), None, "three")
    assert json.loads((sub / "meta.json").read_text())["layer_signature"] == LAYER3  # one SAE: a plain run
    with pytest.raises(PipelineError, match=r"LAYER_NUM=3,5 is not valid: activation run 'acts' holds LAYER_NUM 1, 3"):
        train_sae(_settings(tmp_path, layer_num=(3, 5)), None, "bad")
    with pytest.raises(PipelineError, match=r"LAYER_SIGNATURE=nope is not valid: .* holds LAYER_SIGNATURE " + LAYER):
        train_sae(_settings(tmp_path, layer_signature="nope"), None, "bad")
    assert not (tmp_path / "runs" / "bad").exists()


def test_an_array_splits_the_sweep_and_its_last_task_completes_it(tmp_path, capsys):
    make_run(tmp_path)
    grid = dict(top_k=(4, 8), seed=(1, 2), epochs=1, train_task_count=2)
    with pytest.raises(StopRequested):
        train_sae(_settings(tmp_path, **grid, train_task_id=1), None, "arr", stop=StopAt(5))
    assert (tmp_path / "runs" / "arr" / "checkpoint.task1of2.json").is_file()
    with pytest.raises(PipelineError, match=r"checkpointed by another split of the sweep \(checkpoint.task1of2"):
        train_sae(_settings(tmp_path, top_k=(4, 8), seed=(1, 2), epochs=1), None, "arr")
    train_sae(_settings(tmp_path, **grid, train_task_id=0), None, "arr")
    runs = {r.run_id: r for r in training_runs(Store(tmp_path), "arr")}
    assert [r.status() for r in runs.values()] == ["complete", "running", "complete", "running"]  # 0, 2 of 0..3
    assert "Task 0 of 2 of sweep arr done" in capsys.readouterr().out
    assert not (tmp_path / SAE_RUN_ID_FILE).exists()
    train_sae(_settings(tmp_path, **grid, train_task_id=1), None, "arr")
    assert all(r.status() == "complete" for r in runs.values())
    assert json.loads((tmp_path / "runs" / "arr" / "sweep.json").read_text())["status"] == "complete"
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "arr"
    assert sorted(p.name for p in (tmp_path / "runs" / "arr").iterdir()) == ["frontier.png", "sweep.json"]
    train_sae(_settings(tmp_path, **grid, train_task_id=0), None, "arr")  # a finished share: nothing to do
    assert "already finished" in capsys.readouterr().err


def test_ids_holding_other_runs_or_settings_are_refused(tmp_path):
    make_run(tmp_path)
    train_sae(_settings(tmp_path, epochs=1), None, "single")
    with pytest.raises(PipelineError, match=r"'single' was started with other settings: TOP_K=4,8 \(started with 4\)"):
        train_sae(_settings(tmp_path, epochs=1, top_k=(4, 8)), None, "single")
    with pytest.raises(StopRequested):
        train_sae(_settings(tmp_path, epochs=1, top_k=(4, 8)), None, "sw", stop=StopAt(3))
    with pytest.raises(PipelineError, match=r"'sw' was started with other settings: TOP_K=4 \(started with 4,8\)"):
        train_sae(_settings(tmp_path, epochs=1), None, "sw")
    with pytest.raises(PipelineError, match=r"TOP_K=4,16 \(started with 4,8\)"):
        train_sae(_settings(tmp_path, epochs=1, top_k=(4, 16)), None, "sw")
    (tmp_path / "runs" / "junk").mkdir()
    (tmp_path / "runs" / "junk" / "notes.txt").write_text("mine\n")
    with pytest.raises(PipelineError, match=r"'junk': .* exists and is not a training run"):
        train_sae(_settings(tmp_path, epochs=1, top_k=(4, 8)), None, "junk")
    assert sorted(p.name for p in (tmp_path / "runs" / "junk").iterdir()) == ["notes.txt"]


def test_a_sweep_that_does_not_fit_in_memory_says_how_to_split_it(tmp_path, monkeypatch):
    import psutil

    run = make_run(tmp_path)
    settings = _settings(tmp_path, top_k=(4, 8), seed=(1, 2, 3))  # 6 SAEs of 128 latents x 32, batch 128
    state = 4 * 4 * (2 * 128 * 32 + 128 + 32) + 24 * 128  # weights, gradients, Adam; counters
    activations = 4 * 10 * 128 * 128
    loader = TokenLoader(run, LAYER, 32, 128, settings.holdout_fraction, 42, settings.shuffle_buffer_tokens)
    free = activations + 2 * state + loader.host_bytes()  # room for two SAEs

    class Free:
        available = free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free)
    with pytest.raises(PipelineError) as info:
        train_sae(settings, None, "big")
    message = str(info.value)
    assert "6 SAE(s) this process trains need about" in message and "\n" not in message
    assert "SLURM array of 3 tasks (sbatch --array=0-2 submit_train_sae.sh)" in message
    assert not (tmp_path / "runs" / "big").exists() and not list((tmp_path / "runs").glob("big.*"))


def test_complete_saes_are_never_retrained_or_rewritten(tmp_path, monkeypatch):
    """A kill while the outputs are written (one SAE complete, the other not): the rerun writes the other one only.
    A share run again after another split completed part of it trains only what is missing."""
    import sae_pipeline.steps.train as train_mod

    make_run(tmp_path)
    sweep = dict(top_k=(4, 8), epochs=1)
    real_write = train_mod.write_outputs

    def write_one_then_die(run, *args):
        if run.run_id.endswith("k8.x4.topk.s42"):
            raise Killed
        real_write(run, *args)

    monkeypatch.setattr(train_mod, "write_outputs", write_one_then_die)
    with pytest.raises(Killed):
        train_sae(_settings(tmp_path, **sweep), None, "sw")
    monkeypatch.setattr(train_mod, "write_outputs", real_write)
    first = tmp_path / "runs" / "sw.L1.k4.x4.topk.s42"
    stamp = (first / "model.pt").stat().st_mtime_ns
    train_sae(_settings(tmp_path, **sweep), None, "sw")
    assert (first / "model.pt").stat().st_mtime_ns == stamp
    train_sae(_settings(tmp_path, **sweep), None, "ref")
    for member in ("L1.k4.x4.topk.s42", "L1.k8.x4.topk.s42"):
        assert_same_model(tmp_path / "runs" / f"sw.{member}", tmp_path / "runs" / f"ref.{member}")

    train_sae(_settings(tmp_path, **sweep, train_task_id=0, train_task_count=2), None, "split")
    done = tmp_path / "runs" / "split.L1.k4.x4.topk.s42"
    stamp = (done / "model.pt").stat().st_mtime_ns
    train_sae(_settings(tmp_path, **sweep), None, "split")  # the whole sweep in one job: only the k=8 SAE is left
    assert (done / "model.pt").stat().st_mtime_ns == stamp
    assert_same_model(tmp_path / "runs" / "split.L1.k8.x4.topk.s42", tmp_path / "runs" / "ref.L1.k8.x4.topk.s42")
    assert (tmp_path / SAE_RUN_ID_FILE).read_text().strip() == "split"

"""STREAM=1: a streamed sweep trains on exactly the tokens, values and order of a cached one (its SAEs equal the
cached run's bit for bit on CPU), stores no activations, says where it came from, and is refused by step 3 with
what step 3 needs. Kills and resumes of the real script: tests/e2e/test_stream_resume.py."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest
import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.preemption import StopRequested
from sae_pipeline.settings import CaptureSettings, EvalSettings, StreamSettings, TrainSettings
from sae_pipeline.steps.capture import save_activations
from sae_pipeline.steps.evaluate import evaluate_sae
from sae_pipeline.steps.stream import open_source, open_stream_loaders, plan_stream, stream_sae
from sae_pipeline.steps.train import train_sae
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import RUN_ID_FILE, SAE_RUN_ID_FILE, Store
from sae_pipeline.store.training import training_runs
from tests.helpers import REPO, SAMPLE, small_filesystem, train_env
from tests.sae_fixtures import RUN_FOLDER
from tests.steps.test_train import assert_same_model
from tests.steps.test_train_distributed import _torchrun

CAPTURE = dict(
    hf_dataset=str(SAMPLE),
    device="cpu",
    data_limit=90,
    max_length=32,
    batch_size_save=7,
    docs_per_shard=25,
    layer_num="1,2",
)
TRAIN = dict(batch_size_train=128, epochs=2, top_k="4,8", n_latents_multiplier=2, lr=2e-3, log_every_steps=3)
BUFFER = 1200  # tokens: about a shard and a half, so groups span shards


def _stream_settings(tiny_model, store, **over) -> StreamSettings:
    values = {**CAPTURE, **TRAIN, "stream": True, "stream_buffer_tokens": BUFFER, **over}
    return StreamSettings(model_id=str(tiny_model), store_dir=store, **values)


@pytest.fixture(scope="module")
def cached_and_streamed(tiny_model, tmp_path_factory):
    """The same sweep (2 layers x 2 TOP_Ks), trained on a capture and streamed."""
    cached, streamed = tmp_path_factory.mktemp("cached"), tmp_path_factory.mktemp("streamed")
    save_activations(CaptureSettings(model_id=str(tiny_model), store_dir=cached, **CAPTURE), run_id="acts")
    train = TrainSettings(store_dir=cached, shuffle_buffer_tokens=BUFFER, device="cpu", layer_num="1,2", **TRAIN)
    train_sae(train, None, "sw")
    stream_sae(_stream_settings(tiny_model, streamed), "sw")
    return cached, streamed


def test_a_streamed_sweep_equals_the_sweep_trained_on_a_capture_of_the_same_settings(cached_and_streamed):
    cached, streamed = cached_and_streamed
    got, want = training_runs(Store(streamed), "sw"), training_runs(Store(cached), "sw")
    assert [r.run_id for r in got] == [r.run_id for r in want] and len(got) == 4
    for a, b in zip(got, want):
        assert sorted(p.name for p in a.dir.iterdir()) == RUN_FOLDER
        hist_a, hist_b = (json.loads((r.dir / "history.json").read_text()) for r in (a, b))
        assert hist_a["steps"] == hist_b["steps"] and hist_a["epochs"] == hist_b["epochs"]
        (a.dir / "history.json").write_text(json.dumps({**hist_a, "holdout": None}))
        (b.dir / "history.json").write_text(json.dumps({**hist_b, "holdout": None}))
        assert_same_model(a.dir, b.dir)  # every tensor of model.pt torch.equal
        held_a, held_b = (r.read_meta()["final_metrics"]["holdout"] for r in (a, b))
        assert held_a["n_tokens"] == held_b["n_tokens"]  # the same held-out tokens, forwarded alone
        assert held_a["fvu"] == pytest.approx(held_b["fvu"], rel=1e-3)
    assert (streamed / SAE_RUN_ID_FILE).read_text().strip() == "sw"


def test_a_streamed_run_says_it_streamed_and_from_what_and_stores_no_activations(cached_and_streamed, tiny_model):
    _, streamed = cached_and_streamed
    meta = training_runs(Store(streamed), "sw")[0].read_meta()
    assert meta["activation_run_id"] is None and meta["model_id"] == str(tiny_model)
    source = meta["streamed"]
    assert source["dataset"]["name"] == str(SAMPLE) and source["dataset"]["limit"] == 90
    assert [layer["layer_num"] for layer in source["layers"]] == [1, 2] and source["max_length"] == 32
    assert source["shards_forwarded_by_this_process"] > 0 and source["forward_s"] > 0
    cfg = json.loads((training_runs(Store(streamed), "sw")[0].saelens_dir / "cfg.json").read_text())["metadata"]
    assert cfg["model_name"] == str(tiny_model) and cfg["dataset_path"] == str(SAMPLE)
    files = [p for p in streamed.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "activations.safetensors" or p.parent.name.startswith("batch_")]
    assert not (streamed / RUN_ID_FILE).exists()
    outputs = set(RUN_FOLDER) - {"saelens"} | {"cfg.json", "sae_weights.safetensors"}  # an SAE's folder's files
    assert {p.name for p in files} == outputs | {"sweep.json", "frontier.png", SAE_RUN_ID_FILE}


def test_a_streamed_run_completes_on_a_disk_smaller_than_its_activations(tiny_model, tmp_path):
    over = dict(data_limit=400, layer_num="1", top_k="4", epochs=1, store_dtype="float32", checkpoint_every_steps=10)
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        out = stream_sae(_stream_settings(tiny_model, disk, **over), "small")
        meta = json.loads((out / "meta.json").read_text())
        used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
    activations = (meta["n_train_tokens"] + meta["n_holdout_tokens"]) * 64 * 4  # what a float32 capture would hold
    assert meta["status"] == "complete" and activations > 2 * (1 << 20) > 2 * used


def test_a_streamed_run_trains_on_the_multiset_of_token_ids_a_capture_stores(cached_and_streamed, tiny_model):
    """Every shard's training rows (before the held-out tail) carry the token ids of the cached run's, no padding
    and no special token among them."""
    cached, streamed = cached_and_streamed
    settings = _stream_settings(tiny_model, streamed)
    source = open_source(settings, torch.device("cpu"))
    loaders = open_stream_loaders(plan_stream(settings, source, "ids"), torch.device("cpu"), _one_process())
    run = ActivationRun(Store(cached), "acts")
    layer = next(iter(loaders))
    got, want = Counter(), Counter()
    for shard in loaders[layer].shards:
        acts, prov = source.read_shard(shard.index, layer)
        stored_acts, stored = run.read_shard(shard.index, layer)
        got.update(prov[: shard.n_train, 2].tolist())
        want.update(stored[: shard.n_train, 2].tolist())
        assert torch.equal(acts, stored_acts)
    assert got == want and sum(got.values()) == loaders[layer].n_train
    assert not {0, 1, 2} & set(got)  # <unk>, BOS, EOS (= the pad token): never trained on


def test_step_3_on_a_streamed_sae_names_what_it_needs(cached_and_streamed):
    _, streamed = cached_and_streamed
    with pytest.raises(PipelineError, match="trained by streaming.*01_save_activations.py.*RUN_ID") as err:
        evaluate_sae(EvalSettings(store_dir=streamed, device="cpu"), "sw")
    assert "\n" not in str(err.value)


def test_a_resume_with_other_stream_settings_is_refused(tiny_model, tmp_path):
    stream_sae(_stream_settings(tiny_model, tmp_path, top_k="4", layer_num="1", epochs=1), "one")
    with pytest.raises(PipelineError, match="MAX_LENGTH=24 .started with 32"):
        stream_sae(_stream_settings(tiny_model, tmp_path, top_k="4", layer_num="1", epochs=1, max_length=24), "one")


def _one_process():
    from sae_pipeline.infra.distributed import Dist

    return Dist()


def test_step_3_evaluates_a_streamed_sae_with_a_small_capture_named_by_run_id(cached_and_streamed):
    cached, streamed = cached_and_streamed
    (streamed / "runs" / "acts").symlink_to(cached / "runs" / "acts")  # a small capture of the same model and layers
    settings = EvalSettings(store_dir=streamed, device="cpu", run_id="acts", eval_limit=12, browser_latents=4)
    out = evaluate_sae(settings, "sw.L2.k8.x2.topk.s42")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["activation_run_id"] == "acts"
    assert metrics["eval_data"]["rows"][0] == 90  # after the streamed rows (STREAM's DATA_LIMIT)
    recon = metrics["reconstruction"]["eval_texts"]
    assert 0 < recon["fvu"] < 1 and recon["l0"] == pytest.approx(8.0)
    assert metrics["downstream"]["n_spliced_tokens"] > 0 and (out / "feature_browser.html").is_file()


class _StopAfter:
    """A stop flag raised after ``n`` checks: SIGUSR1 at a chosen step."""

    signal_name = "SIGUSR1"

    def __init__(self, n: int):
        self.left = n

    @property
    def requested(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_a_checkpoint_of_another_world_size_is_refused_in_one_line(tiny_model, tmp_path):
    settings = _stream_settings(tiny_model, tmp_path, top_k="4", layer_num="1", epochs=1)
    with pytest.raises(StopRequested):
        stream_sae(settings, "ws", stop=_StopAfter(2))
    commit = tmp_path / "runs" / "ws" / "checkpoint.json"
    commit.write_text(json.dumps({**json.loads(commit.read_text()), "world_size": 2}))
    with pytest.raises(PipelineError, match="checkpointed by 2 training process.*now 1.*torchrun") as err:
        stream_sae(settings, "ws")
    assert "\n" not in str(err.value)


def test_the_memory_estimate_counts_the_stream_buffer(tiny_model, tmp_path):
    """Two shuffle groups of STREAM_BUFFER_TOKENS per layer, plus the shards kept for the other layers."""
    sizes = {}
    for buffer in (1200, 2400):
        settings = _stream_settings(tiny_model, tmp_path, stream_buffer_tokens=buffer)
        source = open_source(settings, torch.device("cpu"))
        loaders = open_stream_loaders(plan_stream(settings, source, f"b{buffer}"), torch.device("cpu"), _one_process())
        sizes[buffer] = sum(loader.host_bytes() for loader in loaders.values())
        assert all(loader.host_bytes() >= 2 * buffer * 64 * 2 for loader in loaders.values())  # bf16, d_model 64
    assert sizes[2400] - sizes[1200] >= 2 * 2 * 1200 * 64 * 2  # two layers, two groups each


def test_two_processes_each_forward_their_own_documents_and_follow_the_one_process_run(tiny_model, tmp_path):
    """torchrun, gloo on CPU: rank 0 forwards fewer shards than one process does, the steps and tokens are the same,
    and the curves agree within the seed noise test_train_distributed.py measured (0.03)."""
    env = train_env(tmp_path, {}, STREAM="1", MODEL_ID=str(tiny_model), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    values = {**CAPTURE, **TRAIN, "top_k": "4", "layer_num": "1", "data_limit": 300, "stream_buffer_tokens": BUFFER}
    env.update({k.upper(): str(v) for k, v in values.items()})
    done = subprocess.run(_torchrun("two"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stream_sae(_stream_settings(tiny_model, tmp_path, **values), "one")
    one, two = (json.loads((tmp_path / "runs" / i / "meta.json").read_text()) for i in ("one", "two"))
    assert two["processes"] == 2 and two["tokens_trained"] == one["tokens_trained"]
    assert two["streamed"]["shards_forwarded_by_this_process"] < one["streamed"]["shards_forwarded_by_this_process"]
    h1, h2 = (json.loads((tmp_path / "runs" / i / "history.json").read_text()) for i in ("one", "two"))
    assert [e["tokens"] for e in h2["steps"]] == [e["tokens"] for e in h1["steps"]]
    for a, b in zip(h1["epochs"], h2["epochs"]):  # (a step's line may cover only an epoch's few last tokens)
        assert b["fvu"] == pytest.approx(a["fvu"], abs=0.03), (a["epoch"], a["fvu"], b["fvu"])
    assert h2["holdout"]["n_tokens"] == h1["holdout"]["n_tokens"]  # both ranks' held-out shares, merged
    assert h2["holdout"]["fvu"] == pytest.approx(h1["holdout"]["fvu"], abs=0.03)


def test_an_activation_run_id_with_stream_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    from sae_pipeline.cli import train_sae_main

    monkeypatch.setenv("STREAM", "1")
    monkeypatch.setenv("STORE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        train_sae_main(["--run_id", "acts"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: --run_id names an activation run") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()

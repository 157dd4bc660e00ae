"""Capture stores exactly the real tokens' activations, with their provenance, whatever the padding side."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sae_pipeline.steps.capture as capture_mod
from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.batches import Planner, runs
from sae_pipeline.lm.capture import Capturer
from sae_pipeline.lm.data import load_texts
from sae_pipeline.lm.loading import load_language_model
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.steps.capture import STAGES, save_activations
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store
from tests.helpers import SAMPLE

LAYER = 2
SIG = f"llamaforcausallm_model_layers_{LAYER}_post_attention_layernorm"


def sig(layer: int) -> str:
    return f"llamaforcausallm_model_layers_{layer}_post_attention_layernorm"


def settings(tiny_model, store_dir, **over) -> CaptureSettings:
    base = dict(
        model_id=str(tiny_model),
        hf_dataset=str(SAMPLE),
        store_dir=store_dir,
        device="cpu",
        data_limit=60,
        max_length=32,
        batch_size_save=7,
        docs_per_shard=25,
        layer_num=LAYER,
        store_dtype="float32",
    )
    return CaptureSettings(**{**base, **over})


def read_run(store_dir, run_id, layer: str | None = None):
    run = ActivationRun(Store(store_dir), run_id)
    meta = run.open()
    shards = [run.read_shard(i, layer or meta["layer_signatures"][0]) for i in range(meta["n_shards"])]
    return meta, torch.cat([a for a, _ in shards]), torch.cat([p for _, p in shards])


def reference(
    tiny_model, text: str, max_length: int, layer: int = LAYER
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The hooked layer's input and output for one document run alone: no padding anywhere."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    seen = {}
    module = model.model.layers[layer].post_attention_layernorm
    handle = module.register_forward_hook(lambda m, i, o: seen.update(input=i[0][0], output=o[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["input"], seen["output"], ids[0].tolist()


@pytest.fixture(scope="module")
def captured(tiny_model, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    save_activations(settings(tiny_model, store_dir), run_id="base")
    return store_dir, *read_run(store_dir, "base")


def test_only_real_non_special_tokens_are_stored(tiny_model, captured):
    _, meta, acts, prov = captured
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = load_texts(str(SAMPLE), "train", "text", 60, False, 0)["text"]
    expected = 0
    for text in texts:
        if text.strip():
            ids = tok(text, truncation=True, max_length=32)["input_ids"]
            expected += sum(1 for i in ids if i not in tok.all_special_ids)
    assert meta["n_tokens"] == expected == acts.shape[0] == prov.shape[0]
    assert meta["n_empty_documents"] == sum(1 for t in texts if not t.strip()) > 0
    assert not torch.isin(prov[:, 2], torch.tensor(tok.all_special_ids)).any(), "BOS/EOS/pad ids were stored"
    assert prov[:, 1].min() == 1, "position 0 is BOS and must be left out by default"


def test_left_padded_batches_match_each_document_alone(tiny_model, captured):
    """Bielik pads on the left with EOS: activations must not depend on the padding around a document."""
    _, _, acts, prov = captured
    texts = load_texts(str(SAMPLE), "train", "text", 60, False, 0)["text"]
    assert AutoTokenizer.from_pretrained(tiny_model).padding_side == "left"
    checked = padded = 0
    for doc in {int(d) for d in prov[:, 0]} & set(range(0, 60, 7)):
        _, out, ids = reference(tiny_model, texts[doc], 32)
        rows = prov[:, 0] == doc
        positions = prov[rows, 1].long()
        assert prov[rows, 2].tolist() == [ids[p] for p in positions]
        torch.testing.assert_close(acts[rows], out[positions], atol=1e-4, rtol=1e-4)
        checked += 1
        padded += len(ids) < 32
    assert checked >= 5 and padded >= 2, "the check must cover documents that were padded in their batch"


def test_keep_special_tokens_stores_bos(tiny_model, tmp_path):
    save_activations(settings(tiny_model, tmp_path, data_limit=10, keep_special_tokens=True), run_id="bos")
    _, acts, prov = read_run(tmp_path, "bos")
    non_empty = sum(1 for t in load_texts(str(SAMPLE), "train", "text", 10, False, 0)["text"] if t.strip())
    bos_rows = prov[:, 1] == 0
    assert int(bos_rows.sum()) == non_empty, "one BOS row per non-empty document"
    assert (prov[bos_rows, 2] == 1).all()


def test_hook_side_input_is_the_raw_residual(tiny_model, tmp_path):
    """HOOK_SIDE=input stores the module's input (the residual after attention), not RMSNorm(h)*w."""
    save_activations(settings(tiny_model, tmp_path, data_limit=4, hook_side="input"), run_id="resid")
    meta, acts, prov = read_run(tmp_path, "resid")
    assert meta["hook_side"] == "input"
    text = load_texts(str(SAMPLE), "train", "text", 4, False, 0)["text"][0]
    residual, normed, _ = reference(tiny_model, text, 32)
    rows = prov[:, 0] == 0
    torch.testing.assert_close(acts[rows], residual[prov[rows, 1].long()], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(acts[rows], normed[prov[rows, 1].long()], atol=1e-2)


def test_array_tasks_build_the_same_run(tiny_model, tmp_path, captured):
    """Two tasks each capture every other shard into one run; it completes only when both are done."""
    _, base_meta, base_acts, base_prov = captured
    store = Store(tmp_path)
    save_activations(settings(tiny_model, tmp_path, capture_task_id=1, capture_task_count=2), run_id="arr")
    assert ActivationRun(store, "arr").status() != "complete"
    assert not (tmp_path / "run_id.txt").exists()
    save_activations(settings(tiny_model, tmp_path, capture_task_id=0, capture_task_count=2), run_id="arr")
    meta, acts, prov = read_run(tmp_path, "arr")
    assert (tmp_path / "run_id.txt").read_text().strip() == "arr"
    assert meta["n_tokens"] == base_meta["n_tokens"]
    assert torch.equal(prov, base_prov) and torch.equal(acts, base_acts)


def test_rerunning_a_complete_run_changes_nothing(tiny_model, tmp_path):
    save_activations(settings(tiny_model, tmp_path, data_limit=5), run_id="done")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "done").rglob("*")}
    summary = save_activations(settings(tiny_model, tmp_path, data_limit=5), run_id="done")
    assert summary.n_shards_written == 0 and summary.complete
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "done").rglob("*")}


# ------------------------------------------------------------------------------------------------------ several layers


def test_several_layers_in_one_forward_equal_one_capture_each(tiny_model, tmp_path, captured):
    """LAYER_NUM=3,2 (deepest listed first, which mi_crow's own save path gets wrong): one run holding both layers,
    each exactly what a capture of that layer alone stores, with the provenance they share."""
    _, _, base_acts, base_prov = captured
    save_activations(settings(tiny_model, tmp_path, layer_num=(3, 2)), run_id="both")
    save_activations(settings(tiny_model, tmp_path, layer_num=3), run_id="three")
    meta, acts2, prov = read_run(tmp_path, "both", sig(2))
    _, acts3, prov3 = read_run(tmp_path, "both", sig(3))
    assert [(x["layer_num"], x["signature"], x["d_model"]) for x in meta["layers"]] == [
        (3, sig(3), 64),
        (2, sig(2), 64),
    ]
    assert torch.equal(prov, base_prov) and torch.equal(prov3, base_prov)
    assert torch.equal(acts2, base_acts)
    _, alone3, alone_prov = read_run(tmp_path, "three")
    assert torch.equal(acts3, alone3) and torch.equal(prov3, alone_prov)
    text = load_texts(str(SAMPLE), "train", "text", 60, False, 0)["text"][7]
    _, out, _ = reference(tiny_model, text, 32, layer=3)
    rows = prov3[:, 0] == 7
    torch.testing.assert_close(acts3[rows], out[prov3[rows, 1].long()], atol=1e-4, rtol=1e-4)


def test_the_forward_stops_after_the_hook_that_fires_last(tiny_model, tmp_path):
    lm = load_language_model(str(tiny_model), tmp_path, torch.device("cpu"), torch.float32)
    ran = []
    for i, block in enumerate(lm.model.model.layers):
        block.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: ran.append(f"norm{i}"))
        block.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(f"mlp{i}"))
    s = settings(tiny_model, tmp_path)
    capturer = Capturer(lm, [sig(2), sig(0)], s)
    planner = Planner(
        load_texts(str(SAMPLE), "train", "text", 20, False, 0), lm.tokenizer, s, capturer.special_ids, False
    )
    batch = planner.shard(0)[0]
    n_tokens = batch.shard.info["n_tokens"]
    buffers = {sig(2): torch.full((n_tokens, 64), float("nan")), sig(0): torch.full((n_tokens, 64), float("nan"))}
    ran.clear()
    capturer.forward(batch, buffers)
    assert ran == ["norm0", "mlp0", "norm1", "mlp1", "norm2"], "stop right after block 2's hook, the last to fire"
    written = sum(n for *_, n in batch.runs)
    assert written == len(batch.rows) and all(int(torch.isfinite(b).all(1).sum()) == written for b in buffers.values())


# ------------------------------------------------------------------------------------------------------------- batches


def test_runs_are_the_stretches_consecutive_in_the_batch_and_in_the_shard():
    """A special token inside a document (kept out) splits its stretch; so does the next document."""
    rows = torch.tensor([1, 2, 3, 5, 6, 9])  # flat indices in the batch: position 4 was a special token
    dest = torch.tensor([10, 11, 12, 13, 14, 0])  # the last row belongs to another document, first in the shard
    assert runs(rows, dest) == [(1, 0, 10, 3), (5, 3, 13, 2), (9, 5, 0, 1)]
    assert runs(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) == []


def test_batches_sized_by_tokens_store_the_same_tokens(tiny_model, tmp_path, captured):
    """BATCH_TOKENS_SAVE caps the padded tokens of each forward (one longer document still gets its own)."""
    _, base_meta, base_acts, base_prov = captured
    s = settings(tiny_model, tmp_path, batch_tokens_save=300)
    save_activations(s, run_id="tokens")
    meta, acts, prov = read_run(tmp_path, "tokens")
    assert meta["n_tokens"] == base_meta["n_tokens"] and torch.equal(prov, base_prov)
    torch.testing.assert_close(acts, base_acts, atol=1e-5, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    planner = Planner(load_texts(str(SAMPLE), "train", "text", 60, False, 0), tok, s, torch.tensor([0, 1, 2]), False)
    batches = [b for i in range(3) for b in planner.shard(i)]
    assert all(b.ids.numel() <= 300 or b.n_docs == 1 for b in batches)
    assert max(b.n_docs for b in batches) > 7, "short documents fill a batch beyond BATCH_SIZE_SAVE"
    assert sum(b.n_docs for b in batches) == 60 - meta["n_empty_documents"]


# ------------------------------------------------------------------------------------------------------ before the run


def test_the_disk_needed_is_printed_before_the_run(tiny_model, tmp_path, capsys):
    """With fewer documents than the sample, the estimate is exact."""
    summary = save_activations(settings(tiny_model, tmp_path, layer_num=(1, 2)), run_id="disk")
    err = capsys.readouterr().err
    assert f"{2 * 64 * 4 + 12:,} bytes per token" in err
    assert f"about {summary.n_tokens:,} tokens to capture" in err
    assert err.index("bytes per token") < err.index("Captured")


def test_a_capture_that_does_not_fit_is_refused_before_anything_is_written(tiny_model, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=50_000))
    with pytest.raises(PipelineError) as info:
        save_activations(settings(tiny_model, tmp_path), run_id="full")
    message = str(info.value)
    assert (
        "STORE_DIR=" in message
        and "has 48.8 KiB free, but this capture needs about" in message
        and "bytes per token" in message
    )
    assert not (tmp_path / "runs" / "full").exists()


def test_gpu_out_of_memory_names_the_variable_to_lower(tiny_model, tmp_path, monkeypatch):
    """An OOM in the forward (here raised by a layer once batches have several documents) becomes one line."""
    real = capture_mod.load_language_model

    def oom(module, args, output):
        if output.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def loaded(*args, **kwargs):
        lm = real(*args, **kwargs)
        lm.model.model.layers[1].mlp.register_forward_hook(oom)
        return lm

    monkeypatch.setattr(capture_mod, "load_language_model", loaded)
    with pytest.raises(PipelineError) as info:
        save_activations(settings(tiny_model, tmp_path), run_id="oom")
    assert "ran out of memory" in str(info.value) and "lower BATCH_SIZE_SAVE (now 7)" in str(info.value)
    with pytest.raises(PipelineError, match=r"lower BATCH_TOKENS_SAVE \(now 4096\)"):
        save_activations(settings(tiny_model, tmp_path, batch_tokens_save=4096), run_id="oom")


# ------------------------------------------------------------------------------------------------- failures in a stage


@pytest.fixture
def no_hang():
    """A stage that failed must end the run with its error, not leave the main thread waiting."""

    def hung(signum, frame):
        raise TimeoutError("the capture hung after a stage failed")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_failing_write_ends_the_run_with_one_line_and_it_resumes_exactly(
    tiny_model, tmp_path, captured, monkeypatch, no_hang
):
    _, _, base_acts, base_prov = captured
    real = ActivationRun.write_shard

    def disk_full_at_shard_1(self, index, *args):
        if index == 1:
            raise OSError(28, "No space left on device")
        return real(self, index, *args)

    monkeypatch.setattr(ActivationRun, "write_shard", disk_full_at_shard_1)
    with pytest.raises(PipelineError) as info:
        save_activations(settings(tiny_model, tmp_path), run_id="full")
    assert "could not write shard 1" in str(info.value) and "No space left on device" in str(info.value)
    run = ActivationRun(Store(tmp_path), "full")
    assert run.completed_shards() == {0} and not list(run.dir.glob(".tmp*"))
    monkeypatch.setattr(ActivationRun, "write_shard", real)
    save_activations(settings(tiny_model, tmp_path), run_id="full")
    _, acts, prov = read_run(tmp_path, "full")
    assert torch.equal(prov, base_prov) and torch.equal(acts, base_acts)


@pytest.mark.parametrize("ahead", [True, False], ids=["prepared-in-a-thread", "prepared-between-forwards"])
def test_a_failing_preparation_reaches_the_main_thread(tiny_model, tmp_path, monkeypatch, no_hang, ahead):
    monkeypatch.setattr(capture_mod, "prepare_ahead", lambda device: ahead)
    error = PipelineError("the tokenizer failed on shard 1")
    real = Planner.shard
    monkeypatch.setattr(Planner, "shard", lambda self, i: (_ for _ in ()).throw(error) if i == 1 else real(self, i))
    with pytest.raises(PipelineError) as info:
        save_activations(settings(tiny_model, tmp_path), run_id="prep")
    assert info.value is error


# ---------------------------------------------------------------------------------------- where the prepare stage runs


@pytest.mark.parametrize("ahead", [True, False], ids=["prepared-in-a-thread", "prepared-between-forwards"])
def test_both_ways_of_preparing_store_the_same_run(tiny_model, tmp_path, captured, monkeypatch, ahead):
    _, _, base_acts, base_prov = captured
    monkeypatch.setattr(capture_mod, "prepare_ahead", lambda device: ahead)
    save_activations(settings(tiny_model, tmp_path), run_id="mode")
    meta, acts, prov = read_run(tmp_path, "mode")
    assert torch.equal(prov, base_prov) and torch.equal(acts, base_acts)
    assert meta["timing"][0]["prepare_ahead"] is ahead


def test_the_prepare_stage_runs_ahead_only_where_the_forward_leaves_a_core_free(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(threads)), raising=False)
    assert not capture_mod.prepare_ahead(torch.device("cpu")), "torch's threads take every core"
    assert capture_mod.prepare_ahead(torch.device("meta")), "a forward off the CPU leaves the CPU to the stages"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(threads + 1)), raising=False)
    assert capture_mod.prepare_ahead(torch.device("cpu")), "a core is free beside torch's threads"


# --------------------------------------------------------------------------------------------------------- time report


def test_the_time_report_is_in_the_summary_and_in_meta_json(tiny_model, captured, capsys, tmp_path):
    _, meta, _, _ = captured
    (timing,) = meta["timing"]
    assert list(timing["stages_s"]) == list(STAGES)
    assert timing["shards"] == meta["n_shards"] and timing["tokens"] == meta["n_tokens"]
    assert timing["prepare_ahead"] is capture_mod.prepare_ahead(torch.device("cpu"))
    assert timing["stages_s"]["forward"] > 0 and timing["wall_s"] >= timing["stages_s"]["start-up"] > 0
    save_activations(settings(tiny_model, tmp_path, data_limit=5), run_id="line")
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("Captured") and "start-up" in line and "forward" in line and "waiting" in line


def test_array_tasks_each_add_their_time_report(tiny_model, tmp_path):
    for task in (1, 0):
        save_activations(settings(tiny_model, tmp_path, capture_task_id=task, capture_task_count=2), run_id="arr2")
    meta = ActivationRun(Store(tmp_path), "arr2").read_meta()
    assert sorted(t["task"] for t in meta["timing"]) == [[0, 2], [1, 2]]
    assert sum(t["shards"] for t in meta["timing"]) == meta["n_shards"]

"""Capture stores exactly the real tokens' activations, with their provenance, whatever the padding side."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_pipeline.capture import save_activations
from sae_pipeline.data import load_texts
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.store import ActivationRun, Store, open_complete_run
from tests.helpers import SAMPLE

LAYER = 2
SIG = f"llamaforcausallm_model_layers_{LAYER}_post_attention_layernorm"


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


def read_run(store_dir, run_id):
    run, meta = open_complete_run(Store(store_dir), run_id)
    shards = [run.read_shard(i, meta["layer_signatures"][0]) for i in range(meta["n_shards"])]
    return meta, torch.cat([a for a, _ in shards]), torch.cat([p for _, p in shards])


def reference(tiny_model, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The hooked layer's input and output for one document run alone: no padding anywhere."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    seen = {}
    module = model.model.layers[LAYER].post_attention_layernorm
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
    assert not ActivationRun(store, "arr").is_complete()
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

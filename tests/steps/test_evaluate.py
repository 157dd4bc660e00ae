"""The splice and the downstream metrics of step 3, in process on the briefly trained tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_pipeline.demo.tiny_model import load_sample_texts
from sae_pipeline.lm.loading import load_language_model
from sae_pipeline.lm.splice import make_splice
from sae_pipeline.lm.tokens import token_batches
from sae_pipeline.sae.downstream import CONDITIONS, downstream
from sae_pipeline.sae.metrics import ReconstructionStats, ce_loss_recovered
from sae_pipeline.sae.model import PipelineSae
from tests.eval_fixtures import trained_tiny_model  # noqa: F401  (fixture)

SIG = "llamaforcausallm_model_layers_2_post_attention_layernorm"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lm(trained_tiny_model, tmp_path_factory):
    return load_language_model(str(trained_tiny_model), tmp_path_factory.mktemp("lm_store"), CPU, torch.float32)


@pytest.fixture(scope="module")
def texts():
    return [t for t in load_sample_texts()[120:200]]


def identity_sae(d: int) -> PipelineSae:
    """A real TopK SAE whose decoder inverts its encoder: 2d latents [I; -I], k = 2d, so x_hat = relu(x) - relu(-x)."""
    sae = PipelineSae(2 * d, d, 2 * d)
    eng = sae.sae_engine
    eye = torch.eye(d)
    with torch.no_grad():
        eng.W_enc.copy_(torch.cat([eye, -eye]))
        eng.b_enc.zero_()
        eng.W_dec.copy_(torch.cat([eye, -eye]))
        eng.b_dec.zero_()
    return sae.to_device(CPU)


def run(lm, engine, batches, side="output", mean=None, conditions=CONDITIONS, stats=None):
    splice = make_splice(SIG, side, engine, mean)
    splice.stats = {"sae": stats} if stats is not None else {}
    lm.layers.register_hook(SIG, splice)
    try:
        return downstream(lm.model, splice, batches, CPU, conditions)
    finally:
        lm.layers.unregister_hook(splice.id)


@pytest.mark.parametrize("side", ["output", "input"])
def test_identity_sae_leaves_the_loss_unchanged(lm, texts, side):
    sae = identity_sae(64)
    x = torch.randn(50, 64)
    assert torch.equal(sae.sae_engine.eval()(x)[2], x)  # the "SAE" really is the identity
    batches = token_batches(lm.tokenizer, texts, 32, 8, keep_special=False)
    stats = ReconstructionStats(64, 128)
    res = run(lm, sae.sae_engine.eval(), batches, side, mean=torch.zeros(64), stats=stats)
    assert abs(res.ce["sae"] - res.ce["clean"]) < 1e-5
    assert res.kl["sae"] < 1e-6
    assert stats.n == res.n_spliced_tokens > 0
    assert stats.result()["fvu"] < 1e-10


def test_zero_ablation_raises_the_loss_of_a_trained_model(lm, texts):
    res = run(
        lm, identity_sae(64).sae_engine.eval(), token_batches(lm.tokenizer, texts, 32, 8, False), mean=torch.zeros(64)
    )
    assert res.ce["zero"] > res.ce["clean"] + 0.05
    assert res.kl["zero"] > 0.01
    m = res.metrics()
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)  # identity: everything recovered
    assert m["delta_loss"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("side", ["output", "input"])
def test_splice_matches_a_plain_torch_hook(lm, texts, side):
    """Mean ablation through the mi_crow controller == the same replacement by a raw torch hook on the module."""
    batches = token_batches(lm.tokenizer, texts[:24], 32, 8, False)
    mean = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ours = run(lm, identity_sae(64).sae_engine.eval(), batches, side, mean=mean, conditions=("clean", "mean"))

    module = lm.model.model.layers[2].post_attention_layernorm
    state = {}

    def pre(mod, args):
        x = args[0].clone()
        x[state["keep"]] = mean
        return (x,) + tuple(args[1:])

    def post(mod, args, out):
        out = out.clone()
        out[state["keep"]] = mean
        return out

    handle = module.register_forward_pre_hook(pre) if side == "input" else module.register_forward_hook(post)
    total, n = 0.0, 0
    try:
        with torch.inference_mode():
            for b in batches:
                state["keep"] = b.keep
                logits = lm.model(
                    input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False
                ).logits
                valid = (b.mask[:, :-1] & b.mask[:, 1:]).bool()
                lp = logits[:, :-1][valid].log_softmax(-1)
                total -= float(lp.gather(1, b.ids[:, 1:][valid][:, None]).sum())
                n += int(valid.sum())
    finally:
        handle.remove()
    assert n == ours.n_predictions
    assert ours.ce["mean"] == pytest.approx(total / n, abs=1e-5)
    assert abs(ours.ce["mean"] - ours.ce["clean"]) > 1e-3  # the replacement did something


def test_padding_is_excluded_from_every_average(lm, texts):
    """Batch size 1 (no padding) and 8 (left padding) give the same numbers for every condition."""
    sae = identity_sae(64).sae_engine.eval()
    mean = torch.randn(64, generator=torch.Generator().manual_seed(1))
    one = run(lm, sae, token_batches(lm.tokenizer, texts[:24], 32, 1, False), mean=mean)
    many = run(lm, sae, token_batches(lm.tokenizer, texts[:24], 32, 8, False), mean=mean)
    assert one.n_predictions == many.n_predictions and one.n_real_tokens == many.n_real_tokens
    for c in CONDITIONS:
        assert one.ce[c] == pytest.approx(many.ce[c], abs=1e-4)
    padded = sum(int((b.mask == 0).sum()) for b in token_batches(lm.tokenizer, texts[:24], 32, 8, False))
    assert padded > 0  # the comparison is not vacuous


def test_only_the_stored_positions_are_replaced(lm, texts):
    """The SAE sees exactly the rows capture would store: BOS only with keep_special_tokens."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x, x, x

    for keep_special in (False, True):
        seen.clear()
        batches = token_batches(lm.tokenizer, texts[:16], 32, 8, keep_special)
        res = run(lm, Recorder(), batches, conditions=("clean", "sae"))
        assert sum(seen) == res.n_spliced_tokens
        n_docs = sum(int(b.ids.shape[0]) for b in batches)
        assert n_docs >= 14
        assert res.n_spliced_tokens == res.n_real_tokens - (0 if keep_special else n_docs)  # one BOS per document


def test_ce_loss_recovered_formula():
    assert ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 2.0, 4.0) == 1.0
    assert ce_loss_recovered(2.0, 4.0, 4.0) == 0.0
    assert ce_loss_recovered(2.0, 5.0, 4.0) == pytest.approx(-0.5)  # worse than ablation is reported, not clipped
    assert ce_loss_recovered(2.0, 2.1, 2.0) is None
    assert ce_loss_recovered(2.0, 2.1, math.nan) is None


def _act_meta(limit: int, shuffle: bool = False) -> dict:
    from tests.helpers import SAMPLE

    return {
        "dataset": {
            "name": str(SAMPLE),
            "split": "train",
            "text_field": "text",
            "limit": limit,
            "shuffle": shuffle,
            "shuffle_seed": 7 if shuffle else None,
        }
    }


@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_documents_are_the_rows_capture_did_not_use(shuffle):
    from sae_pipeline.lm.data import load_texts
    from sae_pipeline.settings import EvalSettings
    from sae_pipeline.steps.evaluate import eval_texts
    from tests.helpers import SAMPLE

    texts, source = eval_texts(EvalSettings(eval_limit=50), _act_meta(120, shuffle))
    captured = list(load_texts(str(SAMPLE), "train", "text", 120, shuffle, 7)["text"])
    everything = list(load_texts(str(SAMPLE), "train", "text", 170, shuffle, 7)["text"])
    assert source["rows"] == [120, 170] and texts == everything[120:170]
    assert not set(t for t in texts if t.strip()) & set(captured)  # no document seen by capture (sample is unique)


def test_eval_dataset_overrides_and_an_exhausted_dataset_is_an_error(tmp_path):
    from sae_pipeline.infra.errors import PipelineError
    from sae_pipeline.settings import EvalSettings
    from sae_pipeline.steps.evaluate import eval_texts

    own = tmp_path / "own.jsonl"
    own.write_text('{"body": "Zażółć gęślą jaźń."}\n{"body": "Druga linia."}\n', encoding="utf-8")
    texts, source = eval_texts(EvalSettings(eval_dataset=str(own), eval_text_field="body"), _act_meta(120))
    assert texts == ["Zażółć gęślą jaźń.", "Druga linia."] and source["dataset"] == str(own)
    with pytest.raises(PipelineError, match="EVAL_DATASET"):
        eval_texts(EvalSettings(), _act_meta(10_000))


# -- sweeps: a sweep of 4 SAEs captured and trained in process, evaluated with every forward counted ----------------
@pytest.fixture(scope="module")
def sweep_store(trained_tiny_model, tmp_path_factory):
    """Step 1 and step 2 (TOP_K=4,8 SEED=1,2 at block 2) in process on the trained tiny Llama; sweep id "sw"."""
    from sae_pipeline.settings import CaptureSettings, TrainSettings
    from sae_pipeline.steps.capture import save_activations
    from sae_pipeline.steps.train import train_sae
    from tests.helpers import SAMPLE

    store = tmp_path_factory.mktemp("eval_sweep") / "store"
    common = dict(store_dir=store, device="cpu", layer_num=2)
    capture = CaptureSettings(
        model_id=str(trained_tiny_model), hf_dataset=str(SAMPLE), data_limit=120, max_length=32, **common
    )
    save_activations(capture, run_id="acts")
    train = TrainSettings(top_k=(4, 8), seed=(1, 2), epochs=1, batch_size_train=256, n_latents_multiplier=2, **common)
    train_sae(train, "acts", "sw")
    return store


def _eval_settings(store, **kw):
    from sae_pipeline.settings import EvalSettings

    base = dict(store_dir=store, device="cpu", eval_limit=20, batch_size_eval=8, eval_scan_tokens=1500)
    return EvalSettings(**{**base, "browser_latents": 4, **kw})


def _count_model_forwards(fn):
    """(fn's result, how many full forwards of the language model ran): a global torch forward hook counts every
    call of a ``*ForCausalLM`` module, whoever makes it."""
    calls = []

    def hook(module, args, output):
        if type(module).__name__.endswith("ForCausalLM"):
            calls.append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        return fn(), len(calls)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def evaluated_sweep(sweep_store):
    from sae_pipeline.steps.evaluate import evaluate_sae

    out, forwards = _count_model_forwards(lambda: evaluate_sae(_eval_settings(sweep_store)))  # sae_run_id.txt
    return sweep_store, out, forwards


def test_a_sweep_shares_the_clean_and_ablated_passes(evaluated_sweep):
    """4 SAEs at one layer: per batch one clean, one zero- and one mean-ablated forward and one per SAE (7, not
    4 x 4 = 16), plus one short forward that checks the layer's width."""
    from sae_pipeline.steps.evaluate import eval_texts
    from sae_pipeline.store.activations import ActivationRun
    from sae_pipeline.store.runs import Store

    store, out, forwards = evaluated_sweep
    assert out == store / "runs" / "sw" / "evaluation"
    lm_tokenizer = load_language_model(
        json.loads((store / "runs" / "acts" / "meta.json").read_text())["model_id"], store, CPU, torch.float32
    ).tokenizer
    act_meta = ActivationRun(Store(store), "acts").read_meta()
    texts, _ = eval_texts(_eval_settings(store), act_meta)
    n_batches = len(token_batches(lm_tokenizer, texts, 32, 8, False))
    assert n_batches >= 2
    assert forwards == 1 + n_batches * (3 + 4)


def test_the_sweep_report_lists_every_sae_and_each_group_of_seeds(evaluated_sweep):
    import statistics

    store, out, _ = evaluated_sweep
    report = json.loads((out / "sweep.json").read_text())
    assert report["kind"] == "sweep_evaluation" and report["sweep_id"] == "sw"
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    members = report["members"]
    assert [(m["top_k"], m["seed"]) for m in members] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    for m in members:  # each SAE's numbers are those of its own metrics.json
        own = json.loads((store / "runs" / m["sae_run_id"] / "evaluation" / "metrics.json").read_text())
        d, r = own["downstream"], own["reconstruction"]["eval_texts"]
        assert own["sweep_id"] == "sw" and own["timing"] == report["timing"]
        assert (m["l0"], m["fvu"], m["kl"]) == (r["l0"], r["fvu"], d["kl_sae"])
        assert (m["ce_loss_recovered"], m["ce_loss_recovered_reason"]) == (
            d["ce_loss_recovered"],
            d["ce_loss_recovered_reason"],
        )
        assert d["ce_clean"] == report["references"][m["layer_signature"]]["ce_clean"]  # one clean pass for all
        assert m["l0"] == pytest.approx(m["top_k"])
    groups = report["groups"]
    assert [(g["top_k"], g["seeds"], g["n_seeds"]) for g in groups] == [(4, [1, 2], 2), (8, [1, 2], 2)]
    for g, pair in zip(groups, (members[:2], members[2:])):
        for key in ("l0", "fvu", "kl", "ce_loss_recovered"):
            values = [m[key] for m in pair]
            if None in values:
                assert g[key] == {"mean": None, "std": None}
            else:
                assert g[key]["mean"] == pytest.approx(statistics.fmean(values))
                assert g[key]["std"] == pytest.approx(statistics.stdev(values))
    assert groups[1]["fvu"]["mean"] < groups[0]["fvu"]["mean"]  # more latents per token reconstruct better
    timing = report["timing"]
    assert list(timing["stages_s"]) == ["load", "scan", "clean", "ablate", "splice", "holdout", "absorption", "browser"]
    assert timing["stages_s"]["splice"] > 0 and timing["stages_s"]["clean"] > 0


def test_an_incomplete_sweep_is_refused_in_one_line(sweep_store, tmp_path):
    import shutil

    from sae_pipeline.infra.errors import PipelineError
    from sae_pipeline.steps.evaluate import evaluate_sae

    store = tmp_path / "store"
    shutil.copytree(sweep_store, store)
    (store / "runs" / "sw.L2.k8.x2.topk.s2" / "model.pt").unlink()
    before = sorted(p for p in store.rglob("*"))
    with pytest.raises(PipelineError) as err:
        evaluate_sae(_eval_settings(store), "sw")
    message = str(err.value)
    assert "'sw' is incomplete" in message and "sw.L2.k8.x2.topk.s2" in message
    assert "sw.L2.k4" not in message  # only the missing member is named
    assert "02_train_sae.py --sae_run_id sw" in message and "\n" not in message
    assert sorted(p for p in store.rglob("*")) == before  # nothing removed or written


def test_a_failed_reevaluation_leaves_no_stale_metrics(evaluated_sweep, tmp_path):
    """An earlier evaluation's metrics.json and sweep report are removed before the new one is computed: when it then
    fails (here: an activation shard became unreadable), none of them can pass for the new result."""
    import shutil

    from sae_pipeline.infra.errors import PipelineError
    from sae_pipeline.steps.evaluate import evaluate_sae

    store = tmp_path / "store"
    shutil.copytree(evaluated_sweep[0], store)
    members = [p for p in (store / "runs").glob("sw.*")]
    assert all((m / "evaluation" / "metrics.json").is_file() for m in members) and len(members) == 4
    shard = next((store / "runs" / "acts" / "batch_0").glob("*/activations.safetensors"))
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(PipelineError, match="cannot be read"):
        evaluate_sae(_eval_settings(store), "sw")
    assert not any((m / "evaluation" / "metrics.json").exists() for m in members)
    assert not (store / "runs" / "sw" / "evaluation" / "sweep.json").exists()
    assert not (store / "runs" / "sw" / "evaluation" / "frontier.png").exists()
    assert (members[0] / "evaluation" / "feature_browser.html").is_file()  # the rest is left; metrics.json says done


def test_two_layers_each_get_their_own_shared_passes(trained_tiny_model, tmp_path):
    """A sweep over two layers (2 SAEs each): per batch, per layer, 3 shared forwards and one per SAE of that layer,
    plus one width probe per layer. The activation run is one real capture of both layers (blocks 1 and 2)."""
    from sae_pipeline.settings import CaptureSettings, TrainSettings
    from sae_pipeline.steps.capture import save_activations
    from sae_pipeline.steps.evaluate import eval_texts, evaluate_sae
    from sae_pipeline.steps.train import train_sae
    from sae_pipeline.store.activations import ActivationRun
    from sae_pipeline.store.runs import Store
    from tests.helpers import SAMPLE

    store = Store(tmp_path / "store")
    settings = CaptureSettings(
        model_id=str(trained_tiny_model),
        hf_dataset=str(SAMPLE),
        data_limit=120,
        max_length=32,
        store_dir=store.root,
        device="cpu",
        layer_num=(1, 2),
    )
    save_activations(settings, run_id="acts")
    meta = ActivationRun(store, "acts").read_meta()
    train = TrainSettings(
        store_dir=store.root, device="cpu", top_k=4, seed=(1, 2), epochs=1, batch_size_train=256, n_latents_multiplier=2
    )
    train_sae(train, "acts", "two")  # LAYER_NUM unset: every layer of the run

    out, forwards = _count_model_forwards(lambda: evaluate_sae(_eval_settings(store.root), "two"))
    report = json.loads((out / "sweep.json").read_text())
    assert [m["layer_num"] for m in report["members"]] == [1, 1, 2, 2]
    assert len(report["references"]) == 2 and len(report["groups"]) == 2
    tokenizer = load_language_model(str(trained_tiny_model), store.root, CPU, torch.float32).tokenizer
    n_batches = len(token_batches(tokenizer, eval_texts(_eval_settings(store.root), meta)[0], 32, 8, False))
    assert forwards == 2 * (1 + n_batches * (3 + 2))


def test_absorption_is_reported_per_sae_and_in_the_sweep_report(sweep_store, tmp_path):
    """EVAL_ABSORPTION=1 on a copy of the sweep: every metrics.json gets its absorption record and sweep.json its
    column; the random-weight tiny Llama knows too few first letters, so the score is null with the reason."""
    import shutil

    from sae_pipeline.steps.evaluate import evaluate_sae

    store = shutil.copytree(sweep_store, tmp_path / "store")
    polish = "aąbcćdeęfghijklłmnńoóprsśtuwyzźż"
    out = evaluate_sae(_eval_settings(store, eval_absorption=True, absorption_words=60, absorption_letters=polish))
    report = json.loads((out / "sweep.json").read_text())
    for m in report["members"]:
        own = json.loads((store / "runs" / m["sae_run_id"] / "evaluation" / "metrics.json").read_text())
        absorption = own["absorption"]
        assert absorption["words"]["train"] + absorption["words"]["test"] <= 60
        assert absorption["words"]["alphabet"] == polish
        assert absorption["absorption_fraction"] is None and "letters have a probe" in absorption["reason"]
        assert m["absorption"] is None
    assert report["timing"]["stages_s"]["absorption"] > 0

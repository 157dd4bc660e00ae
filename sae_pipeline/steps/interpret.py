"""Step 4: what each latent means: an explanation from a local instruct model, scored by detection and fuzzing.

``--sae_run_id`` (SAE_RUN_ID, else ``STORE_DIR/sae_run_id.txt``) names a training run or a sweep; every SAE it
names goes through the same code. Read top to bottom, ``interpret_sae`` does:

1. resolve the SAEs and their activation run (which must hold stored activations), load the explainer and the
   scorer (EXPLAINER_MODEL, default the run's model; SCORER_MODEL, default the explainer): a model that is missing
   or has no chat template stops the step before anything is written;
2. per SAE: count every latent's firings over up to INTERPRET_SCAN_TOKENS stored tokens and pick INTERPRET_LIMIT
   firing latents by the feature browser's rule (``sae/scan.spread_latents``), then collect their examples in
   streaming passes (``interpret/examples.py``): top contexts for the explainer, quantile samples and non-firing
   contexts for the scorers;
3. explain each latent (delphi's prompt on its top contexts, ``interpret/explainer.py``), one row per latent in
   ``explanations.jsonl``;
4. score each explanation by detection and fuzzing (``interpret/scorers.py``), and score a control: the latent's
   examples against the explanation of another latent of the list (half the list further on, so of another
   frequency decade where there are several). One row per latent in ``latents.jsonl``;
5. ``summary.json``: real against control (``interpret/summary.py``), and the feature browser of step 3, when it
   exists, shows the explanations and scores.

Rows are appended and synced one by one (``interpret/io.py``): a killed step 4 rerun with the same command
continues after the last row written. Generation is greedy, and each latent's prompts are the same in a rerun, so
its rows equal an uninterrupted run's.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_pipeline.infra.errors import PipelineError, human_bytes
from sae_pipeline.infra.progress import ProgressMeter
from sae_pipeline.interpret import scorers
from sae_pipeline.interpret.chat import ChatModel
from sae_pipeline.interpret.delphi_cache import write_delphi_cache
from sae_pipeline.interpret.examples import (
    ExampleBudget,
    LatentExamples,
    collect_examples,
    estimate_bytes,
    firing_counts,
)
from sae_pipeline.interpret.explainer import explainer_prompt, explanation_complete, parse_explanation
from sae_pipeline.interpret.io import InterpretationFolder
from sae_pipeline.interpret.prompts import delphi_prompts
from sae_pipeline.interpret.summary import plot_scores, refresh_browser, summarize
from sae_pipeline.sae.scan import spread_latents
from sae_pipeline.settings import InterpretSettings
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import SAE_RUN_ID_FILE, Store, validate_run_id
from sae_pipeline.store.training import Sweep, TrainingRun, training_runs


def interpret_sae(settings: InterpretSettings, sae_run_id: str | None = None) -> list[Path]:
    """Explain and score one training run's latents, or every SAE's of a sweep; returns their interpretation/."""
    from sae_pipeline.lm.loading import resolve_device

    device = resolve_device(settings.device)
    store = Store(settings.store_dir)
    what = "--sae_run_id" if sae_run_id else "SAE_RUN_ID"
    sae_run_id = validate_run_id(sae_run_id or settings.sae_run_id or store.read_pointer(SAE_RUN_ID_FILE), what)
    runs = training_runs(store, sae_run_id)
    if Sweep(store, sae_run_id).exists():
        Sweep(store, sae_run_id).check_trained(runs)
    metas = [run.open() for run in runs]
    act_run = ActivationRun(store, metas[0]["activation_run_id"])
    act_meta = act_run.open()
    if not act_run.completed_shards():
        raise PipelineError(
            f"activation run {act_run.run_id!r} has no stored activations in {act_run.dir} (its shards were removed): "
            "step 4 reads its examples from them; capture them again with 01_save_activations.py"
        )
    explainer_id = settings.explainer_model or act_meta["model_id"]
    explainer = ChatModel.load(
        explainer_id, "EXPLAINER_MODEL", device, settings.model_dtype, settings.interpret_batch_size
    )
    scorer = explainer
    if settings.scorer_model and settings.scorer_model != explainer_id:
        scorer = ChatModel.load(
            settings.scorer_model, "SCORER_MODEL", device, settings.model_dtype, settings.interpret_batch_size
        )
    store.ensure_writable()
    contexts = context_source(act_run, act_meta)
    return [
        interpret_member(settings, run, meta, act_run, contexts, explainer, scorer, device)
        for run, meta in zip(runs, metas)
    ]


def context_source(act_run: ActivationRun, act_meta: dict[str, Any]):
    """Step 3's ContextSource on the tokenizer of the run's model (the documents' text, token by token)."""
    from transformers import AutoTokenizer

    from sae_pipeline.lm.loading import model_source
    from sae_pipeline.outputs.browser import ContextSource

    source, extra = model_source(act_meta["model_id"])
    return ContextSource(act_run, act_meta, AutoTokenizer.from_pretrained(source, **extra))


def interpret_member(settings, run: TrainingRun, meta, act_run, contexts, explainer, scorer, device) -> Path:
    """One SAE (module docstring, points 2 to 5)."""
    from sae_pipeline.sae.model import PipelineSae

    engine = PipelineSae.load(run.model_path, device).sae_engine.eval()
    layer = meta["layer_signature"]
    counts, n_tokens = firing_counts(act_run, layer, engine, device, settings.interpret_scan_tokens)
    freq = counts.double() / max(n_tokens, 1)
    latents = spread_latents(freq, settings.interpret_limit)
    if not latents:
        raise PipelineError(f"no latent of SAE {run.run_id!r} fires on the {n_tokens:,} stored tokens read")
    budget = ExampleBudget(
        settings.interpret_top_examples,
        settings.interpret_test_examples,
        settings.interpret_non_activating,
        settings.interpret_window,
        settings.interpret_scan_tokens,
        settings.seed,
    )
    folder = InterpretationFolder(run.dir)
    config = run_config(settings, run, latents, budget, explainer, scorer)
    folder.start(config)
    print(
        f"interpreting {len(latents)} of {len(freq)} latents of SAE {run.run_id} ({int((counts > 0).sum())} fire on "
        f"{n_tokens:,} stored tokens); collecting their examples takes about "
        f"{human_bytes(estimate_bytes(len(freq), len(latents), budget))} of memory",
        file=sys.stderr,
    )
    examples = collect_examples(act_run, layer, engine, device, latents, freq, n_tokens, budget, contexts)
    if settings.interpret_delphi_cache and not (folder.delphi_cache / layer / "config.json").is_file():
        pad_id = contexts.tokenizer.pad_token_id if contexts.tokenizer.pad_token_id is not None else 0
        cache = write_delphi_cache(
            act_run, act_run.read_meta(), layer, engine, device, n_tokens, folder.delphi_cache, pad_id
        )
        print(f"delphi's latent cache written to {cache}", file=sys.stderr)
    if settings.interpret_neuronpedia:
        write_neuronpedia(act_run, run, layer, engine, examples, explainer, contexts.tokenizer, n_tokens, folder)
    explanations = explain_all(settings, folder, examples, explainer)
    started = time.perf_counter()
    rows = score_all(settings, folder, examples, explanations, scorer, config)
    plot_scores(rows, folder.dir / "scores.png")
    summary = summarize(rows, config, time.perf_counter() - started, explainer, scorer)
    folder.write_summary(summary)
    refresh_browser(run, rows)
    means = (f"{kind} {s['real']['mean']} (control {s['control']['mean']})" for kind, s in summary["scores"].items())
    print(f"SAE {run.run_id}, mean balanced accuracy of {len(rows)} latents: " + ", ".join(means))
    return folder.dir


def write_neuronpedia(act_run, run, layer, engine, examples, explainer, tokenizer, n_tokens, folder) -> None:
    """interpretation/neuronpedia/batch-0.json; the top logits need the run's model (the explainer's when same)."""
    from transformers import AutoModelForCausalLM

    from sae_pipeline.interpret.neuronpedia import write_batch
    from sae_pipeline.lm.layers import block_index
    from sae_pipeline.lm.loading import model_source

    meta = act_run.read_meta()
    model = explainer.model
    if explainer.model_id != meta["model_id"]:
        source, extra = model_source(meta["model_id"])
        model = AutoModelForCausalLM.from_pretrained(source, **extra)
    ds = meta["dataset"]
    np_meta = {
        "model_id": meta["model_id"],
        "layer": block_index(layer),
        "sae_set": run.run_id,
        "n_tokens": n_tokens,
        "n_documents": int(ds["limit"]),
        "ctx_len": int(meta["max_length"]),
        "dataset": ds["name"],
    }
    path = folder.dir / "neuronpedia" / "batch-0.json"
    write_batch(examples, engine, model, tokenizer, np_meta, path)
    print(f"Neuronpedia features written to {path}", file=sys.stderr)


def run_config(settings, run, latents, budget: ExampleBudget, explainer, scorer) -> dict[str, Any]:
    return {
        "sae_run_id": run.run_id,
        "latents": latents,
        "explainer_model": explainer.model_id,
        "scorer_model": scorer.model_id,
        "language": settings.interpret_language,
        "examples": asdict(budget),
        "examples_per_prompt": settings.interpret_examples_per_prompt,
        "explainer_max_new_tokens": settings.explainer_max_new_tokens,
        "prompts": delphi_prompts()["source"],
    }


def explain_all(settings, folder: InterpretationFolder, examples: list[LatentExamples], explainer) -> dict[int, str]:
    """Every latent's explanation: the rows already written, then one new row per latent not yet explained."""
    done = {row["latent"]: row["explanation"] for row in folder.explanations.rows()}
    todo = [ex for ex in examples if ex.latent not in done]
    generated = explainer.generated_tokens
    with ProgressMeter(
        "explain", len(examples), "latent", initial=len(done), every_s=settings.progress_every_seconds
    ) as meter:
        for ex in todo:
            prompt = explainer_prompt(ex, settings.interpret_language)
            (answer,) = explainer.answer([prompt], settings.explainer_max_new_tokens, stop=explanation_complete)
            done[ex.latent] = parse_explanation(answer)
            folder.explanations.append({"latent": ex.latent, "explanation": done[ex.latent], "answer": answer})
            meter.update(1, tokens=explainer.generated_tokens - generated)
            generated = explainer.generated_tokens
    return done


def score_all(settings, folder, examples: list[LatentExamples], explanations: dict[int, str], scorer, config):
    """Every latent's scores and its control's: the rows already written, then one new row per latent."""
    rows = folder.latents.rows()
    done = {row["latent"] for row in rows}
    n, generated = len(examples), scorer.generated_tokens
    with ProgressMeter("score", n, "latent", initial=len(done), every_s=settings.progress_every_seconds) as meter:
        for i, ex in enumerate(examples):
            if ex.latent in done:
                continue
            control_latent = examples[(i + max(1, n // 2)) % n].latent if n > 1 else None
            tried = [explanations[ex.latent]] + ([] if control_latent is None else [explanations[control_latent]])
            scores = score_latent(settings, ex, tried, scorer)
            row = {
                "latent": ex.latent,
                "frequency": ex.frequency,
                "explanation": explanations[ex.latent],
                "scores": scores[0],
                "control": None,
            }
            if control_latent is not None:
                row["control"] = {"explanation_of": control_latent, "explanation": tried[1], "scores": scores[1]}
            row |= {"examples": ex.to_json(), "explainer_model": config["explainer_model"]}
            row["scorer_model"] = config["scorer_model"]
            folder.latents.append(row)
            rows.append(row)
            meter.update(1, tokens=scorer.generated_tokens - generated)
            generated = scorer.generated_tokens
    order = {ex.latent: i for i, ex in enumerate(examples)}
    return sorted(rows, key=lambda r: order[r["latent"]])


def score_latent(settings, ex: LatentExamples, explanations: list[str], scorer) -> list[dict[str, Any]]:
    """Detection and fuzzing of each explanation (the latent's own, its control's) on one latent's examples, in one
    ``ChatModel.classify`` call: prompts sharing a prefix go in one batch. Each answer is a 0/1 list, a digit per
    sample."""
    plans = [
        scorers.plan(
            kind,
            ex,
            explanation,
            settings.interpret_examples_per_prompt,
            settings.interpret_language,
            settings.seed + ex.latent,
        )
        for explanation in explanations
        for kind in scorers.SCORERS
    ]
    prompts = [p for plan in plans for p in plan.prompts]
    answers = scorer.classify(prompts, [len(batch) for plan in plans for batch in plan.batches])
    out, at = [], 0
    for plan in plans:
        if plan.kind == scorers.SCORERS[0]:
            out.append({})
        out[-1][plan.kind] = scorers.score(plan, answers[at : at + len(plan.prompts)])
        at += len(plan.prompts)
    return out

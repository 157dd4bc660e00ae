"""Step 4's summary: each score of the real explanations beside the control's, and the feature browser refreshed.

The control scores each latent's examples against another latent's explanation: a score is worth what it gains
over the control. A small explainer (SmolLM2-135M) is expected to score near the control; the summary shows it
rather than a bare mean.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from sae_pipeline.interpret.scorers import SCORERS
from sae_pipeline.store.files import now, read_json

HIST_BINS = 10


def _values(rows: list[dict[str, Any]], kind: str, control: bool) -> list[float]:
    out = []
    for row in rows:
        scores = (row["control"] or {}).get("scores") if control else row["scores"]
        value = (scores or {}).get(kind, {}).get("balanced_accuracy")
        if value is not None:
            out.append(float(value))
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    hist = [0] * HIST_BINS
    for v in values:
        hist[min(int(v * HIST_BINS), HIST_BINS - 1)] += 1
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 4) if values else None,
        "median": round(statistics.median(values), 4) if values else None,
        "histogram": {"edges": [b / HIST_BINS for b in range(HIST_BINS + 1)], "counts": hist},
    }


def summarize(rows, config, scoring_seconds: float, explainer, scorer) -> dict[str, Any]:
    """summary.json: per scorer the real and control statistics, and what the models generated in this process."""
    scores = {
        kind: {"real": _stats(_values(rows, kind, False)), "control": _stats(_values(rows, kind, True))}
        for kind in SCORERS
    }
    models = {explainer.model_id: explainer}
    models[scorer.model_id] = scorer
    return {
        "sae_run_id": config["sae_run_id"],
        "latents": len(rows),
        "explainer_model": config["explainer_model"],
        "scorer_model": config["scorer_model"],
        "language": config["language"],
        "scores": scores,
        "chance": 0.5,
        "generation": {
            m.model_id: {
                "chats": m.calls,
                "prompt_tokens": m.prompt_tokens,
                "generated_tokens": m.generated_tokens,
                "seconds": round(m.seconds, 2),
            }
            for m in models.values()
        },
        "written": now(),
    }


def plot_scores(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per scorer: the distribution of real and control scores, and each real score against firing frequency."""
    from sae_pipeline.outputs.plots import plt, save_figure

    fig, axes = plt.subplots(2, len(SCORERS), figsize=(10, 7))
    for col, kind in enumerate(SCORERS):
        real, control = _values(rows, kind, False), _values(rows, kind, True)
        ax = axes[0][col]
        ax.hist([real, control], bins=HIST_BINS, range=(0, 1), label=["real", "control"], color=["#3b6ea8", "#bbb"])
        ax.axvline(0.5, color="k", lw=0.8, ls=":")
        ax.set_title(f"{kind}: balanced accuracy", fontsize=10)
        ax.legend()
        ax = axes[1][col]
        pairs = [(r["frequency"], r["scores"][kind]["balanced_accuracy"]) for r in rows]
        pairs = [(f, s) for f, s in pairs if s is not None and f > 0]
        ax.scatter([f for f, _ in pairs], [s for _, s in pairs], s=10, color="#3b6ea8")
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("firing frequency")
        ax.set_ylabel(f"{kind} score")
    return save_figure(fig, path)


def interpretation_of(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the feature browser shows per latent: the explanation and the real and control scores."""
    out = {}
    for row in rows:
        control = row["control"] or {}
        out[str(row["latent"])] = {
            "explanation": row["explanation"],
            **{kind: row["scores"][kind]["balanced_accuracy"] for kind in SCORERS},
            **{
                f"control_{kind}": (control.get("scores") or {}).get(kind, {}).get("balanced_accuracy")
                for kind in SCORERS
            },
        }
    return out


def interpretation_for_browser(run) -> dict[str, Any]:
    """``{"interpretation": ...}`` for step 3's browser data when step 4 wrote rows for this SAE, else {}."""
    from sae_pipeline.interpret.io import InterpretationFolder

    folder = InterpretationFolder(run.dir)
    rows = folder.latents.rows() if folder.exists() else []
    return {"interpretation": interpretation_of(rows)} if rows else {}


def refresh_browser(run, rows: list[dict[str, Any]]) -> Path | None:
    """Step 3's feature browser of this SAE, when there is one, rewritten with the explanations and scores."""
    from sae_pipeline.outputs.browser import write_browser

    data_path = run.evaluation_dir / "feature_browser.json"
    if not data_path.is_file():
        return None
    data = read_json(data_path)
    data["interpretation"] = interpretation_of(rows)
    png = run.evaluation_dir / "firing_frequency.png"
    html, _ = write_browser(data, run.evaluation_dir, png)
    return html

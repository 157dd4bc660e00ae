"""The PNGs: the sweep frontier draws each group of seeds as a point with error bars, one panel per metric."""

from __future__ import annotations

import matplotlib.image

from sae_pipeline.outputs.plots import CE_PANEL, FVU_PANEL, plot_sweep_frontier, training_curves
from sae_pipeline.sae.sweep import seed_groups


def _members(ce):
    base = dict(layer_signature="sig", layer_num=2, n_latents_multiplier=4, architecture="topk", lr=1e-3)
    return [
        {**base, "top_k": k, "seed": s, "l0": k - 0.1 * s, "fvu": 1 / k + 0.01 * s, "ce_loss_recovered": ce(k, s)}
        for k in (8, 16)
        for s in (1, 2)
    ]


def test_frontier_has_one_panel_per_metric_and_says_when_ce_is_not_measurable(tmp_path):
    metrics = ("l0", "fvu", "ce_loss_recovered")
    measured = seed_groups(_members(lambda k, s: 0.5 + k / 100 + 0.01 * s), metrics)
    noise = seed_groups(_members(lambda k, s: None), metrics)  # the ablation gap was noise: CE-loss recovered null
    one = plot_sweep_frontier(measured, tmp_path / "fvu.png")
    two = plot_sweep_frontier(measured, tmp_path / "both.png", "t", panels=(FVU_PANEL, CE_PANEL))
    empty = plot_sweep_frontier(noise, tmp_path / "none.png", "t", panels=(FVU_PANEL, CE_PANEL))
    one_img, two_img, empty_img = (matplotlib.image.imread(p) for p in (one, two, empty))  # [h, w, rgba] in 0..1
    width = one_img.shape[1]
    assert two_img.shape[1] == empty_img.shape[1] == 2 * width  # 640 px per panel

    def blue(img):  # pixels of the lines and points (matplotlib's first colour, #1f77b4) in the right-hand panel
        right = img[:, width:, :3]
        return int(((right[..., 2] > 0.6) & (right[..., 0] < 0.4)).sum())

    assert blue(two_img) > 200 and blue(empty_img) == 0  # the null case is blank but for its message


def test_training_curves_do_not_make_noise_look_like_a_trend():
    """A TopK L0 wobbling between 15.97 and 16.00 and an FVU between 0.30 and 0.31 are drawn as the flat lines they
    are: L0 from 0, FVU over at least a decade."""
    steps = [
        {
            "tokens": 1000 * i,
            "loss": 0.31 - 0.0005 * i,
            "fvu": 0.30 + 0.0005 * (i % 3),
            "l0": 16 - 0.01 * (i % 4),
            "dead_fraction": 0.0,
        }
        for i in range(1, 20)
    ]
    fig = training_curves({"steps": steps, "holdout": {"fvu": 0.305}})
    loss_ax, l0_ax, dead_ax = fig.axes
    assert l0_ax.get_ylim()[0] == 0 and l0_ax.get_ylim()[1] >= 16
    lo, hi = loss_ax.get_ylim()
    assert hi / lo >= 10 - 1e-9
    assert dead_ax.get_ylim() == (-0.02, 1.02)

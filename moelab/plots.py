"""Plot helpers in one shared style. Every function returns a matplotlib Figure; ``save`` writes it."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

DOMAIN_COLORS = {"general": "#4C72B0", "math": "#DD8452", "code": "#55A868"}


def style() -> None:
    """The one style every moelab figure uses."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


style()


def save(fig, name: str, figures_dir: str | os.PathLike, pdf: bool = False) -> Path:
    """Save a figure as ``figures_dir/name.png`` (and ``.pdf``); returns the PNG path."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png)
    if pdf:
        fig.savefig(out / f"{name}.pdf")
    return png


def heatmap(matrix, *, xlabel: str, ylabel: str, title: str, yticklabels=None, xticklabels=None, cmap="viridis",
            vmin=None, vmax=None, cbar_label: str | None = None, figsize=None, annotate: bool = False):
    """A labelled heatmap of a 2-D array."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=figsize or (max(6, 0.22 * m.shape[1] + 2), max(2.5, 0.35 * m.shape[0] + 1.2)))
    sns.heatmap(m, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=annotate, fmt=".2g",
                xticklabels=xticklabels if xticklabels is not None else "auto",
                yticklabels=yticklabels if yticklabels is not None else "auto",
                cbar_kws={"label": cbar_label} if cbar_label else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def routing_frequency(freq_by_layer: dict, title: str = "Routing frequency per expert"):
    """Heatmap of expert frequency (rows: MoE layers, columns: experts)."""
    layers = sorted(freq_by_layer)
    m = np.stack([np.asarray(freq_by_layer[l], dtype=float) for l in layers])
    return heatmap(m, xlabel="expert", ylabel="layer", title=title, yticklabels=layers,
                   cbar_label="share of routed slots", cmap="mako")


def specialisation(share: np.ndarray, domains, layer: int | str, order=None):
    """Per-domain share of each expert's tokens for one layer (rows: domains, columns: experts)."""
    share = np.asarray(share, dtype=float)
    order = np.arange(share.shape[1]) if order is None else np.asarray(order)
    return heatmap(share[:, order], xlabel="expert (sorted by main domain)", ylabel="domain",
                   title=f"Layer {layer}: where each expert's tokens come from", yticklabels=list(domains),
                   xticklabels=[str(i) for i in order], cmap="rocket_r", vmin=0, vmax=1, cbar_label="share of tokens")


def grouped_bars(df, *, x: str, y: str, hue: str, err: str | None = None, title: str = "", ylabel: str | None = None,
                 logy: bool = False, palette=None):
    """Bar chart of a tidy table with optional error bars (one bar group per ``x``, bars by ``hue``)."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = list(dict.fromkeys(df[x]))
    hues = list(dict.fromkeys(df[hue]))
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sub = df[df[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
        color = (palette or DOMAIN_COLORS).get(h) if isinstance(palette or DOMAIN_COLORS, dict) else None
        ax.bar(pos, sub[y].values, width, label=str(h), color=color,
               yerr=None if err is None else sub[err].values, capsize=2)
    ax.set_xticks(np.arange(len(xs)), xs)
    if logy:
        ax.set_yscale("log")
    ax.set(ylabel=ylabel or y, title=title)
    ax.legend(title=hue, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def training_curve(curve: list[dict], window: int = 25, title: str = "Training the embedded model"):
    """LM loss (smoothed) and router load-balancing loss against steps."""
    steps = np.array([c["step"] for c in curve])
    lm = np.array([c["lm_loss"] for c in curve])
    aux = np.array([c.get("aux_loss", np.nan) for c in curve])
    k = max(1, min(window, len(lm)))
    smooth = np.convolve(lm, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, lm, alpha=0.25, lw=0.8)
    ax[0].plot(steps[k - 1:], smooth, lw=1.6)
    ax[0].set(xlabel="step", ylabel="LM loss (nats/token)", title=title)
    ax[1].plot(steps, aux, lw=0.8, color="#C44E52")
    ax[1].set(xlabel="step", ylabel="load-balancing loss", title="Router balance")
    fig.tight_layout()
    return fig


def pareto_scatter(df, *, x: str, y: str, hue: str, label: str | None = None, maximize=(True, True),
                   xerr: str | None = None, yerr: str | None = None, title: str = "", xlabel: str | None = None,
                   ylabel: str | None = None, ax=None):
    """Scatter of two scores per point with each ``hue`` group's Pareto frontier drawn as a line.

    Notebook 02 (REAM, REAM, arXiv 2604.04356): MC against GEN, one point per calibration mix.

    Args:
        df: tidy table, one row per point.
        x, y: the score columns; ``maximize`` says per axis whether larger is better
            (``moelab.evaluate.pareto_front``).
        hue: column whose groups get a colour and a frontier each.
        label: column annotated beside each point (e.g. the mix).
        xerr, yerr: optional standard-error columns.
        ax: draw into this Axes instead of a new figure.

    Returns:
        The Figure.
    """
    from .evaluate import pareto_front

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    else:
        fig = ax.figure
    for j, (h, sub) in enumerate(df.groupby(hue, sort=False)):
        color = f"C{j}"
        ax.errorbar(sub[x], sub[y], xerr=None if xerr is None else sub[xerr], yerr=None if yerr is None else sub[yerr],
                    fmt="o", color=color, alpha=0.8, ms=5, elinewidth=0.6, capsize=0, label=str(h))
        front = sub[pareto_front(sub[x], sub[y], maximize)].sort_values(x)
        ax.plot(front[x], front[y], "-", color=color, lw=1.4, alpha=0.7)
        if label is not None:  # one annotation per position: points that coincide share it
            for (px, py), at in sub.groupby([x, y], sort=False):
                ax.annotate(", ".join(str(t) for t in at[label]), (px, py), fontsize=7, color=color,
                            xytext=(4, 3 - 10 * j), textcoords="offset points")
    ax.set(xlabel=xlabel or x, ylabel=ylabel or y, title=title)
    ax.legend(title=hue, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def expert_groups(saliency, groups, *, title: str = "", ylabel: str = "saliency"):
    """One layer's experts by descending saliency, coloured by their part in a grouping.

    Notebook 02 (REAM's pseudo-pruning, REAM, arXiv 2604.04356): centroids alone, centroids that absorb
    members, experts merged into a centroid (labelled with it) and dropped experts.

    Args:
        saliency: [E] scores.
        groups: [[centroid, members...], ...]; experts in no group are dropped.
    """
    s = np.asarray(saliency, dtype=float)
    role, parent = {}, {}
    for g in groups:
        role[g[0]] = "centroid" if len(g) == 1 else "centroid with members"
        for m in g[1:]:
            role[m], parent[m] = "merged into a centroid", g[0]
    colors = {"centroid": "#4C72B0", "centroid with members": "#55A868", "merged into a centroid": "#DD8452",
              "dropped": "#AAAAAA"}
    order = np.argsort(-s, kind="stable")
    fig, ax = plt.subplots(figsize=(max(6, 0.24 * len(s) + 2), 3.8))
    ax.bar(np.arange(len(s)), s[order], color=[colors[role.get(int(e), "dropped")] for e in order])
    for i, e in enumerate(order):
        if int(e) in parent:
            ax.annotate(f"→{parent[int(e)]}", (i, s[e]), ha="center", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(np.arange(len(s)), [str(int(e)) for e in order], fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for r, c in colors.items()]
    ax.legend(handles, list(colors), fontsize=8, frameon=False)
    ax.set(xlabel="expert (by descending saliency)", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig

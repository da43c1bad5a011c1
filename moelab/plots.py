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

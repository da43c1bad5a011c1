"""Plot helpers in one shared style. Every function returns a matplotlib Figure; ``save`` writes it.

The whole collection shares one colour per method (``METHOD_COLORS``) and per domain
(``DOMAIN_COLORS``, in the order of ``DOMAIN_ORDER``), so a method looks the same in every notebook;
fonts are sized for a projector."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

DOMAIN_ORDER = ("general", "math", "code")
DOMAIN_COLORS = {"general": "#4C72B0", "math": "#DD8452", "code": "#55A868"}

# One colour per method for every notebook. Names are matched exactly, then by their longest known
# prefix ("REAP 0.25" and "REAP pruning" are REAP), case-sensitively.
METHOD_COLORS = {
    "original": "#3A3A3A",
    "frequency": "#8172B3",
    "soft_logit": "#937860",
    "REAP": "#C44E52",
    "random": "#A0A0A0",
    "REAM": "#1F77B4",
    "HC-SMoE": "#17BECF",
    "M-SMoE": "#DA8BC3",
    "M-SMoE unaligned": "#F2C1E0",
    "MC-SMoE": "#8C1C6B",
    "DERN": "#2CA02C",
    "NAEE": "#BCBD22",
    "pruning": "#E15759",
    "activation": "#1F77B4",
}
_FALLBACK = ["#FF7F0E", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F", "#1B9E77", "#D95F02", "#7570B3", "#66A61E"]


def color(name, default=None):
    """The collection's colour for a method or domain name (exact, then longest prefix), else ``default``."""
    key = str(name)
    known = {**DOMAIN_COLORS, **METHOD_COLORS}
    best = max((k for k in known if key == k or key.startswith(k + " ")), key=len, default=None)
    return known[best] if best is not None else default


def palette(names) -> dict:
    """A colour for every name: the collection's where it has one, otherwise unused fallback colours in order."""
    names = list(dict.fromkeys(names))
    exact = {n: DOMAIN_COLORS.get(str(n)) or METHOD_COLORS.get(str(n)) for n in names}
    taken = {c for c in exact.values() if c}
    spare = iter([c for c in _FALLBACK if c not in taken] + ["#555555"] * len(names))
    out = {}
    for n in names:  # an exact name keeps its colour; a prefix colour goes to the first name that wants it
        if exact[n]:
            out[n] = exact[n]
            continue
        c = color(n)
        out[n] = c if c and c not in taken else next(spare)
        taken.add(out[n])
    return out


_palette = palette  # for functions whose ``palette`` argument shadows it


def style() -> None:
    """The one style every moelab figure uses (fonts readable on a projector)."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.15)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                         "legend.fontsize": 11, "legend.title_fontsize": 11, "axes.titlesize": 13})


style()


def no_signal(values, stderr, chance: float, z: float = 2.0) -> bool:
    """True when every value lies within ``z`` standard errors of ``chance``: a bar panel of such values
    would only draw noise (a metric at chance says nothing about the methods)."""
    v, se = np.asarray(values, dtype=float), np.asarray(stderr, dtype=float)
    ok = np.isfinite(v)
    return bool(ok.any() and (np.abs(v[ok] - chance) <= z * np.nan_to_num(se[ok])).all())


def save(fig, name: str, figures_dir: str | os.PathLike, pdf: bool = False) -> Path | None:
    """Save a figure as ``figures_dir/name.png`` (and ``.pdf``); returns the PNG path.

    ``fig`` None (a panel a helper declined to draw, e.g. values all at chance) removes an older file
    of that name, so no stale figure stays beside this run's, and returns None."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    if fig is None:
        for f in (png, out / f"{name}.pdf"):
            f.unlink(missing_ok=True)
        return None
    fig.savefig(png)
    if pdf:
        fig.savefig(out / f"{name}.pdf")
    return png


def heatmap(matrix, *, xlabel: str, ylabel: str, title: str, yticklabels=None, xticklabels=None, cmap="viridis",
            vmin=None, vmax=None, cbar_label: str | None = None, figsize=None, annotate: bool = False):
    """A labelled heatmap of a 2-D array."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=figsize or (max(6, 0.3 * m.shape[1] + 2), max(2.8, 0.42 * m.shape[0] + 1.4)))
    sns.heatmap(m, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=annotate, fmt=".2g",
                xticklabels=xticklabels if xticklabels is not None else "auto",
                yticklabels=yticklabels if yticklabels is not None else "auto",
                cbar_kws={"label": cbar_label} if cbar_label else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.tick_params(axis="y", rotation=0)
    ax.tick_params(axis="x", rotation=0, labelsize=9 if m.shape[1] > 24 else None)  # horizontal, never overlapping
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
    domains = list(domains)
    rows = sorted(range(len(domains)), key=lambda i: (DOMAIN_ORDER.index(domains[i]) if domains[i] in DOMAIN_ORDER
                                                      else len(DOMAIN_ORDER), i))  # the collection's domain order
    share, domains = share[rows], [domains[i] for i in rows]
    order = np.arange(share.shape[1]) if order is None else np.asarray(order)
    order = order[np.argsort(share[:, order].argmax(0), kind="stable")]  # grouped by main domain, in row order
    return heatmap(share[:, order], xlabel="expert (sorted by main domain)", ylabel="domain",
                   title=f"Layer {layer}: where each expert's tokens come from", yticklabels=domains,
                   xticklabels=[str(i) for i in order], cmap="rocket_r", vmin=0, vmax=1, cbar_label="share of tokens")


def grouped_bars(df, *, x: str, y: str, hue: str, err: str | None = None, title: str = "", ylabel: str | None = None,
                 logy: bool = False, palette=None, chance: float | None = None):
    """Bar chart of a tidy table with optional error bars (one bar group per ``x``, bars by ``hue``).

    Bars start at zero; with ``logy`` the values are drawn as points (a bar on a log axis has no
    honest base). Colours follow the collection's map (``color``) unless ``palette`` gives them.
    With ``chance`` and ``err``, a table whose values all lie within two standard errors of chance is
    not drawn: the function prints one line saying so and returns None (``save`` then writes nothing).
    """
    if chance is not None and err is not None and no_signal(df[y], df[err], chance):
        print(f"{title or y}: every value is within two standard errors of chance ({chance:g}), "
              "so no panel is drawn: the metric does not tell these variants apart here.")
        return None
    xs = list(dict.fromkeys(df[x]))
    hues = list(dict.fromkeys(df[hue]))
    colors = {**_palette(hues), **(palette or {})}
    fig, ax = plt.subplots(figsize=(max(7.5, 1.0 + 0.55 * len(xs) * len(hues)), 4.4))
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sub = df[df[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
        yerr = None if err is None else sub[err].values
        if logy:
            ax.errorbar(pos, sub[y].values, yerr=yerr, fmt="o", ms=7, color=colors[h], label=str(h), capsize=3)
        else:
            ax.bar(pos, sub[y].values, width, label=str(h), color=colors[h], yerr=yerr, capsize=3)
    ax.set_xticks(np.arange(len(xs)), xs)
    if logy:
        ax.set_yscale("log")
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1.2)
    ax.set(ylabel=ylabel or y, title=title)
    ax.legend(title=hue, frameon=False, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if len(hues) > 3 else {}))
    fig.tight_layout()
    return fig


def paired_bars(rows, *, title: str = "", xlabel: str = "difference (a minus b)", label: str = "label",
                lower_is_better: bool = True, z: float = 2.0, ax=None):
    """Horizontal bars of paired differences with their paired intervals (diff ± ``z`` stderr).

    For claims that are paired tests (``moelab.evaluate.paired_difference``): each bar is one
    comparison, drawn from zero, its interval the one the verdict uses. A bar is coloured green when
    the interval lies on the better side of zero, red on the worse side, grey when it crosses zero.

    Args:
        rows: records (dicts or a DataFrame) with ``label``, ``diff`` and ``stderr``.
        lower_is_better: a negative difference is an improvement (bits per byte); False for accuracy.
        ax: draw into this Axes instead of a new figure.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    better = -1.0 if lower_is_better else 1.0  # the sign of an improvement
    colors = []
    for d, se in zip(df["diff"], df["stderr"]):
        lo, hi = better * d - z * se, better * d + z * se  # the interval, improvements positive
        colors.append("#2CA02C" if lo > 0 else "#D62728" if hi < 0 else "#A0A0A0")
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(df) + 1.6))
    else:
        fig = ax.figure
    ypos = np.arange(len(df))[::-1]
    ax.barh(ypos, df["diff"], xerr=z * df["stderr"], color=colors, capsize=3)
    ax.set_yticks(ypos, df[label])
    ax.xaxis.set_major_locator(plt.MaxNLocator(nbins=5))  # few ticks: small differences have long labels
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel=f"{xlabel}; bars ± {z:g} paired standard errors", title=title)
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
    colors = _palette(df[hue])
    for j, (h, sub) in enumerate(df.groupby(hue, sort=False)):
        color = colors[h]
        ax.errorbar(sub[x], sub[y], xerr=None if xerr is None else sub[xerr], yerr=None if yerr is None else sub[yerr],
                    fmt="o", color=color, alpha=0.8, ms=5, elinewidth=0.6, capsize=0, label=str(h))
        front = sub[pareto_front(sub[x], sub[y], maximize)].sort_values(x)
        ax.plot(front[x], front[y], "-", color=color, lw=1.4, alpha=0.7)
        if label is not None:  # one annotation per position: points that coincide share it
            for (px, py), at in sub.groupby([x, y], sort=False):
                ax.annotate(", ".join(str(t) for t in at[label]), (px, py), fontsize=9, color=color,
                            xytext=(4, 3 - 10 * j), textcoords="offset points")
    ax.set(xlabel=xlabel or x, ylabel=ylabel or y, title=title)
    ax.legend(title=hue, frameon=False)
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
            ax.annotate(f"→{parent[int(e)]}", (i, s[e]), ha="center", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(np.arange(len(s)), [str(int(e)) for e in order], fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for r, c in colors.items()]
    ax.legend(handles, list(colors), frameon=False)
    ax.set(xlabel="expert (by descending saliency)", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def segment_flow(flow, kept, dropped, *, title: str = ""):
    """Heatmap of how many segments each dropped expert moved into each kept expert (DERN's
    recombination, one layer), trimmed to the experts that moved or received something; the title
    says how many were left out. Returns None (and prints why) when nothing moved."""
    f = np.asarray(flow, dtype=float)
    rows, cols = f.sum(1) > 0, f.sum(0) > 0
    if not rows.any():
        print(f"{title}: no segment of a dropped expert moved, so there is no flow to draw.")
        return None
    left_out = f"; not shown: {int((~rows).sum())} dropped experts that moved nothing, " \
               f"{int((~cols).sum())} kept experts that received nothing" if (~rows).any() or (~cols).any() else ""
    sub = f[rows][:, cols]
    return heatmap(sub, xlabel="kept expert", ylabel="dropped expert", title=title + left_out,
                   xticklabels=[k for k, c in zip(kept, cols) if c], yticklabels=[d for d, r in zip(dropped, rows) if r],
                   cmap="mako", cbar_label="segments moved", annotate=sub.size <= 150)


KIND_COLORS = {"from scratch": "#4C72B0", "upcycled": "#DD8452", "checkpoint": "#55A868"}


def claim_effects(effects, *, title: str = "Each claim's advantage on each model",
                  xlabel: str = "advantage in bits per byte (positive: the claim's direction)",
                  interval: str | None = "± 2 paired standard errors"):
    """Claims matrix figure: per claim (rows) one point per model with its interval, coloured by the
    model's kind (from scratch, upcycled); the interval is the one the verdict uses.

    Args:
        effects: ``study.effects`` records (claim, model, kind, advantage, lo, hi).
        interval: what the interval is, under the x label (None: no intervals to name).
    """
    import pandas as pd

    df = pd.DataFrame(effects)
    claims_order = list(dict.fromkeys(df["claim"]))
    models = list(dict.fromkeys(df["model"]))
    fig, ax = plt.subplots(figsize=(9.5, 0.55 * len(claims_order) * max(1, len(models)) ** 0.5 + 1.8))
    step = 0.7 / max(1, len(models))
    for j, m in enumerate(models):  # each model at its own offset within the claim's band
        sub = df[df["model"] == m]
        y = np.array([len(claims_order) - 1 - claims_order.index(c) for c in sub["claim"]]) + 0.35 - (j + 0.5) * step
        kind = sub["kind"].iloc[0]
        nth = [k for k in dict.fromkeys(zip(df["model"], df["kind"])) if k[1] == kind].index((m, kind))
        ax.errorbar(sub["advantage"], y, xerr=[sub["advantage"] - sub["lo"], sub["hi"] - sub["advantage"]],
                    fmt="osD^v"[nth % 5],  # one marker per model within its kind (seeds)
                    ms=4, capsize=2, color=KIND_COLORS.get(kind, "#7F7F7F"), label=f"{m} ({kind})")
    ax.set_yticks(np.arange(len(claims_order))[::-1], claims_order)
    ax.grid(axis="y", visible=False)
    for i in range(0, len(claims_order), 2):  # bands tell the claims apart
        ax.axhspan(i - 0.5, i + 0.5, color="#F0F0F0", zorder=0)
    ax.set_ylim(-0.5, len(claims_order) - 0.5)
    ax.axvline(0, color="k", lw=1)
    ax.xaxis.set_major_locator(plt.MaxNLocator(nbins=5))
    ax.set(xlabel=f"{xlabel}\n{interval}" if interval else xlabel, title=title)
    fig.tight_layout()
    # below the whole figure (its x label has one or two lines); the saved image grows to hold it
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2)
    return fig


def model_measures(table, columns, *, title: str = "How alike each model's experts are",
                   xlabel: str = "mean over the MoE layers"):
    """One row per measure (``columns`` of ``table``), one point per model coloured by its kind: how the
    models of a study differ (``study.model_table``)."""
    rows = [{"claim": c, "model": r["model"], "kind": r["kind"], "advantage": r[c], "lo": r[c], "hi": r[c]}
            for c in columns for r in table.to_dict("records")]
    return claim_effects(rows, title=title, xlabel=xlabel, interval=None)

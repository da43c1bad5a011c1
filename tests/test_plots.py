"""The figure rules of the collection (moelab.plots): one colour per method, one domain order, no panel
of values at chance, bars from zero, paired intervals, trimmed segment-flow heatmaps."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from moelab import plots


def test_a_method_has_one_colour_everywhere_and_names_in_one_figure_never_share_one():
    assert plots.color("REAP") == plots.color("REAP 0.25") == plots.color("REAP pruning")
    assert plots.color("M-SMoE unaligned") != plots.color("M-SMoE")  # the longest known name wins
    assert plots.color("something else") is None
    pal = plots.palette(["M-SMoE 25% align=none", "M-SMoE 25% align=weights", "pruning", "REAM"])
    assert len(set(pal.values())) == 4, pal
    assert pal["REAM"] == plots.METHOD_COLORS["REAM"] and pal["M-SMoE 25% align=none"] == plots.METHOD_COLORS["M-SMoE"]
    # the same method keeps its colour whatever else is in the figure
    assert plots.palette(["REAP", "x"])["REAP"] == plots.palette(["y", "z", "REAP"])["REAP"]


def test_values_all_at_chance_draw_no_panel_and_remove_a_stale_figure(tmp_path, capsys):
    df = pd.DataFrame({"x": ["a", "a", "b", "b"], "h": ["REAM", "REAP"] * 2, "v": [0.25, 0.27, 0.23, 0.26], "e": [0.03] * 4})
    (tmp_path / "m.png").write_bytes(b"old")
    assert plots.grouped_bars(df, x="x", y="v", hue="h", err="e", chance=0.25, title="MC") is None
    assert "chance" in capsys.readouterr().out
    assert plots.save(None, "m", tmp_path) is None and not (tmp_path / "m.png").exists()
    informative = df.assign(v=[0.6, 0.62, 0.58, 0.61])
    fig = plots.grouped_bars(informative, x="x", y="v", hue="h", err="e", chance=0.25)
    assert fig is not None and plots.save(fig, "m", tmp_path).exists()
    assert fig.axes[0].get_ylim()[0] <= 0  # bars start at zero
    assert plots.no_signal([0.0, 0.0], [0.0, 0.0], 0.0) and not plots.no_signal([0.0, 0.05], [0.0, 0.01], 0.0)


def test_a_log_axis_draws_points_not_bars():
    df = pd.DataFrame({"x": ["a", "b"], "h": ["REAM", "REAM"], "v": [10.0, 1000.0]})
    ax = plots.grouped_bars(df, x="x", y="v", hue="h", logy=True).axes[0]
    assert not ax.patches and ax.get_yscale() == "log"


def test_paired_bars_colour_what_the_interval_decides():
    rows = [{"label": "better", "diff": -0.01, "stderr": 0.002}, {"label": "worse", "diff": 0.01, "stderr": 0.002},
            {"label": "unclear", "diff": 0.001, "stderr": 0.002}]
    ax = plots.paired_bars(rows).axes[0]
    colours = [matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches]
    assert colours == ["#2ca02c", "#d62728", "#a0a0a0"]
    # higher is better (accuracy): the same numbers read the other way round
    ax = plots.paired_bars(rows, lower_is_better=False).axes[0]
    assert [matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches][:2] == ["#d62728", "#2ca02c"]


def test_segment_flow_shows_only_experts_that_moved_or_received(capsys):
    flow = np.zeros((4, 3))
    flow[1, 2] = 5
    fig = plots.segment_flow(flow, kept=[10, 11, 12], dropped=[0, 1, 2, 3], title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["12"] and [t.get_text() for t in ax.get_yticklabels()] == ["1"]
    assert "3 dropped experts" in ax.get_title() and "2 kept experts" in ax.get_title()
    assert plots.segment_flow(np.zeros((2, 2)), [0, 1], [2, 3], title="t") is None
    assert "no segment" in capsys.readouterr().out


def test_specialisation_rows_follow_the_collection_s_domain_order_with_horizontal_ticks():
    share = np.array([[0.8, 0.1], [0.1, 0.1], [0.1, 0.8]])  # rows: code, general, math
    ax = plots.specialisation(share, ["code", "general", "math"], layer=1).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(plots.DOMAIN_ORDER)
    assert all(t.get_rotation() == 0 for t in ax.get_xticklabels())
    # columns grouped by main domain in that order: expert 1 (math) before expert 0 (code)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "0"]


@pytest.fixture(autouse=True)
def _close():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")

"""Trajectory plots (colours, legend, layout, non-finite input) and plain-text listings."""

import warnings

import numpy as np
import pytest
from matplotlib.colors import to_hex

from simfluence.plots import (
    format_influences,
    influence_listing,
    plot_trajectories,
    top_influences,
)


def test_multi_line_texts_are_listed_on_one_line_each():
    rows = [
        {"rank": 1, "train_index": 7, "removal_change": 0.25, "count": 3, "text": "a\nb\t c"},
        {"rank": 2, "train_index": 2, "removal_change": 0.125, "count": 1, "text": "d  e\n"},
    ]
    listing = {"proponents": rows, "opponents": []}
    lines = format_influences(listing, 4, "premise\nhypothesis").splitlines()
    assert lines[0] == "test example 4: premise hypothesis"
    assert len(lines) == 2 + (2 + len(rows)) + 2
    assert lines[4].endswith("  a b c") and lines[5].endswith("  d e")
    assert lines[-2].startswith("opponents") and lines[-1] == "  (none)"


def test_proponents_and_opponents_are_listed_apart_against_a_sort():
    rng = np.random.default_rng(0)
    inf = rng.normal(size=30)
    inf[[3, 4]] = 0.0  # neither helps nor hurts
    inf[5] = inf[6] = 2.5  # a tie, broken by index
    cur = rng.integers(0, 30, (40, 3))
    cur[cur == 11] = 12  # 11 absent from the curriculum
    ids = [f"uid-{i}" for i in range(30)]
    got = influence_listing(inf, cur, 4, ids=ids)
    present = set(cur.reshape(-1).tolist())
    pro = sorted((i for i in present if inf[i] > 0), key=lambda i: (-inf[i], i))
    con = sorted((i for i in present if inf[i] < 0), key=lambda i: (inf[i], i))
    assert [r["train_index"] for r in got["proponents"]] == pro[:4]
    assert [r["train_index"] for r in got["opponents"]] == con[:4]
    assert (got["n_proponents"], got["n_opponents"]) == (len(pro), len(con))
    assert [r["rank"] for r in got["opponents"]] == [1, 2, 3, 4]
    for r in got["proponents"] + got["opponents"]:
        assert r["id"] == f"uid-{r['train_index']}" and r["removal_change"] == inf[r["train_index"]]
        assert r["count"] == int((cur == r["train_index"]).sum())
    assert got["top"] == top_influences(inf, cur, 4, ids=ids)
    text = format_influences(got, 0)
    first = text.splitlines()[4]  # the first proponent, its dataset id beside the position
    assert first.split()[:3] == ["1", str(pro[0]), f"uid-{pro[0]}"]
    assert "opponents (removal lowers the loss: the example hurts): 4 of" in text


def _trajectories(n_runs: int, steps: int = 12, n_test: int = 5):
    rng = np.random.default_rng(n_runs)
    true = [1.0 + rng.normal(0, 0.05, (steps + 1, n_test)).cumsum(0) for _ in range(n_runs)]
    return true, [t + 0.01 for t in true], [f"run {k}" for k in range(n_runs)]


@pytest.mark.parametrize(("n_runs", "n_tests"), [(2, 3), (12, 1), (12, 5), (25, 2), (60, 1)])
def test_every_run_has_its_own_colour_and_one_figure_legend(tmp_path, n_runs, n_tests):
    from simfluence.plots import _trajectory_figure  # the Figure plot_trajectories saves

    true, pred, labels = _trajectories(n_runs)
    tests = list(range(n_tests))
    fig = _trajectory_figure(true, pred, labels, tests, title="t")
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        assert ax.get_legend() is None  # nothing drawn over the panels
        lines = ax.get_lines()
        assert len(lines) == 2 * n_runs
        solid = [to_hex(ln.get_color(), keep_alpha=True) for ln in lines[0::2]]
        dashed = [to_hex(ln.get_color(), keep_alpha=True) for ln in lines[1::2]]
        assert len(set(solid)) == n_runs and solid == dashed
        assert {ln.get_linestyle() for ln in lines[0::2]} == {"-"}
        assert {ln.get_linestyle() for ln in lines[1::2]} == {"--"}
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*labels, "true", "simulated"]
    # Drawing lays the figure out: no "constrained_layout not applied", nothing at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plot_trajectories(tmp_path / "f.png", true, pred, labels, tests, title="t")
    assert out.read_bytes()[:4] == b"\x89PNG"
    # The legend lies inside the figure, beside (not over) the panels.
    fig.draw_without_rendering()  # runs the constrained layout
    box = legend.get_window_extent()
    fig_box = fig.bbox
    assert box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1
    assert box.y0 >= fig_box.y0 - 1 and box.y1 <= fig_box.y1 + 1
    for ax in fig.axes:
        if ax.get_visible():
            assert ax.get_window_extent().x1 <= box.x0 + 1


def test_a_non_finite_simulated_loss_is_refused_naming_run_and_step(tmp_path):
    true, pred, labels = _trajectories(3)
    pred[1][7:, 2] = np.inf
    out = tmp_path / "f.png"
    with pytest.raises(ValueError, match=r"^run 1: the simulated loss of test example 2 is inf "):
        plot_trajectories(out, true, pred, labels, [0, 2])
    with pytest.raises(ValueError, match="at step 7; the simulator diverges"):
        plot_trajectories(out, true, pred, labels, [2])
    assert not out.exists()
    plot_trajectories(out, true, pred, labels, [0, 1])  # test 2 is not drawn: fine
    assert out.exists()


def test_describe_examples_strips_the_shared_template_and_splits_off_the_gold():
    from simfluence.plots import describe_examples, example_labels

    texts = [
        "Q? Yes or no?\nHypothesis: a b.\nPremise: c => Yes",
        "Q? Yes or no?\nHypothesis: d => e.\nPremise: f => No",  # " => " inside the input
        "Q? Yes or no?\nHypothesis: g.\nPremise: h => No",
    ]
    stripped, golds, template = describe_examples(texts)
    assert template == "Q? Yes or no?\n"  # cut back to the line (not inside "Hypothesis: ")
    assert stripped[1] == "Hypothesis: d => e.\nPremise: f" and golds == ["Yes", "No", "No"]
    assert example_labels(golds) == golds
    # No " => ": no gold answers, nothing to split the histograms by; one text: no template.
    assert describe_examples(["plain one", "plain two"]) == (["one", "two"], [None, None], "plain ")
    assert example_labels([None, None]) is None and example_labels(["a", "a"]) is None
    assert describe_examples(["only => x"]) == (["only"], ["x"], "")


def test_metric_bars_read_the_lds_or_its_alias_in_older_results():
    from matplotlib.container import BarContainer

    from simfluence.plots import _metric_bars_figure

    rng = np.random.default_rng(1)

    def stat():
        return {"mean": float(rng.normal()), "stderr": float(rng.uniform(0.01, 0.1))}

    keys = ("all_steps_mse", "final_step_spearman", "final_step_mse", "across_run_spearman")
    old = {"variants": {v: {k: stat() for k in keys} for v in ("linear", "additive")}}
    fig = _metric_bars_figure(old)  # written before the "lds" key: the alias is drawn
    for ax, key in zip(fig.axes, keys, strict=True):
        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
        want = [old["variants"][v][key]["mean"] for v in ("linear", "additive")]
        assert [p.get_height() for p in bars.patches] == want
        assert [t.get_text() for t in ax.get_xticklabels()] == ["linear", "additive"]
    assert fig.axes[3].get_title() == "LDS (across-run Spearman)"

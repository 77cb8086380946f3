"""Trajectory plots (colours, legend, layout, non-finite input) and plain-text listings."""

import warnings

import numpy as np
import pytest
from matplotlib.colors import to_hex

from simfluence.plots import format_influences, plot_trajectories


def test_multi_line_texts_are_listed_on_one_line_each():
    rows = [
        {"rank": 1, "train_index": 7, "removal_change": 0.25, "count": 3, "text": "a\nb\t c"},
        {"rank": 2, "train_index": 2, "removal_change": -0.5, "count": 1, "text": "d  e\n"},
    ]
    lines = format_influences(rows, 4, "premise\nhypothesis").splitlines()
    assert lines[0] == "test example 4: premise hypothesis"
    assert len(lines) == 3 + len(rows)
    assert lines[3].endswith("  a b c") and lines[4].endswith("  d e")


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

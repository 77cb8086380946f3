"""Figures: true vs simulated loss trajectories, fitted A/B distributions, influence listings.

matplotlib is used through `matplotlib.figure.Figure` with the Agg renderer (no pyplot, no
global backend state, no display needed). Every file is written atomically. Shape annotations
(jaxtyping) are documentation; nothing checks them at run time.

References:
    Guu et al., "Simfluence", 2023 (Figure 1: true vs simulated trajectories).
    https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from simfluence.runlog import atomic_write_bytes

__all__ = [
    "plot_trajectories",
    "plot_parameters",
    "top_influences",
    "influence_listing",
    "format_influences",
    "check_finite_losses",
    "plot_counterfactual",
]


# Trajectory legend: font size (points) and the height of one legend row in points.
_LEGEND_FONT = 6
_LEGEND_ROW_PT = 1.9 * _LEGEND_FONT


def _figure(n_panels: int, panel_size=(3.6, 2.6), extra_width: float = 0.0):
    """A constrained-layout figure of up to 4 panels a row, `extra_width` inches wider."""
    from matplotlib.figure import Figure

    cols = min(n_panels, 4)
    rows = math.ceil(n_panels / cols)
    fig = Figure(
        figsize=(panel_size[0] * cols + extra_width, panel_size[1] * rows), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _run_colors(n: int) -> list[tuple[float, float, float, float]]:
    """`n` distinct RGBA colours, one per run.

    tab10 (matplotlib's default cycle) up to 10 runs, tab20 up to 20, else `n` evenly spaced
    samples of the continuous turbo map (distinct up to its 256 entries; a legend of more runs
    than that is unreadable anyway).
    """
    from matplotlib import colormaps

    if n <= 10:
        return [(*c, 1.0) for c in colormaps["tab10"].colors[:n]]
    if n <= 20:
        return [(*c, 1.0) for c in colormaps["tab20"].colors[:n]]
    return [tuple(float(v) for v in c) for c in colormaps["turbo"](np.linspace(0.0, 1.0, n))]


def check_finite_losses(arrays, run_labels, tests, what: str, fix: str) -> None:
    """Refuses a NaN or inf in the given test columns of loss trajectories, naming the place.

    Args:
        arrays: per run, float [steps + 1, n_test] losses.
        run_labels: per run, the name the error starts with (e.g. "run 3", a file name).
        tests: the test-example columns to check.
        what: "observed" or "simulated", for the message.
        fix: what to do, ending the message.

    Raises:
        ValueError: one line, ``"{label}: the {what} loss of test example {j} is {v} at step
            {t}; {fix}"`` for the first bad entry.
    """
    for arr, label in zip(arrays, run_labels, strict=True):
        cols = np.asarray(arr)[:, list(tests)]
        bad = ~np.isfinite(cols)
        if bad.any():
            step, p = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(
                f"{label}: the {what} loss of test example {tests[p]} is {cols[step, p]} at step "
                f"{step}; {fix}"
            )


def _trajectory_figure(true, pred, run_labels, tests, test_labels=None, title=None):
    """The Figure of `plot_trajectories` (same arguments, no path)."""
    from matplotlib.lines import Line2D

    if not (len(true) == len(pred) == len(run_labels)) or not true:
        raise ValueError(
            f"got {len(true)} true and {len(pred)} simulated trajectories and {len(run_labels)} "
            "run labels; pass one of each per run (at least one run)"
        )
    tests = [int(j) for j in tests]
    if not tests:
        raise ValueError("tests is empty; pass at least one test-example index to plot")
    check_finite_losses(true, run_labels, tests, "observed", "repair or drop that run")
    check_finite_losses(
        pred,
        run_labels,
        tests,
        "simulated",
        "the simulator diverges on this curriculum (refit it with larger lambdas)",
    )
    colors = _run_colors(len(true))
    # One figure-level legend beside the panels: a colour per run, then the line-style key.
    handles = [
        Line2D([], [], color=c, lw=1.2, label=lab)
        for c, lab in zip(colors, run_labels, strict=True)
    ]
    handles += [
        Line2D([], [], color="0.3", lw=1.2, ls="-", label="true"),
        Line2D([], [], color="0.3", lw=1.2, ls="--", label="simulated"),
    ]
    panel_h = 2.6
    rows = math.ceil(len(tests) / min(len(tests), 4))
    per_col = max(4, int(panel_h * rows * 72 / _LEGEND_ROW_PT) - 2)  # rows that fit the height
    n_cols = math.ceil(len(handles) / per_col)
    longest = max(len(h.get_label()) for h in handles)
    # handle (2 em) + pad (0.8 em) + text (~0.6 em a character) + column gap (2 em), in inches
    col_width = (4.8 + 0.6 * longest) * _LEGEND_FONT / 72
    fig, axes = _figure(len(tests), panel_size=(3.6, panel_h), extra_width=n_cols * col_width)
    for p, (ax, j) in enumerate(zip(axes, tests, strict=True)):
        for k, (t_arr, p_arr) in enumerate(zip(true, pred, strict=True)):
            steps = np.arange(t_arr.shape[0])
            ax.plot(steps, t_arr[:, j], color=colors[k], lw=1.2)
            ax.plot(steps, p_arr[:, j], color=colors[k], lw=1.2, ls="--")
        label = f"test {j}"
        if test_labels is not None:
            text = " ".join(test_labels[p].split())
            label += ": " + (text if len(text) <= 40 else text[:37] + "...")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=_LEGEND_FONT,
        ncols=n_cols,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_trajectories(
    path: str | os.PathLike,
    true: Sequence[Float[np.ndarray, "steps+1 n_test"]],
    pred: Sequence[Float[np.ndarray, "steps+1 n_test"]],
    run_labels: Sequence[str],
    tests: Sequence[int],
    *,
    test_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """True (solid) vs simulated (dashed) loss trajectories, one panel per test example.

    One legend beside the panels names every run's colour and the line styles. Runs get
    distinct colours (tab10 up to 10 runs, tab20 up to 20, samples of the turbo map beyond).

    Args:
        path: output image (.png, .pdf, .svg).
        true: per run, float [T_r + 1, n_test] observed losses.
        pred: per run, float [T_r + 1, n_test] simulated losses.
        run_labels: one label per run.
        tests: test-example indices to plot.
        test_labels: optional panel titles (e.g. example texts), one per entry of `tests`.
        title: optional figure title.

    Returns:
        The written path.

    Raises:
        ValueError: a plotted loss is NaN or inf (for a simulated one, the simulator diverges
            on that run's curriculum): named by run label, test example and step; nothing is
            written. Also a mismatched number of trajectories and labels, or no tests.
    """
    return _save(_trajectory_figure(true, pred, run_labels, tests, test_labels, title), path)


def plot_parameters(
    path: str | os.PathLike,
    A: Float[np.ndarray, "n_test n_train"],
    B: Float[np.ndarray, "n_test n_train"],
    *,
    variant: str,
) -> Path:
    """Histograms of the fitted A and B over all (test, train) pairs.

    Args:
        path: output image.
        A: float [n_test, n_train] multiplicative influences.
        B: float [n_test, n_train] additive influences.
        variant: simulator variant (for the title; an ablation's fixed factor is shown as is).

    Returns:
        The written path.
    """
    fig, axes = _figure(2, panel_size=(4.2, 3.0))
    for ax, arr, name in ((axes[0], A, "A"), (axes[1], B, "B")):
        vals = np.asarray(arr, np.float64).reshape(-1)
        ax.hist(vals, bins=60, color="C0" if name == "A" else "C1")
        ax.set_title(
            f"{name} ({variant}): mean {vals.mean():.3g}, std {vals.std():.3g}", fontsize=8
        )
        ax.set_xlabel(f"{name}[test, train]", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path)


def top_influences(
    influence: Float[np.ndarray, " n_train"],
    curriculum: Int[np.ndarray, "steps batch"],
    top: int,
    texts: Sequence[str] | None = None,
    ids: Sequence | None = None,
) -> list[dict]:
    """The training examples whose removal changes the simulated final loss the most.

    Args:
        influence: float [n_train], final loss without example i minus with all examples.
        curriculum: int [T, b] the curriculum the influence was computed on.
        top: how many to return.
        texts: optional training texts (examples.json).
        ids: optional dataset ids of the training pool (experiment.json "pool_ids").

    Returns:
        Up to `top` dicts {rank, train_index, removal_change, count, id?, text?}, largest
        |removal_change| first (ties by index); examples absent from the curriculum excluded.
    """
    inf = np.asarray(influence, np.float64)
    present = _present(inf, curriculum)
    order = present[np.lexsort((present, -np.abs(inf[present])))]
    return _rows(inf, curriculum, order[: max(int(top), 0)], texts, ids)


def influence_listing(
    influence: Float[np.ndarray, " n_train"],
    curriculum: Int[np.ndarray, "steps batch"],
    top: int,
    texts: Sequence[str] | None = None,
    ids: Sequence | None = None,
) -> dict[str, list[dict]]:
    """Proponents and opponents of one test example, `top` of each, plus the overall top.

    A proponent is a training example whose removal raises the simulated final loss (it
    helps: removal_change > 0); an opponent one whose removal lowers it (it hurts:
    removal_change < 0). Examples whose removal changes nothing are neither; examples absent
    from the curriculum are left out.

    Args:
        influence: float [n_train], final loss without example i minus with all examples.
        curriculum: int [T, b] the curriculum the influence was computed on.
        top: how many of each to return.
        texts: optional training texts (examples.json).
        ids: optional dataset ids of the training pool (experiment.json "pool_ids").

    Returns:
        {"top": `top_influences` rows (largest |change| first, either sign), "proponents":
        largest change first, "opponents": most negative change first}; each row a dict
        {rank, train_index, removal_change, count, id?, text?}, ranked from 1 within its list.
        Also "n_proponents" and "n_opponents": how many there are in all.
    """
    inf = np.asarray(influence, np.float64)
    present = _present(inf, curriculum)
    pro = present[inf[present] > 0]
    con = present[inf[present] < 0]
    k = max(int(top), 0)
    pro = pro[np.lexsort((pro, -inf[pro]))][:k]
    con = con[np.lexsort((con, inf[con]))][:k]
    return {
        "top": top_influences(inf, curriculum, top, texts, ids),
        "proponents": _rows(inf, curriculum, pro, texts, ids),
        "opponents": _rows(inf, curriculum, con, texts, ids),
        "n_proponents": int((inf[present] > 0).sum()),
        "n_opponents": int((inf[present] < 0).sum()),
    }


def _present(inf: np.ndarray, curriculum) -> np.ndarray:
    """Indices of the training examples that occur in the curriculum."""
    counts = np.bincount(np.asarray(curriculum).reshape(-1), minlength=inf.shape[0])
    return np.flatnonzero(counts > 0)


def _rows(inf, curriculum, order, texts, ids) -> list[dict]:
    counts = np.bincount(np.asarray(curriculum).reshape(-1), minlength=inf.shape[0])
    rows = []
    for rank, i in enumerate(order, start=1):
        row = {
            "rank": rank,
            "train_index": int(i),
            "removal_change": float(inf[i]),
            "count": int(counts[i]),
        }
        if ids is not None:
            row["id"] = ids[i]
        if texts is not None:
            row["text"] = texts[i]
        rows.append(row)
    return rows


def _oneline(x) -> str:
    return " ".join(str(x).split())


def _section(rows: Sequence[dict]) -> list[str]:
    with_ids = any("id" in r for r in rows)
    idw = max([2, *(len(_oneline(r.get("id", ""))) for r in rows)])
    idcol = f"  {'id':<{idw}}" if with_ids else ""
    lines = [f"{'rank':>4}  {'train':>6}{idcol}  {'removal change':>15}  {'count':>5}  text"]
    for r in rows:
        idcell = f"  {_oneline(r.get('id', '')):<{idw}}" if with_ids else ""
        lines.append(
            f"{r['rank']:>4}  {r['train_index']:>6}{idcell}  {r['removal_change']:>15.6g}  "
            f"{r['count']:>5}  {_oneline(r.get('text', ''))}"  # one line a row
        )
    return lines


def format_influences(listing: dict, test_index: int, test_text: str | None = None) -> str:
    """Plain-text listing of `influence_listing`: proponents, then opponents.

    Rows show the pool position ("train"), the dataset id when the listing has ids, the
    removal change, how often the example occurs in the curriculum and its text if given.

    Args:
        listing: the dict `influence_listing` returns.
        test_index: the test example the influences are on.
        test_text: optional text of that test example (whitespace runs become one space).

    Returns:
        A header line, a legend line, then for proponents and for opponents a title line, a
        column header and one line per row ("(none)" when empty), newline-ended.
    """
    head = f"test example {test_index}"
    if test_text is not None:
        head += f": {_oneline(test_text)}"
    lines = [
        head,
        "removal change = simulated final loss without the example minus with it",
    ]
    for key, what in (
        ("proponents", "removal raises the loss: the example helps"),
        ("opponents", "removal lowers the loss: the example hurts"),
    ):
        rows = listing[key]
        total = listing.get(f"n_{key}", len(rows))
        lines.append(f"{key} ({what}): {len(rows)} of {total}")
        lines += _section(rows) if rows else ["  (none)"]
    return "\n".join(lines) + "\n"


def plot_counterfactual(
    path: str | os.PathLike,
    predicted: dict[str, Sequence[float]],
    actual: Sequence[float],
    kinds: Sequence[str],
    title: str | None = None,
) -> Path:
    """Predicted against actual change of the target's final loss, one panel per variant.

    Args:
        path: output image (.png, .pdf or .svg), written atomically.
        predicted: {variant: [P] predicted changes}.
        actual: [P] actual changes (from the trained counterfactual runs).
        kinds: [P] proposal kinds (the colours).
        title: optional figure title.

    Returns:
        The written path.
    """
    from matplotlib import colormaps

    actual = np.asarray(actual, np.float64)
    order = list(dict.fromkeys(kinds))
    colors = dict(zip(order, colormaps["tab10"].colors, strict=False))
    fig, axes = _figure(len(predicted), panel_size=(3.2, 3.0))
    for ax, (variant, pred) in zip(axes, predicted.items(), strict=True):
        pred = np.asarray(pred, np.float64)
        lo = float(min(pred.min(), actual.min()))
        hi = float(max(pred.max(), actual.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=0.8, ls="--")
        ax.axhline(0.0, color="0.85", lw=0.6)
        ax.axvline(0.0, color="0.85", lw=0.6)
        for kind in order:
            m = np.array([k == kind for k in kinds])
            ax.scatter(pred[m], actual[m], s=14, color=colors[kind], label=kind, alpha=0.85)
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("predicted change", fontsize=8)
        ax.set_ylabel("actual change (trained)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(order), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)

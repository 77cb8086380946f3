"""Figures: trajectories, A/B distributions, LDS scatter, metric bars, lambda curves, listings.

Every figure is written at `DPI` (300) in the formats its paths name (`simfluence figures`
writes each as PNG and PDF). The figure builders (`_*_figure`) return the Figure, so tests read
the plotted data back from the artists rather than from pixels.

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
    "plot_lds",
    "plot_metric_bars",
    "plot_lambda_search",
    "describe_examples",
    "example_labels",
    "DPI",
]

DPI = 300  # every written figure (PNG resolution; recorded in the PNG's pHYs chunk)


# Trajectory legend: font size (points) and the height of one legend row in points.
_LEGEND_FONT = 6
_LEGEND_ROW_PT = 1.9 * _LEGEND_FONT


def _figure(n_panels: int, panel_size=(3.6, 2.6), extra_width: float = 0.0, max_cols: int = 4):
    """A constrained-layout figure of up to `max_cols` panels a row, `extra_width` inches wider."""
    from matplotlib.figure import Figure

    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(
        figsize=(panel_size[0] * cols + extra_width, panel_size[1] * rows), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path: str | os.PathLike | Sequence[str | os.PathLike]) -> Path | list[Path]:
    """Writes `fig` atomically to one path, or to each of several (e.g. .png and .pdf), at DPI.

    Every file is rendered before any is written, so a failure leaves none of them.
    """
    paths = [Path(path)] if isinstance(path, str | os.PathLike) else [Path(p) for p in path]
    blobs = []
    for p in paths:
        fmt = p.suffix.lstrip(".").lower() or "png"
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI)
        blobs.append(buf.getvalue())
        # The layout is laid out once (text sizes are in points, the same in every format):
        # later formats keep it instead of running the constrained layout again.
        fig.set_layout_engine("none")
    written = [atomic_write_bytes(p, b) for p, b in zip(paths, blobs, strict=True)]
    return written[0] if isinstance(path, str | os.PathLike) else written


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


# Line styles of the simulated trajectories, one per simulator (the true ones are solid).
_SIM_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 2)))


def _as_variants(pred) -> dict[str, list]:
    """{label: per-run predictions}; a plain list is one simulator labelled "simulated"."""
    if isinstance(pred, dict):
        if not pred:
            raise ValueError("no simulated trajectories given; pass at least one simulator")
        if len(pred) > len(_SIM_STYLES):
            raise ValueError(
                f"{len(pred)} simulators on the same panels; at most {len(_SIM_STYLES)} stay "
                "readable (one line style each): plot them in groups"
            )
        return {str(k): list(v) for k, v in pred.items()}
    return {"simulated": list(pred)}


def _clip(text: str, n: int) -> str:
    """`text` on one line, cut to at most `n` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _trajectory_figure(true, pred, run_labels, tests, test_labels=None, title=None):
    """The Figure of `plot_trajectories` (same arguments, no path)."""
    from matplotlib.lines import Line2D

    sims = _as_variants(pred)
    n_pred = {len(v) for v in sims.values()}
    if n_pred != {len(true)} or len(true) != len(run_labels) or not true:
        raise ValueError(
            f"got {len(true)} true and {sorted(n_pred)} simulated trajectories and "
            f"{len(run_labels)} run labels; pass one of each per run (at least one run)"
        )
    tests = [int(j) for j in tests]
    if not tests:
        raise ValueError("tests is empty; pass at least one test-example index to plot")
    check_finite_losses(true, run_labels, tests, "observed", "repair or drop that run")
    for name, p in sims.items():
        labels = run_labels if len(sims) == 1 else [f"{name}: {lab}" for lab in run_labels]
        check_finite_losses(
            p,
            labels,
            tests,
            "simulated",
            "the simulator diverges on this curriculum (refit it with larger lambdas)",
        )
    colors = _run_colors(len(true))
    styles = dict(zip(sims, _SIM_STYLES, strict=False))
    # One figure-level legend beside the panels: a colour per run, then the line-style key.
    handles = [
        Line2D([], [], color=c, lw=1.2, label=lab)
        for c, lab in zip(colors, run_labels, strict=True)
    ]
    handles.append(Line2D([], [], color="0.3", lw=1.2, ls="-", label="true"))
    handles += [Line2D([], [], color="0.3", lw=1.2, ls=styles[n], label=n) for n in sims]
    panel_h = 2.6 if test_labels is None else 2.9  # room for a two-line panel title
    rows = math.ceil(len(tests) / min(len(tests), 4))
    per_col = max(4, int(panel_h * rows * 72 / _LEGEND_ROW_PT) - 2)  # rows that fit the height
    n_cols = math.ceil(len(handles) / per_col)
    longest = max(len(h.get_label()) for h in handles)
    # handle (2 em) + pad (0.8 em) + text (~0.6 em a character) + column gap (2 em), in inches
    col_width = (4.8 + 0.6 * longest) * _LEGEND_FONT / 72
    fig, axes = _figure(len(tests), panel_size=(3.6, panel_h), extra_width=n_cols * col_width)
    for p, (ax, j) in enumerate(zip(axes, tests, strict=True)):
        for k, t_arr in enumerate(true):
            steps = np.arange(t_arr.shape[0])
            ax.plot(steps, t_arr[:, j], color=colors[k], lw=1.2)
            for name, runs in sims.items():
                ax.plot(steps, runs[k][:, j], color=colors[k], lw=1.2, ls=styles[name])
        label = f"test {j}"
        if test_labels is not None:
            first, _, rest = str(test_labels[p]).partition("\n")
            text = " ".join(first.split())
            label += ": " + (text if len(text) <= 40 else text[:37] + "...")
            if rest.strip():
                label += "\n" + _clip(rest, 40)
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
    path: str | os.PathLike | Sequence[str | os.PathLike],
    true: Sequence[Float[np.ndarray, "steps+1 n_test"]],
    pred: Sequence[Float[np.ndarray, "steps+1 n_test"]]
    | dict[str, Sequence[Float[np.ndarray, "steps+1 n_test"]]],
    run_labels: Sequence[str],
    tests: Sequence[int],
    *,
    test_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path | list[Path]:
    """True (solid) vs simulated loss trajectories, one panel per test example.

    One legend beside the panels names every run's colour and the line styles: dashed for one
    simulator, or one style per simulator (named in the legend) when `pred` is a dict. Runs
    get distinct colours (tab10 up to 10 runs, tab20 up to 20, samples of the turbo map beyond).

    Args:
        path: output image (.png, .pdf, .svg), or several (the same figure in each format).
        true: per run, float [T_r + 1, n_test] observed losses.
        pred: per run, float [T_r + 1, n_test] simulated losses; or {simulator label: per
            run predictions} to draw several simulators on the same panels (at most 6).
        run_labels: one label per run.
        tests: test-example indices to plot.
        test_labels: optional panel titles (e.g. example texts), one per entry of `tests`;
            a second line (after a newline) is shown as is (e.g. the gold answer).
        title: optional figure title.

    Returns:
        The written path (a list when `path` is a list).

    Raises:
        ValueError: a plotted loss is NaN or inf (for a simulated one, the simulator diverges
            on that run's curriculum): named by run label, test example and step; nothing is
            written. Also a mismatched number of trajectories and labels, or no tests.
    """
    return _save(_trajectory_figure(true, pred, run_labels, tests, test_labels, title), path)


def describe_examples(texts: Sequence[str]) -> tuple[list[str], list[str | None], str]:
    """Example texts without their shared prompt template, and their gold answers.

    `finetune` writes each example as ``"{input} => {target}"`` (examples.json). The shared
    template is the longest prefix common to all inputs, cut back to a line (or else a word)
    boundary so no word is split; the gold answer is the text after the last " => ".

    Args:
        texts: the examples' texts (e.g. examples.json "train" + "test").

    Returns:
        (stripped inputs, gold answers (None where a text has no " => "), the template).
    """
    inputs, golds = [], []
    for t in texts:
        head, sep, gold = str(t).rpartition(" => ")
        inputs.append(head if sep else str(t))
        golds.append(gold.strip() if sep else None)
    prefix = os.path.commonprefix(inputs) if len(inputs) > 1 else ""
    cut = prefix.rfind("\n") + 1 if "\n" in prefix else prefix.rfind(" ") + 1
    template = prefix[:cut]
    return [x[len(template) :].strip() for x in inputs], golds, template


def example_labels(golds: Sequence[str | None] | None) -> list[str] | None:
    """The training examples' labels when they have 2..8 distinct gold answers, else None."""
    if golds is None or any(g is None for g in golds):
        return None
    return list(golds) if 2 <= len(set(golds)) <= 8 else None


def _parameters_figure(A, B, variant, a_prior=None, labels=None):
    """The Figure of `plot_parameters` (same arguments, no path)."""
    from matplotlib import colormaps

    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    groups = [("all", np.ones(A.shape[1], bool))]
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != A.shape[1]:
            raise ValueError(
                f"{len(labels)} labels for {A.shape[1]} training examples; pass one per example"
            )
        groups = [(v, np.array([x == v for x in labels])) for v in sorted(set(labels))]
    colors = colormaps["tab10"].colors
    fig, axes = _figure(2, panel_size=(4.2, 3.0))
    for ax, arr, name in ((axes[0], A, "A"), (axes[1], B, "B")):
        vals = arr.reshape(-1)
        edges = np.histogram_bin_edges(vals, bins=60)
        for g, (lab, cols) in enumerate(groups):
            counts, _ = np.histogram(arr[:, cols].reshape(-1), bins=edges)
            text = f"label {lab} ({int(cols.sum())} examples)" if labels is not None else "all"
            ax.stairs(counts, edges, fill=labels is None, color=colors[g % 10], label=text)
        prior = a_prior if name == "A" else (0.0 if variant not in _B_PRIOR_PER_PAIR else None)
        if prior is not None:
            ax.axvline(
                prior, color="k", lw=1.0, ls="--", label=f"prior {name.lower()}0 = {prior:.3g}"
            )
        ax.set_title(
            f"{name} ({variant}): mean {vals.mean():.3g}, std {vals.std():.3g}", fontsize=8
        )
        ax.set_xlabel(f"{name}[test, train]", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, frameon=False)
    return fig


# Variants whose B is shrunk towards a prior of its own per pair (no single b0 to mark).
_B_PRIOR_PER_PAIR = ("linear-lr-tracin-prior",)


def plot_parameters(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    A: Float[np.ndarray, "n_test n_train"],
    B: Float[np.ndarray, "n_test n_train"],
    *,
    variant: str,
    a_prior: float | None = None,
    labels: Sequence[str] | None = None,
) -> Path | list[Path]:
    """Histograms of the fitted A and B over all (test, train) pairs.

    Args:
        path: output image, or several (the same figure in each format).
        A: float [n_test, n_train] multiplicative influences.
        B: float [n_test, n_train] additive influences.
        variant: simulator variant (for the title; an ablation's fixed factor is shown as is).
        a_prior: the value A is shrunk towards (a0), marked by a dashed line; B's prior 0 is
            marked likewise (except for linear-lr-tracin-prior, whose prior is per pair).
        labels: optional label of every training example (n_train, e.g. the gold answers):
            one outlined histogram per label over the same bins instead of one filled one.

    Returns:
        The written path (a list when `path` is a list).

    Raises:
        ValueError: `labels` is not one per training example.
    """
    return _save(_parameters_figure(A, B, variant, a_prior, labels), path)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based average ranks (ties share their mean rank, as scipy's "average")."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two 1-d arrays; NaN when either is constant."""
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def _lds_figure(actual, predicted, tests, test_labels=None, title=None):
    """The Figure of `plot_lds` (same arguments, no path)."""
    from matplotlib import colormaps

    actual = np.asarray(actual, np.float64)
    tests = [int(j) for j in tests]
    if actual.ndim != 2 or actual.shape[0] < 2:
        raise ValueError(
            f"actual final losses have shape {actual.shape}; need [held-out runs >= 2, n_test]"
        )
    preds = {k: np.asarray(v, np.float64) for k, v in predicted.items()}
    for k, v in preds.items():
        if v.shape != actual.shape:
            raise ValueError(f"{k}: predicted final losses {v.shape} but actual {actual.shape}")
    colors = dict(zip(preds, colormaps["tab10"].colors, strict=False))
    fig, axes = _figure(len(tests), panel_size=(3.2, 3.0 if test_labels is None else 3.3))
    for p, (ax, j) in enumerate(zip(axes, tests, strict=True)):
        x = actual[:, j]
        rhos = []
        for k, v in preds.items():
            ax.scatter(x, v[:, j], s=14, color=colors[k], label=k, alpha=0.85)
            rho = _spearman(v[:, j], x)
            rhos.append(f"{k} {rho:.2f}" if np.isfinite(rho) else f"{k} n/a")
        lo = float(min(x.min(), *(v[:, j].min() for v in preds.values())))
        hi = float(max(x.max(), *(v[:, j].max() for v in preds.values())))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=0.8, ls="--")
        label = f"test {j}"
        if test_labels is not None:
            first, _, rest = str(test_labels[p]).partition("\n")
            text = " ".join(first.split())
            label += ": " + (text if len(text) <= 34 else text[:31] + "...")
            if rest.strip():
                label += "\n" + _clip(rest, 40)
        # Two simulators per line, so three or more stay inside the panel.
        rho_lines = [", ".join(rhos[i : i + 2]) for i in range(0, len(rhos), 2)]
        ax.set_title(label + "\nrho: " + "\n".join(rho_lines), fontsize=7)
        ax.set_xlabel("actual final loss", fontsize=8)
        ax.set_ylabel("predicted final loss", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 5), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_lds(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    actual: Float[np.ndarray, "runs n_test"],
    predicted: dict[str, Float[np.ndarray, "runs n_test"]],
    tests: Sequence[int],
    *,
    test_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path | list[Path]:
    """Predicted against actual final loss across held-out runs, one panel per test example.

    The picture behind the LDS (across-run Spearman): each point is one held-out run; a
    simulator that captures the curriculum puts them on a rising line. Each panel's title gives
    every simulator's Spearman rho across the runs for that test example.

    Args:
        path: output image, or several (the same figure in each format).
        actual: float [R, n_test] observed final losses of R >= 2 held-out runs.
        predicted: {simulator label: float [R, n_test] simulated final losses}.
        tests: test examples to draw.
        test_labels: optional panel titles, one per entry of `tests` (as `plot_trajectories`).
        title: optional figure title.

    Returns:
        The written path (a list when `path` is a list).

    Raises:
        ValueError: fewer than 2 runs, or shapes that disagree.
    """
    return _save(_lds_figure(actual, predicted, tests, test_labels, title), path)


# results.json metrics drawn as bars: (key, axis label); files written before the "lds" key
# hold the same value under its alias "across_run_spearman".
_BAR_METRICS = (
    ("all_steps_mse", "all-steps MSE"),
    ("final_step_spearman", "final-step Spearman"),
    ("final_step_mse", "final-step MSE"),
    ("lds", "LDS (across-run Spearman)"),
)


def _metric_bars_figure(results: dict, title=None):
    """The Figure of `plot_metric_bars` (same arguments, no path)."""
    variants = results.get("variants") if isinstance(results, dict) else None
    if not isinstance(variants, dict) or not variants:
        raise ValueError("results have no 'variants'; pass the JSON of `simfluence evaluate`")
    names = list(variants)
    fig, axes = _figure(len(_BAR_METRICS), panel_size=(0.3 * len(names) + 1.6, 3.0), max_cols=2)
    for ax, (key, label) in zip(axes, _BAR_METRICS, strict=True):
        means, errs = [], []
        for n in names:
            entry = variants[n]
            m = entry.get(key) or (entry.get("across_run_spearman") if key == "lds" else {}) or {}
            means.append(np.nan if m.get("mean") is None else float(m["mean"]))
            errs.append(np.nan if m.get("stderr") is None else float(m["stderr"]))
        x = np.arange(len(names))
        ok = np.isfinite(means)
        ax.bar(x[ok], np.asarray(means)[ok], yerr=np.asarray(errs)[ok], color="C0", capsize=2)
        for i in np.flatnonzero(~ok):
            ax.text(x[i], 0.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=6)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.axhline(0.0, color="0.6", lw=0.6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_metric_bars(
    path: str | os.PathLike | Sequence[str | os.PathLike], results: dict, *, title=None
) -> Path | list[Path]:
    """Per-variant bars of the held-out metrics with their standard errors as error bars.

    One panel per metric (all-steps MSE, final-step Spearman, final-step MSE, LDS), one bar per
    variant of `results` (the JSON of `simfluence evaluate`): height = "mean", error bar =
    "stderr" (over held-out runs; a jackknife for the LDS). An undefined metric gets no bar
    and an "n/a" mark.

    Args:
        path: output image, or several (the same figure in each format).
        results: the dict `evaluation.evaluate` returns (results.json).
        title: optional figure title.

    Returns:
        The written path (a list when `path` is a list).

    Raises:
        ValueError: `results` has no variants.
    """
    return _save(_metric_bars_figure(results, title), path)


def lambda_axes(table: Sequence[dict]) -> tuple[str, str | None]:
    """(x axis, grouping axis or None) of a lambda search table: the searched lambdas.

    Args:
        table: rows {"l2_a", "l2_b", "valid_mse", ...} of `simulators.select_lambdas`.

    Returns:
        ("l2_b", "l2_a") for a two-axis search, ("l2_b", None) or ("l2_a", None) when one
        lambda takes a single value (an ablation's unused one).
    """
    many = [k for k in ("l2_b", "l2_a") if len({row[k] for row in table}) > 1]
    if len(many) == 2:
        return "l2_b", "l2_a"
    return (many[0] if many else "l2_b"), None


def _lambda_figure(searches: dict, title=None):
    """The Figure of `plot_lambda_search` (same arguments, no path)."""
    from matplotlib import colormaps

    if not searches:
        raise ValueError("no lambda search to draw")
    fig, axes = _figure(len(searches), panel_size=(3.6, 3.0))
    for ax, (name, (table, chosen)) in zip(axes, searches.items(), strict=True):
        x_key, group_key = lambda_axes(table)
        groups = sorted({row[group_key] for row in table}) if group_key else [None]
        cmap = colormaps["viridis"]
        for g, value in enumerate(groups):
            rows = [r for r in table if group_key is None or r[group_key] == value]
            rows = sorted(
                (r for r in rows if math.isfinite(r["valid_mse"])), key=lambda r: r[x_key]
            )
            color = cmap(g / max(len(groups) - 1, 1)) if group_key else "C0"
            label = f"{group_key}={value:g}" if group_key else None
            ax.plot(
                [r[x_key] for r in rows],
                [r["valid_mse"] for r in rows],
                marker="o",
                ms=2.5,
                lw=1.0,
                color=color,
                label=label,
            )
        best = [
            r
            for r in table
            if (r["l2_a"], r["l2_b"]) == (chosen["l2_a"], chosen["l2_b"])
            or (group_key is None and r[x_key] == chosen[x_key])
        ]
        if best:
            ax.plot(
                best[0][x_key],
                best[0]["valid_mse"],
                marker="*",
                ms=10,
                color="C3",
                ls="none",
                label=f"chosen {x_key}={chosen[x_key]:g}"
                + (f", {group_key}={chosen[group_key]:g}" if group_key else ""),
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(x_key, fontsize=8)
        ax.set_ylabel("validation all-steps MSE", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5, frameon=False, ncols=2 if len(groups) > 8 else 1)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_lambda_search(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    searches: dict[str, tuple[Sequence[dict], dict]],
    *,
    title: str | None = None,
) -> Path | list[Path]:
    """The lambda validation curve: validation MSE against the searched lambda, per simulator.

    For a two-lambda search (linear and its -lr variants) one line per l2_a over l2_b; for an
    ablation one line over its lambda. The chosen point is starred.

    Args:
        path: output image, or several (the same figure in each format).
        searches: {simulator label: (table, chosen)}: the table of
            `simulators.select_lambdas` (results.json "lambda_search", or the simulator
            file's origin) and {"l2_a", "l2_b"} chosen.
        title: optional figure title.

    Returns:
        The written path (a list when `path` is a list).

    Raises:
        ValueError: no search given.
    """
    return _save(_lambda_figure(searches, title), path)


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

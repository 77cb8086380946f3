"""Figures: true vs simulated loss trajectories, fitted A/B distributions, influence listings.

matplotlib is used through `matplotlib.figure.Figure` with the Agg renderer (no pyplot, no
global backend state, no display needed). Every file is written atomically.

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

from simfluence.runlog import atomic_write_bytes

__all__ = ["plot_trajectories", "plot_parameters", "top_influences", "format_influences"]


def _figure(n_panels: int, panel_size=(3.6, 2.6)):
    from matplotlib.figure import Figure

    cols = min(n_panels, 4)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
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


def plot_trajectories(
    path: str | os.PathLike,
    true: Sequence[np.ndarray],
    pred: Sequence[np.ndarray],
    run_labels: Sequence[str],
    tests: Sequence[int],
    *,
    test_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """True (solid) vs simulated (dashed) loss trajectories, one panel per test example.

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
    """
    fig, axes = _figure(len(tests))
    colors = [f"C{k % 10}" for k in range(len(true))]
    for p, (ax, j) in enumerate(zip(axes, tests, strict=True)):
        for k, (t_arr, p_arr) in enumerate(zip(true, pred, strict=True)):
            steps = np.arange(t_arr.shape[0])
            ax.plot(steps, t_arr[:, j], color=colors[k], lw=1.2, label=f"{run_labels[k]} true")
            ax.plot(
                steps, p_arr[:, j], color=colors[k], lw=1.2, ls="--", label=f"{run_labels[k]} sim"
            )
        label = f"test {j}"
        if test_labels is not None:
            text = test_labels[p]
            label += ": " + (text if len(text) <= 40 else text[:37] + "...")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_parameters(path: str | os.PathLike, A: np.ndarray, B: np.ndarray, *, variant: str) -> Path:
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
    influence: np.ndarray, curriculum: np.ndarray, top: int, texts: Sequence[str] | None = None
) -> list[dict]:
    """The training examples whose removal changes the simulated final loss the most.

    Args:
        influence: float [n_train], final loss without example i minus with all examples.
        curriculum: int [T, b] the curriculum the influence was computed on.
        top: how many to return.
        texts: optional training texts (examples.json).

    Returns:
        Up to `top` dicts {rank, train_index, removal_change, count, text?}, largest
        |removal_change| first (ties by index); examples absent from the curriculum excluded.
    """
    inf = np.asarray(influence, np.float64)
    counts = np.bincount(np.asarray(curriculum).reshape(-1), minlength=inf.shape[0])
    present = np.flatnonzero(counts > 0)
    order = present[np.lexsort((present, -np.abs(inf[present])))][: max(int(top), 0)]
    rows = []
    for rank, i in enumerate(order, start=1):
        row = {
            "rank": rank,
            "train_index": int(i),
            "removal_change": float(inf[i]),
            "count": int(counts[i]),
        }
        if texts is not None:
            row["text"] = texts[i]
        rows.append(row)
    return rows


def format_influences(rows: Sequence[dict], test_index: int, test_text: str | None = None) -> str:
    """Plain-text listing of `top_influences` rows (removing a helpful example raises the loss)."""
    head = f"test example {test_index}"
    if test_text is not None:
        head += f": {' '.join(test_text.split())}"
    lines = [
        head,
        "removal change = simulated final loss without the example minus with it "
        "(> 0: the example helps, < 0: it hurts)",
        f"{'rank':>4}  {'train':>6}  {'removal change':>15}  {'count':>5}  text",
    ]
    for r in rows:
        lines.append(
            f"{r['rank']:>4}  {r['train_index']:>6}  {r['removal_change']:>15.6g}  "
            f"{r['count']:>5}  {' '.join(str(r.get('text', '')).split())}"  # one line a row
        )
    return "\n".join(lines) + "\n"

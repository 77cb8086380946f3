"""Results tables: one experiment (printed by `simfluence evaluate`) or many (`simfluence table`).

The multi-experiment table follows the paper's layout (rows = variants, columns = experiments,
cells = all-steps MSE +- stderr and final-step rho +- stderr), followed by a second table with
the honest metrics (across-run Spearman, skill vs the mean trajectory, final-step MSE). Values
that are undefined show a dash with a numbered footnote giving the reason, never a NaN.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from simfluence.runlog import RunLogError, atomic_write_json, atomic_write_text

__all__ = [
    "VARIANT_ORDER",
    "load_results",
    "format_results",
    "table_json",
    "format_table",
    "write_table",
]

VARIANT_ORDER = (
    "linear",
    "additive",
    "multiplicative",
    "tracin-cp",
    "tracin-cp-rescaled",
    "constant",
    "mean-trajectory",
)
DASH = "—"


class _Notes:
    """Numbered footnotes, one per distinct reason."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def ref(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"[{self.reasons.index(reason) + 1}]"

    def mark(self, reason: str) -> str:
        return f"{DASH} {self.ref(reason)}"

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {r}" for i, r in enumerate(self.reasons)]


def _num(x: float | None, kind: str) -> str:
    if kind == "rho":
        return f"{x:.3f}"
    if kind == "skill":
        return f"{x:+.3f}"
    return f"{x:.3g}"


def _pm(stat: dict | None, kind: str, notes: _Notes, what: str) -> str:
    if stat is None:
        return notes.mark(f"{what}: not computed for this variant")
    if stat.get("mean") is None:
        reason = stat.get("undefined_reason") or "undefined"
        return notes.mark(f"{what} undefined: {reason}")
    text = _num(stat["mean"], kind)
    if stat.get("stderr") is not None:
        text += f" ± {_num(stat['stderr'], kind if kind != 'skill' else 'rho')}"
    return text


def _skill(entry: dict, notes: _Notes) -> str:
    s = entry.get("skill_vs_mean_trajectory")
    if s is None:
        mse = entry.get("all_steps_mse") or {}
        if mse.get("mean") is None:
            reason = mse.get("undefined_reason") or "the all-steps MSE is undefined"
            return notes.mark(f"skill undefined: {reason}")
        return notes.mark("skill undefined: the mean-trajectory baseline has zero all-steps MSE")
    return _num(s, "skill")


def _lam(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0e}"


def _lam_cell(entry: dict, key: str, notes: _Notes) -> str:
    """The lambda, with a footnote when it is the largest or smallest value searched."""
    text = _lam(entry.get(key))
    side = (entry.get("lambda_edges") or {}).get(key)
    if side is None:
        return text
    symbol = "λ_A" if key == "l2_a" else "λ_B"
    if entry.get("lambda_grid") == "default":
        where = f"at the {side} cap of the extended default lambda search"
    else:
        where = f"at the {side} edge of the given lambda grid"
    reason = (
        f"{symbol} {where}: the validation MSE may improve beyond it, so the choice is "
        "limited by the searched range"
    )
    return f"{text} {notes.ref(reason)}"


def _ordered(names) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in names]
    return known + sorted(v for v in names if v not in VARIANT_ORDER)


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def format_results(results: dict) -> str:
    """Markdown table of one experiment's `evaluate` results, with footnotes for dashes.

    Columns: variant, all-steps MSE +- se, final-step rho +- se, final-step MSE +- se,
    across-run rho +- se, skill vs mean trajectory, lambda_A, lambda_B (with a footnote when
    a lambda is at the edge of the searched range, see `evaluate`).
    """
    notes = _Notes()
    rows = []
    variants = results["variants"]
    for name in _ordered(variants):
        e = variants[name]
        rows.append(
            [
                name,
                _pm(e.get("all_steps_mse"), "mse", notes, "all-steps MSE"),
                _pm(e.get("final_step_spearman"), "rho", notes, "final-step ρ"),
                _pm(e.get("final_step_mse"), "mse", notes, "final-step MSE"),
                _pm(e.get("across_run_spearman"), "rho", notes, "across-run ρ"),
                _skill(e, notes),
                _lam_cell(e, "l2_a", notes),
                _lam_cell(e, "l2_b", notes),
            ]
        )
    header = [
        "variant",
        "all-steps MSE",
        "final-step ρ",
        "final-step MSE",
        "across-run ρ",
        "skill",
        "λ_A",
        "λ_B",
    ]
    split = results.get("split", {})
    exp = results.get("experiment", {})
    lines = [
        f"experiment {exp.get('name', '?')}: fit runs {len(split.get('fit', []))}, "
        f"validation runs {len(split.get('valid', []))}, held-out runs "
        f"{len(split.get('test', []))}; mean ± stderr (per-run metrics over held-out runs, "
        "across-run ρ over test examples); skill = 1 - MSE / MSE(mean-trajectory)",
        "",
    ]
    lines += _md(header, rows)
    if notes.reasons:
        lines += [""] + notes.lines()
    return "\n".join(lines) + "\n"


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Read `evaluate` results from JSON files or experiment folders holding results.json.

    Raises:
        RunLogError: a path is neither, or the JSON is not an evaluate result.
    """
    if not paths:
        raise RunLogError("no results given; pass results.json files or experiment folders")
    out = []
    for p in paths:
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            hint = (
                f"{p} holds no results.json; run `simfluence evaluate {p} --out {f}` first"
                if p.is_dir()
                else f"{p}: results file not found"
            )
            raise RunLogError(hint)
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunLogError(f"{f}: cannot read results JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
            raise RunLogError(f"{f}: not a `simfluence evaluate` result (no 'variants' object)")
        data.setdefault("experiment", {})
        data["experiment"].setdefault("name", f.parent.name)
        data["_source"] = str(f)
        out.append(data)
    return out


def _labels(results: Sequence[dict]) -> list[str]:
    names = [r["experiment"].get("name") or "?" for r in results]
    labels = []
    for i, n in enumerate(names):
        labels.append(n if names.count(n) == 1 else f"{n} ({i + 1})")
    return labels


def table_json(results: Sequence[dict]) -> dict:
    """Machine-readable table: `{"experiments": [...], "variants": [...], "cells": {variant:
    {experiment: {metric: {...}}}}}` (None where a variant was not run on an experiment)."""
    labels = _labels(results)
    variants = _ordered({v for r in results for v in r["variants"]})
    keys = (
        "all_steps_mse",
        "final_step_spearman",
        "final_step_mse",
        "across_run_spearman",
        "skill_vs_mean_trajectory",
    )
    cells: dict[str, dict] = {}
    for v in variants:
        cells[v] = {}
        for lab, r in zip(labels, results, strict=True):
            e = r["variants"].get(v)
            cells[v][lab] = None if e is None else {k: e.get(k) for k in keys}
    sources = {lab: r.get("_source") for lab, r in zip(labels, results, strict=True)}
    return {"experiments": labels, "variants": variants, "sources": sources, "cells": cells}


def format_table(results: Sequence[dict]) -> str:
    """Markdown: the paper-style table, then the honest-metrics table, then footnotes."""
    labels = _labels(results)
    variants = _ordered({v for r in results for v in r["variants"]})
    notes = _Notes()
    rows1, rows2 = [], []
    for v in variants:
        row1, row2 = [v], [v]
        for r in results:
            e = r["variants"].get(v)
            if e is None:
                row1.append(notes.mark("variant not evaluated on this experiment"))
                row2.append(notes.mark("variant not evaluated on this experiment"))
                continue
            row1.append(
                _pm(e.get("all_steps_mse"), "mse", notes, "all-steps MSE")
                + " / "
                + _pm(e.get("final_step_spearman"), "rho", notes, "final-step ρ")
            )
            row2.append(
                _pm(e.get("across_run_spearman"), "rho", notes, "across-run ρ")
                + " / "
                + _skill(e, notes)
                + " / "
                + _pm(e.get("final_step_mse"), "mse", notes, "final-step MSE")
            )
        rows1.append(row1)
        rows2.append(row2)
    lines = [
        "All-steps MSE ± stderr / final-step Spearman ρ ± stderr (over held-out runs)",
        "",
        *_md(["variant", *labels], rows1),
        "",
        "Across-run Spearman ρ ± stderr (over test examples) / skill = 1 - MSE/MSE(mean "
        "trajectory) / final-step MSE ± stderr",
        "",
        *_md(["variant", *labels], rows2),
    ]
    if notes.reasons:
        lines += [""] + notes.lines()
    return "\n".join(lines) + "\n"


def write_table(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the markdown table to `out` (.md) and its JSON beside it (same stem, .json).

    Returns:
        (markdown path, JSON path).

    Raises:
        RunLogError: unreadable results, or `out` not ending in .md.
    """
    out = Path(out)
    if out.suffix != ".md":
        raise RunLogError(f"--out {out}: expected a .md path (the JSON goes beside it)")
    results = load_results(paths)
    md = format_table(results)
    data = table_json(results)
    json_path = out.with_suffix(".json")
    atomic_write_json(json_path, data)
    atomic_write_text(out, md)
    return out, json_path

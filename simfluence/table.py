"""Results tables: one experiment (printed by `simfluence evaluate`) or many (`simfluence table`).

`simfluence table` writes, by default, one table per experiment (the csv: one experiment
column instead), rows = variants, one column per metric and one per standard error: all-steps
MSE (lower is better), final-step rho (higher), final-step MSE (lower), LDS = across-run rho
(higher; jackknife stderr over held-out runs), skill vs the mean trajectory (higher, no
stderr). The best value of each metric column within an experiment is marked: bold in
markdown, `\\textbf` in LaTeX, and in csv a separate "<metric> best" column of true/false (so
the number cells stay plain numbers that parse back to the results.json values). Ties are all
marked; undefined values are never best.

The paper layout (`layout="paper"`, markdown only) has rows = variants, columns =
experiments, cells = all-steps MSE +- stderr and final-step rho +- stderr, followed by a second
table with the honest metrics (across-run Spearman, skill vs the mean trajectory, final-step
MSE).

Values that are undefined show a dash with a numbered footnote giving the reason, never a NaN;
values averaged over only part of what they could cover (final-step rho undefined on some runs,
test examples left out of the across-run rho or counted as rho = 0) carry a footnote saying how
many of how many (in csv: an empty cell, the reasons in the row's "notes" column). Experiments that
share a name are told apart by their folder.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simfluence.runlog import RunLogError, atomic_write_json, atomic_write_text

__all__ = [
    "VARIANT_ORDER",
    "load_results",
    "format_results",
    "table_json",
    "format_table",
    "METRICS",
    "metrics_table",
    "format_metrics_md",
    "format_metrics_csv",
    "format_metrics_tex",
    "write_table",
]

VARIANT_ORDER = (
    "linear",
    "additive",
    "multiplicative",
    "linear-lr",
    "additive-lr",
    "linear-lr-tracin-prior",
    "linear-momentum",
    "linear-lr-momentum",
    "tracin-cp",
    "tracin-cp-rescaled",
    "tracin-cp-momentum",
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
        # A diverging simulator can score -1e40; fixed point would print 40 digits.
        return f"{x:+.3f}" if abs(x) < 1e3 else f"{x:+.3g}"
    return f"{x:.3g}"


def _pm(stat: dict | None, kind: str, notes: _Notes, what: str, n_runs: int | None = None) -> str:
    if stat is None:
        return notes.mark(f"{what}: not computed for this variant")
    if stat.get("mean") is None:
        reason = stat.get("undefined_reason") or "undefined"
        return notes.mark(f"{what} undefined: {reason}") + _partial(stat, what, notes, n_runs)
    text = _num(stat["mean"], kind)
    if stat.get("stderr") is not None:
        text += f" ± {_num(stat['stderr'], kind if kind != 'skill' else 'rho')}"
    elif stat.get("stderr_undefined_reason"):
        text += " " + notes.ref(
            f"{what} standard error undefined: {stat['stderr_undefined_reason']}"
        )
    return text + _partial(stat, what, notes, n_runs)


def _partial(stat: dict, what: str, notes: _Notes, n_runs: int | None) -> str:
    """Footnotes for a value that covers only part of the runs or test examples."""
    refs = []
    defined = stat.get("mean") is not None
    n_undefined = stat.get("n_undefined") or 0
    if defined and n_undefined > 0:
        total = stat.get("n_runs") or n_runs
        of = f"{total - n_undefined} of {total}" if total else f"all but {n_undefined}"
        reason = stat.get("undefined_reason") or "undefined there"
        refs.append(
            f"{what} averaged over the {of} held-out runs where it is defined "
            f"({n_undefined} undefined: {reason})"
        )
    n_used = stat.get("n_used") or 0
    n_excluded = stat.get("n_excluded") or 0
    if n_excluded > 0 and n_used > 0:
        refs.append(
            f"{what}: {n_excluded} of {n_used + n_excluded} test examples left out (their true "
            "final losses do not vary across the held-out runs)"
        )
    n_const = stat.get("n_constant_prediction") or 0
    if defined and n_const > 0:
        refs.append(
            f"{what}: for {n_const} of the {n_used} test examples averaged, the simulated final "
            "losses do not vary across the held-out runs; they count as ρ = 0"
        )
    return "".join(f" {notes.ref(r)}" for r in refs)


def _skill_value(entry: dict) -> tuple[float | None, str | None]:
    """(skill, None) or (None, the footnote saying why it is undefined)."""
    if "skill_vs_mean_trajectory" not in entry:
        return None, (
            "skill: no skill_vs_mean_trajectory in this results file (it predates the skill "
            "score); run `simfluence evaluate` again"
        )
    s = entry["skill_vs_mean_trajectory"]
    if s is not None:
        return s, None
    if entry.get("skill_undefined_reason"):
        return None, f"skill undefined: {entry['skill_undefined_reason']}"
    mse = entry.get("all_steps_mse") or {}
    if mse.get("mean") is None:
        reason = mse.get("undefined_reason") or "the all-steps MSE is undefined"
        return None, f"skill undefined: {reason}"
    return None, "skill undefined: the mean-trajectory baseline has zero all-steps MSE"


def _skill(entry: dict, notes: _Notes) -> str:
    value, reason = _skill_value(entry)
    return notes.mark(reason) if value is None else _num(value, "skill")


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


def _n_test_runs(results: dict) -> int | None:
    test = (results.get("split") or {}).get("test")
    return len(test) if isinstance(test, list) else None


def machine_line(results: dict) -> str:
    """Which machine made a table: that of the evaluation, and that which prepared the runs.

    Args:
        results: an `evaluate` result (its ``provenance``, and the experiment.json it records
            under ``experiment.info``, whose ``provenance`` says where ``finetune run`` began).

    Returns:
        One line, e.g. ``"machine: evaluated on cpu x1 (AMD EPYC, 2 cores, x86_64), jax
        0.10.2, commit 1a2b3c4d; runs prepared on the same"``; ``"machine: not recorded
        (...)"`` for results written before provenance was recorded.
    """
    from simfluence.runlog import describe_machine

    if not isinstance(results.get("provenance"), dict):
        return "machine: not recorded (results of an older version)"
    evaluated = describe_machine(results.get("provenance"))
    exp = results.get("experiment") if isinstance(results.get("experiment"), dict) else {}
    info = exp.get("info") if isinstance(exp.get("info"), dict) else {}
    if "provenance" not in info:  # a synthetic or pre-provenance experiment: nothing to say
        return f"machine: evaluated on {evaluated}"
    runs = describe_machine(info.get("provenance"))
    same = runs.split(", commit")[0] == evaluated.split(", commit")[0]
    return f"machine: evaluated on {evaluated}; runs prepared on {'the same' if same else runs}"


def format_results(results: dict) -> str:
    """Markdown table of one experiment's `evaluate` results, with footnotes for dashes.

    Columns: variant, all-steps MSE +- se, final-step rho +- se, final-step MSE +- se,
    across-run rho +- se (jackknife over held-out runs), skill vs mean trajectory, lambda_A,
    lambda_B (with a footnote when a lambda is at the edge of the searched range, see
    `evaluate`). Undefined values are a dash with a numbered footnote; partly defined ones
    (see the module docstring) carry a footnote saying how many of how many.

    Args:
        results: the dict `simfluence.evaluate` returns (or its JSON, read back).

    Returns:
        The markdown text: a caption line, the table, then the footnotes.
    """
    notes = _Notes()
    rows = []
    variants = results["variants"]
    n_runs = _n_test_runs(results)
    for name in _ordered(variants):
        e = variants[name]
        rows.append(
            [
                name,
                _pm(e.get("all_steps_mse"), "mse", notes, "all-steps MSE"),
                _pm(e.get("final_step_spearman"), "rho", notes, "final-step ρ", n_runs),
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
        "LDS (across-run ρ)",
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
        "LDS = across-run ρ, its stderr by a jackknife over held-out runs); "
        "skill = 1 - MSE / MSE(mean-trajectory)",
        machine_line(results),
        "",
    ]
    lines += _md(header, rows)
    if notes.reasons:
        lines += [""] + notes.lines()
    return "\n".join(lines) + "\n"


_STATS = ("all_steps_mse", "final_step_spearman", "final_step_mse", "across_run_spearman")
_NUMBERS = ("mean", "stderr")
_COUNTS = ("n_runs", "n_undefined", "n_used", "n_excluded", "n_constant_prediction")
_TEXTS = ("undefined_reason", "stderr_undefined_reason", "stderr_method")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(f: Path, name: str, entry: Any) -> None:
    """One-line RunLogError naming the file and the key when a variant entry is malformed."""
    where = f"variants.{name}"

    def bad(key: str, want: str, got: Any) -> RunLogError:
        return RunLogError(
            f"{f}: {key} must be {want}, got {got!r:.60}; this is not a `simfluence evaluate` "
            "result as written: run evaluate again"
        )

    if not isinstance(entry, dict):
        raise bad(where, "an object of metrics", entry)
    for stat in _STATS:
        value = entry.get(stat)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise bad(f"{where}.{stat}", "an object with mean and stderr", value)
        for key in _NUMBERS:
            if value.get(key) is not None and not _is_number(value[key]):
                raise bad(f"{where}.{stat}.{key}", "a finite number or null", value[key])
        for key in _COUNTS:
            v = value.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise bad(f"{where}.{stat}.{key}", "a non-negative integer or null", v)
        for key in _TEXTS:
            if value.get(key) is not None and not isinstance(value[key], str):
                raise bad(f"{where}.{stat}.{key}", "a string or null", value[key])
    for key in ("skill_vs_mean_trajectory", "l2_a", "l2_b"):
        if entry.get(key) is not None and not _is_number(entry[key]):
            raise bad(f"{where}.{key}", "a finite number or null", entry[key])
    reason = entry.get("skill_undefined_reason")
    if reason is not None and not isinstance(reason, str):
        raise bad(f"{where}.skill_undefined_reason", "a string or null", reason)
    edges = entry.get("lambda_edges")
    if edges is not None and not (
        isinstance(edges, dict)
        and all(k in ("l2_a", "l2_b") and v in ("upper", "lower") for k, v in edges.items())
    ):
        raise bad(f"{where}.lambda_edges", 'an object like {"l2_a": "upper"} or null', edges)


def _results_file(path: Path) -> Path:
    """The results JSON a `table` input names: the file itself, or EXP/results.json."""
    return path / "results.json" if path.is_dir() else path


def _drop_pre_jackknife_stderr(entry: dict) -> None:
    """Results written before the jackknife hold an across-run stderr over test examples, which
    share the runs, so it is far too small: never show it under the jackknife caption."""
    from simfluence.scoring import ACROSS_RUN_STDERR_METHOD

    stat = entry.get("across_run_spearman")
    if stat is None or stat.get("stderr") is None:
        return
    if stat.get("stderr_method") != ACROSS_RUN_STDERR_METHOD:
        stat["stderr"] = None
        stat["stderr_undefined_reason"] = (
            "this results file predates the jackknife over held-out runs (its stderr over test "
            "examples is too small); rerun `simfluence evaluate` for it"
        )


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Read `evaluate` results from JSON files or experiment folders holding results.json.

    Every variant entry is checked (objects where objects belong; finite numbers or null for
    means, standard errors, skill and lambdas), so a malformed file fails here in one line
    naming the file and the key, not inside the table code.

    Args:
        paths: results JSON files, or experiment folders holding results.json.

    Returns:
        One dict per path, in order: the JSON, plus "_source" (the file read) and "_folder"
        (the folder given; for a file, the experiment path it records, else the file without
        its suffix), which `format_table` uses to tell apart experiments of one name.

    Raises:
        RunLogError: a path is neither, or the JSON is not an evaluate result.
    """
    if not paths:
        raise RunLogError("no results given; pass results.json files or experiment folders")
    out = []
    for p in paths:
        p = Path(p)
        f = _results_file(p)
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
        for name, entry in data["variants"].items():
            _check_entry(f, name, entry)
            _drop_pre_jackknife_stderr(entry)
        exp = data.setdefault("experiment", {})
        if not isinstance(exp, dict):
            raise RunLogError(f"{f}: 'experiment' must be an object, got {exp!r:.60}")
        if not isinstance(exp.get("name"), str) or not exp["name"]:
            exp["name"] = f.parent.name
        split = data.get("split")
        if split is not None and not (
            isinstance(split, dict) and all(isinstance(v, list) for v in split.values())
        ):
            raise RunLogError(f"{f}: 'split' must be an object of run lists, got {split!r:.60}")
        data["_source"] = str(f)
        recorded = exp.get("path")
        if p.is_dir():
            data["_folder"] = str(p)
        elif isinstance(recorded, str) and recorded:
            data["_folder"] = recorded
        else:
            data["_folder"] = str(f.with_suffix(""))
        out.append(data)
    return out


def _labels(results: Sequence[dict]) -> list[str]:
    """Column labels: the experiment names; a name shared by several results gets, for each,
    the shortest trailing part of its folder path that no other one ends with, e.g.
    `demo-synthetic (a/exp)` beside `demo-synthetic (b/exp)` and `demo-synthetic (seed1)`."""
    names = [r["experiment"].get("name") or "?" for r in results]
    labels = list(names)
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        if len(idx) == 1:
            continue
        parts = {i: Path(results[i].get("_folder") or "").parts for i in idx}
        for i in idx:
            for k in range(1, len(parts[i]) + 1):
                tail = parts[i][-k:]
                if all(parts[j][-k:] != tail for j in idx if j != i):
                    labels[i] = f"{name} ({'/'.join(tail)})"
                    break
    # The same folder twice, or results without folders (built in memory): number them.
    return [lab if labels.count(lab) == 1 else f"{lab} ({i + 1})" for i, lab in enumerate(labels)]


def table_json(results: Sequence[dict]) -> dict:
    """Machine-readable form of `format_table`.

    Args:
        results: from `load_results`.

    Returns:
        `{"experiments": [labels], "variants": [...], "sources": {label: file}, "machines":
        {label: `machine_line`}, "cells":
        {variant: {label: {metric: {...}} | None}}}`; None where a variant was not run on an
        experiment.
    """
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
    machines = {lab: machine_line(r) for lab, r in zip(labels, results, strict=True)}
    return {
        "experiments": labels,
        "variants": variants,
        "sources": sources,
        "machines": machines,
        "cells": cells,
    }


def format_table(results: Sequence[dict]) -> str:
    """Markdown: the paper-style table, then the honest-metrics table, then footnotes.

    Args:
        results: from `load_results` (one column per result, labelled by experiment name,
            with the folder added where names repeat).

    Returns:
        The markdown text. Undefined values are a dash with a numbered footnote; partly defined
        ones carry a footnote saying how many of how many.
    """
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
                + _pm(e.get("final_step_spearman"), "rho", notes, "final-step ρ", _n_test_runs(r))
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
        "LDS (across-run Spearman ρ) ± stderr (jackknife over held-out runs) / skill = 1 - "
        "MSE/MSE(mean trajectory) / final-step MSE ± stderr (over held-out runs)",
        "",
        *_md(["variant", *labels], rows2),
        "",
        *(f"{lab}: {machine_line(r)}" for lab, r in zip(labels, results, strict=True)),
    ]
    if notes.reasons:
        lines += [""] + notes.lines()
    return "\n".join(lines) + "\n"


# (results key, header, direction, number kind). Skill has no standard error.
METRICS = (
    ("all_steps_mse", "all-steps MSE", "lower", "mse"),
    ("final_step_spearman", "final-step ρ", "higher", "rho"),
    ("final_step_mse", "final-step MSE", "lower", "mse"),
    ("across_run_spearman", "LDS (across-run ρ)", "higher", "rho"),
    ("skill_vs_mean_trajectory", "skill", "higher", "skill"),
)
FORMATS = (".md", ".csv", ".tex")


def _metric_cells(entry: dict | None, notes: _Notes, n_runs: int | None) -> dict[str, tuple]:
    """{key: (mean or None, stderr or None, mean footnote refs, stderr footnote refs)}."""
    out = {}
    for key, header, _, _ in METRICS:
        what = "across-run ρ" if key == "across_run_spearman" else header
        if entry is None:
            out[key] = (None, None, notes.ref("variant not evaluated on this experiment"), "")
            continue
        if key == "skill_vs_mean_trajectory":
            value, reason = _skill_value(entry)
            out[key] = (value, None, "" if reason is None else notes.ref(reason), "")
            continue
        stat = entry.get(key)
        if stat is None:
            out[key] = (None, None, notes.ref(f"{what}: not computed for this variant"), "")
            continue
        mean, se, mean_ref, se_ref = stat.get("mean"), stat.get("stderr"), "", ""
        if mean is None:
            reason = stat.get("undefined_reason") or "undefined"
            mean_ref = notes.ref(f"{what} undefined: {reason}")
        part = _partial(stat, what, notes, n_runs if key == "final_step_spearman" else None)
        mean_ref = (mean_ref + part).strip()
        if mean is not None and se is None and stat.get("stderr_undefined_reason"):
            se_ref = notes.ref(
                f"{what} standard error undefined: {stat['stderr_undefined_reason']}"
            )
        out[key] = (mean, se if mean is not None else None, mean_ref, se_ref)
    return out


def _best(values: Sequence[float | None], direction: str) -> list[bool]:
    """Which entries equal the best defined value (min for "lower", max for "higher")."""
    defined = [v for v in values if v is not None]
    if not defined:
        return [False] * len(values)
    best = min(defined) if direction == "lower" else max(defined)
    return [v is not None and v == best for v in values]


def metrics_table(results: Sequence[dict]) -> list[dict]:
    """One table per experiment, one metric per column, with the best value of each marked.

    Args:
        results: from `load_results`.

    Returns:
        Per experiment, in order: {"label", "source", "machine" (`machine_line`), "rows":
        [{"variant", "cells": {key: (mean, stderr, mean_refs, stderr_refs)}, "best": {key:
        bool}, "notes": [reasons]}], "notes": _Notes}. Keys are those of `METRICS`; a mean or
        stderr is None where undefined (refs then give the footnote numbers). "best" marks the
        lowest MSE and the highest rho and skill among the variants where the value is defined
        (all of a tie).
        Each row's "notes" lists the reasons behind its own refs (for the csv).
    """
    notes = _Notes()
    tables = []
    for label, r in zip(_labels(results), results, strict=True):
        variants = _ordered(r["variants"])
        rows = []
        for v in variants:
            own = _Notes()  # the row's own reasons, for the csv's notes column
            _metric_cells(r["variants"][v], own, _n_test_runs(r))
            rows.append(
                {
                    "variant": v,
                    "cells": _metric_cells(r["variants"][v], notes, _n_test_runs(r)),
                    "notes": own.reasons,
                }
            )
        for key, _, direction, _ in METRICS:
            marks = _best([row["cells"][key][0] for row in rows], direction)
            for row, m in zip(rows, marks, strict=True):
                row.setdefault("best", {})[key] = m
        tables.append(
            {
                "label": label,
                "source": r.get("_source"),
                "machine": machine_line(r),
                "rows": rows,
                "notes": notes,
            }
        )
    return tables


def _columns() -> list[tuple[str, str, str]]:
    """(header, metric key, "mean" | "se") for the metric columns, in order."""
    cols = []
    for key, header, _, _ in METRICS:
        cols.append((header, key, "mean"))
        if key != "skill_vs_mean_trajectory":
            cols.append((f"{header} se", key, "se"))
    return cols


def _text_cell(row: dict, key: str, part: str, kind: str, bold) -> str:
    mean, se, mean_ref, se_ref = row["cells"][key]
    if part == "mean":
        text = (
            DASH
            if mean is None
            else bold(_num(mean, kind))
            if row["best"][key]
            else _num(mean, kind)
        )
        return f"{text} {mean_ref}".strip()
    if se is None:
        return f"{DASH} {se_ref}".strip()
    return _num(se, "rho" if kind == "skill" else kind)


_KINDS = {key: kind for key, _, _, kind in METRICS}
_DIRECTIONS = {key: d for key, _, d, _ in METRICS}


def format_metrics_md(results: Sequence[dict]) -> str:
    """Markdown: per experiment a heading and a table (rows = variants, one column per metric
    and one per standard error), the best value of each metric column in bold; then the
    numbered footnotes of the dashes.

    Args:
        results: from `load_results`.

    Returns:
        The markdown text.
    """
    tables = metrics_table(results)
    cols = _columns()
    lines = [
        "Mean over held-out runs with standard errors in the se columns (LDS = across-run "
        "Spearman ρ, stderr by a jackknife over held-out runs; skill = 1 - MSE / "
        "MSE(mean trajectory)); best of each column in bold (lowest MSE, highest ρ and skill)",
    ]
    for t in tables:
        rows = [
            [row["variant"]]
            + [_text_cell(row, k, part, _KINDS[k], lambda x: f"**{x}**") for _, k, part in cols]
            for row in t["rows"]
        ]
        lines += ["", f"### {t['label']}", "", t["machine"], ""]
        lines += _md(["variant", *(h for h, _, _ in cols)], rows)
    notes = tables[0]["notes"] if tables else _Notes()
    if notes.reasons:
        lines += [""] + notes.lines()
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "ρ": r"$\rho$",
    "λ": r"$\lambda$",
    "±": r"$\pm$",
    "—": "---",
}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def format_metrics_tex(results: Sequence[dict]) -> str:
    """LaTeX (booktabs): per experiment a `table` with the layout of `format_metrics_md`, the
    best value of each metric column in `\\textbf`, then the footnotes as a small paragraph.

    Args:
        results: from `load_results`.

    Returns:
        A fragment to `\\input` (needs `\\usepackage{booktabs}`).
    """
    tables = metrics_table(results)
    cols = _columns()
    lines = [
        "% simfluence table: mean over held-out runs, standard errors in the se columns; best "
        "of each column in bold (lowest MSE, highest rho and skill). Needs booktabs.",
    ]
    for t in tables:
        lines += [
            f"% {t['label']}: {t['machine']}",
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex(t['label'])}}}",
            r"\begin{tabular}{l" + "r" * len(cols) + "}",
            r"\toprule",
            " & ".join(["variant", *(_tex(h) for h, _, _ in cols)]) + r" \\",
            r"\midrule",
        ]
        for row in t["rows"]:
            cells = [
                _tex(_text_cell(row, k, part, _KINDS[k], lambda x: f"\x00{x}\x01"))
                for _, k, part in cols
            ]
            cells = [c.replace("\x00", r"\textbf{").replace("\x01", "}") for c in cells]
            lines.append(" & ".join([_tex(row["variant"]), *cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    notes = tables[0]["notes"] if tables else _Notes()
    if notes.reasons:
        lines += ["", r"{\footnotesize"] + [_tex(n) + r"\par" for n in notes.lines()] + ["}"]
    return "\n".join(lines) + "\n"


def format_metrics_csv(results: Sequence[dict]) -> str:
    """CSV: one row per (experiment, variant), one column per metric and per standard error.

    Numbers are written in full precision (Python's shortest round-trip repr), so parsing the
    file gives back the results.json values. An undefined value is an empty cell. The best
    value of each metric within an experiment is marked in a separate boolean column
    "{metric} best" ("true"/"false"), so every number cell stays a plain number. The column
    "notes" holds the reasons behind that row's empty or partly defined cells ("; "-separated),
    in place of the footnotes of the other formats; the last, "machine", says which machine
    made the experiment's numbers (`machine_line`).

    Args:
        results: from `load_results`.

    Returns:
        The CSV text (header row first, "\\n" line ends).
    """
    import csv
    import io

    tables = metrics_table(results)
    header = ["experiment", "variant"]
    for key, name, _, _ in METRICS:
        header.append(name)
        if key != "skill_vs_mean_trajectory":
            header.append(f"{name} se")
        header.append(f"{name} best")
    header += ["notes", "machine"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for t in tables:
        for row in t["rows"]:
            line = [t["label"], row["variant"]]
            for key, _, _, _ in METRICS:
                mean, se, _, _ = row["cells"][key]
                line.append("" if mean is None else repr(float(mean)))
                if key != "skill_vs_mean_trajectory":
                    line.append("" if se is None else repr(float(se)))
                line.append("true" if row["best"][key] else "false")
            line.append("; ".join(row["notes"]))
            line.append(t["machine"].removeprefix("machine: "))
            w.writerow(line)
    return buf.getvalue()


def write_table(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, layout: str = "metrics"
) -> tuple[Path, Path]:
    """Write the table to `out` (.md, .csv or .tex) and its JSON beside it (same stem, .json).

    Args:
        paths: results JSON files or experiment folders (see `load_results`).
        out: the table path: .md (`format_metrics_md`), .csv (`format_metrics_csv`) or .tex
            (`format_metrics_tex`).
        layout: "metrics" (one table per experiment, one metric per column, standard errors
            in their own columns, best values marked) or "paper" (the paper's layout, .md
            only: `format_table`).

    Returns:
        (table path, JSON path).

    Raises:
        RunLogError: unreadable results, `out` not ending in .md/.csv/.tex, the paper layout
            not to .md, or a table path that is one of the inputs.
    """
    out = Path(out)
    if out.suffix not in FORMATS:
        raise RunLogError(
            f"--out {out}: expected a .md, .csv or .tex path (the JSON goes beside it)"
        )
    if layout not in ("metrics", "paper"):
        raise RunLogError(f"--layout {layout!r}: expected metrics or paper")
    if layout == "paper" and out.suffix != ".md":
        raise RunLogError(
            f"--out {out}: the paper layout is markdown only; give a .md path or use "
            "--layout metrics"
        )
    json_path = out.with_suffix(".json")
    for p in map(Path, paths):
        source = _results_file(p)
        if source.resolve() in (out.resolve(), json_path.resolve()):
            raise RunLogError(
                f"--out {out}: its table ({out.name}, {json_path.name}) would overwrite the "
                f"input {source}; choose another --out"
            )
    results = load_results(paths)
    if layout == "paper":
        text = format_table(results)
    else:
        text = {
            ".md": format_metrics_md,
            ".csv": format_metrics_csv,
            ".tex": format_metrics_tex,
        }[out.suffix](results)
    data = table_json(results)
    atomic_write_json(json_path, data)
    atomic_write_text(out, text)
    return out, json_path

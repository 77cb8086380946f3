"""Table writer on fixed inputs: layout, footnotes for undefined values, JSON, errors."""

import csv
import json
import re

import numpy as np
import pytest

from simfluence import table
from simfluence.runlog import RunLogError
from simfluence.scoring import ACROSS_RUN_STDERR_METHOD as JACK


def _entry(mse, rho, across=0.25, skill=0.1, l2=(0.1, 0.01)):
    return {
        "all_steps_mse": {"mean": mse, "stderr": mse / 10},
        "final_step_spearman": {"mean": rho, "stderr": 0.01},
        "final_step_mse": {"mean": 2 * mse, "stderr": mse / 5},
        "across_run_spearman": across
        if isinstance(across, dict)
        else {"mean": across, "stderr": 0.05, "n_used": 4, "n_excluded": 0, "stderr_method": JACK},
        "skill_vs_mean_trajectory": skill,
        "l2_a": l2[0] if l2 else None,
        "l2_b": l2[1] if l2 else None,
    }


UNDEF = {
    "mean": None,
    "stderr": None,
    "n_used": 4,
    "n_excluded": 1,
    "undefined_reason": "the prediction ignores the curriculum",
}


def _results(name, with_tracin):
    v = {
        "mean-trajectory": _entry(0.004, 0.70, across=UNDEF, skill=0.0, l2=None),
        "linear": _entry(0.002, 0.80),
        "constant": _entry(0.010, 0.50, across=UNDEF, skill=-1.5, l2=None),
    }
    if with_tracin:
        v["tracin-cp"] = _entry(0.003, 0.60, l2=None)
    return {
        "variants": v,
        "split": {"fit": [0], "valid": [], "test": [1, 2]},
        "experiment": {"name": name},
    }


def test_format_table_fixed_inputs(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b"
    a.write_text(json.dumps(_results("rte-ia3", True)))
    b.mkdir()
    (b / "results.json").write_text(json.dumps(_results("copa-full", False)))
    md, js = table.write_table([a, b], tmp_path / "t.md", layout="paper")
    text = md.read_text()
    lines = text.splitlines()
    assert "| variant | rte-ia3 | copa-full |" in lines
    # Paper order of rows: Simfluence variants, TracIn, then baselines.
    first = lines.index("| variant | rte-ia3 | copa-full |")
    rows = [ln.split(" | ")[0].lstrip("| ") for ln in lines[first + 2 : first + 6]]
    assert rows == ["linear", "tracin-cp", "constant", "mean-trajectory"]
    assert "| linear | 0.002 ± 0.0002 / 0.800 ± 0.010 | 0.002 ± 0.0002 / 0.800 ± 0.010 |" in lines
    # Undefined across-run rho and a missing variant: dash + numbered footnote, never NaN.
    assert "nan" not in text.lower()
    assert "[1] variant not evaluated on this experiment" in lines
    assert "[2] across-run ρ undefined: the prediction ignores the curriculum" in lines
    assert "| tracin-cp | 0.003 ± 0.0003 / 0.600 ± 0.010 | — [1] |" in lines
    # UNDEF leaves out one of five test examples: said in its own footnote.
    assert (
        "[3] across-run ρ: 1 of 5 test examples left out (their true final losses do not "
        "vary across the held-out runs)" in lines
    )
    assert (
        "| constant | — [2] [3] / -1.500 / 0.02 ± 0.002 | — [2] [3] / -1.500 / 0.02 ± 0.002 |"
        in lines
    )
    data = json.loads(js.read_text())
    assert data["experiments"] == ["rte-ia3", "copa-full"]
    assert data["cells"]["tracin-cp"]["copa-full"] is None
    assert data["cells"]["linear"]["rte-ia3"]["all_steps_mse"]["mean"] == 0.002


def test_format_results_single_experiment():
    text = table.format_results(_results("x", True))
    assert (
        "| linear | 0.002 ± 0.0002 | 0.800 ± 0.010 | 0.004 ± 0.0004 | 0.250 ± 0.050 | "
        "+0.100 | 1e-01 | 1e-02 |"
    ) in text
    assert "| constant |" in text and "— [1]" in text and "n/a" in text


def test_errors(tmp_path):
    with pytest.raises(RunLogError, match=r"expected a \.md, \.csv or \.tex path"):
        table.write_table([tmp_path], tmp_path / "t.txt")
    with pytest.raises(RunLogError, match="the paper layout is markdown only"):
        table.write_table([tmp_path], tmp_path / "t.csv", layout="paper")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RunLogError, match="not a `simfluence evaluate` result"):
        table.write_table([tmp_path / "bad.json"], tmp_path / "t.md")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RunLogError, match="cannot read"):
        table.load_results([tmp_path / "broken.json"])
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "t.json").exists()


def test_partly_defined_values_are_footnoted_with_counts():
    res = _results("x", False)
    lin = res["variants"]["linear"]
    lin["final_step_spearman"].update(
        n_runs=10, n_undefined=3, undefined_reason="equal final losses on held-out run(s) 1, 4, 7"
    )
    lin["across_run_spearman"].update(n_used=47, n_excluded=3, n_constant_prediction=2)
    res["variants"]["mean-trajectory"]["across_run_spearman"] = dict(UNDEF, n_used=4, n_excluded=1)
    for text in (table.format_results(res), table.format_table([res])):
        notes = [ln for ln in text.splitlines() if ln.startswith("[")]
        assert any(
            "final-step ρ averaged over the 7 of 10 held-out runs where it is defined (3 "
            "undefined: equal final losses on held-out run(s) 1, 4, 7)" in n
            for n in notes
        )
        assert any("across-run ρ: 3 of 50 test examples left out" in n for n in notes)
        assert any(
            "across-run ρ: for 2 of the 47 test examples averaged, the simulated final losses do "
            "not vary across the held-out runs; they count as ρ = 0" in n
            for n in notes
        )
        # The undefined baseline's exclusions are footnoted too: "1 of 5".
        assert any("across-run ρ: 1 of 5 test examples left out" in n for n in notes)
    text = table.format_results(res)
    linear_row = next(ln for ln in text.splitlines() if ln.startswith("| linear |"))
    cells = linear_row.split(" | ")
    assert cells[2].startswith("0.800 ± 0.010 [") and cells[4].startswith("0.250 ± 0.050 [")
    # Old results without n_runs: the split's held-out runs give the total.
    del lin["final_step_spearman"]["n_runs"]
    res["split"]["test"] = list(range(10))
    assert "over the 7 of 10 held-out runs" in table.format_results(res)


def test_undefined_jackknife_and_missing_skill_are_footnoted_truthfully():
    res = _results("x", False)
    lin = res["variants"]["linear"]
    lin["across_run_spearman"].update(stderr=None, stderr_undefined_reason="needs 3 runs")
    del res["variants"]["constant"]["skill_vs_mean_trajectory"]  # results predating the key
    text = table.format_results(res)
    assert "0.250 [" in text and "across-run ρ standard error undefined: needs 3 runs" in text
    assert "no skill_vs_mean_trajectory in this results file (it predates" in text
    assert "zero all-steps MSE" not in text
    res["variants"]["constant"]["skill_vs_mean_trajectory"] = None
    res["variants"]["constant"]["skill_undefined_reason"] = "the baseline's MSE is undefined"
    assert "skill undefined: the baseline's MSE is undefined" in table.format_results(res)
    # A diverging simulator's skill is printed compactly, not with 40 digits.
    lin["skill_vs_mean_trajectory"] = -1.8915e39
    assert "-1.89e+39" in table.format_results(res)


@pytest.mark.parametrize(
    ("variants", "key"),
    [
        ({"linear": 3}, "variants.linear must be an object of metrics, got 3"),
        ({"linear": {"all_steps_mse": 3}}, "variants.linear.all_steps_mse must be an object"),
        (
            {"linear": {"all_steps_mse": {"mean": "x"}}},
            "variants.linear.all_steps_mse.mean must be a finite number or null, got 'x'",
        ),
        (
            {"linear": {"across_run_spearman": {"mean": 0.1, "n_used": "4"}}},
            "variants.linear.across_run_spearman.n_used must be a non-negative integer",
        ),
        ({"linear": {"skill_vs_mean_trajectory": "0.1"}}, "skill_vs_mean_trajectory must be"),
        ({"linear": {"l2_a": [1]}}, "variants.linear.l2_a must be a finite number or null"),
        ({"linear": {"lambda_edges": ["l2_a"]}}, "variants.linear.lambda_edges must be"),
    ],
)
def test_malformed_variant_entries_are_one_line_errors(tmp_path, variants, key):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"variants": variants}))
    with pytest.raises(RunLogError) as info:
        table.load_results([f])
    msg = str(info.value)
    assert str(f) in msg and key in msg and "\n" not in msg


def test_malformed_results_through_the_cli_are_one_line(tmp_path, capsys):
    from simfluence import cli

    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"variants": {"linear": 3}}))
    with pytest.raises(SystemExit) as info:
        cli.main(["table", str(f), "--out", str(tmp_path / "t.md")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(f) in err and "variants.linear" in err
    assert "Traceback" not in err


def test_experiments_sharing_a_name_are_labelled_by_folder(tmp_path):
    from simfluence.demo_data import make_demo_experiment
    from simfluence.evaluation import evaluate

    sizes = dict(n_runs=5, n_train=6, n_test=3, batch=2, steps=7)
    paths = []
    for where in ("a/exp", "b/exp", "seed1"):
        exp = make_demo_experiment(tmp_path / where, seed=len(paths), **sizes)
        res = evaluate(exp, split=(2, 0, 3), variants=["constant"])
        (exp / "results.json").write_text(json.dumps(res))
        paths.append(exp)
    labels = table.table_json(table.load_results(paths))["experiments"]
    assert labels == ["demo-synthetic (a/exp)", "demo-synthetic (b/exp)", "demo-synthetic (seed1)"]
    text = table.format_table(table.load_results(paths))
    assert "| variant | demo-synthetic (a/exp) | demo-synthetic (b/exp) |" in text
    # A results file names its experiment folder (recorded by evaluate).
    f = tmp_path / "c.json"
    f.write_text((paths[2] / "results.json").read_text())
    labels = table.table_json(table.load_results([paths[0], f]))["experiments"]
    assert labels[1] == f"demo-synthetic ({paths[2].name})"
    # The same folder twice cannot be told apart by folder: numbered.
    labels = table.table_json(table.load_results([paths[0], paths[0]]))["experiments"]
    assert labels == ["demo-synthetic (1)", "demo-synthetic (2)"]


def test_results_from_before_the_jackknife_do_not_show_their_stderr(tmp_path):
    # An older results.json has an across-run stderr over test examples (no stderr_method):
    # printing it under the jackknife caption would understate it ~20x on the demo.
    res = _results("old", with_tracin=False)
    del res["variants"]["linear"]["across_run_spearman"]["stderr_method"]
    (tmp_path / "old.json").write_text(json.dumps(res))
    md, _ = table.write_table([tmp_path / "old.json"], tmp_path / "t.md", layout="paper")
    text = md.read_text()
    # The across-run table's row (the first table holds the per-run metrics).
    row = next(ln for ln in text.splitlines() if ln.startswith("| linear") and "0.250" in ln)
    assert "0.250 ± 0.050" not in row and "0.250 [" in row, row
    assert "predates the jackknife" in text


def test_a_table_never_overwrites_its_input(tmp_path):
    src = tmp_path / "old.json"
    src.write_text(json.dumps(_results("x", with_tracin=False)))
    before = src.read_bytes()
    with pytest.raises(RunLogError, match=r"would overwrite the input .*old\.json"):
        table.write_table([src], tmp_path / "old.md")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "results.json").write_bytes(before)
    with pytest.raises(RunLogError, match=r"would overwrite the input .*results\.json"):
        table.write_table([exp], exp / "results.md")
    assert src.read_bytes() == before and not (tmp_path / "old.md").exists()
    md, js = table.write_table([src], tmp_path / "t.md")  # elsewhere: fine
    assert md.is_file() and js.is_file()


# (results key, header, direction) as the issue names them; an independent copy of METRICS.
_METRICS = [
    ("all_steps_mse", "all-steps MSE", "lower"),
    ("final_step_spearman", "final-step ρ", "higher"),
    ("final_step_mse", "final-step MSE", "lower"),
    ("across_run_spearman", "LDS (across-run ρ)", "higher"),
    ("skill_vs_mean_trajectory", "skill", "higher"),
]


def _varied(name, seed):
    """Results with distinct random values, one tie, an undefined value and a missing stderr."""
    rng = np.random.default_rng(seed)
    res = _results(name, with_tracin=True)
    for e in res["variants"].values():
        for key in ("all_steps_mse", "final_step_spearman", "final_step_mse"):
            e[key]["mean"] = float(rng.uniform(0.001, 0.9))
            e[key]["stderr"] = float(rng.uniform(0.0001, 0.01))
        if e["across_run_spearman"].get("mean") is not None:
            e["across_run_spearman"]["mean"] = float(rng.uniform(-0.5, 0.9))
        e["skill_vs_mean_trajectory"] = float(rng.uniform(-2, 0.5))
    v = res["variants"]
    v["tracin-cp"]["final_step_mse"]["mean"] = v["linear"]["final_step_mse"]["mean"] = 1e-4  # tie
    v["linear"]["skill_vs_mean_trajectory"] = None
    v["linear"]["skill_undefined_reason"] = "no baseline"
    v["tracin-cp"]["all_steps_mse"].update(stderr=None, stderr_undefined_reason="one run")
    return res


def _value(res, variant, key):
    e = res["variants"][variant]
    if key == "skill_vs_mean_trajectory":
        return e.get(key), None
    return e[key].get("mean"), e[key].get("stderr")


def _best_of(res, key, direction):
    """The variants holding the best defined value, by numpy argmin/argmax (all of a tie)."""
    names = list(res["variants"])
    vals = np.array([np.nan if (x := _value(res, n, key)[0]) is None else x for n in names])
    i = np.nanargmin(vals) if direction == "lower" else np.nanargmax(vals)
    return {n for n, x in zip(names, vals, strict=True) if x == vals[i]}


def _number(cell):
    """The number in a md/tex cell (bold markers and footnote refs stripped), or None."""
    m = re.search(r"[-+]?\d[\d.]*(e[-+]?\d+)?", re.sub(r"\[\d+\]", "", cell))
    return None if m is None else float(m.group(0))


@pytest.fixture
def two_results(tmp_path):
    paths = []
    for k, name in enumerate(("rte_ia3", "copa-full")):
        f = tmp_path / f"r{k}.json"
        f.write_text(json.dumps(_varied(name, k)))
        paths.append(f)
    return paths, [json.loads(p.read_text()) for p in paths]


def test_csv_parses_back_to_the_results_numbers_with_the_best_marked(tmp_path, two_results):
    paths, res = two_results
    out, js = table.write_table(paths, tmp_path / "t.csv")
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["experiment"], r["variant"]) for r in rows] == [
        (lab, v)
        for lab, rr in zip(("rte_ia3", "copa-full"), res, strict=True)
        for v in ("linear", "tracin-cp", "constant", "mean-trajectory")
        if v in rr["variants"]
    ]
    for r in rows:
        rr = res[0] if r["experiment"] == "rte_ia3" else res[1]
        for key, header, direction in _METRICS:
            mean, se = _value(rr, r["variant"], key)
            assert (None if r[header] == "" else float(r[header])) == mean, (r, header)
            if key != "skill_vs_mean_trajectory":
                want_se = se if mean is not None else None
                assert (None if r[f"{header} se"] == "" else float(r[f"{header} se"])) == want_se
            best = r[f"{header} best"] == "true"
            assert best == (r["variant"] in _best_of(rr, key, direction)), (r["variant"], header)
    linear = next(r for r in rows if r["variant"] == "linear")
    tracin = next(r for r in rows if r["variant"] == "tracin-cp")
    assert linear["final-step MSE best"] == tracin["final-step MSE best"] == "true"  # the tie
    assert linear["skill"] == "" and "skill undefined: no baseline" in linear["notes"]
    assert "all-steps MSE standard error undefined: one run" in tracin["notes"]
    assert js.is_file() and json.loads(js.read_text())["experiments"] == ["rte_ia3", "copa-full"]


def _md_tables(text):
    """{experiment: (header, [rows of cells])} from the metrics markdown."""
    out, label = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            label = line[4:]
            out[label] = (None, [])
        elif label and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if out[label][0] is None:
                out[label] = (cells, [])
            else:
                out[label][1].append(cells)
    return out


def _check_cells(header, rows, rr, bold):
    for cells in rows:
        variant = cells[0]
        for key, name, direction in _METRICS:
            mean, se = _value(rr, variant, key)
            cell = cells[header.index(name)]
            got = _number(cell)
            if mean is None:
                assert got is None and cell.startswith(("—", "---")) and "[" in cell, cell
            else:
                assert got == pytest.approx(mean, rel=5e-3, abs=5e-4), (variant, name, cell)
            assert bold(cell) == (variant in _best_of(rr, key, direction)), (variant, name, cell)
            if key != "skill_vs_mean_trajectory":
                se_cell = cells[header.index(f"{name} se")]
                if mean is None or se is None:
                    assert _number(se_cell) is None
                else:
                    assert _number(se_cell) == pytest.approx(se, rel=5e-3, abs=5e-4)


def test_markdown_has_one_table_per_experiment_with_the_best_in_bold(tmp_path, two_results):
    paths, res = two_results
    out, _ = table.write_table(paths, tmp_path / "t.md")
    text = out.read_text()
    tables = _md_tables(text)
    assert list(tables) == ["rte_ia3", "copa-full"]
    for (header, rows), rr in zip(tables.values(), res, strict=True):
        assert header == [
            "variant",
            "all-steps MSE",
            "all-steps MSE se",
            "final-step ρ",
            "final-step ρ se",
            "final-step MSE",
            "final-step MSE se",
            "LDS (across-run ρ)",
            "LDS (across-run ρ) se",
            "skill",
        ]
        assert [r[0] for r in rows] == [v for v in table.VARIANT_ORDER if v in rr["variants"]]
        _check_cells(header, rows, rr, lambda c: c.startswith("**"))
    notes = [ln for ln in text.splitlines() if re.match(r"\[\d+\] ", ln)]
    assert any("skill undefined: no baseline" in n for n in notes)
    assert any("across-run ρ undefined: the prediction ignores the curriculum" in n for n in notes)
    assert "nan" not in text.lower()


def test_latex_marks_the_best_with_textbf_and_escapes(tmp_path, two_results):
    paths, res = two_results
    out, _ = table.write_table(paths, tmp_path / "t.tex")
    text = out.read_text()
    assert text.count(r"\begin{tabular}") == 2 and r"\caption{rte\_ia3}" in text
    assert "ρ" not in text and "—" not in text  # as LaTeX: $\rho$, ---
    blocks = text.split(r"\midrule")[1:]
    header_lines = [ln for ln in text.splitlines() if ln.startswith("variant & ")]
    for block, head, rr in zip(blocks, header_lines, res, strict=True):
        header = [c.strip().replace(r"$\rho$", "ρ") for c in head.rstrip("\\ ").split(" & ")]
        body = block.split(r"\bottomrule")[0].strip().splitlines()
        rows = [[c.strip() for c in ln.rstrip("\\ ").split(" & ")] for ln in body]
        _check_cells(header, rows, rr, lambda c: c.startswith(r"\textbf{"))
    assert r"skill undefined: no baseline\par" in text

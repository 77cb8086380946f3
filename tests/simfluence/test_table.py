"""Table writer on fixed inputs: layout, footnotes for undefined values, JSON, errors."""

import json

import pytest

from simfluence import table
from simfluence.runlog import RunLogError


def _entry(mse, rho, across=0.25, skill=0.1, l2=(0.1, 0.01)):
    return {
        "all_steps_mse": {"mean": mse, "stderr": mse / 10},
        "final_step_spearman": {"mean": rho, "stderr": 0.01},
        "final_step_mse": {"mean": 2 * mse, "stderr": mse / 5},
        "across_run_spearman": across
        if isinstance(across, dict)
        else {"mean": across, "stderr": 0.05, "n_used": 4, "n_excluded": 0},
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
    md, js = table.write_table([a, b], tmp_path / "t.md")
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
    assert "| constant | — [2] / -1.500 / 0.02 ± 0.002 | — [2] / -1.500 / 0.02 ± 0.002 |" in lines
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
    with pytest.raises(RunLogError, match="expected a .md"):
        table.write_table([tmp_path], tmp_path / "t.txt")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RunLogError, match="not a `simfluence evaluate` result"):
        table.write_table([tmp_path / "bad.json"], tmp_path / "t.md")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RunLogError, match="cannot read"):
        table.load_results([tmp_path / "broken.json"])
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "t.json").exists()

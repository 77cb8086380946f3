"""Templates and loading of RTE, COPA and Winogrande against the raw jsonl files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune import tasks

# Record counts and label counts from ../shared/data/README.md (independent of our loader).
COUNTS = {
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("copa", "train"): 400,
    ("copa", "validation"): 100,
    ("winogrande", "train_xs"): 160,
    ("winogrande", "validation"): 1267,
}


def _raw(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize(("task", "split"), sorted(COUNTS))
def test_load_split_counts_and_templates(data_dir, task, split):
    examples = tasks.load_split(task, split, data_dir)
    assert len(examples) == COUNTS[(task, split)]
    raw = _raw(tasks.split_path(task, split, data_dir))
    for ex, rec in zip(examples[:20], raw[:20], strict=False):
        assert len(ex.choices) == 2
        if task == "rte":
            assert rec["premise"] in ex.input and rec["hypothesis"] in ex.input
            assert ex.target == ("Yes" if rec["label"] == "entailment" else "No")
            assert ex.uid == str(rec["idx"])
        elif task == "copa":
            assert rec["premise"] in ex.input
            assert ex.choices == (rec["choice1"], rec["choice2"])
            assert ex.target == [rec["choice1"], rec["choice2"]][rec["label"]]
        else:
            assert rec["sentence"] in ex.input
            assert ex.target == rec["option" + rec["answer"]]
            assert ex.uid == rec["qID"]


def test_rte_validation_label_counts(data_dir):
    labels = [e.label for e in tasks.load_split("rte", "validation", data_dir)]
    assert (labels.count(0), labels.count(1)) == (146, 131)  # README: 146 / 131


def test_unknown_task_and_split(data_dir):
    with pytest.raises(tasks.TaskError, match="unknown task 'mnli'"):
        tasks.load_split("mnli", "train", data_dir)
    with pytest.raises(tasks.TaskError, match="unknown split 'test'"):
        tasks.load_split("rte", "test", data_dir)


def test_missing_file_names_path_and_layout(tmp_path):
    (tmp_path / "rte").mkdir()
    with pytest.raises(tasks.TaskError) as e:
        tasks.load_split("rte", "validation", tmp_path)
    assert str(tmp_path / "rte" / "val.jsonl") in str(e.value)
    assert "expected layout" in str(e.value)


def test_malformed_line_names_file_and_line(data_dir, tmp_path):
    (tmp_path / "copa").mkdir()
    lines = (data_dir / "copa" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    lines[6] = lines[6][:-3]
    bad = tmp_path / "copa" / "val.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(tasks.TaskError, match=rf"{bad}:7: malformed JSON"):
        tasks.load_split("copa", "validation", tmp_path)
    shutil.copy(data_dir / "copa" / "val.jsonl", bad)
    record = json.loads(lines[0])
    del record["label"]
    bad.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(tasks.TaskError, match=r":1: record lacks field\(s\) \['label'\]"):
        tasks.load_split("copa", "validation", tmp_path)


def test_encode_truncates_keeps_eos_and_pads(data_dir, t5_tokenizer_dir):
    from finetune.tokenization import load_tokenizer

    tok = load_tokenizer(t5_tokenizer_dir)
    examples = tasks.load_split("rte", "validation", data_dir)[:30]
    enc = tasks.encode(tok, examples, max_input_length=32, max_target_length=8)
    full = tasks.encode(tok, examples, max_input_length=4096, max_target_length=8)
    for short, long in zip(enc.inputs, full.inputs, strict=True):
        assert short[-1] == 1 and long[-1] == 1  # EOS
        assert len(short) == min(32, len(long))
        np.testing.assert_array_equal(short[:-1], long[: len(short) - 1])
    assert tok.decode(enc.targets[0], skip_special_tokens=True) == examples[0].target
    padded = tasks.pad(enc.inputs, 32)
    assert padded.shape == (30, 32) and padded.dtype == np.int32
    assert ((padded != 0).sum(1) == [len(x) for x in enc.inputs]).all()
    choices = tasks.pad_choices(enc.choices, 4)
    assert choices.shape == (30, 2, 4)
    np.testing.assert_array_equal(choices[np.arange(30), enc.labels], tasks.pad(enc.targets, 4))


def test_round_up():
    assert [tasks.round_up(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]


def test_hub_unreachable_names_the_data_dir_fix():
    # conftest forces the hub offline: loading without a data directory must fail in one line.
    with pytest.raises(tasks.TaskError, match=r"from the Hugging Face hub .*pass --data-dir DIR"):
        tasks.load_split("rte", "train", None)


# Minimal labelled records of each task (no ../shared needed).
_RECORDS = {
    "rte": {"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0},
    "copa": {
        "premise": "p",
        "choice1": "a",
        "choice2": "b",
        "question": "cause",
        "label": 1,
        "idx": 0,
    },
    "winogrande": {"qID": "q", "sentence": "s _", "option1": "a", "option2": "b", "answer": "2"},
}
_FILES = {"rte": "val.jsonl", "copa": "val.jsonl", "winogrande": "dev.jsonl"}


def _write_split(root, task, bad=None):
    """DATA_DIR/<task>/<validation file> with three records; the second updated by ``bad``."""
    records = [dict(_RECORDS[task]) for _ in range(3)]
    records[1].update(bad or {})
    path = root / task / _FILES[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_valid_labels_load(tmp_path):
    for task, target in (("rte", "Yes"), ("copa", "b"), ("winogrande", "b")):
        _write_split(tmp_path, task)
        examples = tasks.load_split(task, "validation", tmp_path)
        assert [e.target for e in examples] == [target] * 3
    _write_split(tmp_path, "rte", {"label": 1})  # integer labels as in the hub's RTE
    assert tasks.load_split("rte", "validation", tmp_path)[1].target == "No"


@pytest.mark.parametrize(
    ("task", "bad", "needle"),
    [
        ("rte", {"label": -1}, "label=-1 is not a valid rte label (-1 marks an unlabelled"),
        ("rte", {"label": 2}, "label=2 is not a valid rte label"),
        ("rte", {"label": "maybe"}, "label='maybe' is not a valid rte label"),
        ("rte", {"label": True}, "label=True"),
        ("copa", {"label": 2}, "label=2 is not a valid copa label"),
        ("copa", {"label": -1}, "label=-1"),
        ("copa", {"question": "why"}, "question='why' is not a valid copa question"),
        ("winogrande", {"answer": ""}, "answer='' is not a valid winogrande answer"),
        ("winogrande", {"answer": "3"}, "answer='3'"),
    ],
)
def test_bad_label_names_file_line_and_choices(tmp_path, task, bad, needle):
    """A label outside the choices is refused with its file and line (it used to index the
    choices from the end, fail later with an IndexError, or give no file and line)."""
    path = _write_split(tmp_path, task, bad)
    with pytest.raises(tasks.TaskError) as e:
        tasks.load_split(task, "validation", tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and needle in msg, msg
    assert "a labelled" in msg and "fix the record" in msg

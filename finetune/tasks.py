"""RTE, COPA and Winogrande as prompted text-to-text examples, loaded with `datasets`.

Every task turns a record into an input that states the problem, the answer choices as short
strings and the index of the correct one; the target is the correct choice. Rank classification
(lowest per-example loss among the choices) gives the accuracy. All templates live in this file.

Data comes from a local directory in the layout of ``../shared/data``::

    DATA_DIR/rte/{train,val}.jsonl            (SuperGLUE RTE)
    DATA_DIR/copa/{train,val}.jsonl           (SuperGLUE COPA)
    DATA_DIR/winogrande/{train_xs,train_s,train_m,train_l,dev}.jsonl   (Winogrande 1.1)

or, with no directory, from the Hugging Face hub (needs a network).

References:
    T0 prompts: Sanh et al. 2021, https://arxiv.org/abs/2110.08207
    Simfluence: Guu et al. 2023, https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Int

TASKS = ("rte", "copa", "winogrande")

_LAYOUT = (
    "expected layout: DATA_DIR/rte/{train,val}.jsonl, DATA_DIR/copa/{train,val}.jsonl, "
    "DATA_DIR/winogrande/{train_xs,train_s,train_m,train_l,dev}.jsonl (as in ../shared/data)"
)


class TaskError(ValueError):
    """Bad task name, split, data directory or data file."""


@dataclass(frozen=True)
class Example:
    """One prompted example.

    Attributes:
        uid: identifier from the source file (RTE/COPA ``idx``, Winogrande ``qID``), as a string.
        input: the prompted input text.
        choices: the answer strings; the target is ``choices[label]``.
        label: index of the correct choice.
    """

    uid: str
    input: str
    choices: tuple[str, ...]
    label: int

    @property
    def target(self) -> str:
        """The correct answer string.

        Returns:
            ``choices[label]``.
        """
        return self.choices[self.label]


# ----------------------------------------------------------------------------------------------
# Templates (T0 style: an instruction, the fields, a short answer). Fields that may be long come
# last, so that truncating the token sequence at max_input_length cuts them and keeps the question.


def _rte(record: dict) -> Example:
    label = record["label"]
    if isinstance(label, str):
        label = {"entailment": 0, "not_entailment": 1}[label]
    text = (
        "Does the premise imply the hypothesis? Yes or no?\n"
        f"Hypothesis: {record['hypothesis']}\n"
        f"Premise: {record['premise']}"
    )
    return Example(str(record["idx"]), text, ("Yes", "No"), int(label))


def _copa(record: dict) -> Example:
    question = {
        "cause": "What was the cause?",
        "effect": "What happened as a result?",
    }[record["question"]]
    text = (
        "Pick the more plausible alternative.\n"
        f"Premise: {record['premise']}\n"
        f"Question: {question}\n"
        f"Option 1: {record['choice1']}\n"
        f"Option 2: {record['choice2']}"
    )
    return Example(
        str(record["idx"]), text, (record["choice1"], record["choice2"]), int(record["label"])
    )


def _winogrande(record: dict) -> Example:
    text = (
        f"{record['sentence']}\n"
        "Replace the _ in the above sentence with the correct option:\n"
        f"- {record['option1']}\n"
        f"- {record['option2']}"
    )
    return Example(
        str(record["qID"]), text, (record["option1"], record["option2"]), int(record["answer"]) - 1
    )


@dataclass(frozen=True)
class _TaskSpec:
    folder: str
    files: dict[str, str]  # split name -> file name in the local layout
    hub: dict[str, tuple[str, str, str]]  # split name -> (hub path, config name, hub split)
    fields: tuple[str, ...]  # fields every labelled record must have
    template: Callable[[dict], Example]
    # field -> the values a labelled record may hold there (the label, and any field the template
    # maps through a table); anything else, SuperGLUE's unlabelled -1 included, is refused
    values: dict[str, tuple] = field(default_factory=dict)


_SPECS: dict[str, _TaskSpec] = {
    "rte": _TaskSpec(
        "rte",
        {"train": "train.jsonl", "validation": "val.jsonl"},
        {
            "train": ("aps/super_glue", "rte", "train"),
            "validation": ("aps/super_glue", "rte", "validation"),
        },
        ("premise", "hypothesis", "label", "idx"),
        _rte,
        {"label": (0, 1, "entailment", "not_entailment")},
    ),
    "copa": _TaskSpec(
        "copa",
        {"train": "train.jsonl", "validation": "val.jsonl"},
        {
            "train": ("aps/super_glue", "copa", "train"),
            "validation": ("aps/super_glue", "copa", "validation"),
        },
        ("premise", "choice1", "choice2", "question", "label", "idx"),
        _copa,
        {"label": (0, 1), "question": ("cause", "effect")},
    ),
    "winogrande": _TaskSpec(
        "winogrande",
        # "train" is the largest training set available locally (train_l, 10234 examples).
        {
            "train": "train_l.jsonl",
            "train_xs": "train_xs.jsonl",
            "train_s": "train_s.jsonl",
            "train_m": "train_m.jsonl",
            "train_l": "train_l.jsonl",
            "validation": "dev.jsonl",
        },
        {
            "train": ("allenai/winogrande", "winogrande_l", "train"),
            **{
                f"train_{s}": ("allenai/winogrande", f"winogrande_{s}", "train")
                for s in ("xs", "s", "m", "l")
            },
            "validation": ("allenai/winogrande", "winogrande_l", "validation"),
        },
        ("qID", "sentence", "option1", "option2", "answer"),
        _winogrande,
        {"answer": ("1", "2", 1, 2)},
    ),
}


def splits(task: str) -> tuple[str, ...]:
    """The split names `load_split` accepts for ``task``.

    Args:
        task: a task name from ``TASKS``.

    Returns:
        The split names, e.g. ``("train", "validation")``.

    Raises:
        TaskError: unknown task.
    """
    return tuple(_spec(task).files)


def _spec(task: str) -> _TaskSpec:
    if task not in _SPECS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return _SPECS[task]


def split_path(task: str, split: str, data_dir: str | Path) -> Path:
    """Path of the jsonl file holding ``split`` of ``task`` under ``data_dir``.

    Args:
        task: a task name from ``TASKS``.
        split: one of ``splits(task)``.
        data_dir: the data directory (the layout of ../shared/data).

    Returns:
        The path of the existing jsonl file.

    Raises:
        TaskError: unknown task or split, or the file is missing (the message gives the layout).
    """
    spec = _spec(task)
    if split not in spec.files:
        raise TaskError(
            f"unknown split {split!r} for task {task!r}; choose one of {', '.join(spec.files)}"
        )
    path = Path(data_dir) / spec.folder / spec.files[split]
    if not path.is_file():
        raise TaskError(f"data file {path} not found; {_LAYOUT}")
    return path


def _bad_value(record: dict, spec: _TaskSpec) -> str | None:
    """Why ``record`` is not a labelled record of ``spec``'s task (None: it is).

    Checked on the raw record so that the caller can name the file and line: a label outside
    the choices would otherwise index them from the end (-1) or fail in the template.
    """
    for name, allowed in spec.values.items():
        value = record.get(name)
        if isinstance(value, bool) or value not in allowed:
            hint = " (-1 marks an unlabelled record, as in a test split)" if value == -1 else ""
            return (
                f"{name}={value!r} is not a valid {spec.folder} {name}{hint}; a labelled "
                f"{spec.folder} record has {name} in {list(allowed)}: fix the record or use a "
                "labelled split"
            )
    return None


def _check_jsonl(path: Path, spec: _TaskSpec) -> int:
    """Parses every line of ``path`` so that a bad line is reported with its number."""
    fields = spec.fields
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(
                    f"{path}:{number}: malformed JSON line ({e.msg}); fix or replace the file"
                ) from None
            if not isinstance(record, dict):
                raise TaskError(
                    f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                )
            missing = [k for k in fields if k not in record or record[k] is None]
            if missing:
                raise TaskError(
                    f"{path}:{number}: record lacks field(s) {missing}; a labelled "
                    f"{path.parent.name} record needs {list(fields)}"
                )
            bad = _bad_value(record, spec)
            if bad:
                raise TaskError(f"{path}:{number}: {bad}")
            count += 1
    if count == 0:
        raise TaskError(f"{path} holds no records")
    return count


def load_split(task: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """Loads one split of a task as prompted examples, in file order.

    Args:
        task: one of `TASKS`.
        split: "train" or "validation" (Winogrande also "train_xs", "train_s", "train_m",
            "train_l"; its "train" is "train_l").
        data_dir: a directory in the layout of ``../shared/data``; None loads from the hub.

    Returns:
        The examples, in the order of the source file.

    Raises:
        TaskError: unknown task or split, missing file, malformed line (file and line number),
            record without a label or with one outside the task's choices (e.g. an unlabelled
            -1; file and line number).
    """
    spec = _spec(task)
    if split not in spec.files:
        raise TaskError(
            f"unknown split {split!r} for task {task!r}; choose one of {', '.join(spec.files)}"
        )
    import datasets  # heavy; only the data path needs it

    datasets.disable_progress_bars()
    if data_dir is not None:
        path = split_path(task, split, data_dir)
        _check_jsonl(path, spec)
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        name, config, hub_split = spec.hub[split]
        try:
            ds = datasets.load_dataset(name, config, split=hub_split)
        except (ConnectionError, OSError) as e:  # offline, unreachable, or not cached
            raise TaskError(
                f"could not load {task!r} split {split!r} from the Hugging Face hub ({name}: "
                f"{type(e).__name__}); pass --data-dir DIR (layout of ../shared/data) or set "
                "SIMFLUENCE_DATA_DIR"
            ) from None
        for i, record in enumerate(ds):  # the value checks of a local file, naming the record
            bad = _bad_value(dict(record), spec)
            if bad:
                raise TaskError(f"{task!r} split {split!r} (hub {name}), record {i}: {bad}")
    try:
        return [spec.template(dict(r)) for r in ds]
    except (KeyError, ValueError) as e:
        raise TaskError(f"task {task!r} split {split!r}: unexpected record value {e}") from None


@dataclass(frozen=True)
class Encoded:
    """Token ids of examples, unpadded.

    Attributes:
        inputs: per example int32 [L_in_i], ending with EOS (id 1).
        choices: per example, per choice int32 [L_c], ending with EOS.
        labels: int32 [n] index of the correct choice.
    """

    inputs: list[np.ndarray]
    choices: list[list[np.ndarray]]
    labels: np.ndarray

    @property
    def targets(self) -> list[np.ndarray]:
        """Token ids of the correct choice of each example.

        Returns:
            Per example int32 [L_c] (the choice at ``labels[i]``), ending with EOS.
        """
        return [c[int(y)] for c, y in zip(self.choices, self.labels, strict=True)]


def encode(
    tokenizer, examples: Sequence[Example], *, max_input_length: int, max_target_length: int
) -> Encoded:
    """Tokenizes examples; inputs and choices are truncated and always end with EOS.

    Args:
        tokenizer: a T5 tokenizer (appends EOS, id 1).
        examples: the examples.
        max_input_length: inputs longer than this are cut (the end of the text goes; EOS stays).
        max_target_length: likewise for every choice.

    Returns:
        The unpadded token ids.
    """

    def ids(texts: list[str], max_length: int) -> list[np.ndarray]:
        out = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in out]

    inputs = ids([e.input for e in examples], max_input_length)
    flat = [c for e in examples for c in e.choices]
    flat_ids = ids(flat, max_target_length)
    choices, k = [], 0
    for e in examples:
        choices.append(flat_ids[k : k + len(e.choices)])
        k += len(e.choices)
    labels = np.asarray([e.label for e in examples], dtype=np.int32)
    return Encoded(inputs, choices, labels)


def round_up(length: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``length`` (and >= ``multiple``).

    Args:
        length: a sequence length.
        multiple: the granularity (>= 1), e.g. ``ExperimentConfig.length_multiple``.

    Returns:
        The rounded length; at least ``multiple`` even for ``length`` 0.
    """
    return max(multiple, -(-length // multiple) * multiple)


def pad(seqs: Sequence[np.ndarray], length: int) -> Int[np.ndarray, "n length"]:
    """Right-pads id sequences with 0 into int32 [len(seqs), length].

    Args:
        seqs: n sequences of token ids, each int [L_i] with ``L_i <= length``.
        length: the padded width.

    Returns:
        int32 [n, length], pad id 0.

    Raises:
        ValueError: a sequence longer than ``length``.
    """
    out = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence of length {len(s)} does not fit in {length}")
        out[i, : len(s)] = s
    return out


def pad_choices(
    choices: Sequence[Sequence[np.ndarray]], length: int
) -> Int[np.ndarray, "n C length"]:
    """Pads per-example choices into int32 [n, C, length] (every example has C choices).

    Args:
        choices: per example, C sequences of token ids, each int [L_c] with ``L_c <= length``.
        length: the padded width.

    Returns:
        int32 [n, C, length], pad id 0.

    Raises:
        ValueError: examples with different numbers of choices, or a choice longer than
            ``length``.
    """
    n_choices = {len(c) for c in choices}
    if len(n_choices) != 1:
        raise ValueError(f"examples have different numbers of choices: {sorted(n_choices)}")
    c = n_choices.pop()
    out = np.zeros((len(choices), c, length), dtype=np.int32)
    for i, cs in enumerate(choices):
        out[i] = pad(cs, length)
    return out

"""Plain-text influence listings stay one line per row whatever the example texts hold."""

from simfluence.plots import format_influences


def test_multi_line_texts_are_listed_on_one_line_each():
    rows = [
        {"rank": 1, "train_index": 7, "removal_change": 0.25, "count": 3, "text": "a\nb\t c"},
        {"rank": 2, "train_index": 2, "removal_change": -0.5, "count": 1, "text": "d  e\n"},
    ]
    lines = format_influences(rows, 4, "premise\nhypothesis").splitlines()
    assert lines[0] == "test example 4: premise hypothesis"
    assert len(lines) == 3 + len(rows)
    assert lines[3].endswith("  a b c") and lines[4].endswith("  d e")

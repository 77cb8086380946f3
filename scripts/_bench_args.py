"""argparse types shared by the scripts/bench_*.py benchmarks: bad values fail at parse time.

Each raises ``argparse.ArgumentTypeError``, so argparse prints one line naming the flag, the
value and the accepted range, and exits with status 2.
"""

from __future__ import annotations

import argparse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: pass an integer >= 1")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass an integer >= 0")
    return value


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: pass a finite number >= 0")
    return value


def rate(text: str) -> float:
    """A dropout rate in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a rate in [0, 1), e.g. 0.1")
    return value


def fill_unset(args: argparse.Namespace, defaults: dict, on_gpu: bool) -> list[tuple[str, object]]:
    """Set every attribute of ``args`` still None to its default for the backend.

    Args:
        defaults: {attribute: (GPU value, CPU value)}.

    Returns:
        ``[(flag name, CPU value)]`` for the attributes set to their CPU value (empty on GPU),
        for the script's "CPU: small sizes" line.
    """
    filled = []
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
            if not on_gpu:
                filled.append((name.replace("_", "-"), cpu))
    return filled


def positive_int_list(text: str) -> list[int]:
    """A comma list of integers >= 1, e.g. ``8,32``."""
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a comma list of integers >= 1, e.g. 8,32")
    return [positive_int(x.strip()) for x in items]

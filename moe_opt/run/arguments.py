"""Checks of a tune's arguments that the session needs too (the batch sizes, as the API and the CLI give them)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import TuneError


def check_batch_sizes(batch_sizes: Any) -> list[int]:
    """Batch sizes as positive, distinct ints (strings of digits accepted, as the CLI passes them)."""
    import numbers
    import re

    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Iterable):
        raise TuneError(f"batch_sizes must be a list of positive integers such as [1, 16, 64], got {batch_sizes!r}")
    values = list(batch_sizes)
    if not values:
        raise TuneError("batch_sizes is empty; give positive integers such as 1,16,64")
    out = []
    for v in values:
        text = v.strip() if isinstance(v, str) else None
        if isinstance(v, bool) or not (isinstance(v, numbers.Integral) or text and re.fullmatch(r"[+-]?\d+", text)):
            raise TuneError(f"batch size {v!r} is not an integer; batch sizes are positive integers such as 1,16,64")
        m = int(v)
        if m < 1:
            raise TuneError(f"batch size {m} must be positive; batch sizes are integers >= 1")
        out.append(m)
    dups = sorted({m for m in out if out.count(m) > 1})
    if dups:
        raise TuneError(f"batch size(s) {', '.join(map(str, dups))} given twice; each batch size once")
    return out

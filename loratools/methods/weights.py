"""Per-module weights from ``--weight-pattern REGEX=W``: block weights (kohya's LBW) and per-layer weights.

A module's multiplier is the W of the first pattern (in the order given) that ``re.search``
finds in its name, 1 where none does; it multiplies every adapter's weight on that module, under
every method.  Patterns run through :mod:`loratools.patterns` (stdlib ``re`` under its CPU budget),
as config regexes do, since a command line can be as hostile as a config.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..errors import ArgumentError
from ..patterns import Job, first_matches

_SEARCH = ".*?(?:{})"  # re.match of this is re.search of the pattern


def parse_weight_pattern(text: str) -> tuple[str, float]:
    """``REGEX=W`` split at the last ``=``, the regex compiled and W a finite number; else :class:`ArgumentError`."""
    regex, sep, number = text.rpartition("=")
    try:
        weight = float(number)
    except ValueError:
        weight = math.nan
    if not sep or not regex or not math.isfinite(weight):
        raise ArgumentError(f"weight pattern must be REGEX=W with W a finite number, got {text!r}")
    try:
        re.compile(regex)
    except re.error as e:
        raise ArgumentError(f"weight pattern {regex!r} is not a valid regex: {e}") from None
    return regex, weight


def module_weights(patterns: Sequence[tuple[str, float]], names: Sequence[str]) -> dict[str, float]:
    """The multiplier of each name matched by some pattern (first match wins); names matched by none are absent."""
    if not patterns:
        return {}
    best = first_matches(Job("--weight-pattern", tuple(p for p, _ in patterns), tuple(names), template=_SEARCH))
    return {name: patterns[i][1] for name, i in zip(names, best, strict=True) if i >= 0}

"""Where the CLI writes, and how text from files and servers is made safe to show.

Tensor names, config strings and Hub messages come from outside: :func:`safe` escapes rich markup
and turns control characters (terminal escapes, newlines, NULs) into visible ``\\x1b``-style
escapes, so nothing read from a file can move the cursor, recolour the terminal or forge a line.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # pipes get full module names
err = Console(stderr=True, soft_wrap=True, highlight=False)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # lone surrogates cannot be encoded


def plain(text: object) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\n``): one printable line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def safe(text: object) -> str:
    """``text`` ready for a rich markup string: control characters escaped (:func:`plain`), markup escaped."""
    return escape(plain(text))


def emit_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (JSON escapes control characters itself)."""
    click.echo(json.dumps(data, indent=2, default=str))


def say(text: object) -> None:
    """One plain line on stdout, no markup or highlighting, control characters escaped."""
    out.print(plain(text), highlight=False, markup=False)


@contextmanager
def count_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar on stderr (items done of total, ETA) fed by a library ``progress(done, total)`` callback.

    None (no bar) unless ``enabled`` and stderr is a terminal, so pipes and logs get no bar frames.
    """
    if not (enabled and err.is_terminal):
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)

"""PEFT's module-name regexes, run exactly as PEFT runs them but within a time budget.

PEFT matches config regexes with the stdlib ``re`` (peft 0.21.2, ``peft/utils/other.py``
``match_target_against_key``: ``re.fullmatch(target_modules, key)``; ``get_pattern_key``: the first
key ``k`` with ``re.match(rf"(.*\\.)?({k})$", key)``).  A backtracking engine takes exponential time
on patterns such as ``(.*a){25}`` or ``(a+)+$`` against long names, and a config is hostile input,
so every match here runs the same ``re`` (so the answers are PEFT's, bit for bit) under a budget of
:data:`BUDGET_S` seconds of matching per pattern, summed over all names, and :data:`FIELD_BUDGET_S`
for all the regex patterns of one field; a pattern or field that exceeds it is refused with a
:class:`~loratools.errors.SpecError` (code ``pattern-too-slow``) naming the field (and the pattern).

The budget is CPU time (a ``SIGVTALRM`` interval timer, so a busy machine does not refuse a good
pattern): ``re`` checks for signals while it backtracks, so the handler's exception stops the match.
Off the main thread (or without ``SIGVTALRM``) the same computation runs in a child Python, whose
main thread can take the signal.

Speed: each pattern is compiled once (``re``'s own cache holds 512), and each name is matched once
per pattern.  Pattern keys that are plain module names (letters, digits, ``_``, ``-``, ``\\.`` and
``.``, optionally behind ``^``; what PEFT's EVA and loratools' own writers produce) are matched by
hash lookups of the one or two suffixes of the right length instead, with the same result, so
100k modules against a 1000-key ``rank_pattern`` cost seconds, not hours.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import LoratoolsError, SpecError

BUDGET_S = 1.0  # seconds of matching one pattern may use over all names (normal patterns: microseconds per name)
# Seconds all regex patterns of one field may use together: 1000 benign regex keys over 100k module
# names are 10^8 matches (about 140 s), which PEFT's first-match rule makes unavoidable with ``re``.
FIELD_BUDGET_S = 10.0
CODE = "pattern-too-slow"
SUFFIX_TEMPLATE = r"(.*\.)?({})$"  # peft 0.21.2 peft/utils/other.py get_pattern_key
# A pattern key made only of these tokens matches a fixed-length suffix and is looked up by hash.
_PLAIN_KEY = re.compile(r"\^?(?:[A-Za-z0-9_\-]|\\\.|\.)+")
_TOKEN = re.compile(r"\\\.|.")
_ANY = "\0"  # stands for an unescaped "." in a plain key; never a character of one
_CHILD = "import json, sys; job = json.load(sys.stdin); sys.path[:0] = job['path']; from loratools.patterns import _serve; _serve(job)"


class _Timeout(Exception):
    """Raised by the timer's signal handler inside a running match."""


class _Refused(Exception):
    """Pattern ``key`` ran past the budget on names such as ``name``."""

    def __init__(self, key: str, name: str):
        self.key, self.name = key, name
        super().__init__(key, name)


@dataclass(frozen=True)
class Job:
    """Match ``names`` against ``patterns`` (display keys) in order; the answer per name is the index
    of the first pattern that matches, or -1.

    ``template`` wraps each key into the regex actually run (``"{}"`` for the key itself); ``full``
    selects ``re.fullmatch`` over ``re.match``.  ``field`` names the config field in refusals.
    """

    field: str
    patterns: tuple[str, ...]
    names: tuple[str, ...]
    template: str = "{}"
    full: bool = False


def first_matches(job: Job) -> list[int]:
    """The index of the first pattern matching each name (-1: none); :class:`SpecError` past the budget."""
    if not job.patterns or not job.names:
        return [-1] * len(job.names)
    try:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGVTALRM"):
            return _solve(job)
        return _in_child(job)
    except _Refused as refused:
        raise too_slow(job.field, refused.key, refused.name) from None


def _solve(job: Job) -> list[int]:
    best = _plain_matches(job) if job.template == SUFFIX_TEMPLATE else [-1] * len(job.names)
    plain = _plain_indices(job) if job.template == SUFFIX_TEMPLATE else set()
    deadline = time.process_time() + FIELD_BUDGET_S
    for i, key in enumerate(job.patterns):
        if i in plain:
            continue
        todo = [n for n, b in enumerate(best) if b < 0 or b > i]
        if not todo:
            break
        if time.process_time() > deadline:
            raise SpecError(
                f"its {len(job.patterns) - len(plain)} regex patterns take over {FIELD_BUDGET_S:g} s together to match "
                f"{len(job.names)} module names; write plain module names (dots escaped) or fewer, broader patterns",
                key=job.field,
                code=CODE,
            )
        try:
            compiled = re.compile(job.template.format(key))
        except re.error as err:
            raise SpecError(f"pattern {key!r} is not a valid regular expression ({err})", key=job.field, code="config-schema") from None
        for n in _budgeted(key, compiled.fullmatch if job.full else compiled.match, [job.names[n] for n in todo], todo):
            best[n] = i
    return best


def _budgeted(key: str, run: Callable[[str], object], names: list[str], ids: list[int]) -> list[int]:
    """The ``ids`` of the ``names`` that ``run`` matches, within :data:`BUDGET_S`; refuses ``key`` past it."""
    previous = signal.signal(signal.SIGVTALRM, _alarm)
    old_delay, _ = signal.setitimer(signal.ITIMER_VIRTUAL, BUDGET_S)
    start = time.process_time()
    name = ""
    try:
        hits = []
        for name, n in zip(names, ids, strict=True):
            if run(name) is not None:
                hits.append(n)
        return hits
    except _Timeout:
        raise _Refused(key, name) from None
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)
        if old_delay:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_VIRTUAL, max(old_delay - (time.process_time() - start), 1e-3))


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def too_slow(field: str, key: str, name: str) -> SpecError:
    """The one-line refusal of a pattern that ran past the budget."""
    shown = name if len(name) <= 80 else name[:77] + "..."
    return SpecError(
        f"pattern {key!r} takes over {BUDGET_S:g} s to match module names such as {shown!r} (catastrophic backtracking); "
        "rewrite it without nested or overlapping repeats",
        key=field,
        code=CODE,
    )


def _plain_indices(job: Job) -> set[int]:
    return {i for i, key in enumerate(job.patterns) if _PLAIN_KEY.fullmatch(key)}


def _plain_matches(job: Job) -> list[int]:
    """First plain key matching each name under ``(.*\\.)?(KEY)$``, by hash lookups (-1: none).

    For a plain key of L tokens ``re.match`` succeeds exactly when, for the suffix start j = len - L
    (or len - 1 - L when the name ends in a newline, which ``$`` may precede), j == 0 or the name
    has a "." at j - 1 and no newline before it (``.*`` stops at newlines); with ``^``, j == 0; and
    each token matches its character (``.`` any but a newline, others literally).
    """
    groups: dict[tuple[int, bool, tuple[int, ...]], dict[str, int]] = {}
    for i in sorted(_plain_indices(job)):
        key = job.patterns[i]
        anchored = key.startswith("^")
        tokens = _TOKEN.findall(key[1:] if anchored else key)
        wild = tuple(p for p, t in enumerate(tokens) if t == ".")
        text = "".join(_ANY if t == "." else t[-1] for t in tokens)
        groups.setdefault((len(tokens), anchored, wild), {}).setdefault(text, i)
    best = []
    for name in job.names:
        found = -1
        starts = [len(name)] + ([len(name) - 1] if name.endswith("\n") else [])
        for (length, anchored, wild), table in groups.items():
            for end in starts:
                j = end - length
                if j < 0 or (j > 0 and (anchored or name[j - 1] != "." or "\n" in name[:j])):
                    continue
                chars = list(name[j:end])
                if any(chars[p] == "\n" for p in wild):
                    continue
                for p in wild:
                    chars[p] = _ANY
                i = table.get("".join(chars), -1)
                if i >= 0 and (found < 0 or i < found):
                    found = i
        best.append(found)
    return best


def _in_child(job: Job) -> list[int]:
    """:func:`_solve` in a child Python (whose main thread can take the signal); same answers, same refusals."""
    payload = json.dumps({"path": sys.path, "job": job.__dict__ | {"patterns": list(job.patterns), "names": list(job.names)}})
    limit = min(BUDGET_S * (len(job.patterns) + 1), FIELD_BUDGET_S + BUDGET_S) + 30  # backstop only: the child enforces both budgets
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise SpecError(f"matching its patterns took over {limit:g} s; simplify them", key=job.field, code=CODE) from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise LoratoolsError(f"pattern matcher child failed (exit {done.returncode}): {done.stderr.strip()[-300:]}") from None
    if "refused" in answer:
        raise _Refused(*answer["refused"])
    return answer["best"]


def _serve(payload: dict) -> None:
    """Child side of :func:`_in_child`: solve the job from stdin, answer on stdout as JSON."""
    spec = payload["job"]
    job = Job(spec["field"], tuple(spec["patterns"]), tuple(spec["names"]), spec["template"], spec["full"])
    try:
        answer: dict = {"best": _solve(job)}
    except _Refused as refused:
        answer = {"refused": [refused.key, refused.name]}
    sys.stdout.write(json.dumps(answer))


def matches(field: str, pattern: str, names: Sequence[str], *, full: bool = True) -> list[bool]:
    """Whether ``pattern`` (full)matches each of ``names``, as ``re.fullmatch``/``re.match`` would say."""
    best = first_matches(Job(field, (pattern,), tuple(names), full=full))
    return [b == 0 for b in best]

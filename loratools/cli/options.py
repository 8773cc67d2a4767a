"""Option groups that several commands share, declared once so their names, choices and help agree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..runtimes.registry import RUNTIME_CHOICES
from ..spec import MAJORITY_SIGN_CHOICES, METHOD_CHOICES


def for_option(f: Any) -> Any:
    """--for RUNTIME (repeatable, or all): write the output so those runtimes apply it exactly."""
    return click.option(
        "--for",
        "runtimes",
        type=click.Choice(RUNTIME_CHOICES),
        multiple=True,
        help="Make the output exact in this runtime too (repeatable; all: every runtime); refused if it cannot be.",
    )(f)


def method_options(*, method_help: str, seed_help: str) -> Callable[[Any], Any]:
    """--method, --density, --epsilon, --majority-sign, --weight-pattern and --seed of `add` and `merge`."""
    options = (
        click.option("--method", type=click.Choice(METHOD_CHOICES), default="task_arithmetic", show_default=True, help=method_help),
        click.option(
            "--density", type=float, help="Kept fraction of each ΔW's entries, in (0, 1] (ties, magnitude_prune, dare, dare_ties, della)."
        ),
        click.option(
            "--epsilon",
            type=float,
            help="DELLA's keep probabilities: density ± epsilon, smallest to largest |ΔW| per row (della*; default 0.15).",
        ),
        click.option(
            "--majority-sign", type=click.Choice(MAJORITY_SIGN_CHOICES), help="Sign election (ties, dare_ties, della; default total)."
        ),
        click.option(
            "--weight-pattern",
            "weight_patterns",
            multiple=True,
            metavar="REGEX=W",
            help="Multiply every adapter's weight by W on modules whose name REGEX finds (first pattern wins; repeatable).",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help=seed_help),
    )

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply

"""`loratools validate`: spec v1 checks, and with --base the merge planner's verdict."""

from __future__ import annotations

import sys

import click

import loratools

from ..runtimes.registry import RUNTIME_CHOICES
from .console import emit_json, out, safe
from .errors import EXIT_INVALID


@click.command()
@click.argument("path")
@click.option("--base", help="Base checkpoint (model dir or .safetensors): check the adapter merges into it (the planner merge runs).")
@click.option(
    "--for",
    "runtimes",
    type=click.Choice(RUNTIME_CHOICES),
    multiple=True,
    help="Check how this runtime would apply it (repeatable; all: every runtime); exit 1 if one would apply it wrongly or refuse it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(path: str, base: str | None, runtimes: tuple[str, ...], as_json: bool) -> None:
    """Check the adapter at PATH against spec v1; exit 1 if it is invalid.

    With --base it passes exactly when `loratools merge BASE PATH` would.  With --for RUNTIME it
    reports every module that runtime would scale differently (with the factor) and every feature
    it would refuse or drop.

    \b
    Examples:
      loratools validate ./adapter
      loratools validate ./adapter --base ./base-model --json
      loratools validate ./adapter --for vllm --for llama.cpp
    """
    report = loratools.validate(path, base=base, runtimes=runtimes)
    if as_json:
        emit_json(report.to_dict())
    else:
        for p in report.problems:
            color = "red" if p.severity == "error" else "yellow"
            out.print(f"[{color}]{p.severity}[/] [bold]{p.code}[/] {safe(p.where)}: {safe(p.message)}", highlight=False)
        verdict = "[green]valid[/]" if report.ok else f"[red]invalid[/] ({len(report.errors)} error(s))"
        out.print(f"{safe(path)}: {verdict}, {len(report.warnings)} warning(s)", highlight=False)
    if not report.ok:
        sys.exit(EXIT_INVALID)

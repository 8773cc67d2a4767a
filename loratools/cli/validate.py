"""`loratools validate`: spec v1 checks, and with --base the merge planner's verdict."""

from __future__ import annotations

import sys

import click

import loratools

from .console import emit_json, out, safe
from .errors import EXIT_INVALID


@click.command()
@click.argument("path")
@click.option("--base", help="Base checkpoint (model dir or .safetensors): check the adapter merges into it (the planner merge runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(path: str, base: str | None, as_json: bool) -> None:
    """Check the adapter at PATH against spec v1; exit 1 if it is invalid.

    With --base it passes exactly when `loratools merge BASE PATH` would.

    \b
    Examples:
      loratools validate ./adapter
      loratools validate ./adapter --base ./base-model --json
    """
    report = loratools.validate(path, base=base)
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

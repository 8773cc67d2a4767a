"""The ``loratools`` command line: parse options, call one library function, render the result.

No math or file-format logic lives here.  Errors map to one line on stderr and an exit code:

  0  success                 1  the adapter is invalid (validate) or a check failed
  2  bad usage (options)     3  bad input or output (unreadable file, existing output, ...)
  4  Hub or network error    70 internal error (a bug: rerun with --debug and report it)
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import traceback
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .adapter import load
from .atomic import check_output
from .errors import ArgumentError, HubError, LoratoolsError
from .spectrum import ENERGY_LEVELS, plot_spectrum, spectra
from .summary import summarize
from .validate import validate as validate_adapter

# On exit CPython runs one last full GC over every object alive, torch's ~10^6 among them
# (measured: 0.4 s of a 1.7 s `import torch` process on 2 cores).  The CLI process owns nothing
# that needs it, so everything is frozen out of that pass.
atexit.register(gc.freeze)

EXIT_INVALID, EXIT_USAGE, EXIT_INPUT, EXIT_HUB, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 4, 70, 130

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # pipes get full module names
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int, *, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns every exception into one stderr line and an exit code (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_INTERRUPTED))  # unwinds atomic outputs
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except HubError as e:
            _fail(str(e), EXIT_HUB, debug=_debug(ctx))
        except ArgumentError as e:
            _fail(str(e), EXIT_USAGE, debug=_debug(ctx))
        except LoratoolsError as e:
            _fail(str(e), EXIT_INPUT, debug=_debug(ctx))
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", EXIT_INTERRUPTED, debug=_debug(ctx))
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}", EXIT_INPUT, debug=_debug(ctx))
        except Exception as e:  # noqa: BLE001 - the one place that must catch everything
            _fail(
                f"internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback and report it)",
                EXIT_INTERNAL,
                debug=_debug(ctx),
            )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (or set LORATOOLS_DEBUG=1).")
def main(debug: bool) -> None:
    """Check, shrink, combine, bake in and publish LoRA adapters.

    \b
    Examples:
      loratools validate ./my-adapter --base ./Llama-3-8B
      loratools inspect ./my-adapter --spectrum
      loratools resize ./my-adapter --rank 8 -o ./my-adapter-r8
      loratools add ./style ./subject -w 0.7 -w 0.5 -o ./combined
      loratools merge ./Llama-3-8B ./my-adapter -o ./Llama-3-8B-merged
      loratools convert my_lora.safetensors --to peft --base ./sd15.safetensors -o ./my-lora
      loratools push ./my-adapter me/my-adapter
      loratools pull me/my-adapter@main -o ./my-adapter

    Exit codes: 0 ok, 1 invalid adapter, 2 bad usage, 3 bad input/output,
    4 Hub/network error, 70 internal error, 130 interrupted.
    """
    # --debug is read back from ctx.params by _Group.invoke when it reports an error


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@main.command()
@click.argument("path")
@click.option("--base", help="Base checkpoint (model dir or .safetensors): check every module maps to a tensor of ΔW's shape.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(path: str, base: str | None, as_json: bool) -> None:
    """Check the adapter at PATH against spec v1; exit 1 if it is invalid.

    \b
    Examples:
      loratools validate ./adapter
      loratools validate ./adapter --base ./base-model --json
    """
    report = validate_adapter(path, base=base)
    if as_json:
        emit_json(report.to_dict())
    else:
        for p in report.problems:
            color = "red" if p.severity == "error" else "yellow"
            out.print(f"[{color}]{p.severity}[/] [bold]{p.code}[/] {escape(p.where)}: {escape(p.message)}", highlight=False)
        verdict = "[green]valid[/]" if report.ok else f"[red]invalid[/] ({len(report.errors)} error(s))"
        out.print(f"{escape(path)}: {verdict}, {len(report.warnings)} warning(s)", highlight=False)
    if not report.ok:
        sys.exit(EXIT_INVALID)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--spectrum", is_flag=True, help="Show each module's singular values and the ranks keeping 90/99/99.9% of ‖ΔW‖².")
@click.option("--plot", "plot_path", metavar="PNG", help="With --spectrum: also write a PNG of kept energy versus rank (needs matplotlib).")
@click.option("--force", is_flag=True, help="Overwrite an existing --plot file.")
def inspect(path: str, as_json: bool, spectrum: bool, plot_path: str | None, force: bool) -> None:
    """Show what is inside the adapter at PATH: modules, ranks, scales, ‖ΔW‖ and totals.

    \b
    Examples:
      loratools inspect ./adapter
      loratools inspect ./adapter --spectrum --plot spectrum.png
    """
    if spectrum or plot_path:
        _show_spectrum(path, as_json, plot_path, force)
        return
    summary = summarize(load(path))
    if as_json:
        emit_json(summary.to_dict())
        return
    table = Table(title=escape(path), show_lines=False)
    for col in ("module", "kind", "out x in", "rank", "alpha", "scale", "dtype", "‖ΔW‖_F"):
        table.add_column(col, justify="right" if col not in ("module", "kind", "dtype") else "left")
    for m in summary.modules:
        kind = m.kind + (" +DoRA" if m.dora else "")
        table.add_row(
            escape(m.module),
            kind,
            " x ".join(map(str, m.shape)),
            str(m.rank),
            f"{m.alpha:g}",
            f"{m.scale:.4g}",
            m.dtype,
            f"{m.delta_norm:.4g}",
        )
    out.print(table)
    out.print(
        f"modules: {len(summary.modules)}  parameters: {summary.num_params:,}  bytes: {summary.num_bytes:,}\n"
        f"targets: {summary.targets}\nbase model: {summary.base_model}\nspec version: {summary.spec_version}",
        highlight=False,
        markup=False,
    )


def _show_spectrum(path: str, as_json: bool, plot_path: str | None, force: bool) -> None:
    """``inspect --spectrum``: singular values per module, ranks per energy level, optional PNG."""
    if plot_path:
        check_output(plot_path, force=force)
    found = spectra(load(path))
    if plot_path:
        plot_spectrum(found, plot_path, force=force)
    if as_json:
        emit_json({"modules": [s.to_dict() for s in found], **({"plot": plot_path} if plot_path else {})})
        return
    table = Table(title=f"{escape(path)}: singular values of ΔW")
    table.add_column("module")
    table.add_column("rank", justify="right")
    for level in ENERGY_LEVELS:
        table.add_column(f"rank @{level:.1%}", justify="right")
    table.add_column("σ₁, σ₂, ...")
    for s in found:
        shown = ", ".join(f"{v:.3g}" for v in s.singular_values[:8]) + (", ..." if len(s.singular_values) > 8 else "")
        table.add_row(escape(s.module), str(s.rank), *(str(s.rank_for(level)) for level in ENERGY_LEVELS), shown)
    out.print(table)
    if plot_path:
        out.print(f"wrote {escape(plot_path)}", highlight=False)


# Each command family lives in its own module and registers itself on ``main`` when imported.
from . import cli_arith, cli_formats, cli_hub, cli_merge  # noqa: E402, F401

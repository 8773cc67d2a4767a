"""The ``loratools`` command line: parse options, call one library function, render the result.

No math or file-format logic lives here.  Errors map to one line on stderr and an exit code:

  0  success                 1  the adapter is invalid (validate) or a check failed
  2  bad usage (options)     3  bad input or output (unreadable file, existing output, ...)
  4  Hub or network error    70 internal error (a bug: rerun with --debug and report it)
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .adapter import Adapter, load, save
from .arith import ResizeRow, add, resize, scale, subtract
from .atomic import check_output
from .errors import ArgumentError, HubError, LoratoolsError
from .spectrum import ENERGY_LEVELS, plot_spectrum, spectra
from .summary import summarize
from .validate import validate as validate_adapter

EXIT_INVALID, EXIT_USAGE, EXIT_INPUT, EXIT_HUB, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 4, 70, 130

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _debug() -> bool:
    return os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> None:
    if _debug():
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
            _fail(str(e), EXIT_HUB)
        except ArgumentError as e:
            _fail(str(e), EXIT_USAGE)
        except LoratoolsError as e:
            _fail(str(e), EXIT_INPUT)
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", EXIT_INTERRUPTED)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}", EXIT_INPUT)
        except Exception as e:  # noqa: BLE001 - the one place that must catch everything
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback and report it)", EXIT_INTERNAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (or set LORATOOLS_DEBUG=1).")
def main(debug: bool) -> None:
    """Check, shrink, combine, bake in and publish LoRA adapters.

    \b
    Examples:
      loratools validate ./my-adapter --base ./Llama-3-8B
      loratools inspect ./my-adapter --json

    Exit codes: 0 ok, 1 invalid adapter, 2 bad usage, 3 bad input/output,
    4 Hub/network error, 70 internal error, 130 interrupted.
    """
    if debug:
        os.environ["LORATOOLS_DEBUG"] = "1"


def _emit_json(data: Any) -> None:
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
        _emit_json(report.to_dict())
    else:
        for p in report.problems:
            color = "red" if p.severity == "error" else "yellow"
            out.print(f"[{color}]{p.severity}[/] [bold]{p.code}[/] {p.where}: {p.message}", highlight=False)
        verdict = "[green]valid[/]" if report.ok else f"[red]invalid[/] ({len(report.errors)} error(s))"
        out.print(f"{path}: {verdict}, {len(report.warnings)} warning(s)", highlight=False)
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
        _emit_json(summary.to_dict())
        return
    table = Table(title=path, show_lines=False)
    for col in ("module", "kind", "out x in", "rank", "alpha", "scale", "dtype", "‖ΔW‖_F"):
        table.add_column(col, justify="right" if col not in ("module", "kind", "dtype") else "left")
    for m in summary.modules:
        kind = m.kind + (" +DoRA" if m.dora else "")
        table.add_row(m.module, kind, " x ".join(map(str, m.shape)), str(m.rank), f"{m.alpha:g}", f"{m.scale:.4g}", m.dtype, f"{m.delta_norm:.4g}")
    out.print(table)
    out.print(
        f"modules: {len(summary.modules)}  parameters: {summary.num_params:,}  bytes: {summary.num_bytes:,}\n"
        f"targets: {summary.targets}\nbase model: {summary.base_model}\nspec version: {summary.spec_version}",
        highlight=False,
    )


# --- adapter arithmetic: add, scale, subtract, resize (issue 4) ---

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _output_options(f: Any) -> Any:
    """-o/--output, --dtype, --force and --json, shared by every command that writes an adapter."""
    f = click.option("--json", "as_json", is_flag=True, help="Print the result (and any resize report) as JSON.")(f)
    f = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(f)
    f = click.option("--dtype", type=click.Choice(list(_DTYPES)), help="Write factors in this dtype (default: the inputs').")(f)
    return click.option("-o", "--output", required=True, metavar="OUT", help="Output adapter directory (or .safetensors file).")(f)


def _write(result: Adapter, output: str, force: bool, as_json: bool, rows: list[ResizeRow] | None = None) -> None:
    save(result, output, force=force)
    ranks = sorted({m.rank for m in result.modules.values()})
    if as_json:
        _emit_json({
            "output": output, "modules": len(result.modules), "ranks": ranks, "num_params": result.num_params,
            **({"report": [r.to_dict() for r in rows]} if rows is not None else {}),
        })
        return
    if rows is not None:
        table = Table(title="resize")
        for col in ("module", "old rank", "new rank", "kept energy", "rel. error"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for r in rows:
            table.add_row(r.module, str(r.old_rank), str(r.new_rank), f"{r.kept_energy:.6f}", f"{r.rel_error:.3e}")
        out.print(table)
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    out.print(f"wrote {escape(output)}: {len(result.modules)} modules, rank {rank_text}, {result.num_params:,} parameters", highlight=False)


def _dtype(name: str | None) -> torch.dtype | None:
    return _DTYPES[name] if name else None


@main.command("add")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight of each input, in order (one per input; default 1).")
@click.option("--rank", type=int, help="Compress the sum to this rank (exact truncated SVD).")
@_output_options
def add_cmd(
    adapters: tuple[str, ...], weights: tuple[float, ...], rank: int | None, output: str, dtype: str | None, force: bool, as_json: bool
) -> None:
    """Add adapters exactly: ΔW = Σ wᵢ·ΔWᵢ, by concatenating factors (rank = Σ rᵢ).

    \b
    Examples:
      loratools add style/ subject/ -o combined/
      loratools add a/ b/ -w 0.7 -w 0.3 --rank 16 -o mix/
    """
    if len(adapters) < 2:
        raise click.UsageError("add needs at least two adapters (use `loratools scale` for one)")
    check_output(output, force=force)
    result = add(*(load(p) for p in adapters), weights=weights or None, dtype=_dtype(dtype))
    rows = None
    if rank is not None:
        result, rows = resize(result, rank, dtype=_dtype(dtype))
    _write(result, output, force, as_json, rows)


@main.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("adapter")
@click.argument("factor", type=float)
@_output_options
def scale_cmd(adapter: str, factor: float, output: str, dtype: str | None, force: bool, as_json: bool) -> None:
    """Multiply the adapter's ΔW by FACTOR (negative allowed: `loratools scale a/ -0.5 -o b/`).

    \b
    Examples:
      loratools scale ./adapter 0.5 -o ./half
      loratools scale ./adapter -1 -o ./negated      (or: ... -o ./negated -- -1)
    """
    check_output(output, force=force)
    _write(scale(load(adapter), factor, dtype=_dtype(dtype)), output, force, as_json)


@main.command("subtract")
@click.argument("a")
@click.argument("b")
@_output_options
def subtract_cmd(a: str, b: str, output: str, dtype: str | None, force: bool, as_json: bool) -> None:
    """Subtract adapters exactly: ΔW = ΔW_A − ΔW_B (rank r_A + r_B).

    \b
    Example:
      loratools subtract finetuned/ base-task/ -o difference/
    """
    check_output(output, force=force)
    _write(subtract(load(a), load(b), dtype=_dtype(dtype)), output, force, as_json)


@main.command("resize")
@click.argument("adapter")
@click.option("--rank", type=int, help="Keep this rank in every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F² (e.g. 0.99).")
@click.option("--max-rel-error", type=float, help="Per module, the smallest rank with ‖ΔW−ΔW_k‖_F/‖ΔW‖_F <= this (e.g. 0.05).")
@click.option("--sv-ratio", type=float, help="Per module, keep singular values >= σ₁/RATIO (e.g. 20).")
@_output_options
def resize_cmd(
    adapter: str, rank: int | None, energy: float | None, max_rel_error: float | None, sv_ratio: float | None,
    output: str, dtype: str | None, force: bool, as_json: bool,
) -> None:
    """Shrink the adapter by an exact truncated SVD of each ΔW (from the factors; optimal in ‖·‖_F).

    Give exactly one of --rank, --energy, --max-rel-error, --sv-ratio.  Prints, for each module,
    the old and new rank, the kept energy and the relative error.

    \b
    Examples:
      loratools resize ./adapter --rank 8 -o ./adapter-r8
      loratools resize ./adapter --energy 0.99 -o ./adapter-e99 --json
    """
    check_output(output, force=force)
    result, rows = resize(load(adapter), rank, energy=energy, max_rel_error=max_rel_error, sv_ratio=sv_ratio, dtype=_dtype(dtype))
    _write(result, output, force, as_json, rows)


def _show_spectrum(path: str, as_json: bool, plot_path: str | None, force: bool) -> None:
    """``inspect --spectrum``: singular values per module, ranks per energy level, optional PNG."""
    if plot_path:
        check_output(plot_path, force=force)
    found = spectra(load(path))
    if plot_path:
        plot_spectrum(found, plot_path, force=force)
    if as_json:
        _emit_json({"modules": [s.to_dict() for s in found], **({"plot": plot_path} if plot_path else {})})
        return
    table = Table(title=f"{escape(path)}: singular values of ΔW")
    table.add_column("module")
    table.add_column("rank", justify="right")
    for level in ENERGY_LEVELS:
        table.add_column(f"rank @{level:.1%}", justify="right")
    table.add_column("σ₁, σ₂, ...")
    for s in found:
        shown = ", ".join(f"{v:.3g}" for v in s.singular_values[:8]) + (", ..." if len(s.singular_values) > 8 else "")
        table.add_row(s.module, str(s.rank), *(str(s.rank_for(level)) for level in ENERGY_LEVELS), shown)
    out.print(table)
    if plot_path:
        out.print(f"wrote {escape(plot_path)}", highlight=False)

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from . import __version__
from .adapter import load
from .errors import HubError, LoratoolsError
from .merge import DTYPE_CHOICES, MergeResult
from .merge import merge as merge_checkpoint
from .merge import unmerge as unmerge_checkpoint
from .summary import summarize
from .validate import validate as validate_adapter

EXIT_INVALID, EXIT_INPUT, EXIT_HUB, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 3, 4, 70, 130

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def _debug() -> bool:
    return os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> None:
    if _debug():
        traceback.print_exc()
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
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
def inspect(path: str, as_json: bool) -> None:
    """Show what is inside the adapter at PATH: modules, ranks, scales, ‖ΔW‖ and totals.

    \b
    Example:
      loratools inspect ./adapter
    """
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


@contextmanager
def _byte_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar on stderr (bytes, rate, ETA) fed by a library ``progress(done, total)`` callback."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _merge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where to compute: auto uses CUDA when present."),
        click.option("--dtype", type=click.Choice(list(DTYPE_CHOICES)), default="keep", show_default=True,
                     help="Dtype of the output's floating tensors (keep: as stored in the input)."),
        click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete)."),
        click.option("--fsync", is_flag=True, help="Flush the output to stable storage before it appears."),
        click.option("--quiet", is_flag=True, help="No progress bar or summary."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    )):
        fn = option(fn)
    return fn


def _report_merge(result: MergeResult, verb: str, quiet: bool, as_json: bool) -> None:
    if as_json:
        _emit_json(result.to_dict())
    elif not quiet:
        rate = result.bytes_written / 2**30 / max(result.seconds, 1e-9)
        replaced = f", {len(result.replaced)} replaced" if result.replaced else ""
        out.print(
            f"{verb} {len(result.merged)} of {result.tensors} tensors{replaced} -> {result.out} "
            f"({result.bytes_written / 2**30:.2f} GiB in {result.seconds:.1f} s, {rate:.2f} GiB/s, {result.device})",
            highlight=False,
        )


@main.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", help="Output (default: <base>-merged beside BASE). Never inside BASE.")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order (repeat: -w 0.7 -w 0.3).")
@_merge_options
def merge(base: str, adapters: tuple[str, ...], out: str | None, weights: tuple[float, ...], device: str, dtype: str,
          force: bool, fsync: bool, quiet: bool, as_json: bool) -> None:
    """Bake ADAPTER(s) into the BASE checkpoint: W' = W + Σ w·s·B·A, streamed tensor by tensor.

    BASE is a model directory (model.safetensors or shards + index) or one .safetensors file; the
    output mirrors it (same shards, order, dtypes, index, config and tokenizer files).  Matches PEFT's
    merge_and_unload, incl. rsLoRA, rank/alpha patterns, fan_in_fan_out, conv, embeddings, lora_bias,
    DoRA and modules_to_save.  Memory stays around the size of the largest tensor.

    \b
    Examples:
      loratools merge ./Llama-3-8B ./my-adapter
      loratools merge ./base ./a ./b -w 0.7 -w 0.3 -o ./base-ab --dtype bf16
    """
    with _byte_progress("merging", not (quiet or as_json)) as progress:
        result = merge_checkpoint(base, list(adapters), weights=weights or None, out=out, device=device,  # type: ignore[arg-type]
                                  dtype=dtype, force=force, fsync=fsync, progress=progress)  # type: ignore[arg-type]
    _report_merge(result, "merged", quiet, as_json)


@main.command()
@click.argument("merged")
@click.argument("adapter")
@click.option("-o", "--out", required=True, help="Output checkpoint (required: never the input).")
@_merge_options
def unmerge(merged: str, adapter: str, out: str, device: str, dtype: str, force: bool, fsync: bool, quiet: bool, as_json: bool) -> None:
    """Take ADAPTER back out of the MERGED checkpoint: W = W' − s·B·A.

    Exact up to rounding: bf16/fp16 weights may come back one ulp off.  DoRA and modules_to_save
    merges cannot be undone and are refused.

    \b
    Example:
      loratools unmerge ./base-merged ./my-adapter -o ./base-again
    """
    with _byte_progress("unmerging", not (quiet or as_json)) as progress:
        result = unmerge_checkpoint(merged, adapter, out=out, device=device, dtype=dtype, force=force, fsync=fsync,  # type: ignore[arg-type]
                                    progress=progress)
    _report_merge(result, "unmerged", quiet, as_json)

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
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from . import __version__
from .adapter import Adapter, load
from .arith import ResizeRow, add, resize, scale, subtract
from .atomic import check_output
from .convert import TARGETS, Target, save_as
from .convert import convert as convert_adapter
from .diff import diff as diff_adapters
from .errors import ArgumentError, HubError, LoratoolsError
from .extract import extract as extract_adapter
from .hub import pull as pull_adapter
from .hub import push as push_adapter
from .merge import DTYPE_CHOICES, Device, Dtype, MergeResult
from .merge import merge as merge_checkpoint
from .merge import unmerge as unmerge_checkpoint
from .spectrum import ENERGY_LEVELS, plot_spectrum, spectra
from .summary import summarize
from .validate import validate as validate_adapter

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
        _emit_json(summary.to_dict())
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


@main.command()
@click.argument("adapter")
@click.argument("repo_id")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing); default main.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against the branch instead of committing to it.")
@click.option("-m", "--message", help="Commit message.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` token). Never printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(
    adapter: str, repo_id: str, revision: str | None, private: bool, create_pr: bool, message: str | None, token: str | None, as_json: bool
) -> None:
    """Validate ADAPTER and publish it to the Hub repo REPO_ID with a model card, in one commit.

    An invalid adapter is refused (exit 3, see `loratools validate`).  The repo's README.md keeps
    everything except loratools' front matter keys and its marked summary section.

    \b
    Examples:
      loratools push ./my-adapter me/my-adapter
      loratools push ./my-adapter me/my-adapter --revision experiment -m "rank 8 run"
      loratools push ./my-adapter org/adapter --create-pr --json
    """
    result = push_adapter(adapter, repo_id, revision=revision, private=private, create_pr=create_pr, message=message, token=token)
    if as_json:
        _emit_json(result.to_dict())
        return
    out.print(f"pushed {adapter} to {result.url} ({result.revision})", highlight=False, markup=False)
    out.print(f"commit: {result.commit_sha}", highlight=False, markup=False)
    if result.pr_url:
        out.print(f"pull request: {result.pr_url}", highlight=False, markup=False)


@main.command()
@click.argument("ref", metavar="REPO_ID[@REVISION]")
@click.option("-o", "--out", "--output", "out_dir", metavar="DIR", help="Where to put the adapter (default: ./NAME for owner/NAME).")
@click.option("--offline", is_flag=True, help="Use the huggingface_hub cache only (also: HF_HUB_OFFLINE=1).")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` token). Never printed.")
@click.option("--force", is_flag=True, help="Replace DIR if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(ref: str, out_dir: str | None, offline: bool, token: str | None, force: bool, as_json: bool) -> None:
    """Download the adapter REPO_ID[@REVISION], verify it, and write it to DIR.

    Only adapter_config.json and adapter_model.safetensors are fetched; they must pass the spec checks
    and their recorded checksum before DIR appears.  Any ADAPTER argument also accepts
    hf://owner/name[@revision].

    \b
    Examples:
      loratools pull me/my-adapter
      loratools pull me/my-adapter@experiment -o ./exp --force
      loratools pull me/my-adapter --offline --json
      loratools inspect hf://me/my-adapter@main
    """
    result = pull_adapter(ref, out=out_dir, offline=offline, token=token, force=force)
    if as_json:
        _emit_json(result.to_dict())
        return
    out.print(f"pulled {result.repo_id}@{result.revision} into {result.path}", highlight=False, markup=False)
    out.print(f"commit: {result.commit_sha}", highlight=False, markup=False)


@main.command()
@click.argument("src")
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="Output format: peft (spec v1) or kohya (sd-scripts file).")
@click.option("--base", help="Base checkpoint: maps kohya's flattened names onto its module paths; every module must fit it.")
@click.option(
    "-o", "--out", "--output", "output", required=True, help="Output: a directory or .safetensors for peft; a .safetensors file for kohya."
)
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
def convert(src: str, to: Target, base: str | None, output: str, force: bool) -> None:
    """Convert the adapter at SRC (PEFT, kohya or diffusers) to another format.

    \b
    Examples:
      loratools convert my_lora.safetensors --to peft --base ./unet.safetensors -o ./my-lora
      loratools convert ./my-lora --to kohya -o my_lora.safetensors
    """
    adapter = convert_adapter(src, output, to=to, base=base, force=force)
    out.print(f"{src} -> {output} ({to}, {len(adapter.modules)} modules)", highlight=False, markup=False)


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--rank", type=click.IntRange(min=1), required=True, help="Largest rank per module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Lower each module's rank to keep this fraction of ‖ΔW‖²_F.")
@click.option(
    "-o", "--out", "--output", "output", required=True, help="Output adapter: directory or .safetensors (peft), .safetensors (kohya)."
)
@click.option("--to", "to", type=click.Choice(TARGETS), default="peft", show_default=True, help="Output format.")
@click.option("--skip-modules-to-save", is_flag=True, help="Drop changed embeddings/norms instead of saving them whole.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to factor: auto uses CUDA when present.",
)
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def extract(
    base: str,
    tuned: str,
    rank: int,
    energy: float | None,
    output: str,
    to: Target,
    skip_modules_to_save: bool,
    device: str,
    force: bool,
    as_json: bool,
) -> None:
    """Extract a LoRA from the difference TUNED - BASE of two checkpoints.

    \b
    Examples:
      loratools extract ./Llama-3-8B ./Llama-3-8B-finetuned --rank 16 -o ./extracted
      loratools extract base.safetensors tuned.safetensors --rank 64 --energy 0.9 -o lora.safetensors
      loratools extract sd15.safetensors sd15-ft.safetensors --rank 32 --to kohya --skip-modules-to-save -o ft.safetensors
    """
    _, report = extract_adapter(
        base,
        tuned,
        rank=rank,
        energy=energy,
        out=output,
        to=to,
        force=force,
        skip_modules_to_save=skip_modules_to_save,
        device=device,
    )
    if as_json:
        _emit_json(report.to_dict())
        return
    table = Table(title=f"{escape(output)} (on {report.device})")
    for col in ("module", "ΔW shape", "rank", "kept energy", "‖ΔW‖_F"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report.modules:
        table.add_row(escape(m.module), " x ".join(map(str, m.shape)), str(m.rank), f"{m.kept_energy:.4f}", f"{m.delta_norm:.4g}")
    out.print(table)
    out.print(
        f"modules: {len(report.modules)}  saved whole: {len(report.saved)}  skipped: {len(report.skipped)}", highlight=False, markup=False
    )
    for key, why in report.skipped.items():
        out.print(f"[yellow]skipped[/] {escape(key)}: {escape(why)}", highlight=False)


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--base", help="Base checkpoint to map kohya names with.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def diff(a: str, b: str, base: str | None, as_json: bool) -> None:
    """Compare adapters A and B per module: cosine of their ΔW and ‖ΔW_A‖/‖ΔW_B‖, from the factors.

    \b
    Example:
      loratools diff ./adapter-v1 ./adapter-v2 --json
    """
    report = diff_adapters(a, b, base=base)
    if as_json:
        _emit_json(report.to_dict())
        return
    table = Table(title=escape(f"{a} vs {b}"))
    for col in ("module", "cosine", "‖ΔW_A‖", "‖ΔW_B‖", "ratio A/B", "rank A", "rank B"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report.modules:
        fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
        table.add_row(escape(m.module), fmt(m.cosine), fmt(m.norm_a), fmt(m.norm_b), fmt(m.norm_ratio), str(m.rank_a), str(m.rank_b))
    out.print(table)
    for label, names in (("only in A", report.only_a), ("only in B", report.only_b)):
        for name in names:
            out.print(f"[yellow]{label}[/] {escape(name)}", highlight=False)
    for name, why in report.mismatched.items():
        out.print(f"[red]mismatch[/] {escape(name)}: {escape(why)}", highlight=False)


# --- adapter arithmetic: add, scale, subtract, resize (issue 4) ---

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _output_options(f: Any) -> Any:
    """-o/--output, --dtype, --force and --json, shared by every command that writes an adapter."""
    f = click.option("--json", "as_json", is_flag=True, help="Print the result (and any resize report) as JSON.")(f)
    f = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(f)
    f = click.option(
        "--to", type=click.Choice(TARGETS), help="Output format (default: the first input's: kohya files stay kohya, else PEFT)."
    )(f)
    f = click.option("--dtype", type=click.Choice(list(_DTYPES)), help="Write factors in this dtype (default: the inputs').")(f)
    return click.option(
        "-o", "--out", "--output", "output", required=True, metavar="OUT", help="Output adapter directory (or .safetensors file)."
    )(f)


def _write(result: Adapter, output: str, to: Target | None, force: bool, as_json: bool, rows: list[ResizeRow] | None = None) -> None:
    save_as(result, output, to=to, force=force)
    ranks = sorted({m.rank for m in result.modules.values()})
    if as_json:
        _emit_json(
            {
                "output": output,
                "modules": len(result.modules),
                "ranks": ranks,
                "num_params": result.num_params,
                **({"report": [r.to_dict() for r in rows]} if rows is not None else {}),
            }
        )
        return
    if rows is not None:
        table = Table(title="resize")
        for col in ("module", "old rank", "new rank", "kept energy", "rel. error"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for r in rows:
            table.add_row(escape(r.module), str(r.old_rank), str(r.new_rank), f"{r.kept_energy:.6f}", f"{r.rel_error:.3e}")
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
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    rank: int | None,
    output: str,
    dtype: str | None,
    to: Target | None,
    force: bool,
    as_json: bool,
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
    _write(result, output, to, force, as_json, rows)


@main.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("adapter")
@click.argument("factor", type=float)
@_output_options
def scale_cmd(adapter: str, factor: float, output: str, dtype: str | None, to: Target | None, force: bool, as_json: bool) -> None:
    """Multiply the adapter's ΔW by FACTOR (negative allowed: `loratools scale a/ -0.5 -o b/`).

    \b
    Examples:
      loratools scale ./adapter 0.5 -o ./half
      loratools scale ./adapter -1 -o ./negated      (or: ... -o ./negated -- -1)
    """
    check_output(output, force=force)
    _write(scale(load(adapter), factor, dtype=_dtype(dtype)), output, to, force, as_json)


@main.command("subtract")
@click.argument("a")
@click.argument("b")
@_output_options
def subtract_cmd(a: str, b: str, output: str, dtype: str | None, to: Target | None, force: bool, as_json: bool) -> None:
    """Subtract adapters exactly: ΔW = ΔW_A − ΔW_B (rank r_A + r_B).

    \b
    Example:
      loratools subtract finetuned/ base-task/ -o difference/
    """
    check_output(output, force=force)
    _write(subtract(load(a), load(b), dtype=_dtype(dtype)), output, to, force, as_json)


@main.command("resize")
@click.argument("adapter")
@click.option("--rank", type=int, help="Keep this rank in every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F² (e.g. 0.99).")
@click.option("--max-rel-error", type=float, help="Per module, the smallest rank with ‖ΔW−ΔW_k‖_F/‖ΔW‖_F <= this (e.g. 0.05).")
@click.option("--sv-ratio", type=float, help="Per module, keep singular values >= σ₁/RATIO (e.g. 20).")
@_output_options
def resize_cmd(
    adapter: str,
    rank: int | None,
    energy: float | None,
    max_rel_error: float | None,
    sv_ratio: float | None,
    output: str,
    dtype: str | None,
    to: Target | None,
    force: bool,
    as_json: bool,
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
    _write(result, output, to, force, as_json, rows)


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
        table.add_row(escape(s.module), str(s.rank), *(str(s.rank_for(level)) for level in ENERGY_LEVELS), shown)
    out.print(table)
    if plot_path:
        out.print(f"wrote {escape(plot_path)}", highlight=False)


# --- streaming merge into base checkpoints (issue 5) ---


@contextmanager
def _byte_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar on stderr (bytes, rate, ETA) fed by a library ``progress(done, total)`` callback."""
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _merge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        (
            click.option(
                "--device",
                type=click.Choice(["auto", "cpu", "cuda"]),
                default="auto",
                show_default=True,
                help="Where to compute: auto uses CUDA when present.",
            ),
            click.option(
                "--dtype",
                type=click.Choice(list(DTYPE_CHOICES)),
                default="keep",
                show_default=True,
                help="Dtype of the output's floating tensors (keep: as stored in the input).",
            ),
            click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete)."),
            click.option("--fsync", is_flag=True, help="Flush the output to stable storage before it appears."),
            click.option("--quiet", is_flag=True, help="No progress bar or summary."),
            click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        )
    ):
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
            markup=False,
        )


@main.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", "--output", "out", help="Output (default: <base>-merged beside BASE). Never inside BASE.")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order (repeat: -w 0.7 -w 0.3).")
@_merge_options
def merge(
    base: str,
    adapters: tuple[str, ...],
    out: str | None,
    weights: tuple[float, ...],
    device: Device,
    dtype: Dtype,
    force: bool,
    fsync: bool,
    quiet: bool,
    as_json: bool,
) -> None:
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
        result = merge_checkpoint(
            base,
            list(adapters),
            weights=weights or None,
            out=out,
            device=device,
            dtype=dtype,
            force=force,
            fsync=fsync,
            progress=progress,
        )
    _report_merge(result, "merged", quiet, as_json)


@main.command()
@click.argument("merged")
@click.argument("adapter")
@click.option("-o", "--out", "--output", "out", required=True, help="Output checkpoint (required: never the input).")
@_merge_options
def unmerge(
    merged: str, adapter: str, out: str, device: Device, dtype: Dtype, force: bool, fsync: bool, quiet: bool, as_json: bool
) -> None:
    """Take ADAPTER back out of the MERGED checkpoint: W = W' − s·B·A.

    Exact up to rounding: bf16/fp16 weights may come back one ulp off.  DoRA and modules_to_save
    merges cannot be undone and are refused.

    \b
    Example:
      loratools unmerge ./base-merged ./my-adapter -o ./base-again
    """
    with _byte_progress("unmerging", not (quiet or as_json)) as progress:
        result = unmerge_checkpoint(
            merged,
            adapter,
            out=out,
            device=device,
            dtype=dtype,
            force=force,
            fsync=fsync,
            progress=progress,
        )
    _report_merge(result, "unmerged", quiet, as_json)

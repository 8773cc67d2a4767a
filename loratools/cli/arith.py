"""`loratools add`, `scale`, `subtract` and `resize`: adapter arithmetic in factored form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

import loratools

from ..io.atomic import check_output
from ..spec import DTYPE_CHOICES, FORMATS, DtypeChoice, Format
from .console import count_progress, emit_json, out, safe, say
from .options import for_option, method_options

ADAPTER_FORMATS = tuple(f for f in FORMATS if f != "gguf")  # GGUF needs a base: `loratools convert OUT --to gguf --base BASE`

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..ops.arith import ResizeRow


def _output_options(f: Any) -> Any:
    """-o/--output, --dtype, --to, --for, --force and --json, shared by every command that writes an adapter."""
    f = click.option("--json", "as_json", is_flag=True, help="Print the result (and any resize report) as JSON.")(f)
    f = for_option(f)
    f = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(f)
    f = click.option(
        "--to",
        type=click.Choice(ADAPTER_FORMATS),
        help="Output format (default: the first input's: kohya and diffusers files stay so, else PEFT).",
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(DTYPE_CHOICES),
        default="keep",
        show_default=True,
        help="Dtype of the written factors (keep: the inputs').",
    )(f)
    return click.option(
        "-o", "--out", "--output", "output", required=True, metavar="OUT", help="Output adapter directory (or .safetensors file)."
    )(f)


def write_for(result: Adapter, output: str, to: Format | None, runtimes: tuple[str, ...], force: bool) -> Adapter:
    """Save ``result`` in the output convention (:func:`loratools.conform`) for ``runtimes``; returns what was written."""
    fmt = to or loratools.source_format(result)
    result = loratools.conform(result, runtimes, layout="kohya" if fmt == "kohya" else "peft")
    loratools.save_as(result, output, to=fmt, force=force)
    return result


def _write(
    result: Adapter,
    output: str,
    to: Format | None,
    runtimes: tuple[str, ...],
    force: bool,
    as_json: bool,
    rows: list[ResizeRow] | None = None,
    method: dict[str, object] | None = None,
) -> None:
    result = write_for(result, output, to, runtimes, force)
    ranks = sorted({m.rank for m in result.modules.values()})
    if as_json:
        emit_json(
            {
                "output": output,
                "modules": len(result.modules),
                "ranks": ranks,
                "num_params": result.num_params,
                **({"method": method} if method is not None else {}),
                **({"report": [r.to_dict() for r in rows]} if rows is not None else {}),
            }
        )
        return
    if rows is not None:
        show_resize(rows)
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    say(f"wrote {output}: {len(result.modules)} modules, rank {rank_text}, {result.num_params:,} parameters")


def show_resize(rows: list[ResizeRow], title: str = "resize") -> None:
    """The per-module resize report: old and new rank, kept energy, relative error ‖ΔW−ΔW_k‖_F/‖ΔW‖_F."""
    table = Table(title=title)
    for col in ("module", "old rank", "new rank", "kept energy", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in rows:
        table.add_row(safe(r.module), str(r.old_rank), str(r.new_rank), f"{r.kept_energy:.6f}", f"{r.rel_error:.3e}")
    out.print(table)


def _rank(value: str | None) -> int | str | None:
    """--rank N or --rank full (min(m, n): the method's result exactly, up to round-off)."""
    if value is None or value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'full', got {value!r}", param_hint="--rank") from None


@click.command("add")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight of each input, in order (one per input; default 1).")
@method_options(
    method_help="How ΔWs combine: the exact sum, or per module on the dense ΔW (then compressed by SVD).",
    seed_help="Seed of DARE/DELLA's random drops (per module, the same drops as merge).",
)
@click.option("--rank", "rank_text", metavar="N|full", help="Compress the result to this rank (truncated SVD; full: exact).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F².")
@click.option("--max-rel-error", type=float, help="Per module, the smallest rank with ‖ΔW−ΔW_k‖_F/‖ΔW‖_F <= this.")
@_output_options
def add(
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    method: str,
    density: float | None,
    epsilon: float | None,
    majority_sign: str | None,
    seed: int,
    weight_patterns: tuple[str, ...],
    rank_text: str | None,
    energy: float | None,
    max_rel_error: float | None,
    output: str,
    dtype: DtypeChoice,
    to: Format | None,
    runtimes: tuple[str, ...],
    force: bool,
    as_json: bool,
) -> None:
    """Add adapters: exactly (ΔW = Σ wᵢ·ΔWᵢ, factors concatenated, rank = Σ rᵢ) or by a merge method.

    With --method ties, magnitude_prune, dare, dare_ties, della or della_linear each module's ΔWᵢ are formed densely,
    combined, and compressed back to LoRA factors: give --rank (N or full), --energy or
    --max-rel-error; the report gives each module's rank and relative error.

    \b
    Examples:
      loratools add style/ subject/ -o combined/
      loratools add a/ b/ -w 0.7 -w 0.3 --rank 16 -o mix/
      loratools add a/ b/ --method ties --density 0.5 --rank 16 -o ties/
    """
    if len(adapters) < 2:
        raise click.UsageError("add needs at least two adapters (use `loratools scale` for one)")
    rank = _rank(rank_text)
    check_output(output, force=force)
    chosen = loratools.describe_method(method, density=density, majority_sign=majority_sign, seed=seed, epsilon=epsilon)
    with count_progress(f"add --method {method}", method != "task_arithmetic" and not as_json) as progress:
        result, rows = loratools.combine(
            *(loratools.load(p) for p in adapters),
            method=method,
            weights=weights or None,
            density=density,
            epsilon=epsilon,
            majority_sign=majority_sign,
            seed=seed,
            weight_patterns=[loratools.parse_weight_pattern(p) for p in weight_patterns],
            rank=rank,
            energy=energy,
            max_rel_error=max_rel_error,
            dtype=dtype,
            progress=progress,
        )
    _write(result, output, to, runtimes, force, as_json, rows or None, chosen)  # no rows: the exact factored sum


@click.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("adapter")
@click.argument("factor", type=float)
@_output_options
def scale(
    adapter: str, factor: float, output: str, dtype: DtypeChoice, to: Format | None, runtimes: tuple[str, ...], force: bool, as_json: bool
) -> None:
    """Multiply the adapter's ΔW by FACTOR (negative allowed: `loratools scale a/ -0.5 -o b/`).

    \b
    Examples:
      loratools scale ./adapter 0.5 -o ./half
      loratools scale ./adapter -1 -o ./negated      (or: ... -o ./negated -- -1)
    """
    check_output(output, force=force)
    _write(loratools.scale(loratools.load(adapter), factor, dtype=dtype), output, to, runtimes, force, as_json)


@click.command("subtract")
@click.argument("a")
@click.argument("b")
@_output_options
def subtract(
    a: str, b: str, output: str, dtype: DtypeChoice, to: Format | None, runtimes: tuple[str, ...], force: bool, as_json: bool
) -> None:
    """Subtract adapters exactly: ΔW = ΔW_A − ΔW_B (rank r_A + r_B).

    \b
    Example:
      loratools subtract finetuned/ base-task/ -o difference/
    """
    check_output(output, force=force)
    _write(loratools.subtract(loratools.load(a), loratools.load(b), dtype=dtype), output, to, runtimes, force, as_json)


@click.command("resize")
@click.argument("adapter")
@click.option("--rank", type=int, help="Keep this rank in every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F² (e.g. 0.99).")
@click.option("--max-rel-error", type=float, help="Per module, the smallest rank with ‖ΔW−ΔW_k‖_F/‖ΔW‖_F <= this (e.g. 0.05).")
@click.option("--sv-ratio", type=float, help="Per module, keep singular values >= σ₁/RATIO (e.g. 20).")
@_output_options
def resize(
    adapter: str,
    rank: int | None,
    energy: float | None,
    max_rel_error: float | None,
    sv_ratio: float | None,
    output: str,
    dtype: DtypeChoice,
    to: Format | None,
    runtimes: tuple[str, ...],
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
    result, rows = loratools.resize(
        loratools.load(adapter), rank, energy=energy, max_rel_error=max_rel_error, sv_ratio=sv_ratio, dtype=dtype
    )
    _write(result, output, to, runtimes, force, as_json, rows)

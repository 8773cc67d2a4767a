"""`loratools convert`, `extract` and `diff`: moving between formats, and comparing adapters."""

from __future__ import annotations

import click
from rich.table import Table

import loratools

from ..io.atomic import check_output
from ..spec import DEVICES, FORMATS, Device, Format
from .arith import ADAPTER_FORMATS, show_resize, write_for
from .console import emit_json, out, safe, say
from .options import for_option


@click.command()
@click.argument("src")
@click.option(
    "--to",
    "to",
    type=click.Choice(FORMATS),
    required=True,
    help="Output format: peft (spec v1; per component for diffusers files), kohya (sd-scripts), diffusers, or gguf (llama.cpp).",
)
@click.option(
    "--base",
    help="Base checkpoint: maps kohya's flattened names onto its module paths; every module must fit it. "
    "For gguf: the base model directory (its config.json names the architecture and tensors).",
)
@click.option(
    "-o", "--out", "--output", "output", required=True, help="Output: a directory or .safetensors for peft; a .safetensors file for kohya."
)
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--rank", type=click.IntRange(min=1), help="Truncate each module to at most this rank (SVD; default: exact, full rank).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F² (e.g. 0.99).")
@click.option("--max-rel-error", type=float, help="Per module, the smallest rank with ‖ΔW−ΔW_k‖_F/‖ΔW‖_F <= this (e.g. 0.01).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (and the per-module error report) as JSON.")
@for_option
def convert(
    src: str,
    to: Format,
    base: str | None,
    output: str,
    force: bool,
    rank: int | None,
    energy: float | None,
    max_rel_error: float | None,
    as_json: bool,
    runtimes: tuple[str, ...],
) -> None:
    """Convert the adapter at SRC (PEFT, kohya, diffusers, mlx, LyCORIS) to another format.

    Exact by default: LyCORIS LoHa/LoKr modules become LoRA factors of their full rank r1·r2.  With
    one of --rank, --energy or --max-rel-error each module's ΔW is truncated by SVD (optimal in
    ‖·‖_F) and a per-module report gives the ranks, kept energy and relative error.

    \b
    Examples:
      loratools convert my_lora.safetensors --to peft --base ./unet.safetensors -o ./my-lora
      loratools convert ./my-lora --to kohya -o my_lora.safetensors
      loratools convert my_lokr.safetensors --to kohya --max-rel-error 0.01 -o my_lora.safetensors
      loratools convert pytorch_lora_weights.safetensors --to peft -o ./peft-lora   (unet/, text_encoder/ if both)
      loratools convert ./my-lora --to gguf --base ./Llama-3-8B -o my-lora.gguf
    """
    if to == "gguf" and base is None:
        raise click.UsageError("--to gguf needs --base: the base model directory whose config.json names the architecture")
    check_output(output, force=force)
    adapter = loratools.load(src, base=None if to == "gguf" else base)
    rows = None
    if rank is not None or energy is not None or max_rel_error is not None:
        adapter, rows = loratools.resize(adapter, rank, energy=energy, max_rel_error=max_rel_error)
    if to == "gguf":
        adapter = loratools.conform(adapter, runtimes)
        loratools.write_gguf(adapter, output, base=base, force=force)  # type: ignore[arg-type]
    else:
        adapter = write_for(adapter, output, to, runtimes, force)
    if as_json:
        report = {"report": [r.to_dict() for r in rows]} if rows is not None else {}
        ranks = sorted({m.rank for m in adapter.modules.values()})
        emit_json({"output": output, "to": to, "modules": len(adapter.modules), "ranks": ranks, "num_params": adapter.num_params, **report})
        return
    if rows is not None:
        show_resize(rows, title=f"{safe(src)} -> {safe(output)}: truncated SVD")
    say(f"{src} -> {output} ({to}, {len(adapter.modules)} modules)")


@click.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--rank", type=click.IntRange(min=1), required=True, help="Largest rank per module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Lower each module's rank to keep this fraction of ‖ΔW‖²_F.")
@click.option(
    "-o", "--out", "--output", "output", required=True, help="Output adapter: directory or .safetensors (peft), .safetensors (kohya)."
)
@click.option("--to", "to", type=click.Choice(ADAPTER_FORMATS), default="peft", show_default=True, help="Output format.")
@for_option
@click.option("--skip-modules-to-save", is_flag=True, help="Drop changed embeddings/norms instead of saving them whole.")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
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
    to: Format,
    skip_modules_to_save: bool,
    device: Device,
    runtimes: tuple[str, ...],
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
    check_output(output, force=force)
    adapter, report = loratools.extract(
        base, tuned, rank=rank, energy=energy, to=to, skip_modules_to_save=skip_modules_to_save, device=device
    )
    write_for(adapter, output, to, runtimes, force)
    if as_json:
        emit_json(report.to_dict())
        return
    table = Table(title=f"{safe(output)} (on {report.device})")
    for col in ("module", "ΔW shape", "rank", "kept energy", "‖ΔW‖_F"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report.modules:
        table.add_row(safe(m.module), " x ".join(map(str, m.shape)), str(m.rank), f"{m.kept_energy:.4f}", f"{m.delta_norm:.4g}")
    out.print(table)
    say(f"modules: {len(report.modules)}  saved whole: {len(report.saved)}  skipped: {len(report.skipped)}")
    for key, why in report.skipped.items():
        out.print(f"[yellow]skipped[/] {safe(key)}: {safe(why)}", highlight=False)


@click.command()
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
    report = loratools.diff(a, b, base=base)
    if as_json:
        emit_json(report.to_dict())
        return
    table = Table(title=safe(f"{a} vs {b}"))
    for col in ("module", "cosine", "‖ΔW_A‖", "‖ΔW_B‖", "ratio A/B", "rank A", "rank B"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in report.modules:
        fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
        table.add_row(safe(m.module), fmt(m.cosine), fmt(m.norm_a), fmt(m.norm_b), fmt(m.norm_ratio), str(m.rank_a), str(m.rank_b))
    out.print(table)
    for label, names in (("only in A", report.only_a), ("only in B", report.only_b)):
        for name in names:
            out.print(f"[yellow]{label}[/] {safe(name)}", highlight=False)
    for name, why in report.mismatched.items():
        out.print(f"[red]mismatch[/] {safe(name)}: {safe(why)}", highlight=False)

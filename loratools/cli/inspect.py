"""`loratools inspect`: what is inside an adapter, and its singular-value spectrum."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

import loratools

from ..io.atomic import check_output
from ..spec import ENERGY_LEVELS
from .console import emit_json, out, safe, say


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--spectrum", is_flag=True, help="Show each module's singular values and the ranks keeping 90/99/99.9% of ‖ΔW‖².")
@click.option("--plot", "plot_path", metavar="PNG", help="With --spectrum: also write a PNG of kept energy versus rank (needs matplotlib).")
@click.option("--force", is_flag=True, help="Overwrite an existing --plot file.")
def inspect(path: str, as_json: bool, spectrum: bool, plot_path: str | None, force: bool) -> None:
    """Show what is inside the adapter at PATH: modules, ranks, scales, ‖ΔW‖ and totals.

    A base model directory (model.safetensors or an index, no adapter_config.json) shows its
    tensors, dtypes and quantization instead: which codec reads which weights, and what none reads.

    \b
    Examples:
      loratools inspect ./adapter
      loratools inspect ./adapter --spectrum --plot spectrum.png
    """
    if spectrum or plot_path:
        _show_spectrum(path, as_json, plot_path, force)
        return
    if _is_base(path):
        _show_base(path, as_json)
        return
    summary = loratools.summarize(loratools.load(path))
    if as_json:
        emit_json(summary.to_dict())
        return
    table = Table(title=safe(path), show_lines=False)
    for col in ("module", "kind", "out x in", "rank", "alpha", "scale", "dtype", "‖ΔW‖_F"):
        table.add_column(col, justify="right" if col not in ("module", "kind", "dtype") else "left")
    for m in summary.modules:
        kind = m.kind + (" +DoRA" if m.dora else "")
        table.add_row(
            safe(m.module),
            kind,
            " x ".join(map(str, m.shape)),
            str(m.rank),
            f"{m.alpha:g}",
            f"{m.scale:.4g}",
            m.dtype,
            f"{m.delta_norm:.4g}",
        )
    out.print(table)
    say(f"modules: {len(summary.modules)}  parameters: {summary.num_params:,}  bytes: {summary.num_bytes:,}")
    say(f"targets: {summary.targets}")
    say(f"base model: {summary.base_model}")
    say(f"spec version: {summary.spec_version}")


def _show_spectrum(path: str, as_json: bool, plot_path: str | None, force: bool) -> None:
    """``inspect --spectrum``: singular values per module, ranks per energy level, optional PNG."""
    if plot_path:
        check_output(plot_path, force=force)
    found = loratools.spectra(loratools.load(path))
    if plot_path:
        loratools.plot_spectrum(found, plot_path, force=force)
    if as_json:
        emit_json({"modules": [s.to_dict() for s in found], **({"plot": plot_path} if plot_path else {})})
        return
    table = Table(title=f"{safe(path)}: singular values of ΔW")
    table.add_column("module")
    table.add_column("rank", justify="right")
    for level in ENERGY_LEVELS:
        table.add_column(f"rank @{level:.1%}", justify="right")
    table.add_column("σ₁, σ₂, ...")
    for s in found:
        shown = ", ".join(f"{v:.3g}" for v in s.singular_values[:8]) + (", ..." if len(s.singular_values) > 8 else "")
        table.add_row(safe(s.module), str(s.rank), *(str(s.rank_for(level)) for level in ENERGY_LEVELS), shown)
    out.print(table)
    if plot_path:
        say(f"wrote {plot_path}")


def _is_base(path: str) -> bool:
    """A model directory with weights and no adapter config: inspected as a base checkpoint."""
    root = Path(path)
    weights = (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file()
    return root.is_dir() and weights and not (root / "adapter_config.json").exists()


def _show_base(path: str, as_json: bool) -> None:
    summary = loratools.summarize_base(path)
    if as_json:
        emit_json(summary.to_dict())
        return
    dtypes = ", ".join(f"{n} {d}" for d, n in summary.dtypes.items())
    say(f"base checkpoint: {summary.tensors} tensors in {summary.shards} shard(s), {summary.total_bytes / 2**30:.2f} GiB ({dtypes})")
    say(f"model type: {safe(str(summary.model_type))}")
    quant = summary.quantization
    if not quant:
        say("quantization: none (float weights)")
        return
    say(f"quantization: quant_method {safe(str(quant['method']))}")
    for label, entry in quant["formats"].items():
        keep = "requantized by merge --dtype keep" if entry["requantizable"] else "merge with --dtype bf16 only"
        say(f"  {entry['tensors']} tensors {safe(label)} [{entry['codec']}]: {keep}")
    if quant["unhandled"]:
        first = next(iter(quant["unhandled"].items()))
        say(f"  {len(quant['unhandled'])} tensors quantized in a format loratools cannot read (e.g. {safe(first[0])}: {safe(first[1])})")

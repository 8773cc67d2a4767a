"""`loratools merge` and `loratools unmerge`: stream adapters into (and out of) base checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

import loratools

from ..spec import DEVICES, DTYPE_CHOICES, Device, DtypeChoice
from .console import emit_json, err, safe, say
from .options import method_options

if TYPE_CHECKING:
    from ..merging import MergeResult


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
                type=click.Choice(DEVICES),
                default="auto",
                show_default=True,
                help="Where to compute: auto uses CUDA when present.",
            ),
            click.option(
                "--dtype",
                type=click.Choice(DTYPE_CHOICES),
                default="keep",
                show_default=True,
                help="Dtype of the output's floating tensors (keep: as stored in the input).",
            ),
            click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete)."),
            click.option(
                "--buffered",
                is_flag=True,
                help="Write through the page cache (keeps the output cached for an immediate load). "
                "Default: direct I/O around the cache where the file system allows.",
            ),
            click.option("--fsync", is_flag=True, help="Flush the output to stable storage before it appears."),
            click.option("--quiet", is_flag=True, help="No progress bar or summary."),
            click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        )
    ):
        fn = option(fn)
    return fn


def _run(
    verb: str,
    call: Callable[..., MergeResult],
    *,
    device: Device,
    dtype: DtypeChoice,
    force: bool,
    buffered: bool,
    fsync: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Run ``call`` (merge or unmerge, inputs bound) with the :func:`_merge_options` and a progress bar; report it."""
    with _byte_progress(f"{verb[:-1]}ing", not (quiet or as_json)) as progress:
        result = call(device=device, dtype=dtype, force=force, direct=not buffered, fsync=fsync, progress=progress)
    if as_json:
        emit_json(result.to_dict())
        return
    for warning in result.warnings:
        err.print(f"warning: {safe(warning)}")
    if not quiet:
        rate = result.bytes_written / 2**30 / max(result.seconds, 1e-9)
        replaced = f", {len(result.replaced)} replaced" if result.replaced else ""
        say(
            f"{verb}d {len(result.merged)} of {result.tensors} tensors{replaced} -> {result.out} "
            f"({result.bytes_written / 2**30:.2f} GiB in {result.seconds:.1f} s, {rate:.2f} GiB/s, {result.device})"
        )
        quant = result.quantization
        if quant:
            codecs = ", ".join(f"{n} {c} tensors" for c, n in quant["codecs"].items()) or "no tensors a codec reads"
            say(f"quantized base ({safe(str(quant['method']))}: {codecs}), written {quant['written']}")
        if result.survival_total is not None:
            worst = min(result.survival.items(), key=lambda kv: kv[1])
            say(
                f"ΔW surviving requantization: {result.survival_total:.1%} in total over {len(result.survival)} tensors "
                f"(lowest {safe(worst[0])}: {worst[1]:.1%})"
            )


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", "--output", "out", help="Output (default: <base>-merged beside BASE). Never inside BASE.")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order (repeat: -w 0.7 -w 0.3).")
@method_options(
    method_help="How the ΔWs combine per base tensor (exact, no SVD): the weighted sum, or one of the methods.",
    seed_help="Seed of DARE/DELLA's random drops (per module, the same drops as add).",
)
@_merge_options
def merge(
    base: str,
    adapters: tuple[str, ...],
    out: str | None,
    weights: tuple[float, ...],
    method: str,
    density: float | None,
    epsilon: float | None,
    majority_sign: str | None,
    seed: int,
    weight_patterns: tuple[str, ...],
    **options: Any,
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
      loratools merge ./base ./a ./b --method ties --density 0.5 -o ./base-ties
    """
    call = partial(
        loratools.merge,
        base,
        list(adapters),
        weights=weights or None,
        out=out,
        method=method,
        density=density,
        epsilon=epsilon,
        majority_sign=majority_sign,
        seed=seed,
        weight_patterns=[loratools.parse_weight_pattern(p) for p in weight_patterns],
    )
    _run("merge", call, **options)


@click.command()
@click.argument("merged")
@click.argument("adapter")
@click.option("-o", "--out", "--output", "out", required=True, help="Output checkpoint (required: never the input).")
@_merge_options
def unmerge(merged: str, adapter: str, out: str, **options: Any) -> None:
    """Take ADAPTER back out of the MERGED checkpoint: W = W' − s·B·A.

    Exact up to rounding: bf16/fp16 weights may come back one ulp off.  DoRA and modules_to_save
    merges cannot be undone and are refused.

    \b
    Example:
      loratools unmerge ./base-merged ./my-adapter -o ./base-again
    """
    call = partial(loratools.unmerge, merged, adapter, out=out)
    _run("unmerge", call, **options)

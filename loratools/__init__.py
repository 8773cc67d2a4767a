"""loratools: check, shrink, combine, bake in and publish LoRA adapters.

The public API is re-exported here, lazily: ``import loratools`` loads neither torch nor the Hub
client, and each name's module is imported on first use (module ``__getattr__``, as
huggingface_hub does), so the CLI answers ``--help`` at once and scripts pay only for what they use.
Everything not listed in ``__all__`` is internal.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# Before torch loads: libgomp's default busy-waiting makes torch's short ops crawl when cores are
# shared (measured: 7B-adapter resize 18 s -> 4 s on 2 busy cores).  setdefault: a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Adapter", "LoraModule"), "adapter"),
    **dict.fromkeys(("convert", "load", "save", "save_as", "save_kohya", "source_format"), "api"),
    **dict.fromkeys(("Checkpoint", "open_checkpoint"), "io.checkpoint"),
    **dict.fromkeys(
        (
            "ArgumentError",
            "ChecksumError",
            "DependencyError",
            "DiskSpaceError",
            "FormatError",
            "HubError",
            "InvalidAdapterError",
            "LoratoolsError",
            "MergeError",
            "OutputExistsError",
            "Problem",
            "ShapeError",
            "SpecError",
        ),
        "errors",
    ),
    **dict.fromkeys(("FactoredSVD", "factored_svd", "singular_values"), "linalg"),
    **dict.fromkeys(("MergeResult", "merge", "unmerge"), "merging"),
    **dict.fromkeys(("ResizeRow", "add", "resize", "scale", "subtract"), "ops.arith"),
    "combine": "ops.combine",
    **dict.fromkeys(("METHODS", "Method", "MethodOptions", "parse_weight_pattern"), "methods"),
    **dict.fromkeys(("DiffReport", "diff"), "ops.diff"),
    **dict.fromkeys(("ExtractReport", "extract"), "ops.extract"),
    **dict.fromkeys(("ModuleSpectrum", "plot_spectrum", "spectra"), "ops.spectrum"),
    **dict.fromkeys(("Summary", "summarize"), "ops.summary"),
    **dict.fromkeys(("BaseSummary", "summarize_base"), "ops.base_summary"),
    **dict.fromkeys(("PullResult", "PushResult", "pull", "push"), "hub"),
    "Plan": "planner",
    "plan": "planner",
    "SPEC_VERSION": "spec",
    **dict.fromkeys(("Report", "check_runtimes", "validate"), "validation"),
    **dict.fromkeys(("conform", "runtime_factors"), "runtimes.check"),
    "write_gguf": "formats.gguf",
}

if TYPE_CHECKING:
    from .adapter import Adapter, LoraModule
    from .api import convert, load, save, save_as, save_kohya, source_format
    from .errors import (
        ArgumentError,
        ChecksumError,
        DependencyError,
        DiskSpaceError,
        FormatError,
        HubError,
        InvalidAdapterError,
        LoratoolsError,
        MergeError,
        OutputExistsError,
        Problem,
        ShapeError,
        SpecError,
    )
    from .formats.gguf import write_gguf
    from .hub import PullResult, PushResult, pull, push
    from .io.checkpoint import Checkpoint, open_checkpoint
    from .linalg import FactoredSVD, factored_svd, singular_values
    from .merging import MergeResult, merge, unmerge
    from .methods import METHODS, Method, MethodOptions, parse_weight_pattern
    from .ops.arith import ResizeRow, add, resize, scale, subtract
    from .ops.base_summary import BaseSummary, summarize_base
    from .ops.combine import combine
    from .ops.diff import DiffReport, diff
    from .ops.extract import ExtractReport, extract
    from .ops.spectrum import ModuleSpectrum, plot_spectrum, spectra
    from .ops.summary import Summary, summarize
    from .planner import Plan, plan
    from .runtimes.check import conform, runtime_factors
    from .spec import SPEC_VERSION
    from .validation import Report, check_runtimes, validate

    __version__: str


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use, and cache the name here."""
    if name == "__version__":
        value: Any = _version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module 'loratools' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _version() -> str:
    try:
        return version("loratools")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+local"


__all__ = [
    "Adapter",
    "ArgumentError",
    "BaseSummary",
    "Checkpoint",
    "ChecksumError",
    "DependencyError",
    "DiffReport",
    "DiskSpaceError",
    "ExtractReport",
    "FactoredSVD",
    "FormatError",
    "HubError",
    "InvalidAdapterError",
    "LoraModule",
    "LoratoolsError",
    "METHODS",
    "MergeError",
    "MergeResult",
    "Method",
    "MethodOptions",
    "ModuleSpectrum",
    "OutputExistsError",
    "Plan",
    "Problem",
    "PullResult",
    "PushResult",
    "Report",
    "ResizeRow",
    "SPEC_VERSION",
    "ShapeError",
    "SpecError",
    "Summary",
    "__version__",
    "add",
    "check_runtimes",
    "combine",
    "conform",
    "convert",
    "diff",
    "extract",
    "factored_svd",
    "load",
    "merge",
    "open_checkpoint",
    "parse_weight_pattern",
    "plan",
    "plot_spectrum",
    "pull",
    "push",
    "resize",
    "runtime_factors",
    "save",
    "save_as",
    "save_kohya",
    "scale",
    "singular_values",
    "source_format",
    "spectra",
    "subtract",
    "summarize",
    "summarize_base",
    "unmerge",
    "validate",
    "write_gguf",
]

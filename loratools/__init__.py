"""loratools: check, shrink, combine, bake in and publish LoRA adapters.

The public API is re-exported here; everything else is internal.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# Before torch loads: libgomp's default busy-waiting makes torch's short ops crawl when cores are
# shared (measured: 7B-adapter resize 18 s -> 4 s on 2 busy cores).  setdefault: a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .adapter import Adapter, LoraModule, load, save
from .arith import ResizeRow, add, resize, scale, subtract
from .checkpoint import Checkpoint, open_checkpoint
from .convert import convert, save_as, source_format
from .diff import DiffReport, diff
from .errors import (
    ArgumentError,
    ChecksumError,
    DiskSpaceError,
    FormatError,
    HubError,
    InvalidAdapterError,
    LoratoolsError,
    MergeError,
    OutputExistsError,
    ShapeError,
    SpecError,
)
from .extract import ExtractReport, extract
from .kohya import save_kohya
from .linalg import FactoredSVD, factored_svd, singular_values
from .merge import MergeResult, merge, unmerge
from .spec import SPEC_VERSION
from .spectrum import ModuleSpectrum, plot_spectrum, spectra
from .summary import Summary, summarize
from .validate import Problem, Report, validate

if TYPE_CHECKING:
    from .hub import PullResult, PushResult, pull, push

_HUB_NAMES = frozenset({"PullResult", "PushResult", "pull", "push"})


def __getattr__(name: str) -> Any:
    """The Hub API loads on first use: huggingface_hub's import costs 0.2 s that merge, resize etc. never need."""
    if name in _HUB_NAMES:
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")


try:
    __version__ = version("loratools")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

__all__ = [
    "SPEC_VERSION",
    "Adapter",
    "ArgumentError",
    "Checkpoint",
    "ChecksumError",
    "DiffReport",
    "DiskSpaceError",
    "ExtractReport",
    "FactoredSVD",
    "FormatError",
    "HubError",
    "InvalidAdapterError",
    "LoraModule",
    "LoratoolsError",
    "MergeError",
    "MergeResult",
    "ModuleSpectrum",
    "OutputExistsError",
    "Problem",
    "Report",
    "PullResult",
    "PushResult",
    "ResizeRow",
    "ShapeError",
    "SpecError",
    "Summary",
    "__version__",
    "add",
    "convert",
    "diff",
    "extract",
    "factored_svd",
    "load",
    "merge",
    "open_checkpoint",
    "plot_spectrum",
    "pull",
    "push",
    "resize",
    "save",
    "save_as",
    "save_kohya",
    "scale",
    "singular_values",
    "source_format",
    "spectra",
    "subtract",
    "summarize",
    "unmerge",
    "validate",
]

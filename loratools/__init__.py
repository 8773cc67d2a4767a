"""loratools: check, shrink, combine, bake in and publish LoRA adapters.

The public API is re-exported here; everything else is internal.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .adapter import Adapter, LoraModule, load, save
from .checkpoint import Checkpoint, open_checkpoint
from .convert import convert, save_as, source_format
from .diff import DiffReport, diff
from .errors import (
    ChecksumError,
    FormatError,
    HubError,
    InvalidAdapterError,
    LoratoolsError,
    OutputExistsError,
    ShapeError,
    SpecError,
)
from .hub import PullResult, PushResult, pull, push
from .extract import ExtractReport, extract
from .kohya import save_kohya
from .spec import SPEC_VERSION
from .summary import Summary, summarize
from .validate import Problem, Report, validate

try:
    __version__ = version("loratools")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

__all__ = [
    "SPEC_VERSION",
    "Adapter",
    "Checkpoint",
    "ChecksumError",
    "DiffReport",
    "ExtractReport",
    "FormatError",
    "HubError",
    "InvalidAdapterError",
    "LoraModule",
    "LoratoolsError",
    "OutputExistsError",
    "Problem",
    "Report",
    "PullResult",
    "PushResult",
    "ShapeError",
    "SpecError",
    "Summary",
    "__version__",
    "convert",
    "diff",
    "extract",
    "load",
    "open_checkpoint",
    "pull",
    "push",
    "save",
    "save_as",
    "save_kohya",
    "source_format",
    "summarize",
    "validate",
]

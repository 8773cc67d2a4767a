"""loratools: check, shrink, combine, bake in and publish LoRA adapters.

The public API is re-exported here; everything else is internal.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .adapter import Adapter, LoraModule, load, save
from .checkpoint import Checkpoint, open_checkpoint
from .errors import (
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
from .merge import MergeResult, merge, unmerge
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
    "DiskSpaceError",
    "FormatError",
    "HubError",
    "InvalidAdapterError",
    "LoraModule",
    "LoratoolsError",
    "MergeError",
    "MergeResult",
    "OutputExistsError",
    "Problem",
    "Report",
    "ShapeError",
    "SpecError",
    "Summary",
    "__version__",
    "load",
    "merge",
    "open_checkpoint",
    "save",
    "summarize",
    "unmerge",
    "validate",
]

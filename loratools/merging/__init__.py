"""Streaming merges of adapters into base checkpoints: :func:`merge`, :func:`unmerge`.

The plan comes from :mod:`loratools.planner`; :mod:`.kernels` holds the float32 arithmetic and
:mod:`.run` the public calls.
"""

from __future__ import annotations

from .run import MergeResult, default_out, merge, unmerge

__all__ = ["MergeResult", "default_out", "merge", "unmerge"]

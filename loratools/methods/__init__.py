"""Merge methods on the dense ΔW of one module: a registry, one module per method.

Each method combines the inputs' ΔWᵢ (same shape, already scaled by their alpha/r) with their
weights into one ΔW.  It lives below :mod:`loratools.ops` and :mod:`loratools.merging` so that
both ``add --method`` (then compressed by SVD) and ``merge --method`` (streamed, exact) run the
same arithmetic.
"""

from __future__ import annotations

from .base import MAJORITY_SIGNS, JoinPlan, Kept, Method, MethodOptions, join_plan, join_rows, module_generator
from .magnitude import sample_rows, select_top, select_top_rows, selects_by_magnitude
from .registry import METHOD_NAMES, METHODS, describe_method, get_method
from .weights import module_weights, parse_weight_pattern

__all__ = [
    "MAJORITY_SIGNS",
    "METHODS",
    "METHOD_NAMES",
    "JoinPlan",
    "Kept",
    "Method",
    "MethodOptions",
    "describe_method",
    "get_method",
    "join_plan",
    "join_rows",
    "module_generator",
    "module_weights",
    "parse_weight_pattern",
    "sample_rows",
    "select_top",
    "select_top_rows",
    "selects_by_magnitude",
]

"""The numba decorators the fused loops use, so they share one set of compilation rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numba

F = TypeVar("F", bound=Callable[..., Any])


def compiled(fn: F) -> F:
    """``fn`` compiled for this CPU: no GIL (pool threads run side by side), cached on disk, strict IEEE float semantics.

    ``error_model="numpy"``: a float division by zero gives inf/NaN, as torch's does, instead of
    raising; ``boundscheck`` off: callers pass buffers of checked sizes.
    """
    return numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)(fn)  # type: ignore[return-value]


def reduction(fn: F) -> F:
    """:func:`compiled`, but free to reassociate sums (so they vectorize): only for norms that are reported, never written."""
    return numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"reassoc"})(fn)  # type: ignore[return-value]

"""Where dense work runs: ``--device auto|cpu|cuda``, resolved once for merge and extract."""

from __future__ import annotations

import torch

from .errors import ArgumentError

CHOICES = ("auto", "cpu", "cuda")


def resolve(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without CUDA is a clear error."""
    if device not in CHOICES:
        raise ArgumentError(f"device {device!r} is not one of {', '.join(CHOICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)

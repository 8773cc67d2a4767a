"""Publishing on the Hugging Face Hub: :func:`push` (with the model card) and :func:`pull` (verified)."""

from __future__ import annotations

from .download import PullResult, pull
from .publish import PushResult, push

__all__ = ["PullResult", "PushResult", "pull", "push"]

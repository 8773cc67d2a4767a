"""The merge methods by name: ``--method`` choices and :func:`get_method`."""

from __future__ import annotations

from ..errors import ArgumentError
from . import dare, dare_ties, della, della_linear, magnitude_prune, task_arithmetic, ties
from .base import Method

METHODS: dict[str, Method] = {
    m.METHOD.name: m.METHOD for m in (task_arithmetic, ties, magnitude_prune, dare, dare_ties, della, della_linear)
}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``, or :class:`ArgumentError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ArgumentError(f"unknown merge method {name!r} (known: {', '.join(METHOD_NAMES)})") from None


def describe_method(
    name: str, *, density: float | None = None, majority_sign: str | None = None, seed: int = 0, epsilon: float | None = None
) -> dict[str, object]:
    """What ``--json`` reports of a method: its name and the options it reads, defaults filled in (checked as the command checks them)."""
    method = get_method(name)
    return method.describe(method.options(density=density, majority_sign=majority_sign, seed=seed, epsilon=epsilon))

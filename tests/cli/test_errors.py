"""One table from exception type to exit code."""

from __future__ import annotations

import pytest

from loratools.cli.errors import EXIT_HUB, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, describe
from loratools.errors import ArgumentError, DependencyError, FormatError, HubError, OutputExistsError, SpecError


@pytest.mark.parametrize(
    "error,code",
    [
        (HubError("down"), EXIT_HUB),
        (ArgumentError("rank must be >= 1"), EXIT_USAGE),
        (SpecError("bad"), EXIT_INPUT),
        (FormatError("corrupt", path="/x"), EXIT_INPUT),
        (OutputExistsError("exists", path="/o"), EXIT_INPUT),
        (DependencyError("needs matplotlib"), EXIT_INPUT),
        (FileNotFoundError(2, "No such file or directory", "/nope"), EXIT_INPUT),
        (KeyboardInterrupt(), EXIT_INTERRUPTED),
        (ZeroDivisionError("x"), EXIT_INTERNAL),
    ],
)
def test_exit_codes(error, code):
    assert describe(error)[1] == code


def test_messages_name_the_file_and_say_what_happened():
    assert describe(FormatError("corrupt", path="/x", key="t"))[0] == "/x: t: corrupt"
    assert describe(FileNotFoundError(2, "No such file or directory", "/nope"))[0] == "/nope: No such file or directory"
    assert describe(KeyboardInterrupt())[0] == "interrupted; no output was written"
    assert describe(ZeroDivisionError("x"))[0].startswith("internal error: ZeroDivisionError: x (rerun with --debug")

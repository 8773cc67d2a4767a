"""Text from files and servers is made safe before it reaches a terminal."""

from __future__ import annotations

from loratools.cli.console import plain, safe


def test_plain_escapes_every_control_character():
    assert plain("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert plain("line\nnext\r\x00\x7f\x9b") == "line\\nnext\\r\\x00\\x7f\\x9b"
    assert plain("fine: ünïcode ΔW ‖·‖") == "fine: ünïcode ΔW ‖·‖"
    assert plain("\u2028") == "\\u2028"


def test_safe_also_escapes_rich_markup():
    assert safe("[red]x[/red]\n") == "\\[red]x\\[/red]\\n"

"""The root ``loratools`` group: options every command shares, lazy command loading, one error exit.

Commands live in leaf modules (:data:`COMMANDS`) that never import this one; a leaf is imported only
when its command runs or its help is shown, and leaves reach the library through the lazy
``loratools`` facade, so ``--help``, ``COMMAND --help`` and ``--version`` never import torch.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import signal
import sys
import traceback
from typing import Any

import click

import loratools

from .console import err, safe
from .errors import EXIT_INTERRUPTED, describe

# On exit CPython runs one last full GC over every object alive, torch's ~10^6 among them
# (measured: 0.4 s of a 1.7 s `import torch` process on 2 cores).  The CLI process owns nothing
# that needs it, so everything is frozen out of that pass.
atexit.register(gc.freeze)

# command name -> (leaf module, click command in it)
COMMANDS: dict[str, tuple[str, str]] = {
    "add": ("loratools.cli.arith", "add"),
    "convert": ("loratools.cli.formats", "convert"),
    "diff": ("loratools.cli.formats", "diff"),
    "extract": ("loratools.cli.formats", "extract"),
    "inspect": ("loratools.cli.inspect", "inspect"),
    "merge": ("loratools.cli.merge", "merge"),
    "meta": ("loratools.cli.meta", "meta"),
    "pull": ("loratools.cli.hub", "pull"),
    "push": ("loratools.cli.hub", "push"),
    "resize": ("loratools.cli.arith", "resize"),
    "scale": ("loratools.cli.arith", "scale"),
    "subtract": ("loratools.cli.arith", "subtract"),
    "unmerge": ("loratools.cli.merge", "unmerge"),
    "validate": ("loratools.cli.validate", "validate"),
}


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _Group(click.Group):
    """Loads commands on demand and turns every exception into one stderr line and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        # From here on SIGINT and SIGTERM unwind like Ctrl-C, so atomic outputs clean up after themselves.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - the one place that must catch everything
            _fail(error, debug=_debug(ctx))
        except KeyboardInterrupt as error:
            _fail(error, debug=_debug(ctx))


def _fail(error: BaseException, *, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    message, code = describe(error)
    err.print(f"[bold red]error:[/] {safe(message)}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(code)


def _version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"loratools, version {loratools.__version__}")
        ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version, help="Show the version and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (or set LORATOOLS_DEBUG=1).")
def main(debug: bool) -> None:
    """Check, shrink, combine, bake in and publish LoRA adapters.

    \b
    Examples:
      loratools validate ./my-adapter --base ./Llama-3-8B
      loratools inspect ./my-adapter --spectrum
      loratools resize ./my-adapter --rank 8 -o ./my-adapter-r8
      loratools add ./style ./subject -w 0.7 -w 0.5 -o ./combined
      loratools merge ./Llama-3-8B ./my-adapter -o ./Llama-3-8B-merged
      loratools convert my_lora.safetensors --to peft --base ./sd15.safetensors -o ./my-lora
      loratools push ./my-adapter me/my-adapter
      loratools pull me/my-adapter@main -o ./my-adapter

    Exit codes: 0 ok, 1 invalid adapter, 2 bad usage, 3 bad input/output,
    4 Hub/network error, 70 internal error, 130 interrupted.
    """
    # --debug is read back from ctx.params by _Group.invoke when it reports an error


__all__ = ["EXIT_INTERRUPTED", "main"]

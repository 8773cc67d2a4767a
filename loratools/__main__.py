"""``python -m loratools`` runs the CLI."""

from .cli import main

main(prog_name="loratools")

"""The command line: the only importer of click and rich. Each command parses, calls one library function
through `options.run`, and renders (`render`).

Layout: `app` (the group and the error boundary), `options` (shared option decorators and the runner),
`render` (terminal output), `commands` (one function per command).
"""

from loratools.cli import commands as _commands  # noqa: F401  (registers the commands on the group)
from loratools.cli.app import LoratoolsGroup, cli, main

__all__ = ["LoratoolsGroup", "cli", "main"]

"""The command line: the only importer of click and rich. Each command parses, calls one library function
through `options.run`, and renders (`render`).

Layout: `app` (the group and the error boundary), `options` (shared option decorators and the runner),
`render` / `render_export` (terminal output), `commands` (the adapter commands), `export` (the ONNX commands).
Nothing here imports torch until a command runs: library modules are imported inside each command, result
types only for type checking (a test holds ``import loratools.cli`` and ``--help`` to it).
"""

from loratools.cli import commands as _commands  # noqa: F401  (registers the commands on the group)
from loratools.cli import export as _export  # noqa: F401
from loratools.cli import genai as _genai  # noqa: F401
from loratools.cli.app import LoratoolsGroup, cli, main

__all__ = ["LoratoolsGroup", "cli", "main"]

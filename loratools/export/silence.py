"""Keep third-party chatter (prints, warnings, log records) out of the user's terminal: library code never prints."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def silenced(loggers: Iterable[str]) -> Iterator[None]:
    """For the duration: these loggers ("root" for the root logger) at ERROR, Python warnings ignored, stdout
    swallowed. Levels are restored afterwards, also where a library changed them meanwhile (onnxruntime's
    quantizer sets the root logger to INFO when imported)."""
    names = list(loggers)
    saved = {name: logging.getLogger(None if name == "root" else name).level for name in names}
    for name in names:
        logging.getLogger(None if name == "root" else name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(None if name == "root" else name).setLevel(level)

"""Keep third-party chatter (prints, warnings, log records, progress bars) out of the user's terminal: library
code never prints. One mechanism, `silenced`, with the loggers of each library that talks; transformers has its
own verbosity and progress-bar switches besides (`quiet_transformers`)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator

ONNX_LOGGERS = ("onnxruntime", "onnx", "onnxscript", "root")
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._export", "onnxscript")


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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """`silenced` for transformers' logger, with its verbosity at error and its progress bars off; all restored
    afterwards. Import transformers only inside (it is optional and slow to import)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with silenced(["transformers"]):
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()

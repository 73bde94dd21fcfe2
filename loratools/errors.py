"""The exception tree. Every error a user can cause is a LoratoolsError; the CLI prints it as one line."""


class LoratoolsError(Exception):
    """Base class: a problem with the user's input or request, reported without a traceback."""


class CheckpointError(LoratoolsError, OSError):
    """A checkpoint file or folder is missing, truncated, corrupt or inconsistent."""


class FormatError(LoratoolsError, ValueError):
    """An adapter's keys or config do not form a valid PEFT or kohya adapter."""


class ShapeError(LoratoolsError, ValueError):
    """Tensor shapes disagree (adapter for another model, resized vocabulary, ...)."""


class OutputError(LoratoolsError, FileExistsError):
    """The output path exists, or lies inside an input."""


class ExportError(LoratoolsError, RuntimeError):
    """ONNX export or verification failed."""


class ModelError(LoratoolsError, ValueError):
    """A model folder cannot be run as asked (architecture unknown or unsupported, no tokenizer, …)."""

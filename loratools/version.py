"""The package version: one string, imported by the writer (provenance) and the CLI (``--version``)."""

__version__ = "0.1.0"

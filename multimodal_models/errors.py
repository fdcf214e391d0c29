"""Errors that tell the user what was wrong with their input, and where."""

from __future__ import annotations

from pathlib import Path


class MultimodalError(Exception):
    """Base class of the errors this package raises on purpose."""


class DataFormatError(MultimodalError, ValueError):
    """A data file does not hold what its format promises.

    The message names the file, the record (index or id) and the field, so the user can
    open the file and fix the exact place.
    """

    def __init__(self, file: str | Path, message: str, *, record: object = None, field: str | None = None):
        self.file = str(file)
        self.record = record
        self.field = field
        where = self.file
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ImageLoadError(MultimodalError, ValueError):
    """An image could not be read safely (not an image, truncated, too many pixels...)."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


class WrongModelError(MultimodalError, ValueError):
    """A model of another kind than the one asked for (a dual encoder where a VLM is needed...)."""


class MissingDependencyError(MultimodalError, RuntimeError):
    """A feature needs a program or package that is not installed; the message says which and how to get it."""

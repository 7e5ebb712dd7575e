"""Errors the export stages raise for problems a user can fix; the CLI prints them as one line."""

from __future__ import annotations

from lvvit.errors import LvvitError


class ExportError(LvvitError, RuntimeError):
    """A bad input or a failed check; the message names the file or setting at fault."""


class ParityError(ExportError):
    """The exported model disagrees with its reference beyond the tolerance."""


class TensorRTUnavailable(ExportError):
    """TensorRT cannot run here (package missing or no GPU); the ONNX export stays valid."""

"""The errors of inspect-image that end it without a report: the image cannot be had from its
source, or one of its layers cannot be read or does not match its digest."""

from __future__ import annotations

from envcheck.errors import EXIT_USAGE, EnvcheckError


class SourceError(EnvcheckError):
    """The image cannot be read from its source; the message names it and the cause."""


class UnreadableImage(SourceError):
    """A local path that is not there or not an image at all (exit 2)."""

    exit_code = EXIT_USAGE


class LayerError(SourceError, ValueError):
    """A layer that cannot be read or does not match its digest; the message names it."""

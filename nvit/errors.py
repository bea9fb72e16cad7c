"""One error hierarchy for everything nvit reports to a user.

The CLI turns any :class:`NvitError` into a single red line and a non-zero exit code; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class NvitError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""

    exit_code: int = 1


class SpecError(NvitError):
    """An architecture spec is malformed or describes an impossible model."""


class CheckpointError(NvitError):
    """A checkpoint file is missing, unreadable or does not match the architecture."""


class LutError(NvitError):
    """A latency lookup table is missing, corrupt, or measured under other conditions."""


class BackendError(NvitError):
    """A profiling/inference backend is unavailable or did not get the device it was asked for."""


class TargetError(NvitError):
    """A latency target cannot be reached."""


class ExportError(NvitError):
    """Export or numerical verification of an exported model failed."""


class OutputError(NvitError):
    """An output path cannot be written: a file stands where a folder is needed, or the reverse."""

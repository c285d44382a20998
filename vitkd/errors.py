"""Errors a user can cause; each message names the bad value and the fix."""

__all__ = ["VitkdError", "ConfigError", "CheckpointError", "ImageError", "IncompatibleModelsError"]


class VitkdError(Exception):
    """Base class for problems caused by user input, shown as one line, never a traceback."""


class ConfigError(VitkdError):
    """A configuration value (preset, head map, loss, data source, option) is invalid."""


class CheckpointError(VitkdError):
    """A checkpoint file is missing, corrupt, truncated or not a vitkd checkpoint."""


class ImageError(VitkdError):
    """An input image cannot be decoded or is outside the supported size range."""


class IncompatibleModelsError(VitkdError):
    """A model vitkd cannot read attention from, or a teacher/student pair that does not match."""

"""Exceptions for user mistakes. The CLI prints these as one line (no traceback unless --debug)."""


class WSLError(Exception):
    """Base class for errors caused by the user's input (data, checkpoints, options)."""


class DataError(WSLError, ValueError):
    """Bad dataset content: unknown class, empty split, unreadable image, malformed annotation."""


class CheckpointError(WSLError, ValueError):
    """A checkpoint that is unreadable, unsafe, or made for another model."""


class OutputExistsError(WSLError, FileExistsError):
    """An output would be overwritten and ``--overwrite`` was not given."""


class NumericalError(WSLError, FloatingPointError):
    """Training diverged (NaN or inf loss)."""


class MissingExtraError(WSLError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""

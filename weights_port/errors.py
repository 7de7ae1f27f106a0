"""Errors raised while reading checkpoint files.

Both classes derive from `ValueError`, so callers that only care about "this file is unusable" can catch
`CheckpointError` (or `ValueError`). Messages always name the file and say what was expected.
"""

__all__ = ["CheckpointError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """The file is corrupt, truncated, of the wrong kind, or uses a feature the reader does not support."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle in the file referenced a global that is not on the reader's allow-list.

    The message names the global (e.g. ``os.system``). Nothing from the file was imported or executed.
    """

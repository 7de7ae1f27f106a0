"""Errors raised while reading checkpoint files.

Both classes derive from `ValueError`, so callers that only care about "this file is unusable" can catch
`CheckpointError` (or `ValueError`). Messages always name the file and say what was expected.
"""

__all__ = ["CheckpointError", "UnsafeCheckpointError", "short_repr"]


class CheckpointError(ValueError):
    """The file is corrupt, truncated, of the wrong kind, or uses a feature the reader does not support."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle in the file referenced a global that is not on the reader's allow-list.

    The message names the global (e.g. ``os.system``). Nothing from the file was imported or executed.
    """


def short_repr(value, limit: int = 60) -> str:
    """A message-sized description of a value read from a file.

    Scalars and other plain objects appear as their (truncated) ``repr``; containers only by type and length, so
    a hostile value (deeply nested, cyclic, huge) never makes the message itself slow or fail.
    """
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + "..."
    if isinstance(value, (list, tuple, dict, set, frozenset, bytes, bytearray)):
        return f"<{type(value).__name__} of length {len(value)}>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. RecursionError from a deeply nested object
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."

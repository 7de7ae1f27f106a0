"""Built-in reference labellers for evaluation (``--labels faces``); see :mod:`gansem.references.faces`."""

from .faces import CLASS_NAMES, IGNORE, segment_faces

__all__ = ["CLASS_NAMES", "IGNORE", "segment_faces"]

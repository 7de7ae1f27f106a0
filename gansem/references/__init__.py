"""Reference labels for scoring clusters: labels sources (:mod:`.sources`) and built-in labellers (:mod:`.faces`)."""

from .faces import CLASS_NAMES, IGNORE, segment_faces
from .sources import (
    BUILTIN_LABELS,
    MAX_REF_CLASSES,
    CallableLabels,
    EvaluationError,
    FileLabels,
    LabelsSource,
    load_labels_callable,
    resolve_labels_source,
)

__all__ = [
    "CLASS_NAMES", "IGNORE", "segment_faces",
    "BUILTIN_LABELS", "MAX_REF_CLASSES", "CallableLabels", "EvaluationError", "FileLabels", "LabelsSource",
    "load_labels_callable", "resolve_labels_source",
]

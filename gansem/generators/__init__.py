"""Generator families: Flax ports of published GANs behind one interface (:class:`Generator`).

Importing this package registers every family shipped in this build
(:func:`families`). Loading a generator by name or from a checkpoint file is
:func:`gansem.zoo.load_generator`, which sits above both the families and the
checkpoint converters of :mod:`weights_port`.
"""

from __future__ import annotations

from . import biggan, dcgan, pggan, stylegan, stylegan2, synthetic  # noqa: F401  (registers the families)
from .base import (
    FeatureLayer,
    Generator,
    GeneratorError,
    family_class,
    families,
    load_checkpoint,
    register_family,
    save_checkpoint,
)

__all__ = [
    "FeatureLayer", "Generator", "GeneratorError",
    "save_checkpoint", "load_checkpoint", "families", "family_class", "register_family",
]

"""Generator families (Flax ports of published GANs) and how to load them by name or path.

``load_generator(spec)`` accepts

* a built-in name: ``"dcgan-digiface"`` (the 64×64 DigiFace DCGAN whose weights
  ship in the ``gan-face-generate`` wheel),
* a gansem checkpoint directory written by ``python -m weights_port convert``,
* an original checkpoint file (NVIDIA ``.pkl``, rosinality ``.pt``, genforce
  ``.pth``, BigGAN ``pytorch_model.bin``), converted in memory.
"""

from __future__ import annotations

import importlib
import os

from .base import (  # noqa: F401
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
    "FeatureLayer", "Generator", "GeneratorError", "load_generator", "BUILTIN_GENERATORS",
    "save_checkpoint", "load_checkpoint", "families", "family_class", "register_family",
]

_FAMILY_MODULES = ("dcgan", "stylegan2", "stylegan", "pggan", "biggan", "synthetic")

BUILTIN_GENERATORS = {
    "dcgan-digiface": "64×64 DCGAN trained on DigiFace-1M; weights from the gan-face-generate wheel",
    "synthetic-bands": "32×32 synthetic task with known truth (KLiSH Fig. 2 as images); "
                       "true labels: gansem.generators.synthetic:true_labels",
}


def _import_families():
    for m in _FAMILY_MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:  # a family not shipped in this build
            if e.name != f"{__name__}.{m}":
                raise


_import_families()


def load_generator(spec: str):
    """Resolve a generator name or path.

    Returns:
        ``(generator, params, metadata)`` with params as a nested dict of host arrays.

    Raises:
        GeneratorError: unknown name, missing/corrupt file; the message lists what is accepted.
    """
    from weights_port.errors import CheckpointError

    if spec in BUILTIN_GENERATORS and spec.startswith("synthetic"):
        from .synthetic import builtin_generator

        return builtin_generator(spec)
    if spec == "dcgan-digiface":
        from weights_port import dcgan as dcgan_port
        from weights_port.torch_reader import load_torch_file

        path = dcgan_port.bundled_weights_path()
        try:
            obj = load_torch_file(path)
            gen, params, info = dcgan_port.convert("torch-zip", obj)
        except CheckpointError as e:
            raise GeneratorError(f"{path}: {e}") from None
        return gen, params, {"name": spec, "family": gen.family, "source": {"path": path, **info}}
    if os.path.isdir(spec) and (os.path.isfile(os.path.join(spec, "generator.json"))
                                or not os.path.isfile(os.path.join(spec, "pytorch_model.bin"))):
        return load_checkpoint(spec)
    if os.path.exists(spec):  # an original checkpoint file (or a BigGAN directory): convert in memory
        from weights_port.convert import convert_file

        try:
            gen, params, info = convert_file(spec)
        except CheckpointError as e:
            raise GeneratorError(str(e)) from None
        return gen, params, {"name": os.path.basename(spec), "family": gen.family, "source": info}
    raise GeneratorError(
        f"unknown generator {spec!r}: give a built-in name ({', '.join(sorted(BUILTIN_GENERATORS))}), "
        "a gansem checkpoint directory (python -m weights_port convert SRC DST), "
        "or an original checkpoint file"
    )

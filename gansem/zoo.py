"""Load a generator by name or path: the name→loader registry above generators and converters.

``load_generator(spec)`` accepts

* a built-in name (:data:`BUILTIN_GENERATORS`): ``"dcgan-digiface"`` (the 64×64
  DigiFace DCGAN whose weights ship in the ``gan-face-generate`` wheel) or a
  synthetic task with known truth (``"synthetic-bands"``),
* a gansem checkpoint directory written by ``python -m weights_port convert``,
* an original checkpoint file (NVIDIA ``.pkl``, rosinality ``.pt``, genforce
  ``.pth``, BigGAN ``pytorch_model.bin``), converted in memory.

Layering: the generator families (:mod:`gansem.generators`) know nothing about
checkpoint formats; the converters (:mod:`weights_port`) build generators; this
module sits above both and is the one place that maps a name to a loader.
"""

from __future__ import annotations

import os

from weights_port import convert as wp_convert
from weights_port import dcgan as wp_dcgan
from weights_port import torch_reader
from weights_port.errors import CheckpointError

from .generators import base
from .generators import synthetic

__all__ = ["BUILTIN_GENERATORS", "load_generator"]

#: Built-in generator names and what they are.
BUILTIN_GENERATORS = {
    "dcgan-digiface": "64×64 DCGAN trained on DigiFace-1M; weights from the gan-face-generate wheel",
    "synthetic-bands": "32×32 synthetic task with known truth (KLiSH Fig. 2 as images); "
                       "true labels: gansem.generators.synthetic:true_labels",
}


def load_generator(spec: str):
    """Resolve a generator name or path.

    Returns:
        ``(generator, params, metadata)`` with params as a nested dict of host arrays.

    Raises:
        GeneratorError: unknown name, missing/corrupt file; the message lists what is accepted.
    """
    if spec in BUILTIN_GENERATORS and spec.startswith("synthetic"):
        return synthetic.builtin_generator(spec)
    if spec == "dcgan-digiface":
        path = wp_dcgan.bundled_weights_path()  # CheckpointError naming the package to install
        try:
            gen, params, info = wp_dcgan.convert("torch-zip", torch_reader.load_torch_file(path))
        except CheckpointError as e:
            raise base.GeneratorError(f"{path}: {e}") from None
        return gen, params, {"name": spec, "family": gen.family, "source": {"path": path, **info}}
    if os.path.isdir(spec) and (os.path.isfile(os.path.join(spec, "generator.json"))
                                or not os.path.isfile(os.path.join(spec, "pytorch_model.bin"))):
        return base.load_checkpoint(spec)
    if os.path.exists(spec):  # an original checkpoint file (or a BigGAN directory): convert in memory
        try:
            gen, params, info = wp_convert.convert_file(spec)
        except CheckpointError as e:
            raise base.GeneratorError(str(e)) from None
        return gen, params, {"name": os.path.basename(spec), "family": gen.family, "source": info}
    raise base.GeneratorError(
        f"unknown generator {spec!r}: give a built-in name ({', '.join(sorted(BUILTIN_GENERATORS))}), "
        "a gansem checkpoint directory (python -m weights_port convert SRC DST), "
        "or an original checkpoint file"
    )

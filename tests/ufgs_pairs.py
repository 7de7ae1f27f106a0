"""Test data for the UFGS and USCS tests: an in-memory pair source, a trivially learnable labelling,
the ``.npz`` layout of ``launch/segment.py`` and a launch script's one-line errors.

:class:`Pairs` follows the protocol of ``gansem.ufgs.records`` (``len``, ``[i] -> {"image",
"label", ...}``, ``num_classes``, ``resolution``, ``palette``, ``class_names``, ``meta``)
without importing it.
"""

import numpy as np
from PIL import Image


class Pairs:
    """In-memory (image, label) pairs: ``images`` uint8 [N, R, R, 3], ``labels`` int [N, R, R]."""

    def __init__(self, images, labels, num_classes, palette=None, class_names=None, meta=None):
        self.images, self.labels = np.asarray(images), np.asarray(labels)
        self.num_classes = int(num_classes)
        self.resolution = int(self.images.shape[1])
        self.palette = palette
        self.class_names = class_names
        self.meta = dict(meta or {})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def colour_blobs(n, size, seed=0, noise=4.0):
    """Smooth random colour fields and the label "which of R, G, B is largest" (3 classes).

    A 4×4 grid of random colours is upsampled bilinearly to ``size``; the label of a pixel is
    the argmax of its noise-free colour, the image adds Gaussian noise of ``noise`` grey levels.

    Returns:
        ``(images uint8 [n, size, size, 3], labels int32 [n, size, size])``.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 4, 4, 3)).astype(np.float32)
    smooth = np.stack([np.stack([np.asarray(Image.fromarray(c[..., ch]).resize((size, size), Image.BILINEAR))
                                 for ch in range(3)], -1) for c in coarse])
    labels = smooth.argmax(-1).astype(np.int32)
    images = np.clip(np.round(smooth + rng.normal(0, noise, smooth.shape)), 0, 255).astype(np.uint8)
    return images, labels


def segment_npz(path, images, labels, k):
    """Write pairs in the layout launch/segment.py writes (images, labels, k, latents); returns the path."""
    np.savez_compressed(path, images=images, labels=labels.astype(np.int32), k=np.int32(k),
                        latents=np.zeros((len(images), 4), np.float32))
    return str(path)


def cli_error(cli, argv, capsys) -> str:
    """Run a launch script's ``main(argv)``, expect exit status 2 and exactly one ``error:`` line; return it."""
    assert cli.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]

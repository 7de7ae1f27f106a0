"""A small fake USCS synthesiser with exactly the interface of ``gansem.uscs.synth.Synthesizer``.

The painting page and its server are tested against it (no SPADE training needed); the
interface is the one in the helpers' contract (issue 22)::

    synth.num_classes, synth.resolution, synth.palette [K, 3] uint8, synth.class_names (K str),
    synth.run_dir, synth.meta, synth.num_examples
    synth.generate(masks, *, seed=0)  # int [N, R, R] -> uint8 [N, R, R, 3]; [R, R] -> [R, R, 3]
    synth.example(i)                  # (image uint8 [R, R, 3], mask int32 [R, R])

:func:`check_synthesizer` checks an object against that interface; it passes for the fake
and is meant for the real synthesiser too.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FakeSynthesizer", "PALETTE", "check_synthesizer"]

#: Distinct class colours (the fake takes the first K).
PALETTE = np.array([[70, 130, 180], [230, 190, 60], [200, 60, 80], [60, 170, 110],
                    [150, 90, 200], [240, 120, 40], [30, 30, 30], [220, 220, 220]], dtype=np.uint8)


class FakeSynthesizer:
    """Deterministic stand-in for a trained USCS generator.

    ``generate`` paints each class in its palette colour, blurs with a 3 x 3 box filter
    (so neighbouring classes bleed a little, as a real generator's would) and adds
    uniform noise in ``[-12, 12]`` drawn from ``seed``: the image depends on every pixel
    of the mask and on the seed, and is the same for the same (mask, seed).

    Args:
        num_classes: K (at most ``len(PALETTE)``).
        resolution: R.
        num_examples: how many dataset pairs :meth:`example` offers.
        class_names: K names; default ``("class 0", ...)``.
        run_dir: reported as the run directory.
    """

    def __init__(self, num_classes: int = 4, resolution: int = 32, num_examples: int = 3,
                 class_names=None, run_dir: str = "runs/fake-uscs"):
        if not 1 <= num_classes <= len(PALETTE):
            raise ValueError(f"the fake has colours for 1..{len(PALETTE)} classes, not {num_classes}")
        self.num_classes = num_classes
        self.resolution = resolution
        self.palette = PALETTE[:num_classes].copy()
        self.class_names = tuple(class_names) if class_names else tuple(f"class {i}" for i in range(num_classes))
        self.run_dir = run_dir
        self.num_examples = num_examples
        self.meta = {"kind": "uscs-fake", "num_classes": num_classes, "resolution": resolution,
                     "palette": self.palette.tolist(), "class_names": list(self.class_names)}

    def _check(self, masks) -> np.ndarray:
        m = np.asarray(masks)
        r = self.resolution
        if m.ndim not in (2, 3) or m.shape[-2:] != (r, r):
            raise ValueError(f"masks must be [N, {r}, {r}] or [{r}, {r}]; got shape {m.shape}")
        if not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"masks must hold integer class ids; got {m.dtype}")
        if m.size and (m.min() < 0 or m.max() >= self.num_classes):
            raise ValueError(f"class ids must be in 0..{self.num_classes - 1}; got {m.min()}..{m.max()}")
        return m

    def generate(self, masks, *, seed: int = 0) -> np.ndarray:
        """``masks`` int ``[N, R, R]`` (or ``[R, R]``) -> uint8 ``[N, R, R, 3]`` (or ``[R, R, 3]``)."""
        m = self._check(masks)
        single = m.ndim == 2
        m = m[None] if single else m
        colour = self.palette[m].astype(np.float32)                      # [N, R, R, 3]
        padded = np.pad(colour, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        r = self.resolution
        blurred = sum(padded[:, dy:dy + r, dx:dx + r] for dy in range(3) for dx in range(3)) / 9.0
        noise = np.random.default_rng(seed).integers(-12, 13, size=colour.shape[1:])  # [R, R, 3], per seed
        out = np.clip(np.rint(blurred) + noise, 0, 255).astype(np.uint8)
        return out[0] if single else out

    def example_mask(self, i: int) -> np.ndarray:
        """The mask of pair ``i``: class 0 background, a disc of class 1, a band of class 2, a corner of class 3."""
        r = self.resolution
        y, x = np.mgrid[:r, :r]
        mask = np.zeros((r, r), np.int32)
        radius = r * (0.2 + 0.05 * (i % 4))
        mask[(y - r / 2) ** 2 + (x - r / 2 + i) ** 2 < radius ** 2] = 1 % self.num_classes
        mask[(y >= r - r // 4 - i % 3) & (y < r - i % 3)] = 2 % self.num_classes
        mask[(y < r // 6) & (x < r // 6 + i)] = 3 % self.num_classes
        return mask

    def example(self, i: int) -> tuple:
        """``(image uint8 [R, R, 3], mask int32 [R, R])`` of dataset pair ``i``."""
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example {i} out of range 0..{self.num_examples - 1}")
        mask = self.example_mask(i)
        return self.generate(mask, seed=1000 + i), mask


def check_synthesizer(synth) -> None:
    """Assert that ``synth`` has the USCS synthesiser interface (the page's contract)."""
    k, r = synth.num_classes, synth.resolution
    assert isinstance(k, int) and k >= 1 and isinstance(r, int) and r >= 1
    palette = np.asarray(synth.palette)
    assert palette.dtype == np.uint8 and palette.shape == (k, 3)
    assert len(synth.class_names) == k and all(isinstance(n, str) for n in synth.class_names)
    assert isinstance(synth.run_dir, str) and isinstance(synth.meta, dict)
    assert isinstance(synth.num_examples, int) and synth.num_examples >= 0

    masks = np.stack([np.arange(r * r).reshape(r, r) % k, np.zeros((r, r), np.int64)]).astype(np.int32)
    batch = synth.generate(masks, seed=3)
    assert batch.dtype == np.uint8 and batch.shape == (2, r, r, 3)
    one = synth.generate(masks[0], seed=3)
    assert one.shape == (r, r, 3) and np.array_equal(one, batch[0])
    assert np.array_equal(one, synth.generate(masks[0], seed=3)), "generate is not deterministic"
    for bad in (np.full((r, r), k), np.full((r, r), -1), np.zeros((r, r + 1), np.int32)):
        try:
            synth.generate(bad)
        except ValueError:
            continue
        raise AssertionError(f"generate took a bad mask of shape {bad.shape}, values {bad.min()}..{bad.max()}")
    if synth.num_examples:
        image, mask = synth.example(synth.num_examples - 1)
        image, mask = np.asarray(image), np.asarray(mask)
        assert image.dtype == np.uint8 and image.shape == (r, r, 3)
        assert np.issubdtype(mask.dtype, np.integer) and mask.shape == (r, r)
        assert mask.min() >= 0 and mask.max() < k

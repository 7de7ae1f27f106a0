"""USCS -- Unsupervised Semantic-Conditional Synthesis (KLiSH Sec. 5).

The (generated image, KLiSH cluster mask) pairs that UFGS trains segmenters on also train
the reverse map: a SPADE/GauGAN generator (Park et al. 2019) that turns a mask of the
discovered classes into an image, so a user can paint a layout and get a picture.

Modules (each importable on its own):

* :mod:`gansem.uscs.models` -- SPADE generator (spatially-adaptive normalisation, residual blocks),
  multi-scale PatchGAN discriminator, optional style encoder (VAE), in Flax linen.
* :mod:`gansem.uscs.losses` -- hinge GAN loss, discriminator feature matching, KL divergence.
* :mod:`gansem.uscs.train` -- data-parallel optax training (two optimisers, TTUR) with resumable Orbax checkpoints.
* :mod:`gansem.uscs.synth` -- a trained run as a :class:`~gansem.uscs.synth.Synthesizer`: masks in, images out.
* :mod:`gansem.uscs.evaluate` -- mask recovery of generated images by a UFGS segmenter, feature distances.
* :mod:`gansem.uscs.server` -- the painting page: a Flask app around a synthesiser.
"""

"""The seed papers' other methods, each built from gansem's shared pieces (generators, features, K-means,
sharding, UFGS, viz).

* :mod:`gansem.methods.stylemix` -- network-free style-mixing segmentation (seed 003): style summary
  tensor, per-image K-means, corner-minority and saliency foreground rules.
* :mod:`gansem.methods.mask_dataset` -- the foreground-mask datasets (UFGS format) that style mixing and
  the latent-direction segmenter write, and the reference-foreground helper they share.
* :mod:`gansem.methods.stylemix_run` -- its run directory: segmentation report and pictures, the
  cutoff/colour-space ablation, and a foreground-mask dataset in the UFGS format.
* :mod:`gansem.methods.latent_clusters` -- image-level clusters of a generator layer's
  representation ``G_[n](z)`` (K-means on the sharded engine), hierarchical refinement,
  assignment of new latents (cluster-guided synthesis, seed 002, Sec. 3.2).
* :mod:`gansem.methods.imle` -- per-cluster mappings ``T_c`` trained by IMLE (seed 002, Eq. 2-3).
* :mod:`gansem.methods.cluster_sampling` -- the cluster-guided sampling job: clusters, IMLE,
  evaluation (assignment accuracy against the prior), pictures and report.
* :mod:`gansem.methods.labels4free` -- Labels4Free (seed 001): alpha network on a frozen StyleGAN2's
  features, background generator with the first layer switched off, regularisers B/C/E, the
  tRGB-noise and gradient layer analyses, the paper's per-dataset configs.
* :mod:`gansem.methods.labels4free_run` -- its resumable data-parallel training run (optax, Orbax),
  evaluation against reference labels (Acc, IoU fg/bg, mIoU, F1, Prec, Rec, maxFβ) and report.
* :mod:`gansem.methods.stylegan2_discriminator` -- the StyleGAN2 discriminator in Flax (Labels4Free's
  weak discriminator, trained from scratch).
* :mod:`gansem.methods.latent_direction` -- the latent-direction segmenter (seed 004): directions ``v_l``,
  ``v_d`` minimising the brightness (radial prior) and Sobel edge-consistency terms (Eq. 1), masks from
  ``G(z + εv_l)`` vs ``G(z + εv_d)`` (Eq. 2), the dataset refinement.
* :mod:`gansem.methods.latent_direction_run` -- its run: directions, a UFGS mask dataset, the segmenter
  trained on it, evaluation against a reference and trivial baselines, pictures and report.
"""

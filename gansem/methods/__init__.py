"""Seed-paper methods built from gansem's shared pieces (generators, features, cluster, sharding, viz).

* :mod:`gansem.methods.latent_clusters` -- image-level clusters of a generator layer's
  representation ``G_[n](z)`` (K-means on the sharded engine), hierarchical refinement,
  assignment of new latents (cluster-guided synthesis, seed 002, Sec. 3.2).
* :mod:`gansem.methods.imle` -- per-cluster mappings ``T_c`` trained by IMLE (seed 002, Eq. 2-3).
* :mod:`gansem.methods.cluster_sampling` -- the cluster-guided sampling job: clusters, IMLE,
  evaluation (assignment accuracy against the prior), pictures and report.
"""

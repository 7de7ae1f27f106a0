"""The seed papers' other methods, each built from gansem's shared pieces (generators, K-means, sharding, UFGS).

Modules:
    stylemix: network-free style-mixing segmentation (seed 003): style summary tensor,
        per-image K-means, corner-minority and saliency foreground rules.
    stylemix_run: its run directory: segmentation report and pictures, the cutoff/colour-space
        ablation, and a foreground-mask dataset in the UFGS format.
"""

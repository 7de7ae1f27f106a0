"""The SPADE objectives: hinge GAN loss, discriminator feature matching, KL divergence (SPADE Sec. 3, App. A).

With ``D_s`` the patch logits of discriminator scale ``s`` (``S`` scales), ``x`` a real
image, ``x̂ = G(m)`` a generated one and every mean taken over the batch and the patches::

    L_D      = 1/S Σ_s [ mean relu(1 - D_s(m, x)) + mean relu(1 + D_s(m, x̂)) ]        (hinge, Lim & Ye 2017)
    L_G,adv  = -1/S Σ_s mean D_s(m, x̂)
    L_G,FM   = 1/S Σ_s Σ_l mean |F_s,l(m, x̂) - F_s,l(m, x)|                          (pix2pixHD feature matching,
                                                                                      l over every layer but the logits)
    L_KL     = mean_b  -1/2 Σ_j (1 + log σ²_bj - μ²_bj - σ²_bj)                     (VAE, with the style encoder)
    L_G      = L_G,adv + λ_FM L_G,FM + λ_KL L_KL                (SPADE: λ_FM = 10, λ_KL = 0.05)

The SPADE reference sums the KL divergence over the batch as well; here it is the mean
over samples, so its weight does not depend on the batch size. SPADE's VGG perceptual
loss (λ = 10) is not available: it needs ImageNet-trained VGG-19 weights, which gansem
does not ship and cannot download; training uses the three terms above.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["hinge_d_loss", "hinge_g_loss", "feature_matching_loss", "kl_divergence"]


def hinge_d_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The discriminator's hinge loss on real and generated pairs, averaged over scales.

    Args:
        real_logits, fake_logits: one ``[B, h_s, w_s, 1]`` logit map per scale.

    Returns:
        ``(L_real, L_fake)``: ``1/S Σ_s mean relu(1 - D_s(real))`` and ``1/S Σ_s mean relu(1 + D_s(fake))``
        (float32 scalars; ``L_D`` is their sum).
    """
    real = sum(jnp.mean(jax.nn.relu(1.0 - r)) for r in real_logits) / len(real_logits)
    fake = sum(jnp.mean(jax.nn.relu(1.0 + f)) for f in fake_logits) / len(fake_logits)
    return real, fake


def hinge_g_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """The generator's hinge loss ``-1/S Σ_s mean D_s(fake)`` (float32 scalar)."""
    return -sum(jnp.mean(f) for f in fake_logits) / len(fake_logits)


def feature_matching_loss(fake_feats: Sequence[Sequence[jax.Array]],
                          real_feats: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """``1/S Σ_s Σ_l mean |F_fake - F_real|`` over every layer but the last (the logits) of each scale.

    The real features are constants (``stop_gradient``): only the generator learns from this loss.

    Args:
        fake_feats, real_feats: per scale, the list of layer outputs ``[B, h_l, w_l, C_l]``
            (as :class:`gansem.uscs.models.MultiscaleDiscriminator` returns them).
    """
    total = 0.0
    for fs, rs in zip(fake_feats, real_feats):
        for f, r in zip(fs[:-1], rs[:-1]):
            total = total + jnp.mean(jnp.abs(f - jax.lax.stop_gradient(r)))
    return total / len(fake_feats)


def kl_divergence(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(μ, σ²) || N(0, I))`` summed over the ``z_dim`` dimensions, averaged over the batch.

    Args:
        mu, logvar: ``[B, z_dim]``.
    """
    per_sample = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)
    return jnp.mean(per_sample)

"""Per-cluster latent mappings ``T_c`` trained by Implicit Maximum Likelihood Estimation (IMLE).

Cluster-guided image synthesis (Georgopoulos et al., "Cluster-guided Image Synthesis
with Unconditional Models", seed paper 002, Sec. 3.3 and Algorithm 1): the latent codes
``z^c`` whose generator representations fall in cluster ``c`` follow no known
distribution, so a mapping ``T_c`` from an auxiliary normal ``e^c ~ N(0, I)`` to them is
learned by IMLE. Each epoch, for every cluster:

1. draw Γ auxiliary vectors ``e^c_γ`` and map them, ``z~^c_γ = T_c(e^c_γ)``;
2. match every target ``z^c_i`` to its nearest mapped sample **in latent space** (Eq. 2)::

       e^c_i = argmin_γ || z^c_i - T_c(e^c_γ) ||²

3. take SGD (Adam) steps on the matched pairs, in mini-batches (Eq. 3)::

       T_c <- argmin_T  sum_i || z^c_i - T(e^c_i) ||²

``T_c`` is three bias-free fully connected layers with batch normalisation between them
(Sec. 4.7); the paper does not name an activation, and without one the map would be
affine (``T_c(e)`` Gaussian), so a leaky ReLU follows each batch norm.

**Outputs on the prior's sphere** (``latent_radius``). Left unconstrained, IMLE shrinks
every ``T_c`` towards its cluster's mean, whatever Γ: the targets of a cluster are prior
draws, ``z = μ_c + w`` with ``w`` nearly ``N(0, I_d)``, i.e. of full intrinsic dimension d.
For a model ``x = μ_c + s·w'`` the best of Γ samples has ``w·w' ≈ sqrt(2 ln Γ)·sqrt(d)``, so
Eq. 2's value is ``E min_γ ||z - x_γ||² ≈ d - 2 s sqrt(2 d ln Γ) + s² d``, smallest at
``s* = sqrt(2 ln Γ / d)`` (0.41 for d = 100, Γ = 4096; 0.44 for Γ = 16384). Eq. 3 finds this
fixed point: the mean of the targets matched to a sample is the shrunk sample itself. On
the 100-d DCGAN this is what was measured (unconstrained, Γ = 4096, 30 epochs): every
``T_c`` spread ``||T_c(e) - mean||`` ≈ 0.43 × its targets', ``||T_c(e)|| ≈ 4.5`` against
≈ 10, while no sample was a hub (at most 4-8 targets per matched sample; regressing the
matched targets on their samples gives a slope 0.93-0.99). The DCGAN renders such short
latents as low-contrast images, and the largest cluster, whose mean is nearly 0, as a
texture. The paper's generators (PGAN, StyleGAN) normalise ``z`` at their input (pixel
norm), so for them only the direction of ``T_c(e)`` matters and the shrinkage is harmless;
the DCGAN has no such normalisation, so ``T_c`` ends in it instead:
``T_c(e) = r · h / ||h||`` with ``r`` the prior's root-mean-square norm (``sqrt(d)`` for
``N(0, I)``, where the prior's mass concentrates). Eq. 2 and Eq. 3 are unchanged; the same
argument then applies to directions only: the samples' directions are those of
``μ_c / s* + w``, a cluster mean amplified about 2.4 times on top of full-dimensional
variation, so samples are slightly more typical of their cluster than its members, but
not collapsed.

**Learning rate.** The paper gives no schedule; Adam's rate decays by ``lr_decay`` per
epoch (IMLE's reference code has a stepwise decay), a function of the epoch only, so the
last epochs refine instead of jittering around the fixed point.

**All clusters at once.** The parameters, BatchNorm statistics and Adam state of the
``C`` mappings are stacked along a leading cluster axis and one epoch is one jitted
program ``vmap``-ed over it; the random numbers of cluster ``c`` come from
``fold_in(key, c)``, so training a cluster alone or together with others gives the same
result (:func:`epoch_program`). Clusters have different sizes: targets travel padded
(:class:`ClusterTargets`), and every step draws ``batch_size`` rows of each cluster
from that cluster's own random permutation, cycling through it (a small cluster sees
its targets more than once per epoch; batches are always full, so batch norm never
sees padding).

**Nearest neighbours in tiles.** :func:`nearest_neighbours` compares ``query_tile``
targets with ``candidate_tile`` mapped samples at a time on the device and keeps a
running minimum, so memory stays ``O(tile²)`` whatever M and Γ.

**IMLE objective.** The value reported per epoch is Eq. 2's, the mean over a cluster's
targets of ``min_γ ||z_i - T_c(e_γ)||²``, measured after the epoch's Adam steps on one fixed
draw of Γ auxiliary vectors per cluster (:func:`evaluation_draw`, the same in every epoch;
``T_c`` normalised with that draw's own batch statistics, as in the matching step). The
curve is therefore a deterministic function of the parameters: a fresh draw every epoch
(what the matching uses, reported as ``matching_objective``) adds sampling noise larger
than the late epochs' progress. Per epoch the matching's hubness is reported too: the most
targets matched to one sample and the fraction of samples matched at all.

**Checkpoints.** :func:`train_imle` saves the stacked state with Orbax every
``checkpoint_every`` epochs (the latest two kept, via
:func:`gansem.training.checkpoint_manager`); epoch ``t`` draws its random numbers
from ``fold_in(key, t)`` only, so N epochs, then a resumed run to 2N, gives the same
bits as 2N epochs in one go, also after the process was killed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import training


__all__ = [
    "MappingNet",
    "IMLEConfig",
    "IMLEState",
    "IMLEResult",
    "ClusterTargets",
    "pack_targets",
    "nearest_neighbours",
    "init_state",
    "epoch_program",
    "imle_objective",
    "evaluation_draw",
    "train_imle",
    "map_auxiliary",
    "sample_cluster_latents",
    "IMLEError",
]


class IMLEError(ValueError):
    """Impossible IMLE settings or a checkpoint that does not fit them."""


class MappingNet(nn.Module):
    """``T_c``: ``e [N, aux_dim] -> z [N, out_dim]``; three bias-free dense layers, batch norm between them.

    ``Dense(hidden) -> BN -> leaky ReLU -> Dense(hidden) -> BN -> leaky ReLU -> Dense(out_dim)``
    (paper Sec. 4.7; the activation is ours, see the module docstring), then, with ``radius``,
    the output is put on the sphere of that radius, ``z = radius · h / ||h||`` (the module
    docstring says why).

    Attributes:
        out_dim: latent size of the generator (flattened ``latent_shape``).
        hidden: width of the two hidden layers.
        bn_momentum: decay of the BatchNorm running statistics.
        radius: norm of every output (``None``: the last dense layer's output as it is).
    """

    out_dim: int
    hidden: int = 256
    bn_momentum: float = 0.9
    negative_slope: float = 0.2
    radius: Optional[float] = None

    @nn.compact
    def __call__(self, e, train: bool):
        h = e
        for i in range(2):
            h = nn.Dense(self.hidden, use_bias=False, name=f"dense{i}")(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name=f"bn{i}")(h)
            h = nn.leaky_relu(h, self.negative_slope)
        h = nn.Dense(self.out_dim, use_bias=False, name=f"dense{2}")(h)
        if self.radius is None:
            return h
        return self.radius * h * jax.lax.rsqrt(jnp.sum(h * h, -1, keepdims=True) + 1e-12)


@dataclasses.dataclass(frozen=True)
class IMLEConfig:
    """Settings of the mappings and their training (hashable: one set of programs per config).

    Attributes:
        latent_dim: size of the generator's (flattened) latent z.
        aux_dim: size of the auxiliary normal ``e`` (default: ``latent_dim``).
        hidden: width of ``T_c``'s hidden layers.
        num_aux: Γ, auxiliary samples drawn per cluster and epoch for the matching (Eq. 2), and the
            size of the fixed draw the reported objective is measured on.
        batch_size: matched pairs per cluster and Adam step (Eq. 3).
        steps_per_epoch: Adam steps per epoch (default: one pass over the largest cluster,
            ``ceil(max count / batch_size)``; set by :func:`pack_targets`'s caller).
        lr: Adam learning rate of the first epoch.
        lr_decay: the rate is multiplied by this after every epoch (``lr · lr_decay^t`` in epoch
            ``t``; a function of the epoch only, so a resumed run keeps the schedule).
        query_tile, candidate_tile: tile sizes of the nearest-neighbour search.
        bn_momentum: BatchNorm running-statistics decay.
        latent_radius: ``T_c``'s outputs lie on the sphere of this radius (the generator prior's
            root-mean-square norm, e.g. ``sqrt(latent_dim)`` for ``N(0, I)``; see the module
            docstring); ``None``: unconstrained outputs, which shrink towards the cluster mean.
    """

    latent_dim: int
    aux_dim: Optional[int] = None
    hidden: int = 256
    num_aux: int = 4096
    batch_size: int = 128
    steps_per_epoch: Optional[int] = None
    lr: float = 1e-3
    lr_decay: float = 1.0
    query_tile: int = 256
    candidate_tile: int = 1024
    bn_momentum: float = 0.9
    latent_radius: Optional[float] = None

    @property
    def e_dim(self) -> int:
        return int(self.aux_dim or self.latent_dim)

    def model(self) -> MappingNet:
        return MappingNet(out_dim=int(self.latent_dim), hidden=int(self.hidden), bn_momentum=float(self.bn_momentum),
                          radius=None if self.latent_radius is None else float(self.latent_radius))

    def check(self) -> None:
        """Raises :class:`IMLEError` naming the first impossible value."""
        for name in ("latent_dim", "hidden", "num_aux", "batch_size", "query_tile", "candidate_tile"):
            if int(getattr(self, name)) < 1:
                raise IMLEError(f"IMLE {name} must be >= 1, got {getattr(self, name)}")
        for name in ("aux_dim", "steps_per_epoch"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise IMLEError(f"IMLE {name} must be >= 1 (or unset), got {getattr(self, name)}")
        if not self.lr > 0:
            raise IMLEError(f"IMLE learning rate must be > 0, got {self.lr}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise IMLEError(f"IMLE lr_decay must be in (0, 1], got {self.lr_decay}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise IMLEError(f"IMLE bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if self.latent_radius is not None and not self.latent_radius > 0:
            raise IMLEError(f"IMLE latent_radius must be > 0 (or unset), got {self.latent_radius}")


class ClusterTargets(NamedTuple):
    """The latent codes of every cluster, padded to a common length.

    Attributes:
        z: ``[C, M, latent_dim] float32``; rows ``>= counts[c]`` of cluster c are padding.
        counts: ``[C] int32`` real rows per cluster (each >= 1).
        cluster_ids: ``[C] int32`` the clusters' ids; cluster ``c``'s random numbers come from
            ``fold_in(key, cluster_ids[c])`` (so a cluster trains the same alone or with others).
    """

    z: Any
    counts: Any
    cluster_ids: Any


def pack_targets(latents, labels, clusters: Sequence[int]) -> ClusterTargets:
    """Group latent codes by cluster: ``latents [N, ...]``, ``labels [N]`` -> :class:`ClusterTargets`.

    Raises:
        IMLEError: a cluster in ``clusters`` has no latent code.
    """
    latents = np.asarray(latents, np.float32).reshape(len(labels), -1)
    labels = np.asarray(labels)
    groups = [latents[labels == c] for c in clusters]
    empty = [c for c, g in zip(clusters, groups) if len(g) == 0]
    if empty:
        raise IMLEError(f"cluster(s) {empty} have no latent code to fit a mapping to")
    m = max(len(g) for g in groups)
    z = np.zeros((len(groups), m, latents.shape[1]), np.float32)
    for i, g in enumerate(groups):
        z[i, : len(g)] = g
    return ClusterTargets(z=z, counts=np.array([len(g) for g in groups], np.int32),
                          cluster_ids=np.asarray(clusters, np.int32))


# -- nearest neighbours (Eq. 2) -------------------------------------------------------------


def _pad_rows(x, multiple: int, value=0.0):
    n = x.shape[0]
    pad = -(-n // multiple) * multiple - n
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=value)


@functools.partial(jax.jit, static_argnames=("query_tile", "candidate_tile"))
def nearest_neighbours(queries, candidates, *, query_tile: int = 256, candidate_tile: int = 1024):
    """Nearest candidate of every query in squared Euclidean distance, tile by tile on the device.

    ``||q - c||² = |q|² - 2 q·c + |c|²`` is evaluated for ``[query_tile, candidate_tile]``
    blocks; a scan over candidate tiles keeps the running minimum (ties go to the lower
    index), a map runs over query tiles. The returned distance is recomputed exactly as
    ``sum((q - c*)²)`` for the chosen candidate.

    Args:
        queries: ``[M, D]`` (the targets ``z^c_i``).
        candidates: ``[G, D]`` (the mapped samples ``T_c(e_γ)``, G = Γ).

    Returns:
        ``(index [M] int32, sq_dist [M] float32)``.
    """
    m, g = queries.shape[0], candidates.shape[0]
    qt, ct = min(query_tile, m), min(candidate_tile, g)
    q = _pad_rows(queries.astype(jnp.float32), qt).reshape(-1, qt, queries.shape[1])
    c = _pad_rows(candidates.astype(jnp.float32), ct)
    c_sq = jnp.where(jnp.arange(c.shape[0]) < g, jnp.sum(c * c, -1), jnp.inf)  # padding never wins
    c_tiles = (c.reshape(-1, ct, c.shape[1]), c_sq.reshape(-1, ct), jnp.arange(0, c.shape[0], ct))

    def query_block(qb):  # qb [qt, D]
        q_sq = jnp.sum(qb * qb, -1)

        def candidate_block(best, tile):
            cb, cb_sq, start = tile
            d = q_sq[:, None] - 2.0 * jnp.dot(qb, cb.T, precision=jax.lax.Precision.HIGHEST) + cb_sq[None]
            j = jnp.argmin(d, axis=1)
            dj = jnp.take_along_axis(d, j[:, None], 1)[:, 0]
            better = dj < best[0]  # strict: an earlier tile keeps a tie
            return (jnp.where(better, dj, best[0]), jnp.where(better, start + j, best[1]).astype(jnp.int32)), None

        init = (jnp.full((qb.shape[0],), jnp.inf, jnp.float32), jnp.zeros((qb.shape[0],), jnp.int32))
        (_, idx), _ = jax.lax.scan(candidate_block, init, c_tiles)
        return idx

    idx = jax.lax.map(query_block, q).reshape(-1)[:m]
    exact = jnp.sum((queries.astype(jnp.float32) - candidates[idx].astype(jnp.float32)) ** 2, -1)
    return idx, exact


# -- the training state and programs ---------------------------------------------------------


class IMLEState(NamedTuple):
    """The stacked state of C mappings (every leaf has a leading cluster axis ``[C, ...]``).

    Attributes:
        epoch: int32 [] completed epochs.
        params: ``T_c`` parameters, ``[C, ...]`` per leaf.
        batch_stats: BatchNorm running means and variances, ``[C, ...]``.
        opt_state: Adam moments and counts, ``[C, ...]``.
    """

    epoch: Any
    params: Any
    batch_stats: Any
    opt_state: Any


def _cluster_noise(key, cluster_ids, n: int):
    """``[C, n]`` standard normals, row c from ``fold_in(key, cluster_ids[c])``: one RNG op per program
    (each threefry op costs a second or more of XLA:CPU compile time)."""
    return jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(key, c), (n,), jnp.float32))(cluster_ids)


def _optimizer(config: IMLEConfig):
    """Adam; the rate falls by ``lr_decay`` per epoch (Adam's step count / ``steps_per_epoch``)."""
    if config.lr_decay == 1.0 or config.steps_per_epoch is None:
        return optax.adam(config.lr)
    return optax.adam(optax.exponential_decay(config.lr, int(config.steps_per_epoch), config.lr_decay,
                                              staircase=True))


def init_state(config: IMLEConfig, key, cluster_ids) -> IMLEState:
    """Fresh mappings for ``cluster_ids [C]``; cluster c's weights are drawn from ``fold_in(key, c)``. Jittable.

    Shapes first (``jax.eval_shape`` of the module's init), then one normal draw per cluster
    cut into the kernels, scaled by ``1/sqrt(fan_in)`` (LeCun normal); BatchNorm starts at
    scale 1, bias 0, mean 0, variance 1.
    """
    shapes = jax.eval_shape(functools.partial(config.model().init, train=False), jax.random.key(0),
                            jnp.zeros((2, config.e_dim), jnp.float32))
    kernels = {name: leaf["kernel"].shape for name, leaf in shapes["params"].items() if "kernel" in leaf}
    noise = _cluster_noise(key, jnp.asarray(cluster_ids, jnp.int32), sum(a * b for a, b in kernels.values()))
    c, params, start = noise.shape[0], {}, 0
    for name, leaf in shapes["params"].items():
        if name in kernels:
            fan_in, fan_out = kernels[name]
            w = noise[:, start:start + fan_in * fan_out].reshape(c, fan_in, fan_out) / np.sqrt(fan_in)
            params[name], start = {"kernel": w}, start + fan_in * fan_out
        else:
            params[name] = {"scale": jnp.ones((c,) + leaf["scale"].shape), "bias": jnp.zeros((c,) + leaf["bias"].shape)}
    stats = jax.tree.map(lambda x: jnp.zeros((c,) + x.shape), shapes["batch_stats"])
    stats = {name: {"mean": v["mean"], "var": v["var"] + 1.0} for name, v in stats.items()}
    return IMLEState(epoch=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                     opt_state=jax.vmap(_optimizer(config).init)(params))


@functools.lru_cache(maxsize=8)
def _init_program(config: IMLEConfig):
    return jax.jit(functools.partial(init_state, config))


def map_auxiliary(config: IMLEConfig, params, batch_stats, e, *, train: bool = False):
    """``T_c(e)`` for stacked mappings: ``e [C, n, aux_dim] -> z [C, n, latent_dim]``. Jittable.

    ``train=True`` normalises with the statistics of ``e``'s own rows (as in training);
    ``False`` with the running statistics (for sampling).
    """
    model = config.model()

    def one(p, s, x):
        if train:
            return model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])[0]
        return model.apply({"params": p, "batch_stats": s}, x, train=False)

    return jax.vmap(one)(params, batch_stats, e)


def epoch_program(config: IMLEConfig) -> Callable:
    """The jitted IMLE epoch ``(state, targets, key, e_eval) -> (state, metrics)`` (Algorithm 1's loop body).

    Every cluster draws Γ = ``num_aux`` auxiliary vectors from ``key``, maps them with batch
    statistics of the whole pool (the running statistics are not updated by this pass),
    matches each of its targets to the nearest mapped sample (Eq. 2, :func:`nearest_neighbours`),
    then runs ``steps_per_epoch`` Adam steps on mini-batches of matched pairs minimising the
    mean of ``||z_i - T_c(e_i)||²`` (Eq. 3), all clusters at once (``vmap``). Afterwards the
    IMLE objective is measured on the fixed evaluation draw ``e_eval`` (module docstring).

    Args (of the returned function):
        state: :class:`IMLEState`, donated.
        targets: :class:`ClusterTargets`.
        key: this epoch's PRNG key.
        e_eval: ``[C, G_eval, aux_dim]`` the same auxiliary draw every epoch (:func:`evaluation_draw`).

    Returns:
        A jitted function; ``metrics`` holds, per cluster ``[C]``: ``objective`` (Eq. 2 on
        ``e_eval``, :func:`imle_objective`, after the epoch's steps), ``matching_objective``
        (mean matched squared distance of the epoch's own draw, before its steps), ``loss``
        (mean step loss), ``max_in_degree`` (most targets matched to one sample) and
        ``matched_fraction`` (distinct matched samples / ``min(count, Γ)``).
    """
    if config.steps_per_epoch is None:
        raise IMLEError("epoch_program needs config.steps_per_epoch (train_imle sets it from the cluster sizes)")
    return _epoch_program(config)


def _masked_objective(dist, valid, counts):
    return jnp.sum(jnp.where(valid, dist, 0.0), 1) / counts


def imle_objective(config: IMLEConfig, params, batch_stats, targets: ClusterTargets, e):
    """Eq. 2's value ``mean_i min_γ ||z_i - T_c(e_γ)||²`` per cluster. Jittable.

    ``T_c`` normalises with the batch statistics of ``e``'s own rows, as in the matching step
    (a function of the parameters only; the running statistics are neither used nor updated).

    Args:
        targets: :class:`ClusterTargets` (``z [C, M, d]``, padding excluded by ``counts``).
        e: ``[C, G, aux_dim]`` auxiliary vectors.

    Returns:
        ``[C] float32``.
    """
    nn_search = functools.partial(nearest_neighbours, query_tile=config.query_tile,
                                  candidate_tile=config.candidate_tile)
    z, counts, _ = targets
    _, dist = jax.vmap(nn_search)(z, map_auxiliary(config, params, batch_stats, e, train=True))
    return _masked_objective(dist, jnp.arange(z.shape[1])[None, :] < counts[:, None], counts)


def evaluation_draw(config: IMLEConfig, key, cluster_ids, n: Optional[int] = None):
    """The fixed auxiliary draw the objective is reported on: ``[C, n, aux_dim]`` (``n``: Γ), row c from
    ``fold_in(key, cluster_ids[c])``."""
    n = int(config.num_aux if n is None else n)
    return _eval_draw(config.e_dim, n, key, jnp.asarray(cluster_ids, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_draw(e_dim, n, key, cluster_ids):
    return _cluster_noise(key, cluster_ids, n * e_dim).reshape(-1, n, e_dim)


@functools.lru_cache(maxsize=8)
def _epoch_program(config: IMLEConfig):
    model, tx = config.model(), _optimizer(config)
    gamma, b, steps = int(config.num_aux), int(config.batch_size), int(config.steps_per_epoch)
    nn_search = functools.partial(nearest_neighbours, query_tile=config.query_tile,
                                  candidate_tile=config.candidate_tile)

    def adam_step(p, st, o, zb, eb):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": st}, eb, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.sum((out - zb) ** 2, -1)), upd["batch_stats"]  # Eq. 3 on the batch

        (loss, st), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), st, o, loss

    def epoch(state: IMLEState, targets: ClusterTargets, key, e_eval):
        z, counts, ids = targets
        _, m, _ = z.shape
        noise = _cluster_noise(key, ids, gamma * config.e_dim + m)
        e = noise[:, : gamma * config.e_dim].reshape(-1, gamma, config.e_dim)                  # [C, Γ, aux]
        z_tilde = map_auxiliary(config, state.params, state.batch_stats, e, train=True)   # [C, Γ, d]
        idx, dist = jax.vmap(nn_search)(z, z_tilde)                                       # Eq. 2: [C, M]
        valid = jnp.arange(m)[None, :] < counts[:, None]
        in_degree = jax.vmap(lambda i, v: jnp.zeros((gamma,), jnp.int32).at[i].add(v.astype(jnp.int32)))(idx, valid)
        e_match = jnp.take_along_axis(e, idx[..., None], 1)                               # [C, M, aux]
        order = jnp.argsort(jnp.where(valid, noise[:, gamma * config.e_dim:], jnp.inf), axis=1)  # rows shuffled

        def step(carry, s):
            p, st, o = carry
            rows = jnp.take_along_axis(order, (s * b + jnp.arange(b))[None, :] % counts[:, None], 1)   # [C, B]
            zb = jnp.take_along_axis(z, rows[..., None], 1)
            eb = jnp.take_along_axis(e_match, rows[..., None], 1)
            p, st, o, loss = jax.vmap(adam_step)(p, st, o, zb, eb)
            return (p, st, o), loss

        (p, st, o), losses = jax.lax.scan(step, (state.params, state.batch_stats, state.opt_state),
                                          jnp.arange(steps))
        new = IMLEState(epoch=state.epoch + 1, params=p, batch_stats=st, opt_state=o)
        return new, {"objective": imle_objective(config, p, st, targets, e_eval),
                     "matching_objective": _masked_objective(dist, valid, counts),
                     "loss": jnp.mean(losses, 0),
                     "max_in_degree": jnp.max(in_degree, 1),
                     "matched_fraction": jnp.sum(in_degree > 0, 1) / jnp.minimum(counts, gamma)}

    return jax.jit(epoch, donate_argnums=0)


# -- the driver ------------------------------------------------------------------------------


class IMLEResult(NamedTuple):
    """What :func:`train_imle` returns.

    Attributes:
        state: the final :class:`IMLEState`.
        config: the :class:`IMLEConfig` used (``steps_per_epoch`` filled in).
        history: one record per epoch from the first: ``{"epoch"}`` and the metrics of
            :func:`epoch_program` (lists of C floats).
        resumed_from: the epoch a resumed run continued from (``None``: not resumed).
    """

    state: IMLEState
    config: IMLEConfig
    history: list
    resumed_from: Optional[int]


def train_imle(targets: ClusterTargets, key, config: IMLEConfig, *, epochs: int, run_dir: Optional[str] = None,
               resume: bool = False, checkpoint_every: int = 10, progress: bool = False,
               on_epoch: Optional[Callable[[dict], None]] = None) -> IMLEResult:
    """Train one mapping ``T_c`` per cluster by IMLE (Algorithm 1), all clusters in one program.

    Args:
        targets: the clusters' latent codes (:func:`pack_targets`).
        key: PRNG key; the weights come from ``fold_in(fold_in(key, 0), c)``, epoch ``t``'s samples
            from ``fold_in(fold_in(key, 1), t)``, the fixed evaluation draw of the reported objective
            from ``fold_in(fold_in(key, 2), c)``.
        config: :class:`IMLEConfig` (``steps_per_epoch=None``: one pass over the largest cluster).
        epochs: train until this many epochs are done.
        run_dir: save Orbax checkpoints in ``run_dir/checkpoints`` (``None``: none).
        resume: continue from the latest checkpoint in ``run_dir`` (from scratch if there is none).
        checkpoint_every: epochs between checkpoints (and after the last).
        progress: a progress bar with the objective.
        on_epoch: called with each new epoch record.

    Returns:
        :class:`IMLEResult`.
    """
    counts = np.asarray(targets.counts)
    if config.steps_per_epoch is None:
        config = dataclasses.replace(config, steps_per_epoch=int(-(-int(counts.max()) // config.batch_size)))
    config.check()
    if epochs < 0 or checkpoint_every < 1:
        raise IMLEError(f"epochs must be >= 0 and checkpoint_every >= 1, got {epochs} and {checkpoint_every}")
    if resume and run_dir is None:
        raise IMLEError("resume=True needs the run_dir holding the checkpoints")
    k_init, k_train, k_eval = (jax.random.fold_in(key, i) for i in range(3))
    init = _init_program(config)
    targets = ClusterTargets(*(jnp.asarray(a) for a in targets))
    state, history, resumed_from = None, [], None
    mngr = training.checkpoint_manager(run_dir, create=True) if run_dir is not None else None
    try:
        if mngr is not None and resume:
            here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # as the programs' outputs: no recompile
            abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here),
                                    jax.eval_shape(init, k_init, targets.cluster_ids))
            restored = training.restore_latest(mngr, {"state": abstract._asdict()}, run_dir, error=IMLEError,
                                               with_meta=True)
            if restored is not None:
                state, history = IMLEState(**restored[1]["state"]), list(restored[1]["meta"]["history"])
                resumed_from = int(state.epoch)
                history = history[:resumed_from]
        if state is None:
            state = init(k_init, targets.cluster_ids)
        run_epoch = epoch_program(config)
        e_eval = evaluation_draw(config, k_eval, targets.cluster_ids)
        start = int(state.epoch)
        with tqdm(total=epochs, initial=min(start, epochs), desc="IMLE epochs", disable=not progress,
                  unit="epoch") as bar:
            for t in range(start, epochs):
                state, metrics = run_epoch(state, targets, jax.random.fold_in(k_train, t), e_eval)
                rec = {"epoch": t + 1, **{k: np.asarray(v).astype(float).tolist() for k, v in metrics.items()}}
                history.append(rec)
                if on_epoch is not None:
                    on_epoch(rec)
                bar.set_postfix(objective=f"{np.mean(rec['objective']):.3f}")
                bar.update(1)
                if mngr is not None and ((t + 1) % checkpoint_every == 0 or t + 1 == epochs):
                    training.save_checkpoint(mngr, t + 1, {"state": state._asdict()},
                                             {"epoch": t + 1, "history": history})
    finally:
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    return IMLEResult(state=state, config=config, history=history, resumed_from=resumed_from)


def sample_cluster_latents(config: IMLEConfig, state: IMLEState, key, cluster_ids, n: int):
    """Conditional latents ``z = T_c(e^c)``, ``e^c ~ N(0, I)`` from ``fold_in(key, c)`` (paper: G(z, c) = G(T_c(e^c))).

    Args:
        state: trained stacked mappings for ``cluster_ids [C]`` (running BatchNorm statistics are used).
        n: samples per cluster.

    Returns:
        ``z [C, n, latent_dim] float32``.
    """
    return _sample(config, state.params, state.batch_stats, key, jnp.asarray(cluster_ids, jnp.int32), int(n))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _sample(config, params, batch_stats, key, cluster_ids, n):
    e = _cluster_noise(key, cluster_ids, n * config.e_dim).reshape(-1, n, config.e_dim)
    return map_auxiliary(config, params, batch_stats, e)

"""The latent-direction segmenter (Melas-Kyriazi et al., ICLR 2022; seed paper 004, Sec. 3 and App. A.1).

A direction in a generator's latent space that brightens the foreground and darkens the
background (or the reverse) turns the generator into a labeller of its own samples:

1. **Directions** (Sec. 3.1, Eq. 1). For a unit vector ``v`` and a shift length ``ε``, the
   shifted image ``x' = G(z + ε v)`` is compared with ``x = G(z)`` by

   * the edge-consistency term ``L_s(v) = 1/N Σ_i ||S(x'_i) - S(x_i)||²`` with the
     Sobel-Feldman energy ``[S(x)]_uv = Σ_c (g * x_c)²_uv + (gᵀ * x_c)²_uv``,
     ``g = [1 2 1]ᵀ [1 0 -1]`` (:func:`sobel_energy`), and
   * the brightness term against the radial prior ``r_uv = 1 - α ||(u, v) - centre||``,
     ``α = 4 / sqrt((H-1)² + (W-1)²)`` (1 at the centre, -1 at the corners; :func:`radial_prior`):
     ``L_c(v) = -1/N Σ_i Σ_c <x'_ic, r>``,

   and ``v`` minimises ``L(v) = λ L_c(v) + L_s(v)`` (Eq. 1). With λ > 0 the minimiser
   brightens the centre against the border: ``v_l``; with ``-λ`` it darkens it: ``v_d``
   (Sec. 3.1.1). The paper prints ``L_c`` without the minus sign but states that λ > 0
   gives the foreground-lighter direction; we keep that statement, so the sign is in ``L_c``.
   The paper sums over pixels; we average over pixels (``/HW``) so that λ means the same at
   every resolution, and evaluate both terms on images mapped to [0, 1] (``(x + 1) / 2``).
   ``v = u / ||u||`` is parametrised by an unconstrained ``u`` (Adam, learning rate 0.05,
   1000 steps in App. A.1; ``u`` starts from ``N(0, I)``). Both directions are optimised
   together (``u [2, D]``, rows ``+λ`` and ``-λ``): Adam acts per coordinate, so this is
   the same as two separate runs, with one generator call for ``G(z)`` per step.

2. **Masks** (Sec. 3.2, Eq. 2). ``M(z) = [G(z + ε v_l) - G(z + ε v_d) > 0]`` on the
   brightness (the mean over the colour channels) of each pixel (:func:`direction_masks`).

3. **Refinement** (Sec. 3.2.1; the supplement with the exact values is not part of the
   text we have, so the thresholds of :class:`DirectionConfig` are ours): a sample is
   dropped when its foreground fraction is outside ``[min_foreground, max_foreground]``
   or when the mean absolute brightness change ``|G(z+εv_l) - G(z+εv_d)|`` is below
   ``min_change``; connected components (4-connectivity) of the foreground, and holes of
   the background, smaller than ``min_component`` of the image are flipped
   (:func:`refine_masks`).

**Latent spaces.** ``v`` lives where the paper puts it for each family
(:data:`LATENT_SPACES`): ``z`` for DCGAN, PGGAN and BigGAN (class-conditional: a class
drawn uniformly per sample, Sec. 3.2), ``w`` for StyleGAN and StyleGAN2 (the same shift
on every layer of ``w+``). The shift length ``ε`` defaults to 2 in ``z`` (Tab. 8) and
0.2 in ``w`` (App. B.1: "the latent space of StyleGAN2 has a different scale").

**Devices.** One optimisation step is one ``jax.jit`` program: the step's latents are drawn
from ``fold_in(key, step)`` inside it and split over the mesh's data axis, ``u`` and the
Adam state are replicated; the loss is the global-batch mean (the compiler inserts the
reductions), so 1 and 8 devices agree to float rounding. Masks of many samples go through
:func:`gansem.batching.map_batches` (the same bits on any device count dividing 8).

Example::

    gen, params, _ = gansem.zoo.load_generator("dcgan-digiface")
    cfg = DirectionConfig(steps=300, batch_size=16)
    res = optimise_directions(gen, params, cfg, jax.random.key(0), mesh=sharding.make_mesh())
    out = sample_masks(gen, params, cfg, res.v_light, res.v_dark, jax.random.key(1), np.arange(8))
    out["mask"]     # [8, 64, 64] bool, M(z) of Eq. 2
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage
from tqdm.auto import tqdm

from .. import sharding, training
from ..batching import map_batches
from ..generators.base import Generator
from .stylemix import prepare_generator

__all__ = [
    "LATENT_SPACES",
    "SOBEL_KERNEL",
    "LatentDirectionError",
    "DirectionConfig",
    "latent_space",
    "direction_dim",
    "radial_prior",
    "sobel_energy",
    "brightness_loss",
    "edge_loss",
    "direction_objective",
    "unit",
    "latent_codes",
    "images_from_codes",
    "shift_codes",
    "DirectionState",
    "DirectionResult",
    "direction_programs",
    "optimise_directions",
    "sample_inputs",
    "direction_masks",
    "iter_masks",
    "sample_masks",
    "remove_small_components",
    "refine_masks",
]

#: Where the direction lives, per generator family (the input of the synthesis network the paper shifts).
LATENT_SPACES = {"dcgan": "z", "pggan": "z", "biggan": "z", "stylegan": "w", "stylegan2": "w"}
#: ``g = [1 2 1]ᵀ [1 0 -1]``: the horizontal Sobel-Feldman kernel (rows: y, columns: x); ``gᵀ`` is the vertical one.
SOBEL_KERNEL = np.outer([1.0, 2.0, 1.0], [1.0, 0.0, -1.0]).astype(np.float32)


class LatentDirectionError(ValueError):
    """The generator or a setting cannot be used by the latent-direction segmenter (the message says why)."""


@dataclasses.dataclass(frozen=True)
class DirectionConfig:
    """Settings of the direction search and the mask refinement (names of seed paper 004).

    Attributes:
        lam: λ of Eq. 1 (the paper: 5; ``+λ`` gives ``v_l``, ``-λ`` gives ``v_d``).
        epsilon: ``ε``, the shift length ``||ε v||`` (``None``: 2.0 in z, 0.2 in w; Tab. 8, App. B.1).
        lr: Adam learning rate on ``u`` (the paper: 0.05).
        steps: optimisation steps (the paper: 1000).
        batch_size: latents per step (the paper does not say; a multiple of the device count).
        min_foreground, max_foreground: a mask whose foreground fraction is outside this range is dropped
            (ours: 0.05 and 0.8; the paper drops masks that are "too large").
        min_change: a sample whose mean absolute brightness change ``|G(z+εv_l) - G(z+εv_d)|`` (images in [0, 1],
            mean over channels and pixels) is below this is dropped (ours: 0.02).
        min_component: foreground components and background holes smaller than this fraction of the image
            are flipped (ours: 0.01).
    """

    lam: float = 5.0
    epsilon: Optional[float] = None
    lr: float = 0.05
    steps: int = 1000
    batch_size: int = 16
    min_foreground: float = 0.05
    max_foreground: float = 0.8
    min_change: float = 0.02
    min_component: float = 0.01

    def replace(self, **changes) -> "DirectionConfig":
        return dataclasses.replace(self, **changes)

    def shift(self, gen: Generator) -> float:
        """``ε`` for ``gen``: the given value, or the paper's default of its latent space."""
        if self.epsilon is not None:
            return float(self.epsilon)
        return 2.0 if latent_space(gen) == "z" else 0.2

    def check(self, gen: Generator, num_devices: int = 1) -> None:
        """Raises :class:`LatentDirectionError` naming the first setting that cannot work with ``gen``."""
        latent_space(gen)
        if not self.lam > 0:
            raise LatentDirectionError(f"lam (λ) must be > 0 (the dark direction uses -λ), got {self.lam}")
        if not self.shift(gen) > 0:
            raise LatentDirectionError(f"epsilon (ε) must be > 0, got {self.epsilon}")
        if not self.lr > 0:
            raise LatentDirectionError(f"lr must be > 0, got {self.lr}")
        if self.steps < 0:
            raise LatentDirectionError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.batch_size % num_devices:
            raise LatentDirectionError(f"batch_size must be a positive multiple of the {num_devices} device(s), "
                                       f"got {self.batch_size}")
        if not 0.0 <= self.min_foreground < self.max_foreground <= 1.0:
            raise LatentDirectionError("need 0 <= min_foreground < max_foreground <= 1, got "
                                       f"{self.min_foreground} and {self.max_foreground}")
        if self.min_change < 0 or not 0.0 <= self.min_component < 1.0:
            raise LatentDirectionError(f"need min_change >= 0 and min_component in [0, 1), got {self.min_change} "
                                       f"and {self.min_component}")


def latent_space(gen: Generator) -> str:
    """``"z"`` or ``"w"``: where ``gen``'s direction lives (:data:`LATENT_SPACES`).

    Raises:
        LatentDirectionError: a family without a latent space to shift (the synthetic toy).
    """
    space = LATENT_SPACES.get(gen.family)
    if space is None:
        by_space = {sp: ", ".join(f for f, v in LATENT_SPACES.items() if v == sp) for sp in ("z", "w")}
        raise LatentDirectionError(
            f"the latent-direction segmenter shifts a generator's latent code (z for {by_space['z']}; w for "
            f"{by_space['w']}); the {gen.family} generator has no such code to shift. Use one of those families")
    return space


def direction_dim(gen: Generator) -> int:
    """``D``: the dimension of the direction (``z_dim`` in z, ``w_dim`` in w)."""
    if latent_space(gen) == "z":
        return int(np.prod(gen.latent_shape))
    return int(gen.w_dim)


# -- the objective (Eq. 1) -----------------------------------------------------------------


def radial_prior(height: int, width: int):
    """``r [H, W]``: ``1 - α ||(i, j) - ((H-1)/2, (W-1)/2)||`` with ``α = 4 / sqrt((H-1)² + (W-1)²)`` (Sec. 3.1).

    1 at the centre, -1 at the corners (0 half-way), linear in the distance.
    """
    i = np.arange(height, dtype=np.float64) - (height - 1) / 2.0
    j = np.arange(width, dtype=np.float64) - (width - 1) / 2.0
    alpha = 4.0 / np.sqrt(max((height - 1) ** 2 + (width - 1) ** 2, 1))
    return jnp.asarray((1.0 - alpha * np.sqrt(i[:, None] ** 2 + j[None, :] ** 2)).astype(np.float32))


def sobel_energy(x):
    """``[S(x)]_uv = Σ_c (g * x_c)²_uv + (gᵀ * x_c)²_uv`` (Sec. 3.1), edges replicated at the border.

    Args:
        x: ``[B, H, W, C]`` float images.

    Returns:
        ``[B, H, W]`` float32.
    """
    x = jnp.asarray(x, jnp.float32)
    c = x.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    k = jnp.stack([jnp.asarray(SOBEL_KERNEL), jnp.asarray(SOBEL_KERNEL.T)], -1)  # [3, 3, 2]
    kernel = jnp.tile(k[:, :, None, :], (1, 1, 1, c))  # HWIO, depthwise: [3, 3, 1, 2C]
    # correlation with g (a convolution with the flipped kernel: the sign of each response, not its square, flips)
    out = jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=c, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(out * out, axis=-1)


def _unit_range(x):
    """Generator images ``[-1, 1]`` -> ``[0, 1]`` (the scale both terms are measured in)."""
    return (jnp.asarray(x, jnp.float32) + 1.0) * 0.5


def brightness_loss(x_shifted, prior):
    """``L_c = -1/N Σ_i Σ_c <x'_ic, r> / (HW)`` on images mapped to [0, 1] (Sec. 3.1; sign: see the module docstring).

    Args:
        x_shifted: ``[N, H, W, C]`` generator images ``G(z + εv)`` in [-1, 1].
        prior: ``[H, W]`` radial prior ``r``.

    Returns:
        float32 [].
    """
    x = _unit_range(x_shifted)
    return -jnp.mean(jnp.einsum("nhwc,hw->n", x, prior)) / (x.shape[1] * x.shape[2])


def edge_loss(x_shifted, x):
    """``L_s = 1/N Σ_i ||S(x'_i) - S(x_i)||² / (HW)`` on images mapped to [0, 1] (Sec. 3.1).

    Args:
        x_shifted, x: ``[N, H, W, C]`` generator images in [-1, 1].

    Returns:
        float32 [].
    """
    d = sobel_energy(_unit_range(x_shifted)) - sobel_energy(_unit_range(x))
    return jnp.mean(d * d)


def direction_objective(x_shifted, x, lam, prior):
    """``(L, L_c, L_s)`` with ``L = λ L_c + L_s`` (Eq. 1)."""
    lc, ls = brightness_loss(x_shifted, prior), edge_loss(x_shifted, x)
    return lam * lc + ls, lc, ls


def unit(u):
    """``u / ||u||`` along the last axis (a direction on the sphere ``S^{D-1}``)."""
    return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


# -- shifting latent codes ------------------------------------------------------------------


def latent_codes(gen: Generator, params, z, class_labels=None):
    """The codes the direction shifts: ``z [N, D]`` itself, or ``w+ [N, L, D]`` (StyleGAN families)."""
    if latent_space(gen) == "z":
        return z
    return gen.map_latents(params, z, class_labels)


def shift_codes(gen: Generator, codes, shift):
    """``codes + shift``: ``shift [D]`` (``ε v``) added to every sample, and to every layer of ``w+``."""
    if latent_space(gen) == "z":
        return codes + shift.reshape((1,) + codes.shape[1:])
    return codes + shift[None, None, :]


def images_from_codes(gen: Generator, params, codes, class_labels=None):
    """``G`` from the codes of :func:`latent_codes`: ``[N, H, W, 3]`` float32 in about [-1, 1]."""
    if latent_space(gen) == "z":
        return gen.synthesize(params, codes, class_labels)[0]
    return gen.synthesize_styles(params, codes)[0]


# -- optimisation ------------------------------------------------------------------------


class DirectionState(NamedTuple):
    """The optimisation state (a pytree, replicated on the mesh).

    Attributes:
        step: int32 [] completed steps.
        u: ``[2, D]`` float32 unnormalised directions; row 0 optimised with ``+λ`` (``v_l``),
            row 1 with ``-λ`` (``v_d``).
        opt_state: the Adam state of ``u``.
    """

    step: Any
    u: Any
    opt_state: Any


class DirectionResult(NamedTuple):
    """Output of :func:`optimise_directions`.

    Attributes:
        v_light, v_dark: ``[D]`` float32 unit directions ``v_l`` (foreground lighter) and ``v_d``.
        steps: steps done in total.
        history: one dict per logged step (``step``, ``loss_light``, ``loss_dark``, ``lc_*``, ``ls_*``).
        resumed_from: the step a resumed run started from (``None`` for a fresh run).
    """

    v_light: np.ndarray
    v_dark: np.ndarray
    steps: int
    history: list
    resumed_from: Optional[int]


class _Programs(NamedTuple):
    init: Any       # key -> DirectionState
    step: Any       # (DirectionState, key) -> (DirectionState, metrics)
    abstract: Any   # DirectionState of ShapeDtypeStructs with shardings


def sample_inputs(gen: Generator, key, n: int):
    """``(z [n, *latent_shape], class_labels [n] or None)`` from ``key`` (classes uniform, Sec. 3.2)."""
    z = gen.sample_latents(jax.random.fold_in(key, 0), n)
    return z, gen.sample_class_labels(jax.random.fold_in(key, 1), n)


@functools.lru_cache(maxsize=8)
def direction_programs(gen: Generator, config: DirectionConfig, mesh) -> _Programs:
    """The jitted initialisation and step (cached per generator, settings and mesh)."""
    dim, eps = direction_dim(gen), config.shift(gen)
    tx = optax.adam(config.lr)
    repl, rows = sharding.replicated(mesh), sharding.row_sharding(mesh)
    lams = jnp.asarray([config.lam, -config.lam], jnp.float32)

    def init(key) -> DirectionState:
        u = jax.random.normal(key, (2, dim), jnp.float32)
        return DirectionState(step=jnp.zeros((), jnp.int32), u=u, opt_state=tx.init(u))

    abstract, state_sh = training.replicated_state(lambda s: init(jax.random.key(s)), mesh)

    def step(state: DirectionState, params, key):
        z, classes = sample_inputs(gen, jax.random.fold_in(key, state.step), config.batch_size)
        z = jax.lax.with_sharding_constraint(z, rows)
        codes = latent_codes(gen, params, z, classes)
        x = jax.lax.stop_gradient(images_from_codes(gen, params, codes, classes))
        prior = radial_prior(x.shape[1], x.shape[2])

        def loss_fn(u):
            v = unit(u)
            outs = [direction_objective(images_from_codes(gen, params, shift_codes(gen, codes, eps * v[j]), classes),
                                        x, lams[j], prior) for j in range(2)]
            return outs[0][0] + outs[1][0], outs

        (_, outs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.u)
        updates, opt_state = tx.update(grads, state.opt_state, state.u)
        new = DirectionState(step=state.step + 1, u=optax.apply_updates(state.u, updates), opt_state=opt_state)
        metrics = {f"{name}_{side}": outs[j][i] for j, side in enumerate(("light", "dark"))
                   for i, name in enumerate(("loss", "lc", "ls"))}
        return new, metrics

    return _Programs(
        init=jax.jit(init, out_shardings=state_sh),
        step=jax.jit(step, in_shardings=(state_sh, repl, repl), out_shardings=(state_sh, repl), donate_argnums=0),
        abstract=abstract)


def _state_items(state: DirectionState) -> dict:
    return {"state": {"step": state.step, "u": state.u, "opt_state": state.opt_state}}


def optimise_directions(gen: Generator, params, config: DirectionConfig, key, *, mesh=None,
                        run_dir: Optional[str] = None, resume: bool = False, checkpoint_every: int = 100,
                        log_every: int = 10, progress: bool = False) -> DirectionResult:
    """Find ``v_l`` and ``v_d`` by minimising Eq. 1 with ``±λ`` (Adam on ``u``, ``v = u / ||u||``).

    Step ``t`` draws ``config.batch_size`` latents (and classes) from ``fold_in(key, t)``; ``u``
    starts from ``N(0, I)`` drawn from ``fold_in(key, 2**31 - 1)``. N steps, then a resumed run to
    2N, give the same bits as 2N steps in one go (on the same devices), also after the process was
    killed.

    Args:
        gen, params: the generator (any family of :data:`LATENT_SPACES`) and its parameters.
        config: the settings.
        key: PRNG key of the optimisation.
        mesh: 1-D mesh to split each step's batch over (:func:`gansem.sharding.make_mesh`); ``None``: one device.
        run_dir: save Orbax checkpoints (state and the metric history) in ``run_dir/checkpoints`` every
            ``checkpoint_every`` steps and at the end; ``None``: none.
        resume: continue from the latest checkpoint in ``run_dir`` (from scratch if there is none).
        log_every: steps between metric records (and fetches from the device).
        progress: progress bar with the two losses.

    Returns:
        :class:`DirectionResult`.

    Raises:
        LatentDirectionError: the generator or a setting cannot work, or a damaged checkpoint.
    """
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    config.check(gen, int(mesh.devices.size))
    if checkpoint_every < 1 or log_every < 1:
        raise LatentDirectionError(f"checkpoint_every and log_every must be >= 1, got {checkpoint_every}, {log_every}")
    if resume and run_dir is None:
        raise LatentDirectionError("resume=True needs the run_dir holding the checkpoints")
    gen = prepare_generator(gen)
    progs = direction_programs(gen, config, mesh)
    params = jax.device_put(params, sharding.replicated(mesh))
    key = jax.device_put(key, sharding.replicated(mesh))
    mngr = training.checkpoint_manager(run_dir, create=True) if run_dir is not None else None
    state, history, start, resumed = None, [], 0, None
    try:
        if mngr is not None and resume:
            found = training.restore_latest(mngr, _state_items(progs.abstract), run_dir,
                                            error=LatentDirectionError, with_meta=True)
            if found is not None:
                s = found[1]["state"]
                state = DirectionState(step=s["step"], u=s["u"], opt_state=s["opt_state"])
                history = [r for r in found[1]["meta"]["history"] if r["step"] <= int(state.step)]
                start = resumed = int(state.step)
        elif mngr is not None and mngr.all_steps():
            raise LatentDirectionError(f"{run_dir!r} already holds direction checkpoints; resume it (--resume) "
                                       "or choose a new directory")
        if state is None:
            state = progs.init(jax.random.fold_in(key, 2 ** 31 - 1))
        bar = tqdm(total=config.steps, initial=start, desc="directions", disable=not progress, unit="step")
        for t in range(start, config.steps):
            state, m = progs.step(state, params, key)
            done = t + 1
            if done % log_every == 0 or done == config.steps:
                rec = {"step": done, **{k: float(v) for k, v in jax.device_get(m).items()}}
                history.append(rec)
                bar.set_postfix(light=f"{rec['loss_light']:.3f}", dark=f"{rec['loss_dark']:.3f}")
            bar.update(1)
            if mngr is not None and (done % checkpoint_every == 0 or done == config.steps):
                training.save_checkpoint(mngr, done, _state_items(state), {"history": history})
        bar.close()
    finally:
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()
    v = np.asarray(jax.device_get(unit(state.u)), np.float32)
    return DirectionResult(v_light=v[0], v_dark=v[1], steps=int(state.step), history=history, resumed_from=resumed)


# -- masks (Eq. 2) -------------------------------------------------------------------------


def direction_masks(gen: Generator, params, v_light, v_dark, eps: float, z, class_labels=None) -> dict:
    """``M(z)`` of Eq. 2 and what the refinement and the pictures need. Traceable.

    Args:
        gen, params: the generator and its parameters.
        v_light, v_dark: ``[D]`` unit directions.
        eps: the shift length ``ε``.
        z: ``[B, *latent_shape]`` latents; class_labels: ``[B]`` or ``None``.

    Returns:
        ``{"image", "light", "dark": [B, H, W, 3] float32 in [-1, 1] (G(z), G(z+εv_l), G(z+εv_d));
        "difference": [B, H, W] float32, the brightness of G(z+εv_l) minus that of G(z+εv_d) (images in [0, 1],
        mean over channels); "mask": [B, H, W] bool, difference > 0; "change": [B] float32, mean |difference|}``.
    """
    codes = latent_codes(gen, params, z, class_labels)
    x = images_from_codes(gen, params, codes, class_labels)
    xl = images_from_codes(gen, params, shift_codes(gen, codes, eps * jnp.asarray(v_light)), class_labels)
    xd = images_from_codes(gen, params, shift_codes(gen, codes, eps * jnp.asarray(v_dark)), class_labels)
    diff = jnp.mean(_unit_range(xl) - _unit_range(xd), axis=-1)
    return {"image": x, "light": xl, "dark": xd, "difference": diff, "mask": diff > 0,
            "change": jnp.mean(jnp.abs(diff), axis=(1, 2))}


def _indexed_inputs(gen: Generator, key, index):
    """Sample ``index``'s latent (and class) from ``fold_in(key, index)``: independent of the batch it is in."""
    z, c = sample_inputs(gen, jax.random.fold_in(key, index), 1)
    return z[0], None if c is None else c[0]


def iter_masks(gen: Generator, params, config: DirectionConfig, v_light, v_dark, key, indices, *, mesh=None,
               batch_size: int = 16, progress: bool = False, desc: str = "masks",
               shifted: bool = True) -> Iterator[tuple[int, int, dict]]:
    """:func:`direction_masks` of the samples ``indices`` (sample ``i`` from ``fold_in(key, i)``), batch by batch.

    Yields:
        ``(start, stop, outputs)`` as :func:`gansem.batching.map_batches`: the dict of :func:`direction_masks`
        (without ``light``/``dark`` unless ``shifted``) plus ``"latent"`` and ``"class_label"`` (when conditional),
        as host arrays.
    """
    latent_space(gen)
    gen = prepare_generator(gen)
    eps = config.shift(gen)
    indices = np.asarray(indices, np.int32).reshape(-1)
    if indices.size == 0:
        raise LatentDirectionError("no samples to mask")

    def fn(p, k, vl, vd, idx):
        z, c = jax.vmap(lambda i: _indexed_inputs(gen, k, i))(idx)
        out = direction_masks(gen, p, vl, vd, eps, z, c)
        if not shifted:
            out = {n: a for n, a in out.items() if n not in ("light", "dark")}
        out["latent"] = z
        if c is not None:
            out["class_label"] = c
        return out

    vl, vd = jnp.asarray(v_light, jnp.float32), jnp.asarray(v_dark, jnp.float32)
    yield from map_batches(fn, [indices], batch_size=batch_size, mesh=mesh, bcast_args=(params, key, vl, vd),
                           progress=progress, desc=desc)


def sample_masks(gen: Generator, params, config: DirectionConfig, v_light, v_dark, key, indices, *, mesh=None,
                 batch_size: int = 16, shifted: bool = True) -> dict:
    """:func:`iter_masks` gathered: host arrays with ``len(indices)`` rows."""
    parts = [o for _, _, o in iter_masks(gen, params, config, v_light, v_dark, key, indices, mesh=mesh,
                                         batch_size=batch_size, shifted=shifted)]
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


# -- refinement (Sec. 3.2.1) ----------------------------------------------------------------


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Flip foreground components and background holes of fewer than ``min_pixels`` pixels (4-connectivity).

    Foreground components are removed first, then the holes of the result are filled.

    Args:
        mask: ``[H, W]`` bool.

    Returns:
        ``[H, W]`` bool.
    """
    out = np.asarray(mask, bool).copy()
    if min_pixels <= 1:
        return out
    for value in (True, False):
        labels, n = ndimage.label(out == value)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            small = np.flatnonzero(sizes < min_pixels)
            small = small[small > 0]
            out[np.isin(labels, small)] = not value
    return out


def refine_masks(masks: np.ndarray, change: np.ndarray, config: DirectionConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The dataset refinement of Sec. 3.2.1 (thresholds: :class:`DirectionConfig`).

    Args:
        masks: ``[B, H, W]`` bool masks ``M(z)``.
        change: ``[B]`` mean absolute brightness change of each sample (:func:`direction_masks`).

    Returns:
        ``(refined [B, H, W] bool, keep [B] bool, reasons)``: the masks with small components
        removed, which samples are kept, and ``reasons = {"too_small", "too_large", "no_change": [B] bool}``
        (the foreground fraction is measured after the component removal).
    """
    masks = np.asarray(masks, bool)
    h, w = masks.shape[1:]
    min_pixels = int(np.ceil(config.min_component * h * w))
    refined = np.stack([remove_small_components(m, min_pixels) for m in masks]) if len(masks) else masks
    frac = refined.reshape(len(refined), -1).mean(axis=1)
    reasons = {"too_small": frac < config.min_foreground, "too_large": frac > config.max_foreground,
               "no_change": np.asarray(change) < config.min_change}
    keep = ~(reasons["too_small"] | reasons["too_large"] | reasons["no_change"])
    return refined, keep, reasons

"""Data-parallel SPADE training on (KLiSH cluster mask, generated image) pairs: USCS (KLiSH Sec. 5).

One call::

    synth = fit_uscs(open_dataset("runs/ufgs-data-k8"), steps=3000, out_dir="runs/uscs-k8")
    images = synth.generate(masks)                  # [N, R, R] int -> [N, R, R, 3] uint8
    synth = load_synthesizer("runs/uscs-k8")        # later, from the run directory (gansem.uscs.synth)

``source`` is any random-access pair source (``len``, ``[i] -> {"image": uint8 [R, R, 3],
"label": int [R, R]}``, ``num_classes``, ``resolution``, ``palette``, ``class_names``,
``meta``), as :mod:`gansem.ufgs.records` provides (``open_dataset`` for the directories of
``launch/make_dataset.py``, ``ArrayPairs`` in memory).

**Objective and updates** (:mod:`gansem.uscs.losses`). The generator minimises the hinge
adversarial loss plus ``λ_FM`` (10) times discriminator feature matching (plus ``λ_KL`` (0.05)
times the KL term with the style encoder); the discriminator minimises the hinge loss. Two
Adam optimisers with the SPADE reference's two-time-scale learning rates (TTUR, Heusel et al.
2017): G 1e-4, D 4e-4, ``β1 = 0``, ``β2 = 0.9``, constant (so a run can be extended by
resuming with more steps). Each step computes both gradients from one generator forward
and one discriminator forward on the batch's generated and real pairs, then updates both
networks (simultaneous updates, as pix2pixHD; SPADE alternates, with a second generator
forward for the discriminator's step). The discriminator's backward pass is run twice from
that forward (``jax.vjp``): once for the gradient w.r.t. the generated images (to the
generator), once for its own parameters.

**Data and randomness.** The batch of step ``t`` is ``training_batches(source, seed)[t]``
(:func:`gansem.ufgs.train.training_batches`: a new permutation of the training items each
epoch), and the step's noise (the style encoder's reparameterisation) comes from
``fold_in(key(seed), t)``: a run's data and noise are a pure function of ``(seed, step)``.
The last ``eval_samples`` items (default 5 %, at most 200) are held out, never trained on;
the sample grids show the first of them, and :class:`gansem.uscs.synth.Synthesizer` offers
them as "start from a sample" examples.

**Devices.** Data-parallel over a 1-D mesh (:func:`gansem.sharding.make_mesh`): the batch is
split along its first axis (``NamedSharding(mesh, P("data"))``); parameters, spectral-norm
vectors, BatchNorm statistics and both optimiser states are replicated; the step is one
``jax.jit`` program with those shardings (the compiler adds the cross-device sums of the
gradients and of the generator's BatchNorm statistics, which are those of the global batch,
as SPADE's synchronised BatchNorm). The losses on 1 and 8 devices agree to float rounding.

**Checkpoints and resumption.** Orbax saves ``generator`` (params, batch_stats: BatchNorm
averages and spectral-norm vectors; with the style encoder under ``"encoder"``),
``discriminator`` (params, spectral-norm vectors), ``train`` (both optimiser states, step,
rng) every ``checkpoint_every`` steps and at the end, keeping the latest 2. ``resume=True``
continues from the latest checkpoint that loads; N steps then a resumed run to 2N give the
same bits as 2N in one go on the same devices, also after the process was killed. The
settings that define a run (architecture, K, resolution, batch size, seed, learning rates,
betas, loss weights, the data split) are fixed when it is created; a resume that asks for
other ones is refused, naming them.

Run directory (the contract with the painting page, ``gansem.uscs.synth``)::

    model.json           kind "uscs-spade", K, R, palette, class names, model (SpadeConfig), config, data, fixed
    checkpoints/<step>/  Orbax steps (latest 2): generator, discriminator, train, meta
    metrics.jsonl        one JSON line per step: g_loss, g_adv, g_fm (, g_kl), d_loss, d_real, d_fake
    samples/step_<s>.png rows: colourised held-out mask | generated image | the pair's real (GAN) image
    curves.png           generator and discriminator loss terms against the step
    summary.json         steps, seconds, steps/s, devices, final losses
    manifest.json        what each file is

Paper-scale configuration (``CONFIGS["paper"]``, ``launch/train_uscs.py --config paper``): the
SPADE reference networks (generator widths 1024..64 with 128 hidden SPADE channels,
discriminator ndf 64 with 4 layers at 2 scales) for 256 px pairs on a GPU, e.g.
``--devices 1 --batch-size 16``; the CPU default (``CONFIGS["cpu"]``) is 32x smaller in
width and runs on the 64 px DCGAN pairs in minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, NamedTuple, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import sharding, training, viz
from ..training import CHECKPOINT_DIR, METRICS_FILE, MODEL_FILE
from ..ufgs.train import default_val_samples, describe_source, training_batches
from .losses import feature_matching_loss, hinge_d_loss, hinge_g_loss, kl_divergence
from .models import (CONFIGS, SpadeConfig, SpadeModels, build_models, config_from_dict, images_to_unit, one_hot_masks,
                     spade_config, synthesize)
from .synth import MODEL_KIND, Synthesizer, UscsRunError, read_model_json

__all__ = [
    "UscsTrainConfig",
    "GanState",
    "GanPrograms",
    "gan_programs",
    "fit_uscs",
    "generator_items",
    "check_labels",
    "SAMPLES_DIR",
]

SAMPLES_DIR = "samples"

#: Settings a run is created with; resuming with other values is refused.
FIXED_SETTINGS = ("model", "num_classes", "resolution", "batch_size", "seed", "g_lr", "d_lr", "beta1", "beta2",
                  "lambda_fm", "lambda_kl", "source_items", "train_items")


@dataclasses.dataclass(frozen=True)
class UscsTrainConfig:
    """The training configuration (stored in ``model.json``); see :func:`fit_uscs` for each field."""

    steps: int = 3000
    batch_size: int = 16
    g_lr: float = 1e-4
    d_lr: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.9
    lambda_fm: float = 10.0
    lambda_kl: float = 0.05
    seed: int = 0
    eval_samples: Optional[int] = None
    num_samples: int = 8
    sample_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    data_threads: int = 2

    def check(self, num_devices: int) -> None:
        """Raise ``ValueError`` for values that cannot work (before any work is done)."""
        for name in ("steps", "batch_size", "sample_every", "checkpoint_every", "log_every", "num_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % num_devices:
            raise ValueError(f"batch size {self.batch_size} cannot be split evenly over {num_devices} devices; "
                             f"use a multiple of {num_devices}")
        if not (self.g_lr > 0 and self.d_lr > 0):
            raise ValueError(f"learning rates must be > 0, got g_lr={self.g_lr}, d_lr={self.d_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.lambda_fm < 0 or self.lambda_kl < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_fm={self.lambda_fm}, lambda_kl={self.lambda_kl}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.eval_samples is not None and self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0, got {self.eval_samples}")
        if self.data_threads < 0:
            raise ValueError(f"data_threads must be >= 0, got {self.data_threads}")


class GanState(NamedTuple):
    """Everything a training step reads and writes (a pytree, replicated on the mesh).

    Attributes:
        step: int32 [] completed steps.
        g_params: ``{"generator": ..., "encoder": ...}`` (the encoder only with ``use_vae``).
        g_state: the same keys: their ``batch_stats`` (BatchNorm averages, spectral-norm ``u``, ``σ``).
        d_params, d_state: the discriminator's parameters and spectral-norm vectors.
        g_opt, d_opt: the two Adam states.
        rng: uint32 [2] raw key data; step ``t`` draws its noise from ``fold_in(rng, t)``.
    """

    step: Any
    g_params: Any
    g_state: Any
    d_params: Any
    d_state: Any
    g_opt: Any
    d_opt: Any
    rng: Any


class GanPrograms(NamedTuple):
    """The jitted pieces of a run (built once per networks, optimiser settings and mesh)::

        progs = gan_programs(models, 1e-4, 4e-4, 0.0, 0.9, 10.0, 0.05, mesh)
        state = progs.init(np.uint32(seed))
        state, metrics = progs.step(state, sharding.place_batch(batch, mesh))   # batch: image, label
        images = progs.sample(generator_variables(state), labels)              # uint8 [B, R, R, 3]
    """

    init: Any      # seed uint32 [] -> GanState, replicated
    step: Any      # (GanState, batch) -> (GanState, metrics); the state is donated
    sample: Any    # ({"params", "batch_stats"} of the generator, labels [B, R, R]) -> uint8 images, key(0) style
    abstract: Any  # GanState of ShapeDtypeStructs with their shardings (to restore into)


def generator_items(state: GanState) -> dict:
    """The generator's checkpoint item ``{"params", "batch_stats"}`` (keys ``generator`` and ``encoder``)."""
    return {"params": state.g_params, "batch_stats": state.g_state}


def _state_items(state: GanState) -> dict:
    return {"generator": generator_items(state),
            "discriminator": {"params": state.d_params, "batch_stats": state.d_state},
            "train": {"g_opt": state.g_opt, "d_opt": state.d_opt, "step": state.step, "rng": state.rng}}


def _apply_mutable(module, params, state, *args, **kwargs):
    """``module.apply`` in training mode; returns ``(output, new batch_stats)`` (``{}`` when it has none)."""
    out, updates = module.apply({"params": params, "batch_stats": state}, *args, train=True,
                                mutable=["batch_stats"], **kwargs)
    return out, updates.get("batch_stats", {})


def _pairs_halves(feats):
    """Split discriminator outputs on interleaved ``[2B]`` (generated, real) rows into the two ``[B]`` halves."""
    def half(i):
        return jax.tree.map(lambda f: f.reshape((-1, 2) + f.shape[1:])[:, i], feats)
    return half(0), half(1)


@functools.lru_cache(maxsize=8)
def gan_programs(models: SpadeModels, g_lr: float, d_lr: float, beta1: float, beta2: float, lambda_fm: float,
                 lambda_kl: float, mesh) -> GanPrograms:
    """Shapes first, then shardings, then the jitted programs (cached: a resumed or repeated run reuses them).

    Parameters are drawn with the ``rbg`` PRNG (fast to compile on a CPU); the per-step noise
    keys are threefry keys, whose bits do not depend on how the batch is split over devices.
    """
    gen, disc, enc = models.generator, models.discriminator, models.encoder
    k, res, z_dim = models.num_classes, models.resolution, models.config.z_dim
    g_tx = optax.adam(g_lr, b1=beta1, b2=beta2)
    d_tx = optax.adam(d_lr, b1=beta1, b2=beta2)
    repl, rows = sharding.replicated(mesh), sharding.row_sharding(mesh)

    def init_state(seed) -> GanState:
        kg, kd, ke = jax.random.split(jax.random.key(seed, impl="rbg"), 3)
        mask = jnp.zeros((1, res, res, k), jnp.float32)
        image = jnp.zeros((1, res, res, 3), jnp.float32)
        z = jnp.zeros((1, z_dim), jnp.float32) if enc is not None else None
        gv = gen.init(kg, mask, z, train=False)
        dv = disc.init(kd, mask, image, train=False)
        g_params, g_state = {"generator": gv["params"]}, {"generator": gv.get("batch_stats", {})}
        if enc is not None:
            ev = enc.init(ke, image, train=False)
            g_params["encoder"], g_state["encoder"] = ev["params"], ev.get("batch_stats", {})
        return GanState(step=jnp.zeros((), jnp.int32), g_params=g_params, g_state=g_state, d_params=dv["params"],
                        d_state=dv.get("batch_stats", {}), g_opt=g_tx.init(g_params), d_opt=d_tx.init(dv["params"]),
                        rng=jax.random.key_data(jax.random.key(seed)))

    abstract, state_sh = training.replicated_state(init_state, mesh)
    batch_sh = {"image": rows, "label": rows}

    def train_step(state: GanState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mask = one_hot_masks(batch["label"], k)                           # [B, R, R, K]
        real = images_to_unit(batch["image"])                             # [B, R, R, 3] in [-1, 1]
        b = real.shape[0]

        def g_forward(g_params):
            new_state, z, kl = {}, None, jnp.zeros((), jnp.float32)
            if enc is not None:
                (mu, logvar), new_state["encoder"] = _apply_mutable(enc, g_params["encoder"], state.g_state["encoder"],
                                                                    real)
                z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)   # reparameterisation
                kl = kl_divergence(mu, logvar)
            fake, new_state["generator"] = _apply_mutable(gen, g_params["generator"], state.g_state["generator"],
                                                          mask, z)
            return (fake, kl), new_state

        def d_forward(d_params, fake):
            # rows 2i, 2i + 1: (generated, real) of sample i -- a reshape that keeps each device's rows local
            images = jnp.stack([fake, real], axis=1).reshape((2 * b,) + real.shape[1:])
            masks = jnp.stack([mask, mask], axis=1).reshape((2 * b,) + mask.shape[1:])
            return _apply_mutable(disc, d_params, state.d_state, masks, images)

        def g_objective(feats):
            fake_f, real_f = _pairs_halves(feats)
            adv = hinge_g_loss([s[-1] for s in fake_f])
            fm = feature_matching_loss(fake_f, real_f)
            return adv + lambda_fm * fm, (adv, fm)

        def d_objective(feats):
            fake_f, real_f = _pairs_halves(feats)
            d_real, d_fake = hinge_d_loss([s[-1] for s in real_f], [s[-1] for s in fake_f])
            return d_real + d_fake, (d_real, d_fake)

        (fake, kl), g_vjp, g_state = jax.vjp(g_forward, state.g_params, has_aux=True)
        feats, d_vjp, d_state = jax.vjp(d_forward, state.d_params, fake, has_aux=True)
        (_, (adv, fm)), dfeats_g = jax.value_and_grad(g_objective, has_aux=True)(feats)
        (d_loss, (d_real, d_fake)), dfeats_d = jax.value_and_grad(d_objective, has_aux=True)(feats)
        _, dfake = d_vjp(dfeats_g)          # dL_G/d(generated images); the parameter half is dropped by XLA
        d_grads, _ = d_vjp(dfeats_d)        # dL_D/dθ_D
        (g_grads,) = g_vjp((dfake, jnp.asarray(lambda_kl, jnp.float32)))

        g_updates, g_opt = g_tx.update(g_grads, state.g_opt, state.g_params)
        d_updates, d_opt = d_tx.update(d_grads, state.d_opt, state.d_params)
        new = GanState(step=state.step + 1, g_params=optax.apply_updates(state.g_params, g_updates), g_state=g_state,
                       d_params=optax.apply_updates(state.d_params, d_updates), d_state=d_state, g_opt=g_opt,
                       d_opt=d_opt, rng=state.rng)
        metrics = {"g_loss": adv + lambda_fm * fm + lambda_kl * kl, "g_adv": adv, "g_fm": fm, "d_loss": d_loss,
                   "d_real": d_real, "d_fake": d_fake}
        if enc is not None:
            metrics["g_kl"] = kl
        return new, metrics

    def sample(variables, labels):
        variables = {"params": variables["params"]["generator"], "batch_stats": variables["batch_stats"]["generator"]}
        return synthesize(models, variables, labels, jax.random.key(0))

    return GanPrograms(
        init=jax.jit(init_state, in_shardings=repl, out_shardings=state_sh),
        step=jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                     donate_argnums=0),
        sample=jax.jit(sample, in_shardings=(repl, rows), out_shardings=rows),
        abstract=abstract)


# -- run directory ------------------------------------------------------------------------------


def check_labels(labels: np.ndarray, k: int, where: str) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, k)`` in ``labels``."""
    labels = np.asarray(labels)
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= k):
        bad = labels[(labels < 0) | (labels >= k)]
        raise ValueError(f"{where}: class id {int(bad[0])} is outside [0, {k})")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _sample_grid(progs: GanPrograms, state: GanState, fixed: dict, palette: np.ndarray, mesh) -> np.ndarray:
    """Rows: colourised masks | generated images | real images of the fixed held-out pairs."""
    n = fixed["label"].shape[0]
    rows = sharding.padded_length(n, mesh.devices.size)
    labels = np.concatenate([fixed["label"], np.repeat(fixed["label"][-1:], rows - n, 0)])
    fake = np.asarray(progs.sample(generator_items(state), sharding.place_batch(labels, mesh)))[:n]
    return viz.image_grid(np.concatenate([viz.colorize(fixed["label"], palette), fake, fixed["image"]]), ncols=n)


def _mean_last(history: list, key: str, last: int = 10) -> Optional[float]:
    values = [r[key] for r in history if key in r][-last:]
    return float(np.mean(values)) if values else None


def _write_outputs(out_dir: str, history: list, summary: dict, meta: dict) -> None:
    recs = [r for r in history if "g_loss" in r]
    steps = [r["step"] for r in recs]
    g_keys = [("g_loss", "total"), ("g_adv", "adversarial"), ("g_fm", "feature matching (unweighted)"),
              ("g_kl", "KL (unweighted)")]
    d_keys = [("d_loss", "total"), ("d_real", "real"), ("d_fake", "generated")]

    def series(keys):
        return {name: [r[key] for r in recs] for key, name in keys if recs and key in recs[0]}

    viz.gan_curves_plot(steps, series(g_keys), series(d_keys), os.path.join(out_dir, "curves.png"),
                        title=f"SPADE, K={meta['num_classes']}, {meta['resolution']} px")
    training.write_json(os.path.join(out_dir, "summary.json"), summary)
    training.write_json(os.path.join(out_dir, "manifest.json"), {
        "kind": "gansem USCS (SPADE) run",
        "files": {
            MODEL_FILE: "kind, K, resolution, palette, class names, architecture (model), training config, data "
                        "(path, split), and the settings a resume must match (fixed)",
            f"{CHECKPOINT_DIR}/<step>/": "Orbax checkpoints, the latest 2: items generator (params, batch_stats), "
                                        "discriminator (params, batch_stats), train (g_opt, d_opt, step, rng), meta",
            METRICS_FILE: "one JSON line per step: g_loss = g_adv + lambda_fm g_fm (+ lambda_kl g_kl), "
                          "d_loss = d_real + d_fake",
            f"{SAMPLES_DIR}/step_<step>.png": "rows: colourised held-out masks | generated images | their real "
                                              "(GAN-generated) images",
            "curves.png": "generator and discriminator loss terms against the step",
            "summary.json": "steps, seconds, steps/s, images/s, devices, final losses",
        },
        "load": "gansem.uscs.synth.load_synthesizer(run_dir)",
    })


# -- training -------------------------------------------------------------------------------------


def fit_uscs(source, *, steps: int, batch_size: int = 16, out_dir: Optional[str] = None, resume: bool = False,
             seed: int = 0, mesh=None, config: Any = "cpu", g_lr: float = 1e-4, d_lr: float = 4e-4,
             beta1: float = 0.0, beta2: float = 0.9, lambda_fm: float = 10.0, lambda_kl: float = 0.05,
             eval_samples: Optional[int] = None, num_samples: int = 8, sample_every: int = 500,
             checkpoint_every: int = 500, log_every: int = 10, data_threads: int = 2,
             data_info: Optional[Mapping] = None, progress: bool = True, quiet: bool = False) -> Synthesizer:
    """Train a SPADE generator on (mask, image) pairs; see the module docstring.

    Args:
        source: random-access pairs (``len``, ``[i] -> {"image", "label"}``, ``num_classes``, ...).
        steps: train until this many steps are done (a resumed run continues from its checkpoint).
        batch_size: global batch (pairs per step), a multiple of the mesh's device count.
        out_dir: run directory (see the module docstring); ``None``: nothing written.
        resume: continue the run in ``out_dir`` (from scratch if it has no checkpoint yet).
        seed: data order, initialisation and noise.
        mesh: 1-D mesh (:func:`gansem.sharding.make_mesh`) to train data-parallel on; ``None``: one device.
        config: the architecture: a :class:`~gansem.uscs.models.SpadeConfig`, a name in
            :data:`~gansem.uscs.models.CONFIGS` (``"cpu"``, ``"paper"``) or a dict of its fields.
        g_lr, d_lr, beta1, beta2: the two Adam optimisers (TTUR).
        lambda_fm, lambda_kl: weights of feature matching and of the KL term.
        eval_samples: items held out at the end of ``source`` (default 5 %, at most 200).
        num_samples: pairs in each sample grid; ``sample_every``, ``checkpoint_every``: in steps
            (both also after the last step).
        log_every: steps between fetches of the losses from the device (the file gets every step).
        data_threads: threads reading batches ahead (0: read in the training loop).
        data_info: more about the data for ``model.json`` (``{"path": ...}`` lets the synthesizer
            offer the held-out pairs as examples).
        progress: tqdm bar with the losses; quiet: no log lines.

    Returns:
        The :class:`~gansem.uscs.synth.Synthesizer` of the generator after ``steps`` steps, with
        ``history`` (every metric record of the run) and ``summary``.

    Raises:
        ValueError (:class:`UscsRunError` for run directories): impossible settings, bad data, an
        existing run without ``resume``, a resume with other settings, or damaged checkpoints.
    """
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    n_dev = int(mesh.devices.size)
    cfg = UscsTrainConfig(steps=int(steps), batch_size=int(batch_size), g_lr=float(g_lr), d_lr=float(d_lr),
                          beta1=float(beta1), beta2=float(beta2), lambda_fm=float(lambda_fm),
                          lambda_kl=float(lambda_kl), seed=int(seed), eval_samples=eval_samples,
                          num_samples=int(num_samples), sample_every=int(sample_every),
                          checkpoint_every=int(checkpoint_every), log_every=int(log_every),
                          data_threads=int(data_threads))
    cfg.check(n_dev)
    arch = _spade_config(config)
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir of the run to continue")
    data = describe_source(source)
    n_items, k, res = data["items"], data["num_classes"], data["resolution"]
    models = build_models(arch, k, res)
    stored = (training.stored_run(out_dir, resume, read_meta=read_model_json, error=UscsRunError, what="USCS")
              if out_dir is not None else None)
    old_cfg = (stored or {}).get("config", {})
    n_eval = int(cfg.eval_samples if cfg.eval_samples is not None
                 else old_cfg.get("eval_samples", default_val_samples(n_items)))
    if n_eval >= n_items:
        raise ValueError(f"eval_samples={n_eval} leaves no training item of the {n_items}")
    cfg = dataclasses.replace(cfg, eval_samples=n_eval)
    train_items = n_items - n_eval
    settings = {"model": arch.to_dict(), "num_classes": k, "resolution": res, "batch_size": cfg.batch_size,
                "seed": cfg.seed, "g_lr": cfg.g_lr, "d_lr": cfg.d_lr, "beta1": cfg.beta1, "beta2": cfg.beta2,
                "lambda_fm": cfg.lambda_fm, "lambda_kl": cfg.lambda_kl, "source_items": n_items,
                "train_items": train_items}
    if stored is not None:
        training.check_same_settings(out_dir, stored.get("fixed", {}), settings, FIXED_SETTINGS, error=UscsRunError)
    # the sample grids show the first held-out pairs (training pairs when nothing is held out)
    first = train_items if n_eval else 0
    fixed_ids = range(first, min(first + cfg.num_samples, n_items))
    fixed = {"image": np.stack([np.asarray(source[i]["image"], np.uint8) for i in fixed_ids]),
             "label": np.stack([np.asarray(source[i]["label"], np.int32) for i in fixed_ids])}
    check_labels(fixed["label"], k, "sample pairs")
    palette = data["palette"] if data["palette"] is not None else viz.palette(k).tolist()
    palette_arr = np.asarray(palette, np.uint8)
    meta = {"kind": MODEL_KIND, "version": 1, "num_classes": k, "resolution": res, "palette": palette,
            "class_names": data["class_names"], "model": arch.to_dict(),
            "config": dataclasses.asdict(cfg),
            "data": {"path": None, **dict(data_info or {}), "items": n_items, "train_items": train_items,
                     "held_out": {"first": train_items, "count": n_eval}, "meta": data["meta"]},
            "fixed": settings}
    if out_dir is not None and stored is None:
        training.create_run_dir(out_dir, meta, error=UscsRunError)  # only now: every check above came first
    elif stored is not None:
        meta = stored

    progs = gan_programs(models, cfg.g_lr, cfg.d_lr, cfg.beta1, cfg.beta2, cfg.lambda_fm, cfg.lambda_kl, mesh)
    mngr = training.checkpoint_manager(out_dir, create=True) if out_dir is not None else None
    state, start = None, 0
    if stored is not None:
        found = training.restore_latest(mngr, _state_items(progs.abstract), out_dir, error=UscsRunError)
        if found is None:
            _log(f"{out_dir}: no checkpoint yet; training from step 0", quiet)
        else:
            g, d, t = (found[1][name] for name in ("generator", "discriminator", "train"))
            state = GanState(step=t["step"], g_params=g["params"], g_state=g["batch_stats"], d_params=d["params"],
                             d_state=d["batch_stats"], g_opt=t["g_opt"], d_opt=t["d_opt"], rng=t["rng"])
            start = int(state.step)
            _log(f"resuming {out_dir} from step {start}", quiet)
    if state is None:
        state = progs.init(np.uint32(cfg.seed))
    log = training.MetricsLog(out_dir, start)  # drops the records of steps after the checkpoint: recomputed


    _log(f"SPADE on {n_items} pairs ({train_items} trained on, last {n_eval} held out), K={k}, {res} px; "
         f"batch {cfg.batch_size} over {n_dev} {jax.default_backend()} device(s), steps {start} -> {cfg.steps}", quiet)
    timer = training.StepTimer()
    stream = training_batches(source, batch_size=cfg.batch_size, seed=cfg.seed, num_items=train_items)
    batches = iter(stream[start:].to_iter_dataset(grain.ReadOptions(
        num_threads=cfg.data_threads, prefetch_buffer_size=max(2, 2 * cfg.data_threads))))
    samples = []
    bar = tqdm(total=cfg.steps, initial=start, desc="train SPADE", disable=not progress, unit="step")
    try:
        for t in range(start, cfg.steps):
            batch = next(batches)
            check_labels(batch["label"], k, f"training batch of step {t}")
            state, m = progs.step(state, sharding.place_batch(batch, mesh))
            done = t + 1
            log.defer(done, m)
            timer.step_done(m)  # the first step compiles: time the steps after it
            is_sample = out_dir is not None and (done % cfg.sample_every == 0 or done == cfg.steps)
            is_ckpt = mngr is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
            if log.num_deferred >= cfg.log_every or is_sample or is_ckpt or done == cfg.steps:
                last = log.flush()
                bar.set_postfix(g=f"{last['g_loss']:.3f}", d=f"{last['d_loss']:.3f}")
            bar.update(1)
            with timer.excluded():
                if is_sample:
                    path = os.path.join(out_dir, SAMPLES_DIR, f"step_{done:06d}.png")
                    viz.save_png(path, _sample_grid(progs, state, fixed, palette_arr, mesh))
                    samples.append(os.path.relpath(path, out_dir))
                if is_ckpt:
                    training.save_checkpoint(mngr, done, _state_items(state),
                                             {"step": done, "g_loss": last["g_loss"], "d_loss": last["d_loss"]})
        jax.block_until_ready(state)
    finally:
        training.close_training(bar, batches, mngr)
    done_now = max(0, cfg.steps - start)
    history = log.history
    summary = {
        "steps": int(state.step), "resumed_from": start if stored is not None else None,
        "steps_this_call": done_now, **timer.summary(done_now, cfg.batch_size, "sample grids and checkpoints"),
        "devices": n_dev, "backend": jax.default_backend(), "batch_size": cfg.batch_size,
        "final": {key: _mean_last(history, key) for key in ("g_loss", "g_adv", "g_fm", "d_loss", "d_real", "d_fake")},
        "samples": samples,
    }
    if out_dir is not None:
        _write_outputs(out_dir, history, summary, meta)
        _log(f"wrote {out_dir}: {MODEL_FILE}, {CHECKPOINT_DIR}/, {METRICS_FILE}, {SAMPLES_DIR}/, curves.png, "
             "summary.json, manifest.json", quiet)
    gen = jax.device_get(generator_items(state))
    return Synthesizer(models=models, variables=gen, meta=meta, step=int(state.step), run_dir=out_dir,
                       history=history, summary=summary)


def _spade_config(config) -> SpadeConfig:
    """A :class:`SpadeConfig` from a config, a name in :data:`CONFIGS` or a dict of fields."""
    if isinstance(config, SpadeConfig):
        return config
    if isinstance(config, str):
        return spade_config(config)
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raise ValueError(f"config must be a SpadeConfig, a name ({', '.join(CONFIGS)}) or a dict, got {type(config)}")

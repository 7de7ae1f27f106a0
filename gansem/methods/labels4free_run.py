"""Labels4Free training run (seed 001): jitted data-parallel steps, Orbax checkpoints, evaluation, report.

One call::

    gen, params, _ = gansem.zoo.load_generator("checkpoints/ffhq")
    out = fit_labels4free(gen, params, CONFIGS["ffhq"], "runs/l4f-ffhq", mesh=sharding.make_mesh(8))
    masks = out.masks(z)                                 # [N, R, R] soft masks of fresh samples G(z)

**Randomness.** ``key(seed)`` splits into (initialisation, training, evaluation, analysis) keys.
Step ``t`` draws its latents ``z`` (foreground), ``z'`` (background) and ``z''`` (real samples)
from ``fold_in(training key, t)``, as global ``[B, z_dim]`` arrays (threefry bits do not depend
on how the batch is split); evaluation sample ``i`` uses ``fold_in(evaluation key, i)``. A run
is a pure function of the seed and the step: the same on 1 or 8 devices up to float rounding,
and a resumed run continues with the same numbers.

**Devices.** A 1-D mesh (:func:`gansem.sharding.make_mesh`): latents, images and masks are split
along the batch (``P("data")``); the frozen generator's parameters, the alpha network, the
discriminator and both Adam states are replicated; each step is one ``jax.jit`` program.

**Checkpoints.** Orbax items ``alpha`` (params), ``discriminator`` (params) and ``train``
(both Adam states, step, rng), every ``checkpoint_every`` steps and at the end (latest 2 kept,
:mod:`gansem.training`). The generator is not saved: ``model.json`` names its checkpoint and
holds a SHA-256 of its parameters, and a resume with another generator or other settings is
refused.

Run directory::

    model.json          kind "labels4free", generator (name, path, sha256), config, alpha network, fixed settings
    analysis.json       tRGB-noise SSIM per resolution, per-layer gradient scores (Sec. 3.1, 3.2)
    checkpoints/<s>/    Orbax steps (latest 2)
    metrics.jsonl       one line per step: a_loss, a_adv, reg_b, reg_c, reg_e, mask_mean, d_loss, d_real, d_fake
    panels.png          rows G(z) | G_bg(z') | mask M | M ⊙ G(z) + (1 − M) ⊙ G_bg(z') for fresh samples
    curves.png          alpha-network and discriminator loss terms against the step
    eval/images/        the evaluation samples eval_<i>.png (label them to score the run: --eval-folder)
    report.md, report.json, manifest.json
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import sharding, training, viz
from ..features import to_uint8
from ..metrics import binary_segmentation_metrics, max_f_beta
from ..training import CHECKPOINT_DIR, METRICS_FILE, MODEL_FILE
from ..ufgs.labelled import folder_pairs, from_folder
from . import labels4free as l4f
from .stylegan2_discriminator import StyleGAN2Discriminator
from .mask_dataset import reference_foreground

__all__ = ["MODEL_KIND", "Labels4FreeError", "L4FState", "L4FPrograms", "l4f_programs", "generator_sha256",
           "Labels4FreeResult", "fit_labels4free", "evaluate_masks", "EVAL_DIR"]

MODEL_KIND = "labels4free"
EVAL_DIR = "eval"
#: Settings a run is created with; resuming with other values is refused.
FIXED_SETTINGS = ("generator_sha256", "config", "alpha")


class Labels4FreeError(ValueError):
    """A Labels4Free run directory cannot be used as asked (the message says what to do)."""


class L4FState(NamedTuple):
    """Everything a training step reads and writes (replicated on the mesh).

    Attributes:
        step: int32 [] completed steps.
        alpha_params, d_params: the alpha network's and the discriminator's parameters.
        a_opt, d_opt: their Adam states.
        rng: uint32 [2] raw key data of the training key; step ``t`` uses ``fold_in(rng, t)``.
    """

    step: Any
    alpha_params: Any
    d_params: Any
    a_opt: Any
    d_opt: Any
    rng: Any


class L4FPrograms(NamedTuple):
    """The jitted pieces of a run::

        progs = l4f_programs(gen, cfg, mesh)                  # cfg.alpha_start resolved (not None)
        state = progs.init(np.uint32(seed))
        state, metrics = progs.step(state, gparams)           # gparams replicated on the mesh
        fg, bg, mask, comp = progs.render(state.alpha_params, gparams, z, zb)   # z, zb [N, z_dim] rows
    """

    init: Any
    step: Any
    render: Any
    abstract: Any
    layers: tuple


def _keys(seed: int):
    """(init, train, eval, analysis) keys of a run."""
    return jax.random.split(jax.random.key(seed), 4)


def _edits(gen, cfg):
    return l4f.background_edits(gen, cfg.bg_layer, cfg.bg_channels)


@functools.lru_cache(maxsize=8)
def l4f_programs(gen, cfg: l4f.Labels4FreeConfig, mesh) -> L4FPrograms:
    """Shapes first, then shardings, then the jitted init / step / render programs (cached per gen, cfg, mesh)."""
    if cfg.alpha_start is None:
        raise ValueError("l4f_programs needs cfg.alpha_start resolved (select_alpha_start)")
    layers = l4f.alpha_layers(gen, cfg.alpha_start)
    info = {l.name: l for l in gen.feature_layers()}
    alpha = l4f.AlphaNetwork(cfg.alpha_channels)
    disc = StyleGAN2Discriminator(gen.resolution, cfg.d_channel_base, cfg.d_channel_max, cfg.mbstd_group)
    tx = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2)
    repl, rows = sharding.replicated(mesh), sharding.row_sharding(mesh)
    bsz, zdim, psi = cfg.batch_size, gen.z_dim, float(cfg.truncation)

    def init_state(seed) -> L4FState:
        k_init, k_train, _, _ = _keys(seed)
        ka, kd = jax.random.split(jax.random.key(jax.random.randint(k_init, (), 0, 2 ** 31 - 1), impl="rbg"))
        feats = [jnp.zeros((1, info[k].resolution, info[k].resolution, info[k].channels)) for k in layers]
        ap = alpha.init(ka, feats)["params"]
        dp = disc.init(kd, jnp.zeros((min(cfg.mbstd_group, bsz), gen.resolution, gen.resolution,
                                      gen.img_channels)))["params"]
        return L4FState(step=jnp.zeros((), jnp.int32), alpha_params=ap, d_params=dp, a_opt=tx.init(ap),
                        d_opt=tx.init(dp), rng=jax.random.key_data(k_train))

    abstract, state_sh = training.replicated_state(init_state, mesh)
    gparams_sh = repl

    def images(gparams, z, zb, capture=True):
        """fg = G(z) (truncated, with the alpha layers), bg = G_bg(zb) (untruncated); all without gradients."""
        ws = gen.map_latents(gparams, z, truncation_psi=psi)
        fg, feats = gen.synthesize_styles(gparams, ws, capture=layers if capture else ())
        bg, _ = gen.synthesize_styles(gparams, gen.map_latents(gparams, zb, truncation_psi=1.0),
                                      edits=_edits(gen, cfg))
        return jax.lax.stop_gradient((fg, [feats[k] for k in layers] if capture else None, bg))

    def train_step(state: L4FState, gparams):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        kz, kb, kr = jax.random.split(key, 3)
        draw = lambda k: jax.lax.with_sharding_constraint(jax.random.normal(k, (bsz, zdim)), rows)  # noqa: E731
        z, zb, zr = draw(kz), draw(kb), draw(kr)
        fg, feats, bg = images(gparams, z, zb)
        real, _ = gen.synthesize_styles(gparams, gen.map_latents(gparams, zr, truncation_psi=psi))
        real = jax.lax.stop_gradient(real)

        def a_objective(ap):
            mask = alpha.apply({"params": ap}, feats)                              # [B, R, R]
            comp = l4f.composite(mask, fg, bg)                                     # Eq. 1
            adv = l4f.nonsaturating_g_loss(disc.apply({"params": state.d_params}, comp))
            b = l4f.binarization_loss(mask)
            c = l4f.min_foreground_loss(mask, cfg.phi_c)
            e = l4f.min_background_loss(mask, cfg.phi_e)
            total = cfg.adv_weight * adv + cfg.lambda_b * b + cfg.lambda_c * c + cfg.lambda_e * e
            return total, (adv, b, c, e, jnp.mean(mask), comp)

        def d_objective(dp, comp):
            fake_l = disc.apply({"params": dp}, comp)
            real_l = disc.apply({"params": dp}, real)
            d_fake, d_real = jnp.mean(jax.nn.softplus(fake_l)), jnp.mean(jax.nn.softplus(-real_l))
            return cfg.d_loss_weight * l4f.nonsaturating_d_loss(real_l, fake_l), (d_real, d_fake)

        (a_loss, (adv, b, c, e, mmean, comp)), a_grads = jax.value_and_grad(a_objective, has_aux=True)(
            state.alpha_params)
        (d_loss, (d_real, d_fake)), d_grads = jax.value_and_grad(d_objective, has_aux=True)(
            state.d_params, jax.lax.stop_gradient(comp))
        a_upd, a_opt = tx.update(a_grads, state.a_opt, state.alpha_params)
        d_upd, d_opt = tx.update(d_grads, state.d_opt, state.d_params)
        new = L4FState(step=state.step + 1, alpha_params=optax.apply_updates(state.alpha_params, a_upd),
                       d_params=optax.apply_updates(state.d_params, d_upd), a_opt=a_opt, d_opt=d_opt,
                       rng=state.rng)
        metrics = {"a_loss": a_loss, "a_adv": adv, "reg_b": b, "reg_c": c, "reg_e": e, "mask_mean": mmean,
                   "d_loss": d_loss, "d_real": d_real, "d_fake": d_fake}
        return new, metrics

    def render(alpha_params, gparams, z, zb):
        fg, feats, bg = images(gparams, z, zb)
        mask = alpha.apply({"params": alpha_params}, feats)
        return fg, bg, mask, l4f.composite(mask, fg, bg)

    return L4FPrograms(
        init=jax.jit(init_state, in_shardings=repl, out_shardings=state_sh),
        step=jax.jit(train_step, in_shardings=(state_sh, gparams_sh), out_shardings=(state_sh, repl),
                     donate_argnums=0),
        render=jax.jit(render, in_shardings=(repl, gparams_sh, rows, rows), out_shardings=rows),
        abstract=abstract, layers=layers)


def generator_sha256(params) -> str:
    """SHA-256 of a parameter tree (leaf paths, dtypes, shapes and bytes): identifies the frozen generator."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _state_items(state: L4FState) -> dict:
    return {"alpha": state.alpha_params, "discriminator": state.d_params,
            "train": {"a_opt": state.a_opt, "d_opt": state.d_opt, "step": state.step, "rng": state.rng}}


def _latents(key, indices, z_dim: int) -> np.ndarray:
    """``[len(indices), z_dim]``: latent i is N(0, I) from ``fold_in(key, i)`` (independent of the count)."""
    return np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (z_dim,)))(
        jnp.asarray(indices, jnp.uint32)))


def _render_all(progs, state_alpha, gparams, z, zb, mesh, batch: int):
    """Host arrays (fg, bg, mask, comp) of ``progs.render`` over ``z``/``zb`` in padded batches."""
    n_dev = int(mesh.devices.size)
    step = sharding.padded_length(batch, n_dev)
    outs = []
    for s in range(0, len(z), step):
        zz, bb = z[s:s + step], zb[s:s + step]
        k = len(zz)
        pad = sharding.padded_length(k, n_dev) - k
        if pad:
            zz = np.concatenate([zz, np.repeat(zz[-1:], pad, 0)])
            bb = np.concatenate([bb, np.repeat(bb[-1:], pad, 0)])
        out = progs.render(state_alpha, gparams, *sharding.place_batch((zz, bb), mesh))
        outs.append([np.asarray(o)[:k] for o in out])
    return [np.concatenate([o[i] for o in outs]) for i in range(4)]


def evaluate_masks(soft_masks, reference, threshold: float, ignore_label: Optional[int] = None) -> dict:
    """The papers' fg/bg scores of soft masks against reference masks, through :mod:`gansem.metrics`.

    Args:
        soft_masks: ``[N, H, W]`` float in [0, 1]; a pixel is foreground where ``> threshold``.
        reference: ``[N, H, W]`` 0/1 (or ``ignore_label``).

    Returns:
        ``{"acc", "iou_fg", "iou_bg", "miou", "f1", "precision", "recall"}`` (pixels pooled over the
        set) and ``"max_f_beta"`` (β² = 0.3, per-image average, best of 255 thresholds).
    """
    soft = np.asarray(soft_masks, np.float32)
    m = binary_segmentation_metrics(soft > threshold, reference, ignore_label=ignore_label)
    f = max_f_beta(soft, reference, beta2=0.3, ignore_label=ignore_label)
    return {"acc": m.accuracy, "iou_fg": m.iou_fg, "iou_bg": m.iou_bg, "miou": m.miou, "f1": m.f1,
            "precision": m.precision, "recall": m.recall, "max_f_beta": f.max_f_beta,
            "max_f_beta_threshold": f.threshold}


def _folder_reference(folder: str, n: int, resolution: int, ignore_label: Optional[int] = None):
    """Reference fg masks ``[n, R, R]`` of the evaluation samples from a labelled folder (names ``eval_<i>``)."""
    index = {name: i for i, (name, _, _) in enumerate(folder_pairs(folder))}
    wanted = [f"eval_{i:05d}" for i in range(n)]
    missing = sorted(set(wanted) - set(index))
    if missing:
        raise Labels4FreeError(f"{folder}: no labelled pair for the evaluation samples {missing[:3]} "
                               f"(of {len(missing)}); label the images of <run>/{EVAL_DIR}/images "
                               "(masks/<name>.png, 0 = background) or lower --eval-samples")
    lab = from_folder(folder, indices=[index[name] for name in wanted], ignore_label=ignore_label)
    ref = []
    for j, name in enumerate(wanted):
        _, lab_map = lab[j]
        if lab_map.shape != (resolution, resolution):
            raise Labels4FreeError(f"{folder}: mask {name}.png is {lab_map.shape[1]}x{lab_map.shape[0]}; the "
                                   f"evaluation samples are {resolution}x{resolution}")
        ref.append(lab_map)
    ref = np.stack(ref)
    fg = (ref != 0).astype(np.uint8)
    if lab.ignore_label is not None:
        fg[ref == lab.ignore_label] = lab.ignore_label
    return fg, {"kind": "folder", "path": os.path.abspath(folder)}


class Labels4FreeResult(NamedTuple):
    """What :func:`fit_labels4free` returns: the trained alpha network and how to use it."""

    alpha_params: Any
    config: l4f.Labels4FreeConfig
    history: list
    summary: dict
    masks: Callable  # z [N, z_dim] -> soft masks [N, R, R] of G(z)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _read_model_json(run_dir: str) -> dict:
    meta = training.read_json(os.path.join(run_dir, MODEL_FILE), Labels4FreeError,
                              f"{run_dir} has no {MODEL_FILE}")
    if meta.get("kind") != MODEL_KIND:
        raise Labels4FreeError(f"{run_dir} is not a Labels4Free run (kind {meta.get('kind')!r})")
    return meta


def _run_analysis(gen, gparams, key, num: int, crop: int) -> dict:
    """Sec. 3.1 and 3.2 analyses on ``num`` samples (JSON-able)."""
    z = _latents(key, np.arange(num), gen.z_dim)
    ws = gen.map_latents(gparams, z)
    ssim = l4f.trgb_noise_ssim(gen, gparams, ws, jax.random.fold_in(key, 2 ** 30))
    img, _ = gen.synthesize_styles(gparams, ws)
    scores = l4f.layer_gradient_scores(gen, gparams, ws, l4f.corner_backgrounds(img, crop))
    return {"samples": num, "trgb_noise_ssim": {str(r): v for r, v in ssim.items()},
            "selected_start": l4f.select_alpha_start(ssim), "background_crop": crop,
            "layer_gradient_score": {k: v[0] for k, v in scores.items()},
            "strongest_layer": l4f.strongest_layer(scores),
            "first_layer_channel_scores": [float(x) for x in scores[gen.feature_layers()[1].name][1]]}


def fit_labels4free(gen, gparams, cfg: l4f.Labels4FreeConfig, out_dir: Optional[str] = None, *,
                    resume: bool = False, mesh=None, generator_info: Optional[dict] = None,
                    analysis_samples: int = 8, eval_samples: int = 16, num_panels: int = 6, labels=None,
                    eval_folder: Optional[str] = None, folder_ignore_label: Optional[int] = None,
                    checkpoint_every: int = 100, log_every: int = 10,
                    progress: bool = True, quiet: bool = False, command: Optional[str] = None,
                    stop_after: Optional[int] = None) -> Labels4FreeResult:
    """Train the alpha network and the weak discriminator on a frozen StyleGAN2; evaluate; write the run.

    Args:
        gen, gparams: the frozen StyleGAN2 and its parameters.
        cfg: the hyper-parameters (:data:`gansem.methods.labels4free.CONFIGS`); ``cfg.alpha_start``
            None picks the start resolution by the tRGB analysis.
        out_dir: run directory (module docstring); ``None``: nothing written.
        resume: continue the run in ``out_dir`` from its latest checkpoint.
        mesh: 1-D mesh to train data-parallel on (``None``: one device).
        generator_info: JSON-able description of the generator for ``model.json`` (name, path).
        analysis_samples: samples of the layer analyses (0: skip them; then ``alpha_start`` must be set).
        eval_samples: fresh samples whose masks are evaluated and drawn (``eval/images``).
        num_panels: samples in ``panels.png``.
        labels: reference labeller ``uint8 [B, R, R, 3] -> int [B, R, R]`` (class 0 = background)
            for the scores, e.g. ``resolve_labels_source("faces")``; or ``eval_folder``: a labelled
            folder (:func:`gansem.ufgs.labelled.from_folder`) holding masks of ``eval/images``
            (``folder_ignore_label``: its mask value of unlabelled pixels). Resuming a finished run
            with a folder only evaluates (and rewrites the report).
        checkpoint_every, log_every: in steps.
        stop_after: stop (after checkpointing) once this many steps are done, without evaluating
            (tests of resumption); ``None``: train to ``cfg.steps``.

    Returns:
        :class:`Labels4FreeResult`.
    """
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    n_dev = int(mesh.devices.size)
    cfg.check(gen, n_dev)
    if labels is not None and eval_folder is not None:
        raise Labels4FreeError("give reference labels as a labeller (labels) or a labelled folder, not both")
    if resume and out_dir is None:
        raise Labels4FreeError("resume=True needs the out_dir of the run to continue")
    if cfg.alpha_start is None and analysis_samples < 1:
        raise Labels4FreeError("alpha_start=None is chosen by the tRGB analysis: set analysis_samples >= 1 "
                               "or give alpha_start")
    stored = (training.stored_run(out_dir, resume, read_meta=_read_model_json, error=Labels4FreeError,
                                  what="Labels4Free") if out_dir is not None else None)
    _, _, k_eval, k_analysis = _keys(cfg.seed)
    sha = generator_sha256(gparams)
    if stored is not None:
        analysis = stored.get("analysis")
        start = stored["fixed"]["alpha"]["start_resolution"]
    else:
        analysis = None
        if analysis_samples > 0:
            _log(f"layer analyses on {analysis_samples} samples (tRGB noise SSIM, gradient scores)", quiet)
            analysis = _run_analysis(gen, gparams, k_analysis, analysis_samples, max(1, gen.resolution // 8))
        start = cfg.alpha_start if cfg.alpha_start is not None else analysis["selected_start"]
    run_cfg = dataclasses.replace(cfg, alpha_start=int(start))
    alpha_desc = l4f.describe_alpha(gen, start, cfg.alpha_channels)
    fixed = {"generator_sha256": sha, "config": {k: v for k, v in run_cfg.to_dict().items() if k != "steps"},
             "alpha": alpha_desc}
    if stored is not None:
        training.check_same_settings(out_dir, stored["fixed"], fixed, FIXED_SETTINGS, error=Labels4FreeError)
    meta = {"kind": MODEL_KIND, "version": 1, "generator": {**dict(generator_info or {}), "family": gen.family,
                                                             "resolution": gen.resolution, "sha256": sha},
            "config": run_cfg.to_dict(), "requested_alpha_start": cfg.alpha_start, "alpha": alpha_desc,
            "analysis": analysis, "fixed": fixed}
    if out_dir is not None and stored is None:
        training.create_run_dir(out_dir, meta, error=Labels4FreeError)
        if analysis is not None:
            training.write_json(os.path.join(out_dir, "analysis.json"), analysis)

    # the programs do not depend on the step count or the seed (an argument of init): one compilation serves
    # a run and its resumption with more steps
    progs = l4f_programs(gen, dataclasses.replace(run_cfg, steps=1, seed=0), mesh)
    gp = jax.device_put(gparams, sharding.replicated(mesh))
    mngr = training.checkpoint_manager(out_dir, create=True) if out_dir is not None else None
    state, first = None, 0
    if stored is not None:
        found = training.restore_latest(mngr, _state_items(progs.abstract), out_dir, error=Labels4FreeError)
        if found is not None:
            a, d, t = (found[1][k] for k in ("alpha", "discriminator", "train"))
            state = L4FState(step=t["step"], alpha_params=a, d_params=d, a_opt=t["a_opt"], d_opt=t["d_opt"],
                             rng=t["rng"])
            first = int(state.step)
            _log(f"resuming {out_dir} from step {first}", quiet)
    if state is None:
        state = progs.init(np.uint32(cfg.seed))
    log = training.MetricsLog(out_dir, first)
    last_step = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
    _log(f"Labels4Free on {gen.family} {gen.resolution} px: alpha network on {len(progs.layers)} layers from "
         f"{start} px ({alpha_desc['input_channels']} channels), G_bg = {cfg.bg_layer} "
         f"{'all channels' if cfg.bg_channels is None else f'{len(cfg.bg_channels)} channels'} off; batch "
         f"{cfg.batch_size} over {n_dev} {jax.default_backend()} device(s), steps {first} -> {last_step}", quiet)
    timer = training.StepTimer()
    bar = tqdm(total=last_step, initial=first, desc="train Labels4Free", disable=not progress, unit="step")
    last = None
    try:
        for t in range(first, last_step):
            state, m = progs.step(state, gp)
            done = t + 1
            log.defer(done, m)
            timer.step_done(m)
            is_ckpt = mngr is not None and (done % checkpoint_every == 0 or done == last_step)
            if log.num_deferred >= log_every or is_ckpt or done == last_step:
                last = log.flush()
                bar.set_postfix(a=f"{last['a_loss']:.3f}", d=f"{last['d_loss']:.3f}", m=f"{last['mask_mean']:.2f}")
            bar.update(1)
            if is_ckpt:
                with timer.excluded():
                    training.save_checkpoint(mngr, done, _state_items(state), {"step": done, **last})
        jax.block_until_ready(state)
    finally:
        training.close_training(bar, None, mngr)
    done_now = max(0, last_step - first)
    summary = {"steps": int(state.step), "resumed_from": first if stored is not None else None,
               "steps_this_call": done_now, **timer.summary(done_now, cfg.batch_size, "checkpoints"),
               "devices": n_dev, "backend": jax.default_backend()}
    alpha_params = jax.device_get(state.alpha_params)

    def masks(z):
        z = np.asarray(z, np.float32)
        return _render_all(progs, state.alpha_params, gp, z, z, mesh, cfg.batch_size)[2]

    if stop_after is not None and last_step < cfg.steps:
        return Labels4FreeResult(alpha_params, run_cfg, log.history, summary, masks)

    # -- evaluation on fresh samples ------------------------------------------------------------------------
    n_eval = max(int(eval_samples), int(num_panels))
    z = _latents(k_eval, np.arange(n_eval), gen.z_dim)
    zb = _latents(jax.random.fold_in(k_eval, 2 ** 31), np.arange(n_eval), gen.z_dim)
    fg, bg, soft, comp = _render_all(progs, state.alpha_params, gp, z, zb, mesh, cfg.batch_size)
    fg8 = to_uint8(fg)
    evaluation = {"samples": int(eval_samples), "threshold": cfg.mask_threshold,
                  "mask_mean": float(soft[:eval_samples].mean()),
                  "foreground_fraction": float((soft[:eval_samples] > cfg.mask_threshold).mean()),
                  "reference": None, "scores": None}
    ref = None
    if labels is not None and eval_samples:
        ignore = getattr(labels, "ignore_label", None)
        ref = reference_foreground(labels, fg8[:eval_samples], ignore)
        evaluation["reference"] = {"kind": "labeller", "name": str(getattr(labels, "name", labels)),
                                   "ignore_label": ignore}
    elif eval_folder is not None and eval_samples:
        ignore = folder_ignore_label
        ref, evaluation["reference"] = _folder_reference(eval_folder, eval_samples, gen.resolution, ignore)
    if ref is not None:
        evaluation["scores"] = evaluate_masks(soft[:eval_samples], ref, cfg.mask_threshold, ignore)
    summary["evaluation"] = evaluation
    if out_dir is not None:
        _write_outputs(out_dir, gen, meta, log.history, summary, fg8, bg, soft, comp, num_panels, eval_samples,
                       command)
        _log(f"wrote {out_dir}: report.md, panels.png, curves.png, {EVAL_DIR}/images, checkpoints/", quiet)
    return Labels4FreeResult(alpha_params, run_cfg, log.history, summary, masks)


# -- outputs ------------------------------------------------------------------------------------------------

_TABLE = (("acc", "Acc"), ("iou_fg", "IoU fg"), ("iou_bg", "IoU bg"), ("miou", "mIoU"), ("f1", "F1"),
          ("precision", "Prec"), ("recall", "Rec"), ("max_f_beta", "maxFβ (β²=0.3)"))


def _write_outputs(out_dir, gen, meta, history, summary, fg8, bg, soft, comp, num_panels, eval_samples, command):
    n = min(num_panels, len(fg8))
    mask_img = np.repeat((np.clip(soft[:n], 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    viz.image_rows_figure({"G(z)": fg8[:n], "G_bg(z')": to_uint8(bg[:n]), "mask M": mask_img,
                           "composite": to_uint8(comp[:n])}, os.path.join(out_dir, "panels.png"),
                          title="Labels4Free: G(z) | G_bg(z') | M | M⊙G(z) + (1−M)⊙G_bg(z')")
    recs = [r for r in history if "a_loss" in r]
    steps = [r["step"] for r in recs]
    a_keys = (("a_loss", "total"), ("a_adv", "adversarial"), ("reg_b", "B(M)"), ("reg_c", "C(M)"),
              ("reg_e", "E(M)"), ("mask_mean", "mean M"))
    d_keys = (("d_loss", "total (weighted)"), ("d_real", "real"), ("d_fake", "composite"))
    if recs:
        viz.gan_curves_plot(steps, {name: [r[k] for r in recs] for k, name in a_keys},
                            {name: [r[k] for r in recs] for k, name in d_keys}, os.path.join(out_dir, "curves.png"),
                            title="Labels4Free losses")
    img_dir = os.path.join(out_dir, EVAL_DIR, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(eval_samples):
        viz.save_png(os.path.join(img_dir, f"eval_{i:05d}.png"), fg8[i])
    np.save(os.path.join(out_dir, EVAL_DIR, "soft_masks.npy"), soft[:eval_samples].astype(np.float32))
    ev = summary["evaluation"]
    lines = ["# Labels4Free run", ""]
    if command:
        lines += ["```", command, "```", ""]
    g = meta["generator"]
    cfg = meta["config"]
    lines += [f"Generator: {g.get('name') or g.get('checkpoint') or '?'} ({g['family']}, {g['resolution']} px, "
              f"sha256 {g['sha256'][:12]}…). Alpha network on {len(meta['alpha']['layers'])} layers from "
              f"{meta['alpha']['start_resolution']} px ({meta['alpha']['input_channels']} channels → "
              f"{meta['alpha']['channels']}); G_bg: {cfg['bg_layer']} switched off "
              f"({'all channels' if cfg['bg_channels'] is None else cfg['bg_channels']}).", "",
              f"Training: {summary['steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, ψ {cfg['truncation']}, "
              f"λ1 (B) {cfg['lambda_b']}, λ2 (C) {cfg['lambda_c']} (φ1 {cfg['phi_c']}), λ3 (E) {cfg['lambda_e']} "
              f"(φ2 {cfg['phi_e']}), D loss weight {cfg['d_loss_weight']}; {summary['devices']} "
              f"{summary['backend']} device(s), {summary['seconds']:.1f} s this call.", ""]
    if meta.get("analysis"):
        a = meta["analysis"]
        lines += ["## Layer analyses", "",
                  "tRGB replaced by N(0, I): mean SSIM with the original image per resolution (Sec. 3.1): "
                  + ", ".join(f"{r} px {v:.3f}" for r, v in a["trgb_noise_ssim"].items())
                  + f" → start {a['selected_start']} px"
                  + ("" if meta.get("requested_alpha_start") is None
                     else f" (the config sets {meta['requested_alpha_start']} px)") + ".", "",
                  f"Gradient of ‖G(w) − x‖² (x: {a['background_crop']}-px corner crops up-sampled) per layer, sum of "
                  f"channel norms (Sec. 3.2): strongest layer **{a['strongest_layer']}**; "
                  + ", ".join(f"{k} {v:.3g}" for k, v in a["layer_gradient_score"].items()) + ".", ""]
    lines += ["## Pictures", "", "![panels](panels.png)", "",
              "Rows: G(z) | G_bg(z') (first layer off, another latent) | alpha mask M (white = foreground) | "
              "composite M⊙G(z) + (1−M)⊙G_bg(z'), the image the discriminator sees.", "",
              "![curves](curves.png)", "", "## Evaluation", "",
              f"{ev['samples']} fresh samples (`{EVAL_DIR}/images/eval_<i>.png`, their soft masks in "
              f"`{EVAL_DIR}/soft_masks.npy`): mean M {ev['mask_mean']:.3f}, foreground fraction (M > "
              f"{ev['threshold']}) {ev['foreground_fraction']:.3f}.", ""]
    if ev["scores"] is None:
        lines += ["No reference labels were given, so no segmentation scores are reported. Score the run against a "
                  "labeller of generated images (`--labels faces` or `module:function`, class 0 = background), or "
                  f"label `{EVAL_DIR}/images` (DIR/images + DIR/masks, 0 = background) and pass `--eval-folder DIR`.",
                  ""]
    else:
        s = ev["scores"]
        lines += [f"Against {ev['reference']['kind']} `{ev['reference'].get('name') or ev['reference'].get('path')}` "
                  f"(foreground = label ≠ 0; mask = M > {ev['threshold']}; maxFβ over 255 thresholds of M):", "",
                  "| " + " | ".join(h for _, h in _TABLE) + " |", "|" + "---|" * len(_TABLE),
                  "| " + " | ".join(f"{s[k]:.3f}" for k, _ in _TABLE) + " |", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    training.write_json(os.path.join(out_dir, "report.json"), {"summary": summary, "config": cfg,
                                                               "alpha": meta["alpha"], "analysis": meta["analysis"]})
    training.write_json(os.path.join(out_dir, "manifest.json"), {
        "kind": "gansem Labels4Free run",
        "files": {
            MODEL_FILE: "kind, generator (name, path, sha256), config, alpha network, analyses, fixed settings",
            "analysis.json": "tRGB-noise SSIM per resolution and the selected start; gradient scores per layer",
            f"{CHECKPOINT_DIR}/<step>/": "Orbax checkpoints, the latest 2: alpha, discriminator, train "
                                        "(a_opt, d_opt, step, rng), meta",
            METRICS_FILE: "one JSON line per step: a_loss = adv_weight a_adv + λ1 reg_b + λ2 reg_c + λ3 reg_e, "
                          "mask_mean, d_loss = d_loss_weight (d_real + d_fake)",
            "panels.png": "rows G(z) | G_bg(z') | M | composite for fresh samples",
            "curves.png": "loss terms against the step",
            f"{EVAL_DIR}/images/eval_<i>.png": "evaluation samples G(z_i) (label them for --eval-folder)",
            f"{EVAL_DIR}/soft_masks.npy": "[N, R, R] float32 soft masks M of the evaluation samples",
            "report.md": "this run's pictures, analyses and metric table", "report.json": "the same as JSON",
        }})

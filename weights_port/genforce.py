"""Converter for genforce ``.pth`` checkpoints: PGGAN and StyleGAN (v1).

genforce (``github.com/genforce/genforce``) converts the official TensorFlow models to
``torch.save({'generator': sd, 'discriminator': sd, 'generator_smooth': sd})``; inference
uses ``generator_smooth`` (the moving average of the generator weights), and so do we. A
bare generator state dict with the same key names is accepted too.

Variants are told apart by their keys:

* PGGAN: ``lod``, ``layer{k}.weight/bias``, ``output{b}.weight/bias`` (top level);
* StyleGAN v1: ``mapping.dense{i}.*``, ``truncation.w_avg``, ``synthesis.layer0.const``,
  ``synthesis.layer{k}.{weight, bias, apply_noise.{weight, noise}, style.*, blur.kernel}``;
* genforce StyleGAN2 (``synthesis.early_layer.const``, ``noise_strength``): recognised and
  refused (not supported yet; convert NVIDIA ``.pkl`` or rosinality ``.pt`` files instead);
* the older interfacegan/HiGAN naming (``*.linear.weight``, ``*.wscale.bias``, ``epilogue``):
  recognised and refused.

Resolution, latent sizes, mapping depth and the channel table (``fmaps_base``/``fmaps_max``)
are read from key names and shapes. Settings a state dict cannot reveal are the genforce /
published defaults and are reported under ``info["assumed"]``: equalised learning rate on,
``final_tanh=False``, StyleGAN ``mapping_lr_mul=0.01`` and ``fused_scale='auto'``.

Torch ``[O, I, kh, kw]`` conv weights become HWIO kernels (no flip: both are
cross-correlations); dense ``[O, I]`` weights become ``[I, O]``. Weights stay unscaled.
"""

from __future__ import annotations

import re

import numpy as np

from gansem.generators.base import GeneratorError
from gansem.generators.pggan import PGGAN
from gansem.generators.stylegan import StyleGAN

from .errors import CheckpointError, short_repr

__all__ = ["FAMILIES", "matches", "describe", "convert", "detect_variant"]

FAMILIES = ("pggan", "stylegan")

_TORCH_KINDS = ("torch-zip", "torch-legacy")
_SG2_MESSAGE = (
    "genforce StyleGAN2 checkpoints are not supported yet; convert the official NVIDIA "
    "stylegan2(-ada) .pkl or a rosinality .pt of the same model instead"
)
_LEGACY_MESSAGE = (
    "this is the older genforce/interfacegan/HiGAN {what} layout (keys like {key!r}), which is not "
    "supported; convert the model with genforce/genforce's converters (keys like {new!r}) or use the "
    "official/NVIDIA checkpoint"
)


# -- sniffing ---------------------------------------------------------------------------

def _state_dict(obj):
    """``(state_dict, entry_name)``: genforce's ``generator_smooth`` if present."""
    if not isinstance(obj, dict):
        return None, None
    for entry in ("generator_smooth", "generator"):
        if isinstance(obj.get(entry), dict):
            return obj[entry], entry
    return obj, None


def detect_variant(sd) -> str | None:
    """``'pggan' | 'stylegan' | 'stylegan2' | 'pggan-legacy' | 'stylegan-legacy' | None``."""
    if not isinstance(sd, dict):
        return None
    keys = {k for k in sd if isinstance(k, str)}
    if "synthesis.early_layer.const" in keys or any(
        k.startswith("synthesis.") and k.endswith(".noise_strength") for k in keys
    ):
        return "stylegan2"
    if "mapping.dense0.weight" in keys or "synthesis.layer0.const" in keys:
        return "stylegan"
    if "mapping.dense0.linear.weight" in keys or any(".epilogue." in k for k in keys):
        return "stylegan-legacy"
    if "layer0.weight" in keys and "output0.weight" in keys:
        return "pggan"
    if "layer1.conv.weight" in keys or "layer1.wscale.bias" in keys:
        return "pggan-legacy"
    return None


def matches(kind: str, obj) -> bool:
    """True for genforce PGGAN / StyleGAN / StyleGAN2 ``.pth`` files (the latter two are refused by ``convert``)."""
    if kind not in _TORCH_KINDS:
        return False
    sd, _ = _state_dict(obj)
    return detect_variant(sd) is not None


def _checked_variant(kind, obj):
    if kind not in _TORCH_KINDS:
        raise CheckpointError(f"genforce checkpoints are torch.save files; got a {kind!r} file")
    sd, entry = _state_dict(obj)
    variant = detect_variant(sd)
    if variant is None:
        raise CheckpointError(
            "not a genforce PGGAN/StyleGAN checkpoint: expected {'generator_smooth': state_dict, ...} with keys "
            "like 'layer0.weight'/'output0.weight' (PGGAN) or 'mapping.dense0.weight'/'synthesis.layer0.const' "
            "(StyleGAN)"
        )
    bad_key = next((k for k in sd if not isinstance(k, str)), None)
    if bad_key is not None:
        raise CheckpointError(f"genforce checkpoint: state dict key {short_repr(bad_key)} is not a string; "
                              "not a state dict torch wrote")
    if variant == "stylegan2":
        raise CheckpointError(_SG2_MESSAGE)
    if variant == "stylegan-legacy":
        raise CheckpointError(_LEGACY_MESSAGE.format(
            what="StyleGAN", key="mapping.dense0.linear.weight", new="mapping.dense0.weight"))
    if variant == "pggan-legacy":
        raise CheckpointError(_LEGACY_MESSAGE.format(what="PGGAN", key="layer1.conv.weight", new="layer1.weight"))
    return sd, entry, variant


# -- helpers ------------------------------------------------------------------------------

def _get(sd, key, shape=None):
    if key not in sd:
        raise CheckpointError(f"genforce checkpoint is missing {key!r}")
    v = sd[key]
    if not isinstance(v, np.ndarray):
        raise CheckpointError(f"{key!r} should be a tensor, got {type(v).__name__}")
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise CheckpointError(f"{key!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
    if not np.issubdtype(v.dtype, np.floating):
        raise CheckpointError(f"{key!r} has dtype {v.dtype}, expected floating point")
    return v


def _f32(x):
    out = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise CheckpointError("checkpoint contains NaN or infinite weights")
    return out


def _hwio(w):
    """torch conv weight ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]`` float32."""
    return _f32(np.transpose(w, (2, 3, 1, 0)))


def _indices(sd, pattern):
    rx = re.compile(pattern)
    return sorted(int(m.group(1)) for k in sd for m in [rx.fullmatch(k)] if m)


def _generator(cls, layout: dict):
    """``cls(**layout)``; a layout the generator refuses becomes a `CheckpointError`."""

    try:
        return cls(**layout)
    except GeneratorError as e:
        raise CheckpointError(f"genforce checkpoint: unsupported generator config ({e})") from None


def _check_lod(sd, key):
    """Only final models (level of detail 0) are supported; an absent buffer counts as 0."""
    if key not in sd:
        return
    lod = np.asarray(_get(sd, key), dtype=np.float64).reshape(-1)
    if lod.size != 1 or lod[0] != 0.0:
        raise CheckpointError(
            f"{key!r} = {lod.tolist()}: this is a progressive-growing snapshot at a lower level of detail; "
            "only final models (lod 0) are supported"
        )


def _num_layers(layers, what):
    if not layers or layers != list(range(len(layers))) or len(layers) % 2 or not 4 <= len(layers) <= 18:
        raise CheckpointError(
            f"{what}: expected layer indices 0..2B-1 (two per resolution 4 ... 1024 px, 2 ≤ B ≤ 9), found "
            f"{layers[:20]}{' ...' if len(layers) > 20 else ''}"
        )
    return len(layers)


def _channel_rule(channels, resolution, where):
    """Infer genforce's ``(fmaps_base, fmaps_max)`` from per-block channels (4 px first) and verify it."""
    fmaps_max = int(channels[0])
    fmaps_base = fmaps_max * resolution
    for b, c in enumerate(channels):
        if c < fmaps_max:
            fmaps_base = int(c) * 4 * 2 ** b
            break
    implied = [min(fmaps_base // (4 * 2 ** b), fmaps_max) for b in range(len(channels))]
    if implied != [int(c) for c in channels]:
        raise CheckpointError(
            f"{where}: channels per resolution {list(channels)} do not follow genforce's rule "
            "min(fmaps_base // res, fmaps_max); unsupported architecture variant"
        )
    return fmaps_base, fmaps_max


def _num_parameters(sd):
    return int(sum(int(np.prod(np.shape(v))) for v in sd.values() if isinstance(v, np.ndarray)))


# -- PGGAN -------------------------------------------------------------------------------

def _pggan_layout(sd):
    n = _num_layers(_indices(sd, r"layer(\d{1,6})\.weight"), "PGGAN")
    blocks = n // 2
    resolution = 4 * 2 ** (blocks - 1)
    w0 = _get(sd, "layer0.weight")
    if w0.ndim != 4 or w0.shape[2:] != (4, 4):
        raise CheckpointError(f"'layer0.weight' has shape {tuple(w0.shape)}, expected [C, z_dim, 4, 4]")
    z_dim = int(w0.shape[1])
    channels = [int(_get(sd, f"layer{2 * b + 1}.weight").shape[0]) for b in range(blocks)]
    fmaps_base, fmaps_max = _channel_rule(channels, resolution, "PGGAN")
    return dict(resolution=resolution, z_dim=z_dim, fmaps_base=fmaps_base, fmaps_max=fmaps_max)


def _convert_pggan(sd):
    _check_lod(sd, "lod")
    gen = _generator(PGGAN, _pggan_layout(sd))
    ch, p = gen.channels, {}
    for b, c in enumerate(ch):
        cin0, k0 = (gen.z_dim, 4) if b == 0 else (ch[b - 1], 3)
        for k, cin, ks in ((2 * b, cin0, k0), (2 * b + 1, c, 3)):
            p[f"layer{k}"] = {
                "kernel": _hwio(_get(sd, f"layer{k}.weight", (c, cin, ks, ks))),
                "bias": _f32(_get(sd, f"layer{k}.bias", (c,))),
            }
    last = len(ch) - 1
    p["torgb"] = {
        "kernel": _hwio(_get(sd, f"output{last}.weight", (3, ch[-1], 1, 1))),
        "bias": _f32(_get(sd, f"output{last}.bias", (3,))),
    }
    return gen, {"params": p}


# -- StyleGAN v1 -------------------------------------------------------------------------

def _stylegan_layout(sd):
    if "mapping.label_weight" in sd:
        raise CheckpointError("conditional genforce StyleGAN (mapping.label_weight) is not supported")
    dense = _indices(sd, r"mapping\.dense(\d{1,6})\.weight")
    if not dense or dense != list(range(len(dense))):
        raise CheckpointError(f"StyleGAN mapping: expected mapping.dense0..dense<L-1>.weight, found {dense}")
    d0 = _get(sd, "mapping.dense0.weight")
    dl = _get(sd, f"mapping.dense{dense[-1]}.weight")
    if d0.ndim != 2 or dl.ndim != 2:
        raise CheckpointError("StyleGAN mapping weights must be 2-D [out, in]")
    z_dim, w_dim = int(d0.shape[1]), int(dl.shape[0])
    w_avg = _get(sd, "truncation.w_avg")
    if w_avg.shape != (w_dim,):
        raise CheckpointError(
            f"'truncation.w_avg' has shape {tuple(w_avg.shape)}, expected ({w_dim},): only repeat_w=True "
            "(one w for all layers, the published setting) is supported"
        )
    n = _num_layers(_indices(sd, r"synthesis\.layer(\d{1,6})\.style\.weight"), "StyleGAN synthesis")
    blocks = n // 2
    resolution = 4 * 2 ** (blocks - 1)
    if "synthesis.layer0.const" not in sd:
        raise CheckpointError("StyleGAN: 'synthesis.layer0.const' missing (const_input=False is not supported)")
    channels = [int(_get(sd, f"synthesis.layer{2 * b + 1}.weight").shape[0]) for b in range(blocks)]
    fmaps_base, fmaps_max = _channel_rule(channels, resolution, "StyleGAN")
    return dict(
        resolution=resolution, z_dim=z_dim, w_dim=w_dim, mapping_layers=len(dense),
        mapping_fmaps=int(d0.shape[0]) if len(dense) > 1 else w_dim,
        fmaps_base=fmaps_base, fmaps_max=fmaps_max,
    )


def _blur_kernel(c):
    k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]).astype(np.float32)
    return np.tile((k / k.sum())[None, None], (c, 1, 1, 1))


def _convert_stylegan(sd):
    _check_lod(sd, "synthesis.lod")
    gen = _generator(StyleGAN, _stylegan_layout(sd))
    mapping = {}
    for i in range(gen.mapping_layers):
        din = gen.z_dim if i == 0 else gen.mapping_fmaps
        dout = gen.w_dim if i == gen.mapping_layers - 1 else gen.mapping_fmaps
        mapping[f"dense{i}"] = {
            "kernel": _f32(_get(sd, f"mapping.dense{i}.weight", (dout, din)).T),
            "bias": _f32(_get(sd, f"mapping.dense{i}.bias", (dout,))),
        }
    syn, ch = {}, gen.channels
    for k in range(gen.num_layers):
        b, pre = k // 2, f"synthesis.layer{k}"
        c, r = ch[b], 4 * 2 ** b
        layer = {}
        if k == 0:
            layer["const"] = _f32(np.transpose(_get(sd, f"{pre}.const", (1, c, 4, 4)), (0, 2, 3, 1)))
        else:
            cin = ch[b - 1] if k % 2 == 0 else c
            layer["kernel"] = _hwio(_get(sd, f"{pre}.weight", (c, cin, 3, 3)))
        if k >= 2 and k % 2 == 0:
            blur = _get(sd, f"{pre}.blur.kernel", (c, 1, 3, 3))
            if not np.allclose(blur, _blur_kernel(c), rtol=0, atol=1e-7):
                raise CheckpointError(f"'{pre}.blur.kernel' is not the [1,2,1]x[1,2,1]/16 filter genforce uses")
        layer["bias"] = _f32(_get(sd, f"{pre}.bias", (c,)))
        noise_key = f"{pre}.apply_noise.noise"
        if noise_key in sd and np.shape(sd[noise_key]) == (1, c, 1, 1):
            raise CheckpointError(f"{noise_key!r}: channel-wise noise (noise_type='channel') is not supported")
        layer["noise_strength"] = _f32(_get(sd, f"{pre}.apply_noise.weight", (c,)))
        layer["noise"] = _f32(_get(sd, noise_key, (1, 1, r, r))[0, 0])
        layer["style"] = {
            "kernel": _f32(_get(sd, f"{pre}.style.weight", (2 * c, gen.w_dim)).T),
            "bias": _f32(_get(sd, f"{pre}.style.bias", (2 * c,))),
        }
        syn[f"layer{k}"] = layer
    last = gen.num_blocks - 1
    syn["torgb"] = {
        "kernel": _hwio(_get(sd, f"synthesis.output{last}.weight", (3, ch[-1], 1, 1))),
        "bias": _f32(_get(sd, f"synthesis.output{last}.bias", (3,))),
    }
    w_avg = _f32(_get(sd, "truncation.w_avg", (gen.w_dim,)))
    return gen, {"params": {"mapping": mapping, "truncation": {"w_avg": w_avg}, "synthesis": syn}}


# -- public API --------------------------------------------------------------------------

_ASSUMED = {
    "pggan": {"use_wscale": True, "final_tanh": False, "fused_scale": False, "label_size": 0},
    "stylegan": {"use_wscale": True, "final_tanh": False, "mapping_lr_mul": 0.01, "fused_scale": "auto",
                 "label_size": 0},
}


def _warnings(entry):
    if entry == "generator":
        return ["no 'generator_smooth' entry: using 'generator' (the raw, non-averaged weights)"]
    return []


def describe(kind: str, obj) -> dict:
    """Family, resolution and sizes of a genforce checkpoint, without converting it."""

    sd, entry, variant = _checked_variant(kind, obj)
    layout = _pggan_layout(sd) if variant == "pggan" else _stylegan_layout(sd)
    _generator(PGGAN if variant == "pggan" else StyleGAN, layout)
    return {
        "family": variant,
        "format": f"genforce-{variant} ({kind})",
        "entry": entry or "(bare state dict)",
        "resolution": layout["resolution"],
        "conditional": False,
        "num_classes": 0,
        "latent_dim": layout["z_dim"],
        "num_parameters": _num_parameters(sd),
        "config": layout,
        "assumed": dict(_ASSUMED[variant]),
        "warnings": _warnings(entry),
    }


def convert(kind: str, obj):
    """Convert a genforce PGGAN / StyleGAN checkpoint.

    Returns:
        ``(generator, params, info)``: a :class:`gansem.generators.pggan.PGGAN` or
        :class:`gansem.generators.stylegan.StyleGAN`, ``{"params": ...}`` of float32 numpy
        arrays, and ``info`` (``family``, ``entry``, ``assumed``, ``warnings``).

    Raises:
        CheckpointError: unsupported variant (genforce StyleGAN2, old naming, conditional,
            lod ≠ 0) or missing / wrongly shaped tensors (the message names the key).
    """
    sd, entry, variant = _checked_variant(kind, obj)
    gen, params = _convert_pggan(sd) if variant == "pggan" else _convert_stylegan(sd)
    info = {
        "family": gen.family,
        "format": f"genforce-{variant} ({kind})",
        "entry": entry or "(bare state dict)",
        "converter": "weights_port.genforce",
        "num_parameters": _num_parameters(sd),
        "assumed": dict(_ASSUMED[variant]),
        "warnings": _warnings(entry),
    }
    return gen, params, info

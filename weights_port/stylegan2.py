"""Converter for StyleGAN2 / StyleGAN2-ADA checkpoints → :class:`gansem.generators.stylegan2.StyleGAN2`.

Two source formats produce the same parameter tree:

* **NVIDIA** ``.pkl`` (``stylegan2-ada-pytorch``, and StyleGAN2-config pickles of the
  ``stylegan3`` repo), read with :func:`weights_port.torch_reader.load_nvidia_pickle`
  (never executing the pickled source). ``G_ema`` is used; the architecture is read from
  ``G_ema.init_kwargs``. Names map 1:1: ``mapping.fc0.weight`` → ``params/mapping/fc0/weight``
  (``.`` → ``/``), shapes unchanged. The constant ``*.resample_filter`` buffers are checked
  against ``setup_filter(resample_filter)`` and dropped. StyleGAN3-T/R pickles
  (``synthesis.input.*`` / ``synthesis.L{i}_{size}_{ch}.*`` tensors, or
  ``class SynthesisInput`` in ``module_src``) are refused with a :class:`CheckpointError`.
* **rosinality** ``.pt`` (``torch.save({'g_ema': state_dict, 'latent_avg': [512], ...})`` of
  ``rosinality/stylegan2-pytorch``; a bare ``g_ema`` state dict also works), read with
  :func:`weights_port.torch_reader.load_torch_file`. Mapping (dvschultz's table):
  ============================================  =====================================
  rosinality                                    gansem (NVIDIA name)
  ============================================  =====================================
  ``style.{i+1}.{weight,bias}``                 ``mapping.fc{i}.{weight,bias}``
  ``latent_avg``                                ``mapping.w_avg``
  ``input.input[0]``                            ``synthesis.b4.const``
  ``conv1`` / ``to_rgb1``                       ``synthesis.b4.conv1`` / ``synthesis.b4.torgb``
  ``convs.{2i-2}`` / ``convs.{2i-1}``           ``synthesis.b{4·2^i}.conv0`` / ``.conv1``
  ``to_rgbs.{i-1}``                             ``synthesis.b{4·2^i}.torgb``
  ``*.conv.weight[0]``                          ``*.weight``
  ``*.conv.modulation.{weight,bias}``           ``*.affine.{weight,bias}``
  ``*.activate.bias``                           ``*.bias`` (conv layers)
  ``to_rgb*.bias[0, :, 0, 0]``                  ``*.torgb.bias``
  ``*.noise.weight[0]``                         ``*.noise_strength``
  ``noises.noise_{j}[0, 0]``                    ``noise_const`` of the j-th conv (0 = ``b4.conv1``)
  ``*.blur.kernel``, ``*.upsample.kernel``      checked (= 4× the normalised [1,3,3,1]) and dropped
  ============================================  =====================================

  Rosinality generators have no conditioning and no ``conv_clamp``; the mapping learning-rate
  multiplier (``lr_mlp``) is not stored and assumed to be 0.01 (the default). Truncation uses
  ``latent_avg`` on all layers; if the file has no ``latent_avg`` (a training checkpoint),
  ``w_avg`` is estimated as the mean mapping output over 4096 z drawn with
  ``numpy.random.default_rng(0)`` (rosinality's ``mean_latent(4096)``) and the info says so.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Mapping

import jax
import numpy as np

from gansem.generators.base import GeneratorError, MAX_RESOLUTION, flatten_params, unflatten_params
from gansem.generators.stylegan2 import StyleGAN2, nvidia_name

from .errors import CheckpointError, short_repr
from .torch_reader import LazyArray, PersistentObject

__all__ = ["FAMILIES", "matches", "describe", "convert", "is_stylegan3", "nvidia_generator_config",
           "rosinality_generator_config"]

FAMILIES = ("stylegan2",)

_SG3_KEY = re.compile(r"^synthesis\.(input\.|L\d+_\d+_\d+\.)")
_SG3_REFUSAL = (
    "this is a StyleGAN3 (alias-free, config T or R) generator: its synthesis network "
    "(SynthesisInput with Fourier features, L{i}_{size}_{ch} layers) is not supported by gansem; "
    "only StyleGAN2 / StyleGAN2-ADA networks (NVIDIA stylegan2-ada-pytorch pkls, stylegan3-repo "
    "pkls trained with --cfg=stylegan2, rosinality .pt) can be converted"
)


# -- sniffing ---------------------------------------------------------------------------------

def _shape(a) -> tuple:
    """Shape without reading lazily loaded tensor data."""
    shape = getattr(a, "shape", None)
    return tuple(int(n) for n in shape) if shape is not None else tuple(np.shape(a))


def _g_ema(obj):
    if isinstance(obj, Mapping) and "G_ema" in obj:
        return obj["G_ema"]
    return None


def _nvidia_tensors(g) -> dict:
    """``{'mapping.fc0.weight': tensor}`` of ``G_ema`` without reading tensor data (lazy arrays stay lazy)."""
    if isinstance(g, PersistentObject):
        return g.named_tensors(lazy=True)
    try:  # not a reader PersistentObject: its own listing
        return dict(g.named_tensors())
    except Exception as e:
        raise CheckpointError(f"NVIDIA pickle: cannot list G_ema tensors ({e})") from e


def _rosinality_state(obj):
    if isinstance(obj, Mapping):
        if "g_ema" in obj and isinstance(obj["g_ema"], Mapping):
            return obj["g_ema"]
        if "style.1.weight" in obj and "conv1.conv.weight" in obj:
            return obj
    return None


def is_stylegan3(g) -> bool:
    """True for a StyleGAN3-T/R ``G_ema`` (by tensor names or the pickled source text)."""
    src = getattr(g, "module_src", None)
    if isinstance(src, str) and "class SynthesisInput" in src:
        return True
    try:
        names = list(_nvidia_tensors(g))
    except CheckpointError:
        return False
    return any(_SG3_KEY.match(n) for n in names)


def matches(kind: str, obj) -> bool:
    """NVIDIA pickles with a ``G_ema`` generator, or rosinality ``g_ema`` state dicts."""
    try:
        if kind == "nvidia-pickle":
            g = _g_ema(obj)
            return g is not None and getattr(g, "class_name", "Generator") == "Generator"
        if kind in ("torch-zip", "torch-legacy"):
            sd = _rosinality_state(obj)
            return sd is not None and "style.1.weight" in sd and "input.input" in sd
    except Exception:
        return False
    return False


# -- NVIDIA ------------------------------------------------------------------------------------

_IGNORED_KWARGS = {
    # mapping: only matter for training / w_avg tracking
    "w_avg_beta", "num_ws",
    # synthesis: precision / speed switches without effect on float32 results
    "num_fp16_res", "fp16_channels_last", "fused_modconv_default", "channels_last",
}


def _kwargs_dict(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise CheckpointError(f"NVIDIA pickle: G_ema.{where} is {short_repr(value)}, expected a dict of keyword "
                              "arguments")
    return dict(value)


def _int_kwarg(value, name: str, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise CheckpointError(f"NVIDIA pickle: G_ema.init_kwargs {name} = {short_repr(value)} is not an integer")


def _float_kwarg(value, name: str, optional: bool = False) -> float | None:
    if optional and value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value):
        return float(value)
    raise CheckpointError(f"NVIDIA pickle: G_ema.init_kwargs {name} = {short_repr(value)} is not a finite number")


def _plain(value, name: str):
    """An ignored kwarg's value as a JSON scalar, for the info dict."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise CheckpointError(f"NVIDIA pickle: G_ema.init_kwargs {name} = {short_repr(value)} is not a scalar")


def nvidia_generator_config(g) -> tuple[dict, dict]:
    """Read the StyleGAN2 config from ``G_ema.init_kwargs``.

    Every value is type-checked here; ranges are checked by `StyleGAN2` itself.

    Returns:
        ``(fields for StyleGAN2(...), info dict with ignored/fp16 settings)``.

    Raises:
        CheckpointError: StyleGAN3 networks, unsupported activations/architectures/filters, wrong-typed values.
    """
    if is_stylegan3(g):
        raise CheckpointError(_SG3_REFUSAL)
    if getattr(g, "class_name", "Generator") != "Generator":
        raise CheckpointError(f"NVIDIA pickle: G_ema is a {short_repr(g.class_name)}, expected 'Generator'")
    kw = _kwargs_dict(getattr(g, "init_kwargs", None), "init_kwargs")
    missing = [k for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels") if k not in kw]
    if missing:
        raise CheckpointError(
            f"NVIDIA pickle: G_ema.init_kwargs lacks {missing} (has {sorted(kw)}); not a StyleGAN2 Generator"
        )
    mk = _kwargs_dict(kw.get("mapping_kwargs"), "init_kwargs.mapping_kwargs")
    sk = _kwargs_dict(kw.get("synthesis_kwargs"), "init_kwargs.synthesis_kwargs")
    ignored = {k: _plain(src.pop(k), k) for src in (mk, sk) for k in list(src) if k in _IGNORED_KWARGS}
    info: dict[str, Any] = {"ignored_init_kwargs": ignored}
    if ignored.get("num_fp16_res"):
        info["fp16"] = (f"num_fp16_res={ignored['num_fp16_res']} in the file; gansem runs every block in float32 "
                        "(NVIDIA's force_fp32=True)")
    for name, act in (("mapping", mk.pop("activation", "lrelu")), ("synthesis", sk.pop("activation", "lrelu"))):
        if not isinstance(act, str) or act != "lrelu":
            raise CheckpointError(f"NVIDIA pickle: {name} activation {short_repr(act)} is not supported "
                                  "(only 'lrelu')")
    arch = sk.pop("architecture", "skip")
    if not isinstance(arch, str) or arch not in ("skip", "resnet"):
        raise CheckpointError(f"NVIDIA pickle: synthesis architecture {short_repr(arch)} is not supported "
                              "(skip, resnet)")
    use_noise = sk.pop("use_noise", True)
    if not isinstance(use_noise, (bool, np.bool_)):
        raise CheckpointError(f"NVIDIA pickle: G_ema.init_kwargs use_noise = {short_repr(use_noise)} is not a bool")
    resample_filter = sk.pop("resample_filter", (1, 3, 3, 1))
    if not isinstance(resample_filter, (list, tuple)) or not 1 <= len(resample_filter) <= 16:
        raise CheckpointError(f"NVIDIA pickle: resample_filter {short_repr(resample_filter)} is not a list of "
                              "1 to 16 taps")
    taps = [_float_kwarg(v, "resample_filter") for v in resample_filter]
    fields = dict(
        **{k: _int_kwarg(kw[k], k) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")},
        mapping_layers=_int_kwarg(mk.pop("num_layers", 8), "num_layers"),
        mapping_lr_multiplier=_float_kwarg(mk.pop("lr_multiplier", 0.01), "lr_multiplier"),
        embed_features=_int_kwarg(mk.pop("embed_features", None), "embed_features", optional=True),
        layer_features=_int_kwarg(mk.pop("layer_features", None), "layer_features", optional=True),
        channel_base=_int_kwarg(sk.pop("channel_base", 32768), "channel_base"),
        channel_max=_int_kwarg(sk.pop("channel_max", 512), "channel_max"),
        conv_clamp=_float_kwarg(sk.pop("conv_clamp", None), "conv_clamp", optional=True),
        architecture=arch, use_noise=bool(use_noise),
        resample_filter=tuple(int(v) if v.is_integer() else v for v in taps),
        weights_convention="nvidia",
    )
    leftover = [f"mapping_kwargs.{k}" for k in mk] + [f"synthesis_kwargs.{k}" for k in sk]
    if leftover:
        raise CheckpointError(f"NVIDIA pickle: unsupported Generator options {leftover}")
    return fields, info


def _generator(fields: dict, where: str):
    """``StyleGAN2(**fields)``; a config it refuses becomes a `CheckpointError` saying where it came from."""

    try:
        return StyleGAN2(**fields)
    except GeneratorError as e:
        raise CheckpointError(f"{where}: unsupported generator config ({e})") from None


def _check_nvidia_tensors(gen, tensors: dict) -> None:
    """Every tensor the config implies is present with its shape (nothing is read)."""
    for flat, shape in _expected_shapes(gen).items():
        name = _nvidia_key(flat)
        if name not in tensors:
            raise CheckpointError(f"NVIDIA pickle: G_ema has no tensor {name!r} (expected shape {shape} for the "
                                  "config in its init_kwargs)")
        if _shape(tensors[name]) != shape:
            raise CheckpointError(f"NVIDIA pickle: tensor {name!r} has shape {_shape(tensors[name])}, expected "
                                  f"{shape} for the config in G_ema.init_kwargs")


def _convert_nvidia(obj):
    g = _g_ema(obj)
    if g is None:
        raise CheckpointError("NVIDIA pickle has no 'G_ema' entry (expected a training snapshot dict)")
    fields, info = nvidia_generator_config(g)
    gen = _generator(fields, "NVIDIA pickle: G_ema.init_kwargs")
    tensors = _nvidia_tensors(g)
    _check_nvidia_tensors(gen, tensors)
    params = _fill(gen, tensors.__getitem__, _nvidia_key, "NVIDIA pickle")
    f = _filter_np(gen)
    used = {_nvidia_key(k) for k in _expected_shapes(gen)}
    for name in sorted(set(tensors) - used):
        if name.endswith("resample_filter"):
            if _shape(tensors[name]) != f.shape or not np.allclose(np.asarray(tensors[name], np.float64), f,
                                                                       atol=1e-6):
                raise CheckpointError(f"NVIDIA pickle: {name} differs from the filter {gen.resample_filter}")
            continue
        raise CheckpointError(f"NVIDIA pickle: unexpected G_ema tensor {name!r} {_shape(tensors[name])} "
                              "(not part of a StyleGAN2 generator with this config)")
    info.update(converter="weights_port.stylegan2", source_format="nvidia-pickle")
    return gen, params, info


# -- rosinality ----------------------------------------------------------------------------------

def _check_state_dict(sd, where: str) -> None:
    """Every key is a string and every value a tensor."""
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: key {short_repr(k)} is not a string")
        if not isinstance(v, (LazyArray, np.ndarray)):
            raise CheckpointError(f"{where}: {k!r} is a {type(v).__name__}, not a tensor")


def _ros_count(sd, pattern):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _ros_shape(sd, key: str, ndim: int) -> tuple:
    if key not in sd:
        raise CheckpointError(f"rosinality checkpoint: g_ema has no tensor {key!r}")
    shape = _shape(sd[key])
    if len(shape) != ndim:
        raise CheckpointError(f"rosinality checkpoint: {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def rosinality_generator_config(sd) -> dict:
    """Infer StyleGAN2 fields from a rosinality ``g_ema`` state dict (shapes only)."""
    _check_state_dict(sd, "rosinality checkpoint: g_ema")
    styles = _ros_count(sd, r"^style\.(\d{1,6})\.weight$")
    if not styles or styles != list(range(1, len(styles) + 1)):
        raise CheckpointError(f"rosinality checkpoint: mapping layers style.{{1..n}} expected, found {styles[:20]}")
    convs = _ros_count(sd, r"^convs\.(\d{1,6})\.conv\.weight$")
    if convs != list(range(len(convs))) or len(convs) % 2:
        raise CheckpointError(f"rosinality checkpoint: convs.{{0..2k-1}} expected, found indices {convs[:20]}")

    if 4 << len(convs) // 2 > MAX_RESOLUTION:
        raise CheckpointError(f"rosinality checkpoint: {len(convs)} synthesis convs make a generator of more than "
                              f"{MAX_RESOLUTION} px")
    style_dim = _ros_shape(sd, "style.1.weight", 2)[1]
    for i in styles:
        if _ros_shape(sd, f"style.{i}.weight", 2) != (style_dim, style_dim):
            raise CheckpointError(f"rosinality checkpoint: mapping layer 'style.{i}.weight' has shape "
                                  f"{_shape(sd[f'style.{i}.weight'])}, expected ({style_dim}, {style_dim})")
    _ros_shape(sd, "input.input", 4)
    chs = [_ros_shape(sd, "conv1.conv.weight", 5)[1]]
    chs += [_ros_shape(sd, f"convs.{2 * i}.conv.weight", 5)[1] for i in range(len(convs) // 2)]
    res = 4 * 2 ** (len(chs) - 1)
    rs = [4 * 2 ** k for k in range(len(chs))]
    fields = dict(z_dim=style_dim, c_dim=0, w_dim=style_dim, img_resolution=res,
                  img_channels=_ros_shape(sd, "to_rgb1.conv.weight", 5)[1] if "to_rgb1.conv.weight" in sd else 3,
                  mapping_layers=len(styles), mapping_lr_multiplier=0.01, conv_clamp=None,
                  architecture="skip", truncation_cutoff=None, weights_convention="rosinality")
    cmax = max(chs)
    for base in sorted({c * r for c, r in zip(chs, rs)}):
        if all(min(base // r, cmax) == c for c, r in zip(chs, rs)):
            fields.update(channel_base=base, channel_max=cmax)
            break
    else:
        fields.update(channels=tuple(chs))
    return fields


def _check_rosinality_tensors(gen, sd) -> None:
    """Every tensor the config implies is present with its number of elements (nothing is read); only
    ``latent_avg`` may be missing (it is then estimated)."""
    for flat, shape in _expected_shapes(gen).items():
        name = _nvidia_key(flat)
        key, _ = _ros_key(name)
        if key not in sd:
            if key == "latent_avg":
                continue
            raise CheckpointError(f"rosinality checkpoint: g_ema has no tensor {key!r} (needed for {name})")
        if not isinstance(sd[key], (LazyArray, np.ndarray)):
            raise CheckpointError(f"rosinality checkpoint: {key!r} is a {type(sd[key]).__name__}, not a tensor")
        if math.prod(_shape(sd[key])) != math.prod(shape):
            raise CheckpointError(f"rosinality checkpoint: tensor {key!r} has shape {_shape(sd[key])}, expected "
                                  f"{math.prod(shape)} elements (for {name} {shape}) with this config")


def _ros_key(name: str) -> tuple[str, Any]:
    """Our NVIDIA-style name → (rosinality key, transform)."""
    p = name.split(".")
    if p[0] == "mapping":
        if p[1] == "w_avg":
            return "latent_avg", lambda a: a.reshape(-1)
        return f"style.{int(p[1][2:]) + 1}.{p[2]}", None
    res = int(p[1][1:])
    k = int(round(np.log2(res))) - 2  # block index, b4 = 0
    rest = p[2:]
    if rest == ["const"]:
        return "input.input", lambda a: a[0]
    layer = rest[0]
    if layer == "torgb":
        mod = "to_rgb1" if k == 0 else f"to_rgbs.{k - 1}"
    elif k == 0:
        mod = "conv1"
    else:
        mod = f"convs.{2 * k - 2 if layer == 'conv0' else 2 * k - 1}"
    leaf = rest[1:]
    if leaf[0] == "affine":
        return f"{mod}.conv.modulation.{leaf[1]}", None
    if leaf == ["weight"]:
        return f"{mod}.conv.weight", lambda a: a[0]
    if leaf == ["bias"]:
        if layer == "torgb":
            return f"{mod}.bias", lambda a: a.reshape(-1)
        return f"{mod}.activate.bias", None
    if leaf == ["noise_strength"]:
        return f"{mod}.noise.weight", lambda a: a.reshape(())
    if leaf == ["noise_const"]:
        j = 0 if k == 0 else 2 * k - 1 + (layer == "conv1")
        return f"noises.noise_{j}", lambda a: a.reshape(a.shape[-2:])
    raise CheckpointError(f"internal: no rosinality key for {name}")


def _estimate_w_avg(sd, gen, n=4096, seed=0):
    """Mean mapping output over ``n`` z (rosinality ``mean_latent``), in float64 numpy.

    ``gen`` must have been checked against ``sd`` (`_check_rosinality_tensors`): buffers are ``n x z_dim``.
    """
    z = np.random.default_rng(seed).standard_normal((n, gen.z_dim))
    x = z / np.sqrt(np.mean(z * z, axis=1, keepdims=True) + 1e-8)
    lr = gen.mapping_lr_multiplier
    for i in range(gen.mapping_layers):
        w = np.asarray(sd[f"style.{i + 1}.weight"], np.float64)
        b = np.asarray(sd[f"style.{i + 1}.bias"], np.float64)
        x = x @ (w * (lr / np.sqrt(w.shape[1]))).T + b * lr
        x = np.where(x >= 0, x, 0.2 * x) * np.sqrt(2.0)
    return x.mean(axis=0).astype(np.float32)


def _convert_rosinality(obj):
    sd = _rosinality_state(obj)
    if sd is None:
        raise CheckpointError("expected a rosinality checkpoint ({'g_ema': state_dict, 'latent_avg': ...})")
    gen = _generator(rosinality_generator_config(sd), "rosinality checkpoint")
    info: dict[str, Any] = {"converter": "weights_port.stylegan2", "source_format": "rosinality",
                            "mapping_lr_multiplier": "0.01 (rosinality default lr_mlp; not stored in the file)"}
    extra = dict(sd)
    latent_avg = obj.get("latent_avg") if isinstance(obj, Mapping) and "g_ema" in obj else None
    if latent_avg is not None:
        extra["latent_avg"] = latent_avg
    _check_rosinality_tensors(gen, extra)
    if latent_avg is None:
        extra["latent_avg"] = _estimate_w_avg(sd, gen)
        info["w_avg"] = "estimated: mean mapping output over 4096 z (numpy default_rng(0)); the file has no latent_avg"
    else:
        info["w_avg"] = "latent_avg from the file"
    used = set()

    def fetch(name):
        key, fn = _ros_key(name)
        if key not in extra:
            raise CheckpointError(f"rosinality checkpoint: g_ema has no tensor {key!r} (needed for {name})")
        used.add(key)
        a = np.asarray(extra[key])
        return fn(a) if fn is not None else a

    params = _fill(gen, fetch, _nvidia_key, "rosinality checkpoint", shape_name=lambda n: _ros_key(n)[0])
    f4 = 4.0 * _filter_np(gen)
    for key in sorted(set(extra) - used):
        if key.endswith(".blur.kernel") or key.endswith(".upsample.kernel"):
            if _shape(extra[key]) != f4.shape or not np.allclose(np.asarray(extra[key], np.float64), f4, atol=1e-6):
                raise CheckpointError(f"rosinality checkpoint: {key} is not the [1,3,3,1] up-sampling kernel")
            continue
        raise CheckpointError(f"rosinality checkpoint: unexpected g_ema tensor {key!r} {_shape(extra[key])}")
    return gen, params, info


# -- shared ---------------------------------------------------------------------------------------

def _filter_np(gen) -> np.ndarray:
    f = np.outer(gen.resample_filter, gen.resample_filter).astype(np.float64)
    return f / f.sum()


def _nvidia_key(flat: str) -> str:
    return nvidia_name(flat)


def _expected_shapes(gen) -> dict:


    tree = jax.eval_shape(gen.init_params, jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_params(tree, as_numpy=False).items()}


def _fill(gen, fetch, key_of, where, shape_name=None) -> dict:
    """Build the nested float32 param tree, one array at a time, checking every shape."""

    flat = {}
    for name, shape in _expected_shapes(gen).items():
        src = key_of(name)
        a = np.asarray(fetch(src))
        if a.dtype != np.float32:
            a = a.astype(np.float32)
        if tuple(a.shape) != shape:
            shown = shape_name(src) if shape_name else src
            raise CheckpointError(f"{where}: tensor {shown!r} has shape {tuple(a.shape)} after conversion, "
                                  f"expected {shape} for this config")
        flat[name] = a
    return unflatten_params(flat)


def _count(tensors) -> int:
    return int(sum(int(np.prod(_shape(v), dtype=np.int64)) for v in tensors.values()))


def describe(kind: str, obj) -> dict:
    """Summary without converting (config, format, parameter count)."""
    if kind == "nvidia-pickle":
        g = _g_ema(obj)
        if g is None:
            raise CheckpointError("NVIDIA pickle has no 'G_ema' entry")
        if is_stylegan3(g):
            raise CheckpointError(_SG3_REFUSAL)
        fields, info = nvidia_generator_config(g)
        gen = _generator(fields, "NVIDIA pickle: G_ema.init_kwargs")
        tensors = _nvidia_tensors(g)
        _check_nvidia_tensors(gen, tensors)
        n = _count({k: v for k, v in tensors.items() if not k.endswith("resample_filter")})
        fmt = "nvidia-pickle (stylegan2-ada-pytorch)"
    else:
        sd = _rosinality_state(obj)
        if sd is None:
            raise CheckpointError("not a rosinality StyleGAN2 checkpoint (no 'g_ema' with style.*/conv1.* keys)")
        gen, info = _generator(rosinality_generator_config(sd), "rosinality checkpoint"), {}
        _check_rosinality_tensors(gen, sd)
        n = _count({k: v for k, v in sd.items() if not k.endswith("kernel")}) + gen.w_dim
        fmt = f"rosinality ({kind})"
    return {
        "family": "stylegan2", "format": fmt, "resolution": gen.img_resolution,
        "conditional": gen.c_dim > 0, "num_classes": gen.c_dim, "num_parameters": n,
        "z_dim": gen.z_dim, "w_dim": gen.w_dim, "num_ws": gen.num_ws,
        "channels": dict(zip(gen.block_resolutions, gen.block_channels)),
        "mapping_layers": gen.mapping_layers, "conv_clamp": gen.conv_clamp,
        "architecture": gen.architecture, "weights_convention": gen.weights_convention, **info,
    }


def convert(kind: str, obj):
    """``(StyleGAN2 generator, {"params": ...} of float32 numpy arrays, info)``."""
    if kind == "nvidia-pickle":
        return _convert_nvidia(obj)
    if kind in ("torch-zip", "torch-legacy"):
        return _convert_rosinality(obj)
    raise CheckpointError(f"stylegan2 converter: unsupported checkpoint kind {kind!r} "
                          "(expected an NVIDIA .pkl or a rosinality .pt)")

"""Converter for ``pytorch-pretrained-biggan`` (BigGAN-deep) checkpoints.

The published files are ``biggan-deep-{128,256,512}-pytorch_model.bin`` (a legacy,
non-zip ``torch.save`` of the ``BigGAN`` state dict, torch 1.0.1) with a
``config.json`` (``BigGANConfig``) next to them. Either the directory holding
``pytorch_model.bin`` + ``config.json`` (the layout ``BigGAN.from_pretrained(dir)``
reads) or the ``.bin`` path can be given to :func:`convert_file`; a sibling
``<prefix>-config.json`` (the S3 names) is found too. Without a config, the three
published configs are recognised from the tensor shapes.

What the conversion does (see :mod:`gansem.generators.biggan`):

* spectral norm folded in with the **stored** u, v (eval-mode PyTorch, no power
  iteration): ``W = weight_orig / (u · (W_mat v))``, ``W_mat = weight_orig.reshape(out, -1)``;
* ``Conv2d`` ``[out, in, kh, kw]`` → HWIO; ``Linear`` ``[out, in]`` → ``[in, out]``;
* ``embeddings.weight [z_dim, n_classes]`` (a bias-free Linear applied to one-hot
  class vectors) → ``class_embedding/kernel [n_classes, z_dim]``;
* ``generator.layers.{m}``: the ModuleList index ``m`` of config layer ``i`` is
  ``i + (i >= attention_layer_position)``; the attention module sits at
  ``m = attention_layer_position``;
* BN statistics tables ``running_means``/``running_vars [n_stats, C]`` copied as is.

Module contract for ``python -m weights_port``: :data:`FAMILIES`, :func:`matches`,
:func:`describe`, :func:`convert` (both take optional ``config=`` — the ``config.json``
dict — and ``path=``, where to look for ``config.json``); plus :func:`load`,
:func:`describe_file`, :func:`convert_file` taking a path.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Mapping, Optional

import jax
import numpy as np

from gansem.generators.base import GeneratorError
from gansem.generators.biggan import BIGGAN_DEEP_CONFIGS, BigGANDeep

from .errors import CheckpointError, short_repr
from .torch_reader import load_torch_file

__all__ = [
    "FAMILIES",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "matches",
    "describe",
    "convert",
    "load",
    "describe_file",
    "convert_file",
    "generator_from_config",
    "torch_shapes",
]

FAMILIES = ("biggan",)
WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"

_TORCH_KINDS = ("torch-zip", "torch-legacy")
_LAYER_KEY = re.compile(r"generator\.layers\.(\d{1,6})(\.|$)")
# BigGANConfig defaults (the 128 model), used for keys a config.json leaves out, as upstream does.
_CONFIG_DEFAULTS = dict(
    output_dim=128, z_dim=128, class_embed_dim=128, channel_width=128, num_classes=1000,
    layers=None, attention_layer_position=8, eps=1e-4, n_stats=51,
)


# -- sniffing and layout -------------------------------------------------------------

def matches(kind: str, obj) -> bool:
    """A torch file holding a pytorch-pretrained-biggan ``BigGAN`` state dict."""
    return (kind in _TORCH_KINDS and isinstance(obj, Mapping) and "embeddings.weight" in obj
            and "generator.gen_z.weight_orig" in obj)


def _plan(gen):
    """``[(gansem path, op, torch name)]`` for every parameter; op in copy / linear / sn_dense / sn_conv.

    ``sn_*`` torch names are prefixes of ``.weight_orig``/``.weight_u``/``.weight_v``.
    """
    att = gen.attention_layer_position
    plan = [
        (("class_embedding", "kernel"), "linear", "embeddings.weight"),
        (("gen_z", "kernel"), "sn_dense", "generator.gen_z"),
        (("gen_z", "bias"), "copy", "generator.gen_z.bias"),
    ]
    for i in range(len(gen.layers)):
        if i == att:
            t = f"generator.layers.{att}"
            for ours, theirs in (("theta", "theta"), ("phi", "phi"), ("g", "g"), ("o_conv", "o_conv")):
                plan.append((("attn", ours, "kernel"), "sn_conv", f"{t}.snconv1x1_{theirs}"))
            plan.append((("attn", "gamma"), "copy", f"{t}.gamma"))
        t = f"generator.layers.{i + (1 if i >= att else 0)}"
        b = f"block{i}"
        for j in range(4):
            plan += [
                ((b, f"bn_{j}", "stats", "running_means"), "copy", f"{t}.bn_{j}.running_means"),
                ((b, f"bn_{j}", "stats", "running_vars"), "copy", f"{t}.bn_{j}.running_vars"),
                ((b, f"bn_{j}", "scale", "kernel"), "sn_dense", f"{t}.bn_{j}.scale"),
                ((b, f"bn_{j}", "offset", "kernel"), "sn_dense", f"{t}.bn_{j}.offset"),
                ((b, f"conv_{j}", "kernel"), "sn_conv", f"{t}.conv_{j}"),
                ((b, f"conv_{j}", "bias"), "copy", f"{t}.conv_{j}.bias"),
            ]
    plan += [
        (("bn_stats", "running_means"), "copy", "generator.bn.running_means"),
        (("bn_stats", "running_vars"), "copy", "generator.bn.running_vars"),
        (("bn_weight",), "copy", "generator.bn.weight"),
        (("bn_bias",), "copy", "generator.bn.bias"),
        (("conv_to_rgb", "kernel"), "sn_conv", "generator.conv_to_rgb"),
        (("conv_to_rgb", "bias"), "copy", "generator.conv_to_rgb.bias"),
    ]
    return plan


def _gansem_shapes(gen) -> dict:
    abstract = jax.eval_shape(gen.init_params, jax.random.key(0))["params"]

    def get(path):
        node = abstract
        for p in path:
            node = node[p]
        return tuple(node.shape)

    return {path: get(path) for path, _, _ in _plan(gen)}


def _torch_entries(op: str, name: str, shape: tuple) -> dict:
    """Expected torch tensors (name → shape) for one gansem parameter of ``shape``."""
    if op == "copy":
        return {name: shape}
    if op == "linear":
        return {name: shape[::-1]}
    if op == "sn_dense":  # kernel [in, out]
        cin, cout = shape
        return {f"{name}.weight_orig": (cout, cin), f"{name}.weight_u": (cout,), f"{name}.weight_v": (cin,)}
    if op == "sn_conv":  # kernel [kh, kw, in, out]
        kh, kw, cin, cout = shape
        return {f"{name}.weight_orig": (cout, cin, kh, kw), f"{name}.weight_u": (cout,),
                f"{name}.weight_v": (cin * kh * kw,)}
    raise AssertionError(op)


def torch_shapes(gen) -> dict[str, tuple]:
    """The state dict (name → shape) upstream ``BigGAN(config)`` has for this generator's config."""
    shapes = _gansem_shapes(gen)
    out = {}
    for path, op, name in _plan(gen):
        out.update(_torch_entries(op, name, shapes[path]))
    return out


# -- config --------------------------------------------------------------------------

def generator_from_config(config: Mapping[str, Any], truncation: float = 1.0):
    """``BigGANConfig`` dict (``config.json``) → :class:`~gansem.generators.biggan.BigGANDeep`."""

    cfg = dict(_CONFIG_DEFAULTS)
    cfg.update(config)
    if cfg["layers"] is None:
        cfg["layers"] = BIGGAN_DEEP_CONFIGS[128]["layers"]
    try:
        layers = tuple((bool(l[0]), int(l[1]), int(l[2])) for l in cfg["layers"])
        gen = BigGANDeep(
            z_dim=int(cfg["z_dim"]), n_classes=int(cfg["num_classes"]), channel_width=int(cfg["channel_width"]),
            layers=layers, attention_layer_position=int(cfg["attention_layer_position"]),
            n_stats=int(cfg["n_stats"]), eps=float(cfg["eps"]), truncation=truncation,
        )
        output_dim, class_embed_dim = int(cfg["output_dim"]), int(cfg["class_embed_dim"])
    except (GeneratorError, TypeError, ValueError, LookupError, OverflowError) as e:
        raise CheckpointError(f"BigGAN config.json is not a valid BigGAN-deep config: {e}") from None
    if output_dim != gen.resolution:
        raise CheckpointError(
            f"BigGAN config.json: output_dim {output_dim} but the layers upsample 4 px to {gen.resolution} px"
        )
    if class_embed_dim != gen.z_dim:
        # Upstream ignores class_embed_dim: the embedding is num_classes -> z_dim.
        raise CheckpointError(
            f"BigGAN config.json: class_embed_dim {class_embed_dim} != z_dim {gen.z_dim}; "
            "pytorch-pretrained-biggan's embedding maps classes to z_dim, so the file cannot be consistent"
        )
    return gen


def _infer_published(sd: Mapping):
    """The published config whose state dict this is, or None."""

    mods = {int(m.group(1)) for k in sd for m in [_LAYER_KEY.match(k)] if m}
    for res, cfg in BIGGAN_DEEP_CONFIGS.items():
        if len(mods) != len(cfg["layers"]) + 1:
            continue
        gen = BigGANDeep(**cfg)
        exp = torch_shapes(gen)
        if set(exp) == set(sd) and all(tuple(getattr(sd[k], "shape", ())) == s for k, s in exp.items()):
            return res, gen
    return None


def _state_dict(obj) -> Mapping:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a pytorch-pretrained-biggan state dict (name -> tensor); got {type(obj).__name__}"
        )
    bad_key = next((k for k in obj if not isinstance(k, str)), None)
    if bad_key is not None:
        raise CheckpointError(f"BigGAN state dict: key {short_repr(bad_key)} is not a string")
    return obj


def _generator_for(sd: Mapping, config: Optional[Mapping]):
    if config is not None:
        return generator_from_config(config), None
    found = _infer_published(sd)
    if found is None:
        raise CheckpointError(
            "BigGAN state dict does not match a published biggan-deep-{128,256,512} config; its config.json is "
            "needed: convert the directory (or the .bin next to config.json) with weights_port.biggan.convert_file"
        )
    res, gen = found
    return gen, f"biggan-deep-{res}"


# -- description and conversion ------------------------------------------------------------

def _config_near(path: Optional[str]):
    """``(config dict or None, config path or None)`` next to a checkpoint path."""
    if path is None:
        return None, None
    config_path = _paths(path)[1]
    if config_path is None:
        return None, None
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, or a huge integer
        raise CheckpointError(f"{config_path}: cannot read BigGAN config ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object (BigGANConfig)")
    return config, config_path


def describe(kind: str, obj, config: Optional[Mapping] = None, path: Optional[str] = None) -> dict:
    """Summary without converting: family, format, resolution, classes, parameter count.

    Args:
        kind, obj: from ``weights_port.torch_reader.load_any``.
        config: the ``config.json`` dict, or ``None`` to look next to ``path`` (then to
            recognise a published config by shape).
        path: the checkpoint's directory or ``.bin`` path (for finding ``config.json``).
    """
    if config is None:
        config = _config_near(path)[0]
    sd = _state_dict(obj)
    emb_shape = tuple(getattr(sd.get("embeddings.weight"), "shape", ()))
    if len(emb_shape) != 2:
        raise CheckpointError("not a BigGAN state dict: 'embeddings.weight' [z_dim, num_classes] is missing")
    z_dim, n_classes = (int(s) for s in emb_shape)
    info = {
        "family": "biggan", "format": kind, "conditional": True, "num_classes": n_classes,
        "latent_dim": z_dim, "num_tensors": len(sd),
        "num_parameters": int(sum(int(np.prod(getattr(v, "shape", ()))) for v in sd.values())),
    }
    if config is not None:
        gen = generator_from_config(config)
        for name, shape in torch_shapes(gen).items():
            _check_tensor(sd, name, shape)
        info.update(resolution=gen.resolution, model=None)
    else:
        found = _infer_published(sd)
        info.update(resolution=found[0] if found else None, model=f"biggan-deep-{found[0]}" if found else None)
        if not found:
            info["note"] = "not a published config; resolution needs config.json"
    return info


def _spectral_normalise(w: np.ndarray, u: np.ndarray, v: np.ndarray, name: str) -> np.ndarray:
    """``weight_orig / (u · (W_mat v))`` with the stored u, v (eval-mode ``torch.nn.utils.spectral_norm``)."""
    w64 = np.asarray(w, np.float64)
    sigma = float(np.dot(np.asarray(u, np.float64), w64.reshape(w64.shape[0], -1) @ np.asarray(v, np.float64)))
    if not np.isfinite(sigma) or sigma == 0.0:
        raise CheckpointError(f"{name}: spectral-norm estimate u·(W v) = {sigma}; weight_u/weight_v are corrupt")
    return (w64 / sigma).astype(np.float32)


def _tensor(sd: Mapping, name: str, shape: tuple) -> np.ndarray:
    """``sd[name]`` as a numpy array after checking presence, shape and dtype (lazy arrays read here)."""
    return np.asarray(_check_tensor(sd, name, shape))


def _check_tensor(sd: Mapping, name: str, shape: tuple):
    """``sd[name]`` after checking presence, shape and dtype, without reading it."""
    if name not in sd:
        raise CheckpointError(f"BigGAN state dict: missing tensor {name!r} (expected shape {list(shape)})")
    a = sd[name]
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise CheckpointError(f"BigGAN state dict: {name!r} is a {type(a).__name__}, expected a tensor")
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(
            f"BigGAN state dict: {name!r} has shape {list(a.shape)}, expected {list(shape)} for this config"
        )
    if not np.issubdtype(np.dtype(a.dtype), np.floating):
        raise CheckpointError(f"BigGAN state dict: {name!r} has dtype {a.dtype}, expected floating point")
    return a


def convert(kind: str, obj, config: Optional[Mapping] = None, truncation: float = 1.0,
            path: Optional[str] = None):
    """State dict → ``(BigGANDeep, {"params": ...} float32 numpy, info)``.

    Args:
        kind: reader kind (``"torch-legacy"`` or ``"torch-zip"``).
        obj: the state dict (name → numpy array) from ``weights_port.torch_reader``.
        config: the ``config.json`` dict; ``None``: read ``config.json`` next to ``path`` if
            there is one, else recognise the published configs by shape.
        truncation: generator setting of the returned generator (in (0, 1]).
        path: the checkpoint's directory or ``.bin`` path (for finding ``config.json``).

    Raises:
        CheckpointError: missing/unexpected tensors, wrong shapes or dtypes, bad config, corrupt u/v.
    """
    if kind not in _TORCH_KINDS:
        raise CheckpointError(f"BigGAN checkpoints are torch files; got a {kind!r} file")
    config_path = None
    if config is None:
        config, config_path = _config_near(path)
    sd = _state_dict(obj)
    gen, model = _generator_for(sd, config)
    if not 0.0 < truncation <= 1.0:
        raise CheckpointError(f"truncation must be in (0, 1]; got {truncation}")
    gen = gen.replace(truncation=float(truncation))
    shapes = _gansem_shapes(gen)
    plan = _plan(gen)
    expected = set()
    for path, op, name in plan:
        expected.update(_torch_entries(op, name, shapes[path]))
    unexpected = sorted(set(sd) - expected)
    if unexpected:
        raise CheckpointError(
            f"BigGAN state dict has {len(unexpected)} tensor(s) this config does not have, e.g. {unexpected[:4]}; "
            "is config.json the one that belongs to this file?"
        )
    params: dict = {}
    for path, op, name in plan:
        shape = shapes[path]
        want = _torch_entries(op, name, shape)
        if op == "copy":
            value = np.array(_tensor(sd, name, shape), np.float32)
        elif op == "linear":
            value = np.ascontiguousarray(_tensor(sd, name, want[name]).T, np.float32)
        else:
            w, u, v = (_tensor(sd, f"{name}.{s}", want[f"{name}.{s}"]) for s in ("weight_orig", "weight_u", "weight_v"))
            w = _spectral_normalise(w, u, v, name)
            value = np.ascontiguousarray(w.T if op == "sn_dense" else w.transpose(2, 3, 1, 0))
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"BigGAN state dict: {name!r} contains NaN or inf")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    info = {"converter": "weights_port.biggan", "model": model, "truncation": gen.truncation,
            "config_file": config_path, "spectral_norm": "folded with stored u, v (eval mode)"}
    return gen, {"params": params}, info


# -- files -----------------------------------------------------------------------------

def _paths(path: str) -> tuple[str, Optional[str]]:
    """(weights file, config file or None) for a directory or a ``.bin`` path."""
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        config = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path}: directory has no {WEIGHTS_NAME} (the BigGAN.from_pretrained layout)")
        return weights, config if os.path.isfile(config) else None
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or directory")
    folder, base = os.path.split(path)
    candidates = [os.path.join(folder, CONFIG_NAME)]
    if base.endswith(WEIGHTS_NAME):  # biggan-deep-128-pytorch_model.bin -> biggan-deep-128-config.json
        candidates.insert(0, os.path.join(folder, base[: -len(WEIGHTS_NAME)] + CONFIG_NAME))
    return path, next((c for c in candidates if os.path.isfile(c)), None)


def load(path: str):
    """Read a checkpoint without converting: ``(kind, state_dict, config dict or None, config path)``."""

    weights = _paths(path)[0]
    kind = "torch-zip" if zipfile.is_zipfile(weights) else "torch-legacy"
    obj = load_torch_file(weights, lazy=True)  # tensors are read one at a time by convert()
    if not matches(kind, obj):
        raise CheckpointError(
            f"{weights}: not a pytorch-pretrained-biggan state dict ('embeddings.weight' and "
            "'generator.gen_z.weight_orig' expected)"
        )
    config, config_path = _config_near(path)
    return kind, obj, config, config_path


def describe_file(path: str) -> dict:
    """:func:`describe` for a directory or ``.bin`` path (uses ``config.json`` when present)."""
    kind, obj, config, config_path = load(path)
    info = describe(kind, obj, config)
    info["config_file"] = config_path
    return info


def convert_file(path: str, truncation: float = 1.0):
    """:func:`convert` for a directory or ``.bin`` path (uses ``config.json`` when present)."""
    kind, obj, config, config_path = load(path)
    gen, params, info = convert(kind, obj, config, truncation=truncation)
    info["config_file"] = config_path
    return gen, params, info

"""Converter for the DCGAN of ``gan-face-generate`` (PyTorch DCGAN tutorial layout).

Reads ``weights.tar`` (a torch zip file holding ``{"netG_state_dict": ...}``) or
any state dict with the tutorial's ``main.{i}.*`` keys. PyTorch
``ConvTranspose2d`` weights ``[in, out, k, k]`` become HWIO kernels of the
equivalent dilated convolution: spatially flipped, axes (2, 3, 0, 1).
"""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np

from gansem.generators.base import GeneratorError, check_params
from gansem.generators.dcgan import DCGAN

from .errors import CheckpointError, short_repr

__all__ = ["FAMILIES", "matches", "describe", "convert", "bundled_weights_path", "BUNDLED_SHA256"]

FAMILIES = ("dcgan",)
BUNDLED_SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"


def bundled_weights_path() -> str:
    """Path of ``weights.tar`` inside the installed ``gan-face-generate`` package (not imported: it needs torch)."""
    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default generator needs the PyPI package gan-face-generate for its weights: "
            "pip install --no-deps gan-face-generate==1.1.1"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights.tar")
    if not os.path.isfile(path):
        raise CheckpointError(f"gan-face-generate is installed but {path} is missing; reinstall it")
    return path


_KEY = re.compile(r"main\.(\d{1,3})\.(weight|bias|running_mean|running_var|num_batches_tracked)")


def _state_dict(obj):
    if isinstance(obj, dict) and "netG_state_dict" in obj:
        obj = obj["netG_state_dict"]
    return obj if isinstance(obj, dict) else None


def matches(kind: str, obj) -> bool:
    sd = _state_dict(obj)
    return kind in ("torch-zip", "torch-legacy") and sd is not None and "main.0.weight" in sd and "main.1.running_mean" in sd


def _layout(sd):
    """Module indices of the ConvTranspose2d layers, after checking every key and value of the state dict."""
    for k, v in sd.items():
        if not isinstance(k, str) or not _KEY.fullmatch(k):
            raise CheckpointError(f"DCGAN state dict: unexpected key {short_repr(k)} (expected main.<i>.weight, "
                                  ".bias, .running_mean, .running_var, .num_batches_tracked)")
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"DCGAN state dict: {k!r} is a {type(v).__name__}, not a tensor")
    convs = sorted(int(k.split(".")[1]) for k in sd if k.endswith(".weight") and sd[k].ndim == 4)
    if len(convs) < 2:
        raise CheckpointError("DCGAN state dict: expected at least two ConvTranspose2d weights "
                              "(main.<i>.weight with 4 dims)")
    return convs


def _generator(sd):
    """``(DCGAN, ConvTranspose2d module indices)`` for a state dict whose keys, values and sizes check out."""

    if sd is None:
        raise CheckpointError("expected a DCGAN state dict (or {'netG_state_dict': ...})")
    convs = _layout(sd)
    w0 = sd[f"main.{convs[0]}.weight"]
    nz, c0 = int(w0.shape[0]), int(w0.shape[1])
    num_blocks = len(convs) - 1
    ngf = c0 // 2 ** (num_blocks - 1)
    if ngf * 2 ** (num_blocks - 1) != c0:
        raise CheckpointError(f"DCGAN state dict: {c0} channels after the first layer is not ngf * 2^{num_blocks - 1}")
    try:
        gen = DCGAN(nz=nz, ngf=ngf, nc=int(sd[f"main.{convs[-1]}.weight"].shape[1]), num_blocks=num_blocks)
    except GeneratorError as e:
        raise CheckpointError(f"DCGAN state dict: unsupported generator config ({e})") from None
    return gen, convs


def describe(kind: str, obj) -> dict:
    sd = _state_dict(obj)
    gen, _ = _generator(sd)
    n_params = int(sum(v.size for k, v in sd.items() if "num_batches" not in k))
    return {
        "family": "dcgan", "format": kind, "resolution": gen.resolution,
        "conditional": False, "num_classes": 0, "latent_dim": gen.nz, "num_parameters": n_params,
    }


def convert(kind: str, obj):
    sd = _state_dict(obj)
    gen, convs = _generator(sd)
    num_blocks = gen.num_blocks
    params = {}
    for i, ci in enumerate(convs):
        w = np.asarray(sd[f"main.{ci}.weight"], np.float32)  # [in, out, k, k]
        params[f"convT{i}"] = {"kernel": np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))}
        if i < num_blocks:
            bn = ci + 1
            try:
                params[f"bn{i}"] = {
                    "scale": np.asarray(sd[f"main.{bn}.weight"], np.float32),
                    "bias": np.asarray(sd[f"main.{bn}.bias"], np.float32),
                    "mean": np.asarray(sd[f"main.{bn}.running_mean"], np.float32),
                    "var": np.asarray(sd[f"main.{bn}.running_var"], np.float32),
                }
            except KeyError as e:
                raise CheckpointError(f"DCGAN state dict: missing BatchNorm tensor {e.args[0]!r}") from None
    params = {"params": params}

    try:
        check_params(gen, params, where="DCGAN state dict")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return gen, params, {"converter": "weights_port.dcgan"}

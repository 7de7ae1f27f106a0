"""Format detection and conversion of published checkpoints into gansem checkpoints.

Every family converter module (``weights_port.<family>``) exposes ``FAMILIES``,
``matches(kind, obj)``, ``describe(kind, obj)`` and ``convert(kind, obj)``;
this module reads a file once with the allow-list reader and dispatches.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
from typing import Optional

from gansem.generators.base import GeneratorError

from .errors import CheckpointError
from .torch_reader import load_any

__all__ = ["CONVERTERS", "read_checkpoint", "find_converter", "inspect_file", "convert_file", "sha256"]

# family converter modules, in the order they are tried
CONVERTERS = ("dcgan", "stylegan2", "genforce", "biggan")


def _modules():
    mods = []
    for name in CONVERTERS:
        try:
            mods.append(importlib.import_module(f"{__package__}.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
    return mods


def sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def read_checkpoint(path: str):
    """``(kind, obj)`` for a checkpoint file (or a BigGAN directory holding pytorch_model.bin + config.json)."""

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "generator.json")):
            raise CheckpointError(f"{path!r} is already a gansem checkpoint directory; nothing to convert")
        if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            return load_any(os.path.join(path, "pytorch_model.bin"))
        raise CheckpointError(f"{path!r} is a directory without a checkpoint file (expected pytorch_model.bin)")
    if not os.path.exists(path):
        raise CheckpointError(f"{path!r} does not exist")
    return load_any(path)


def _call(fn, kind, obj, path):
    """Call a converter hook, passing ``path`` to hooks that need sibling files (BigGAN's config.json)."""

    if "path" in inspect.signature(fn).parameters:
        return fn(kind, obj, path=path)
    return fn(kind, obj)


def find_converter(kind: str, obj, family: Optional[str] = None, path: str = "?"):
    mods = _modules()
    if family not in (None, "auto"):
        cands = [m for m in mods if family in m.FAMILIES]
        if not cands:
            known = sorted({f for m in mods for f in m.FAMILIES})
            raise CheckpointError(f"unknown --family {family!r}; known: {known}")
        mod = cands[0]
        if not mod.matches(kind, obj):
            raise CheckpointError(f"{path}: does not look like a {family} checkpoint ({kind})")
        return mod
    for m in mods:
        if m.matches(kind, obj):
            return m
    raise CheckpointError(
        f"{path}: a {kind} file, but not a checkpoint of a supported family "
        f"({', '.join(sorted({f for m in mods for f in m.FAMILIES}))})"
    )


@contextlib.contextmanager
def _naming(path: str):
    """Converter errors name the file: `CheckpointError`s, and the `GeneratorError` of a config the generator
    refuses, leave as `CheckpointError`s that start with ``path``."""

    try:
        yield
    except (CheckpointError, GeneratorError) as e:
        if str(e).startswith(str(path)):
            raise
        raise (type(e) if isinstance(e, CheckpointError) else CheckpointError)(f"{path}: {e}") from e


def inspect_file(path: str, family: Optional[str] = None) -> dict:
    kind, obj = read_checkpoint(path)
    with _naming(path):
        mod = find_converter(kind, obj, family, path)
        info = dict(_call(mod.describe, kind, obj, path))
    info.setdefault("format", kind)
    info["path"] = os.path.abspath(path)
    return info


def convert_file(path: str, family: Optional[str] = None):
    """``(generator, params, info)`` from an original checkpoint file."""
    kind, obj = read_checkpoint(path)
    with _naming(path):
        mod = find_converter(kind, obj, family, path)
        gen, params, info = _call(mod.convert, kind, obj, path)
    info = dict(info)
    info.update({"path": os.path.abspath(path), "format": kind, "converter": mod.__name__})
    return gen, params, info

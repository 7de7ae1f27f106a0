"""The one interface every generator family implements, and gansem checkpoint I/O.

A :class:`Generator` is a frozen dataclass: the architecture config plus the
generation settings (truncation, noise mode, ...). It is hashable, so it can be
closed over or passed as a static argument to ``jax.jit``. Parameters are a
separate pytree (``{"params": {...}}`` as Flax linen produces) passed explicitly.

Every family provides, in NHWC:

* ``sample_latents(key, n)``          -> latents ``[N, *latent_shape]`` float32
* ``map_latents(params, latents, class_labels)`` -> the family's style/latent space
  (identity for DCGAN/PGGAN, w / w+ for StyleGANs, z+class embedding for BigGAN)
* ``synthesize_styles(params, styles, capture=...)`` -> ``(images, features)``
* ``synthesize(params, latents, class_labels=None, capture=...)`` = both of the above
* ``feature_layers()``                -> every capturable layer in forward order

``images`` are float32 ``[N, H, W, 3]``, roughly in [-1, 1] (the raw generator
output, not clamped); ``features`` maps each captured layer name to
``[N, h, w, C]`` float32.

A gansem checkpoint directory holds ``generator.json`` (family, name, config,
settings, format version) and ``params.npz`` (flattened params, ``/``-joined
keys). :func:`save_checkpoint` / :func:`load_checkpoint` read and write it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import numpy as np

__all__ = [
    "FeatureLayer",
    "Generator",
    "GeneratorError",
    "MAX_SIZE",
    "MAX_RESOLUTION",
    "check_config",
    "check_range",
    "register_family",
    "family_class",
    "families",
    "save_checkpoint",
    "load_checkpoint",
    "flatten_params",
    "unflatten_params",
    "CHECKPOINT_VERSION",
]

CHECKPOINT_VERSION = 1
# Upper bounds for config values (channel counts, latent sizes, class counts; output size): far above any published
# model, low enough that a config read from a file cannot ask for absurd buffers.
MAX_SIZE = 1 << 16
MAX_RESOLUTION = 1 << 14


class GeneratorError(ValueError):
    """Bad generator name, config, checkpoint or arguments (message says what to do)."""


@dataclasses.dataclass(frozen=True)
class FeatureLayer:
    """A capturable feature map.

    Attributes:
        name: key in the ``features`` dict returned by ``synthesize``.
        resolution: spatial size (maps are square).
        channels: number of channels C.
        index: position in forward order, 0-based.
    """

    name: str
    resolution: int
    channels: int
    index: int


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


_TYPE_CHECKS = {
    "int": _is_int,
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v),
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "str": lambda v: isinstance(v, str),
    "tuple": lambda v: isinstance(v, tuple),
}


def _type_ok(annotation: str, value) -> bool:
    if annotation.startswith("Optional["):
        return value is None or _type_ok(annotation[len("Optional["):-1], value)
    if annotation.startswith("Union["):
        return any(_type_ok(a.strip(), value) for a in annotation[len("Union["):-1].split(","))
    return _TYPE_CHECKS[annotation](value)


def _short(value) -> str:
    """``repr`` of a scalar (truncated), the type of anything else: config values may come from a file."""
    if _is_int(value) and int(value).bit_length() > 64:
        return f"<{int(value).bit_length()}-bit integer>"
    plain = value is None or isinstance(value, (numbers.Number, str))
    text = repr(value[:60] if isinstance(value, str) else value) if plain else f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:60] + "..."


def check_config(gen) -> None:
    """Checks every field of a generator against its annotation (``int``, ``float`` (finite), ``bool``, ``str``,
    ``tuple``, ``Optional[...]``, ``Union[...]``).

    Raises:
        GeneratorError: naming the family, the field and the offending value.
    """
    for f in dataclasses.fields(gen):
        value = getattr(gen, f.name)
        if not _type_ok(f.type, value):
            raise GeneratorError(f"{gen.family}: {f.name} must be {f.type}, got {_short(value)}")


def check_range(gen, name: str, lo, hi=MAX_SIZE) -> None:
    """Raises `GeneratorError` unless field ``name`` is None or in ``[lo, hi]``."""
    value = getattr(gen, name)
    if value is not None and not lo <= value <= hi:
        raise GeneratorError(f"{gen.family}: {name} must be in [{lo}, {hi}], got {_short(value)}")


_FAMILIES: dict[str, type] = {}


def register_family(cls):
    """Class decorator: make a :class:`Generator` subclass loadable by its ``family`` name."""
    _FAMILIES[cls.family] = cls
    return cls


def family_class(family: str) -> type:
    if family not in _FAMILIES:
        raise GeneratorError(
            f"unknown generator family {family!r}; known families: {sorted(_FAMILIES)}"
        )
    return _FAMILIES[family]


def families() -> list[str]:
    return sorted(_FAMILIES)


@dataclasses.dataclass(frozen=True)
class Generator:
    """Base class. Subclasses are frozen dataclasses whose fields are config + settings."""

    family: ClassVar[str] = "base"

    def __post_init__(self):
        """Type-checks the config (`check_config`); families add their range checks after calling this."""
        check_config(self)

    # -- description -------------------------------------------------------------
    @property
    def resolution(self) -> int:
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """0 for unconditional generators."""
        return 0

    def feature_layers(self) -> tuple[FeatureLayer, ...]:
        """Every capturable layer, in forward order (low to high resolution)."""
        raise NotImplementedError

    # -- parameters -------------------------------------------------------------
    def init_params(self, key) -> Any:
        """Random parameters with the right tree structure (used by tests and converters)."""
        raise NotImplementedError

    # -- sampling ---------------------------------------------------------------
    def sample_latents(self, key, n: int):
        """Latents ``[n, *latent_shape]`` float32 (standard normal unless the family says otherwise)."""
        return jax.random.normal(key, (n,) + tuple(self.latent_shape), dtype=np.float32)

    def sample_class_labels(self, key, n: int):
        """Class labels ``[n]`` int32 uniformly over the classes, or ``None`` if unconditional."""
        if self.num_classes == 0:
            return None
        return jax.random.randint(key, (n,), 0, self.num_classes, dtype=np.int32)

    def map_latents(self, params, latents, class_labels=None):
        """Map latents to the space ``synthesize_styles`` consumes. Identity by default."""
        if class_labels is not None and self.num_classes == 0:
            raise GeneratorError(f"{self.family} is unconditional; got class labels")
        return latents

    def synthesize_styles(self, params, styles, capture: Sequence[str] | bool = (), noise_key=None):
        """Run the synthesis network.

        Args:
            params: parameter pytree.
            styles: output of :meth:`map_latents`.
            capture: names of layers whose outputs to return; ``True`` for all.
            noise_key: PRNG key for ``noise_mode='random'`` families.

        Returns:
            ``(images [N, H, W, 3] float32, {name: [N, h, w, C]})``.
        """
        raise NotImplementedError

    def synthesize(self, params, latents, class_labels=None, capture: Sequence[str] | bool = (),
                   noise_key=None):
        styles = self.map_latents(params, latents, class_labels)
        return self.synthesize_styles(params, styles, capture=capture, noise_key=noise_key)

    # -- (de)serialisation -------------------------------------------------------
    def to_config(self) -> dict:
        """JSON-able dict of every field (config and settings)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(config) - set(names)
        if unknown:
            raise GeneratorError(f"{cls.family}: unknown config keys {sorted(unknown)}")
        try:
            kwargs = {k: _to_tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        except RecursionError:
            raise GeneratorError(f"{cls.family}: config values are nested too deeply") from None
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    #: Fields that hold the generation settings of :meth:`with_settings`, first match wins.
    TRUNCATION_FIELDS: ClassVar[tuple[str, ...]] = ("truncation_psi", "truncation")
    NOISE_MODE_FIELDS: ClassVar[tuple[str, ...]] = ("noise_mode",)

    def with_settings(self, *, truncation: Optional[float] = None, noise_mode: Optional[str] = None):
        """This generator with generation settings changed (``None`` keeps the current value).

        Args:
            truncation: truncation ψ (``w = w_avg + ψ (w - w_avg)`` for StyleGANs, the
                latent truncation of BigGAN); only families with a truncation field accept it.
            noise_mode: ``"const"``, ``"random"`` or ``"none"`` for families with per-pixel noise.

        Returns:
            A new generator (generators are frozen: the original is unchanged).

        Raises:
            GeneratorError: the family has no such setting (``--truncation`` on a DCGAN, say).
        """
        changes = {}
        for value, fields, what in ((truncation, self.TRUNCATION_FIELDS, "truncation"),
                                    (noise_mode, self.NOISE_MODE_FIELDS, "noise mode")):
            if value is None:
                continue
            own = {f.name for f in dataclasses.fields(self)}
            field = next((f for f in fields if f in own), None)
            if field is None:
                raise GeneratorError(f"--{what.replace(' ', '-')} is not supported by the {self.family} generator")
            changes[field] = float(value) if what == "truncation" else str(value)
        return self.replace(**changes) if changes else self

    def settings(self) -> dict:
        """The generation settings of :meth:`with_settings` this generator has: ``{"truncation": ψ, ...}``."""
        own = {f.name for f in dataclasses.fields(self)}
        out = {}
        for name, fields in (("truncation", self.TRUNCATION_FIELDS), ("noise_mode", self.NOISE_MODE_FIELDS)):
            field = next((f for f in fields if f in own), None)
            if field is not None:
                out[name] = getattr(self, field)
        return out

    def _capture_names(self, capture) -> frozenset:
        if capture is True:
            return frozenset(l.name for l in self.feature_layers())
        if not capture:
            return frozenset()
        names = frozenset(capture)
        known = {l.name for l in self.feature_layers()}
        missing = names - known
        if missing:
            raise GeneratorError(
                f"{self.family}: no layer(s) named {sorted(missing)}; available: {sorted(known)}"
            )
        return names


def _to_tuple(v):
    return tuple(_to_tuple(x) if isinstance(x, list) else x for x in v)


# -- checkpoint I/O --------------------------------------------------------------------

def flatten_params(tree, prefix: str = "", as_numpy: bool = True) -> dict:
    """Nested dict -> ``{"a/b/c": leaf}`` (leaves converted to numpy unless ``as_numpy=False``)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key, as_numpy))
        else:
            out[key] = np.asarray(v) if as_numpy else v
    return out


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
    """``{"a/b/c": array}`` -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def save_checkpoint(path: str, generator: Generator, params, name: Optional[str] = None,
                    source: Optional[Mapping[str, Any]] = None) -> str:
    """Write a gansem checkpoint directory (``generator.json`` + ``params.npz``).

    Args:
        path: directory to create (parents too).
        generator: the generator (its family and config are recorded).
        params: parameter pytree (host or device arrays).
        name: human-readable model name.
        source: provenance (original file, sha256, converter) recorded in the metadata.
    """
    os.makedirs(path, exist_ok=True)
    flat = flatten_params(params)
    tmp = os.path.join(path, "params.tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, os.path.join(path, "params.npz"))
    meta = {
        "format": "gansem-generator",
        "version": CHECKPOINT_VERSION,
        "family": generator.family,
        "name": name or generator.family,
        "config": generator.to_config(),
        "num_parameters": int(sum(int(np.prod(v.shape)) for v in flat.values())),
        "source": dict(source or {}),
    }
    with open(os.path.join(path, "generator.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def load_checkpoint(path: str):
    """Read a gansem checkpoint directory.

    Returns:
        ``(generator, params, metadata)``; params as numpy arrays in a nested dict.

    Raises:
        GeneratorError: missing, corrupt or mismatched files, with the path and what was expected.
    """
    meta_path = os.path.join(path, "generator.json")
    params_path = os.path.join(path, "params.npz")
    if not os.path.isdir(path):
        raise GeneratorError(
            f"checkpoint directory {path!r} does not exist; convert a published checkpoint with "
            f"`python -m weights_port convert SRC {path}`"
        )
    for p in (meta_path, params_path):
        if not os.path.isfile(p):
            raise GeneratorError(f"{path!r} is not a gansem checkpoint: {os.path.basename(p)} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, or a huge integer
        raise GeneratorError(f"{meta_path}: cannot read generator metadata ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "gansem-generator":
        raise GeneratorError(f"{meta_path}: not a gansem generator metadata file")
    version, family, config = meta.get("version", 0), meta.get("family"), meta.get("config")
    if not _is_int(version) or not isinstance(family, str) or not isinstance(config, dict):
        raise GeneratorError(f"{meta_path}: 'version' (int), 'family' (str) and 'config' (object) are required; "
                             "re-convert the checkpoint with `python -m weights_port convert`")
    if version > CHECKPOINT_VERSION:
        raise GeneratorError(
            f"{meta_path}: checkpoint format version {version} is newer than this gansem "
            f"({CHECKPOINT_VERSION}); upgrade gansem"
        )
    try:
        gen = family_class(family).from_config(config)
    except GeneratorError as e:
        raise GeneratorError(f"{meta_path}: {e}") from None
    try:
        with np.load(params_path, allow_pickle=False) as z:
            # Names, shapes and dtypes from the array headers first: reading allocates what a header declares.
            _check_shapes(gen, {k: _stored_shape(z, k, params_path) for k in z.files}, params_path)
            flat = {k: z[k] for k in z.files}
    except GeneratorError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError ...
        raise GeneratorError(f"{params_path}: corrupt or truncated parameter file ({e})") from e
    return gen, unflatten_params(flat), meta


def _stored_shape(npz, name: str, where: str) -> tuple:
    """Shape in the header of array ``name`` of an open npz file; the data is not read."""
    with npz.zip.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise GeneratorError(f"{where}: parameter {name} has dtype {dtype}, expected a real number type")
    return tuple(shape)


def check_params(gen: Generator, params, where: str = "params") -> None:
    """Compare a parameter tree with the one the generator's config implies (names and shapes)."""
    _check_shapes(gen, {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}, where)


def _check_shapes(gen: Generator, got_flat: Mapping[str, tuple], where: str) -> None:
    """Compare flat ``{"params/a/b": shape}`` with the tree the generator's config implies."""
    expected = jax.eval_shape(gen.init_params, jax.random.key(0))
    exp_flat = {k: tuple(v.shape) for k, v in flatten_params(expected, as_numpy=False).items()}
    missing = sorted(set(exp_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(exp_flat))
    wrong = sorted(k for k in set(exp_flat) & set(got_flat) if exp_flat[k] != got_flat[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if wrong:
            parts.append(
                "wrong shapes " + ", ".join(f"{k}: {got_flat[k]} (expected {exp_flat[k]})" for k in wrong[:5])
            )
        raise GeneratorError(f"{where}: parameters do not match the {gen.family} config: " + "; ".join(parts))

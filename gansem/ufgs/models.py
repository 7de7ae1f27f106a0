"""Segmentation networks for UFGS (KLiSH Sec. 5): a small UNet and DeepLabV3 (Flax linen).

Both take uint8 images and return per-pixel class logits at the input size::

    logits = model.apply(variables, images, train=False)   # images [N, H, W, 3] uint8 -> [N, H, W, K] float32

Images are mapped to float in [-1, 1] inside the model (``x / 127.5 - 1``), so every
caller feeds the raw pixels a dataset stores. BatchNorm runs on batch statistics with
``train=True`` (pass ``mutable=["batch_stats"]`` and a ``"dropout"`` rng) and on its
running averages with ``train=False``. Under ``jax.jit`` with the batch sharded over
a mesh the batch statistics are those of the global batch (the compiler inserts the
cross-device reduction), as in synchronised BatchNorm.

* :class:`UNet` -- an encoder-decoder with skip connections (Ronneberger et al., 2015),
  small enough to train on a CPU; any input size (decoder features are resized to the
  skip's size).
* :class:`DeepLabV3` -- a ResNet backbone whose last stages trade their stride for
  atrous (dilated) convolutions so the features stay at 1/``output_stride`` of the
  input, ASPP (atrous spatial pyramid pooling) and a 1×1 classifier; logits are
  upsampled bilinearly to the input size (Chen et al., "Rethinking Atrous Convolution
  for Semantic Image Segmentation", 2017). The parameters do not depend on the output
  stride: weights trained at 16 evaluate at 8 (denser features, rates doubled).

:func:`build_model` makes one from an architecture name, as stored in a run's ``model.json``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ARCHS", "UNet", "DeepLabV3", "RESNET_DEPTHS", "build_model", "images_to_float", "max_pool_2x2",
           "stage_strides_and_dilations"]

#: Architecture names accepted by :func:`build_model`.
ARCHS = ("unet", "deeplabv3")

#: ResNet depth -> (residual block, blocks per stage). Depth 10 (one basic block per stage) is for tests.
RESNET_DEPTHS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He init for ReLU networks


def images_to_float(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``[N, H, W, 3]`` uint8 in [0, 255] -> the same in ``dtype`` in [-1, 1].

    Raises:
        TypeError: the images are not uint8 (a float array could be in [0, 1], [0, 255] or
            [-1, 1]; the models accept only the stored pixel format).
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"segmentation models take uint8 images [N, H, W, 3], got dtype {images.dtype}")
    return images.astype(dtype) / 127.5 - 1.0


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max pooling with stride 2: ``[N, H, W, C] -> [N, ceil(H / 2), ceil(W / 2), C]``.

    Odd sizes are padded at the end with -inf (as ``SAME`` padding). Written as a reshape and
    a max, whose gradient is elementwise: XLA's CPU backend lowers the gradient of a
    ``reduce_window`` max to scatters, a tenth of a small UNet's training step.
    """
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).max(axis=(2, 4))


def _pad(kernel: int, dilation: int = 1):
    """Symmetric padding that keeps the size at stride 1 (and halves it, rounding up, at stride 2)."""
    p = dilation * (kernel - 1) // 2
    return ((p, p), (p, p))


class ConvBNReLU(nn.Module):
    """Convolution (no bias) -> BatchNorm -> ReLU (optional).

    ``x [N, H, W, C] -> [N, H / stride, W / stride, features]``.
    """

    features: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                    padding=_pad(self.kernel, self.dilation), kernel_dilation=self.dilation,
                    use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         name="bn")(x)
        return nn.relu(x) if self.relu else x


# -- UNet ---------------------------------------------------------------------------------


class UNet(nn.Module):
    """UNet: ``len(features)`` resolutions, two 3×3 conv-BN-ReLU per resolution, skip connections.

    Encoder level ``i`` works at ``1 / 2**i`` of the input with ``features[i]`` channels
    (2×2 max pooling between levels); the last level is the bottleneck. The decoder
    resizes (bilinear) to the next finer level's size, concatenates its skip features and
    applies two conv-BN-ReLU with that level's width; a 1×1 convolution gives the logits.
    The bottleneck (``[N, H / 2**(L-1), W / 2**(L-1), features[-1]]``) is stored under
    ``intermediates/bottleneck_features`` when applied with ``mutable=["intermediates"]``.

    Attributes:
        num_classes: K.
        features: channels per level, finest first.
        dropout: dropout rate before the classifier (0: none).
        dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        """``images [N, H, W, 3] uint8 -> logits [N, H, W, num_classes] float32`` (any H, W)."""
        x = images_to_float(images, self.dtype)
        skips = []
        for i, f in enumerate(self.features):
            if i:
                x = max_pool_2x2(x)  # [N, ceil(h/2), ceil(w/2), C]
            x = ConvBNReLU(f, dtype=self.dtype, name=f"down{i}_a")(x, train)
            x = ConvBNReLU(f, dtype=self.dtype, name=f"down{i}_b")(x, train)
            skips.append(x)
        self.sow("intermediates", "bottleneck_features", x)       # [N, h, w, features[-1]]
        for i in range(len(self.features) - 2, -1, -1):
            skip = skips[i]  # [N, h_i, w_i, features[i]]
            x = jax.image.resize(x, skip.shape[:3] + x.shape[3:], "bilinear")
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBNReLU(self.features[i], dtype=self.dtype, name=f"up{i}_a")(x, train)
            x = ConvBNReLU(self.features[i], dtype=self.dtype, name=f"up{i}_b")(x, train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
        return logits.astype(jnp.float32)


# -- DeepLabV3 ----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions (the first strided or dilated) + shortcut.

    ``x [N, H, W, C] -> [N, H / stride, W / stride, width]``.
    """

    width: int
    stride: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out_ch = self.width * self.expansion
        y = ConvBNReLU(self.width, 3, self.stride, self.dilation, dtype=self.dtype, name="conv1")(x, train)
        y = ConvBNReLU(out_ch, 3, 1, self.dilation, relu=False, dtype=self.dtype, name="conv2")(y, train)
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = ConvBNReLU(out_ch, 1, self.stride, relu=False, dtype=self.dtype, name="shortcut")(x, train)
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    """ResNet bottleneck: 1×1 reduce, 3×3 (strided or dilated), 1×1 expand ×4, + shortcut.

    ``x [N, H, W, C] -> [N, H / stride, W / stride, 4 * width]``.
    """

    width: int
    stride: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        out_ch = self.width * self.expansion
        y = ConvBNReLU(self.width, 1, dtype=self.dtype, name="conv1")(x, train)
        y = ConvBNReLU(self.width, 3, self.stride, self.dilation, dtype=self.dtype, name="conv2")(y, train)
        y = ConvBNReLU(out_ch, 1, relu=False, dtype=self.dtype, name="conv3")(y, train)
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = ConvBNReLU(out_ch, 1, self.stride, relu=False, dtype=self.dtype, name="shortcut")(x, train)
        return nn.relu(x + y)


def stage_strides_and_dilations(output_stride: int) -> list[tuple[int, int]]:
    """``(stride, dilation)`` of ResNet stages 1..4 for an output stride of 32, 16 or 8.

    Stage 1 follows the stem (stride 4); stages 2-4 halve the resolution each, unless
    the output stride would drop below the target: then the stage keeps stride 1 and
    its 3×3 convolutions dilate by the factor the stride would have given (the first
    block of the stage uses the previous dilation, as in DeepLab's ``multi_grid = 1``).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    out, current, dilation = [(1, 1)], 4, 1
    for _ in range(3):
        if current < output_stride:
            out.append((2, dilation))
            current *= 2
        else:
            dilation *= 2
            out.append((1, dilation))
    return out


class ResNetBackbone(nn.Module):
    """ResNet trunk with atrous stages: ``[N, H, W, 3] float -> [N, H / os, W / os, C]``.

    Stem: 7×7/2 conv-BN-ReLU and 3×3/2 max pooling (stride 4). Stages of ``width * 2**s``
    channels (times 4 for bottleneck blocks); see :func:`stage_strides_and_dilations`.
    """

    depth: int = 50
    width: int = 64
    output_stride: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {self.depth}")
        kind, blocks = RESNET_DEPTHS[self.depth]
        block_cls = BasicBlock if kind == "basic" else BottleneckBlock
        x = ConvBNReLU(self.width, 7, 2, dtype=self.dtype, name="stem")(x, train)   # [N, H/2, W/2, width]
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))       # [N, H/4, W/4, width]
        prev_dilation = 1
        for s, ((stride, dilation), n) in enumerate(zip(stage_strides_and_dilations(self.output_stride), blocks)):
            for b in range(n):
                # the first block of a dilated stage keeps the previous dilation (its input grid)
                d = prev_dilation if (b == 0 and stride == 1 and s > 0) else dilation
                x = block_cls(self.width * 2 ** s, stride if b == 0 else 1, d, dtype=self.dtype,
                              name=f"stage{s + 1}_block{b}")(x, train)
            prev_dilation = dilation
        return x


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``[N, h, w, C] -> [N, h, w, features]``.

    Five parallel branches, concatenated and projected by a 1×1 conv-BN-ReLU (+ dropout):
    a 1×1 conv, three 3×3 convs at dilation ``rates``, and image-level features (global
    average pooling, 1×1 conv, broadcast back to ``h × w``).
    """

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        branches = [ConvBNReLU(self.features, 1, dtype=self.dtype, name="branch_1x1")(x, train)]
        for i, r in enumerate(self.rates):  # named by position: the same parameters serve any output stride
            branches.append(ConvBNReLU(self.features, 3, dilation=r, dtype=self.dtype,
                                       name=f"branch_atrous{i}")(x, train))
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)                            # [N, 1, 1, C]
        pooled = ConvBNReLU(self.features, 1, dtype=self.dtype, name="branch_pool")(pooled, train)
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.features,)))
        y = jnp.concatenate(branches, axis=-1)                                       # [N, h, w, 5 * features]
        y = ConvBNReLU(self.features, 1, dtype=self.dtype, name="project")(y, train)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabV3(nn.Module):
    """DeepLabV3: atrous ResNet backbone, ASPP, 3×3 conv-BN-ReLU, 1×1 classifier, bilinear upsampling.

    The backbone output (``[N, ceil(H / os), ceil(W / os), C]``) is stored under
    ``intermediates/backbone_features`` when applied with ``mutable=["intermediates"]``.

    Attributes:
        num_classes: K.
        depth: ResNet depth (:data:`RESNET_DEPTHS`: 18/34 basic blocks, 50/101 bottlenecks, 10 for tests).
        output_stride: 16 (ASPP rates 6/12/18) or 8 (rates 12/24/36; 4× the backbone compute).
        width: channels of the stem and of the first stage (64 in the standard ResNets).
        aspp_features: channels of every ASPP branch and of the head (256 in the paper).
        dropout: dropout rate after the ASPP projection.
        dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    depth: int = 50
    output_stride: int = 16
    width: int = 64
    aspp_features: int = 256
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        """``images [N, H, W, 3] uint8 -> logits [N, H, W, num_classes] float32``."""
        x = images_to_float(images, self.dtype)
        feats = ResNetBackbone(self.depth, self.width, self.output_stride, self.dtype, name="backbone")(x, train)
        self.sow("intermediates", "backbone_features", feats)
        rates = tuple(r * 16 // self.output_stride for r in (6, 12, 18))
        y = ASPP(self.aspp_features, rates, self.dropout, self.dtype, name="aspp")(feats, train)
        y = ConvBNReLU(self.aspp_features, 3, dtype=self.dtype, name="head")(y, train)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(y)
        logits = logits.astype(jnp.float32)                                          # [N, h, w, K]
        return jax.image.resize(logits, images.shape[:3] + (self.num_classes,), "bilinear")


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """The segmentation network named ``arch`` (one of :data:`ARCHS`) with ``num_classes`` outputs.

    Args:
        arch: ``"unet"`` or ``"deeplabv3"``.
        num_classes: K >= 1.
        **kwargs: the model's other attributes (e.g. ``features=(8, 16)`` for the UNet,
            ``depth=18, output_stride=8`` for DeepLabV3); ``dtype`` may be a name (``"bfloat16"``).

    Raises:
        ValueError: unknown architecture or attribute, or invalid values.
    """
    classes = {"unet": UNet, "deeplabv3": DeepLabV3}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    cls = classes[arch]
    allowed = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name", "num_classes")}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{arch} has no option(s) {', '.join(unknown)}; its options are {', '.join(sorted(allowed))}")
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    if "features" in kwargs:
        kwargs["features"] = tuple(int(f) for f in kwargs["features"])
        if not kwargs["features"] or min(kwargs["features"]) < 1:
            raise ValueError(f"unet features must be positive channel counts, got {kwargs['features']}")
    if arch == "deeplabv3":
        if int(kwargs.get("depth", 50)) not in RESNET_DEPTHS:
            raise ValueError(f"deeplabv3 depth must be one of {sorted(RESNET_DEPTHS)}, got {kwargs['depth']}")
        if int(kwargs.get("output_stride", 16)) not in (8, 16):
            raise ValueError(f"deeplabv3 output_stride must be 8 or 16, got {kwargs['output_stride']}")
    return cls(num_classes=int(num_classes), **kwargs)

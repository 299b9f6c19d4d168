"""CNCL (Content-Noise Complementary Learning) networks for low-dose CT denoising.

Geng et al., "Content-Noise Complementary Learning for Medical Image Denoising",
IEEE TMI. Keras 3 (TensorFlow backend) re-implementation.

Conventions used throughout this module:

* Images are NORMALISED CT slices, ``(HU - HU_MIN) / (HU_MAX - HU_MIN)`` with
  ``HU_MIN=-1024``, ``HU_MAX=3072`` (see ``ctio.normalize``), layout NHWC with one
  channel, dtype float32.
* The generator maps a low-dose slice ``LD`` to ``[content, noise]``; the content
  output is the denoised image. Its spatial contract is ``H % 2**depth == 0`` and
  ``W % 2**depth == 0`` (any such size, not only the training patch size).
* The discriminator is a conditional PatchGAN on ``concat[content, noise, LD]``.

Public API: ``PRESETS``, ``model_config``, ``build_unet``, ``build_generator``,
``build_discriminator``, ``build_models``, ``hu_metrics``, ``CNCLGAN``,
``SelectChannel``.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import layers

from ctmetrics import hu_metrics  # the project's one metric implementation
from ctrun import (  # config.json's owner
    ARCH,
    BLOCK_MEAN_PX,
    NORMS,
    PRESETS,
    model_config,
    saved_model_config,
)

__all__ = [
    "PRESETS",
    "CNCLGAN",
    "SelectChannel",
    "build_discriminator",
    "build_generator",
    "build_models",
    "build_unet",
    "hu_metrics",
    "model_config",
    "saved_model_config",
    "ARCH",
    "BilinearUpsample2x",
]

# --------------------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="cncl")
class SelectChannel(keras.initializers.Initializer):
    """1x1-conv kernel that copies input channel ``index`` to every output channel.

    Used for the fusion conv: kernel ``[0 for c1, 1 for c2]`` so the untrained
    generator returns ``c2 = LD - n = LD`` as content.

    Args:
        index: Input channel to select (0-based).
    """

    def __init__(self, index: int = 0) -> None:
        self.index = int(index)

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        # shape = (kh, kw, c_in, c_out); one-hot along c_in.
        one_hot = keras.ops.one_hot(self.index, shape[-2], dtype=dtype or "float32")
        return keras.ops.broadcast_to(keras.ops.reshape(one_hot, (1, 1, shape[-2], 1)), shape)

    def get_config(self) -> dict[str, Any]:
        return {"index": self.index}


# --------------------------------------------------------------------------------------
# Tiny block builders (functional API, KerasTensors only)
# --------------------------------------------------------------------------------------


def _norm_layer(norm: str, name: str) -> layers.Layer | None:
    """Normalisation layer for ``norm``.

    Args:
        norm: ``"batch"`` (BatchNormalization), ``"instance"``
            (GroupNormalization with one group per channel, i.e. instance norm with
            learned affine) or ``"none"``.
        name: Layer name.

    Returns:
        The layer, or ``None`` for ``"none"``.
    """
    if norm == "batch":
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)
    if norm == "instance":
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)
    if norm == "none":
        return None
    raise ValueError(f"unknown norm '{norm}' (choose from: {', '.join(NORMS)})")


def _conv(
    x: keras.KerasTensor,
    filters: int,
    name: str,
    kernel_size: int = 3,
    strides: int = 1,
    kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
    dtype: str | None = None,
) -> keras.KerasTensor:
    """Linear 'same'-padded conv with bias.

    Args:
        x: Input ``(B, H, W, C)``.
        filters: Output channels.
        name: Layer name.
        kernel_size: Square kernel size.
        strides: Stride.
        kernel_initializer: Kernel initialiser (bias is always zero-initialised).
        dtype: Layer dtype policy; ``"float32"`` forces a float32 output under
            ``mixed_float16``. ``None`` uses the global policy.

    Returns:
        ``(B, H/strides, W/strides, filters)``.
    """
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer=kernel_initializer,
        bias_initializer="zeros",
        dtype=dtype,
        name=name,
    )(x)


def _conv_norm_relu(x: keras.KerasTensor, filters: int, norm: str, name: str) -> keras.KerasTensor:
    """3x3 conv -> norm -> ReLU.

    Args:
        x: Input ``(B, H, W, C)``.
        filters: Output channels.
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        name: Name prefix of the three layers.

    Returns:
        ``(B, H, W, filters)``.
    """
    x = _conv(x, filters, f"{name}_conv")  # (B, H, W, filters)
    norm_layer = _norm_layer(norm, f"{name}_norm")
    if norm_layer is not None:
        x = norm_layer(x)  # (B, H, W, filters)
    return layers.ReLU(name=f"{name}_relu")(x)  # (B, H, W, filters)


# --------------------------------------------------------------------------------------
# Up-sampling
# --------------------------------------------------------------------------------------


def _interpolate_axis(x: Any, axis: int) -> Any:
    """Double ``x`` along ``axis`` (1 or 2) by linear interpolation with aligned corners.

    Output sample ``j`` of ``2n`` sits at input coordinate ``j (n - 1) / (2n - 1)`` (the first
    and last samples coincide with the input's), as PyTorch's ``UpsamplingBilinear2d``.
    Works with a dynamic size ``n`` (Keras ops only).
    """
    ops = keras.ops
    n = ops.shape(x)[axis]
    m = 2 * n
    step = ops.cast(n - 1, "float32") / ops.cast(ops.maximum(m - 1, 1), "float32")
    pos = ops.cast(ops.arange(m), "float32") * step  # (2n,) input coordinates
    lo = ops.floor(pos)
    frac = ops.cast(pos - lo, x.dtype)
    lo = ops.cast(lo, "int32")
    hi = ops.minimum(lo + 1, n - 1)
    frac = ops.reshape(frac, (1, -1, 1, 1) if axis == 1 else (1, 1, -1, 1))
    a = ops.take(x, lo, axis=axis)
    b = ops.take(x, hi, axis=axis)
    return a + (b - a) * frac


@keras.saving.register_keras_serializable(package="cncl")
class BilinearUpsample2x(layers.Layer):
    """x2 bilinear up-sampling with aligned corners, for any (also unknown) H and W.

    The official CNCL code up-samples with ``nn.UpsamplingBilinear2d(scale_factor=2)``
    (``align_corners=True``). Keras' ``UpSampling2D(interpolation="bilinear")`` uses half-pixel
    centres and needs H and W known when traced, so whole slices of several sizes could not
    pass through it. Shape contract: ``(B, H, W, C) -> (B, 2H, 2W, C)``.
    """

    def call(self, x: Any) -> Any:
        return _interpolate_axis(_interpolate_axis(x, 1), 2)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        b, h, w, c = input_shape
        return (b, None if h is None else 2 * h, None if w is None else 2 * w, c)


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


def build_unet(
    base_filters: int = 64,
    depth: int = 4,
    norm: str = "batch",
    zero_head: bool = False,
    name: str = "unet",
) -> keras.Model:
    """One CNCL U-Net branch, layer for layer the official CNCL code (``code/model.py``).

    Encoder level ``i`` (``i = 0..depth-1``): ``[3x3 conv(base*2^i) -> norm -> ReLU] x2``
    then 2x2 max-pool. Bottleneck: ``3x3 conv(base*2^depth) -> norm -> ReLU -> 3x3
    conv(base*2^(depth-1)) -> norm -> ReLU``. Decoder level ``i`` (deep to shallow):
    bilinear x2 up-sampling (aligned corners), concat ``[up, skip i]``, then for ``i > 0``
    ``3x3 conv(base*2^i) -> norm -> ReLU -> 3x3 conv(base*2^(i-1)) -> norm -> ReLU``; the
    finest level ``i = 0`` is linear: ``3x3 conv(base/2)`` then the ``3x3 conv(1)`` head
    (no norm, no ReLU). With ``base=64, depth=4``: 21,912,513 trainable parameters, as the
    official branch. One function on purpose: it reads top to bottom as the official layer
    table that tests/test_model.py compares layer by layer.

    Args:
        base_filters: Channels of the first encoder level.
        depth: Number of 2x down-samplings (input H, W must be divisible by
            ``2**depth``).
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        zero_head: Zero-initialise the head kernel and bias (the branch then outputs
            exactly 0 until trained) -- used for the noise branch.
        name: Model name.

    Returns:
        Functional model ``(B, H, W, 1) -> (B, H, W, 1)``; the output is float32
        whatever the global dtype policy.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}' (choose from: {', '.join(NORMS)})")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    inp = keras.Input(shape=(None, None, 1), name=f"{name}_input")  # (B, H, W, 1)
    x = inp
    skips = []
    for i in range(depth):
        f = base_filters * 2**i
        x = _conv_norm_relu(x, f, norm, f"enc{i}_a")  # (B, H/2^i, W/2^i, base*2^i)
        x = _conv_norm_relu(x, f, norm, f"enc{i}_b")  # (B, H/2^i, W/2^i, base*2^i)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{i}_pool")(x)  # (B, H/2^(i+1), W/2^(i+1), ...)
    # Bottleneck at (B, H/2^depth, W/2^depth, .)
    x = _conv_norm_relu(x, base_filters * 2**depth, norm, "mid_a")  # (..., base*2^depth)
    x = _conv_norm_relu(x, base_filters * 2 ** (depth - 1), norm, "mid_b")  # base*2^(d-1)
    for i in reversed(range(depth)):
        x = BilinearUpsample2x(name=f"dec{i}_up")(x)  # (B, H/2^i, W/2^i, base*2^max(i-1,0))
        x = layers.Concatenate(axis=-1, name=f"dec{i}_cat")([x, skips[i]])
        # (B, H/2^i, W/2^i, base*2^i + base*2^max(i-1,0))
        if i > 0:
            x = _conv_norm_relu(x, base_filters * 2**i, norm, f"dec{i}_a")  # (..., base*2^i)
            x = _conv_norm_relu(x, base_filters * 2 ** (i - 1), norm, f"dec{i}_b")
            # (B, H/2^i, W/2^i, base*2^(i-1))
        else:
            x = _conv(x, base_filters // 2, "dec0_a_conv")  # (B, H, W, base/2), linear
    out = _conv(
        x,
        1,
        "head",
        kernel_initializer="zeros" if zero_head else "glorot_uniform",
        dtype="float32",
    )  # (B, H, W, 1) float32, linear
    return keras.Model(inp, out, name=name)


def build_generator(
    base_filters: int = 64,
    depth: int = 4,
    norm: str = "batch",
    name: str = "cncl_generator",
) -> keras.Model:
    """CNCL generator: content U-Net, noise U-Net and a 1x1-conv fusion.

    ``c1 = content_unet(LD)``, ``n = noise_unet(LD)``, ``c2 = LD - n``,
    ``content = conv1x1(concat[c1, c2])``. The two U-Nets (sub-models named
    ``content_unet`` and ``noise_unet``) have identical architecture and separate
    weights.

    Near-identity initialisation: the noise head is zero-initialised (``n = 0``) and
    the fusion kernel is ``[0, 1]`` with bias 0, so the untrained generator returns
    exactly its input as content. Gradients still reach both branches: the fusion
    weight of ``c1`` gets ``c1 * dL/dc`` and the noise head gets a non-zero gradient,
    after which the deeper layers of both branches receive gradients too.

    Shape contract: input ``(B, H, W, 1)`` float32 normalised LDCT with
    ``H % 2**depth == 0`` and ``W % 2**depth == 0`` (any such size); outputs
    ``[content, noise]``, each ``(B, H, W, 1)`` float32 (also under a
    ``mixed_float16`` policy: the heads, subtraction and fusion are float32 layers).

    Args:
        base_filters: Channels of the first U-Net level (64 in the paper).
        depth: U-Net depth, i.e. number of 2x down-samplings (4 in the paper).
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        name: Model name.

    Returns:
        Functional ``keras.Model`` with outputs ``[content, noise]``.
    """
    ld = keras.Input(shape=(None, None, 1), name="ld")  # (B, H, W, 1)
    content_unet = build_unet(base_filters, depth, norm, zero_head=False, name="content_unet")
    noise_unet = build_unet(base_filters, depth, norm, zero_head=True, name="noise_unet")
    c1 = content_unet(ld)  # (B, H, W, 1) float32
    noise = noise_unet(ld)  # (B, H, W, 1) float32
    noise = layers.Identity(dtype="float32", name="noise")(noise)  # (B, H, W, 1) float32
    c2 = layers.Subtract(dtype="float32", name="ld_minus_noise")([ld, noise])  # (B, H, W, 1)
    both = layers.Concatenate(axis=-1, dtype="float32", name="fusion_cat")([c1, c2])
    # (B, H, W, 2)
    content = layers.Conv2D(
        1,
        1,
        kernel_initializer=SelectChannel(1),
        bias_initializer="zeros",
        dtype="float32",
        name="content",
    )(both)  # (B, H, W, 1) float32
    return keras.Model(ld, [content, noise], name=name)


# --------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------


def build_discriminator(base_filters: int = 64, name: str = "cncl_discriminator") -> keras.Model:
    """Conditional PatchGAN discriminator, layer for layer the official CNCL code.

    Four 4x4 stride-2 convs (padding 1) with ``base, 2*base, 4*base, 8*base`` filters
    (64-128-256-512 in the paper), each followed by LeakyReLU(0.2); instance norm without
    affine parameters on all but the first. Then zero padding of 1 on the top and left only
    and a bias-free 4x4 conv with padding 1 (official ``ZeroPad2d((1, 0, 1, 0))``): one logit
    per patch. Receptive field of a logit: 94 x 94 pixels. With ``base=64``: 2,764,736
    parameters, as the official discriminator.

    Shape contract: input ``(B, H, W, 3) = concat[content, noise, LD]`` with
    ``H % 16 == 0`` and ``W % 16 == 0``; output ``(B, H/16, W/16, 1)`` float32
    logits (no sigmoid; used with a least-squares GAN loss).

    Args:
        base_filters: Filters of the first conv.
        name: Model name.

    Returns:
        Functional ``keras.Model``.
    """
    inp = keras.Input(shape=(None, None, 3), name="content_noise_ld")  # (B, H, W, 3)
    x = inp
    for i in range(4):
        x = _conv(x, base_filters * 2**i, f"d{i}_conv", kernel_size=4, strides=2)
        # (B, H/2^(i+1), W/2^(i+1), base*2^i)
        if i > 0:
            x = layers.GroupNormalization(
                groups=-1, epsilon=1e-5, center=False, scale=False, name=f"d{i}_norm"
            )(x)
        x = layers.LeakyReLU(negative_slope=0.2, name=f"d{i}_lrelu")(x)
    # Official: ZeroPad2d((1, 0, 1, 0)) then Conv2d(k=4, padding=1): 2 before, 1 after.
    x = layers.ZeroPadding2D(((2, 1), (2, 1)), name="patch_pad")(x)  # (B, H/16 + 3, ., 8*base)
    out = layers.Conv2D(
        1, 4, padding="valid", use_bias=False, dtype="float32", name="patch_logits"
    )(x)  # (B, H/16, W/16, 1)
    return keras.Model(inp, out, name=name)


def build_models(config: dict[str, Any]) -> tuple[keras.Model, keras.Model]:
    """Build ``(generator, discriminator)`` from a :func:`model_config` dict.

    Args:
        config: Output of :func:`model_config` (extra keys are ignored).

    Returns:
        The generator and discriminator.
    """
    gen = build_generator(config["base_filters"], config["depth"], config["norm"])
    disc = build_discriminator(config["disc_filters"])
    return gen, disc


# --------------------------------------------------------------------------------------
# GAN training wrapper
# --------------------------------------------------------------------------------------


def _per_example_mean(x: tf.Tensor) -> tf.Tensor:
    """Mean over all but the batch axis: ``(B, ...) -> (B,)`` float32."""
    x = tf.cast(x, tf.float32)
    return tf.reduce_mean(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)


def block_mean_l1(content: tf.Tensor, fd: tf.Tensor, block: int = BLOCK_MEAN_PX) -> tf.Tensor:
    """Per-example mean ``|avgpool(content) - avgpool(fd)|`` over non-overlapping
    ``block x block`` blocks (``(B, H, W, 1)`` each -> ``(B,)``; a partial edge block is left
    out): the L1 distance of local CT numbers.

    Why: the pixel L1 term pulls each pixel by the sign of its error, which the full dose's own
    noise (~16 HU per pixel here) decides almost as often as a CT-number shift of 1-2 HU does, so
    it barely holds the local mean: with the adversarial term soft tissue shifted -0.87 +- 1.13 HU
    over the 7 cross-validation folds (README). A 16 x 16 block mean has 1/16 of that noise, so this
    term holds the mean and, comparing means only, leaves the noise texture to the other terms.
    Needs ``H, W >= block``.
    """
    pool = lambda x: tf.nn.avg_pool2d(tf.cast(x, tf.float32), block, block, "VALID")  # noqa: E731
    return _per_example_mean(tf.abs(pool(content) - pool(fd)))  # (B,)


def ema_decay_at(decay: float, step: tf.Tensor) -> tf.Tensor:
    """The moving-average decay used after optimizer step ``step`` (1 = the first step).

    ``min(decay, (1 + step) / (10 + step))``: ``tf.train.ExponentialMovingAverage`` with
    ``num_updates`` (TF 1.x, ``moving_averages.py``). Early on the average follows the weights
    closely (decay 0.18 at step 1, 0.5 at step 8), so the initial weights do not linger in it;
    then at step t it spans roughly the last t/9 steps, until that reaches ``1 / (1 - decay)``
    steps (t = 9,000 for 0.999)."""
    step = tf.cast(step, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + step) / (10.0 + step))


def radial_power(x: tf.Tensor) -> tf.Tensor:
    """Batch-mean radial power spectrum: ``(B, H, W, 1) -> (N // 2,)``, N = min(H, W).

    Per image its mean removed and a 2-D Hann window applied; ``|rfft2d|^2`` averaged over the
    batch, then over rings ``k/N <= r < (k + 1)/N`` cycles/pixel (each frequency in the ring its
    radius rounds down to; k = 1..N/2, the DC ring left out): TG-233's radial NPS up to a scale,
    made differentiable.
    """
    x = tf.cast(x[..., 0], tf.float32)
    x = x - tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    win = tf.signal.hann_window(h, periodic=False)[:, None] * tf.signal.hann_window(
        w, periodic=False)[None, :]
    power = tf.reduce_mean(tf.abs(tf.signal.rfft2d(x * win)) ** 2, axis=0)  # (H, W//2+1)
    ky = tf.range(h)
    fy = tf.cast(tf.where(ky <= h // 2, ky, ky - h), tf.float32) / tf.cast(h, tf.float32)
    fx = tf.cast(tf.range(w // 2 + 1), tf.float32) / tf.cast(w, tf.float32)
    n = tf.minimum(h, w)
    ring = tf.cast(tf.floor(tf.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
                            * tf.cast(n, tf.float32)), tf.int32)  # (H, W//2+1)
    ring = tf.where(ring > n // 2, 0, ring)  # beyond Nyquist: dropped with DC below
    means = tf.math.unsorted_segment_mean(tf.reshape(power, [-1]), tf.reshape(ring, [-1]),
                                          n // 2 + 1)
    return means[1:]


def spectrum_l1(content: tf.Tensor, fd: tf.Tensor) -> tf.Tensor:
    """Mean over rings of ``|log P_content - log P_fd|`` (:func:`radial_power`), the same value
    for every example of the batch (``(B,)``): how far the denoised image's radial power
    spectrum -- its noise grain where the anatomy's power has fallen off -- is from the full
    dose's. Log: every ring counts alike, the falling spectrum's tail as much as its head.

    Why: the L1 terms favour a low-pass result, and at the adversarial end the denoised noise
    of simulated quarter dose kept 0.62x the input noise's NPS peak frequency over the 7 folds
    (README "Cross-validation"), whereas full-dose noise has the input's spectral shape. Matching
    batch spectra (not single patches, whose periodograms scatter 100 %) asks for full dose's
    grain without asking for its noise realisation.
    """
    eps = 1e-12
    d = tf.abs(tf.math.log(radial_power(content) + eps) - tf.math.log(radial_power(fd) + eps))
    return tf.fill([tf.shape(content)[0]], tf.reduce_mean(d))


class CNCLGAN(keras.Model):
    """CNCL generator + conditional PatchGAN trained with LSGAN + L1 losses.

    ``call(ld)`` returns the content (denoised) image, so ``predict(ld)`` denoises.

    Losses per step on ``(ld, fd)`` (normalised, ``(B, H, W, 1)``):

    * D (least squares): ``0.5 * (mean((D(fd, ld - fd, ld) - 1)^2) +
      mean(D(c, n, ld)^2))``.
    * G: ``adv_weight * mean((D(c, n, ld) - 1)^2) + lambda_l1 * mean(|[c, n] - [fd, ld - fd]|)``
      -- the official expression: the L1 mean runs over both outputs, i.e.
      ``lambda_l1 * (l1_content + l1_noise) / 2``. ``adv_weight = 0`` drops the adversarial
      term; D is then neither evaluated nor updated. The balance of the two terms depends on
      the image units: see ``Mytrain.RECIPES`` for the official balance in this project's
      normalisation. ``block_mean_weight > 0`` adds ``block_mean_weight *``
      :func:`block_mean_l1` and ``spectrum_weight > 0`` adds ``spectrum_weight *``
      :func:`spectrum_l1` (both off by default; not in the official loss).

    ``ema_decay > 0`` keeps ``ema_generator``, an exponential moving average of the generator's
    weights updated after every generator step (:func:`ema_decay_at`); it is then the model that
    ``call``/``predict`` and validation use and that :meth:`denoiser` returns (to save). Training
    itself, and D's input, use the current generator. Not in the official code.

    D and G are updated simultaneously from one generator forward pass (the G
    adversarial term uses D before its update, as in the TF pix2pix tutorial).

    Losses are per-example and averaged over the GLOBAL batch
    (``tf.nn.compute_average_loss``), so under ``tf.distribute`` the all-reduced
    (summed) gradients equal the single-device gradient. Trackers record the
    un-scaled per-replica means.

    Train logs: ``d_loss, g_adv, l1_content, l1_noise`` (``d_loss``/``g_adv`` stay 0
    when ``adv_weight = 0``). Test logs: ``psnr, ssim`` (:func:`hu_metrics`, protocol
    ``skimage``) and ``l1_content``. Test data may carry a third element, a per-image weight
    (``(ld, fd, w)``): weight-0 images pad a validation batch so that every replica gets
    one, and count in no metric.

    Args:
        generator: Model from :func:`build_generator`.
        discriminator: Model from :func:`build_discriminator`.
        **kwargs: Passed to ``keras.Model``.
    """

    def __init__(
        self, generator: keras.Model, discriminator: keras.Model, **kwargs: Any
    ) -> None:
        kwargs.setdefault("name", "cncl_gan")
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_adv_tracker = keras.metrics.Mean(name="g_adv")
        self.l1_content_tracker = keras.metrics.Mean(name="l1_content")
        self.l1_noise_tracker = keras.metrics.Mean(name="l1_noise")
        self.psnr_tracker = keras.metrics.Mean(name="psnr")
        self.ssim_tracker = keras.metrics.Mean(name="ssim")
        self.g_optimizer: keras.optimizers.Optimizer | None = None
        self.d_optimizer: keras.optimizers.Optimizer | None = None
        self.lambda_l1 = 100.0
        self.adv_weight = 1.0
        self.block_mean_weight = 0.0
        self.spectrum_weight = 0.0
        self.ema_decay = 0.0
        self.ema_generator: keras.Model | None = None

    def denoiser(self) -> keras.Model:
        """The generator that denoises: the moving average with ``ema_decay > 0``, else G.
        (A method: Keras' weight saving walks properties, and would save G under this name.)"""
        return self.ema_generator if self.ema_generator is not None else self.generator

    def call(self, ld: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Denoise: ``(B, H, W, 1)`` normalised LD -> ``(B, H, W, 1)`` content."""
        content, _ = self.denoiser()(ld, training=training)
        return content

    def compile(
        self,
        g_optimizer: keras.optimizers.Optimizer,
        d_optimizer: keras.optimizers.Optimizer,
        lambda_l1: float = 100.0,
        adv_weight: float = 1.0,
        block_mean_weight: float = 0.0,
        spectrum_weight: float = 0.0,
        ema_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Configure training.

        Under a ``mixed_float16`` global policy both optimizers are wrapped in
        ``keras.optimizers.LossScaleOptimizer`` (Keras gives a custom-compile GAN no
        automatic loss scaling). Both optimizers are built here, so call
        ``compile`` inside the distribution strategy scope, like model creation.

        Args:
            g_optimizer: Generator optimizer.
            d_optimizer: Discriminator optimizer.
            lambda_l1: Weight of the two L1 terms in the generator loss.
            adv_weight: Weight of the LSGAN term; 0 trains with L1 only.
            block_mean_weight: Weight of :func:`block_mean_l1` (0: off); training patches
                must then be at least ``BLOCK_MEAN_PX`` wide.
            spectrum_weight: Weight of :func:`spectrum_l1` (0: off).
            ema_decay: Decay of the moving average of G's weights in [0, 1) (0: none); the
                average starts as a copy of G's weights now.
            **kwargs: Passed to ``keras.Model.compile`` (e.g. ``jit_compile``,
                ``steps_per_execution``, ``run_eagerly``).
        """
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            if tf.distribute.get_strategy().num_replicas_in_sync > 1:
                # LossScaleOptimizer decides "all gradients finite" per replica, before the
                # gradients are all-reduced: replicas could disagree and diverge.
                raise ValueError(
                    "mixed_float16 with several replicas is not supported (each replica "
                    "would decide on its own whether to skip a step with overflowing "
                    "gradients); train in float32 or on one device"
                )
            if not isinstance(g_optimizer, keras.optimizers.LossScaleOptimizer):
                g_optimizer = keras.optimizers.LossScaleOptimizer(g_optimizer)
            if not isinstance(d_optimizer, keras.optimizers.LossScaleOptimizer):
                d_optimizer = keras.optimizers.LossScaleOptimizer(d_optimizer)
        # model.optimizer is the generator's (TensorBoard counts steps with its iterations);
        # no unused default optimizer is created or saved.
        super().compile(optimizer=g_optimizer, **kwargs)
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.lambda_l1 = float(lambda_l1)
        self.adv_weight = float(adv_weight)
        self.block_mean_weight = float(block_mean_weight)
        self.spectrum_weight = float(spectrum_weight)
        if min(self.adv_weight, self.block_mean_weight, self.spectrum_weight) < 0:
            raise ValueError("adv_weight, block_mean_weight and spectrum_weight must be >= 0, got "
                             f"{adv_weight}, {block_mean_weight} and {spectrum_weight}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = float(ema_decay)
        if self.ema_decay > 0.0 and self.ema_generator is None:
            self.ema_generator = keras.models.clone_model(self.generator)
            self.ema_generator.set_weights(self.generator.get_weights())
            self.ema_generator.trainable = False
        # Build now (outside tf.function): a LossScaleOptimizer only uses its dynamic
        # scale variable in scale_loss() once built.
        self.g_optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [
            self.d_loss_tracker,
            self.g_adv_tracker,
            self.l1_content_tracker,
            self.l1_noise_tracker,
            self.psnr_tracker,
            self.ssim_tracker,
        ]

    @staticmethod
    def _unpack(data: Any) -> tuple[tf.Tensor, tf.Tensor]:
        ld, fd = data[0], data[1]
        return tf.cast(ld, tf.float32), tf.cast(fd, tf.float32)

    @staticmethod
    def _weights(data: Any, batch: tf.Tensor) -> tf.Tensor:
        """Per-image weights ``(B,)``: the third element of ``data``, else ones."""
        if isinstance(data, (tuple, list)) and len(data) > 2 and data[2] is not None:
            return tf.reshape(tf.cast(data[2], tf.float32), [-1])
        return tf.ones([tf.shape(batch)[0]], tf.float32)

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        ld, fd = self._unpack(data)  # (B, H, W, 1) each
        noise_ref = ld - fd
        use_adv = self.adv_weight > 0.0
        g_vars = self.generator.trainable_variables
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            content, noise = self.generator(ld, training=True)
            l1_c = _per_example_mean(tf.abs(content - fd))  # (B,)
            l1_n = _per_example_mean(tf.abs(noise - noise_ref))  # (B,)
            g_per_example = self.lambda_l1 * 0.5 * (l1_c + l1_n)  # mean over both outputs
            if self.block_mean_weight > 0.0:
                g_per_example += self.block_mean_weight * block_mean_l1(content, fd)
            if self.spectrum_weight > 0.0:
                g_per_example += self.spectrum_weight * spectrum_l1(content, fd)
            if use_adv:
                real = tf.concat([fd, noise_ref, ld], axis=-1)  # (B, H, W, 3)
                fake = tf.concat([content, noise, ld], axis=-1)  # (B, H, W, 3)
                d_real = self.discriminator(real, training=True)
                d_fake = self.discriminator(fake, training=True)
                d_per_example = 0.5 * (
                    _per_example_mean(tf.square(d_real - 1.0))
                    + _per_example_mean(tf.square(d_fake))
                )
                g_adv = _per_example_mean(tf.square(d_fake - 1.0))
                g_per_example = g_per_example + self.adv_weight * g_adv
                d_loss = tf.nn.compute_average_loss(d_per_example)
                scaled_d_loss = self.d_optimizer.scale_loss(d_loss)
            g_loss = tf.nn.compute_average_loss(g_per_example)
            scaled_g_loss = self.g_optimizer.scale_loss(g_loss)
        g_grads = g_tape.gradient(scaled_g_loss, g_vars)
        self.g_optimizer.apply_gradients(zip(g_grads, g_vars))
        if self.ema_generator is not None:
            self._update_ema()
        if use_adv:
            d_vars = self.discriminator.trainable_variables
            d_grads = d_tape.gradient(scaled_d_loss, d_vars)
            self.d_optimizer.apply_gradients(zip(d_grads, d_vars))
            self.d_loss_tracker.update_state(d_per_example)
            self.g_adv_tracker.update_state(g_adv)
        self.l1_content_tracker.update_state(l1_c)
        self.l1_noise_tracker.update_state(l1_n)
        return {
            m.name: m.result()
            for m in (
                self.d_loss_tracker,
                self.g_adv_tracker,
                self.l1_content_tracker,
                self.l1_noise_tracker,
            )
        }

    def _update_ema(self) -> None:
        """``avg = d * avg + (1 - d) * w`` for every generator weight (:func:`ema_decay_at`).
        In a replica context each replica updates its own copy (the variables' aggregation is
        NONE): the replicas' G are equal after the all-reduced step, so their averages are."""
        decay = ema_decay_at(self.ema_decay, self.g_optimizer.iterations)
        for avg, w in zip(self.ema_generator.weights, self.generator.weights):
            avg.assign(decay * avg + (1.0 - decay) * tf.cast(w, avg.dtype))

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        ld, fd = self._unpack(data)
        w = self._weights(data, ld)  # (B,)
        content = self(ld, training=False)
        scores = hu_metrics(content, fd)
        scores["l1"] = _per_example_mean(tf.abs(content - fd))
        # weight 0 must not turn an infinite PSNR (identical images) into NaN
        scores = {k: tf.where(w > 0, v, tf.zeros_like(v)) for k, v in scores.items()}
        self.psnr_tracker.update_state(scores["psnr"], sample_weight=w)
        self.ssim_tracker.update_state(scores["ssim"], sample_weight=w)
        self.l1_content_tracker.update_state(scores["l1"], sample_weight=w)
        return {
            m.name: m.result()
            for m in (self.psnr_tracker, self.ssim_tracker, self.l1_content_tracker)
        }

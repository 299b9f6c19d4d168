"""Tests for Mymodel: CNCL generator / discriminator shapes, initialisation, training,
weights I/O and the HU metric protocol. Small models only (whole file ~1 min on 2 CPUs)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import Mymodel
import Mytrain
from ctio import EVAL_WINDOW, HU_MAX, HU_MIN, normalize, set_seed


@pytest.fixture(autouse=True)
def _seed_and_policy():
    set_seed(1234)
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _adam() -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(learning_rate=1e-3, beta_1=0.5)


def _synthetic_pairs(n: int = 4, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth 'anatomy' in HU plus Gaussian noise, returned normalised (ld, fd)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    fd_hu = np.stack(
        [
            40.0 + 150.0 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)))
            for _ in range(n)
        ]
    )
    ld_hu = fd_hu + rng.normal(0.0, 60.0, fd_hu.shape)
    return normalize(ld_hu)[..., None], normalize(fd_hu)[..., None]


def _gan(preset: str = "small", **overrides) -> Mymodel.CNCLGAN:
    g, d = Mymodel.build_models(Mymodel.model_config(preset, **overrides))
    return Mymodel.CNCLGAN(g, d)


# ------------------------------------------------------------------ config


def test_model_config_presets_and_errors():
    paper = Mymodel.model_config("paper")
    assert paper == {
        "preset": "paper", "arch": Mymodel.ARCH, "base_filters": 64, "depth": 4, "norm": "batch",
        "disc_filters": 64,
    }
    small = Mymodel.model_config("small", depth=4, norm=None)
    assert small["depth"] == 4 and small["norm"] == Mymodel.PRESETS["small"]["norm"]
    assert json.loads(json.dumps(small)) == small
    with pytest.raises(ValueError, match=r"unknown preset 'x' \(choose from: paper, small\)"):
        Mymodel.model_config("x")
    with pytest.raises(ValueError):
        Mymodel.model_config("small", norm="layer")
    with pytest.raises(ValueError):
        Mymodel.model_config("small", width=3)


def test_saved_config_of_the_previous_network_is_refused():
    """A config.json model section written before network versions (no "arch") describes the
    version-1 network, whose weights have other shapes: refused with one sentence."""
    old = {"preset": "small", "base_filters": 8, "depth": 4, "norm": "batch", "disc_filters": 16}
    with pytest.raises(ValueError, match="older version of this tool.*train it again"):
        Mymodel.saved_model_config(old)
    assert Mymodel.saved_model_config(Mymodel.model_config("small")) == \
        Mymodel.model_config("small")


# ------------------------------------------------------------------ architecture


@pytest.mark.parametrize(
    "depth,h,w,norm", [(4, 48, 80, "batch"), (3, 24, 40, "instance"), (3, 24, 40, "none")]
)
def test_generator_shapes_dtype_and_identity_init(depth, h, w, norm):
    g = Mymodel.build_generator(base_filters=8, depth=depth, norm=norm)
    x = np.random.default_rng(0).random((2, h, w, 1), dtype=np.float32)
    out = g(x, training=False)
    assert isinstance(out, list) and len(out) == 2
    content, noise = out
    for t in out:
        assert tuple(t.shape) == (2, h, w, 1)
        assert t.dtype == tf.float32
    # Near-identity initialisation: untrained generator returns its input as content.
    assert np.max(np.abs(content.numpy() - x)) < 1e-5
    assert np.max(np.abs(noise.numpy())) == 0.0
    # Same in training mode (batch statistics do not matter: fusion weight of c1 is 0).
    assert np.max(np.abs(g(x, training=True)[0].numpy() - x)) < 1e-5


def _trainable(model: keras.Model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def test_paper_models_have_the_official_parameter_counts():
    """Exact counts of the official code's modules (parameters its forward pass uses: its
    generator also defines two BatchNorm layers per branch that forward never calls)."""
    g, d = Mymodel.build_models(Mymodel.model_config("paper"))
    assert _trainable(g) == 43_825_029
    assert _trainable(g.get_layer("content_unet")) == _trainable(g.get_layer("noise_unet")) \
        == 21_912_513
    assert _trainable(d) == 2_764_736


# One U-Net branch of the official code/model.py, in forward order: (conv in, conv out,
# followed by BatchNorm + ReLU). Written from the official module, not from Mymodel.
OFFICIAL_BRANCH = [
    (1, 64, True), (64, 64, True), (64, 128, True), (128, 128, True),
    (128, 256, True), (256, 256, True), (256, 512, True), (512, 512, True),
    (512, 1024, True), (1024, 512, True),  # bottleneck conv5_1, conv5_2
    (1024, 512, True), (512, 256, True), (512, 256, True), (256, 128, True),
    (256, 128, True), (128, 64, True), (128, 32, False), (32, 1, False),  # linear finest level
]


def test_paper_branch_layer_sequence_matches_the_official_code():
    branch = Mymodel.build_unet(64, 4, "batch")
    convs = []
    for i, layer in enumerate(branch.layers):
        if isinstance(layer, keras.layers.Conv2D):
            nxt = [type(x).__name__ for x in branch.layers[i + 1:i + 3]]
            convs.append((layer.kernel.shape[2], layer.kernel.shape[3],
                          nxt == ["BatchNormalization", "ReLU"]))
            assert layer.kernel.shape[:2] == (3, 3) and layer.use_bias
    assert convs == OFFICIAL_BRANCH
    ups = [x for x in branch.layers if isinstance(x, Mymodel.BilinearUpsample2x)]
    assert len(ups) == 4
    # Official concatenation order is [up-sampled, skip]: the first 512 input channels of
    # dec3_a come from the up-sampled bottleneck.
    cat = branch.get_layer("dec3_cat")
    assert cat.input[0] is ups[0].output


def test_upsampling_matches_aligned_corner_bilinear_for_any_size():
    """BilinearUpsample2x = PyTorch UpsamplingBilinear2d (align_corners=True), also traced
    with unknown H and W (whole slices of several sizes)."""
    x = np.random.default_rng(0).random((2, 5, 3, 2)).astype(np.float32)

    def ref(a, axis):
        n = a.shape[axis]
        pos = np.arange(2 * n) * (n - 1) / (2 * n - 1)
        lo = np.floor(pos).astype(int)
        frac = (pos - lo).reshape([-1 if k == axis else 1 for k in range(4)])
        return np.take(a, lo, axis) * (1 - frac) + np.take(a, np.minimum(lo + 1, n - 1),
                                                              axis) * frac

    layer = Mymodel.BilinearUpsample2x()
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 2])])
    for arr in (x, x[:, :4, :2]):
        out = fn(arr).numpy()
        np.testing.assert_allclose(out, ref(ref(arr, 1), 2), atol=1e-6)
        assert out[0, 0, 0, 0] == arr[0, 0, 0, 0] and out[0, -1, -1, 1] == arr[0, -1, -1, 1]


def test_discriminator_patch_shape():
    d = Mymodel.build_discriminator(base_filters=8)
    y = d(np.zeros((3, 48, 80, 3), np.float32))
    assert tuple(y.shape) == (3, 3, 5, 1) and y.dtype == tf.float32
    assert d.get_layer("d0_conv").kernel.shape == (4, 4, 3, 8)
    assert d.get_layer("d3_conv").kernel.shape == (4, 4, 32, 64)


def test_mixed_precision_outputs_float32_and_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
    x, fd = _synthetic_pairs(2, 32)
    content, noise = gan.generator(x, training=False)
    assert content.dtype == tf.float32 and noise.dtype == tf.float32
    assert np.max(np.abs(content.numpy() - x)) < 1e-5
    # Eager step: tracing the loss-scaled GAN step costs ~20 s of CPU; the graph path is
    # covered in float32 by test_training_lowers_l1_and_updates_both_branches.
    gan.compile(_adam(), _adam(), run_eagerly=True)
    assert isinstance(gan.g_optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(gan.d_optimizer, keras.optimizers.LossScaleOptimizer)
    logs = gan.train_on_batch(x, fd, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert float(gan.g_optimizer.dynamic_scale.numpy()) > 1.0  # loss scaling active


# ------------------------------------------------------------------ training


def _kernel(gan: Mymodel.CNCLGAN, branch: str, layer: str) -> np.ndarray:
    return gan.generator.get_layer(branch).get_layer(layer).kernel.numpy().copy()


def test_training_lowers_l1_and_updates_both_branches():
    ld, fd = _synthetic_pairs(4, 32)
    ds = tf.data.Dataset.from_tensor_slices((ld, fd)).batch(4).repeat()
    val = tf.data.Dataset.from_tensor_slices((ld, fd)).batch(4)
    gan = _gan("small")
    gan.compile(_adam(), _adam(), lambda_l1=100.0, adv_weight=1.0)
    watched = [("content_unet", "enc0_a_conv"), ("noise_unet", "enc0_a_conv"),
               ("noise_unet", "head")]
    before = {k: _kernel(gan, *k) for k in watched}
    d_before = gan.discriminator.get_layer("d0_conv").kernel.numpy().copy()
    seen = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(e))
    # One step per epoch: fit resets the trackers each epoch, so history is per step.
    hist = gan.fit(
        ds, steps_per_epoch=1, epochs=20, callbacks=[cb], verbose=0,
        validation_data=val, validation_freq=20, shuffle=False,  # a tf.data input: as Mytrain
    ).history
    assert len(seen) == 20
    assert len(hist["val_psnr"]) == 1 and np.isfinite(hist["val_psnr"][0])
    assert 0.0 < hist["val_ssim"][0] <= 1.0
    l1 = np.array(hist["l1_content"]) + np.array(hist["l1_noise"])
    assert np.all(np.isfinite(l1)) and np.all(np.isfinite(hist["d_loss"]))
    # Identity init starts at the noise level (~0.0235); seeded run reaches ~0.018 in 20 steps.
    assert l1[-1] < l1[0] and l1[-5:].mean() < 0.85 * l1[:5].mean(), l1
    for k in watched:
        assert not np.allclose(_kernel(gan, *k), before[k]), f"{k} did not change"
    assert not np.allclose(gan.discriminator.get_layer("d0_conv").kernel.numpy(), d_before)
    denoised = gan.predict(ld, verbose=0)
    assert denoised.shape == ld.shape and denoised.dtype == np.float32


def test_adversarial_step_moves_the_generator_differently_from_l1_only():
    """One step on the same batch from the same weights: with the adversarial term the
    generator update differs from the L1-only update (the term is not inert), and both share
    the L1 part (loss = mean over both outputs, the official expression)."""
    ld, fd = _synthetic_pairs(2, 32)
    steps = {}
    for adv in (0.0, 1.0):
        set_seed(7)
        gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
        gan.compile(keras.optimizers.SGD(1e-2), keras.optimizers.SGD(1e-2),
                    lambda_l1=Mytrain.OFFICIAL_LAMBDA, adv_weight=adv, run_eagerly=True)
        before = [w.numpy().copy() for w in gan.generator.trainable_weights]
        logs = gan.train_on_batch(ld, fd, return_dict=True)
        steps[adv] = np.concatenate([(w.numpy() - b).ravel() for w, b in
                                     zip(gan.generator.trainable_weights, before)])
        assert (logs["g_adv"] > 0) == (adv > 0), logs
    diff = np.linalg.norm(steps[1.0] - steps[0.0]) / np.linalg.norm(steps[0.0])
    assert diff > 0.05, diff  # the adversarial gradient is a sizeable part of the update


def test_block_mean_l1_compares_16px_block_means_only():
    """Analytic cases against a numpy reference: a constant offset c gives |c|; a texture with
    zero mean in every 16x16 block gives 0; the partial edge block (here columns 32-39) is left
    out."""
    rng = np.random.default_rng(3)
    fd = rng.random((2, 48, 40, 1), dtype=np.float32)
    ref = lambda a, b: np.abs((a - b)[:, :48, :32, 0].reshape(2, 3, 16, 2, 16)  # noqa: E731
                              .mean(axis=(2, 4))).mean(axis=(1, 2))
    for content, expect in (
            (fd + 0.01, [0.01, 0.01]),
            (fd + 0.02 * (np.indices((48, 40)).sum(0) % 2 * 2 - 1)[None, ..., None], [0, 0]),
            (fd + np.pad(np.ones((2, 48, 8, 1), np.float32), ((0, 0), (0, 0), (32, 0), (0, 0))),
             [0, 0]),
            (fd + rng.normal(0, 0.05, fd.shape).astype(np.float32), None)):
        got = Mymodel.block_mean_l1(tf.constant(content), tf.constant(fd)).numpy()
        want = ref(content.astype(np.float64), fd.astype(np.float64))
        assert got == pytest.approx(want, abs=1e-6)
        if expect is not None:
            assert got == pytest.approx(expect, abs=1e-6)


@pytest.mark.parametrize("term, weight, lr", [("block_mean_weight", 5.0, 1e-2),
                                               ("spectrum_weight", 1.0, 1e-3)])
def test_extra_loss_terms_enter_the_generator_update(term, weight, lr):
    """One L1-only step from the same weights with the term's weight 0 and > 0: the updates
    differ (the term has a finite gradient), and a negative weight is refused."""
    ld, fd = _synthetic_pairs(2, 32)
    steps = {}
    for w in (0.0, weight):
        set_seed(7)
        gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
        gan.compile(keras.optimizers.SGD(lr), keras.optimizers.SGD(lr), adv_weight=0.0,
                    run_eagerly=True, **{term: w})
        before = [v.numpy().copy() for v in gan.generator.trainable_weights]
        gan.train_on_batch(ld, fd, return_dict=True)
        steps[w] = np.concatenate([(v.numpy() - b).ravel() for v, b in
                                   zip(gan.generator.trainable_weights, before)])
    assert np.isfinite(steps[weight]).all()
    assert np.linalg.norm(steps[weight] - steps[0.0]) / np.linalg.norm(steps[0.0]) > 0.05
    with pytest.raises(ValueError, match=term):
        _gan("small", base_filters=4, depth=2, disc_filters=4).compile(
            _adam(), _adam(), **{term: -1.0})


def test_radial_power_of_white_noise_is_its_variance_times_the_window_energy():
    """Analytic case: for white noise of variance s^2, E|DFT(w x)|^2 = s^2 sum(w^2) at every
    frequency, so every ring of the batch-mean spectrum is s^2 sum(w^2) (within the scatter of
    the average); Gaussian-filtered noise falls off (its high rings far below its low)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    s, n = 0.3, 64
    x = rng.normal(0, s, (32, n, n, 1)).astype(np.float32)
    w = np.hanning(n)  # numpy's symmetric Hann window, tf.signal.hann_window(periodic=False)
    want = s ** 2 * (np.outer(w, w) ** 2).sum()
    got = Mymodel.radial_power(tf.constant(x)).numpy()
    assert got.shape == (n // 2,)
    assert got[2:] == pytest.approx(np.full(n // 2 - 2, want), rel=0.2)  # ring 1: few bins
    assert got[2:].mean() == pytest.approx(want, rel=0.03)
    low = np.stack([gaussian_filter(a[..., 0], 2.0)[..., None] for a in x])
    p_low = Mymodel.radial_power(tf.constant(low)).numpy()
    assert p_low[-8:].max() < 1e-3 * p_low[:4].min()


def test_spectrum_l1_is_the_log_power_ratio():
    """Analytic: scaling an image by a scales its power by a^2 at every frequency, so
    spectrum_l1(a x, x) = |2 ln a| for every example; identical batches give 0; a blurred copy
    (less high-frequency power) is farther from the original than a sharp one."""
    rng = np.random.default_rng(6)
    x = tf.constant(rng.random((3, 32, 48, 1), dtype=np.float32))
    for a in (0.5, 1.0, 3.0):
        got = Mymodel.spectrum_l1(a * x, x).numpy()
        assert got == pytest.approx(np.full(3, abs(2 * np.log(a))), abs=1e-4)
    blurred = tf.nn.avg_pool2d(x, 3, 1, "SAME")
    assert Mymodel.spectrum_l1(blurred, x).numpy()[0] > 0.5


def test_validation_weights_leave_padding_out_of_the_metrics():
    """Weight-0 images (validation padding for several replicas) change no metric, even when
    their PSNR is infinite."""
    ld, fd = _synthetic_pairs(3, 32)
    gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
    gan.compile(_adam(), _adam())
    plain = gan.evaluate(tf.data.Dataset.from_tensor_slices((ld[:2], fd[:2])).batch(2),
                         return_dict=True, verbose=0)
    ident = gan.predict(ld[2:], verbose=0)  # a padding image scored against itself: PSNR inf
    padded = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([ld[:2], ld[2:]]), np.concatenate([fd[:2], ident]),
         np.float32([1, 1, 0]))).batch(3)
    res = gan.evaluate(padded, return_dict=True, verbose=0)
    for k in plain:
        assert res[k] == pytest.approx(plain[k], rel=1e-6), k


def test_adv_weight_zero_trains_l1_only_and_validates():
    ld, fd = _synthetic_pairs(4, 32)
    train = tf.data.Dataset.from_tensor_slices((ld, fd)).batch(2).repeat()
    val = tf.data.Dataset.from_tensor_slices((ld, fd)).batch(2)
    gan = _gan("small", base_filters=8, depth=2, disc_filters=8)
    gan.compile(_adam(), _adam(), adv_weight=0.0, run_eagerly=True)  # graph path tested above
    d_before = [w.numpy().copy() for w in gan.discriminator.trainable_weights]
    hist = gan.fit(train, steps_per_epoch=3, epochs=1, validation_data=val, verbose=0,
                   shuffle=False).history
    assert hist["d_loss"] == [0.0] and hist["g_adv"] == [0.0]
    assert np.isfinite(hist["l1_content"][0]) and hist["l1_content"][0] > 0
    for key in ("val_psnr", "val_ssim", "val_l1_content"):
        assert key in hist and np.isfinite(hist[key][0])
    for w, b in zip(gan.discriminator.trainable_weights, d_before):
        assert np.array_equal(w.numpy(), b)
    # evaluate() reports the same protocol as hu_metrics on the content output.
    res = gan.evaluate(val, return_dict=True, verbose=0)
    ref = Mymodel.hu_metrics(gan.predict(ld, verbose=0), fd)
    assert res["psnr"] == pytest.approx(float(np.mean(ref["psnr"])), abs=1e-3)
    assert res["ssim"] == pytest.approx(float(np.mean(ref["ssim"])), abs=1e-5)


def test_generator_weights_round_trip(tmp_path):
    cfg = dict(base_filters=8, depth=3, norm="batch")
    g = Mymodel.build_generator(**cfg)
    rng = np.random.default_rng(1)
    g.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in g.get_weights()])
    x = np.random.default_rng(2).random((2, 24, 40, 1), dtype=np.float32)
    path = tmp_path / "g.weights.h5"
    g.save_weights(path)
    fresh = Mymodel.build_generator(**cfg)
    assert not np.array_equal(fresh(x)[0].numpy(), g(x)[0].numpy())
    fresh.load_weights(path)
    for a, b in zip(fresh(x), g(x)):
        assert np.array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------------ metrics


def _windowed(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return np.clip(hu, *window).astype(np.float64) - window[0]


@pytest.mark.parametrize("protocol,window", [("skimage", EVAL_WINDOW), ("full", (HU_MIN, HU_MAX))])
def test_hu_metrics_matches_skimage(protocol, window):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:72] / 64.0
    ref_hu = np.stack([300.0 * np.sin(3 * xx + k) * np.cos(2 * yy) for k in range(3)])
    pred_hu = ref_hu + rng.normal(0, 40.0, ref_hu.shape)
    ref, pred = normalize(ref_hu)[..., None], normalize(pred_hu)[..., None]
    out = Mymodel.hu_metrics(tf.constant(pred), tf.constant(ref), protocol)
    assert set(out) == {"psnr", "ssim", "rmse"}
    for v in out.values():
        assert v.shape == (3,) and v.dtype == tf.float32
    width = window[1] - window[0]
    # Reference on the float32 normalised images mapped back to HU, as the model sees them.
    ref_w = _windowed(ref[..., 0].astype(np.float64) * 4096 - 1024, window)
    pred_w = _windowed(pred[..., 0].astype(np.float64) * 4096 - 1024, window)
    for i in range(3):
        psnr = peak_signal_noise_ratio(ref_w[i], pred_w[i], data_range=width)
        ssim = structural_similarity(
            ref_w[i], pred_w[i], gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=width,
        )
        rmse = np.sqrt(np.mean((pred_w[i] - ref_w[i]) ** 2))
        assert float(out["psnr"][i]) == pytest.approx(psnr, abs=0.01)
        assert float(out["ssim"][i]) == pytest.approx(ssim, abs=0.001)
        assert float(out["rmse"][i]) == pytest.approx(rmse, rel=1e-4)


def test_hu_metrics_in_tf_function():
    x = tf.random.uniform((2, 32, 32, 1), seed=1)
    fn = tf.function(lambda a, b: Mymodel.hu_metrics(a, b))
    out = fn(x, x * 0.99)
    assert out["psnr"].shape == (2,) and np.all(np.isfinite(out["psnr"].numpy()))
    assert np.all(out["ssim"].numpy() <= 1.0)


_DIST_SCRIPT = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, Mymodel
rng = np.random.default_rng(0)
ld = rng.random((4, 32, 32, 1)).astype("float32")
fd = (0.8 * ld + 0.05).astype("float32")
def weights(gan):
    return [w.numpy() for w in gan.generator.weights + gan.discriminator.weights]
def one_epoch(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        cfg = Mymodel.model_config("small", base_filters=4, depth=2, disc_filters=4,
                                   norm="instance")
        gan = Mymodel.CNCLGAN(*Mymodel.build_models(cfg))
        gan.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1))
    init = weights(gan)
    ds = tf.data.Dataset.from_tensor_slices((ld, fd)).batch(4)
    hist = gan.fit(ds, epochs=1, verbose=0, shuffle=False).history
    return init, weights(gan), hist
i1, w1, h1 = one_epoch(tf.distribute.get_strategy())
i2, w2, h2 = one_epoch(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
assert all(np.array_equal(a, b) for a, b in zip(i1, i2))
print("STEP", max(float(np.abs(a - b).max()) for a, b in zip(w1, i1)))
print("DIFF", max(float(np.abs(a - b).max()) for a, b in zip(w1, w2)))
print("LOGDIFF", max(abs(h1[k][0] - h2[k][0]) for k in h1))
keras.mixed_precision.set_global_policy("mixed_float16")
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    gan = Mymodel.CNCLGAN(*Mymodel.build_models(Mymodel.model_config(
        "small", base_filters=4, depth=2, disc_filters=4, norm="instance")))
    try:
        gan.compile(keras.optimizers.Adam(), keras.optimizers.Adam())
        print("MIXED accepted")
    except ValueError as e:
        print("MIXED refused", "several replicas" in str(e))
"""


@pytest.mark.slow
def test_two_replica_step_equals_single_device(tmp_path):
    """Losses are averaged over the GLOBAL batch: a MirroredStrategy step on 2 logical CPUs
    (batch 4 = 2 x 2) gives the same SGD update as one device (instance norm, so batch
    statistics do not depend on the split). Runs in a subprocess: logical devices must be
    configured before TensorFlow initialises."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "dist_check.py"
    script.write_text(_DIST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = dict(line.split() for line in proc.stdout.splitlines() if line[:4] in
                ("STEP", "DIFF", "LOGD"))
    assert float(vals["STEP"]) > 1e-3  # the step did move the weights
    assert float(vals["DIFF"]) < 1e-5 * max(1.0, float(vals["STEP"]))
    assert float(vals["LOGDIFF"]) < 1e-5
    # mixed_float16 under several replicas: refused (LossScaleOptimizer decides per replica)
    assert "MIXED refused True" in proc.stdout, proc.stdout


def test_checkpoint_holds_only_the_two_optimizers(tmp_path):
    """No unused default optimizer (RMSprop) in the training state: model.optimizer is G's."""
    import h5py

    gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
    gan.compile(_adam(), _adam())
    gan(np.zeros((1, 16, 16, 1), np.float32))
    assert gan.optimizer is gan.g_optimizer
    path = tmp_path / "state.weights.h5"
    gan.save_weights(path)
    names = []
    with h5py.File(path) as f:
        f.visit(names.append)
    tops = {n.split("/")[0] for n in names}
    assert {"g_optimizer", "d_optimizer"} <= tops
    assert not [t for t in tops if "optimizer" in t and t not in ("g_optimizer", "d_optimizer")]
    assert not [n for n in names if "rmsprop" in n.lower()]


# --- Moving average of the generator's weights (--ema-decay) ------------------------------------
def test_ema_decay_follows_the_tf_exponential_moving_average_warm_up():
    """min(decay, (1 + t) / (10 + t)), tf.train.ExponentialMovingAverage with num_updates."""
    got = [float(Mymodel.ema_decay_at(0.99, t)) for t in (0, 1, 8, 90, 10_000)]
    assert got == pytest.approx([0.1, 2 / 11, 0.5, 0.91, 0.99])


def test_ema_generator_is_the_moving_average_and_what_predict_and_saving_use(tmp_path):
    """Three compiled train steps with SGD: the average equals the numpy recursion over the
    generator weights seen after each step (starting from the initial weights); predict and
    validation use it, G stays the trained one; the training state saves and restores it."""
    ld, fd = _synthetic_pairs(2, 32)
    decay = 0.6

    def new_gan():
        set_seed(3)
        gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
        gan.compile(keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05), ema_decay=decay)
        return gan

    gan = new_gan()
    avg = [w.copy() for w in gan.generator.get_weights()]
    for t in (1, 2, 3):
        gan.train_on_batch(ld, fd)
        d = min(decay, (1 + t) / (10 + t))
        avg = [d * a + (1 - d) * w for a, w in zip(avg, gan.generator.get_weights())]
    assert int(gan.g_optimizer.iterations) == 3
    for got, want in zip(gan.ema_generator.get_weights(), avg):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    moved = max(float(np.abs(a - w).max()) for a, w in
                zip(gan.ema_generator.get_weights(), gan.generator.get_weights()))
    assert moved > 1e-4  # the average is not G
    assert gan.denoiser() is gan.ema_generator
    np.testing.assert_allclose(gan.predict(ld, verbose=0),
                               gan.ema_generator.predict(ld, verbose=0)[0], atol=1e-6)
    path = tmp_path / "state.weights.h5"
    gan.save_weights(path)
    again = new_gan()
    again(ld[:1])
    again.load_weights(path)
    for a, b in zip(again.ema_generator.get_weights(), gan.ema_generator.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_without_ema_the_generator_denoises_and_bad_decay_is_refused():
    gan = _gan("small", base_filters=4, depth=2, disc_filters=4)
    gan.compile(_adam(), _adam())
    assert gan.ema_generator is None and gan.denoiser() is gan.generator
    with pytest.raises(ValueError, match="ema_decay"):
        gan.compile(_adam(), _adam(), ema_decay=1.0)

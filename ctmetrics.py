"""Paired image metrics of LDCT denoising: PSNR / SSIM / RMSE in the named protocols, and their
statistics (bootstrap intervals over patients, paired tests).

* The metric protocols (``METRIC_PROTOCOLS``, ``protocol_text``): one table, one line printed
  under every table of figures.
* The SSIM kernel (:func:`ssim`) and :func:`hu_metrics`, the project's one metric implementation
  (Mymodel's validation and Myevaluation.py use it); TensorFlow, imported lazily.
* Statistics (:func:`bootstrap_ci`, :func:`paired_tests`): numpy / scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

import ctio

FULL_RANGE = (ctio.HU_MIN, ctio.HU_MAX)  # the whole normalised range, beside the window figures
SSIM_FILTER_SIZE = 11  # Gaussian SSIM window (Wang et al. 2004), valid region only
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@dataclass(frozen=True)
class MetricProtocol:
    """One way of scoring LDCT denoising, as a peer's code does it.

    HU are clipped to ``window``; the image scored is then the clipped HU (``scale`` None,
    ``shift`` False), the clipped HU shifted to ``[0, high - low]`` (``shift``), or that range
    mapped to ``[0, scale]``. PSNR and SSIM use the data range ``scale`` (or the window width),
    or with ``data_range="ref"`` the max - min of each windowed reference image. SSIM: 11x11
    Gaussian window sigma 1.5, K1 0.01, K2 0.03; ``border`` "valid" (the map only where the
    window fits: scikit-image, tf.image.ssim), "zero" (zero padding to the same size, as
    ``F.conv2d(padding=5)``) or "reflect" (``torch.nn.functional.pad(mode="reflect")``, kornia's
    ``filter2D`` default); ``clamp`` clips the SSIM map to [0, 1] before its mean. RMSE in HU
    (``rmse_hu``) or in the scored image's units."""

    window: tuple[float, float]
    scale: Optional[float]
    shift: bool
    data_range: str  # "window" | "ref"
    border: str  # "valid" | "zero" | "reflect"
    clamp: bool
    rmse_hu: bool
    convention: str
    source: str

    @property
    def image_range(self) -> tuple[float, float]:
        """(min, max) of the scored image."""
        lo, hi = self.window
        if self.scale:
            return 0.0, float(self.scale)
        return (0.0, hi - lo) if self.shift else (lo, hi)


METRIC_PROTOCOLS = {  # the one table of protocols (Myevaluation.py --protocol NAME)
    "redcnn": MetricProtocol(
        ctio.EVAL_WINDOW, None, False, "window", "zero", False, True,
        "HU kept (not shifted), SSIM zero-padded 'same' map, mean of the whole map",
        "RED-CNN (Chen et al., IEEE TMI 2017): SSinyu/RED-CNN measure.py (compute_SSIM, "
        "compute_PSNR, compute_RMSE) and solver.py (trunc to [-160, 240], data_range 400)"),
    "dugan": MetricProtocol(
        (-300.0, 300.0), 1.0, True, "window", "reflect", True, False,
        "scaled to [0, 1], SSIM reflect-padded 'same' map clamped to [0, 1], RMSE on [0, 1]",
        "DU-GAN (Huang et al., IEEE TMI 2021): Hzzone/DU-GAN utils/metrics.py (kornia "
        "filter2D), utils/dataset.py and models/basic_template.py (hu_min -300, hu_max 300)"),
    "corediff": MetricProtocol(
        (-1000.0, 1000.0), 255.0, True, "ref", "zero", False, True,
        "scaled to 0..255 without rounding, data range = max - min of each windowed full dose, "
        "SSIM zero-padded 'same' map, RMSE back in HU",
        "CoreDiff (Gao et al., IEEE TMI 2023): qgao21/CoreDiff utils/measure.py, "
        "models/basic_template.py (transfer_calculate_window), models/corediff/corediff.py "
        "(test: data_range = full_dose.max() - full_dose.min())"),
    "skimage": MetricProtocol(
        ctio.EVAL_WINDOW, None, True, "window", "valid", False, True,
        "shifted to [0, 400], SSIM over the valid region (scikit-image's "
        "structural_similarity(gaussian_weights=True, use_sample_covariance=False))",
        "this project's exact protocol in the RED-CNN window (equal to scikit-image)"),
    "full": MetricProtocol(
        FULL_RANGE, None, True, "window", "valid", False, True,
        "shifted to [0, 4096], SSIM over the valid region (scikit-image)",
        "this project's normalisation range"),
}
DEFAULT_PROTOCOL = "redcnn"  # the tables: comparable with most Mayo-2016 papers
VALIDATION_PROTOCOL = "skimage"  # Mymodel's validation PSNR / SSIM (hu_metrics' default)


def protocol_text(name: str = DEFAULT_PROTOCOL) -> str:
    """The one-line protocol printed under every table of ``name``, built from the table."""
    p = METRIC_PROTOCOLS[name]
    lo, hi = p.window
    rng = ("max - min of each windowed full dose" if p.data_range == "ref"
           else f"{p.scale or hi - lo:g}")
    return (f"protocol {name}: HU clipped to [{lo:g}, {hi:g}], {p.convention}; PSNR and SSIM "
            f"data range {rng}; SSIM {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} Gaussian sigma "
            f"{SSIM_SIGMA:g} (K1 {SSIM_K1:g}, K2 {SSIM_K2:g}, {p.border} border"
            f"{', map clamped to [0, 1]' if p.clamp else ''}); RMSE in "
            f"{'HU' if p.rmse_hu else 'scored-image units'}; whole slices, mean over slices; "
            f"source: {p.source}")


PROTOCOL = protocol_text(DEFAULT_PROTOCOL)
PROTOCOLS = tuple(METRIC_PROTOCOLS)  # every protocol is scored; --protocol picks the tables
METRICS = ("psnr", "ssim", "rmse")
PAIRED = (("cncl", "ldct"), ("cncl", "gaussian"))  # paired tests: CNCL vs the input and baseline

# Statistics.
MIN_PATIENTS_FOR_P = 6  # the exact two-sided signed-rank test's smallest p is 2 / 2^n: 0.0625 at 5
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


# --- SSIM and the metrics (TensorFlow, imported lazily: `import ctmetrics` stays TF-free) ------
def _tf():
    return ctio.import_tensorflow()


def gaussian_taps(size: int = SSIM_FILTER_SIZE, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian of the SSIM window (its outer product is tf.image.ssim's
    and scikit-image's 2-D window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _gaussian_pass(maps, axis: int):
    """One valid-region pass of the 1-D SSIM Gaussian along ``axis`` (1: rows, 2: columns) of
    ``(N, H, W, 1)`` maps, as symmetric sums of shifted slices (elementwise ops only)."""
    tf = _tf()
    taps = gaussian_taps()
    size, c = len(taps), len(taps) // 2
    n = tf.shape(maps)[axis] - size + 1

    def shifted(k):
        return maps[:, k:k + n] if axis == 1 else maps[:, :, k:k + n]

    acc = shifted(c) * taps[c]
    for k in range(c):
        acc += (shifted(k) + shifted(size - 1 - k)) * taps[k]
    return acc


def _ssim_graph(x, y, data_range, centre, border: str, clamp: bool):
    tf = _tf()
    x = tf.cast(x, tf.float32)
    y = tf.cast(y, tf.float32)
    if border != "valid":  # pad the scored image (zeros are its own zeros), then valid passes
        pad = [[0, 0], [SSIM_FILTER_SIZE // 2] * 2, [SSIM_FILTER_SIZE // 2] * 2, [0, 0]]
        mode = "REFLECT" if border == "reflect" else "CONSTANT"
        x, y = tf.pad(x, pad, mode=mode), tf.pad(y, pad, mode=mode)
    x, y = x - centre, y - centre
    maps = tf.concat([x, y, x * y, tf.square(x) + tf.square(y)], axis=0)
    maps = _gaussian_pass(_gaussian_pass(maps, 1), 2)
    mx, my, mxy, mss = tf.split(maps, 4, axis=0)
    data_range = tf.reshape(data_range, [-1, 1, 1, 1])
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    cs = (2.0 * (mxy - mx * my) + c2) / (mss - tf.square(mx) - tf.square(my) + c2)
    mx, my = mx + centre, my + centre
    ssim_map = (2.0 * mx * my + c1) / (tf.square(mx) + tf.square(my) + c1) * cs
    if clamp:
        ssim_map = tf.clip_by_value(ssim_map, 0.0, 1.0)
    return tf.reduce_mean(ssim_map, axis=[1, 2, 3])


_ssim_compiled: dict = {}
SSIM_BORDERS = ("valid", "zero", "reflect")


def ssim(x, y, data_range, *, centre: Optional[float] = None, border: str = "valid",
         clamp: bool = False):
    """Per-image SSIM of ``(B, H, W, 1)`` float32 images.

    Wang et al. (2004) with the ``SSIM_*`` Gaussian window and no sample-covariance correction.
    ``data_range``: a number or one per image ``(B,)``. ``border`` "valid": the SSIM map where
    the window fits (tf.image.ssim's and scikit-image's ``structural_similarity(
    gaussian_weights=True, use_sample_covariance=False)`` definition); "zero": the images
    zero-padded to a same-size map (``F.conv2d(..., padding=5)`` of SSinyu/RED-CNN measure.py);
    "reflect": reflect-padded (kornia ``filter2D``'s default border, torch "reflect" = the edge
    pixel not repeated). ``clamp``: the map clipped to [0, 1] before the mean (Hzzone/DU-GAN
    utils/metrics.py). The mean is over the whole map.

    * Separable: the 11x11 window is two 1-D passes over the four moment maps stacked in one
      batch (22 instead of 121 taps per map).
    * Centred: images are shifted by ``-centre`` (default ``data_range / 2``, the middle of the
      image's range) before the second moments, which keeps float32 cancellation in
      ``E[x^2] - E[x]^2`` ~20x below tf.image.ssim's; padding happens before the shift.
    * CPU-independent: the passes are elementwise sums of shifted slices compiled by XLA, so
      TF_ENABLE_ONEDNN_OPTS=0 and 1 give the same bits (oneDNN convolutions round differently,
      and XLA's CPU convolution is slow).

    Pure TensorFlow (also inside tf.function / train_step); "valid" needs H, W >= the window.
    """
    if border not in SSIM_BORDERS:
        raise ValueError(f"border {border!r}: one of {SSIM_BORDERS}")
    tf = _tf()
    key = (border, bool(clamp))
    if key not in _ssim_compiled:
        _ssim_compiled[key] = tf.function(
            lambda a, b, r, c: _ssim_graph(a, b, r, c, border, bool(clamp)),
            jit_compile=True, autograph=False)
    rng = tf.broadcast_to(tf.cast(data_range, tf.float32), tf.shape(x)[:1])
    if centre is None:
        centre = tf.reshape(tf.cast(data_range, tf.float32), [-1])[0] / 2.0
    return _ssim_compiled[key](x, y, rng, tf.cast(centre, tf.float32))


def _protocol(protocol) -> MetricProtocol:
    return METRIC_PROTOCOLS[protocol] if isinstance(protocol, str) else protocol


def hu_metrics(pred, ref, protocol=VALIDATION_PROTOCOL) -> dict:
    """Per-image PSNR / SSIM / RMSE of one protocol: the project's one metric implementation.

    1. ``pred`` and ``ref`` are NORMALISED images ``(B, H, W, 1)``, mapped to HU with
       ``ctio.denormalize`` in float32.
    2. ``protocol`` (a name of ``METRIC_PROTOCOLS`` or a :class:`MetricProtocol`; default
       ``VALIDATION_PROTOCOL``, Mymodel's validation) makes the scored images: HU clipped to
       its window, kept, shifted or scaled (see :class:`MetricProtocol`).
    3. ``psnr = 10 log10(L^2 / MSE)`` with the protocol's data range ``L`` (inf if equal).
    4. ``ssim``: :func:`ssim` with data range ``L`` and the protocol's border and clamp.
    5. ``rmse``: of the scored images, in HU or in their units (``rmse_hu``).

    Pure TensorFlow; usable inside ``tf.function`` / ``train_step``. Images need H, W >= 11.

    Returns:
        ``{"psnr": (B,), "ssim": (B,), "rmse": (B,)}`` float32 tensors.
    """
    tf = _tf()
    p = _protocol(protocol)
    low, high = (float(v) for v in p.window)
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {p.window}")
    img_lo, img_hi = p.image_range
    unit_hu = (high - low) / (img_hi - img_lo)  # HU per unit of the scored image

    def scored(img):
        hu = tf.clip_by_value(ctio.denormalize(tf.cast(img, tf.float32)), low, high)
        return (hu - low) / unit_hu if (p.scale or p.shift) else hu

    pred_s, ref_s = scored(pred), scored(ref)
    axes = [1, 2, 3]
    if p.data_range == "ref":
        rng = tf.reduce_max(ref_s, axis=axes) - tf.reduce_min(ref_s, axis=axes)
    else:
        rng = tf.fill(tf.shape(ref_s)[:1], img_hi - img_lo)
    mse = tf.reduce_mean(tf.square(pred_s - ref_s), axis=axes)
    psnr = 10.0 * tf.math.log(tf.square(rng) / mse) / tf.math.log(10.0)
    rmse = tf.sqrt(mse) * (unit_hu if p.rmse_hu else 1.0)
    return {"psnr": psnr, "rmse": rmse,
            "ssim": ssim(pred_s, ref_s, rng, centre=(img_lo + img_hi) / 2.0, border=p.border,
                         clamp=p.clamp)}


_metric_fn = None


def _metrics_tf():
    """One tf.function scoring a batch in every protocol (shape-generic: no retracing per size)."""
    global _metric_fn
    if _metric_fn is None:
        tf = _tf()

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)] * 2,
                     autograph=False)  # plain Python loops only; no re-reading of the source
        def fn(pred, ref):
            return {name: hu_metrics(pred, ref, name) for name in METRIC_PROTOCOLS}

        _metric_fn = fn
    return _metric_fn


def slice_metrics(images_hu, refs_hu) -> dict[str, dict[str, np.ndarray]]:
    """Per-image metrics of HU images against HU references, all of one size.

    Args:
        images_hu: (B, H, W) HU images to score.
        refs_hu: (B, H, W) HU references.

    Returns:
        ``{protocol: {"psnr", "ssim", "rmse"}}`` of float64 arrays (B,), computed
        by :func:`hu_metrics` on the normalised images.
    """
    images = ctio.normalize(np.asarray(images_hu, np.float32))[..., None]
    refs = ctio.normalize(np.asarray(refs_hu, np.float32))[..., None]
    if images.shape != refs.shape:
        raise ValueError(f"shape mismatch {images.shape} vs {refs.shape}")
    if min(images.shape[1:3]) < 11:
        raise ctio.CTDataError(f"slices of {images.shape[1]}x{images.shape[2]} are smaller than "
                               "the 11x11 SSIM window")
    out = _metrics_tf()(images, refs)
    return {r: {m: out[r][m].numpy().astype(np.float64) for m in METRICS} for r in PROTOCOLS}


# --- Statistics (numpy / scipy) ---------------------------------------------------------------
def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def bootstrap_ci(values, patients) -> Optional[list[float]]:
    """95 % percentile bootstrap interval of the mean of ``values`` (one per slice).

    Resamples patients with replacement (the mean over the resampled patients' slices), or
    slices when there is only one patient (scipy.stats.bootstrap, ``BOOTSTRAP_RESAMPLES``,
    seeded). None with fewer than two units or non-finite values."""
    from scipy.stats import bootstrap

    v = np.asarray(values, np.float64)
    pats = np.asarray(patients)
    units = sorted(set(pats))
    if len(units) == 1:
        sums, counts = v, np.ones_like(v)
    else:
        sums = np.array([v[pats == p].sum() for p in units])
        counts = np.array([float((pats == p).sum()) for p in units])
    if len(sums) < 2 or not np.all(np.isfinite(sums)):
        return None
    if np.ptp(v) == 0:  # degenerate: every resample gives the same mean
        return [float(v[0])] * 2
    res = bootstrap((sums, counts), lambda s, c, axis: s.sum(axis) / c.sum(axis), paired=True,
                    vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                    confidence_level=CONFIDENCE, rng=np.random.default_rng(BOOTSTRAP_SEED))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def metric_stats(values: list, patients: list) -> dict:
    """Mean, sample std over slices, mean per patient and the bootstrap interval."""
    keep = [(v, p) for v, p in zip(values, patients) if v is not None]
    if not keep:
        return {"mean": None, "std": None, "ci95": None, "per_patient": {}, "n": 0}
    v = np.asarray([k[0] for k in keep], np.float64)
    pats = [k[1] for k in keep]
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    ci = bootstrap_ci(v, pats)
    return {"mean": _finite_or_none(float(v.mean())), "std": _finite_or_none(std),
            "ci95": [_finite_or_none(c) for c in ci] if ci else None,
            "per_patient": {p: _finite_or_none(float(v[np.asarray(pats) == p].mean()))
                            for p in sorted(set(pats))},
            "n": len(v)}


def patient_means(values, patients) -> np.ndarray:
    """The mean of ``values`` per patient (sorted by patient): the unit of the paired test."""
    v, pats = np.asarray(values, np.float64), np.asarray(patients)
    return np.array([v[pats == p].mean() for p in sorted(set(pats.tolist()))])


def paired_p(diff, patients) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p of paired differences with the PATIENT as the unit:
    the test runs on the per-patient mean differences (slices of one patient are correlated,
    and pooling them inflates the false-positive rate; tests/test_statistics.py). Exact null
    distribution unless ties or zeros (then the normal approximation); p = 1 when every mean
    difference is zero. None with fewer than MIN_PATIENTS_FOR_P patients: the interval is then
    descriptive."""
    from scipy.stats import wilcoxon

    means = patient_means(diff, patients)
    if len(means) < MIN_PATIENTS_FOR_P:
        return None
    if np.all(means == 0):
        return 1.0
    mags = np.abs(means)
    exact = len(means) <= 50 and mags.all() and len(np.unique(mags)) == len(means)
    return float(wilcoxon(means, method="exact" if exact else "asymptotic").pvalue)


def paired_tests(results: list[dict]) -> dict:
    """CNCL vs LDCT and vs Gaussian (``PAIRED``), per protocol and metric: the mean per-slice
    difference, its bootstrap interval (patients resampled) and :func:`paired_p` (patients as
    the unit)."""
    by = {(d["patient"], d["slice_id"], d["method"]): d for d in results}
    keys = sorted({(d["patient"], d["slice_id"]) for d in results if d["method"] == "cncl"})
    out = {}
    for a, b in PAIRED:
        for r in PROTOCOLS:
            for m in METRICS:
                col = f"{m}_{r}"
                diff = np.array([by[k + (a,)][col] - by[k + (b,)][col] for k in keys])
                ok = np.isfinite(diff)
                diff, pats = diff[ok], [k[0] for k, o in zip(keys, ok) if o]
                out.setdefault(f"{a}-{b}", {}).setdefault(r, {})[m] = {
                    "mean_diff": float(diff.mean()) if len(diff) else None,
                    "ci95": bootstrap_ci(diff, pats), "wilcoxon_p": paired_p(diff, pats),
                    "n": int(len(diff)), "n_patients": len(set(pats))}
    return out


def interval_note(n_slices: int, n_patients: int) -> str:
    """What the intervals and p-values of a table are, for ``n_patients`` patients."""
    units = n_patients if n_patients > 1 else n_slices
    unit = "patients" if n_patients > 1 else "slices of one patient"
    text = (f"n = {n_slices} slices, {n_patients} patient(s); mean over slices "
            f"[{CONFIDENCE:.0%} percentile bootstrap interval, {BOOTSTRAP_RESAMPLES} resamples "
            f"of {unit}]")
    if units == 2:
        text += ("; with 2 units the bootstrap interval is just [min, max] of their two means, "
                 "not a 95 % interval")
    if n_patients < MIN_PATIENTS_FOR_P:
        text += (f"; {n_patients} patient(s) < {MIN_PATIENTS_FOR_P}: the intervals are "
                 "descriptive and no p-value is given (an exact two-sided Wilcoxon test on "
                 f"{n_patients} patient means cannot reach p < 0.05)")
    return text


PAIRED_TEXT = ("paired Wilcoxon signed-rank test on the per-patient mean differences "
               "(two-sided, scipy.stats.wilcoxon; patients are the unit, slices of one patient "
               f"are correlated), only from {MIN_PATIENTS_FOR_P} patients on")


# --- CT-number accuracy (numpy) -----------------------------------------------------------------
# Tissue bands by full-dose HU, [low, high). Fat and soft tissue: the adipose (-190..-30 HU) and
# skeletal-muscle (-29..+150 HU) ranges of Mitsiopoulos et al., J Appl Physiol 85 (1998) 115;
# contrast-enhanced: above unenhanced soft tissue up to 400 HU, which holds the enhanced aorta and
# organs of portal-venous abdominal CT (Bae, Radiology 256 (2010) 32); bone: above 400 HU
# (cortical bone; trabecular bone of 150-400 HU falls in "contrast": the bands are by HU only).
HU_BANDS = {"fat": (-190.0, -30.0), "soft": (-30.0, 150.0), "contrast": (150.0, 400.0),
            "bone": (400.0, ctio.HU_MAX + 1.0)}
BAND_ERODE_PX = 2  # band masks eroded: edge blur of a neighbour is not a CT-number shift
BIAS_FIELDS = ("bias_all", *(f"bias_{b}" for b in HU_BANDS))
BIAS_TEXT = ("CT-number bias: mean (image - full dose) in HU over the pixels whose full-dose HU "
             "lies in a band (fat [-190, -30), soft tissue [-30, 150), contrast-enhanced "
             "[150, 400), bone >= 400; masks eroded by "
             f"{BAND_ERODE_PX} px; 'all' = the four bands), unclipped HU; mean over slices")


def hu_bias(image_hu: np.ndarray, ref_hu: np.ndarray) -> dict[str, Optional[float]]:
    """Mean error (HU) of ``image_hu`` against the full dose ``ref_hu`` in each ``HU_BANDS``
    band of the full dose (masks eroded by BAND_ERODE_PX) and over all bands together;
    None for a band with no pixel."""
    from scipy.ndimage import binary_erosion

    ref = np.asarray(ref_hu, np.float64)
    err = np.asarray(image_hu, np.float64) - ref
    masks = {b: binary_erosion((ref >= lo) & (ref < hi), iterations=BAND_ERODE_PX)
             for b, (lo, hi) in HU_BANDS.items()}
    masks = {"all": np.logical_or.reduce(list(masks.values())), **masks}
    return {f"bias_{b}": float(err[m].mean()) if m.any() else None for b, m in masks.items()}

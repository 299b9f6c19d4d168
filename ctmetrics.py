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
    """One published way of scoring LDCT denoising: HU clipped to ``window``, shifted to
    ``[0, high - low]`` and, when ``levels`` is set, scaled to and rounded at ``0..levels`` (an
    8-bit image); PSNR and SSIM use the window width as data range (scale-free, so "scaled to
    [0, 1], data range 1" is the same figure), RMSE is in HU of the (rounded) clipped image."""

    window: tuple[float, float]
    levels: Optional[int]
    convention: str
    source: str


METRIC_PROTOCOLS = {  # the one table of protocols (Myevaluation.py --protocol NAME)
    "redcnn": MetricProtocol(ctio.EVAL_WINDOW, None, "kept in HU",
                             "RED-CNN (Chen et al., IEEE TMI 2017) and most Mayo-2016 papers"),
    "dugan": MetricProtocol((-300.0, 300.0), None, "scaled to [0, 1] (PSNR and SSIM are "
                            "scale-free: the figures equal those in HU)",
                            "DU-GAN (Huang et al., IEEE TMI 2021)"),
    "corediff": MetricProtocol((-1000.0, 1000.0), 255,
                               "scaled to 8-bit and rounded to integers",
                               "CoreDiff (Gao et al., IEEE TMI 2023)"),
    "full": MetricProtocol(FULL_RANGE, None, "kept in HU",
                           "this project's normalisation range"),
}
DEFAULT_PROTOCOL = "redcnn"


def protocol_text(name: str = DEFAULT_PROTOCOL) -> str:
    """The one-line protocol printed under every table of ``name``, built from the constants."""
    p = METRIC_PROTOCOLS[name]
    lo, hi = p.window
    levels = f" 0..{p.levels}" if p.levels else ""
    return (f"protocol {name}: HU clipped to [{lo:g}, {hi:g}], {p.convention}{levels}; PSNR and "
            f"SSIM data range {hi - lo:g} HU, SSIM {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} "
            f"Gaussian sigma {SSIM_SIGMA:g} (K1 {SSIM_K1:g}, K2 {SSIM_K2:g}, valid region); "
            f"RMSE in HU; whole slices; source: {p.source}")


PROTOCOL = protocol_text(DEFAULT_PROTOCOL)
PROTOCOLS = tuple(METRIC_PROTOCOLS)  # every protocol is scored; --protocol picks the tables
METRICS = ("psnr", "ssim", "rmse")
PAIRED = (("cncl", "ldct"), ("cncl", "gaussian"))  # paired tests: CNCL vs the input and baseline

# Statistics.
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


def _ssim_graph(x, y, data_range):
    tf = _tf()
    half = data_range / 2.0
    x = tf.cast(x, tf.float32) - half
    y = tf.cast(y, tf.float32) - half
    maps = tf.concat([x, y, x * y, tf.square(x) + tf.square(y)], axis=0)
    maps = _gaussian_pass(_gaussian_pass(maps, 1), 2)
    mx, my, mxy, mss = tf.split(maps, 4, axis=0)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    cs = (2.0 * (mxy - mx * my) + c2) / (mss - tf.square(mx) - tf.square(my) + c2)
    mx, my = mx + half, my + half
    luminance = (2.0 * mx * my + c1) / (tf.square(mx) + tf.square(my) + c1)
    return tf.reduce_mean(luminance * cs, axis=[1, 2, 3])


_ssim_compiled = None


def ssim(x, y, data_range: float):
    """Per-image SSIM of ``(B, H, W, 1)`` float32 images in ``[0, data_range]``.

    Wang et al. (2004) with the ``SSIM_*`` Gaussian window over the valid region and no
    sample-covariance correction -- tf.image.ssim's and scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)`` definition.

    * Separable: the 11x11 window is two 1-D passes over the four moment maps stacked in one
      batch (22 instead of 121 taps per map).
    * Centred: images are shifted by ``-data_range / 2`` before the second moments, which keeps
      float32 cancellation in ``E[x^2] - E[x]^2`` ~20x below tf.image.ssim's.
    * CPU-independent: the passes are elementwise sums of shifted slices compiled by XLA, so
      TF_ENABLE_ONEDNN_OPTS=0 and 1 give the same bits (oneDNN convolutions round differently,
      and XLA's CPU convolution is slow).

    Pure TensorFlow (also inside tf.function / train_step); needs H, W >= the window.
    """
    global _ssim_compiled
    if _ssim_compiled is None:
        _ssim_compiled = _tf().function(_ssim_graph, jit_compile=True, autograph=False)
    tf = _tf()
    return _ssim_compiled(x, y, tf.cast(data_range, tf.float32))  # a tensor: one XLA compile


def hu_metrics(pred, ref, window: tuple[float, float] = ctio.EVAL_WINDOW,
               levels: Optional[int] = None) -> dict:
    """Per-image PSNR / SSIM / RMSE in a HU window: the project's one metric implementation.

    1. ``pred`` and ``ref`` are NORMALISED images ``(B, H, W, 1)``, mapped to HU with
       ``ctio.denormalize`` in float32.
    2. Both are clipped to ``window = (low, high)`` (default ``ctio.EVAL_WINDOW``) and shifted
       to ``[0, high - low]``; with ``levels`` (a ``METRIC_PROTOCOLS`` 8-bit protocol) they
       are also rounded to ``levels`` equal steps.
    3. ``psnr = 10 log10(L^2 / MSE)`` with ``L = high - low`` (tf.image.psnr; inf if equal).
    4. ``ssim``: :func:`ssim` with data range ``L`` (equal to tf.image.ssim and scikit-image).
    5. ``rmse`` in HU of the clipped (and rounded) images.

    Pure TensorFlow; usable inside ``tf.function`` / ``train_step``. Images need H, W >= 11.

    Returns:
        ``{"psnr": (B,), "ssim": (B,), "rmse": (B,)}`` float32 tensors.
    """
    tf = _tf()
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    width = high - low

    def windowed(img):
        hu = ctio.denormalize(tf.cast(img, tf.float32))
        w = tf.clip_by_value(hu, low, high) - low
        if levels:
            step = width / float(levels)
            w = tf.round(w / step) * step
        return w

    pred_w, ref_w = windowed(pred), windowed(ref)
    psnr = tf.image.psnr(pred_w, ref_w, max_val=width)
    rmse = tf.sqrt(tf.reduce_mean(tf.square(pred_w - ref_w), axis=[-3, -2, -1]))
    return {"psnr": tf.cast(psnr, tf.float32), "ssim": ssim(pred_w, ref_w, width),
            "rmse": tf.cast(rmse, tf.float32)}


_metric_fn = None


def _metrics_tf():
    """One tf.function scoring a batch in every protocol (shape-generic: no retracing per size)."""
    global _metric_fn
    if _metric_fn is None:
        tf = _tf()

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)] * 2,
                     autograph=False)  # plain Python loops only; no re-reading of the source
        def fn(pred, ref):
            return {name: hu_metrics(pred, ref, window=p.window, levels=p.levels)
                    for name, p in METRIC_PROTOCOLS.items()}

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


def paired_tests(results: list[dict]) -> dict:
    """CNCL vs LDCT and vs Gaussian (``PAIRED``), per protocol and metric: mean per-slice
    difference with its bootstrap interval and a paired Wilcoxon signed-rank test
    (scipy.stats.wilcoxon, two-sided; exact for up to 50 slices without ties, else the normal
    approximation; p = 1 when every difference is zero)."""
    from scipy.stats import wilcoxon

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
                if len(diff) < 2:
                    p = None
                elif np.all(diff == 0):
                    p = 1.0
                else:  # exact null distribution unless ties or zeros (then the normal one)
                    mags = np.abs(diff)
                    exact = len(diff) <= 50 and mags.all() and len(np.unique(mags)) == len(diff)
                    p = float(wilcoxon(diff, method="exact" if exact else "asymptotic").pvalue)
                ci = bootstrap_ci(diff, pats)
                out.setdefault(f"{a}-{b}", {}).setdefault(r, {})[m] = {
                    "mean_diff": float(diff.mean()) if len(diff) else None,
                    "ci95": ci, "wilcoxon_p": p, "n": int(len(diff))}
    return out

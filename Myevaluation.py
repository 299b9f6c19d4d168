"""Score Mytest.py outputs against the full-dose references: PSNR, SSIM, RMSE, noise texture.

Usage::

    python Myevaluation.py --pred OUT [--data PATH] [--layout ...] [--gaussian-sigma 0.7]
                           [--protocol redcnn|dugan|corediff|full|all]
    python Myevaluation.py --compare OUT [OUT ...] [--protocol ...]
    python Myevaluation.py --nps-sim FD_PATH --run RUN [--out DIR] [--dose 0.25]
    python Myevaluation.py --qa QA_DIR --run RUN [--out DIR]   # the Mysimulate.py --qa phantom

Reads ``OUT/manifest.csv`` (written by Mytest.py) and, for every slice with a full-dose
reference, scores three methods against it:

* ``ldct``      the low-dose input itself,
* ``gaussian``  a Gaussian-filter baseline of the input (``scipy.ndimage.gaussian_filter``,
                sigma ``--gaussian-sigma`` pixels, reflect borders),
* ``cncl``      the network output (the float32 HU ``pred_npy`` of the manifest, not the PNG).

Metrics come from :func:`hu_metrics` (the project's single metric implementation; Mymodel
imports it for validation) in every protocol of ``ctio.METRIC_PROTOCOLS``. The noise texture
(flat-ROI noise std and AAPM TG-233 NPS, :func:`find_flat_rois`, :func:`nps_2d`) is measured on
the same ROIs for the three methods and the full dose. Writes ``OUT/metrics.csv`` (per slice and
method), ``OUT/metrics.json`` (overall and per patient: means, sample std, bootstrap intervals,
paired Wilcoxon tests, radial NPS curves) and ``OUT/nps/<patient>_nps.png``; prints one table per
``--protocol``, each followed by its protocol line (``ctio.protocol_text``).

References come from the manifest's ``fd_path``; with ``--data`` they are re-discovered there
instead (matched by patient and slice id, as Mytest.py names them), e.g. when Mytest.py ran on
low-dose-only data.

``--compare`` reads the ``metrics.json`` of several evaluated folders (no TensorFlow, nothing
recomputed) and prints one row per run, with its training steps and minutes from the run's
``config.json`` / ``history.csv``: the ablation table. The folders must have scored the same
slices, or the rows would not be comparable; a mismatch is an error naming the folder.

``--nps-sim`` measures the noise-only NPS of a run on two simulated low-dose realisations of
each full-dose slice (:func:`nps_sim`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

import ctdata
import ctio
import ctrun

METHODS = ("ldct", "gaussian", "cncl")  # scored against the full-dose reference
NOISE_METHODS = (*METHODS, "fd")  # noise texture is measured on the reference too
PROTOCOLS = tuple(ctio.METRIC_PROTOCOLS)  # every protocol is scored; --protocol picks the tables
METRICS = ("psnr", "ssim", "rmse")
NOISE_FIELDS = ("n_rois", "noise_std", "nps_peak", "nps_mean_freq")
CSV_FIELDS = ("patient", "slice_id", "method",
              *(f"{m}_{p}" for p in PROTOCOLS for m in METRICS), *NOISE_FIELDS)
PAIRED = (("cncl", "ldct"), ("cncl", "gaussian"))  # paired tests: CNCL vs the input and baseline
_POSITION_TOL_MM = 0.01

# Flat soft-tissue ROI rule for the noise texture (see find_flat_rois).
ROI_SIZE = 32  # px, square
ROI_HU = (-100.0, 150.0)  # full-dose mean of a soft-tissue ROI
ROI_FLAT_SIGMA_PX = 4.0  # "large scale": the full dose smoothed by this Gaussian ...
ROI_FLAT_HU = 8.0  # ... departs from its fitted plane by at most this std (HU) inside the ROI

# Statistics.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

def method_label(method: str, sigma: float) -> str:
    return {"ldct": "LDCT (input)", "gaussian": f"Gaussian filter (sigma {sigma:g})",
            "cncl": "CNCL", "fd": "full dose (reference)"}[method]


# --- Inputs (no TensorFlow) ---------------------------------------------------------------------
def read_manifest(out: Path) -> list[dict]:
    """The rows of OUT/manifest.csv (ctrun.read_manifest), which must list slices."""
    if not out.is_dir():
        raise ctio.CTDataError(f"{out}: no such folder (give the --out folder of Mytest.py)")
    if not (out / ctrun.MANIFEST).is_file():
        raise ctio.CTDataError(f"no {ctrun.MANIFEST} in {out}; run Mytest.py first")
    rows = ctrun.read_manifest(out)
    if not rows:
        raise ctio.CTDataError(f"{out / ctrun.MANIFEST}: lists no slices; run Mytest.py first")
    return rows


def attach_references(rows: list[dict], data: Optional[str], layout: Optional[str]) -> None:
    """Replace each row's ``fd_path`` by the reference found under ``data`` (same patient and
    slice id); rows without one get an empty ``fd_path``."""
    ds = ctdata.discover(data, layout, single_role="fd")
    found = {(r.patient, r.slice_id): r for r in ds.records if r.fd_path}
    if not found:
        raise ctio.CTDataError(f"{data}: no full-dose reference slices found")
    matched = 0
    for row in rows:
        rec = found.get((row["patient"], row["slice_id"]))
        row["fd_path"] = ""
        if rec is None:
            continue
        if Path(rec.fd_path).resolve() == Path(row["ld_path"]).resolve():
            raise ctio.CTDataError(f"{rec.fd_path}: --data gives the low-dose input itself as "
                                   "the reference; point --data at the full-dose data")
        pos = row.get("position", "")
        if ds.layout in ("mayo", "dicom") and pos:
            try:
                if abs(float(pos) - rec.position) > _POSITION_TOL_MM:
                    raise ctio.CTDataError(
                        f"{rec.fd_path}: slice position {rec.position:g} mm does not match "
                        f"{row['patient']}/{row['slice_id']} of the manifest at {pos} mm")
            except ValueError:
                pass
        row["fd_path"] = rec.fd_path
        matched += 1
    if not matched:
        raise ctio.CTDataError(f"{data}: none of its references matches a manifest slice "
                               "(by patient and slice id); is it the dataset Mytest.py ran on?")


def gaussian_baseline(ld_hu: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-filtered LD in HU (scipy.ndimage.gaussian_filter, reflect borders)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(ld_hu, np.float32), sigma=float(sigma), mode="reflect")


# --- Noise texture: flat ROIs and the noise power spectrum (no TensorFlow) ---------------------
def pixel_spacing_mm(header) -> Optional[float]:
    """Mean DICOM PixelSpacing in mm, or None when unknown (npy / tif slices)."""
    spacing = None if header is None else header.get("PixelSpacing")
    return float(np.mean([float(v) for v in spacing])) if spacing else None


def _plane_residual(rois: np.ndarray) -> np.ndarray:
    """(N, n, m) ROIs minus their least-squares planes a + b*x + c*y (float64)."""
    n, m = rois.shape[1:]
    yy, xx = np.mgrid[:n, :m]
    design = np.stack([np.ones(n * m), xx.ravel(), yy.ravel()], axis=1)
    flat = rois.reshape(len(rois), -1).astype(np.float64)
    coef = flat @ np.linalg.pinv(design).T
    return (flat - coef @ design.T).reshape(rois.shape)


def find_flat_rois(fd_hu: np.ndarray, size: int = ROI_SIZE) -> list[tuple[int, int]]:
    """Top-left corners of the flat soft-tissue ROIs of a full-dose slice.

    The slice is tiled by non-overlapping ``size`` x ``size`` squares from its top-left corner;
    a square is kept when it lies wholly inside the body (``Mysimulate.body_mask``: FD > -500 HU,
    eroded), its FD mean is within ``ROI_HU`` (soft tissue) and it is flat at large scale: the FD
    smoothed by a Gaussian of ``ROI_FLAT_SIGMA_PX`` px departs from its fitted plane by at most
    ``ROI_FLAT_HU`` (std, HU). The same corners then serve every method of that slice.
    """
    from scipy.ndimage import gaussian_filter

    import Mysimulate

    fd = np.asarray(fd_hu, np.float32)
    body = Mysimulate.body_mask(fd)
    smooth = gaussian_filter(fd, ROI_FLAT_SIGMA_PX, mode="reflect")
    corners = [(y, x) for y in range(0, fd.shape[0] - size + 1, size)
               for x in range(0, fd.shape[1] - size + 1, size)
               if body[y:y + size, x:x + size].all()]
    if not corners:
        return []
    means = np.array([fd[y:y + size, x:x + size].mean() for y, x in corners])
    flat = _plane_residual(np.stack([smooth[y:y + size, x:x + size] for y, x in corners]))
    keep = (means >= ROI_HU[0]) & (means <= ROI_HU[1]) & (flat.std(axis=(1, 2)) <= ROI_FLAT_HU)
    return [c for c, k in zip(corners, keep) if k]


def cut_rois(image: np.ndarray, corners: list, size: int = ROI_SIZE) -> np.ndarray:
    """(N, size, size) ROIs of ``image`` at ``corners``."""
    return np.stack([image[y:y + size, x:x + size] for y, x in corners])


def nps_power(rois: np.ndarray) -> np.ndarray:
    """Sum over ROIs of |DFT(ROI - fitted plane)|^2 (n, m), unshifted: the streaming part of
    :func:`nps_2d` (sums of several slices add up)."""
    return np.sum(np.abs(np.fft.fft2(_plane_residual(rois))) ** 2, axis=0)


def nps_2d(power_sum: np.ndarray, n_rois: int, pixel_mm: Optional[float]) -> np.ndarray:
    """AAPM TG-233 noise power spectrum from :func:`nps_power`'s sum over ``n_rois`` ROIs:
    NPS(fx, fy) = dx dy / (Nx Ny) <|DFT(ROI - fit)|^2>, fftshifted (zero frequency centred);
    HU^2 mm^2 when ``pixel_mm`` is known, else HU^2 px^2. Integrates to the noise variance."""
    ny, nx = power_sum.shape
    d = pixel_mm or 1.0
    return np.fft.fftshift(power_sum / n_rois * d * d / (nx * ny))


def nps_frequencies(shape: tuple[int, int], pixel_mm: Optional[float]):
    """(fy, fx) axes of :func:`nps_2d` in cycles/mm (cycles/pixel when ``pixel_mm`` is None)."""
    d = pixel_mm or 1.0
    return tuple(np.fft.fftshift(np.fft.fftfreq(n, d)) for n in shape)


def radial_nps(nps: np.ndarray, pixel_mm: Optional[float]) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS: (frequency, mean NPS) in annuli one frequency step wide, from 0 to
    the Nyquist frequency (square ROIs)."""
    fy, fx = nps_frequencies(nps.shape, pixel_mm)
    step = fx[1] - fx[0]
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    ring = np.rint(radius / step).astype(int).ravel()
    sums = np.bincount(ring, weights=nps.ravel())
    counts = np.bincount(ring)
    n = min(nps.shape) // 2 + 1
    return np.arange(n) * step, sums[:n] / np.maximum(counts[:n], 1)


def nps_summary(nps: np.ndarray, pixel_mm: Optional[float]) -> dict:
    """Noise std (sqrt of the NPS integral), radial-NPS peak frequency and the NPS-weighted
    mean spatial frequency of a 2-D NPS."""
    fy, fx = nps_frequencies(nps.shape, pixel_mm)
    area = (fx[1] - fx[0]) * (fy[1] - fy[0])
    total = float(nps.sum())
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    freq, radial = radial_nps(nps, pixel_mm)
    return {"noise_std": math.sqrt(total * area),
            "nps_peak": float(freq[int(np.argmax(radial))]),
            "nps_mean_freq": float((radius * nps).sum() / total) if total > 0 else 0.0}


class NoiseAccumulator:
    """Per patient and method: summed ROI power spectra (memory: one ROI-sized array each)."""

    def __init__(self):
        self.power: dict[tuple[str, str], np.ndarray] = {}
        self.count: dict[tuple[str, str], int] = {}
        self.pixel_mm: dict[str, Optional[float]] = {}

    def add(self, patient: str, method: str, power: np.ndarray, n: int,
            pixel_mm: Optional[float]) -> None:
        key = (patient, method)
        self.power[key] = self.power.get(key, 0.0) + power
        self.count[key] = self.count.get(key, 0) + n
        self.pixel_mm.setdefault(patient, pixel_mm)

    def curves(self, patient: str) -> dict:
        """{"freq": [...], "unit": ..., method: {"radial": [...], **nps_summary, "n_rois"}}."""
        px = self.pixel_mm.get(patient)
        out: dict = {"unit": "cycles/mm" if px else "cycles/pixel", "pixel_mm": px}
        for method in NOISE_METHODS:
            if (patient, method) not in self.power:
                continue
            n = self.count[patient, method]
            nps = nps_2d(self.power[patient, method], n, px)
            freq, radial = radial_nps(nps, px)
            out["freq"] = [float(f) for f in freq]
            out[method] = {"radial": [float(v) for v in radial], "n_rois": n,
                           **nps_summary(nps, px)}
        return out


def slice_noise(images: dict[str, np.ndarray], fd: np.ndarray, pixel_mm: Optional[float]):
    """Noise figures of each method's image on the flat ROIs of ``fd``.

    Returns ({method: {n_rois, noise_std, nps_peak, nps_mean_freq}}, {method: power sum}, n);
    figures are None when the slice has no flat ROI."""
    corners = find_flat_rois(fd)
    figures, powers = {}, {}
    for method, img in images.items():
        if not corners:
            figures[method] = {"n_rois": 0, "noise_std": None, "nps_peak": None,
                               "nps_mean_freq": None}
            continue
        powers[method] = nps_power(cut_rois(img, corners))
        nps = nps_2d(powers[method], len(corners), pixel_mm)
        figures[method] = {"n_rois": len(corners), **nps_summary(nps, pixel_mm)}
    return figures, powers, len(corners)


def plot_radial_nps(path: Path, curves: dict, title: str, sigma: float) -> None:
    """Radial NPS of every method in ``curves`` (NoiseAccumulator.curves) as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method in curves.get("methods", NOISE_METHODS):
        if method in curves:
            ax.plot(curves["freq"], curves[method]["radial"], label=method_label(method, sigma))
    area = "mm$^2$" if curves["unit"] == "cycles/mm" else "px$^2$"
    ax.set(xlabel=f"spatial frequency ({curves['unit']})", ylabel=f"NPS (HU$^2$ {area})",
           title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with ctio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --- Metrics (TensorFlow, imported lazily: `import Myevaluation` stays TF-free) -----------------
def _tf():
    return ctio.import_tensorflow()


def gaussian_taps(size: int = ctio.SSIM_FILTER_SIZE, sigma: float = ctio.SSIM_SIGMA) -> np.ndarray:
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
    c1 = (ctio.SSIM_K1 * data_range) ** 2
    c2 = (ctio.SSIM_K2 * data_range) ** 2
    cs = (2.0 * (mxy - mx * my) + c2) / (mss - tf.square(mx) - tf.square(my) + c2)
    mx, my = mx + half, my + half
    luminance = (2.0 * mx * my + c1) / (tf.square(mx) + tf.square(my) + c1)
    return tf.reduce_mean(luminance * cs, axis=[1, 2, 3])


_ssim_compiled = None


def ssim(x, y, data_range: float):
    """Per-image SSIM of ``(B, H, W, 1)`` float32 images in ``[0, data_range]``.

    Wang et al. (2004) with the ``ctio.SSIM_*`` Gaussian window over the valid region and no
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
       to ``[0, high - low]``; with ``levels`` (a ``ctio.METRIC_PROTOCOLS`` 8-bit protocol) they
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
                    for name, p in ctio.METRIC_PROTOCOLS.items()}

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


def _load_group(rows: list[dict], out: Path, sigma: float):
    """Decode the slices of ``rows`` -> (ld, gaussian, cncl, ref) stacks (B, H, W) in HU and the
    pixel spacings (mm or None) from the input headers."""
    lds, preds, refs, spacings = [], [], [], []
    for row in rows:
        pred_path = out / row["pred_npy"]
        if not pred_path.is_file():
            raise ctio.CTDataError(f"{pred_path}: prediction listed in the manifest is missing; "
                                   "rerun Mytest.py")
        try:
            pred = np.load(pred_path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError, EOFError) as e:
            raise ctio.CTDataError(f"{pred_path}: unreadable prediction ({e})") from None
        ld, header = ctio.read_slice(row["ld_path"])
        ref = ctio.read_slice(row["fd_path"])[0]
        if not (pred.shape == ld.shape == ref.shape):
            raise ctio.CTDataError(f"{pred_path}: shape {pred.shape} differs from the input "
                                   f"{ld.shape} or the reference {row['fd_path']} {ref.shape}")
        lds.append(ld)
        preds.append(pred)
        refs.append(ref)
        spacings.append(pixel_spacing_mm(header))
    ld = np.stack(lds)
    gauss = np.stack([gaussian_baseline(x, sigma) for x in lds])
    return ld, gauss, np.stack(preds), np.stack(refs), spacings


def _pred_shape(path: Path) -> tuple:
    """Shape of a prediction from its .npy header (no pixels read)."""
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except FileNotFoundError:
        raise ctio.CTDataError(f"{path}: prediction listed in the manifest is missing; rerun "
                               "Mytest.py") from None
    except (OSError, ValueError, EOFError) as e:
        raise ctio.CTDataError(f"{path}: unreadable prediction ({e})") from None


def _score_group(group: list[dict], out: Path, sigma: float,
                 noise: NoiseAccumulator) -> list[dict]:
    """Result rows (metrics and noise figures) of one batch of same-size slices."""
    ld, gauss, pred, ref, spacings = _load_group(group, out, sigma)
    n = len(group)
    scores = slice_metrics(np.concatenate([ld, gauss, pred]), np.concatenate([ref] * 3))
    results = []
    for i, row in enumerate(group):
        images = {"ldct": ld[i], "gaussian": gauss[i], "cncl": pred[i], "fd": ref[i]}
        figures, powers, n_rois = slice_noise(images, ref[i], spacings[i])
        for method, power in powers.items():
            noise.add(row["patient"], method, power, n_rois, spacings[i])
        for k, method in enumerate(NOISE_METHODS):
            res = {"patient": row["patient"], "slice_id": row["slice_id"], "method": method,
                   **figures[method]}
            for r in PROTOCOLS:
                for m in METRICS:
                    res[f"{m}_{r}"] = float(scores[r][m][k * n + i]) if k < 3 else None
            results.append(res)
    return results


def evaluate(rows: list[dict], out: Path, sigma: float, batch: int = 8,
             noise: Optional[NoiseAccumulator] = None) -> list[dict]:
    """Score every row (all must have ``fd_path``); batches group consecutive same-size slices,
    so memory holds one batch. Prints progress and slices/s.

    Returns one dict per slice and method (``NOISE_METHODS``; the ``fd`` rows carry only the
    noise figures): patient, slice_id, method, psnr_redcnn, ..., n_rois, noise_std, ...
    """
    import time

    import Mysimulate

    noise = NoiseAccumulator() if noise is None else noise
    results: list[dict] = []
    group: list[dict] = []
    shape = None
    progress = Mysimulate.Progress(len(rows), "scoring")
    start, done = time.time(), 0

    def flush() -> None:
        nonlocal done
        if group:
            results.extend(_score_group(group, out, sigma, noise))
            done += len(group)
            progress.update(done)
            group.clear()

    for row in rows:
        size = _pred_shape(out / row["pred_npy"])
        if group and (size != shape or len(group) >= batch):
            flush()
        shape = size
        group.append(row)
    flush()
    print(f"scored {done} slices in {time.time() - start:.1f} s "
          f"({done / max(time.time() - start, 1e-9):.2f} slices/s)")
    order = {m: i for i, m in enumerate(NOISE_METHODS)}
    results.sort(key=lambda d: order[d["method"]])  # stable: methods, then manifest order
    return results


# --- Statistics ---------------------------------------------------------------------------------
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


def _stats(values: list, patients: list) -> dict:
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


def summarize(results: list[dict]) -> dict:
    """{method: {protocol: {metric: stats}, "noise": {field: stats}}} over ``results``."""
    out = {}
    for method in NOISE_METHODS:
        sel = [d for d in results if d["method"] == method]
        pats = [d["patient"] for d in sel]
        out[method] = {"noise": {f: _stats([d[f] for d in sel], pats) for f in NOISE_FIELDS[1:]}}
        if method in METHODS:
            out[method].update({r: {m: _stats([d[f"{m}_{r}"] for d in sel], pats)
                                    for m in METRICS} for r in PROTOCOLS})
    return out


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


# --- Tables -------------------------------------------------------------------------------------
def _ci(stats: dict, digits: int) -> str:
    """``mean [low, high]`` (the bootstrap interval) or ``mean`` alone."""
    if stats is None or stats.get("mean") is None:
        return "inf" if stats and stats.get("n") else ""
    text = f"{stats['mean']:.{digits}f}"
    ci = stats.get("ci95")
    if ci and None not in ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _interval_note(report: dict) -> str:
    unit = "patients" if report["n_patients"] > 1 else "slices (one patient)"
    return (f"n = {report['n_slices']} slices, {report['n_patients']} patient(s); mean over "
            f"slices [{CONFIDENCE:.0%} bootstrap interval, {BOOTSTRAP_RESAMPLES} resamples of "
            f"{unit}]")


def markdown_table(overall: dict, sigma: float, protocol: str = ctio.DEFAULT_PROTOCOL) -> str:
    """Metric table of one protocol, with intervals, followed by the protocol line."""
    lines = ["| method | PSNR (dB) | SSIM | RMSE (HU) |", "|---|---|---|---|"]
    for method in METHODS:
        s = overall[method][protocol]
        lines.append(f"| {method_label(method, sigma)} | {_ci(s['psnr'], 2)} | "
                     f"{_ci(s['ssim'], 4)} | {_ci(s['rmse'], 2)} |")
    return "\n".join([*lines, "", ctio.protocol_text(protocol)])


def paired_table(tests: dict, protocol: str) -> str:
    """CNCL minus LDCT / Gaussian: mean difference [interval] and Wilcoxon p, per metric."""
    lines = ["| paired (per slice) | Δ PSNR (dB) | p | Δ SSIM | p | Δ RMSE (HU) | p |",
             "|---|---|---|---|---|---|---|"]
    for a, b in PAIRED:
        cells = []
        for m, digits in (("psnr", 2), ("ssim", 4), ("rmse", 2)):
            t = tests[f"{a}-{b}"][protocol][m]
            cells += [_ci({"mean": t["mean_diff"], "ci95": t["ci95"], "n": t["n"]}, digits),
                      "" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.2g}"]
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", "paired Wilcoxon signed-rank test over slices (two-sided, "
                      "scipy.stats.wilcoxon); Δ = first minus second method"])


def noise_table(overall: dict, sigma: float, unit: str) -> str:
    """Noise texture on the flat soft-tissue ROIs, with ratios to full dose."""
    fd = overall["fd"]["noise"]
    lines = [f"| method | ROI noise std (HU) | ratio to FD | NPS peak ({unit}) | "
             f"NPS mean freq ({unit}) | ratio to FD |", "|---|---|---|---|---|---|"]

    def ratio(s, key):
        a, b = s[key]["mean"], fd[key]["mean"]
        return f"{a / b:.2f}" if a is not None and b else ""

    for method in NOISE_METHODS:
        s = overall[method]["noise"]
        lines.append(f"| {method_label(method, sigma)} | {_ci(s['noise_std'], 1)} | "
                     f"{ratio(s, 'noise_std')} | {_ci(s['nps_peak'], 3)} | "
                     f"{_ci(s['nps_mean_freq'], 3)} | {ratio(s, 'nps_mean_freq')} |")
    return "\n".join([*lines, "", NOISE_PROTOCOL])


NOISE_PROTOCOL = (
    f"noise: {ROI_SIZE}x{ROI_SIZE} px ROIs tiled over each full-dose slice, kept when wholly in "
    f"the body, FD mean in [{ROI_HU[0]:g}, {ROI_HU[1]:g}] HU and FD smoothed by a Gaussian "
    f"(sigma {ROI_FLAT_SIGMA_PX:g} px) within {ROI_FLAT_HU:g} HU std of its plane; same ROIs for "
    "every method; per ROI a fitted plane is removed; NPS = dx dy / (Nx Ny) <|DFT|^2> (AAPM "
    "TG-233), std = sqrt(integral of the NPS), peak of the radial NPS, NPS-weighted mean frequency")


def write_outputs(out: Path, results: list[dict], report: dict) -> None:
    with ctio.atomic_path(out / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for d in results:
                w.writerow({k: (f"{d[k]:.6f}" if isinstance(d[k], float) else d[k])
                            for k in CSV_FIELDS})
    with ctio.atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


# --- Comparing evaluated runs (no TensorFlow) ----------------------------------------------------
def _read_report(out: Path) -> dict:
    path = out / "metrics.json"
    report = ctio.read_json(path, f"no metrics.json in {out}; run Myevaluation.py --pred {out} "
                            "first")
    try:
        report["overall"]["cncl"][ctio.DEFAULT_PROTOCOL]["psnr"]["mean"]  # noqa: B018
    except (KeyError, TypeError) as e:
        raise ctio.CTDataError(f"{path}: not a Myevaluation.py report ({e})") from None
    return report


def _scored_slices(out: Path) -> list[tuple[str, str]]:
    """The (patient, slice_id) pairs scored in ``out/metrics.csv``, sorted."""
    try:
        with open(out / "metrics.csv", newline="") as f:
            return sorted({(r["patient"], r["slice_id"]) for r in csv.DictReader(f)})
    except (OSError, KeyError, csv.Error) as e:
        raise ctio.CTDataError(f"{out / 'metrics.csv'}: unreadable ({e})") from None


def compare(outs: list[Path], protocol: str = ctio.DEFAULT_PROTOCOL) -> str:
    """Markdown table: LDCT input once, then the CNCL result of every folder in ``outs`` (a
    folder's ``metrics.json`` may be given for the folder), with bootstrap intervals."""
    outs = [o.parent if o.name == "metrics.json" and o.is_file() else o for o in outs]
    reports = [_read_report(o) for o in outs]
    slices = _scored_slices(outs[0])
    for o in outs[1:]:
        if _scored_slices(o) != slices:
            raise ctio.CTDataError(f"{o}: scored other slices than {outs[0]}; "
                                   "compare runs evaluated on the same slices")
    lines = [f"{len(slices)} slices: " + ", ".join(f"{p}:{s}" for p, s in slices), "",
             "| run | steps | train min | PSNR (dB) | SSIM | RMSE (HU) | gain vs input (dB) "
             "| ROI noise / FD | NPS mean freq. / FD |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = reports[0]["overall"]["ldct"][protocol]
    lines.append(f"| LDCT (input) | | | {_ci(base['psnr'], 2)} | {_ci(base['ssim'], 4)} "
                 f"| {_ci(base['rmse'], 2)} | | {_texture_ratios(reports[0], 'ldct')} |")
    for o, rep in zip(outs, reports):
        w = rep["overall"]["cncl"][protocol]
        runs, weights = rep.get("runs") or [], rep.get("weights") or []
        tr = ctrun.training_summary(runs[0] if len(runs) == 1 else None,
                                  weights[0] if len(weights) == 1 else None)
        name = Path(runs[0]).name if len(runs) == 1 else str(o)
        if tr:
            name += f" (epoch {tr['epochs']})"
        minutes = f"{tr['minutes']:.1f}" if "minutes" in tr else ""
        gain = rep.get("paired", {}).get("cncl-ldct", {}).get(protocol, {}).get("psnr")
        gain_text = (_ci({"mean": gain["mean_diff"], "ci95": gain["ci95"], "n": gain["n"]}, 2)
                     if gain else f"{w['psnr']['mean'] - base['psnr']['mean']:.2f}")
        lines.append(f"| {name} | {tr.get('steps', '')} | {minutes} | {_ci(w['psnr'], 2)} | "
                     f"{_ci(w['ssim'], 4)} | {_ci(w['rmse'], 2)} | {gain_text} | "
                     f"{_texture_ratios(rep, 'cncl')} |")
    return "\n".join(lines)


def _texture_ratios(report: dict, method: str) -> str:
    """``noise std / FD | NPS mean frequency / FD`` cells of ``method`` (blank without ROIs)."""
    overall = report["overall"]
    cells = []
    for key in ("noise_std", "nps_mean_freq"):
        try:
            value = overall[method]["noise"][key]["mean"] / overall["fd"]["noise"][key]["mean"]
        except (KeyError, TypeError, ZeroDivisionError):
            cells.append("")
            continue
        cells.append(f"{value:.2f}")
    return " | ".join(cells)


def zoom_figure(outs: list[Path], patient: str, slice_id: str, box: tuple[int, int, int, int],
                window=ctio.EVAL_WINDOW, scale: int = 3) -> np.ndarray:
    """LDCT | each folder's CNCL output | FD, cropped to ``box`` = (y0, y1, x0, x1) and enlarged
    ``scale`` times (nearest neighbour: pixels stay pixels), as one labelled uint8 image.

    Folders are Mytest.py outputs of the same slice; the label of each is its run's name."""
    import cv2

    def crop(hu: np.ndarray) -> np.ndarray:
        y0, y1, x0, x1 = box
        part = ctio.window_to_uint8(hu[y0:y1, x0:x1], window)
        return cv2.resize(part, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)

    panels = []
    for k, out in enumerate(outs):
        rows = {(r["patient"], r["slice_id"]): r for r in read_manifest(out)}
        row = rows.get((patient, slice_id))
        if row is None:
            raise ctio.CTDataError(f"{out}: no slice {patient}:{slice_id} in its manifest")
        if k == 0:
            panels.append((crop(ctio.read_slice(row["ld_path"])[0]), "LDCT"))
        label = Path(row.get("run") or out).name
        panels.append((crop(np.load(out / row["pred_npy"])), label))
        if k == len(outs) - 1:
            panels.append((crop(ctio.read_slice(row["fd_path"])[0]), "full dose"))
    tiles = []
    for gray, text in panels:
        rgb = np.repeat(gray[..., None], 3, axis=2)
        ctio.label_panel(rgb, text)
        tiles += [rgb, np.full((rgb.shape[0], 3, 3), 128, np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


# --- Noise-only NPS with the simulator (--nps-sim) ----------------------------------------------
def _noise_rois(noise: np.ndarray, fd: np.ndarray, size: int = ROI_SIZE) -> list:
    """Corners of the ``size`` x ``size`` ROIs, on a grid of half-ROI steps (50 % overlap, as
    TG-233 allows), that lie wholly inside the body of ``fd`` (the noise-only image has no
    anatomy, so no flatness rule is needed)."""
    import Mysimulate

    body = Mysimulate.body_mask(fd)
    step = size // 2
    return [(y, x) for y in range(0, fd.shape[0] - size + 1, step)
            for x in range(0, fd.shape[1] - size + 1, step) if body[y:y + size, x:x + size].all()]


def nps_sim(fd_path: str, run: Optional[str], out: Optional[str], *, layout: Optional[str] = None,
            dose: float = 0.25, seed: int = 0, max_slices: Optional[int] = None,
            batch: int = 4) -> dict:
    """Noise-only NPS: per full-dose slice two independent simulated low-dose realisations
    (Mysimulate.simulate_pair_from_fd, seeds (seed, slice, 1) and (seed, slice, 2)), both
    denoised by the run's generator (Mytest's loader and Denoiser); the NPS of
    (D(LD1) - D(LD2)) / sqrt(2) over body ROIs, beside (LD1 - LD2) / sqrt(2) for the input.

    Writes OUT/nps_sim.json and OUT/nps_sim.png (OUT defaults to RUN/nps_sim); returns the
    report."""
    import time

    import Mysimulate
    import Mytest

    ds = ctdata.discover(fd_path, layout, single_role="fd")
    records = [r for r in ds.records if r.fd_path][:max_slices]
    if not records:
        raise ctio.CTDataError(f"{fd_path}: no full-dose slices found")
    run_dir, model, weights = Mytest.resolve_run(run)
    out_dir = Path(out) if out else run_dir / "nps_sim"
    denoise = Mytest.Denoiser(Mytest.load_generator(model, weights), int(model["depth"]), batch)
    acc = NoiseAccumulator()
    progress = Mysimulate.Progress(len(records), "nps-sim")
    start = time.time()
    for i, rec in enumerate(records):
        fd, header = ctio.read_slice(rec.fd_path)
        px = Mysimulate.pixel_size_mm(header, fd.shape, None)
        lds = [Mysimulate.simulate_pair_from_fd(fd, dose, px, (seed, i, k)) for k in (1, 2)]
        dens = denoise(lds)
        corners = _noise_rois(fd, fd)
        if corners:
            spacing = pixel_spacing_mm(header)
            for method, (a, b) in (("ldct", lds), ("cncl", dens)):
                diff = (np.asarray(a, np.float64) - b) / math.sqrt(2.0)
                acc.add("all", method, nps_power(cut_rois(diff, corners)), len(corners), spacing)
        progress.update(i + 1)
    elapsed = time.time() - start
    print(f"nps-sim: {len(records)} slices in {elapsed:.1f} s "
          f"({len(records) / max(elapsed, 1e-9):.2f} slices/s)")
    if not acc.count:
        raise ctio.CTDataError(f"{fd_path}: no {ROI_SIZE}x{ROI_SIZE} ROI fits inside the body")
    curves = acc.curves("all")
    report = {"fd_path": str(Path(fd_path).resolve()), "run": str(run_dir.resolve()),
              "weights": str(weights), "dose": dose, "seed": seed, "n_slices": len(records),
              "roi_size": ROI_SIZE, "definition": NPS_SIM_PROTOCOL, **curves}
    out_dir.mkdir(parents=True, exist_ok=True)
    with ctio.atomic_path(out_dir / "nps_sim.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    plot_radial_nps(out_dir / "nps_sim.png", {**curves, "methods": ("ldct", "cncl")},
                    f"noise-only NPS, dose {dose:g}", 0.0)
    return report


NPS_SIM_PROTOCOL = (
    "noise-only NPS: two independent simulated low-dose realisations per full-dose slice; "
    "noise = (X1 - X2) / sqrt(2) for the input (ldct) and for the denoised pair (cncl); "
    f"{ROI_SIZE}x{ROI_SIZE} ROIs (50 % overlap) wholly inside the body (FD > -500 HU, eroded); "
    "plane removed; "
    "NPS = dx dy / (Nx Ny) <|DFT|^2> (AAPM TG-233)")


def nps_sim_table(report: dict) -> str:
    unit = report["unit"]
    lines = [f"| noise of | std (HU) | NPS peak ({unit}) | NPS mean freq ({unit}) | ROIs |",
             "|---|---|---|---|---|"]
    for method, label in (("ldct", "LDCT (simulated input)"), ("cncl", "CNCL output")):
        s = report[method]
        lines.append(f"| {label} | {s['noise_std']:.2f} | {s['nps_peak']:.3f} | "
                     f"{s['nps_mean_freq']:.3f} | {s['n_rois']} |")
    return "\n".join([*lines, "", NPS_SIM_PROTOCOL])


# --- Image-quality QA phantom (--qa) ------------------------------------------------------------
# Measurements on the phantom of Mysimulate.py --qa (see README "Image quality beyond PSNR"):
# task transfer function (TTF) from the radial edge of circular inserts, contrast-to-noise ratio,
# a non-prewhitening matched-filter (NPW) observer's d' and AUC, the NPS, all against dose.
QA_ESF_BIN_PX = 0.1  # radial ESF bins (oversampled: pixels at many sub-pixel distances)
QA_TTF_PAD = 4096  # LSF samples after zero padding (frequency step 1 / (4096 * 0.1 px))
QA_TTF_TAPER = 0.5  # Tukey window on the LSF: flat over the middle half, cosine (Hann) edges
QA_TTF_BOOTSTRAP = 50  # resamples of the realisations for the MTF50's standard deviation
QA_TTF_MIN_CNR_TOTAL = 15.0  # TTF reported as measurable from this total CNR on (see qa_ttf)
QA_ROI_PER_DIAMETER = 2.0  # d' ROIs: squares of 2 insert diameters
QA_CNR_CORE = 0.6  # CNR: mean over the central disc of 0.6 insert radii (edge blur excluded)
QA_NPS_MARGIN_MM = 4.0  # NPS ROIs keep this far from inserts and the body edge
QA_REFERENCE_DOSE = 0.25  # dose equivalence: the dose at which FBP matches CNCL at this dose
QA_WINDOW = (-40.0, 60.0)  # phantom.png: full dose | LDCT | CNCL, one realisation at 25 %
QA_PROTOCOL = (
    "TTF: mean image over the realisations; radial ESF around the insert's known centre in "
    f"{QA_ESF_BIN_PX:g} px bins out to 2 insert radii; LSF = dESF/dr (numpy.gradient) times a "
    f"Tukey window (alpha {QA_TTF_TAPER:g}); TTF = |FFT(LSF)| / |FFT(LSF)|(0); MTF50 / MTF10 = "
    "first crossing of 0.5 / 0.1 (linear interpolation), cycles/mm; 'n/m' where the total CNR "
    f"(CNR x sqrt(insert pixels x realisations)) is below {QA_TTF_MIN_CNR_TOTAL:g}; MTF50 sd: "
    f"bootstrap over the realisations ({QA_TTF_BOOTSTRAP} resamples, seed 0). "
    "CNR: (mean over the central 0.6-radius disc of the insert - the same disc at the ring's "
    "signal-absent positions) / pixel std of the signal-absent ROIs. "
    "d': non-prewhitening matched filter, template = mean signal-present ROI - mean "
    "signal-absent ROI, averaged over 1 px rings around the insert centre (ROI 2 diameters "
    "square; leave-one-realisation-out: the template never includes the scored realisation), "
    "d' = (mean t_SP - mean t_SA) / sqrt((var t_SP + "
    "var t_SA) / 2); AUC = Mann-Whitney U / (n_SP n_SA) (scipy.stats.mannwhitneyu); signal "
    "absent = the 8 background positions of the insert's ring in every realisation. "
    "Background structure: std of the realisation-mean image in uniform water with its "
    "remaining noise (noise variance / N) removed. "
    "NPS: noise = (X_k - mean_k X) * sqrt(N / (N - 1)), 32x32 ROIs (50 % overlap) in uniform "
    "water away from inserts, plane removed, AAPM TG-233 NPS. "
    "Dose equivalence: the FBP dose whose mean d' (over the 16 low-contrast inserts) equals "
    "CNCL's at 25 %, by linear interpolation of d' in log(dose) between ladder doses.")


def radial_esf(image: np.ndarray, centre_px, r_max_px: float,
               bin_px: float = QA_ESF_BIN_PX) -> tuple[np.ndarray, np.ndarray]:
    """Radial edge-spread function around ``centre_px`` (row, col): the mean pixel value in
    ``bin_px``-wide bins of distance up to ``r_max_px`` (bin centres, means); empty bins are
    filled by linear interpolation between their neighbours."""
    r0, c0 = (float(v) for v in centre_px)
    m = int(np.ceil(r_max_px)) + 1
    h, w = np.shape(image)
    ys = slice(max(int(r0) - m, 0), min(int(r0) + m + 1, h))
    xs = slice(max(int(c0) - m, 0), min(int(c0) + m + 1, w))
    yy, xx = np.mgrid[ys, xs]
    r = np.hypot(yy - r0, xx - c0).ravel()
    v = np.asarray(image, np.float64)[ys, xs].ravel()
    keep = r < r_max_px
    nbins = int(np.ceil(r_max_px / bin_px))
    idx = np.minimum((r[keep] / bin_px).astype(int), nbins - 1)
    sums = np.bincount(idx, weights=v[keep], minlength=nbins)
    counts = np.bincount(idx, minlength=nbins)
    centres = (np.arange(nbins) + 0.5) * bin_px
    full = counts > 0
    if full.sum() < 2:
        raise ValueError("too few pixels for a radial ESF")
    esf = np.interp(centres, centres[full], sums[full] / counts[full])
    return centres, esf


def ttf_from_esf(r_px: np.ndarray, esf: np.ndarray, edge_px: float, half_width_px: float,
                 pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """TTF of a radial ESF with its edge at ``edge_px``: the ESF over [edge - w, edge + w]
    differentiated (LSF), tapered by a Tukey window, zero-padded and Fourier transformed;
    normalised at zero frequency. Returns (frequency in cycles/mm up to the pixel Nyquist
    frequency, TTF)."""
    from scipy.signal.windows import tukey

    sel = (r_px >= edge_px - half_width_px) & (r_px <= edge_px + half_width_px)
    r, e = r_px[sel], esf[sel]
    if len(r) < 8:
        raise ValueError("edge window holds too few ESF samples")
    lsf = np.gradient(e, r) * tukey(len(r), QA_TTF_TAPER)
    spec = np.abs(np.fft.rfft(lsf, n=max(QA_TTF_PAD, len(lsf))))
    step = float(r[1] - r[0])
    freq = np.fft.rfftfreq(max(QA_TTF_PAD, len(lsf)), d=step * pixel_mm)
    nyquist = 0.5 / pixel_mm
    keep = freq <= nyquist + 1e-12
    return freq[keep], spec[keep] / spec[0] if spec[0] > 0 else spec[keep] * np.nan


def mtf_crossing(freq: np.ndarray, ttf: np.ndarray, level: float) -> Optional[float]:
    """First frequency where ``ttf`` falls to ``level`` (linear interpolation), or None."""
    below = np.nonzero(ttf <= level)[0]
    if not len(below) or below[0] == 0:
        return None
    i = below[0]
    f0, f1, t0, t1 = freq[i - 1], freq[i], ttf[i - 1], ttf[i]
    return float(f0 + (t0 - level) * (f1 - f0) / (t0 - t1)) if t0 != t1 else float(f1)


def qa_ttf(mean_image: np.ndarray, insert: dict, pixel_mm: float,
           noise_std: Optional[float] = None, n_images: int = 1) -> dict:
    """TTF of one circular insert on the (realisation-averaged) ``mean_image``.

    The ESF runs from the centre to two insert radii (at least 4 px past the edge), the LSF
    window is the edge +- one radius (at least 3 px). ``noise_std`` (pixel noise of one
    realisation) and ``n_images`` give the total CNR = |contrast| / noise_std *
    sqrt(insert pixels * n_images); below QA_TTF_MIN_CNR_TOTAL the curve is kept but flagged
    not measurable (MTF50 / MTF10 None)."""
    radius = float(insert["radius_px"])
    half = max(radius, 3.0)
    r, esf = radial_esf(mean_image, insert["centre_px"], radius + max(half, 4.0))
    freq, ttf = ttf_from_esf(r, esf, radius, half, pixel_mm)
    inside = esf[r < 0.6 * radius].mean() if (r < 0.6 * radius).any() else esf[0]
    outside = esf[r > radius + 0.6 * half].mean()
    contrast = float(inside - outside)
    if noise_std is None or noise_std <= 0:
        cnr_total = math.inf
    else:
        cnr_total = abs(contrast) / noise_std * math.sqrt(math.pi * radius ** 2 * n_images)
    ok = cnr_total >= QA_TTF_MIN_CNR_TOTAL
    return {"freq": freq, "ttf": ttf, "contrast_hu": contrast,
            "cnr_total": cnr_total if math.isfinite(cnr_total) else None, "measurable": ok,
            "mtf50": mtf_crossing(freq, ttf, 0.5) if ok else None,
            "mtf10": mtf_crossing(freq, ttf, 0.1) if ok else None}


def mtf50_bootstrap_sd(images: np.ndarray, insert: dict, pixel_mm: float,
                       resamples: int = QA_TTF_BOOTSTRAP) -> Optional[float]:
    """Bootstrap standard deviation of an insert's MTF50: the realisations resampled with
    replacement (seed 0), the TTF of each resample's mean image (only the insert's window is
    averaged). None with fewer than 4 realisations or when a resample has no MTF50."""
    if len(images) < 4:
        return None
    radius = float(insert["radius_px"])
    m = int(np.ceil(radius + max(radius, 4.0))) + 2
    r0, c0 = (int(v) for v in insert["centre_px"])
    crop = np.asarray(images[:, r0 - m:r0 + m + 1, c0 - m:c0 + m + 1], np.float64)
    local = {**insert, "centre_px": [m, m]}
    rng = np.random.default_rng(0)
    got = []
    for _ in range(resamples):
        mean = crop[rng.integers(0, len(crop), len(crop))].mean(axis=0)
        t = qa_ttf(mean, local, pixel_mm)
        if t["mtf50"] is None:
            return None
        got.append(t["mtf50"])
    return float(np.std(got, ddof=1))


def _square(image: np.ndarray, centre_px, side: int) -> np.ndarray:
    r0, c0 = (int(v) for v in centre_px)
    h = side // 2
    return image[..., r0 - h:r0 - h + side, c0 - h:c0 - h + side]


def qa_roi_side(insert: dict) -> int:
    """Side (px, odd, >= 5) of the d' ROIs of an insert: QA_ROI_PER_DIAMETER diameters."""
    side = int(round(QA_ROI_PER_DIAMETER * 2 * insert["radius_px"]))
    return max(5, side | 1)


def npw_dprime(present: np.ndarray, absent: np.ndarray) -> dict:
    """Non-prewhitening matched-filter observer on ROIs of realisations.

    ``present``: (N, m, m) signal-present ROIs, one per realisation; ``absent``: (N, B, m, m),
    B signal-absent ROIs per realisation; the signal is a disc centred on the ROI's centre pixel.
    The template for realisation k is the mean signal-present minus the mean signal-absent ROI
    of all *other* realisations (leave one out, so a realisation's noise never scores itself),
    averaged over rings one pixel wide around the centre (the expected signal of a disc is
    circularly symmetric; ring averaging removes most of the template's own noise, which would
    otherwise dominate d' for small, faint inserts at tens of realisations); scores
    t = <template, ROI>.
    d' = (mean t_SP - mean t_SA) / sqrt((var t_SP + var t_SA) / 2) (sample variances) and
    AUC = U / (n_SP n_SA) from scipy.stats.mannwhitneyu (ties count one half)."""
    from scipy.stats import mannwhitneyu

    sp = np.asarray(present, np.float64)
    sa = np.asarray(absent, np.float64)
    n = len(sp)
    if n < 2 or sa.shape[0] != n:
        raise ValueError("need >= 2 realisations with signal-present and -absent ROIs each")
    nb = sa.shape[1]
    side = sp.shape[-1]
    yy, xx = np.mgrid[:side, :side] - side // 2
    ring = np.rint(np.hypot(yy, xx)).astype(int).ravel()
    ring_n = np.bincount(ring)

    def radial(t: np.ndarray) -> np.ndarray:
        return (np.bincount(ring, weights=t.ravel()) / ring_n)[ring].reshape(t.shape)

    sp_sum, sa_sum = sp.sum(axis=0), sa.sum(axis=(0, 1))
    t_sp, t_sa = np.empty(n), np.empty((n, nb))
    for k in range(n):
        tpl = radial((sp_sum - sp[k]) / (n - 1) - (sa_sum - sa[k].sum(axis=0)) / ((n - 1) * nb))
        t_sp[k] = np.sum(tpl * sp[k])
        t_sa[k] = np.sum(tpl * sa[k], axis=(1, 2))
    t_sa = t_sa.ravel()
    pooled = math.sqrt((t_sp.var(ddof=1) + t_sa.var(ddof=1)) / 2.0)
    dprime = float((t_sp.mean() - t_sa.mean()) / pooled) if pooled > 0 else math.inf
    u = mannwhitneyu(t_sp, t_sa, alternative="two-sided").statistic
    return {"dprime": dprime, "auc": float(u / (len(t_sp) * len(t_sa))), "n_present": n,
            "n_absent": len(t_sa)}


def qa_cnr(images: np.ndarray, insert: dict, backgrounds: list) -> float:
    """CNR of an insert over realisations ``images`` (N, H, W): (mean over the central
    QA_CNR_CORE-radius disc - the same disc at the signal-absent positions) / pixel std of the
    signal-absent ROIs (each ROI's own mean removed)."""
    side = qa_roi_side(insert)
    yy, xx = np.mgrid[:side, :side] - side // 2
    core = np.hypot(yy, xx) <= max(QA_CNR_CORE * insert["radius_px"], 1.0)
    sp = _square(images, insert["centre_px"], side)
    sa = np.stack([_square(images, b["centre_px"], side) for b in backgrounds], axis=1)
    contrast = sp[:, core].mean() - sa[:, :, core].mean()
    resid = sa - sa.mean(axis=(2, 3), keepdims=True)
    std = resid.std() * math.sqrt(resid[0, 0].size / max(resid[0, 0].size - 1, 1))
    return float(contrast / std) if std > 0 else math.inf


def qa_uniform_mask(truth: dict, fd: np.ndarray) -> np.ndarray:
    """Uniform water of the phantom: inside the body, at least QA_NPS_MARGIN_MM from its edge
    and from every insert (the signal-absent positions are uniform water too)."""
    px = truth["pixel_mm"]
    n = fd.shape[0]
    yy, xx = np.mgrid[:n, :n]
    c = truth["body"]["centre_px"]
    margin = QA_NPS_MARGIN_MM / px
    mask = np.hypot(yy - c[0], xx - c[1]) <= truth["body"]["diameter_mm"] / 2 / px - margin
    for ins in truth["inserts"]:
        r0, c0 = ins["centre_px"]
        mask &= np.hypot(yy - r0, xx - c0) > ins["radius_px"] + margin
    return mask


def qa_nps_corners(mask: np.ndarray, size: int = ROI_SIZE) -> list[tuple[int, int]]:
    """Top-left corners of ``size`` ROIs on a half-ROI grid wholly inside ``mask``."""
    step = size // 2
    return [(y, x) for y in range(0, mask.shape[0] - size + 1, step)
            for x in range(0, mask.shape[1] - size + 1, step)
            if mask[y:y + size, x:x + size].all()]


def qa_noise(images: np.ndarray, mask: np.ndarray, pixel_mm: float) -> dict:
    """Noise std and NPS (TG-233, :func:`nps_2d`) of realisations (N, H, W): noise = each
    realisation minus the mean over realisations, times sqrt(N / (N - 1)), in ROI_SIZE ROIs on
    a half-ROI grid wholly inside ``mask`` (16 or 8 px only where no ROI_SIZE ROI fits, as on
    coarse test grids)."""
    n = len(images)
    for size in (ROI_SIZE, ROI_SIZE // 2, ROI_SIZE // 4):
        corners = qa_nps_corners(mask, size)
        if corners:
            break
    else:
        raise ctio.CTDataError("QA phantom: no NPS ROI fits into its uniform water")
    mean = images.mean(axis=0)
    power = 0.0
    for img in images:
        power = power + nps_power(cut_rois((img - mean) * math.sqrt(n / (n - 1)), corners,
                                           size))
    nps = nps_2d(power, n * len(corners), pixel_mm)
    freq, radial = radial_nps(nps, pixel_mm)
    return {"n_rois": n * len(corners), "roi_px": size, **nps_summary(nps, pixel_mm),
            "freq": [float(f) for f in freq], "radial": [float(v) for v in radial]}


def dose_equivalent(doses, dprimes, target: float) -> tuple[Optional[float], str]:
    """Dose at which ``dprimes`` (one per dose) reach ``target``: linear interpolation of d' in
    log(dose) between the two ladder doses that bracket it (the lowest such segment).

    Returns (dose or None, note): None with "beyond the ladder (> max dose)" or "(< min dose)"
    when the target lies outside the measured d' range."""
    pts = sorted(zip(doses, dprimes))
    d = np.array([p[0] for p in pts], np.float64)
    v = np.array([p[1] for p in pts], np.float64)
    for i in range(len(d) - 1):
        lo, hi = v[i], v[i + 1]
        if min(lo, hi) <= target <= max(lo, hi) and lo != hi:
            t = (target - lo) / (hi - lo)
            dose = float(np.exp(np.log(d[i]) + t * (np.log(d[i + 1]) - np.log(d[i]))))
            return dose, (f"interpolated between {d[i]:.0%} and {d[i + 1]:.0%} "
                          "(d' linear in log dose)")
    if target > v.max():
        return None, f"beyond the ladder (FBP needs more than {d.max():.0%})"
    if target < v.min():
        return None, f"below the ladder (FBP at {d.min():.0%} already exceeds it)"
    return None, "not determined (d' flat on the ladder)"


def per_insert_equivalence(results: dict, names: list, doses: list) -> dict:
    """Dose equivalence of every low-contrast insert (:func:`dose_equivalent` of its own FBP d'
    against CNCL's at QA_REFERENCE_DOSE) and their median: inserts beyond the ladder count as
    above its top dose, those below it as under its lowest, so the median is defined whenever
    more than half of the inserts fall inside the ladder."""
    ref = names[doses.index(QA_REFERENCE_DOSE)]
    per, ranks = {}, []
    for ins, det in results[ref]["cncl"]["detect"].items():
        fbp = [results[n]["ldct"]["detect"][ins]["dprime"] for n in names]
        dose, note = dose_equivalent(doses, fbp, det["dprime"])
        per[ins] = {"fbp_equivalent_dose": dose, "note": note}
        ranks.append(dose if dose is not None else
                     (math.inf if note.startswith("beyond") else
                      0.0 if note.startswith("below") else math.nan))
    ranks = [r for r in ranks if not math.isnan(r)]
    median = float(np.median(ranks)) if ranks else math.nan
    if not math.isfinite(median) or not min(doses) <= median <= max(doses):
        median = None
    return {"per_insert": per, "median_fbp_equivalent_dose": median,
            "inserts_beyond": sum(r == math.inf for r in ranks),
            "inserts_below": sum(r == 0.0 for r in ranks)}


def read_qa_truth(qa_dir: Path) -> dict:
    """QA_DIR/qa_truth.json, checked: a folder written by Mysimulate.py --qa."""
    import Mysimulate

    if not qa_dir.is_dir():
        raise ctio.CTDataError(f"{qa_dir}: no such folder (make one with Mysimulate.py --qa)")
    path = qa_dir / Mysimulate.QA_TRUTH
    truth = ctio.read_json(path, f"{qa_dir}: not a QA phantom folder (no {Mysimulate.QA_TRUTH}; "
                                 "make one with Mysimulate.py --qa)")
    need = ("inserts", "backgrounds", "pixel_mm", "size", "doses", "series", "body")
    if not isinstance(truth, dict) or any(k not in truth for k in need):
        raise ctio.CTDataError(f"{path}: not a Mysimulate.py --qa truth file (missing "
                               f"{', '.join(k for k in need if k not in (truth or {}))})")
    return truth


def read_qa_series(qa_dir: Path, truth: dict, name: str) -> np.ndarray:
    """One series of the QA folder (DICOM, through MyDataLoader_test) as (N, H, W) HU."""
    import MyDataLoader_test

    folder = qa_dir / truth["series"][name]
    ds = MyDataLoader_test.load_test_dataset(folder, "dicom")
    images = np.stack([s.ld_hu for s in MyDataLoader_test.iter_slices(ds)])
    if images.shape[1:] != (truth["size"], truth["size"]):
        raise ctio.CTDataError(f"{folder}: slices of {images.shape[1:]}, the truth says "
                               f"{truth['size']}x{truth['size']}")
    return images


def _ttf_inserts(truth: dict) -> list[dict]:
    """The inserts with a TTF: the rods and the largest low-contrast insert of every contrast."""
    low = [i for i in truth["inserts"] if i["kind"] == "low-contrast"]
    big = max(i["diameter_mm"] for i in low) if low else None
    return ([i for i in truth["inserts"] if i["kind"] == "rod"]
            + [i for i in low if i["diameter_mm"] == big])


def qa_measure(images: np.ndarray, truth: dict, mask: np.ndarray) -> dict:
    """Every QA figure of one method at one dose, from its realisations (N, H, W)."""
    px = truth["pixel_mm"]
    noise = qa_noise(images, mask, px)
    mean = images.mean(axis=0)
    # deterministic structure of the uniform water: the variance of the realisation-mean image
    # minus its remaining noise (noise variance / N)
    structure = float(np.var(mean[mask]) - noise["noise_std"] ** 2 / len(images))
    noise["structure_std"] = math.sqrt(max(structure, 0.0))
    ttf = {ins["name"]: qa_ttf(mean, ins, px, noise["noise_std"], len(images))
           for ins in _ttf_inserts(truth)}
    for ins in _ttf_inserts(truth):
        ttf[ins["name"]]["mtf50_sd"] = mtf50_bootstrap_sd(images, ins, px)
    det = {}
    for ins in truth["inserts"]:
        if ins["kind"] != "low-contrast":
            continue
        bgs = truth["backgrounds"][str(ins["ring"])]
        side = qa_roi_side(ins)
        sp = _square(images, ins["centre_px"], side)
        sa = np.stack([_square(images, b["centre_px"], side) for b in bgs], axis=1)
        det[ins["name"]] = {**npw_dprime(sp, sa), "cnr": qa_cnr(images, ins, bgs),
                            "diameter_mm": ins["diameter_mm"],
                            "contrast_hu": ins["contrast_hu"]}
    dps = [d["dprime"] for d in det.values()]
    return {"noise": noise, "ttf": ttf, "detect": det,
            "mean_dprime": float(np.mean(dps)) if dps else None,
            "mean_auc": float(np.mean([d["auc"] for d in det.values()])) if det else None}


def _json_ttf(t: dict) -> dict:
    """TTF dict for JSON: the curve resampled to 0.01 cycles/mm steps."""
    grid = np.arange(0.0, float(t["freq"][-1]) + 1e-9, 0.01)
    return {**{k: v for k, v in t.items() if k not in ("freq", "ttf")},
            "freq": [round(float(f), 4) for f in grid],
            "ttf": [round(float(v), 5) for v in np.interp(grid, t["freq"], t["ttf"])]}


def qa_evaluate(qa_dir, run: Optional[str], out: Optional[str], *, batch: int = 4,
                sigma: float = 0.7, weights: Optional[str] = None) -> dict:
    """Myevaluation.py --qa: denoise every realisation of the QA folder with the run's
    generator (Mytest's loader and Denoiser), measure TTF, CNR, d' / AUC and NPS per dose and
    method, write OUT/qa.json, OUT/qa.md and PNG plots (OUT default QA_DIR/eval_<run name>);
    returns the report. One piece: it reads, denoises and measures dose by dose, so only one
    dose's realisations are in memory."""
    import time

    import Mytest

    qa_dir = Path(qa_dir)
    truth = read_qa_truth(qa_dir)
    run_dir, model, weights = Mytest.resolve_run(run, weights)
    out_dir = Path(out) if out else qa_dir / f"eval_{run_dir.name}"
    denoise = Mytest.Denoiser(Mytest.load_generator(model, weights), int(model["depth"]), batch)
    px = truth["pixel_mm"]
    start = time.time()
    fd = read_qa_series(qa_dir, truth, "full")
    mask = qa_uniform_mask(truth, fd[0])
    fd_ttf = {ins["name"]: qa_ttf(fd[0], ins, px) for ins in _ttf_inserts(truth)}
    results: dict = {}
    n_images = 0
    ref = min(truth["doses"], key=lambda d: abs(d - QA_REFERENCE_DOSE))
    examples = {"fd": fd[0]}
    for dose in truth["doses"]:
        name = _series_of(truth, dose)
        ld = read_qa_series(qa_dir, truth, name)
        cncl = np.stack([y for i in range(0, len(ld), batch)
                         for y in denoise(list(ld[i:i + batch]))])
        methods = {"ldct": ld, "gaussian": np.stack([gaussian_baseline(x, sigma) for x in ld]),
                   "cncl": cncl}
        results[name] = {m: qa_measure(imgs, truth, mask) for m, imgs in methods.items()}
        if dose == ref:
            examples.update({m: imgs[0] for m, imgs in methods.items()})
        n_images += len(ld)
        print(f"qa: dose {dose:g}: {len(ld)} realisations measured "
              f"({time.time() - start:.0f} s)", flush=True)
    elapsed = time.time() - start
    doses = list(truth["doses"])
    names = [_series_of(truth, d) for d in doses]
    equivalence = None
    if QA_REFERENCE_DOSE in doses and len(doses) > 1:
        target = results[_series_of(truth, QA_REFERENCE_DOSE)]["cncl"]["mean_dprime"]
        dose, note = dose_equivalent(doses, [results[n]["ldct"]["mean_dprime"] for n in names],
                                     target)
        equivalence = {"cncl_dose": QA_REFERENCE_DOSE, "cncl_mean_dprime": target,
                       "fbp_equivalent_dose": dose, "note": note,
                       **per_insert_equivalence(results, names, doses)}
    report = {
        "qa_dir": str(qa_dir.resolve()), "run": str(run_dir.resolve()),
        "weights": str(weights), "gaussian_sigma": sigma, "protocol": QA_PROTOCOL,
        "pixel_mm": px, "doses": doses, "realisations": truth.get("realisations"),
        "full_dose": truth.get("full_dose"), "seconds": round(elapsed, 1),
        "images_per_s": round(n_images / max(elapsed, 1e-9), 3),
        "full_dose_ttf": {k: _json_ttf(v) for k, v in fd_ttf.items()},
        "full_dose_structure": float(np.std(fd[0][mask])),
        "dose_equivalence": equivalence,
        "per_dose": {n: {m: {"noise": r["noise"], "mean_dprime": r["mean_dprime"],
                             "mean_auc": r["mean_auc"], "detect": r["detect"],
                             "ttf": {k: _json_ttf(v) for k, v in r["ttf"].items()}}
                         for m, r in results[n].items()} for n in names},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with ctio.atomic_path(out_dir / "qa.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False, default=_json_num) + "\n")
    text = qa_tables(report)
    with ctio.atomic_path(out_dir / "qa.md") as tmp:
        tmp.write_text(text + "\n")
    plot_qa(out_dir, report)
    strip = np.concatenate([examples[m] for m in ("fd", "ldct", "cncl")], axis=1)
    ctio.write_png(out_dir / "phantom.png", ctio.window_to_uint8(strip, QA_WINDOW))
    report["out"] = str(out_dir)
    report["text"] = text
    return report


def _json_num(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _series_of(truth: dict, dose: float) -> str:
    import Mysimulate

    name = Mysimulate.qa_series_name(dose)
    if name not in truth["series"]:
        raise ctio.CTDataError(f"{Mysimulate.QA_TRUTH}: dose {dose:g} has no series {name}")
    return name


def _f(v, digits: int = 2) -> str:
    return "n/m" if v is None else ("inf" if not math.isfinite(v) else f"{v:.{digits}f}")


QA_LABELS = {"ldct": "FBP (LDCT input)", "gaussian": "Gaussian filter", "cncl": "CNCL",
             "fd": "full dose (noiseless FBP)"}


def _mtf50_text(t: dict) -> str:
    sd = t.get("mtf50_sd")
    return _f(t["mtf50"], 3) + (f" ±{sd:.3f}" if sd is not None else "")


def qa_tables(report: dict) -> str:
    """The QA report as markdown: dose ladder, TTF, detectability, dose equivalence. One
    piece: table blocks read top to bottom like the report it prints."""
    names = list(report["per_dose"])
    doses = dict(zip(names, report["doses"]))
    ttf_names = list(report["full_dose_ttf"])
    rod = next((k for k in ttf_names if k.startswith("rod_+")), ttf_names[0])
    low = next((k for k in ttf_names if not k.startswith("rod")), None)
    lines = [f"QA phantom: {report['qa_dir']}  run: {report['run']}",
             f"{report['realisations']} realisations per dose, {report['pixel_mm']:g} mm pixels; "
             f"full dose = {report['full_dose']}", "",
             "Dose ladder (noise, NPS, resolution, detectability):", "",
             f"| dose | method | noise std (HU) | NPS mean freq (cycles/mm) | background "
             f"structure (HU) | MTF50 {rod} (cycles/mm) | MTF50 {low} (cycles/mm) | mean d' | "
             "mean AUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    fd = report["full_dose_ttf"]
    fds = report.get("full_dose_structure")
    lines.append(f"| full | {QA_LABELS['fd']} | 0 | | {_f(fds)} | {_f(fd[rod]['mtf50'], 3)} | "
                 f"{_f(fd[low]['mtf50'], 3) if low else ''} | | |")
    for n in names:
        for m, r in report["per_dose"][n].items():
            lines.append(
                f"| {doses[n]:.0%} | {QA_LABELS[m]} | {r['noise']['noise_std']:.2f} | "
                f"{r['noise']['nps_mean_freq']:.3f} | {_f(r['noise']['structure_std'])} | "
                f"{_mtf50_text(r['ttf'][rod])} | "
                f"{_mtf50_text(r['ttf'][low]) if low else ''} | {_f(r['mean_dprime'])} | "
                f"{_f(r['mean_auc'], 3)} |")
    lines += ["", "TTF: MTF50 ±sd / MTF10 (cycles/mm) per insert ('n/m': total CNR below "
              f"{QA_TTF_MIN_CNR_TOTAL:g}; sd: bootstrap over the realisations):", "",
              "| dose | method | " + " | ".join(ttf_names) + " |",
              "|---|---|" + "---|" * len(ttf_names)]
    lines.append(f"| full | {QA_LABELS['fd']} | " + " | ".join(
        f"{_f(fd[k]['mtf50'], 3)} / {_f(fd[k]['mtf10'], 3)}" for k in ttf_names) + " |")
    for n in names:
        for m, r in report["per_dose"][n].items():
            lines.append(f"| {doses[n]:.0%} | {QA_LABELS[m]} | " + " | ".join(
                f"{_mtf50_text(r['ttf'][k])} / {_f(r['ttf'][k]['mtf10'], 3)}"
                for k in ttf_names) + " |")
    inserts = list(report["per_dose"][names[0]]["ldct"]["detect"])
    methods = list(report["per_dose"][names[0]])
    lines += ["", "Low-contrast detectability: NPW d' [AUC] (CNR) per insert:", "",
              "| insert | " + " | ".join(f"{QA_LABELS[m]} {doses[n]:.0%}"
                                         for n in names for m in methods) + " |",
              "|---|" + "---|" * (len(names) * len(methods))]
    for ins in inserts:
        cells = []
        for n in names:
            for m in methods:
                d = report["per_dose"][n][m]["detect"][ins]
                cells.append(f"{_f(d['dprime'])} [{d['auc']:.2f}] ({_f(d['cnr'])})")
        lines.append(f"| {ins} | " + " | ".join(cells) + " |")
    eq = report["dose_equivalence"]
    lines.append("")
    if eq:
        got = (f"{eq['fbp_equivalent_dose']:.0%} of full dose" if eq["fbp_equivalent_dose"]
               else "-")
        lines.append(f"Dose equivalence: CNCL at {eq['cncl_dose']:.0%} has mean d' "
                     f"{_f(eq['cncl_mean_dprime'])}; FBP reaches it at {got} ({eq['note']}).")
        med = eq["median_fbp_equivalent_dose"]
        lines.append(
            "Per insert (each insert's FBP d' against CNCL's, same interpolation): median "
            + (f"{med:.0%}" if med is not None else "outside the ladder")
            + f" of full dose; {eq['inserts_beyond']} of {len(eq['per_insert'])} inserts beyond "
            f"the ladder (FBP needs > {max(report['doses']):.0%}), {eq['inserts_below']} below "
            f"it (FBP at {min(report['doses']):.0%} already does better).")
    else:
        lines.append(f"Dose equivalence: not computed (the ladder has no "
                     f"{QA_REFERENCE_DOSE:.0%} dose or only one dose).")
    lines += ["", f"{report['seconds']:g} s ({report['images_per_s']:g} realisations/s incl. "
              "denoising).", "", QA_PROTOCOL]
    return "\n".join(lines)


def plot_qa(out_dir: Path, report: dict) -> None:
    """ttf.png (TTF of the high-contrast rod and the largest 14 HU insert per method at 25 %
    or the nearest dose), dprime.png (mean d' against dose), nps.png (radial NPS against dose)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["per_dose"])
    doses = dict(zip(names, report["doses"]))
    ref = min(names, key=lambda n: abs(doses[n] - QA_REFERENCE_DOSE))
    ttf_names = list(report["full_dose_ttf"])
    panels = [k for k in ttf_names if k.startswith("rod_+")][:1] + \
        [k for k in ttf_names if not k.startswith("rod")][:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), dpi=90,
                             squeeze=False)
    for ax, k in zip(axes[0], panels):
        fd = report["full_dose_ttf"][k]
        ax.plot(fd["freq"], fd["ttf"], "k--", label=QA_LABELS["fd"])
        for m, r in report["per_dose"][ref].items():
            t = r["ttf"][k]
            ax.plot(t["freq"], t["ttf"], label=QA_LABELS[m] + ("" if t["measurable"]
                                                               else " (n/m)"))
        ax.axhline(0.5, color="0.7", lw=0.8)
        ax.set(xlabel="spatial frequency (cycles/mm)", ylabel="TTF", ylim=(-0.05, 1.15),
               title=f"TTF {k}, dose {doses[ref]:.0%}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, out_dir / "ttf.png", plt)

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=90)
    for m in report["per_dose"][names[0]]:
        ax.plot([100 * doses[n] for n in names],
                [report["per_dose"][n][m]["mean_dprime"] for n in names], "o-",
                label=QA_LABELS[m])
    ax.set(xscale="log", xlabel="dose (% of full dose)", ylabel="mean d' (16 inserts)",
           title="NPW detectability against dose")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _save(fig, out_dir / "dprime.png", plt)

    methods = ("ldct", "cncl")
    fig, axes = plt.subplots(1, len(methods), figsize=(10, 3.6), dpi=90, squeeze=False)
    for ax, m in zip(axes[0], methods):
        for n in names:
            nz = report["per_dose"][n][m]["noise"]
            ax.plot(nz["freq"], nz["radial"], label=f"{doses[n]:.0%}")
        ax.set(xlabel="spatial frequency (cycles/mm)", ylabel="NPS (HU$^2$ mm$^2$)",
               title=f"noise power spectrum, {QA_LABELS[m]}")
        ax.legend(fontsize=7, title="dose")
        ax.grid(alpha=0.3)
    _save(fig, out_dir / "nps.png", plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    with ctio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description="PSNR / SSIM / RMSE and noise texture (NPS) of the LDCT input, a "
        "Gaussian-filter baseline and the CNCL output of Mytest.py against the full-dose "
        "references; or the noise-only NPS of a run on simulated pairs (--nps-sim).",
        formatter_class=ctio.HelpFormatter)
    ap.add_argument("--pred", default=None, metavar="OUT",
                    help="output folder of Mytest.py (has manifest.csv)")
    ap.add_argument("--compare", nargs="+", default=None, metavar="OUT",
                    help="instead of scoring: one table row per already evaluated folder "
                    "(their metrics.json), e.g. an ablation")
    ap.add_argument("--figure", default=None, metavar="PNG",
                    help="with --compare: also write a side-by-side crop of one slice (LDCT, "
                    "each folder's output, full dose), see --zoom")
    ap.add_argument("--zoom", default=None, metavar="PATIENT:SLICE:Y0:Y1:X0:X1",
                    help="--figure's slice and pixel box, e.g. L506:160:200:328:150:278")
    ap.add_argument("--nps-sim", default=None, metavar="FD_PATH",
                    help="full-dose data: noise-only NPS of --run on two simulated low-dose "
                    "realisations per slice")
    ap.add_argument("--qa", default=None, metavar="QA_DIR",
                    help="image-quality QA phantom of Mysimulate.py --qa: TTF / MTF50, CNR, "
                    "NPW d' and AUC, NPS against dose for the input, the Gaussian baseline and "
                    "--run's CNCL (writes qa.json, qa.md, PNGs to --out, default "
                    "QA_DIR/eval_<run name>)")
    ap.add_argument("--protocol", choices=(*PROTOCOLS, "all"), default=ctio.DEFAULT_PROTOCOL,
                    help="metric convention of the printed tables (all are always stored)")
    ap.add_argument("--data", default=None, metavar="PATH",
                    help="dataset folder to take the full-dose references from instead of the "
                    "manifest's fd_path (default: the manifest's references)")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="layout of --data / --nps-sim (default: auto-detected)")
    ap.add_argument("--gaussian-sigma", type=float, default=0.7, metavar="SIGMA",
                    help="sigma (pixels) of the Gaussian-filter baseline")
    ap.add_argument("--batch", type=int, default=8, metavar="N", help="slices per metric batch")
    ap.add_argument("--run", default=None, metavar="RUN",
                    help="--nps-sim, --qa: training run folder (default: the latest under "
                    "runs/)")
    ap.add_argument("--weights", default=None, metavar="FILE",
                    help="--qa: generator weights (default: RUN's generator_best, else "
                    "generator_latest)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="--nps-sim: output folder (default: RUN/nps_sim); --qa: (default "
                    "QA_DIR/eval_<run name>)")
    ap.add_argument("--dose", type=float, default=0.25, help="--nps-sim: simulated dose fraction")
    ap.add_argument("--seed", type=int, default=0, help="--nps-sim: noise seed")
    ap.add_argument("--max-slices", type=int, default=None, metavar="N",
                    help="--nps-sim: use the first N slices only (default: all)")
    return ap


def _print_tables(report: dict, protocol: str) -> None:
    sigma = report["gaussian_sigma"]
    for name in PROTOCOLS if protocol == "all" else (protocol,):
        print(markdown_table(report["overall"], sigma, name))
        print()
        print(paired_table(report["paired"], name))
        print()
    print(noise_table(report["overall"], sigma, report["noise"]["unit"]))
    print()
    print(_interval_note(report))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.pred, args.compare, args.nps_sim, args.qa)) != 1:
        parser.error("give exactly one of --pred OUT, --compare OUT [OUT ...], --nps-sim FD "
                     "or --qa QA_DIR")
    if args.batch < 1:
        raise ctio.CTDataError(f"--batch {args.batch}: need at least 1")
    if args.compare:
        for name in PROTOCOLS if args.protocol == "all" else (args.protocol,):
            print(compare([Path(o) for o in args.compare], name))
            print()
            print(ctio.protocol_text(name))
        if args.figure:
            write_zoom_figure(args)
        return 0
    if args.nps_sim:
        if not (math.isfinite(args.dose) and 0 < args.dose <= 1):
            raise ctio.CTDataError(f"--dose {args.dose:g}: need 0 < dose <= 1")
        if args.max_slices is not None and args.max_slices < 1:
            raise ctio.CTDataError(f"--max-slices {args.max_slices}: need at least 1")
        report = nps_sim(args.nps_sim, args.run, args.out, layout=args.layout, dose=args.dose,
                         seed=args.seed, max_slices=args.max_slices, batch=args.batch)
        print(nps_sim_table(report))
        return 0
    if args.qa:
        sigma = float(args.gaussian_sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ctio.CTDataError(f"--gaussian-sigma {sigma:g}: need a positive number")
        report = qa_evaluate(args.qa, args.run, args.out, batch=min(args.batch, 4), sigma=sigma,
                             weights=args.weights)
        print(report["text"])
        print(f"QA report: {report['out']}/qa.md, qa.json, ttf.png, dprime.png, nps.png, "
              "phantom.png")
        return 0
    return score(args)


def write_zoom_figure(args: argparse.Namespace) -> None:
    """--compare --figure PNG --zoom PATIENT:SLICE:Y0:Y1:X0:X1."""
    parts = (args.zoom or "").split(":")
    try:
        patient, slice_id, box = parts[0], parts[1], tuple(int(v) for v in parts[2:])
        if len(box) != 4 or not (0 <= box[0] < box[1] and 0 <= box[2] < box[3]):
            raise ValueError
    except (ValueError, IndexError):
        raise ctio.CTDataError(f"--zoom {args.zoom!r}: want PATIENT:SLICE:Y0:Y1:X0:X1 with "
                               "Y0 < Y1 and X0 < X1") from None
    image = zoom_figure([Path(o) for o in args.compare], patient, slice_id, box)
    ctio.write_png(args.figure, image)
    print(f"figure: {args.figure}")


def score(args: argparse.Namespace) -> int:
    """--pred: score a Mytest.py output folder, write metrics and plots, print the tables."""
    data, layout = args.data, args.layout
    sigma = float(args.gaussian_sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ctio.CTDataError(f"--gaussian-sigma {sigma:g}: need a positive number")
    out = Path(args.pred)
    rows = read_manifest(out)
    if data is not None:
        attach_references(rows, data, layout)
    scored = [r for r in rows if r.get("fd_path")]
    if not scored:
        hint = ("the references under --data do not match" if data else
                "the data is low-dose only; pass --data with the full-dose references")
        raise ctio.CTDataError(f"{out / 'manifest.csv'}: no slice has a full-dose reference "
                               f"({hint})")
    noise = NoiseAccumulator()
    results = evaluate(scored, out, sigma, args.batch, noise)

    patients = sorted({r["patient"] for r in scored})
    curves = {p: noise.curves(p) for p in patients}
    units = {c["unit"] for c in curves.values()}
    report = {
        "protocol": ctio.PROTOCOL,
        "protocols": {n: ctio.protocol_text(n) for n in PROTOCOLS},
        "noise_protocol": NOISE_PROTOCOL,
        "gaussian_sigma": sigma,
        "gaussian_filter": "scipy.ndimage.gaussian_filter(mode='reflect', truncate=4.0) of LD HU",
        "std": "sample standard deviation over slices (ddof=1)",
        "ci95": f"{CONFIDENCE:.0%} percentile bootstrap of the mean over slices, resampling "
                f"patients (slices when one patient), {BOOTSTRAP_RESAMPLES} resamples, seed "
                f"{BOOTSTRAP_SEED}",
        "n_slices": len(scored),
        "n_patients": len(patients),
        "n_without_reference": len(rows) - len(scored),
        "runs": sorted({r.get("run", "") for r in scored if r.get("run")}),
        "weights": sorted({r.get("weights", "") for r in scored if r.get("weights")}),
        "references": str(Path(data).resolve()) if data else "manifest fd_path",
        "overall": summarize(results),
        "paired": paired_tests(results),
        "noise": {"unit": units.pop() if len(units) == 1 else "mixed (see per patient)",
                  "per_patient": curves},
        "per_patient": {
            p: {"n_slices": sum(r["patient"] == p for r in scored),
                **summarize([d for d in results if d["patient"] == p])}
            for p in patients},
    }
    write_outputs(out, results, report)
    for p in patients:
        if any(m in curves[p] for m in NOISE_METHODS):
            plot_radial_nps(out / "nps" / f"{p}_nps.png", curves[p], f"radial NPS, {p}", sigma)

    _print_tables(report, args.protocol)
    if report["n_without_reference"]:
        print(f"{report['n_without_reference']} slice(s) without reference not scored")
    print(f"Gaussian baseline: sigma {sigma:g} px (scipy.ndimage.gaussian_filter, reflect)")
    print(f"metrics: {out / 'metrics.csv'}, {out / 'metrics.json'}; NPS plots: {out / 'nps'}")
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

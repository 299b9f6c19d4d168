"""Noise texture: flat soft-tissue ROIs and the AAPM TG-233 noise power spectrum (numpy only).

Definitions: AAPM Report 233 (TG-233, Samei et al., Med Phys 2019), "Performance evaluation of
computed tomographic systems", section on noise power spectrum; Solomon, Christianson, Samei,
"Quantitative comparison of noise texture across CT scanners from different manufacturers",
Med Phys 39 (2012) 6048. Method names are passed in by the caller (Myevaluation.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

import ctio

# Flat soft-tissue ROI rule for the noise texture (see find_flat_rois).
ROI_SIZE = 32  # px, square
ROI_HU = (-100.0, 150.0)  # full-dose mean of a soft-tissue ROI
ROI_FLAT_SIGMA_PX = 4.0  # "large scale": the full dose smoothed by this Gaussian ...
ROI_FLAT_HU = 8.0  # ... departs from its fitted plane by at most this std (HU) inside the ROI
NOISE_FIELDS = ("n_rois", "noise_std", "nps_peak", "nps_mean_freq")
# Noise-only images (Myevaluation.py --nps-sim) have no anatomy: the largest ROI that fits
# (at least NPS_SIM_MIN_ROIS per slice) keeps the detrending bias small (README, "Noise texture").
NPS_SIM_ROI_SIZES = (128, 64, 32)
NPS_SIM_MIN_ROIS = 4


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
    a square is kept when it lies wholly inside the body (``ctdose.body_mask``: FD > -500 HU,
    eroded), its FD mean is within ``ROI_HU`` (soft tissue) and it is flat at large scale: the FD
    smoothed by a Gaussian of ``ROI_FLAT_SIGMA_PX`` px departs from its fitted plane by at most
    ``ROI_FLAT_HU`` (std, HU). The same corners then serve every method of that slice.
    """
    from scipy.ndimage import gaussian_filter

    import ctdose

    fd = np.asarray(fd_hu, np.float32)
    body = ctdose.body_mask(fd)
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


def noise_only_power(a: np.ndarray, b: np.ndarray, corners: list, size: int) -> np.ndarray:
    """:func:`nps_power` of the noise-only image (a - b) / sqrt(2) of two images that differ in
    their noise only (two realisations, each denoised or not) over the ROIs at ``corners``."""
    diff = (np.asarray(a, np.float64) - b) / math.sqrt(2.0)
    return nps_power(cut_rois(diff, corners, size))


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
    """Radially averaged NPS (TG-233's 1-D NPS): (frequency, mean NPS) over rings one frequency
    step (1/N) wide, each pixel of the 2-D NPS in the ring of its nearest multiple k/N, k = 0
    .. N/2 (the Nyquist frequency; the corners beyond it are left out). Square ROIs."""
    fy, fx = nps_frequencies(nps.shape, pixel_mm)
    step = fx[1] - fx[0]
    radius = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    ring = np.rint(radius / step).astype(int).ravel()
    sums = np.bincount(ring, weights=nps.ravel())
    counts = np.bincount(ring)
    n = min(nps.shape) // 2 + 1
    return np.arange(n) * step, sums[:n] / np.maximum(counts[:n], 1)


def nps_summary(nps: np.ndarray, pixel_mm: Optional[float]) -> dict:
    """Noise std, radial-NPS peak frequency and the AAPM TG-233 mean frequency of a 2-D NPS.

    * ``noise_std`` = sqrt of the integral of the 2-D NPS (the noise variance; TG-233).
    * ``nps_peak``: the frequency of the maximum of the 1-D radial NPS (:func:`radial_nps`).
    * ``nps_mean_freq``: TG-233's f_av = integral f NPS(f) df / integral NPS(f) df over the
      1-D radially averaged NPS from 0 to the Nyquist frequency (Solomon et al., Med Phys 39
      (2012) 6048, eq. 3): sums over :func:`radial_nps`'s rings (step 1/N, rectangle rule);
      white noise gives 0.25 cycles/pixel.
    """
    fy, fx = nps_frequencies(nps.shape, pixel_mm)
    area = (fx[1] - fx[0]) * (fy[1] - fy[0])
    freq, radial = radial_nps(nps, pixel_mm)
    weight = float(radial.sum())
    return {"noise_std": math.sqrt(max(float(nps.sum()) * area, 0.0)),
            "nps_peak": float(freq[int(np.argmax(radial))]),
            "nps_mean_freq": float((freq * radial).sum() / weight) if weight > 0 else 0.0}


class NoiseAccumulator:
    """Per patient and method: summed ROI power spectra (memory: one ROI-sized array each).

    ``methods``: the method names in the order :meth:`curves` reports them."""

    def __init__(self, methods: tuple[str, ...]):
        self.methods = tuple(methods)
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
        for method in self.methods:
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


def plot_radial_nps(path: Path, curves: dict, title: str, labels: dict[str, str]) -> None:
    """Radial NPS of every method of ``labels`` ({method: legend label}) found in ``curves``
    (NoiseAccumulator.curves) as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method, label in labels.items():
        if method in curves:
            ax.plot(curves["freq"], curves[method]["radial"], label=label)
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


TG233_TEXT = (
    "per ROI its least-squares plane removed; NPS = dx dy / (Nx Ny) <|DFT|^2> (AAPM TG-233); "
    "noise std = sqrt(integral of the NPS); 1-D radial NPS = the 2-D NPS averaged over rings "
    "1/N wide at k/N, k = 0..N/2 (each frequency in its nearest ring), peak = its maximum, "
    "mean frequency f_av = sum f NPS(f) / sum NPS(f) over those rings up to Nyquist (TG-233; "
    "Solomon et al. 2012); bias of f_av from the DC ring and detrending: +7 % (32 px ROIs), "
    "+4 % (64), +2 % (128) for white noise, more for low-pass noise (README)")
NOISE_PROTOCOL = (
    f"noise: {ROI_SIZE}x{ROI_SIZE} px ROIs tiled over each full-dose slice, kept when wholly in "
    f"the body, FD mean in [{ROI_HU[0]:g}, {ROI_HU[1]:g}] HU and FD smoothed by a Gaussian "
    f"(sigma {ROI_FLAT_SIGMA_PX:g} px) within {ROI_FLAT_HU:g} HU std of its plane; same ROIs for "
    f"every method; {TG233_TEXT}")


def noise_rois(fd: np.ndarray, size: int = ROI_SIZE) -> list:
    """Corners of the ``size`` x ``size`` ROIs, on a grid of half-ROI steps (50 % overlap, as
    TG-233 allows), that lie wholly inside the body of ``fd`` (the noise-only image has no
    anatomy, so no flatness rule is needed)."""
    import ctdose

    body = ctdose.body_mask(fd)
    step = size // 2
    return [(y, x) for y in range(0, fd.shape[0] - size + 1, step)
            for x in range(0, fd.shape[1] - size + 1, step) if body[y:y + size, x:x + size].all()]


def noise_roi_size(fd: np.ndarray) -> int:
    """The largest of NPS_SIM_ROI_SIZES with at least NPS_SIM_MIN_ROIS :func:`noise_rois` in
    the body of ``fd`` (the smallest when none has)."""
    for size in NPS_SIM_ROI_SIZES:
        if len(noise_rois(fd, size)) >= NPS_SIM_MIN_ROIS:
            return size
    return NPS_SIM_ROI_SIZES[-1]

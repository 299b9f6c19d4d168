"""Dose simulation of CT slices: projection-domain noise insertion, its calibration, and the
simulator's dataset helpers (library module; ``Mysimulate.py`` is its command line).

Noise model (projection-domain noise insertion in the style of Zeng et al. 2015)::

    HU -> mu = MU_WATER * (1 + HU / 1000)  [1/mm], times the pixel size -> line integrals p
    p = radon(mu)                  parallel beam, N_VIEWS views, on the inscribed circle
    N0 = dose * I0 * bowtie(t) * mA factor;  N ~ Poisson(N0 * exp(-p)) + Normal(0, sigma_e)
    N = max(N, 1);  noise sinogram = -log(N / N0) - p
    LD = FD + FBP(noise sinogram)  (= FD + FBP(noisy sinogram) - FBP(noise-free sinogram))

Choices and why:

* **Difference formulation.** ``LD = FD + FBP(noisy) - FBP(noise-free)``: the full-dose image stays
  exactly the original (no blur or streaks from our coarse parallel-beam re-projection), and
  ``LD - FD`` contains only the inserted noise, like the Mayo challenge's own QD/FD pairs. FBP is
  linear, so this costs one ``radon`` and one ``iradon`` per slice. Pixels outside the
  reconstruction circle keep their value (air in CT).
* **Pure insertion at dose b.** The inserted noise is that of a scan with ``b * I0`` incident
  counts, so its variance is ``1 / (b * I0)`` and its std scales as ``1 / sqrt(b)``. The exact
  *extra* variance needed to take an already-noisy full-dose scan to dose b would be
  ``(1/b - 1) / I0_true`` (Zeng/Yu); the two agree at the calibration dose 0.25 when
  ``I0 = 4/3 * I0_true``, which is what calibrating ``I0_DEFAULT`` on real QD - FD at 0.25 does. So
  at b = 0.25 the figures match the real Mayo pairs; at other doses ``dose`` reads as "noise of a
  dose-b scan of a noiseless object" (at b = 0.5 this adds 22 % more std than the exact extra
  noise would; at b -> 1 it still adds full-dose-level noise).
* **Cosine-apodised ramp filter**, not the plain ramp: measured on the six real L506 QD - FD pairs
  (3 mm, B30f), the radially averaged noise power spectrum matches the cosine filter's within a
  few percent in every band, while the plain ramp puts 3-10x too much power at high frequencies.
* **N_VIEWS = 180.** Measured on a 300 mm water cylinder (512 px, 0.664 mm) with the total counts
  fixed: noise std at every radius and the NPS in the centre and periphery agree with 360 and 720
  views within sampling error; 180 views is 2x faster than 360.
* **Tube-current modulation.** Scanners lower the mA where the patient is thin (L067: 101 mA in
  the lower chest, ~290 mA median). For DICOM input the per-slice I0 is scaled by the slice's
  XRayTubeCurrent (else Exposure) relative to the series median (:func:`exposure_factors`), so
  such slices get proportionally more noise; the series-average calibration is unchanged.
* **Bowtie filter.** Clinical scanners shape the beam so peripheral rays get fewer photons. Modelled
  as the water-equivalent thickness that flattens the flux behind a 360 mm water cylinder
  (BOWTIE_RADIUS_MM), capped at 150 mm (~5 % transmission). Measured effect: without it the
  L067 lower-chest slice (the CNCL tif pair's slice, real QD - FD 31.0 HU) came out at 0.84x
  the mean of seven other L067 slices (abdomen to thighs) and 0.66x the real figure; with it
  1.0x and 0.82x (25.4 HU).
* ``I0`` is counts per detector bin (one pixel wide) per view at N_VIEWS views: an *effective*
  figure that also absorbs slice thickness and kernel; it is not a scanner's photon count. The
  noise std scales as ``1 / pixel_mm`` at fixed ``I0`` (measured), which
  :func:`matched_i0` uses to give coarser images real-QD-like noise.

Command line: ``Mysimulate.py`` (``--input``, ``--calibrate``).

This module never imports TensorFlow.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

import ctdata
import ctio
import ctmetrics
import ctrun

# --- Noise model constants ----------------------------------------------------------------------
# Water at 70 keV (NIST XCOM mu/rho ~0.194 cm^2/g): the effective energy of a 100-120 kVp beam.
MU_WATER = 0.0194  # 1/mm
# Full-dose counts on the central ray per view (at the series' median tube current), calibrated
# so that dose 0.25 on L067 (0.664 mm pixels) matches the body noise std of the 7 real Mayo
# QD - FD pairs: 24.9 HU simulated (mean of all 56 slices, 18-30 HU) vs 24.9 HU real.
I0_DEFAULT = 7.7e6
# Electronic noise: sigma_e^2 ~ 10 counts^2 at a physical ~1e5 photons per ray (the usual figure
# for clinical detectors in low-dose simulation papers), scaled by sqrt(I0_DEFAULT / 1e5) so the
# electronic-to-quantum noise ratio is kept for our effective I0. Matters only in photon-starved
# rays (shoulders, metal); the calibration data does not constrain it.
SIGMA_E_DEFAULT = 28.0
BOWTIE_RADIUS_MM = 180.0  # bowtie flattens the flux behind a water cylinder of this radius
BOWTIE_MAX_WATER_MM = 150.0  # its thickest part, in mm of water (~5 % transmission)
N_VIEWS = 180  # parallel-beam views over 180 degrees (measured: see module docstring)
FBP_FILTER = "cosine"  # matches the real QD - FD noise power spectrum (see module docstring)
CALIB_PIXEL_MM = 0.664  # pixel size of the L067 slices I0_DEFAULT was calibrated on
ASSUMED_FOV_MM = 340.0  # field of view assumed for .npy/.tif input (Mayo's 340 mm recon FOV)
# I0 factor for slices without a header (.npy/.tif: no tube current, no pixel spacing; pixels
# assumed ASSUMED_FOV_MM / width). Fitted on the 7 real Mayo QD/FD pairs (6 L506 .npy, 1 L067
# .tif) so that simulated dose 0.25 from their FD matches their real QD - FD body noise on
# average: at factor 1 they came out at 0.58x (14.5 vs 24.9 HU), at 0.38 1.00x (per slice
# 0.72-1.31x; README "Calibration"). I0_DEFAULT holds at the median tube current of the L067
# series; these slices behave as if scanned at ~0.4x of it. The assumed FOV is not the knob:
# the noise rises steeply with the assumed body size (400 mm: 1.07x, 460 mm: 2.4x).
HEADERLESS_I0_FACTOR = 0.38
MIN_COUNTS = 1.0  # noisy counts are clamped here before the log (photon starvation)
BODY_HU = -500.0  # body mask threshold for noise figures
BODY_ERODE_PX = 5  # erosion of the body mask (keeps the skin edge out of the noise figure)


# --- Noise insertion ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def circle_mask(n: int) -> np.ndarray:
    """skimage's reconstruction circle for an n x n image (centre n // 2, radius n // 2)."""
    yy, xx = np.ogrid[:n, :n]
    return (yy - n // 2) ** 2 + (xx - n // 2) ** 2 <= (n // 2) ** 2


def bowtie_transmission(t_mm: np.ndarray) -> np.ndarray:
    """Fraction of the central-ray flux reaching detector offset ``t_mm`` (mm from the centre)."""
    r = BOWTIE_RADIUS_MM
    t = np.abs(np.asarray(t_mm, np.float64))
    water = 2.0 * (r - np.sqrt(np.clip(r * r - t * t, 0.0, None)))
    water = np.where(t < r, np.minimum(water, BOWTIE_MAX_WATER_MM), BOWTIE_MAX_WATER_MM)
    return np.exp(-MU_WATER * water)


def simulate_low_dose(hu: np.ndarray, dose: float, *, pixel_mm: float, i0: float = I0_DEFAULT,
                      sigma_e: float = SIGMA_E_DEFAULT, rng: np.random.Generator,
                      filter_name: str = FBP_FILTER) -> np.ndarray:
    """Full-dose slice in HU -> simulated dose-``dose`` slice in HU (float32, same shape).

    Noise variance corresponds to ``dose * i0`` counts on the central ray, fewer towards the edge
    (bowtie; module docstring). ``i0`` may be scaled per slice for tube-current modulation
    (:func:`exposure_factors`). The result is not clipped (air may go below -1024). A non-square
    slice is padded with air to a square. Pixels outside the inscribed reconstruction circle keep
    their value. ``rng`` makes the result reproducible.
    """
    from skimage.transform import iradon, radon

    hu = np.asarray(hu, np.float64)
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    if not (np.isfinite(dose) and dose > 0):
        raise ValueError(f"dose must be > 0, got {dose}")
    if not (np.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel_mm must be > 0, got {pixel_mm}")
    h, w = hu.shape
    n = max(h, w)
    square = np.full((n, n), ctio.HU_MIN)
    top, left = (n - h) // 2, (n - w) // 2
    square[top:top + h, left:left + w] = hu
    inside = circle_mask(n)

    mu = np.clip(MU_WATER * (1.0 + square / 1000.0), 0.0, None) * pixel_mm
    mu[~inside] = 0.0
    theta = np.linspace(0.0, 180.0, N_VIEWS, endpoint=False)
    p = radon(mu, theta, circle=True)
    offsets_mm = (np.arange(p.shape[0]) - p.shape[0] // 2) * pixel_mm
    blank = dose * i0 * bowtie_transmission(offsets_mm)[:, None]  # counts without the patient
    counts = rng.poisson(blank * np.exp(-p)).astype(np.float64)
    if sigma_e > 0:
        counts += rng.normal(0.0, sigma_e, p.shape)
    np.maximum(counts, MIN_COUNTS, out=counts)
    noise_sino = -np.log(counts / blank) - p
    noise_mu = iradon(noise_sino, theta, output_size=n, circle=True, filter_name=filter_name)
    noise_hu = noise_mu * (1000.0 / (MU_WATER * pixel_mm))
    out = square
    out[inside] += noise_hu[inside]
    return out[top:top + h, left:left + w].astype(np.float32)


def simulate_pair_from_fd(fd_hu: np.ndarray, dose: float, pixel_mm: float,
                          seed_tuple: Sequence[int], **kwargs) -> np.ndarray:
    """Simulated low-dose HU for ``fd_hu``; the same ``seed_tuple`` gives the same noise.

    ``seed_tuple`` is any sequence of non-negative ints (e.g. ``(seed, epoch, slice_index)``).
    Extra keyword arguments go to :func:`simulate_low_dose` (``i0``, ``sigma_e``).
    """
    rng = np.random.default_rng([int(s) for s in seed_tuple])
    return simulate_low_dose(fd_hu, dose, pixel_mm=pixel_mm, rng=rng, **kwargs)


def matched_i0(pixel_mm: float, i0: float = I0_DEFAULT) -> float:
    """I0 that gives a ``pixel_mm`` image the noise std that ``i0`` gives at CALIB_PIXEL_MM.

    Noise std scales as 1 / pixel_mm at fixed I0 (measured), so I0 scales as pixel_mm^-2.
    """
    return i0 * (CALIB_PIXEL_MM / pixel_mm) ** 2


def body_mask(fd_hu: np.ndarray, erode_px: int = BODY_ERODE_PX) -> np.ndarray:
    """Pixels inside the body: FD > -500 HU, eroded by ``erode_px`` pixels."""
    from scipy import ndimage

    mask = np.asarray(fd_hu) > BODY_HU
    return ndimage.binary_erosion(mask, iterations=erode_px) if erode_px else mask


def noise_std_in_body(ld_hu: np.ndarray, fd_hu: np.ndarray) -> float:
    """Std of LD - FD over the (eroded) body mask of FD, in HU."""
    mask = body_mask(fd_hu)
    if not mask.any():
        raise ValueError("no body pixels (FD > -500 HU after erosion) to measure noise on")
    return float(np.std((np.asarray(ld_hu, np.float64) - fd_hu)[mask]))


def slice_seed(seed: int, patient: str, slice_id: str) -> tuple[int, int]:
    """Per-slice seed: independent of processing order and of which other slices exist."""
    return int(seed), zlib.crc32(f"{patient}/{slice_id}".encode())


def _tube_current(header) -> Optional[float]:
    for tag in ("XRayTubeCurrent", "Exposure"):
        try:
            value = float(header.get(tag))
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return value
    return None


def exposure_factors(headers: Sequence) -> list[float]:
    """Per-slice I0 factors for tube-current modulation within one series.

    ``XRayTubeCurrent`` (else ``Exposure``) of each slice divided by the series median; all 1.0 if
    any slice lacks both tags (or ``headers`` holds None, e.g. for .npy/.tif input).
    """
    values = [None if h is None else _tube_current(h) for h in headers]
    if not values or any(v is None for v in values):
        return [1.0] * len(values)
    median = float(np.median(values))
    return [v / median for v in values]


def series_factors(records: Sequence[ctdata.SliceRecord]) -> dict[str, float]:
    """{fd_path: exposure factor}, one series per (patient, folder) of DICOM FD files."""
    series: dict[tuple[str, str], list[str]] = {}
    for rec in records:
        series.setdefault((rec.patient, str(Path(rec.fd_path).parent)), []).append(rec.fd_path)
    factors = {}
    for paths in series.values():
        factors.update(zip(paths, exposure_factors([ctio.read_dicom_header(f) for f in paths])))
    return factors


# --- Calibration --------------------------------------------------------------------------------
def calibration_report(data_dir, *, n_slices: int = 8, dose: float = 0.25, i0: float = I0_DEFAULT,
                       sigma_e: float = SIGMA_E_DEFAULT, seed: int = 0,
                       print_fn: Optional[Callable[[str], None]] = print,
                       headerless: bool = True, offsets: int = 8) -> dict:
    """Body noise std of the real Mayo QD - FD pairs vs simulated dose ``dose`` on L067 slices.

    ``data_dir`` is the shared sample-data folder (``mayo_pairs/npy_redcnn``,
    ``mayo_pairs/tif_cncl``, ``L067_full_1mm``). ``n_slices`` L067 slices, evenly spread over the
    stack, are simulated. With ``headerless``, also the .npy/.tif path on the real pairs
    (:func:`headerless_calibration`) and, with ``offsets`` > 1, the real pairs' soft-tissue
    CT-number offset against that of ``offsets`` simulated realisations (:func:`offset_check`).
    Returns the figures as a dict; prints a table unless ``print_fn`` is None.
    One piece: it prints one table whose rows are computed in order.
    """
    data = Path(data_dir)
    figures: dict = {}
    for key, sub in (("real_npy", "mayo_pairs/npy_redcnn"), ("real_tif", "mayo_pairs/tif_cncl")):
        ds = ctdata.discover(data / sub)
        if not ds.paired:
            raise ctio.CTDataError(f"{data / sub}: expected QD/FD pairs")
        figures[key] = {f"{r.patient}_{r.slice_id}": noise_std_in_body(
            ctio.read_slice(r.ld_path)[0], ctio.read_slice(r.fd_path)[0]) for r in ds.records}
    real = list(figures["real_npy"].values()) + list(figures["real_tif"].values())
    figures["real_mean"] = float(np.mean(real))

    ds = ctdata.discover(data / "L067_full_1mm", layout="dicom", single_role="fd")
    factors = series_factors(ds.records)
    picks = np.unique(np.linspace(0, len(ds.records) - 1, max(1, n_slices)).round().astype(int))
    sim = {}
    for k in picks:
        rec = ds.records[int(k)]
        fd, header = ctio.read_slice(rec.fd_path)
        ld = simulate_pair_from_fd(fd, dose, pixel_size_mm(header, fd.shape, None),
                                   slice_seed(seed, rec.patient, rec.slice_id),
                                   i0=i0 * factors[rec.fd_path], sigma_e=sigma_e)
        sim[f"{rec.patient}_{rec.slice_id}"] = noise_std_in_body(ld, fd)
    figures["sim_l067"] = sim
    figures["sim_mean"] = float(np.mean(list(sim.values())))
    figures["ratio"] = figures["sim_mean"] / figures["real_mean"]
    figures.update(dose=dose, i0=i0, sigma_e=sigma_e)
    if print_fn is not None:
        def fmt(d):
            return ", ".join(f"{v:.1f}" for v in d.values())

        npy = list(figures["real_npy"].values())
        print_fn(f"body noise std (LD - FD inside FD > {BODY_HU:g} HU eroded {BODY_ERODE_PX} px)")
        print_fn(f"real QD-FD, L506 npy pairs ({len(npy)}): {fmt(figures['real_npy'])}  "
                 f"mean {np.mean(npy):.1f} HU")
        print_fn(f"real QD-FD, L067 tif pair: {fmt(figures['real_tif'])} HU")
        print_fn(f"real, all {len(real)} pairs: mean {figures['real_mean']:.1f} HU")
        print_fn(f"simulated dose {dose:g}, L067 1 mm ({len(sim)} slices, I0 {i0:.3g} x "
                 f"mA / median mA, sigma_e {sigma_e:g}): {fmt(sim)}  "
                 f"mean {figures['sim_mean']:.1f} HU")
        print_fn(f"simulated / real: {figures['ratio']:.2f}")
    if headerless:
        pairs = headerless_calibration(data, dose=dose, i0=i0, sigma_e=sigma_e, seed=seed)
        figures["headerless"] = pairs
        figures["headerless_ratio"] = (float(np.mean([s for _, s in pairs.values()]))
                                       / float(np.mean([r for r, _ in pairs.values()])))
        if print_fn is not None:
            print_fn(f"header-less path (.npy/.tif, I0 x {HEADERLESS_I0_FACTOR:g}), simulated "
                     "from the real pairs' FD, real / simulated: "
                     + ", ".join(f"{k} {r:.1f}/{s:.1f}" for k, (r, s) in pairs.items()))
            print_fn(f"header-less simulated / real: {figures['headerless_ratio']:.2f}")
    if headerless and offsets > 1:
        figures["offsets"] = {k: v for sub in ("mayo_pairs/npy_redcnn", "mayo_pairs/tif_cncl")
                              for k, v in offset_check(data / sub, realisations=offsets,
                                                       dose=dose, i0=i0, sigma_e=sigma_e,
                                                       seed=seed).items()}
        if print_fn is not None:
            print_fn(offset_table(figures["offsets"], offsets))
    return figures


def offset_table(offsets: dict, realisations: int) -> str:
    """Markdown table of :func:`offset_check`'s figures."""
    lines = ["soft-tissue CT-number offset, LD - FD (HU; ctmetrics.hu_bias soft band): real vs "
             f"{realisations} simulated realisations (quantum noise alone)",
             "| slice | real | simulated mean ± sd | z |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['real']:+.2f} | {v['sim_mean']:+.2f} ± {v['sim_sd']:.2f} | "
              f"{v['z']:+.1f} |" for k, v in offsets.items()]
    return "\n".join(lines)


def headerless_calibration(data_dir, *, dose: float = 0.25, i0: float = I0_DEFAULT,
                           sigma_e: float = SIGMA_E_DEFAULT, seed: int = 0) -> dict:
    """{slice: (real, simulated)} body noise std of the real Mayo pairs (``mayo_pairs/npy_redcnn``
    and ``mayo_pairs/tif_cncl``), simulated from their FD through the header-less path (pixel
    size :func:`pixel_size_mm`, I0 :func:`slice_i0`), as :func:`simulate_dataset` does."""
    data = Path(data_dir)
    out = {}
    for sub in ("mayo_pairs/npy_redcnn", "mayo_pairs/tif_cncl"):
        for r in ctdata.discover(data / sub).records:
            fd, header = ctio.read_slice(r.fd_path)
            ld = simulate_pair_from_fd(fd, dose, pixel_size_mm(header, fd.shape, None),
                                       slice_seed(seed, r.patient, r.slice_id),
                                       i0=slice_i0(header, i0), sigma_e=sigma_e)
            np.maximum(ld, ctio.HU_MIN, out=ld)
            real = noise_std_in_body(ctio.read_slice(r.ld_path)[0], fd)
            out[f"{r.patient}_{r.slice_id}"] = (real, noise_std_in_body(ld, fd))
    return out


def offset_check(pairs_dir, *, realisations: int = 8, dose: float = 0.25,
                 i0: float = I0_DEFAULT, sigma_e: float = SIGMA_E_DEFAULT,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Is the low-dose data's CT-number offset quantum noise? Per LD/FD pair under
    ``pairs_dir``: the soft-tissue CT-number bias of the real LD against its FD (``real``;
    ``ctmetrics.hu_bias``, the evaluation's figure) beside the same figure for ``realisations``
    independent simulated dose-``dose`` slices from that FD (``sim_mean``, ``sim_sd``: sample
    sd, ddof 1; the header path of :func:`simulate_dataset`: :func:`pixel_size_mm`,
    :func:`slice_i0`, no tube-current factor), and ``z`` = (real - sim_mean) / sim_sd.

    Quantum noise averages out over a soft-tissue mask of 10^4 pixels (simulated sd 0.05-0.26 HU
    on the 7 real Mayo pairs); a real offset many sd away is a CT-number error of the low-dose
    data itself -- its reconstruction or noise insertion -- which a denoiser that keeps its
    input's mean passes on. Slices without soft tissue in the full dose are left out."""
    if realisations < 2:
        raise ValueError(f"realisations must be >= 2 (an sd), got {realisations}")
    ds = ctdata.discover(pairs_dir)
    if not ds.paired:
        raise ctio.CTDataError(f"{pairs_dir}: expected LD/FD pairs")
    out = {}
    for rec in ds.records:
        fd, header = ctio.read_slice(rec.fd_path)
        real = ctmetrics.hu_bias(ctio.read_slice(rec.ld_path)[0], fd)["bias_soft"]
        if real is None:
            continue
        px, n0 = pixel_size_mm(header, fd.shape, None), slice_i0(header, i0)
        sims = np.array([ctmetrics.hu_bias(simulate_pair_from_fd(
            fd, dose, px, (*slice_seed(seed, rec.patient, rec.slice_id), k), i0=n0,
            sigma_e=sigma_e), fd)["bias_soft"] for k in range(realisations)])
        mean, sd = float(sims.mean()), float(sims.std(ddof=1))
        out[f"{rec.patient}_{rec.slice_id}"] = {"real": real, "sim_mean": mean, "sim_sd": sd,
                                                "z": (real - mean) / sd if sd > 0 else math.nan}
    return out


# --- Progress and dataset helpers -----------------------------------------------------------------
class Progress:
    """One-line counter on stderr (rewritten in place on a terminal, ~10 lines otherwise).

    Not keras.utils.Progbar (what Mytest.py uses): importing Keras starts TensorFlow, which this
    module and the scripts that only simulate or score never import."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start = total, label, time.time()
        self.tty = sys.stdout.isatty()
        self.step = max(1, total // 10)
        self.done = 0  # the last count shown (callers that count in several places add to it)

    def update(self, done: int) -> None:
        self.done = done
        if self.tty or done % self.step == 0 or done == self.total:
            rate = (time.time() - self.start) / max(done, 1)
            eta = rate * (self.total - done)
            line = f"{self.label}: {done}/{self.total} slices, {eta:.0f} s left"
            if self.tty:
                sys.stdout.write(f"\r{line}   " + ("\n" if done == self.total else ""))
            else:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()


def pixel_size_mm(header, shape, override: Optional[float]) -> float:
    """Pixel size: explicit override, else DICOM PixelSpacing, else ASSUMED_FOV_MM / width."""
    if override:
        return float(override)
    if header is not None and header.get("PixelSpacing") is not None:
        return float(np.mean([float(v) for v in header.PixelSpacing]))
    return ASSUMED_FOV_MM / max(shape)


MARKER = "SIMULATION.json"  # written last into every dataset this module makes


def check_out(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """OUT must not overlap an input and must be empty (or absent), or with ``overwrite`` a
    dataset that this module wrote (it is replaced as a whole)."""
    for inp in inputs:
        if ctrun.inside(out, inp) or ctrun.inside(inp, out):
            raise ctio.CTDataError(f"{out}: output folder overlaps the input {inp.resolve()}; "
                                   "choose another --out (the input is never modified)")
    if out.exists():
        if not out.is_dir():
            raise ctio.CTDataError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise ctio.CTDataError(f"{out}: folder exists and is not empty (use --overwrite "
                                       "to replace a simulated dataset)")
            if not (out / MARKER).is_file():
                raise ctio.CTDataError(f"{out}: --overwrite replaces the whole folder, but it "
                                       f"holds no {MARKER} (not written by Mysimulate.py); "
                                       "choose another --out")


def write_marker(folder: Path, info: dict) -> None:
    with ctio.atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")


def slice_i0(header, i0: float = I0_DEFAULT, factor: float = 1.0) -> float:
    """Full-dose I0 of one slice: ``i0`` times its tube-current factor (:func:`exposure_factors`)
    for DICOM, ``i0 * HEADERLESS_I0_FACTOR`` for .npy/.tif slices (no header; calibrated on the
    real Mayo pairs, see HEADERLESS_I0_FACTOR)."""
    return i0 * (factor if header is not None else HEADERLESS_I0_FACTOR)

"""Simulate low-dose CT from full-dose slices, and build a procedural demo dataset.

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

Command line::

    python Mysimulate.py --input FD_DIR --dose 0.25 --out OUT [--seed N]   # paired dataset
    python Mysimulate.py --demo --out OUT [--patients 4 --slices 12 --size 256]
    python Mysimulate.py --calibrate DATA_DIR   # real vs simulated noise figures
    python Mysimulate.py --qa OUT [--realisations 16 --qa-doses 1 0.5 0.25 0.1]  # QA phantom
    python Mysimulate.py --mayo-like OUT [--patients 10 --slices 240 --size 512]  # scale fixture

This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

import ctdata
import ctio

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

# --- Demo dataset constants ---------------------------------------------------------------------
DEMO_PATIENTS = 4
DEMO_SLICES = 12
DEMO_SIZE = 256
DEMO_DOSE = 0.25
DEMO_FOV_MM = 380.0  # phantom body 290-350 mm wide inside this field of view
DEMO_SLICE_MM = 3.0
DEMO_SERIES = "3mm"  # folder suffix: quarter_3mm / full_3mm
CTSMALL = "CTSMALL"


def demo_patient_names(patients: int = DEMO_PATIENTS) -> list[str]:
    """Phantom patient names; the last (also last when sorted) is the demo test patient."""
    return [f"DEMO{i + 1:02d}" for i in range(patients)]


DEMO_TEST_PATIENT = demo_patient_names()[-1]


def ellipse_phantom(shape: tuple[int, int], rng: np.random.Generator,
                    noise_hu: float = 0.0) -> np.ndarray:
    """A quick body-like test image in HU: an ellipse of soft tissue (40 HU) in air with four
    round inserts (fat, tissue or bone), plus white noise of ``noise_hu``; float32, >= -1024.

    For tests and benchmarks that need CT-like slices of any ``shape`` fast; the demo data uses
    the anatomical phantom below instead."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    img = np.full(shape, -1000.0, np.float32)
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    img[body] = 40.0
    for _ in range(4):
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(2, 8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.choice([-100.0, 80.0, 300.0])
    if noise_hu:
        img += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return np.maximum(img, ctio.HU_MIN)


# --- Noise insertion ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _circle_mask(n: int) -> np.ndarray:
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
    inside = _circle_mask(n)

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


def _series_factors(records: Sequence[ctdata.SliceRecord]) -> dict[str, float]:
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
                       headerless: bool = True) -> dict:
    """Body noise std of the real Mayo QD - FD pairs vs simulated dose ``dose`` on L067 slices.

    ``data_dir`` is the shared sample-data folder (``mayo_pairs/npy_redcnn``,
    ``mayo_pairs/tif_cncl``, ``L067_full_1mm``). ``n_slices`` L067 slices, evenly spread over the
    stack, are simulated. With ``headerless``, also the .npy/.tif path on the real pairs
    (:func:`headerless_calibration`). Returns the figures as a dict; prints a table unless
    ``print_fn`` is None.
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
    factors = _series_factors(ds.records)
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
    return figures


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


# --- Simulating a dataset from full-dose input --------------------------------------------------
class Progress:
    """One-line counter on stderr (rewritten in place on a terminal, ~10 lines otherwise).

    Not keras.utils.Progbar (what Mytest.py uses): importing Keras starts TensorFlow, which this
    module and the scripts that only simulate or score never import."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start = total, label, time.time()
        self.tty = sys.stdout.isatty()
        self.step = max(1, total // 10)

    def update(self, done: int) -> None:
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


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """OUT must not overlap an input and must be empty (or absent), or with ``overwrite`` a
    dataset that this module wrote (it is replaced as a whole)."""
    res = out.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if res == inp or inp in res.parents or res in inp.parents:
            raise ctio.CTDataError(f"{out}: output folder overlaps the input {inp}; choose "
                                   "another --out (the input is never modified)")
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


def _write_marker(folder: Path, info: dict) -> None:
    with ctio.atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")


def _copy_file(src, dst: Path) -> None:
    with ctio.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def slice_i0(header, i0: float = I0_DEFAULT, factor: float = 1.0) -> float:
    """Full-dose I0 of one slice: ``i0`` times its tube-current factor (:func:`exposure_factors`)
    for DICOM, ``i0 * HEADERLESS_I0_FACTOR`` for .npy/.tif slices (no header; calibrated on the
    real Mayo pairs, see HEADERLESS_I0_FACTOR)."""
    return i0 * (factor if header is not None else HEADERLESS_I0_FACTOR)


def simulate_dataset(input_dir, out, dose: float, *, seed: int = 0, layout: Optional[str] = None,
                     pixel_mm: Optional[float] = None, i0: float = I0_DEFAULT,
                     sigma_e: float = SIGMA_E_DEFAULT, overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Write a paired dataset (same format as the input) with a simulated low-dose side.

    * DICOM (``dicom`` or ``mayo`` layout): ``OUT/<patient>/quarter_sim[_S]/NNNN.dcm`` (new series
      and SOP UIDs, ImageType DERIVED, original geometry) and ``OUT/<patient>/full_sim[_S]/`` with
      byte copies of the original full-dose files (``S``: the input's ``full_S`` suffix).
    * npy: ``<patient>_<idx>_input.npy`` (simulated) + copied ``_target.npy``.
    * tif: ``noisy/<name>`` (simulated) + copied ``clean/<name>``.

    The dataset is built in a hidden sibling folder and renamed to OUT when complete (OUT also
    gets ``SIMULATION.json``): a failed or killed run leaves no OUT, and a rerun needs no
    --overwrite. The full-dose side is read from the input's FD files only; the input is never
    modified. Slice noise is seeded from (seed, patient, slice id); I0 per slice is
    :func:`slice_i0`. Simulated HU below -1024 are clipped (as in real data).
    Returns a summary dict (layout, patients, slices, seconds).
    """
    input_dir, out = Path(input_dir), Path(out)
    _check_out(out, overwrite, [input_dir])
    ds = ctdata.discover(input_dir, layout, single_role="fd")
    records = [r for r in ds.records if r.fd_path]
    if not records:
        raise ctio.CTDataError(f"{input_dir}: no full-dose slices found (layout {ds.layout}); "
                               "give full-dose input (clean/, *_target.npy, full_* or DICOM)")
    for rec in records:  # a corrupt or NaN slice fails here, before anything is written
        ctio.read_slice(rec.fd_path)
    factors = _series_factors(records) if ds.layout in ("mayo", "dicom") else {}
    start = time.time()
    bar = Progress(len(records), f"simulating dose {dose:g}") if progress else None
    ctio.remove_stale_temporaries([out.parent])  # folders of killed earlier runs
    with ctio.atomic_dir(out) as dest:
        counters: dict[Path, int] = {}
        for done, rec in enumerate(records, 1):
            fd, header = ctio.read_slice(rec.fd_path)
            px = pixel_size_mm(header, fd.shape, pixel_mm)
            ld = simulate_pair_from_fd(fd, dose, px, slice_seed(seed, rec.patient, rec.slice_id),
                                       i0=slice_i0(header, i0, factors.get(rec.fd_path, 1.0)),
                                       sigma_e=sigma_e)
            np.maximum(ld, ctio.HU_MIN, out=ld)  # air noise below -1024 HU: clipped like real data
            _write_simulated(dest, ds.layout, rec, ld, header, dose, seed, counters)
            if bar:
                bar.update(done)
        _write_marker(dest, {"tool": "Mysimulate.py --input", "input": str(input_dir.resolve()),
                             "layout": ds.layout, "dose": dose, "seed": seed, "i0": i0,
                             "sigma_e": sigma_e, "pixel_mm": pixel_mm, "slices": len(records)})
    return {"layout": ds.layout, "patients": sorted({r.patient for r in records}),
            "slices": len(records), "seconds": time.time() - start}


def _write_simulated(dest: Path, layout: str, rec: ctdata.SliceRecord, ld: np.ndarray, header,
                     dose: float, seed: int, counters: dict[Path, int]) -> None:
    """Write one simulated slice and a copy of its full-dose source into ``dest``."""
    src = Path(rec.fd_path)
    if layout in ("mayo", "dicom", "tree"):
        if header is None:
            raise ctio.CTDataError(f"{src}: expected a DICOM slice")
        suffix = "sim"
        if layout == "mayo" and src.parent.name.lower().startswith("full_"):
            suffix = f"sim_{src.parent.name[len('full_'):]}"
        qdir = dest / rec.patient / f"quarter_{suffix}"
        fdir = dest / rec.patient / f"full_{suffix}"
        for d in (qdir, fdir):
            d.mkdir(parents=True, exist_ok=True)
        k = counters[qdir] = counters.get(qdir, -1) + 1
        uid = ctio.derived_series_uid(header, src, f"simulated dose {dose:g} seed {seed}")
        old = str(header.get("SeriesDescription", "") or "").strip()
        desc = f"simulated dose {dose:g} from {old}" if old else f"simulated dose {dose:g}"
        ctio.write_dicom(qdir / f"{k:04d}.dcm", ld, header, series_uid=uid, description=desc,
                         derived=True)
        _copy_file(src, fdir / f"{k:04d}.dcm")
    elif layout == "npy":
        stem = src.name[: -len("_target.npy")]
        ctio.write_npy_redcnn(dest / f"{stem}_input.npy", ld)
        _copy_file(src, dest / src.name)
    else:  # tif
        for d in ("noisy", "clean"):
            (dest / d).mkdir(parents=True, exist_ok=True)
        ctio.write_tiff(dest / "noisy" / src.name, ld)
        _copy_file(src, dest / "clean" / src.name)


# --- Procedural demo phantom --------------------------------------------------------------------
def _ellipse(u, v, cx, cy, ax, ay, angle_deg=0.0) -> np.ndarray:
    """Mask of an ellipse (centre cx, cy; semi-axes ax, ay; rotated by angle_deg) on grid u, v."""
    du, dv = u - cx, v - cy
    if angle_deg:
        a = np.deg2rad(angle_deg)
        du, dv = du * np.cos(a) + dv * np.sin(a), -du * np.sin(a) + dv * np.cos(a)
    return (du / ax) ** 2 + (dv / ay) ** 2 <= 1.0


def _taper(z: float, z0: float, z1: float, ramp: float = 25.0) -> float:
    """1 inside [z0, z1], falling smoothly to 0 within ``ramp`` mm outside it."""
    d = max(z0 - z, z - z1, 0.0)
    return float(np.cos(min(d / ramp, 1.0) * np.pi / 2) ** 2)


def _patient_params(rng: np.random.Generator, n_slices: int,
                    extent_mm: Optional[float] = None) -> dict:
    """Random anatomy of one phantom patient (sizes in mm of a 'standard' 330 x 240 mm body)
    covering ``extent_mm`` cranio-caudally (default ``n_slices`` demo slices)."""
    extent = n_slices * DEMO_SLICE_MM if extent_mm is None else extent_mm
    lesions = []
    for _ in range(int(rng.integers(2, 5))):
        lesions.append(dict(x=rng.uniform(-90, -30), y=rng.uniform(-35, 20),
                            z=rng.uniform(0, extent), r=rng.uniform(6, 13),
                            dhu=rng.choice([-1, 1], p=[0.7, 0.3]) * rng.uniform(10, 20)))
    loops = []
    for _ in range(int(rng.integers(7, 12))):
        loops.append(dict(x=rng.uniform(-40, 90), y=rng.uniform(-85, 15), r=rng.uniform(8, 16),
                          dx=rng.uniform(-0.6, 0.6), dy=rng.uniform(-0.6, 0.6),
                          z0=rng.uniform(-20, extent * 0.7),
                          length=rng.uniform(15, 60),
                          content=rng.choice(["gas", "fluid", "feces"], p=[0.35, 0.4, 0.25])))
    return dict(
        scale=rng.uniform(0.9, 1.03), aspect=rng.uniform(0.92, 1.08), rot=rng.uniform(-3, 3),
        shift=(rng.uniform(-8, 8), rng.uniform(-6, 6)), fat_mm=rng.uniform(12, 28),
        zc0=rng.uniform(40.0, 100.0),  # cranio-caudal position of the first slice (0: liver dome)
        liver_hu=rng.uniform(55, 65), soft_hu=rng.uniform(35, 45), aorta_hu=rng.uniform(150, 200),
        kidney_hu=rng.uniform(140, 180), lesions=lesions, loops=loops,
        vessels=[(rng.uniform(-85, -30), rng.uniform(-30, 25), rng.uniform(2.5, 4.5))
                 for _ in range(5)],
    )


class _Canvas:
    """An axial slice being painted: the image in HU (air to start with), the body coordinates
    ``u, v`` of every pixel (mm of the canonical 330 x 240 mm body: the patient's scale, aspect,
    rotation and shift undone) and the slice's cranio-caudal position ``zc``."""

    def __init__(self, size: int, pixel_mm: float, zk: float, prm: dict) -> None:
        c = (np.arange(size) - size / 2 + 0.5) * pixel_mm
        x, y = np.meshgrid(c, c)  # x to the patient's left (image right), y posterior (down)
        s, ar = prm["scale"], prm["aspect"]
        rot = np.deg2rad(prm["rot"])
        xs, ys = x - prm["shift"][0], y - prm["shift"][1]
        self.u = (xs * np.cos(rot) + ys * np.sin(rot)) / (s * ar)
        self.v = (-xs * np.sin(rot) + ys * np.cos(rot)) / (s / ar)
        self.zk = zk  # mm from the patient's first slice
        self.zc = prm["zc0"] + zk  # cranio-caudal coordinate of the canonical abdomen
        self.prm = prm
        self.img = np.full((size, size), -1000.0)

    def ellipse(self, cx, cy, ax, ay, angle_deg=0.0) -> np.ndarray:
        return _ellipse(self.u, self.v, cx, cy, ax, ay, angle_deg)

    def paint(self, mask, hu) -> None:
        self.img[mask] = hu


def _paint_body_wall(cv: _Canvas, mix: np.ndarray) -> tuple[float, float, float]:
    """Skin, subcutaneous fat, muscle ring, then visceral fat filling the cavity (mesentery and
    collapsed bowel where ``mix`` is high), rectus muscles and linea alba. Returns the body's
    semi-axes ``bx, by`` and fat thickness ``f`` (mm) for the ribs."""
    bx, by = 165.0 + 0.1 * (cv.zc - 80), 120.0
    f = cv.prm["fat_mm"]
    cv.paint(cv.ellipse(0, 0, bx, by), 20)
    cv.paint(cv.ellipse(0, 0, bx - 2, by - 2), -100)
    cv.paint(cv.ellipse(0, 0, bx - f, by - f * 0.8), 50)
    cavity = cv.ellipse(0, 0, bx - f - 12, by - f * 0.8 - 10)
    cv.paint(cavity, -90)
    cv.paint(cavity & (mix > 0.3), cv.prm["soft_hu"] - 10)
    cv.paint(cv.ellipse(0, -by + f + 10, 45, 14), 50)  # rectus muscles
    cv.paint(cv.ellipse(0, -by + f + 12, 6, 14), -90)  # linea alba
    return bx, by, f


def _paint_ribs(cv: _Canvas, bx: float, by: float, f: float) -> None:
    """Ribs of the upper abdomen, just inside the muscle ring."""
    rib = _taper(cv.zc, -50, 90, 20)
    if rib > 0.2:
        for ang in (-150, -125, -100, -80, -55, -30, 210, 235, 260, 280, 305, 330):
            a = np.deg2rad(ang)
            rx, ry = (bx - f - 6) * np.cos(a), (by - f * 0.8 - 5) * np.sin(a)
            if ry < 40:
                cv.paint(cv.ellipse(rx, ry, 6 * rib, 4 * rib, ang), 650)


def _paint_liver(cv: _Canvas) -> None:
    """Liver with enhancing vessels and low-contrast lesions (spheres cut by the slice)."""
    zc, zk, prm = cv.zc, cv.zk, cv.prm
    lv = _taper(zc, 0, 90, 70)
    if lv > 0.05:
        lcx, lcy = -55 - 0.15 * zc, -5 + 0.12 * zc
        liver = cv.ellipse(lcx, lcy, 80 * lv, 72 * lv, 15)
        cv.paint(liver, prm["liver_hu"])
        for vx, vy, vr in prm["vessels"]:
            cv.paint(liver & cv.ellipse(vx, vy + 0.1 * zk, vr, vr), 150)
        for les in prm["lesions"]:
            r2 = les["r"] ** 2 - (zk - les["z"]) ** 2
            if r2 > 1.0:
                r = np.sqrt(r2)
                cv.paint(liver & cv.ellipse(les["x"], les["y"], r, r * 0.9),
                         prm["liver_hu"] + les["dhu"])


def _paint_upper_organs(cv: _Canvas) -> None:
    """Spleen, stomach (wall, fluid, gas pocket anteriorly) and pancreas, each over its z range."""
    zc = cv.zc
    sp = _taper(zc, 0, 70, 30)  # spleen
    if sp > 0.05:
        cv.paint(cv.ellipse(95, 20, 30 * sp, 48 * sp, -30), 50)
    st = _taper(zc, 0, 60, 30)  # stomach
    if st > 0.05:
        cv.paint(cv.ellipse(40, -40, 45 * st, 32 * st, 20), cv.prm["soft_hu"])
        cv.paint(cv.ellipse(40, -40, 40 * st, 27 * st, 20), 10)
        cv.paint(cv.ellipse(35, -58 * st, 28 * st, 9 * st), -1000)
    pa = _taper(zc, 50, 100, 20)  # pancreas
    if pa > 0.05:
        cv.paint(cv.ellipse(15, 12, 45 * pa, 11 * pa, -15), 45)


def _paint_bowel(cv: _Canvas) -> None:
    """Bowel loops: tubes drifting with z; wall plus gas / fluid / feces content."""
    for lp in cv.prm["loops"]:
        dz = cv.zk - lp["z0"]
        if 0 <= dz <= lp["length"] and cv.zc > 40:
            cx, cy, r = lp["x"] + lp["dx"] * dz, lp["y"] + lp["dy"] * dz, lp["r"]
            cv.paint(cv.ellipse(cx, cy, r, r * 0.85), cv.prm["soft_hu"])
            content = {"gas": -1000, "fluid": 15, "feces": -250}[lp["content"]]
            cv.paint(cv.ellipse(cx, cy, r - 2.5, r * 0.85 - 2.5), content)


def _paint_kidneys(cv: _Canvas) -> None:
    """Kidneys: enhancing cortex, medulla, fatty sinus."""
    kd = _taper(cv.zc, 70, 150, 25)
    if kd > 0.05:
        for sgn in (-1, 1):
            kx = sgn * 62
            cv.paint(cv.ellipse(kx, 48, 26 * kd, 38 * kd, sgn * 25), cv.prm["kidney_hu"])
            cv.paint(cv.ellipse(kx, 48, 17 * kd, 27 * kd, sgn * 25), 90)
            cv.paint(cv.ellipse(kx - sgn * 10 * kd, 48, 6 * kd, 12 * kd, sgn * 25), -80)


def _paint_back_muscles(cv: _Canvas) -> None:
    """Psoas (growing caudally) and paraspinal muscles."""
    ps = _taper(cv.zc, 90, 250, 40)
    for sgn in (-1, 1):
        if ps > 0.05:
            cv.paint(cv.ellipse(sgn * 30, 58, 8 + 12 * ps, 10 + 6 * ps), 50)
        cv.paint(cv.ellipse(sgn * 38, 96, 27, 20, sgn * 10), 55)


def _paint_great_vessels(cv: _Canvas) -> None:
    """Aorta and IVC (contrast enhanced)."""
    cv.paint(cv.ellipse(12, 32, 11, 11), cv.prm["aorta_hu"])
    cv.paint(cv.ellipse(-20, 30, 12, 9), cv.prm["aorta_hu"] - 40)


def _paint_spine(cv: _Canvas) -> None:
    """Vertebra: cortical shell, cancellous core, arch, spinous and transverse processes, and
    the spinal canal (CSF)."""
    cv.paint(cv.ellipse(0, 62, 20, 17), 900)
    cv.paint(cv.ellipse(0, 62, 17.5, 14.5), 250)
    cv.paint(cv.ellipse(0, 90, 13, 12) & ~cv.ellipse(0, 88, 8, 7.5) & (cv.v > 84), 750)
    cv.paint(cv.ellipse(0, 110, 4.5, 13), 750)
    for sgn in (-1, 1):
        cv.paint(cv.ellipse(sgn * 22, 84, 13, 4.5, sgn * 20), 700)
    cv.paint(cv.ellipse(0, 88, 8, 7.5), 15)


def _phantom_slice(size: int, pixel_mm: float, zk: float, prm: dict, texture: np.ndarray,
                   mix: np.ndarray) -> np.ndarray:
    """One axial abdomen slice in HU at distance ``zk`` mm from the patient's first slice.

    The anatomy painters run in this order (later ones paint over earlier ones); ``texture``
    (HU) is then added inside the body and the image blurred a little (partial volume).
    ``mix`` (unit std) decides where the abdominal cavity holds soft tissue rather than fat.
    """
    from scipy import ndimage

    cv = _Canvas(size, pixel_mm, zk, prm)
    bx, by, f = _paint_body_wall(cv, mix)
    _paint_ribs(cv, bx, by, f)
    _paint_liver(cv)
    _paint_upper_organs(cv)
    _paint_bowel(cv)
    _paint_kidneys(cv)
    _paint_back_muscles(cv)
    _paint_great_vessels(cv)
    _paint_spine(cv)
    img = cv.img
    body = img > -950
    img[body] += texture[body]
    return ndimage.gaussian_filter(img, 0.6)


def _smooth_field(rng: np.random.Generator, slices: int, size: int, sigma_px: float,
                  sigma_slices: float) -> np.ndarray:
    """3-D low-pass Gaussian random field with unit std, smooth across slices too."""
    from scipy import ndimage

    t = ndimage.gaussian_filter(rng.standard_normal((slices, size, size)),
                                (sigma_slices, sigma_px, sigma_px), mode="wrap")
    return (t / max(float(t.std()), 1e-9)).astype(np.float32)


def _ctsmall_pair(dose: float, seed: int, i0: float, sigma_e: float):
    """pydicom's CT_small.dcm (128 x 128 crop of a spine) as FD, and its simulated LD.

    The file is a crop: projecting it alone would give ~8 cm path lengths and far too little
    noise, so it is embedded in a 320 x 240 mm soft-tissue/fat body for the simulation.
    """
    import pydicom.data

    path = pydicom.data.get_testdata_file("CT_small.dcm")
    fd, header = ctio.read_slice(path)
    fd = np.round(fd)
    px = pixel_size_mm(header, fd.shape, None)
    n = 512
    c = (np.arange(n) - n / 2 + 0.5) * px
    x, y = np.meshgrid(c, c)
    canvas = np.full((n, n), -1000.0)
    canvas[_ellipse(x, y, 0, 0, 160, 120)] = -100
    canvas[_ellipse(x, y, 0, 0, 140, 102)] = 40
    h, w = fd.shape
    top, left = (n - h) // 2, (n - w) // 2
    canvas[top:top + h, left:left + w] = fd
    ld = simulate_pair_from_fd(canvas, dose, px, slice_seed(seed, CTSMALL, "0000"), i0=i0,
                               sigma_e=sigma_e)[top:top + h, left:left + w]
    header.PatientID = header.PatientName = CTSMALL
    return fd, ld, header


def _store_round(hu: np.ndarray) -> np.ndarray:
    """The HU values a uint16 / intercept -1024 DICOM stores exactly (so read-back is exact)."""
    return np.clip(np.round(hu), ctio.HU_MIN, 65535 + ctio.HU_MIN).astype(np.float32)


def demo_patient_slices(index: int, slices: int = DEMO_SLICES, size: int = DEMO_SIZE,
                        seed: int = 0, dose: float = DEMO_DOSE
                        ) -> Iterator[tuple[int, float, np.ndarray, np.ndarray]]:
    """Yield ``(k, z_mm, fd_hu, ld_hu)`` of phantom patient ``index`` (0-based: DEMO01 is 0).

    Exactly the slices :func:`make_demo` writes (integer HU, so the DICOM round trip is exact).
    The quarter dose uses the calibrated defaults with I0 rescaled by :func:`matched_i0`.
    """
    pixel_mm = DEMO_FOV_MM / size
    i0 = matched_i0(pixel_mm)
    name = demo_patient_names(index + 1)[-1]
    for k, z_mm, fd in demo_phantom_slices(index, slices, size, seed):
        ld = _store_round(simulate_pair_from_fd(
            fd, dose, pixel_mm, slice_seed(seed, name, f"{k:04d}"), i0=i0))
        yield k, z_mm, fd, ld


def demo_phantom_slices(index: int, slices: int = DEMO_SLICES, size: int = DEMO_SIZE,
                        seed: int = 0) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(k, z_mm, fd_hu)``: the full-dose side of :func:`demo_patient_slices` (integer
    HU), without the noise simulation."""
    pixel_mm = DEMO_FOV_MM / size
    rng = np.random.default_rng([int(seed), 7, int(index)])
    prm = _patient_params(rng, slices)
    texture = 4.0 * _smooth_field(rng, slices, size, 3.0 / pixel_mm, 1.5)  # ~4 HU, 3 mm
    mix = _smooth_field(rng, slices, size, 9.0 / pixel_mm, 2.0)  # ~9 mm blobs
    for k in range(slices):
        zk = k * DEMO_SLICE_MM
        fd = _store_round(_phantom_slice(size, pixel_mm, zk, prm, texture[k], mix[k]))
        yield k, -(prm["zc0"] + zk), fd  # table position decreases caudally, as in Mayo


def make_demo(out, patients: int = DEMO_PATIENTS, slices: int = DEMO_SLICES,
              size: int = DEMO_SIZE, seed: int = 0, *, dose: float = DEMO_DOSE,
              overwrite: bool = False, progress: bool = False) -> Path:
    """Write the procedural demo dataset (Mayo layout) to ``out`` and return ``out``.

    ``patients`` phantom patients DEMO01.. (the last one is the test patient, see
    :func:`demo_patient_names`) with ``slices`` 3 mm slices of ``size`` x ``size`` each, plus
    pydicom's CT_small.dcm as patient CTSMALL (training side). Quarter dose is simulated with
    the calibrated defaults, I0 rescaled by :func:`matched_i0` for the phantom's coarser pixels
    so the noise level is like real Mayo QD. Deterministic in ``seed`` (except DICOM UIDs).
    """
    out = Path(out)
    if patients < 1 or slices < 1 or size < 32:
        raise ctio.CTDataError("demo needs --patients >= 1, --slices >= 1 and --size >= 32")
    _check_out(out, overwrite)
    ctio.remove_stale_temporaries([out.parent])  # folders of killed earlier runs
    with ctio.atomic_dir(out) as dest:  # a killed run leaves no demo folder that looks complete
        _write_demo(dest, patients, slices, size, seed, dose, progress)
        _write_marker(dest, {"tool": "Mysimulate.py --demo", "patients": patients,
                             "slices": slices, "size": size, "seed": seed, "dose": dose})
    return out


def _write_demo(out: Path, patients: int, slices: int, size: int, seed: int, dose: float,
                progress: bool) -> None:
    """The body of :func:`make_demo`, writing into the (temporary) folder ``out``."""
    start = time.time()
    pixel_mm = DEMO_FOV_MM / size
    names = demo_patient_names(patients)
    bar = Progress(patients * slices + 1, "demo") if progress else None
    done = 0
    for p, name in enumerate(names):
        study = ctio.new_uid()
        uids = {"quarter": ctio.new_uid(), "full": ctio.new_uid()}
        for k, z_mm, fd, ld in demo_patient_slices(p, slices, size, seed, dose):
            for side, img in (("quarter", ld), ("full", fd)):
                folder = out / name / f"{side}_{DEMO_SERIES}"
                folder.mkdir(parents=True, exist_ok=True)
                desc = (f"phantom, simulated dose {dose:g}" if side == "quarter"
                        else "phantom, full dose")
                header = ctio.new_ct_header(
                    patient_id=name, study_uid=study, series_uid=uids[side], instance=k + 1,
                    z_mm=z_mm, shape=(size, size), pixel_mm=pixel_mm,
                    thickness_mm=DEMO_SLICE_MM, description=desc)
                ctio.write_dicom(folder / f"{k:04d}.dcm", img, header, series_uid=uids[side],
                                 description=desc, derived=side == "quarter")
            done += 1
            if bar:
                bar.update(done)
    fd, ld, header = _ctsmall_pair(dose, seed, I0_DEFAULT, SIGMA_E_DEFAULT)
    for side, img in (("quarter", _store_round(ld)), ("full", fd)):
        folder = out / CTSMALL / f"{side}_{DEMO_SERIES}"
        folder.mkdir(parents=True, exist_ok=True)
        desc = (f"CT_small, simulated dose {dose:g}" if side == "quarter"
                else "CT_small, full dose")
        ctio.write_dicom(folder / "0000.dcm", img, header, series_uid=ctio.new_uid(),
                         description=desc, derived=side == "quarter")
    if bar:
        bar.update(done + 1)
    readme = f"""CNCL demo dataset: procedural phantom, NOT patient data.

Generated by Mysimulate.py --demo (seed {seed}) in {time.time() - start:.0f} s.
Layout: Mayo style, <patient>/quarter_{DEMO_SERIES}/NNNN.dcm (simulated dose {dose:g}) and
<patient>/full_{DEMO_SERIES}/NNNN.dcm (full dose), paired by ImagePositionPatient z.

Patients: {", ".join(names)} ({slices} slices of {size}x{size}, {pixel_mm:.3f} mm pixels,
{DEMO_SLICE_MM:g} mm apart): synthetic axial abdomen slices (fat, muscle, liver with
low-contrast lesions, spleen, kidneys, aorta, spine, bowel gas, smooth texture).
{CTSMALL}: pydicom's bundled CT_small.dcm (one 128x128 slice), a training patient.
Test patient: {names[-1]} (the last by name); all others are for training/validation.

Quarter dose: projection-domain Poisson + electronic noise insertion (see Mysimulate.py), I0
scaled for the pixel size so the noise level is like the real Mayo quarter-dose data.
"""
    with ctio.atomic_path(out / "README.txt") as tmp:
        tmp.write_text(readme)


# --- QA phantom -----------------------------------------------------------------------------------
# A digital image-quality phantom in the style of the MITA / CCT189 low-contrast phantom: a 200 mm
# water cylinder (0 HU) in air with circular low-contrast inserts of 3, 5, 7 and 10 mm at +3, +5,
# +7 and +14 HU (every size at every contrast: 16 inserts) and two 12 mm rods at +340 HU and
# -100 HU for the high-contrast task transfer function. Geometry in mm (x right, y down, from the
# image centre); the pixel grid only samples it. Myevaluation.py --qa measures it.
QA_TRUTH = "qa_truth.json"  # geometry, doses and seeds; Myevaluation.py --qa reads it
# 384 px of the calibration pixel size (0.664 mm, so matched_i0 leaves I0 as calibrated): a
# 255 mm field of view holds the 200 mm body inside the reconstruction circle. 512 px of 0.5 mm
# (--qa-size 512 --pixel-mm 0.5) costs ~2.4x the simulation time per realisation.
QA_SIZE = 384
QA_PIXEL_MM = CALIB_PIXEL_MM
QA_BODY_DIAMETER_MM = 200.0
QA_BODY_HU = 0.0  # water-equivalent body; air outside is -1000 HU
QA_AIR_HU = -1000.0
QA_DIAMETERS_MM = (10.0, 7.0, 5.0, 3.0)
QA_CONTRASTS_HU = (14.0, 7.0, 5.0, 3.0)
QA_RODS = ((340.0, 12.0, (-18.0, 0.0)), (-100.0, 12.0, (18.0, 0.0)))  # (HU, diameter, centre)
# Inserts and signal-absent positions alternate on two rings: the 10 and 7 mm inserts on the
# outer ring, the 5 and 3 mm ones on the inner; the 8 background positions of a ring (same radius:
# the noise of a centred cylinder depends on the radius) are the signal-absent ROIs of its inserts.
QA_RINGS_MM = ((68.0, (10.0, 7.0), 0.0), (38.0, (5.0, 3.0), 11.25))  # radius, sizes, start angle
QA_DOSES = (1.0, 0.5, 0.25, 0.1)
QA_REALISATIONS = 16
QA_SUPERSAMPLE = 4  # the truth is rendered on a 4x finer grid and area-averaged (anti-aliased)
QA_TRUTH_VIEWS = 4 * N_VIEWS  # views of the noiseless full-dose FBP (see qa_full_dose)
QA_SLICE_MM = 1.0  # nominal; the "slices" of a series are realisations, not table positions
QA_RESCALE_SLOPE = 0.1  # DICOM stores 0.1 HU steps, so 3 HU contrasts are not quantised


def qa_geometry(size: int = QA_SIZE, pixel_mm: float = QA_PIXEL_MM) -> dict:
    """The phantom's layout on a ``size`` x ``size`` grid of ``pixel_mm`` pixels (JSON-ready).

    Centres are snapped to pixel centres (``centre_px`` = (row, col), integers) and
    ``centre_mm`` = (x, y) is recomputed from them, so both describe the same point.
    """
    radius_px = QA_BODY_DIAMETER_MM / 2 / pixel_mm
    if size // 2 - radius_px < 4:
        raise ctio.CTDataError(
            f"--qa: a {size} px grid of {pixel_mm:g} mm pixels ({size * pixel_mm:.0f} mm) does "
            f"not hold the {QA_BODY_DIAMETER_MM:g} mm body inside its reconstruction circle; "
            "use a larger --qa-size or --pixel-mm")
    c = (size - 1) / 2.0

    def place(x_mm: float, y_mm: float) -> dict:
        row, col = int(round(c + y_mm / pixel_mm)), int(round(c + x_mm / pixel_mm))
        return {"centre_px": [row, col],
                "centre_mm": [round((col - c) * pixel_mm, 4), round((row - c) * pixel_mm, 4)]}

    inserts, backgrounds = [], {}
    for ring, (radius, sizes, start) in enumerate(QA_RINGS_MM):
        pairs = [(d, hu) for d in sizes for hu in QA_CONTRASTS_HU]
        backgrounds[str(ring)] = []
        for k in range(2 * len(pairs)):
            angle = np.deg2rad(start + k * 360.0 / (2 * len(pairs)))
            pos = place(radius * np.cos(angle), radius * np.sin(angle))
            if k % 2:
                backgrounds[str(ring)].append(pos)
                continue
            d, hu = pairs[k // 2]
            inserts.append({"name": f"{d:g}mm_{hu:+g}HU", "kind": "low-contrast", "ring": ring,
                            "diameter_mm": d, "radius_px": d / 2 / pixel_mm,
                            "contrast_hu": hu, "hu": QA_BODY_HU + hu, **pos})
    for hu, d, (x, y) in QA_RODS:
        inserts.append({"name": f"rod_{hu:+g}HU", "kind": "rod", "ring": None, "diameter_mm": d,
                        "radius_px": d / 2 / pixel_mm, "contrast_hu": hu - QA_BODY_HU, "hu": hu,
                        **place(x, y)})
    return {"size": size, "pixel_mm": pixel_mm, "fov_mm": size * pixel_mm,
            "coordinates": "centre_px = (row, col), pixel centres at integers; centre_mm = "
                           "(x right, y down) in mm from the image centre ((size - 1) / 2)",
            "body": {"diameter_mm": QA_BODY_DIAMETER_MM, "hu": QA_BODY_HU,
                     "centre_px": [c, c], "air_hu": QA_AIR_HU},
            "inserts": inserts, "backgrounds": backgrounds}


def qa_truth_image(geometry: dict, supersample: int = QA_SUPERSAMPLE) -> np.ndarray:
    """The exact phantom in HU (float32): every pixel the area-weighted mean over a
    ``supersample`` x ``supersample`` sub-grid, so edges are anti-aliased."""
    n, px, s = geometry["size"], geometry["pixel_mm"], int(supersample)
    c = (n - 1) / 2.0
    fine = (np.arange(n * s) + 0.5) / s - 0.5  # sub-pixel centres in pixel units
    yy, xx = np.meshgrid(fine, fine, indexing="ij")
    img = np.full((n * s, n * s), QA_AIR_HU)
    img[np.hypot(yy - c, xx - c) * px <= QA_BODY_DIAMETER_MM / 2] = QA_BODY_HU
    for ins in geometry["inserts"]:
        r0, c0 = ins["centre_px"]
        img[np.hypot(yy - r0, xx - c0) <= ins["radius_px"]] = ins["hu"]
    return img.reshape(n, s, n, s).mean(axis=(1, 3)).astype(np.float32)


def qa_full_dose(truth_hu: np.ndarray, views: int = QA_TRUTH_VIEWS,
                 filter_name: str = FBP_FILTER) -> np.ndarray:
    """The noiseless full dose: the exact phantom through the simulator's FBP chain (parallel-beam
    ``radon``, ``iradon`` with the same cosine-apodised ramp filter), no noise.

    This gives the full dose the blur of a reconstruction (its TTF is the FBP system's) while
    every low-dose realisation is ``simulate_low_dose`` of it (full dose + FBP of the inserted
    noise), so the signal is identical at every dose and only the noise changes. ``views`` is 4x
    N_VIEWS: with 180 views the 1000 HU air/water edge of the body leaves view-aliasing streaks
    of ~7 HU std inside a 200 mm water disc, with 720 views < 1 HU (measured; the noise
    insertion has no such streaks, it reconstructs only the noise sinogram)."""
    from skimage.transform import iradon, radon

    n = truth_hu.shape[0]
    inside = _circle_mask(n)
    rel = np.where(inside, np.asarray(truth_hu, np.float64) - QA_AIR_HU, 0.0)  # air = 0
    theta = np.linspace(0.0, 180.0, int(views), endpoint=False)
    rec = iradon(radon(rel, theta, circle=True), theta, output_size=n, circle=True,
                 filter_name=filter_name)
    out = np.asarray(truth_hu, np.float64).copy()
    out[inside] = rec[inside] + QA_AIR_HU
    return out.astype(np.float32)


def qa_series_name(dose: float) -> str:
    """Folder / series name of one dose of the ladder: 1.0 -> dose100, 0.25 -> dose025."""
    return f"dose{round(dose * 100):03d}"


def qa_seed(seed: int, dose: float, k: int) -> tuple[int, int, int]:
    """Seed tuple of realisation ``k`` at ``dose`` (per mille): independent of the ladder."""
    return int(seed), int(round(dose * 1000)), int(k)


def make_qa(out, *, size: int = QA_SIZE, pixel_mm: float = QA_PIXEL_MM,
            doses: Sequence[float] = QA_DOSES, realisations: int = QA_REALISATIONS,
            seed: int = 0, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the QA phantom to ``out`` and return ``out``:

    ``qa_truth.json`` (geometry, doses, seeds, I0), ``npy/truth.npy`` (exact phantom),
    ``npy/full_dose.npy`` (noiseless FBP, :func:`qa_full_dose`), ``npy/doseNNN.npy`` (the
    realisations, float32 HU, shape (realisations, size, size)) and the same as DICOM series
    ``dicom/full/`` and ``dicom/doseNNN/`` (one series per dose, one slice per realisation;
    ``MyDataLoader_test.py --data OUT/dicom`` reads them, each folder as one patient).
    Realisation ``k`` at dose ``b`` is ``simulate_low_dose(full_dose, b)`` with the calibrated
    I0 rescaled by :func:`matched_i0` and seed :func:`qa_seed`. Built in a temporary folder.
    One piece: one atomic output folder written in the order its README lists it."""
    out = Path(out)
    doses = [float(d) for d in doses]
    if realisations < 2:
        raise ctio.CTDataError(f"--realisations {realisations}: need at least 2 (the "
                               "detectability and noise figures compare realisations)")
    if not doses or any(not (0.0 < d <= 1.0) for d in doses) or len(set(doses)) != len(doses):
        raise ctio.CTDataError(f"--qa-doses {doses}: need distinct doses in (0, 1]")
    if not (np.isfinite(pixel_mm) and pixel_mm > 0) or size < 32:
        raise ctio.CTDataError("--qa needs --qa-size >= 32 and --pixel-mm > 0")
    geometry = qa_geometry(size, pixel_mm)
    _check_out(out, overwrite)
    ctio.remove_stale_temporaries([out.parent])
    i0 = matched_i0(pixel_mm)
    start = time.time()
    bar = Progress(len(doses) * realisations + 1, "qa") if progress else None
    with ctio.atomic_dir(out) as dest:
        truth = qa_truth_image(geometry)
        fd = qa_full_dose(truth)
        study = ctio.new_uid()
        (dest / "npy").mkdir()
        ctio.write_npy(dest / "npy" / "truth.npy", truth)
        ctio.write_npy(dest / "npy" / "full_dose.npy", fd)
        series = {"full": _write_qa_series(dest, "full", [fd], study, pixel_mm,
                                           "QA phantom, full dose (noiseless FBP)")}
        done = 1
        if bar:
            bar.update(done)
        seeds = {}
        for dose in doses:
            name = qa_series_name(dose)
            seeds[name] = [list(qa_seed(seed, dose, k)) for k in range(realisations)]
            stack = np.empty((realisations, size, size), np.float32)
            for k in range(realisations):
                stack[k] = simulate_pair_from_fd(fd, dose, pixel_mm, qa_seed(seed, dose, k),
                                                 i0=i0)
                done += 1
                if bar:
                    bar.update(done)
            ctio.write_npy(dest / "npy" / f"{name}.npy", stack)
            series[name] = _write_qa_series(dest, name, stack, study, pixel_mm,
                                            f"QA phantom, simulated dose {dose:g}")
        info = {"tool": "Mysimulate.py --qa", "version": 1, **geometry, "doses": doses,
                "realisations": realisations, "seed": seed, "seeds": seeds,
                "seed_rule": "numpy default_rng((seed, round(dose * 1000), realisation))",
                "i0": i0, "sigma_e": SIGMA_E_DEFAULT, "noise_views": N_VIEWS,
                "truth_views": QA_TRUTH_VIEWS, "fbp_filter": FBP_FILTER,
                "full_dose": "noiseless: the exact phantom (npy/truth.npy) through the "
                             f"simulator's FBP chain ({QA_TRUTH_VIEWS} views, {FBP_FILTER} "
                             "filter), no noise; low dose = full dose + FBP of the inserted "
                             "noise (Mysimulate.simulate_low_dose)",
                "dose_meaning": "noise of a dose-b scan of a noiseless object, relative to the "
                                "calibrated full dose (I0_DEFAULT, rescaled by matched_i0 for "
                                "the pixel size)",
                "series": series,
                "npy": {"truth": "npy/truth.npy", "full_dose": "npy/full_dose.npy",
                        **{qa_series_name(d): f"npy/{qa_series_name(d)}.npy" for d in doses}},
                "seconds": round(time.time() - start, 1)}
        with ctio.atomic_path(dest / QA_TRUTH) as tmp:
            tmp.write_text(json.dumps(info, indent=1) + "\n")
        _write_marker(dest, {k: info[k] for k in ("tool", "size", "pixel_mm", "doses",
                                                  "realisations", "seed")})
    return out


def _write_qa_series(dest: Path, name: str, images, study: str, pixel_mm: float,
                     description: str) -> str:
    """One DICOM series ``dest/dicom/name/NNNN.dcm`` (slice k at z = k * QA_SLICE_MM)."""
    folder = dest / "dicom" / name
    folder.mkdir(parents=True)
    uid = ctio.new_uid()
    for k, img in enumerate(images):
        header = ctio.new_ct_header(patient_id="QA_PHANTOM", study_uid=study, series_uid=uid,
                                    instance=k + 1, z_mm=k * QA_SLICE_MM, shape=img.shape,
                                    pixel_mm=pixel_mm, thickness_mm=QA_SLICE_MM,
                                    description=description)
        header.RescaleSlope = QA_RESCALE_SLOPE
        ctio.write_dicom(folder / f"{k:04d}.dcm", img, header, series_uid=uid,
                         description=description, derived=name != "full")
    return f"dicom/{name}"


# --- Mayo-size synthetic dataset (the scale fixture) --------------------------------------------
MAYO_LIKE_PATIENTS = 10  # the Mayo 2016 data: 10 patients, ~240 3 mm slices each, 512^2
MAYO_LIKE_SLICES = 240
MAYO_LIKE_SIZE = 512
MAYO_LIKE_EXTENT_MM = 300.0  # cranio-caudal range the phantom models (liver dome to pelvis)
MAYO_LIKE_PAINT_PX = 256  # anatomy painted at most this size, then upsampled (4x fewer pixels)
MAYO_LIKE_ANCHOR_SLICES = 80  # one noise anchor per this many slices
MAYO_LIKE_REALISATIONS = 2  # projection-domain noise realisations per anchor


def mayo_like_names(patients: int) -> list[str]:
    """Patient names of the Mayo-like fixture (ML01, ML02, ...)."""
    return [f"ML{i + 1:02d}" for i in range(patients)]


def mayo_like_geometry(slices: int, size: int) -> tuple[float, float]:
    """``(pixel_mm, slice_mm)`` of the fixture: the demo's field of view, and 3 mm slices or
    closer so that ``slices`` stay within the modelled abdomen (MAYO_LIKE_EXTENT_MM)."""
    return DEMO_FOV_MM / size, min(DEMO_SLICE_MM, MAYO_LIKE_EXTENT_MM / max(slices, 1))


def _unit_fields(rng: np.random.Generator, size: int, sigma_px: float, n: int = 3) -> np.ndarray:
    """``n`` independent 2-D low-pass Gaussian random fields with unit std, [n, size, size]."""
    from scipy import ndimage

    f = np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma_px,
                                          mode="wrap") for _ in range(n)])
    return (f / np.maximum(f.std(axis=(1, 2), keepdims=True), 1e-9)).astype(np.float32)


def _field_at(fields: np.ndarray, z_mm: float, period_mm: float) -> np.ndarray:
    """A unit-std field varying smoothly along z: the three ``fields`` mixed with a unit vector
    that turns by ~1 radian per ``period_mm`` (any slice can be made alone, in bounded memory)."""
    a, b = z_mm / period_mm, z_mm / (1.618 * period_mm)
    c = np.array([np.cos(a) * np.cos(b), np.sin(a) * np.cos(b), np.sin(b)], np.float32)
    return np.tensordot(c, fields, axes=1)


def mayo_like_patient_slices(index: int, slices: int = MAYO_LIKE_SLICES,
                             size: int = MAYO_LIKE_SIZE, seed: int = 0, dose: float = 0.25
                             ) -> Iterator[tuple[int, float, np.ndarray, np.ndarray]]:
    """Yield ``(k, z_mm, fd_hu, ld_hu)`` of fixture patient ``index`` (integer HU).

    Anatomy: the demo phantom's painters, the patient's organs along ``slices`` slices over at
    most MAYO_LIKE_EXTENT_MM, painted at most MAYO_LIKE_PAINT_PX wide and upsampled bilinearly
    (OpenCV) to ``size``; texture fields vary smoothly along z (:func:`_field_at`).

    Noise (fast, not the per-slice projection simulation): at anchor slices every
    ~MAYO_LIKE_ANCHOR_SLICES slices, MAYO_LIKE_REALISATIONS noise images LD - FD are simulated
    with the calibrated projection-domain simulator (:func:`simulate_pair_from_fd`, I0 of
    :func:`matched_i0`). Slice k between anchors a0 and a1 (fraction t) gets
    ``sqrt(1 - t) * sum_r w_r N(a0, r) + sqrt(t) * sum_r w'_r N(a1, r)`` with random unit
    vectors w, w' (seeded per slice): a Gaussian combination with exactly the covariance
    ``(1 - t) C(a0) + t C(a1)``, i.e. the simulator's noise level, NPS and streaks of the
    nearby anatomy. Neighbouring slices' noise is correlated (few realisations), which a
    scale benchmark does not care about; do not use it to study noise.
    One piece: one generator whose noise anchors and weights must stay in step along z.
    """
    import cv2

    pixel_mm, slice_mm = mayo_like_geometry(slices, size)
    paint = min(size, MAYO_LIKE_PAINT_PX)
    paint_mm = DEMO_FOV_MM / paint
    rng = np.random.default_rng([int(seed), 11, int(index)])
    prm = _patient_params(rng, slices, extent_mm=slices * slice_mm)
    texture = _unit_fields(rng, paint, 3.0 / paint_mm)  # ~3 mm grain, 4 HU below
    mix = _unit_fields(rng, paint, 9.0 / paint_mm)  # ~9 mm blobs

    def fd_at(k: int) -> np.ndarray:
        zk = k * slice_mm
        img = _phantom_slice(paint, paint_mm, zk, prm, 4.0 * _field_at(texture, zk, 4.5),
                             _field_at(mix, zk, 6.0))
        if paint != size:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        return _store_round(img)

    i0 = matched_i0(pixel_mm)
    n_anchors = 1 if slices == 1 else 1 + int(np.ceil((slices - 1) / MAYO_LIKE_ANCHOR_SLICES))
    anchors = np.unique(np.linspace(0, slices - 1, n_anchors).round().astype(int))
    noise: dict[int, np.ndarray] = {}  # anchor -> [R, size, size] float32, two at a time

    def realisations(a: int) -> np.ndarray:
        if a not in noise:
            fd = fd_at(a)
            noise[a] = np.stack([simulate_pair_from_fd(fd, dose, pixel_mm,
                                                       (seed, 11, index, a, r), i0=i0) - fd
                                 for r in range(MAYO_LIKE_REALISATIONS)])
        return noise[a]

    for k in range(slices):
        j = int(np.searchsorted(anchors, k, side="right")) - 1
        a0, a1 = int(anchors[j]), int(anchors[min(j + 1, len(anchors) - 1)])
        for old in [a for a in noise if a < a0]:
            del noise[old]
        t = 0.0 if a1 == a0 else (k - a0) / (a1 - a0)
        w = np.random.default_rng([int(seed), 11, int(index), k]).standard_normal(
            (2, MAYO_LIKE_REALISATIONS))
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        n = np.sqrt(1 - t) * np.tensordot(w[0], realisations(a0), axes=1)
        if t > 0:
            n += np.sqrt(t) * np.tensordot(w[1], realisations(a1), axes=1)
        fd = fd_at(k)
        yield k, -(prm["zc0"] + k * slice_mm), fd, _store_round(fd + n)


def make_mayo_like(out, patients: int = MAYO_LIKE_PATIENTS, slices: int = MAYO_LIKE_SLICES,
                   size: int = MAYO_LIKE_SIZE, seed: int = 0, *, dose: float = 0.25,
                   overwrite: bool = False, workers: Optional[int] = None,
                   progress: bool = False) -> Path:
    """Write the Mayo-like scale fixture to ``out``: ``OUT/MLnn/{quarter,full}_<T>mm/NNNN.dcm``
    (the layout of ``ctio``'s ``mayo`` discovery), ``patients`` x ``slices`` pairs of
    ``size``^2 (see :func:`mayo_like_patient_slices`), built patient by patient in ``workers``
    processes (default: one per core), atomically, with SIMULATION.json. Deterministic in
    ``seed`` (except DICOM UIDs)."""
    out = Path(out)
    if patients < 1 or slices < 1 or size < 32:
        raise ctio.CTDataError("--mayo-like needs --patients >= 1, --slices >= 1 and "
                               "--size >= 32")
    _check_out(out, overwrite)
    ctio.remove_stale_temporaries([out.parent])
    workers = max(1, min(patients, workers or os.cpu_count() or 1))
    bar = Progress(patients * slices, "mayo-like") if progress else None
    start = time.time()
    with ctio.atomic_dir(out) as dest:
        jobs = [(dest, i, slices, size, seed, dose) for i in range(patients)]
        if workers == 1:
            for done, job in enumerate(jobs, 1):
                _write_mayo_like_patient(*job)
                if bar:
                    bar.update(done * slices)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: a caller may have imported TensorFlow, which must not be forked
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")
                                     ) as pool:
                futures = [pool.submit(_write_mayo_like_patient, *job) for job in jobs]
                for done, fut in enumerate(as_completed(futures), 1):
                    fut.result()  # re-raises a worker's error
                    if bar:
                        bar.update(done * slices)
        pixel_mm, slice_mm = mayo_like_geometry(slices, size)
        _write_marker(dest, {
            "tool": "Mysimulate.py --mayo-like", "patients": patients, "slices": slices,
            "size": size, "pixel_mm": pixel_mm, "slice_mm": slice_mm, "seed": seed, "dose": dose,
            "noise": f"{MAYO_LIKE_REALISATIONS} projection-domain realisations per anchor slice "
                     f"every ~{MAYO_LIKE_ANCHOR_SLICES} slices, combined per slice (scale fixture, "
                     "not for noise studies)", "seconds": round(time.time() - start, 1)})
    return out


def _write_mayo_like_patient(dest: Path, index: int, slices: int, size: int, seed: int,
                             dose: float) -> None:
    """One fixture patient's quarter- and full-dose series into ``dest`` (a worker's job)."""
    name = mayo_like_names(index + 1)[-1]
    pixel_mm, slice_mm = mayo_like_geometry(slices, size)
    study = ctio.new_uid()
    uids = {"quarter": ctio.new_uid(), "full": ctio.new_uid()}
    descs = {"quarter": f"Mayo-like phantom, simulated dose {dose:g}",
             "full": "Mayo-like phantom, full dose"}
    folders = {side: dest / name / f"{side}_{slice_mm:g}mm" for side in uids}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for k, z_mm, fd, ld in mayo_like_patient_slices(index, slices, size, seed, dose):
        for side, img in (("quarter", ld), ("full", fd)):
            header = ctio.new_ct_header(
                patient_id=name, study_uid=study, series_uid=uids[side], instance=k + 1,
                z_mm=z_mm, shape=(size, size), pixel_mm=pixel_mm, thickness_mm=slice_mm,
                description=descs[side])
            ctio.write_dicom(folders[side] / f"{k:04d}.dcm", img, header,
                             series_uid=uids[side], description=descs[side],
                             derived=side == "quarter")


# --- Command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description="Simulate low-dose CT from full-dose slices (projection-domain noise "
                    "insertion), or generate the procedural demo dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", help="full-dose dataset folder (any layout ctio reads; for "
                                      "paired data the full-dose side is used)")
    mode.add_argument("--demo", action="store_true", help="generate the procedural demo dataset")
    mode.add_argument("--calibrate", metavar="DATA_DIR",
                      help="print real vs simulated noise figures on the shared sample data")
    mode.add_argument("--qa", metavar="OUT",
                      help="write the image-quality QA phantom (low-contrast inserts, rods, a "
                           "dose ladder of realisations) to OUT; Myevaluation.py --qa measures it")
    mode.add_argument("--mayo-like", metavar="OUT",
                      help="write a Mayo-size synthetic scale fixture to OUT (default 10 patients "
                           "x 240 pairs of 512^2 DICOM; a few minutes on 2 cores): the demo "
                           "phantom's anatomy varying along z, painted at 256^2 and upsampled; "
                           "quarter dose from a few projection-domain noise realisations per "
                           "patient (one pair every ~80 slices, with the calibrated simulator) "
                           "combined per slice with random unit weights, which keeps the "
                           "simulator's noise covariance but correlates nearby slices' noise: "
                           "for speed and memory benchmarks, not for noise studies")
    ap.add_argument("--out", help="output folder (required with --input and --demo)")
    ap.add_argument("--dose", type=float, default=0.25, help="dose fraction in (0, 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (per-slice streams)")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="input layout (auto-detected when not given)")
    ap.add_argument("--pixel-mm", type=float, default=None,
                    help="pixel size in mm (when not given: DICOM PixelSpacing, else "
                         f"{ASSUMED_FOV_MM:g} mm / width for .npy/.tif)")
    ap.add_argument("--i0", type=float, default=I0_DEFAULT,
                    help="full-dose counts per ray (--input, --calibrate; the demo always uses "
                         "the calibrated defaults)")
    ap.add_argument("--sigma-e", type=float, default=SIGMA_E_DEFAULT,
                    help="electronic noise std in counts (--input, --calibrate)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out that an earlier Mysimulate.py run wrote "
                         f"(it holds {MARKER}); the new dataset is built beside it first")
    ap.add_argument("--realisations", type=int, default=QA_REALISATIONS,
                    help="--qa: independent low-dose realisations per dose")
    ap.add_argument("--qa-doses", type=float, nargs="+", default=list(QA_DOSES), metavar="DOSE",
                    help="--qa: the dose ladder (fractions of the calibrated full dose)")
    ap.add_argument("--qa-size", type=int, default=QA_SIZE,
                    help=f"--qa: image size (pixels; --pixel-mm default {QA_PIXEL_MM:g} mm)")
    ap.add_argument("--patients", type=int, default=None,
                    help=f"phantom patients (demo: {DEMO_PATIENTS}, mayo-like: "
                         f"{MAYO_LIKE_PATIENTS})")
    ap.add_argument("--slices", type=int, default=None,
                    help=f"slices per patient (demo: {DEMO_SLICES}, mayo-like: "
                         f"{MAYO_LIKE_SLICES})")
    ap.add_argument("--size", type=int, default=None,
                    help=f"image size in pixels (demo: {DEMO_SIZE}, mayo-like: {MAYO_LIKE_SIZE})")
    return ap


def main(argv=None) -> int:
    """CLI entry point; ``argv`` items may be ``Path`` objects (converted with ``str``). One
    piece: one short branch per mode."""
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    if args.calibrate:
        if not Path(args.calibrate).is_dir():
            raise ctio.CTDataError(f"{args.calibrate}: no such folder")
        calibration_report(args.calibrate, dose=args.dose, i0=args.i0, sigma_e=args.sigma_e,
                           seed=args.seed)
        return 0
    if args.qa:
        if args.seed < 0:
            raise ctio.CTDataError(f"--seed must be >= 0, got {args.seed}")
        t = time.time()
        out = make_qa(args.qa, size=args.qa_size, pixel_mm=args.pixel_mm or QA_PIXEL_MM,
                      doses=args.qa_doses, realisations=args.realisations, seed=args.seed,
                      overwrite=args.overwrite, progress=True)
        print(f"QA phantom: {out} ({len(args.qa_doses)} doses x {args.realisations} "
              f"realisations, {args.qa_size} px of {args.pixel_mm or QA_PIXEL_MM:g} mm; truth "
              f"{out / QA_TRUTH}) in {time.time() - t:.1f} s")
        return 0
    if args.mayo_like and args.out:
        raise ctio.CTDataError("--mayo-like takes the output folder as its value; drop --out")
    if not args.out and not args.mayo_like:
        raise ctio.CTDataError("--out is required with --input and --demo")
    if not (0.0 < args.dose < 1.0):
        raise ctio.CTDataError(f"--dose must be in (0, 1), got {args.dose:g}")
    if args.seed < 0:
        raise ctio.CTDataError(f"--seed must be >= 0, got {args.seed}")
    if not (args.i0 > 0 and args.sigma_e >= 0):
        raise ctio.CTDataError("--i0 must be > 0 and --sigma-e >= 0")
    if args.pixel_mm is not None and not args.pixel_mm > 0:
        raise ctio.CTDataError(f"--pixel-mm must be > 0, got {args.pixel_mm:g}")
    if args.mayo_like:
        t = time.time()
        patients, slices, size = (MAYO_LIKE_PATIENTS if args.patients is None else args.patients,
                                  MAYO_LIKE_SLICES if args.slices is None else args.slices,
                                  MAYO_LIKE_SIZE if args.size is None else args.size)
        out = make_mayo_like(args.mayo_like, patients, slices, size, args.seed, dose=args.dose,
                             overwrite=args.overwrite, progress=True)
        print(f"mayo-like dataset: {out} ({patients} patients x {slices} pairs of {size}^2) in "
              f"{time.time() - t:.1f} s")
        return 0
    if args.demo:
        args.patients = DEMO_PATIENTS if args.patients is None else args.patients
        args.slices = DEMO_SLICES if args.slices is None else args.slices
        args.size = DEMO_SIZE if args.size is None else args.size
        t = time.time()
        out = make_demo(args.out, args.patients, args.slices, args.size, args.seed,
                        dose=args.dose, overwrite=args.overwrite, progress=True)
        print(f"demo dataset: {out} ({args.patients} phantom patients x {args.slices} slices "
              f"+ {CTSMALL}; test patient {demo_patient_names(args.patients)[-1]}) "
              f"in {time.time() - t:.1f} s")
        return 0
    if not Path(args.input).exists():
        raise ctio.CTDataError(f"{args.input}: no such file or directory")
    info = simulate_dataset(args.input, args.out, args.dose, seed=args.seed, layout=args.layout,
                            pixel_mm=args.pixel_mm, i0=args.i0, sigma_e=args.sigma_e,
                            overwrite=args.overwrite)
    print(f"wrote {info['slices']} simulated dose-{args.dose:g} slices ({info['layout']}, "
          f"{len(info['patients'])} patient(s)) to {args.out} in {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

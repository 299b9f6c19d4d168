"""The digital image-quality (QA) phantom: geometry, exact truth, noiseless full dose and seeded
low-dose realisations through ``ctdose``'s parallel-beam simulator; ``make_qa`` writes it
(``Mysimulate.py --qa``) and ``Myevaluation.py --qa`` measures it. Library module, numpy/scipy/
scikit-image only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import ctio
from ctdose import (
    CALIB_PIXEL_MM,
    FBP_FILTER,
    N_VIEWS,
    SIGMA_E_DEFAULT,
    Progress,
    check_out,
    circle_mask,
    matched_i0,
    simulate_pair_from_fd,
    write_marker,
)

# --- QA phantom -----------------------------------------------------------------------------------
# A digital image-quality phantom in the style of the MITA / CCT189 low-contrast phantom: a water
# cylinder (0 HU) of a patient's size in air with circular low-contrast inserts of 3, 5, 7 and
# 10 mm at +3, +5, +7 and +14 HU (every size at every contrast: 16 inserts, the four of CCT189 -
# 3 mm/14 HU, 5 mm/7 HU, 7 mm/5 HU, 10 mm/3 HU - among them) and two 12 mm rods at +340 HU and
# -100 HU for the high-contrast task transfer function. Geometry in mm (x right, y down, from the
# image centre); the pixel grid only samples it. Myevaluation.py --qa measures it.
#
# Sizes (issue 24). CCT189 itself is 200 mm; DIDSR/pediatricIQphantoms simulates the same inserts
# in cylinders of several diameters (``configs/LCD.toml``: ``diameter``, with ``reference_diameter
# = 200``), because a data-driven denoiser behaves differently at other sizes and noise levels. At
# the calibrated I0 (unchanged) the noise comes from the attenuation: the 200 mm cylinder has
# ~8 HU at 25 % dose, far quieter than the real Mayo quarter dose (19-37 HU in the body), so the
# default is an adult-abdomen diameter (QA_DEFAULT_DIAMETER_MM) whose 25 % noise lies in that
# range (measured, README "Image quality beyond PSNR"). The insert rings scale with the diameter;
# the matrix follows the size at the Mayo pixel (0.664 mm, so matched_i0 leaves I0 as calibrated).
#
# Why every size at every contrast (not only CCT189's four): the 16 inserts cost no simulation
# time (one image holds them all), give the contrast-detail grid in which a denoiser's loss shows
# (a model can keep 10 mm/3 HU and lose 3 mm/14 HU), and contain the four MITA inserts, which the
# summary quotes (``"mita": true`` in the truth).
QA_TRUTH = "qa_truth.json"  # geometry, doses and seeds; Myevaluation.py --qa reads it
QA_PIXEL_MM = CALIB_PIXEL_MM
QA_DEFAULT_DIAMETER_MM = 300.0  # adult abdomen: 24 HU at 25 % dose (real QD 19-37 HU, mean 24.9)
QA_REFERENCE_DIAMETER_MM = 200.0  # CCT189's diameter: the insert rings are laid out for it
QA_MARGIN_MM = 6.0  # air between the body and the reconstruction circle
QA_MITA = ((3.0, 14.0), (5.0, 7.0), (7.0, 5.0), (10.0, 3.0))  # CCT189's inserts (mm, HU)
QA_UNIFORM_MARGIN_MM = 5.0  # uniform region: this far from the skin and from every insert/rod
QA_SIZES_FILE = "qa_sizes.json"  # several diameters: OUT/dNNNmm/ each a phantom folder
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
# 32 realisations per dose: on the 300 mm body the LG-CHO mean d' over the 16 inserts of FBP at
# 25 % and 50 % has disjoint 95 % intervals from 16 realisations on (barely: [0.79, 1.49] vs
# [1.67, 2.45]) and with margin at 32 ([0.98, 1.42] vs [1.86, 2.31]); one insert alone needs
# far more (d' 0.5-2 at this noise; README "Image quality beyond PSNR").
QA_REALISATIONS = 32
QA_SUPERSAMPLE = 4  # the truth is rendered on a 4x finer grid and area-averaged (anti-aliased)
QA_TRUTH_VIEWS = 4 * N_VIEWS  # views of the noiseless full-dose FBP (see qa_full_dose)
QA_SLICE_MM = 1.0  # nominal; the "slices" of a series are realisations, not table positions
QA_RESCALE_SLOPE = 0.1  # DICOM stores 0.1 HU steps, so 3 HU contrasts are not quantised


def qa_size_for(diameter_mm: float, pixel_mm: float = QA_PIXEL_MM) -> int:
    """The matrix that holds a ``diameter_mm`` body and QA_MARGIN_MM of air inside the
    reconstruction circle at ``pixel_mm`` (a multiple of 16 pixels)."""
    need = 2 * (diameter_mm / 2 + QA_MARGIN_MM) / pixel_mm
    return int(16 * np.ceil(need / 16))


def qa_geometry(size: Optional[int] = None, pixel_mm: float = QA_PIXEL_MM,
                diameter_mm: float = QA_DEFAULT_DIAMETER_MM) -> dict:
    """The phantom's layout for a ``diameter_mm`` body on a ``size`` x ``size`` grid of
    ``pixel_mm`` pixels (JSON-ready; ``size`` default :func:`qa_size_for`).

    The insert rings' radii scale with ``diameter_mm / QA_REFERENCE_DIAMETER_MM``. Centres are
    snapped to pixel centres (``centre_px`` = (row, col), integers) and ``centre_mm`` = (x, y)
    is recomputed from them, so both describe the same point.
    """
    if not (np.isfinite(diameter_mm) and 100.0 <= diameter_mm <= 500.0):
        raise ctio.CTDataError(f"--qa-diameter {diameter_mm:g}: need 100 to 500 mm")
    size = qa_size_for(diameter_mm, pixel_mm) if size is None else int(size)
    radius_px = diameter_mm / 2 / pixel_mm
    if size // 2 - radius_px < 4:
        raise ctio.CTDataError(
            f"--qa: a {size} px grid of {pixel_mm:g} mm pixels ({size * pixel_mm:.0f} mm) does "
            f"not hold the {diameter_mm:g} mm body inside its reconstruction circle; "
            "use a larger --qa-size or --pixel-mm")
    c = (size - 1) / 2.0
    scale = diameter_mm / QA_REFERENCE_DIAMETER_MM

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
            pos = place(scale * radius * np.cos(angle), scale * radius * np.sin(angle))
            if k % 2:
                backgrounds[str(ring)].append(pos)
                continue
            d, hu = pairs[k // 2]
            inserts.append({"name": f"{d:g}mm_{hu:+g}HU", "kind": "low-contrast", "ring": ring,
                            "diameter_mm": d, "radius_px": d / 2 / pixel_mm,
                            "contrast_hu": hu, "hu": QA_BODY_HU + hu,
                            "mita": (d, hu) in QA_MITA, **pos})
    for hu, d, (x, y) in QA_RODS:
        inserts.append({"name": f"rod_{hu:+g}HU", "kind": "rod", "ring": None, "diameter_mm": d,
                        "radius_px": d / 2 / pixel_mm, "contrast_hu": hu - QA_BODY_HU, "hu": hu,
                        **place(x, y)})
    return {"size": size, "pixel_mm": pixel_mm, "fov_mm": size * pixel_mm,
            "coordinates": "centre_px = (row, col), pixel centres at integers; centre_mm = "
                           "(x right, y down) in mm from the image centre ((size - 1) / 2)",
            "body": {"diameter_mm": float(diameter_mm), "hu": QA_BODY_HU,
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
    img[np.hypot(yy - c, xx - c) * px <= geometry["body"]["diameter_mm"] / 2] = QA_BODY_HU
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
    inside = circle_mask(n)
    rel = np.where(inside, np.asarray(truth_hu, np.float64) - QA_AIR_HU, 0.0)  # air = 0
    theta = np.linspace(0.0, 180.0, int(views), endpoint=False)
    rec = iradon(radon(rel, theta, circle=True), theta, output_size=n, circle=True,
                 filter_name=filter_name)
    out = np.asarray(truth_hu, np.float64).copy()
    out[inside] = rec[inside] + QA_AIR_HU
    return out.astype(np.float32)


def uniform_mask(geometry: dict, margin_mm: float = QA_UNIFORM_MARGIN_MM) -> np.ndarray:
    """The uniform body region: inside the body by ``margin_mm`` and ``margin_mm`` away from
    every insert and rod (bool, the grid of ``geometry``)."""
    n, px = geometry["size"], geometry["pixel_mm"]
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    c = geometry["body"]["centre_px"]
    m = margin_mm / px
    mask = np.hypot(yy - c[0], xx - c[1]) <= geometry["body"]["diameter_mm"] / 2 / px - m
    for ins in geometry["inserts"]:
        r0, c0 = ins["centre_px"]
        mask &= np.hypot(yy - r0, xx - c0) > ins["radius_px"] + m
    return mask


def noise_std(stack: np.ndarray, full_dose: np.ndarray, mask: np.ndarray) -> float:
    """Noise std (HU) of realisations ``stack`` [R, n, n] about the noiseless ``full_dose`` over
    ``mask``, pooled over the realisations."""
    return float(np.sqrt(np.mean((np.asarray(stack, np.float64) - full_dose)[:, mask] ** 2)))


def qa_series_name(dose: float) -> str:
    """Folder / series name of one dose of the ladder: 1.0 -> dose100, 0.25 -> dose025."""
    return f"dose{round(dose * 100):03d}"


def qa_seed(seed: int, dose: float, k: int) -> tuple[int, int, int]:
    """Seed tuple of realisation ``k`` at ``dose`` (per mille): independent of the ladder."""
    return int(seed), int(round(dose * 1000)), int(k)


def make_qa(out, *, diameters: Sequence[float] = (QA_DEFAULT_DIAMETER_MM,),
            size: Optional[int] = None, pixel_mm: float = QA_PIXEL_MM,
            doses: Sequence[float] = QA_DOSES, realisations: int = QA_REALISATIONS,
            seed: int = 0, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the QA phantom at one or more body ``diameters`` (mm) to ``out``; return ``out``.

    One diameter: ``out`` is the phantom folder (:func:`write_qa_phantom`). Several: one phantom
    folder ``out/dNNNmm/`` per diameter and ``out/qa_sizes.json`` ({"sizes": {folder: diameter}}).
    ``size`` (pixels) only with one diameter; by default the matrix follows the size
    (:func:`qa_size_for`). Built in a temporary folder, renamed when complete."""
    out = Path(out)
    doses = [float(d) for d in doses]
    diameters = [float(d) for d in diameters]
    if realisations < 2:
        raise ctio.CTDataError(f"--realisations {realisations}: need at least 2 (the "
                               "detectability and noise figures compare realisations)")
    if not doses or any(not (0.0 < d <= 1.0) for d in doses) or len(set(doses)) != len(doses):
        raise ctio.CTDataError(f"--qa-doses {doses}: need distinct doses in (0, 1]")
    if not diameters or len(set(diameters)) != len(diameters):
        raise ctio.CTDataError(f"--qa-diameter {diameters}: need distinct diameters")
    if size is not None and (size < 32 or len(diameters) > 1):
        raise ctio.CTDataError("--qa-size needs one --qa-diameter and >= 32 pixels")
    if not (np.isfinite(pixel_mm) and pixel_mm > 0):
        raise ctio.CTDataError("--qa needs --pixel-mm > 0")
    geometries = [qa_geometry(size, pixel_mm, d) for d in diameters]  # checked before writing
    check_out(out, overwrite)
    ctio.remove_stale_temporaries([out.parent])
    bar = Progress(len(diameters) * (len(doses) * realisations + 1), "qa") if progress else None
    with ctio.atomic_dir(out) as dest:
        if len(geometries) == 1:
            write_qa_phantom(dest, geometries[0], doses, realisations, seed, bar)
        else:
            sizes = {qa_size_folder(g["body"]["diameter_mm"]): g["body"]["diameter_mm"]
                     for g in geometries}
            for folder, g in zip(sizes, geometries):
                (dest / folder).mkdir()
                write_qa_phantom(dest / folder, g, doses, realisations, seed, bar)
            with ctio.atomic_path(dest / QA_SIZES_FILE) as tmp:
                tmp.write_text(json.dumps({"sizes": sizes}, indent=1) + "\n")
        write_marker(dest, {"tool": "Mysimulate.py --qa", "diameters_mm": diameters,
                            "pixel_mm": pixel_mm, "doses": doses, "realisations": realisations,
                            "seed": seed})
    return out


def qa_size_folder(diameter_mm: float) -> str:
    """Sub-folder of one body size when several are built: 300 -> d300mm."""
    return f"d{diameter_mm:g}mm"


def write_qa_phantom(dest: Path, geometry: dict, doses: Sequence[float], realisations: int,
                     seed: int, bar: Optional[Progress] = None) -> dict:
    """One phantom folder in ``dest`` (existing, empty): ``qa_truth.json`` (geometry, doses,
    seeds, I0, the noise std per dose in the uniform body region), ``npy/truth.npy`` (exact
    phantom), ``npy/full_dose.npy`` (noiseless FBP, :func:`qa_full_dose`), ``npy/doseNNN.npy``
    (the realisations, float32 HU, (realisations, size, size)) and the same as DICOM series
    ``dicom/full/`` and ``dicom/doseNNN/`` (one series per dose, one slice per realisation;
    ``MyDataLoader_test.py --data DEST/dicom`` reads them, each folder as one patient).
    Realisation ``k`` at dose ``b`` is ``simulate_low_dose(full_dose, b)`` with the calibrated
    I0 rescaled by :func:`matched_i0` and seed :func:`qa_seed`. Returns the truth dict.
    One piece: one output folder written in the order its docstring lists it."""
    start = time.time()
    pixel_mm = geometry["pixel_mm"]
    i0 = matched_i0(pixel_mm)
    truth = qa_truth_image(geometry)
    fd = qa_full_dose(truth)
    uniform = uniform_mask(geometry)
    study = ctio.new_uid()
    (dest / "npy").mkdir()
    ctio.write_npy(dest / "npy" / "truth.npy", truth)
    ctio.write_npy(dest / "npy" / "full_dose.npy", fd)
    series = {"full": _write_qa_series(dest, "full", [fd], study, pixel_mm,
                                       "QA phantom, full dose (noiseless FBP)")}
    if bar:
        bar.update(bar.done + 1)
    seeds, noise = {}, {}
    for dose, stack in _realisations(fd, doses, realisations, seed, pixel_mm, i0, bar):
        name = qa_series_name(dose)
        seeds[name] = [list(qa_seed(seed, dose, k)) for k in range(realisations)]
        noise[name] = round(noise_std(stack, fd, uniform), 2)
        ctio.write_npy(dest / "npy" / f"{name}.npy", stack)
        series[name] = _write_qa_series(dest, name, stack, study, pixel_mm,
                                        f"QA phantom, simulated dose {dose:g}")
    info = {"tool": "Mysimulate.py --qa", "version": 2, **geometry, "doses": list(doses),
            "realisations": realisations, "seed": seed, "seeds": seeds,
            "seed_rule": "numpy default_rng((seed, round(dose * 1000), realisation))",
            "i0": i0, "sigma_e": SIGMA_E_DEFAULT, "noise_views": N_VIEWS,
            "truth_views": QA_TRUTH_VIEWS, "fbp_filter": FBP_FILTER,
            "noise_hu": noise,
            "noise_region": f"uniform body region: {QA_UNIFORM_MARGIN_MM:g} mm inside the body "
                            "and away from every insert and rod; std of realisation - full "
                            "dose, pooled over the realisations",
            "full_dose": "noiseless: the exact phantom (npy/truth.npy) through the "
                         f"simulator's FBP chain ({QA_TRUTH_VIEWS} views, {FBP_FILTER} "
                         "filter), no noise; low dose = full dose + FBP of the inserted "
                         "noise (ctdose.simulate_low_dose)",
            "dose_meaning": "noise of a dose-b scan of a noiseless object, relative to the "
                            "calibrated full dose (I0_DEFAULT, rescaled by matched_i0 for "
                            "the pixel size); the noise grows with the body diameter "
                            "(attenuation), I0 is not retuned",
            "series": series,
            "npy": {"truth": "npy/truth.npy", "full_dose": "npy/full_dose.npy",
                    **{qa_series_name(d): f"npy/{qa_series_name(d)}.npy" for d in doses}},
            "seconds": round(time.time() - start, 1)}
    with ctio.atomic_path(dest / QA_TRUTH) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    return info


def _realisation(fd: np.ndarray, dose: float, pixel_mm: float, seed: tuple, i0: float
                 ) -> np.ndarray:
    return simulate_pair_from_fd(fd, dose, pixel_mm, seed, i0=i0)


def _realisations(fd: np.ndarray, doses: Sequence[float], realisations: int, seed: int,
                  pixel_mm: float, i0: float, bar: Optional[Progress]):
    """Yield ``(dose, stack)`` in ladder order, the realisations simulated in one process per
    core (spawned: a caller may have imported TensorFlow). Each realisation has its own seed,
    so the result does not depend on the number of processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(os.cpu_count() or 1, realisations))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else _Serial() as pool:
        for dose in doses:
            futures = [pool.submit(_realisation, fd, dose, pixel_mm, qa_seed(seed, dose, k), i0)
                       for k in range(realisations)]
            stack = np.empty((realisations, *fd.shape), np.float32)
            for k, fut in enumerate(futures):
                stack[k] = fut.result()
                if bar:
                    bar.update(bar.done + 1)
            yield dose, stack


class _Serial:
    """ProcessPoolExecutor's submit/result in this process (one core)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut


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

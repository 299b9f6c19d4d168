"""Procedural test data: the demo anatomy (painters, ``make_demo``), the quick ``ellipse_phantom``
test image and the Mayo-size scale fixture (``make_mayo_like``). Library module; the noise is
``ctdose``'s calibrated simulator. Never imports TensorFlow."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

import ctio
from ctdose import (
    I0_DEFAULT,
    SIGMA_E_DEFAULT,
    Progress,
    check_out,
    matched_i0,
    pixel_size_mm,
    simulate_pair_from_fd,
    slice_seed,
    write_marker,
)

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
    check_out(out, overwrite)
    ctio.remove_stale_temporaries([out.parent])  # folders of killed earlier runs
    with ctio.atomic_dir(out) as dest:  # a killed run leaves no demo folder that looks complete
        _write_demo(dest, patients, slices, size, seed, dose, progress)
        write_marker(dest, {"tool": "Mysimulate.py --demo", "patients": patients,
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

Quarter dose: projection-domain Poisson + electronic noise insertion (see ctdose.py), I0
scaled for the pixel size so the noise level is like the real Mayo quarter-dose data.
"""
    with ctio.atomic_path(out / "README.txt") as tmp:
        tmp.write_text(readme)


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
    check_out(out, overwrite)
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
        write_marker(dest, {
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

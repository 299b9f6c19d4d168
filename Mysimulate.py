"""Simulate low-dose CT from full-dose slices, and build a procedural demo dataset: the command
line of the dose simulator (``ctdose``), the QA phantom (``ctphantom``) and the test fixtures
(``ctfixtures``).

The noise model, its calibration and the reasons for its choices are in ``ctdose``'s docstring.

Command line::

    python Mysimulate.py --input FD_DIR --dose 0.25 --out OUT [--seed N]   # paired dataset
    python Mysimulate.py --demo --out OUT [--patients 4 --slices 12 --size 256]
    python Mysimulate.py --calibrate DATA_DIR   # real vs simulated noise and CT-number offsets
    python Mysimulate.py --qa OUT [--realisations 16 --qa-doses 1 0.5 0.25 0.1]  # QA phantom
    python Mysimulate.py --mayo-like OUT [--patients 10 --slices 240 --size 512]  # scale fixture

This module never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

import ctdata
import ctio
from ctdose import (
    ASSUMED_FOV_MM,
    I0_DEFAULT,
    MARKER,
    SIGMA_E_DEFAULT,
    Progress,
    calibration_report,
    check_out,
    pixel_size_mm,
    series_factors,
    simulate_pair_from_fd,
    slice_i0,
    slice_seed,
    write_marker,
)
from ctfixtures import (
    CTSMALL,
    DEMO_PATIENTS,
    DEMO_SIZE,
    DEMO_SLICES,
    MAYO_LIKE_PATIENTS,
    MAYO_LIKE_SIZE,
    MAYO_LIKE_SLICES,
    demo_patient_names,
    make_demo,
    make_mayo_like,
)
from ctphantom import (
    QA_DEFAULT_DIAMETER_MM,
    QA_DOSES,
    QA_PIXEL_MM,
    QA_REALISATIONS,
    QA_SIZES_FILE,
    QA_TRUTH,
    make_qa,
    qa_series_name,
    qa_size_folder,
)


# --- Simulating a dataset from full-dose input --------------------------------------------------
def _copy_file(src, dst: Path) -> None:
    with ctio.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


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
    check_out(out, overwrite, [input_dir])
    ds = ctdata.discover(input_dir, layout, single_role="fd")
    records = [r for r in ds.records if r.fd_path]
    if not records:
        raise ctio.CTDataError(f"{input_dir}: no full-dose slices found (layout {ds.layout}); "
                               "give full-dose input (clean/, *_target.npy, full_* or DICOM)")
    for rec in records:  # a corrupt or NaN slice fails here, before anything is written
        ctio.read_slice(rec.fd_path)
    factors = series_factors(records) if ds.layout in ("mayo", "dicom", "tree") else {}
    start = time.time()
    bar = Progress(len(records), f"simulating dose {dose:g}") if progress else None
    ctio.remove_stale_temporaries([out.parent])  # folders of killed earlier runs
    with ctio.atomic_dir(out) as dest:
        counters: dict[Path, int] = {}
        anisotropic: dict[str, list[float]] = {}  # series folder -> PixelSpacing, noted once
        for done, rec in enumerate(records, 1):
            fd, header = ctio.read_slice(rec.fd_path)
            px = pixel_size_mm(header, fd.shape, pixel_mm)
            if pixel_mm is None:
                _note_anisotropic(header, rec, px, anisotropic)
            ld = simulate_pair_from_fd(fd, dose, px, slice_seed(seed, rec.patient, rec.slice_id),
                                       i0=slice_i0(header, i0, factors.get(rec.fd_path, 1.0)),
                                       sigma_e=sigma_e)
            np.maximum(ld, ctio.HU_MIN, out=ld)  # air noise below -1024 HU: clipped like real data
            _write_simulated(dest, ds.layout, rec, ld, fd, header, dose, seed, counters)
            if bar:
                bar.update(done)
        write_marker(dest, {"tool": "Mysimulate.py --input", "input": str(input_dir.resolve()),
                             "layout": ds.layout, "dose": dose, "seed": seed, "i0": i0,
                             "sigma_e": sigma_e, "pixel_mm": pixel_mm, "slices": len(records),
                             "anisotropic_pixel_spacing": anisotropic or None})
    return {"layout": ds.layout, "patients": sorted({r.patient for r in records}),
            "slices": len(records), "seconds": time.time() - start}


def _note_anisotropic(header, rec: ctdata.SliceRecord, px: float,
                      seen: dict[str, list[float]]) -> None:
    """The simulator projects square pixels: a slice whose two PixelSpacing values differ (by
    more than 1 %) is simulated at their mean ``px``; say so once per series (stderr note, and
    SIMULATION.json's ``anisotropic_pixel_spacing``)."""
    spacing = header.get("PixelSpacing") if header is not None else None
    if spacing is None or len(spacing) != 2:
        return
    a, b = (float(v) for v in spacing)
    folder = str(Path(rec.fd_path).parent)
    if abs(a - b) > 0.01 * max(a, b) and folder not in seen:
        seen[folder] = [a, b]
        print(f"note: {folder}: anisotropic PixelSpacing {a:g} x {b:g} mm; the simulation "
              f"projects square pixels of their mean, {px:g} mm (the noise level follows that "
              "mean, its texture is not stretched)", file=sys.stderr)


def _write_simulated(dest: Path, layout: str, rec: ctdata.SliceRecord, ld: np.ndarray,
                     fd: np.ndarray, header, dose: float, seed: int,
                     counters: dict[Path, int]) -> None:
    """Write one simulated slice and a copy of its full-dose source into ``dest``. A DICOM pair
    keeps one photometric interpretation: the simulated slice is written MONOCHROME2, so a
    MONOCHROME1 full dose is re-encoded MONOCHROME2 (same HU, new SOP instance, DERIVED) rather
    than byte-copied."""
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
        if str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            fd_uid = ctio.derived_series_uid(header, src, "full dose re-encoded MONOCHROME2")
            ctio.write_dicom(fdir / f"{k:04d}.dcm", fd, header, series_uid=fd_uid,
                             description=f"full dose (MONOCHROME2) from {old}"[:64] if old
                             else "full dose (MONOCHROME2)", derived=True)
        else:
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
                      help="print real vs simulated noise figures and the real pairs' CT-number "
                           "offsets against quantum noise (shared sample data)")
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
    ap.add_argument("--qa-diameter", type=float, nargs="+", default=[QA_DEFAULT_DIAMETER_MM],
                    metavar="MM",
                    help="--qa: body diameter(s) in mm (water cylinder; the default, an adult "
                         "abdomen, has real-quarter-dose-like noise at 25 %%); several: one "
                         f"phantom folder OUT/dNNNmm per size and OUT/{QA_SIZES_FILE}")
    ap.add_argument("--qa-size", type=int, default=None,
                    help="--qa: image size in pixels (default: follows the diameter at "
                         f"--pixel-mm, default {QA_PIXEL_MM:g} mm)")
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
        out = make_qa(args.qa, diameters=args.qa_diameter, size=args.qa_size,
                      pixel_mm=args.pixel_mm or QA_PIXEL_MM, doses=args.qa_doses,
                      realisations=args.realisations, seed=args.seed,
                      overwrite=args.overwrite, progress=True)
        print(f"QA phantom: {out} ({len(args.qa_doses)} doses x {args.realisations} "
              f"realisations) in {time.time() - t:.1f} s")
        for d in args.qa_diameter:
            folder = out if len(args.qa_diameter) == 1 else out / qa_size_folder(d)
            truth = json.loads((folder / QA_TRUTH).read_text())
            noise = ", ".join(f"{dose:g}: {truth['noise_hu'][qa_series_name(dose)]:.1f}"
                              for dose in truth["doses"])
            print(f"  {d:g} mm body, {truth['size']} px of {truth['pixel_mm']:g} mm: noise std "
                  f"in the uniform body region (HU) at dose {noise}; truth {folder / QA_TRUTH}")
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

"""Shared CT file I/O: read slices to HU, find and pair datasets, write outputs safely.

Everything that touches CT files on disk lives here, so that the training loader, the test loader,
the simulator and ``Mytest.py`` read and write data in exactly one way.

Conventions defined here and nowhere else:

* Normalisation: HU clipped to ``[HU_MIN, HU_MAX]`` = [-1024, 3072] -> ``(HU + 1024) / 4096``.
* The metric protocol (``EVAL_WINDOW``, ``PROTOCOL``) printed with every table.
* ``CTDataError``: a problem with the user's input. CLIs print its one-line message and exit 2.
* Outputs are written to a temporary name in the target folder and renamed (``atomic_path``).

Layouts understood by :func:`discover` (see the README for examples):

* ``mayo``  ``ROOT/<patient>/{quarter_*,full_*}/`` DICOM (or ``ROOT/{quarter_*,full_*}/`` for one
  patient). QD/FD paired by slice position, never by listing order.
* ``npy``   RED-CNN ``<patient>_<idx>_input.npy`` (QD) / ``_target.npy`` (FD), HU = v*4096 - 1024.
* ``tif``   CNCL ``noisy/`` (QD) and ``clean/`` (FD) with identical file names, float HU.
* ``dicom`` one unpaired DICOM series per folder (``ROOT/*.dcm`` or ``ROOT/<patient>/*.dcm``):
  low-dose input for inference, or full dose for simulation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

# --- Normalisation and metric protocol (defined once for the whole project) --------------------
HU_MIN = -1024.0  # air; also the value given to padding / out-of-field pixels
HU_MAX = 3072.0  # dense bone and metal beyond this carry no diagnostic soft-tissue information
HU_RANGE = HU_MAX - HU_MIN  # 4096: the normalised image is (HU - HU_MIN) / HU_RANGE
EVAL_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window used by RED-CNN and followers
FULL_RANGE = (HU_MIN, HU_MAX)  # whole normalised range, reported beside the window figures
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
    "redcnn": MetricProtocol(EVAL_WINDOW, None, "kept in HU",
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

LAYOUTS = ("mayo", "npy", "tif", "dicom")
# Files that may sit beside DICOM slices in hospital exports and are not slices.
_NOT_SLICES = {".txt", ".md", ".json", ".csv", ".xml", ".pdf", ".jpg", ".jpeg", ".png", ".zip",
               ".log", ".ini", ".html", ".py"}
_POSITION_TOL_MM = 0.01  # QD and FD slices of one position agree to well below this
_SPACING_TOL_MM = 1e-3  # QD and FD pixel spacings of one position agree to well below this
_AXIAL_MIN_COS = 0.9  # |slice normal . table axis| below this (tilt > ~25 deg): not axial
_NPY_NAME = re.compile(r"^(?P<patient>.+)_(?P<idx>\d+)_(?P<kind>input|target)\.npy$")


class CTDataError(Exception):
    """A problem with the user's data or arguments; the message is one line naming the file."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one CTDataError line (run_cli prints it and exits 2)."""

    def error(self, message):
        raise CTDataError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default, except for required options and options whose default is
    decided at run time (None; their help text says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def normalize(hu):
    """HU -> [0, 1]: clip to [HU_MIN, HU_MAX], then (HU - HU_MIN) / HU_RANGE (numpy or tf)."""
    if isinstance(hu, np.ndarray) or np.isscalar(hu):
        return ((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE).astype(np.float32)
    import tensorflow as tf

    return (tf.clip_by_value(hu, HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE


def denormalize(x):
    """[0, 1] -> HU (inverse of :func:`normalize` inside the clip range; numpy or tf)."""
    return x * HU_RANGE + HU_MIN


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and TensorFlow in one call."""
    import_tensorflow()  # quietly, before keras loads it
    import keras

    keras.utils.set_random_seed(int(seed))


def import_tensorflow():
    """Import TensorFlow without the C++ start-up chatter it writes to stderr.

    TF's absl logging prints lines such as "Could not find cuda drivers" before Python can
    configure it, even with TF_CPP_MIN_LOG_LEVEL=3. CLIs promise one clean line on stderr for bad
    input, so the import (and device discovery) runs with file descriptor 2 pointed at /dev/null.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
            tf.get_logger().setLevel("ERROR")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tf


# --- Reading single slices ----------------------------------------------------------------------
def _unreadable(path, kind: str, e: Exception) -> CTDataError:
    return CTDataError(f"{path}: not a readable {kind} file ({type(e).__name__}: {e})")


def _check_image(hu: np.ndarray, path) -> np.ndarray:
    if hu.ndim != 2:
        raise CTDataError(f"{path}: expected a 2-D slice, got an array of shape {hu.shape}")
    if min(hu.shape) < 8:
        raise CTDataError(f"{path}: slice of shape {hu.shape} is too small to be a CT image")
    if not np.all(np.isfinite(hu)):
        raise CTDataError(f"{path}: contains NaN or infinite values")
    return hu.astype(np.float32, copy=False)


def read_dicom_header(path, with_pixels: bool = False):
    """Read a DICOM file with pydicom; a non-DICOM, corrupt or non-CT file is a CTDataError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:  # pydicom warns on truncation
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=not with_pixels)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
            raise _unreadable(path, "DICOM", e) from None
    eof = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if eof or len(ds) == 0:
        raise CTDataError(f"{path}: truncated or corrupt DICOM file "
                          f"({eof[0] if eof else 'no data elements'})")
    modality = str(ds.get("Modality", "")).upper()
    if modality != "CT":
        raise CTDataError(f"{path}: modality is {modality or 'missing'}, not CT")
    if "Rows" not in ds or "Columns" not in ds:
        raise CTDataError(f"{path}: DICOM without image size (Rows/Columns): truncated or "
                          "corrupt file, or not an image")
    return ds


def _check_decodable(ds, path) -> None:
    """CTDataError naming the file, its transfer syntax and the missing decoder package when
    pydicom cannot decode the pixel data here (checked before decoding, so a missing plug-in is
    not reported as a damaged file)."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    what = f"{path}: cannot decode transfer syntax {syntax.name} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise CTDataError(f"{what}: pydicom has no decoder for it; export the series "
                          "uncompressed or in another transfer syntax") from None
    if not decoder.is_available:
        needs = [d.split(" - requires ", 1)[-1] for d in decoder.missing_dependencies]
        raise CTDataError(f"{what}: no decoder package installed (needs one of: "
                          f"{'; '.join(needs)}); pip install -r requirements.txt")


def read_dicom(path) -> tuple[np.ndarray, object]:
    """DICOM slice -> (HU float32 [H, W], header without pixel data).

    HU = pydicom's modality LUT (RescaleSlope / RescaleIntercept, or a Modality LUT Sequence).
    Pixels equal to PixelPaddingValue and anything below -1024 HU (out-of-field) become -1024 HU.
    Compressed transfer syntaxes are decoded by pydicom (RLE) and its plug-ins in
    requirements.txt: pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-libjpeg (JPEG Lossless process
    14, JPEG baseline/extended, JPEG-LS), pyjpegls
    (JPEG-LS). A syntax without an installed decoder is a CTDataError naming the package.
    """
    from pydicom.pixels import apply_modality_lut

    ds = read_dicom_header(path, with_pixels=True)
    if "PixelData" not in ds:
        raise CTDataError(f"{path}: DICOM without pixel data")
    _check_decodable(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except Exception as e:  # pydicom raises many types for truncated or undecodable data
        raise CTDataError(f"{path}: cannot decode pixel data ({type(e).__name__}: {e})") from None
    if raw.ndim != 2:
        raise CTDataError(f"{path}: expected one 2-D frame, got pixel array of shape {raw.shape}")
    if "ModalityLUTSequence" not in ds:  # absent or EMPTY rescale tags (seen in the wild): identity
        ds.RescaleSlope = float(ds.get("RescaleSlope") or 1.0)
        ds.RescaleIntercept = float(ds.get("RescaleIntercept") or 0.0)
    hu = apply_modality_lut(raw, ds).astype(np.float32)
    pad = ds.get("PixelPaddingValue")
    if pad is not None:
        hu[raw == pad] = HU_MIN
    np.maximum(hu, HU_MIN, out=hu)
    del ds.PixelData
    return _check_image(hu, path), ds


def read_npy(path) -> np.ndarray:
    """RED-CNN .npy slice (values (HU + 1024) / 4096) -> HU float32."""
    try:
        v = np.load(str(path), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _unreadable(path, ".npy", e) from None
    if not np.issubdtype(v.dtype, np.number):
        raise CTDataError(f"{path}: .npy holds {v.dtype}, not numbers")
    return _check_image(np.asarray(v, np.float64) * HU_RANGE + HU_MIN, path)


def read_tif(path) -> np.ndarray:
    """CNCL float TIFF in HU, shape [H, W] or [1, H, W] -> HU float32."""
    import tifffile

    try:
        v = tifffile.imread(str(path))
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise _unreadable(path, "TIFF", e) from None
    if v.ndim == 3 and v.shape[0] == 1:
        v = v[0]
    return _check_image(np.asarray(v, np.float32), path)


def read_slice(path) -> tuple[np.ndarray, Optional[object]]:
    """Any supported slice file -> (HU float32 [H, W], DICOM header or None)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return read_npy(path), None
    if suffix in (".tif", ".tiff"):
        return read_tif(path), None
    return read_dicom(path)


def slice_shape(path) -> tuple[int, int]:
    """Image size from the header alone (no pixel decoding)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        try:
            v = np.load(str(path), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise _unreadable(path, ".npy", e) from None
        shape = tuple(v.shape)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(str(path)) as t:
                shape = tuple(t.series[0].shape)
        except Exception as e:
            raise _unreadable(path, "TIFF", e) from None
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
    else:
        ds = read_dicom_header(path)
        shape = (int(ds.Rows), int(ds.Columns))
    if len(shape) != 2:
        raise CTDataError(f"{path}: expected a 2-D slice, got shape {shape}")
    return shape


def slice_position(ds) -> float:
    """Table position of a DICOM slice: ImagePositionPatient z, else SliceLocation, else
    InstanceNumber (the pairing key for QD/FD)."""
    ipp = ds.get("ImagePositionPatient")
    if ipp is not None and len(ipp) == 3:
        return float(ipp[2])
    if ds.get("SliceLocation") is not None:
        return float(ds.SliceLocation)
    if ds.get("InstanceNumber") is not None:
        return float(ds.InstanceNumber)
    raise CTDataError(f"{getattr(ds, 'filename', '?')}: no ImagePositionPatient, SliceLocation "
                      "or InstanceNumber to order the slice by")


# --- Finding and pairing datasets ---------------------------------------------------------------
@dataclass
class SliceRecord:
    """One slice position: its identity and source files (either side may be missing)."""

    patient: str
    slice_id: str
    position: float
    ld_path: Optional[str]
    fd_path: Optional[str]
    shape: tuple[int, int]


@dataclass
class CTDataset:
    """The slices found under ``root``, sorted by patient and position."""

    layout: str
    root: str
    records: list[SliceRecord] = field(default_factory=list)

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient for r in self.records})

    @property
    def paired(self) -> bool:
        return bool(self.records) and all(r.ld_path and r.fd_path for r in self.records)

    @property
    def has_ld(self) -> bool:
        return bool(self.records) and all(r.ld_path for r in self.records)

    def for_patients(self, patients) -> CTDataset:
        keep = set(patients)
        return CTDataset(self.layout, self.root, [r for r in self.records if r.patient in keep])

    def select(self, include=None, exclude=None) -> CTDataset:
        """Keep the slices matching ``include`` and not ``exclude``.

        Each spec is ``PATIENT`` (all its slices) or ``PATIENT:SLICE`` (one slice id, as shown in
        the manifest, e.g. ``L506:160``). A spec matching nothing is a CTDataError (typo guard).
        """
        def matcher(specs):
            hits = {s: 0 for s in specs}

            def match(r):
                found = False
                for s in specs:
                    patient, _, sid = s.partition(":")
                    if r.patient == patient and (not sid or r.slice_id == sid):
                        hits[s] += 1
                        found = True
                return found
            return match, hits

        records = self.records
        for specs, keep in ((include, True), (exclude, False)):
            if specs:
                match, hits = matcher(list(specs))
                records = [r for r in records if match(r) == keep]
                unused = [s for s, n in hits.items() if n == 0]
                if unused:
                    raise CTDataError(f"{self.root}: no slice matches {unused[0]} "
                                      "(use PATIENT or PATIENT:SLICE)")
        return CTDataset(self.layout, self.root, records)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _slice_files(folder: Path) -> list[Path]:
    """Candidate slice files in one folder (hidden files, DICOMDIR and documents skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and _visible(p) and p.name.upper() != "DICOMDIR"
                  and p.suffix.lower() not in _NOT_SLICES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _dose_dirs(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """{suffix: dir} for ``quarter_<suffix>`` and ``full_<suffix>`` sub-folders."""
    qd, fd = {}, {}
    for d in _subdirs(folder):
        name = d.name.lower()
        if name.startswith("quarter_"):
            qd[d.name[len("quarter_"):]] = d
        elif name.startswith("full_"):
            fd[d.name[len("full_"):]] = d
    return qd, fd


class _DicomSlice(NamedTuple):
    """Header facts of one DICOM slice that discovery and pairing need (no pixels decoded)."""

    position: float
    path: Path
    shape: tuple[int, int]
    spacing: Optional[tuple[float, float]]  # PixelSpacing (row, column) in mm, if present


def pixel_spacing(ds) -> Optional[tuple[float, float]]:
    """PixelSpacing (row, column) in mm, or None when absent or unreadable."""
    try:
        row, col = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return row, col


def not_an_axial_slice(ds) -> Optional[str]:
    """Why a CT image is not an axial slice (a LOCALIZER / scout, or an ImageOrientationPatient
    whose normal is more than ~25 degrees off the table axis), or None for an axial slice."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "a LOCALIZER image"
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return None  # no orientation: nothing says it is not axial
    if iop.size != 6:
        return None
    normal = np.cross(iop[:3], iop[3:])
    if abs(normal[2]) < _AXIAL_MIN_COS * max(float(np.linalg.norm(normal)), 1e-9):
        return f"not axial (ImageOrientationPatient {'/'.join(f'{v:g}' for v in iop)})"
    return None


def _dicom_series(folder: Path) -> list[_DicomSlice]:
    """Every axial DICOM slice in ``folder``, sorted by position. Localizers and non-axial
    images are skipped with one printed line per folder."""
    items, skipped = [], []
    for f in _slice_files(folder):
        ds = read_dicom_header(f)
        why = not_an_axial_slice(ds)
        if why:
            skipped.append((f, why))
            continue
        items.append(_DicomSlice(slice_position(ds), f, (int(ds.Rows), int(ds.Columns)),
                                 pixel_spacing(ds)))
    if skipped:
        print(f"note: skipped {len(skipped)} image(s) that are not axial slices in {folder} "
              f"(first: {skipped[0][0].name}, {skipped[0][1]})")
    items.sort(key=lambda t: t.position)
    for a, b in zip(items, items[1:]):
        if abs(a.position - b.position) < _POSITION_TOL_MM:
            raise CTDataError(f"{b.path}: same slice position {b.position:g} as {a.path} "
                              "(two series mixed in one folder?)")
    _check_one_size([(t.path, t.shape) for t in items], folder)
    return items


def _check_one_size(files_shapes, where) -> None:
    if not files_shapes:
        return
    f0, s0 = files_shapes[0]
    for f, s in files_shapes[1:]:
        if s != s0:
            raise CTDataError(f"{where}: mixed slice sizes: {f0} is {s0[0]}x{s0[1]} but "
                              f"{f} is {s[0]}x{s[1]}")


def _check_same_grid(q: _DicomSlice, f: _DicomSlice) -> None:
    """QD and FD of one position must share the table position, size and pixel spacing."""
    if abs(q.position - f.position) > _POSITION_TOL_MM:
        raise CTDataError(f"slice position mismatch: {q.path} at {q.position:g} mm vs {f.path} "
                          f"at {f.position:g} mm")
    if q.shape != f.shape:
        raise CTDataError(f"size mismatch: {q.path} is {q.shape[0]}x{q.shape[1]} but {f.path} "
                          f"is {f.shape[0]}x{f.shape[1]}")
    if (q.spacing is None) != (f.spacing is None) or (
            q.spacing and not np.allclose(q.spacing, f.spacing, rtol=0, atol=_SPACING_TOL_MM)):
        def mm(s):
            return "no PixelSpacing" if s is None else f"{s[0]:g}x{s[1]:g} mm pixels"
        raise CTDataError(f"pixel spacing mismatch: {q.path} has {mm(q.spacing)} but {f.path} "
                          f"has {mm(f.spacing)} (another field of view)")


def _pair_by_position(patient: str, qd_dir: Optional[Path], fd_dir: Optional[Path],
                      prefix: str = "") -> list[SliceRecord]:
    qd = _dicom_series(qd_dir) if qd_dir else []
    fd = _dicom_series(fd_dir) if fd_dir else []
    if qd_dir and fd_dir:
        if not qd or not fd:
            empty = qd_dir if not qd else fd_dir
            raise CTDataError(f"{empty}: no DICOM slices, but its counterpart has some")
        if len(qd) != len(fd):
            qpos = {round(t.position, 2) for t in qd}
            fpos = {round(t.position, 2) for t in fd}
            odd = ([t.path for t in qd if round(t.position, 2) not in fpos]
                   + [t.path for t in fd if round(t.position, 2) not in qpos])
            first = f"; first unmatched: {odd[0]}" if odd else ""
            raise CTDataError(f"{qd_dir} has {len(qd)} slices but {fd_dir} has {len(fd)}{first}")
        for q, f in zip(qd, fd):
            _check_same_grid(q, f)
        return [SliceRecord(patient, f"{prefix}{i:04d}", q.position, str(q.path), str(f.path),
                            q.shape) for i, (q, f) in enumerate(zip(qd, fd))]
    side = qd or fd
    return [SliceRecord(patient, f"{prefix}{i:04d}", t.position, str(t.path) if qd else None,
                        str(t.path) if fd else None, t.shape) for i, t in enumerate(side)]


def _discover_mayo(root: Path) -> list[SliceRecord]:
    qd, fd = _dose_dirs(root)
    patient_dirs = [(root.name, root)] if (qd or fd) else [(d.name, d) for d in _subdirs(root)]
    records = []
    for patient, pdir in patient_dirs:
        qd, fd = _dose_dirs(pdir)
        if not qd and not fd:
            continue
        if qd and fd and set(qd) != set(fd):
            raise CTDataError(f"{pdir}: quarter_* folders {sorted(qd)} do not match full_* "
                              f"folders {sorted(fd)}")
        suffixes = sorted(set(qd) | set(fd))
        for suffix in suffixes:
            prefix = f"{suffix}_" if len(suffixes) > 1 else ""
            records += _pair_by_position(patient, qd.get(suffix), fd.get(suffix), prefix)
    return records


def _discover_npy(root: Path) -> list[SliceRecord]:
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for f in _slice_files(root):
        m = _NPY_NAME.match(f.name)
        if m:
            found.setdefault((m["patient"], int(m["idx"])), {})[m["kind"]] = f
    any_target = any("target" in v for v in found.values())
    any_input = any("input" in v for v in found.values())
    records = []
    for (patient, idx), files in sorted(found.items()):
        if any_target and any_input and len(files) != 2:
            have = next(iter(files.values()))
            missing = "target" if "input" in files else "input"
            raise CTDataError(f"{have}: no matching _{missing}.npy file")
        ld, fd = files.get("input"), files.get("target")
        shapes = [(f, slice_shape(f)) for f in (ld, fd) if f]
        _check_one_size(shapes, f"{patient} slice {idx}")
        records.append(SliceRecord(patient, str(idx), float(idx), ld and str(ld),
                                   fd and str(fd), shapes[0][1]))
    return records


def _discover_tif(root: Path) -> list[SliceRecord]:
    noisy, clean = root / "noisy", root / "clean"
    ld = {f.name: f for f in _slice_files(noisy)} if noisy.is_dir() else {}
    fd = {f.name: f for f in _slice_files(clean)} if clean.is_dir() else {}
    if ld and fd and set(ld) != set(fd):
        odd = sorted(set(ld) ^ set(fd))[0]
        where = noisy / odd if odd in ld else clean / odd
        raise CTDataError(f"{where}: no file of the same name in "
                          f"{clean if odd in ld else noisy}")
    records = []
    for i, name in enumerate(sorted(ld or fd)):
        stem = Path(name).stem
        patient = stem.split("_")[0] if "_" in stem else root.name
        files = [f for f in (ld.get(name), fd.get(name)) if f]
        shapes = [(f, slice_shape(f)) for f in files]
        _check_one_size(shapes, name)
        records.append(SliceRecord(patient, stem, float(i), ld.get(name) and str(ld[name]),
                                   fd.get(name) and str(fd[name]), shapes[0][1]))
    return records


def _discover_dicom(root: Path, role: str) -> list[SliceRecord]:
    folders = [root] if _slice_files(root) else _subdirs(root)
    records = []
    for folder in folders:
        for i, t in enumerate(_dicom_series(folder)):
            ld, fd = (str(t.path), None) if role == "ld" else (None, str(t.path))
            records.append(SliceRecord(folder.name, f"{i:04d}", t.position, ld, fd, t.shape))
    return records


def detect_layout(root: Path) -> Optional[str]:
    """Guess the layout of ``root`` from folder and file names (no file is read)."""
    files = _slice_files(root)
    if any(_NPY_NAME.match(f.name) for f in files):
        return "npy"
    subs = _subdirs(root)
    names = {d.name for d in subs}
    if names & {"noisy", "clean"}:
        return "tif"
    qd, fd = _dose_dirs(root)
    if qd or fd or any(any(_dose_dirs(d)) for d in subs):
        return "mayo"
    if files or any(_slice_files(d) for d in subs):
        return "dicom"
    return None


def discover(root, layout: Optional[str] = None, single_role: str = "ld") -> CTDataset:
    """Find the slices under ``root`` and pair low dose with full dose.

    Args:
        root: dataset folder (see the module docstring for the layouts).
        layout: one of ``LAYOUTS`` to override auto-detection, or None.
        single_role: for the unpaired ``dicom`` layout, whether its slices are the low-dose input
            (``"ld"``, inference) or the full dose (``"fd"``, simulation / training).

    Raises CTDataError for a missing or empty folder, an unknown layout, unpaired or mismatched
    slices (naming the first offending files), unreadable headers, or mixed slice sizes.
    """
    root = Path(root)
    if layout is not None and layout not in LAYOUTS:
        raise CTDataError(f"unknown layout '{layout}' (choose from: {', '.join(LAYOUTS)})")
    if not root.exists():
        raise CTDataError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise CTDataError(f"{root}: not a folder (give the dataset folder)")
    try:
        if not any(root.iterdir()):
            raise CTDataError(f"{root}: empty folder")
        layout = layout or detect_layout(root)
        if layout is None:
            raise CTDataError(f"{root}: no CT slices found (expected a Mayo tree, *_input.npy/"
                              "*_target.npy, noisy/ + clean/ TIFFs, or DICOM files)")
        finder = {"mayo": _discover_mayo, "npy": _discover_npy, "tif": _discover_tif,
                  "dicom": lambda r: _discover_dicom(r, single_role)}[layout]
        records = finder(root)
    except PermissionError as e:
        raise CTDataError(f"{e.filename}: permission denied") from None
    if not records:
        raise CTDataError(f"{root}: no CT slices found for layout '{layout}'")
    return CTDataset(layout, str(root), records)


# --- Writing outputs (never half-written) -------------------------------------------------------
def read_json(path, missing: str):
    """The parsed JSON in ``path`` (a run's config.json, a metrics.json, ...).

    Raises CTDataError ``missing`` when there is no such file, and one line naming the file when
    it is not readable JSON; checking the content's shape is the caller's part."""
    path = Path(path)
    if not path.is_file():
        raise CTDataError(missing)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise CTDataError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the suffix, so writers that choose the format from it still work.
    A killed process leaves at most a hidden ``.*.tmp*`` file, never a partial ``path``.
    """
    import threading

    path = Path(path)
    base, dot, rest = path.name.partition(".")  # keep every suffix: Keras wants ".weights.h5"
    # pid and thread: tf.data may write the same file from two threads of one process
    tmp = path.with_name(f".{base}.tmp{os.getpid()}.t{threading.get_ident()}{dot}{rest}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; when the block succeeds it becomes ``path``.

    An existing ``path`` is replaced (the caller decides whether that is allowed): it is renamed
    aside, the new folder renamed into place, then the old one deleted. If the block fails the
    temporary folder is deleted; a killed process leaves only a hidden ``.name.tmp<pid>`` folder
    (removed by :func:`remove_stale_temporaries`), never a partial ``path``.
    """
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.tmp{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def window01(hu, window=EVAL_WINDOW):
    """Map the HU window linearly to [0, 1], values outside clipped (numpy or tf): the one display
    windowing of PNGs, figures and TensorBoard panels."""
    lo, hi = window
    if isinstance(hu, np.ndarray) or np.isscalar(hu):
        return (np.clip(hu, lo, hi) - lo) / (hi - lo)
    import tensorflow as tf

    return (tf.clip_by_value(hu, lo, hi) - lo) / (hi - lo)


def window_to_uint8(hu: np.ndarray, window=EVAL_WINDOW) -> np.ndarray:
    """Map the HU window linearly to 0..255 (values outside are clipped)."""
    return np.round(window01(hu, window) * 255.0).astype(np.uint8)


def label_panel(img: np.ndarray, text: str) -> None:
    """Write ``text`` into the top-left corner of an RGB uint8 panel (white on a black outline,
    sized with the panel), in place."""
    import cv2

    scale = max(0.35, min(img.shape[:2]) / 512 * 0.6)
    org = (max(2, int(6 * scale)), max(10, int(22 * scale)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, int(round(scale * 1.5)))
    cv2.putText(img, text, org, font, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, org, font, scale, (255, 255, 255), thick, cv2.LINE_AA)


def write_png(path, image: np.ndarray) -> None:
    """Write an 8-bit (gray or BGR) image atomically."""
    import cv2

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise CTDataError(f"{path}: could not write PNG")


def write_tiff(path, hu: np.ndarray) -> None:
    """Float32 HU TIFF (the CNCL layout) written atomically."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(str(tmp), np.asarray(hu, np.float32))


def write_npy(path, hu: np.ndarray) -> None:
    """Float32 HU .npy written atomically (note: plain HU, not the RED-CNN normalisation)."""
    with atomic_path(path) as tmp:
        np.save(str(tmp), np.asarray(hu, np.float32))


def write_npy_redcnn(path, hu: np.ndarray) -> None:
    """RED-CNN convention .npy ((HU + 1024) / 4096, float64) written atomically."""
    with atomic_path(path) as tmp:
        np.save(str(tmp), ((np.asarray(hu, np.float64) - HU_MIN) / HU_RANGE))


def new_uid() -> str:
    import pydicom.uid

    return pydicom.uid.generate_uid()


def derived_series_uid(header, source_path, derivation: str) -> str:
    """SeriesInstanceUID of a series derived from ``header``'s series by ``derivation`` (e.g.
    the denoising weights' hash): the same source series and derivation always give the same
    UID, so reruns and partial reruns add to one series, and each source series gets its own.
    A source without SeriesInstanceUID (anonymised) is identified by its folder."""
    import pydicom.uid

    source = str(header.get("SeriesInstanceUID", "") or "").strip()
    if not source:
        source = f"folder:{Path(source_path).resolve().parent}"
    return pydicom.uid.generate_uid(entropy_srcs=[source, derivation])


def hu_to_stored(hu: np.ndarray, ds) -> np.ndarray:
    """HU -> stored pixel values with the header's rescale and pixel representation."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.get("BitsStored", 16))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    raw = np.clip(np.round((np.asarray(hu, np.float64) - intercept) / slope), lo, hi)
    return raw.astype(np.int16 if signed else np.uint16)


def sop_class_uid(ds) -> str:
    """The header's SOPClassUID; anonymised files may leave it empty, then the file meta's
    MediaStorageSOPClassUID, else CT Image Storage (only CT is read here)."""
    import pydicom.uid

    meta = getattr(ds, "file_meta", None)
    for uid in (ds.get("SOPClassUID"), meta and meta.get("MediaStorageSOPClassUID")):
        if uid and str(uid).strip():
            return str(uid).strip()
    return pydicom.uid.CTImageStorage


def write_dicom(path, hu: np.ndarray, header, *, series_uid: str, description: str,
                derived: bool = True, series_number: Optional[int] = None) -> None:
    """Write ``hu`` as a DICOM slice that keeps ``header``'s patient, study and geometry.

    Pixels are re-encoded with the header's rescale (uncompressed, explicit VR little endian);
    SeriesInstanceUID is ``series_uid``, SOPInstanceUID is new, and ``description`` goes into
    SeriesDescription. ``derived`` marks ImageType DERIVED\\SECONDARY.
    """
    import copy

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = copy.deepcopy(header)
    if hasattr(ds, "PixelData"):
        del ds.PixelData
    hu = np.asarray(hu, np.float32)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    if "PixelRepresentation" not in ds:
        ds.PixelRepresentation = 1
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024 if ds.PixelRepresentation == 0 else 0
    for tag in ("PixelPaddingValue", "PixelPaddingRangeLimit", "SmallestImagePixelValue",
                "LargestImagePixelValue", "LossyImageCompression"):
        if tag in ds:
            delattr(ds, tag)
    ds.PixelData = hu_to_stored(hu, ds).tobytes()
    ds["PixelData"].VR = "OW"
    sop = new_uid()
    ds.SOPInstanceUID = sop
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description[:64]
    if series_number is not None:
        ds.SeriesNumber = series_number
    if derived:
        ds.ImageType = ["DERIVED", "SECONDARY"]
    meta = pydicom.dataset.FileMetaDataset(getattr(ds, "file_meta", pydicom.dataset.Dataset()))
    ds.SOPClassUID = sop_class_uid(ds)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    pydicom.dataset.validate_file_meta(ds.file_meta, enforce_standard=True)
    with atomic_path(path) as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)


def new_ct_header(*, patient_id: str, study_uid: str, series_uid: str, instance: int,
                  z_mm: float, shape: tuple[int, int], pixel_mm: float = 0.7,
                  thickness_mm: float = 3.0, description: str = "", kvp: float = 100.0):
    """A minimal but valid CT image header (uint16, intercept -1024), for generated data."""
    import datetime

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientID = ds.PatientName = patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 60 else study_uid
    ds.StudyDate = ds.SeriesDate = datetime.date(2016, 1, 1).strftime("%Y%m%d")
    ds.Manufacturer = "CNCL procedural phantom"
    ds.SeriesDescription = description[:64]
    ds.SeriesNumber, ds.InstanceNumber = 1, int(instance)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-pixel_mm * shape[1] / 2, -pixel_mm * shape[0] / 2, float(z_mm)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = float(z_mm)
    ds.SliceThickness = thickness_mm
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.KVP = kvp
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    return ds


_TMP_NAME = re.compile(r"^\..+\.tmp(?P<pid>\d+)(\..*)?$")  # atomic_path temporaries


def remove_stale_temporaries(folders) -> int:
    """Delete atomic_path / atomic_dir temporaries (``.name.tmp<pid>.ext`` files and folders) of
    processes that no longer run (a killed writer leaves them); returns how many were removed."""
    import shutil

    removed = 0
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TMP_NAME.match(p.name)
            if not m or not (p.is_file() or p.is_dir()):
                continue
            pid = int(m["pid"])
            if pid != os.getpid():
                try:
                    os.kill(pid, 0)
                    continue  # a live process may still be writing it
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
    return removed


# --- CLI plumbing -------------------------------------------------------------------------------
def run_cli(main) -> None:
    """Run ``main()`` and turn expected failures into one line on stderr and a non-zero exit.

    CTDataError and argument errors exit 2; Ctrl-C exits 130; any other exception prints one line
    (set CNCL_DEBUG=1 to see the traceback) and exits 1.
    """
    if not os.environ.get("CNCL_DEBUG"):
        warnings.simplefilter("ignore")  # library warnings would break the one-line contract
    try:
        code = main()
    except CTDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("CNCL_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {type(e).__name__}: {msg[:500]} (set CNCL_DEBUG=1 for details)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


# --- Dataset summaries (the loaders' check-my-data commands) -----------------------------------
def summarize(dataset: CTDataset) -> dict:
    """Layout, patients, counts, sizes and HU range of each side.

    Reads every slice, one at a time, so a corrupt file, NaN/inf or a pair of different sizes
    raises CTDataError here rather than during training.
    """
    lo = {"ld": np.inf, "fd": np.inf}
    hi = {"ld": -np.inf, "fd": -np.inf}
    for r in dataset.records:
        shapes = []
        for side, path in (("ld", r.ld_path), ("fd", r.fd_path)):
            if path:
                img = read_slice(path)[0]
                shapes.append((path, img.shape))
                lo[side] = min(lo[side], float(img.min()))
                hi[side] = max(hi[side], float(img.max()))
        _check_one_size(shapes, f"{r.patient} slice {r.slice_id}")
    return {
        "layout": dataset.layout,
        "patients": {p: sum(r.patient == p for r in dataset.records) for p in dataset.patients},
        "slices": len(dataset.records),
        "pairs": sum(bool(r.ld_path and r.fd_path) for r in dataset.records),
        "sizes": sorted({f"{r.shape[0]}x{r.shape[1]}" for r in dataset.records}),
        "hu_range": {k: (lo[k], hi[k]) for k in lo if np.isfinite(lo[k])},
    }


def print_summary(info: dict, data) -> None:
    """Print :func:`summarize`'s result for a person."""
    pats = ", ".join(f"{p} ({n})" for p, n in info["patients"].items())
    print(f"data:      {data}")
    print(f"layout:    {info['layout']}")
    print(f"patients:  {len(info['patients'])}: {pats}")
    print(f"slices:    {info['slices']}  (QD/FD pairs: {info['pairs']})")
    print(f"size:      {', '.join(info['sizes'])}")
    for side, name in (("ld", "LD (input)"), ("fd", "FD (reference)")):
        if side in info["hu_range"]:
            lo, hi = info["hu_range"][side]
            print(f"HU {name}: [{lo:.0f}, {hi:.0f}]")

"""Shared CT file I/O: read one slice to HU, write outputs safely (finding and pairing datasets
is ``ctdata``'s part).

Everything that touches CT files on disk lives here, so that the training loader, the test loader,
the simulator and ``Mytest.py`` read and write data in exactly one way.

Conventions defined here and nowhere else:

* Normalisation: HU clipped to ``[HU_MIN, HU_MAX]`` = [-1024, 3072] -> ``(HU + 1024) / 4096``.
* The display / evaluation window ``EVAL_WINDOW`` (the metric protocols live in ctmetrics).
* ``CTDataError``: a problem with the user's input. CLIs print its one-line message and exit 2.
* Outputs are written to a temporary name in the target folder and renamed (``atomic_path``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

# --- Normalisation and display window (defined once for the whole project) ----------------------
HU_MIN = -1024.0  # air; also the value given to padding / out-of-field pixels
HU_MAX = 3072.0  # dense bone and metal beyond this carry no diagnostic soft-tissue information
HU_RANGE = HU_MAX - HU_MIN  # 4096: the normalised image is (HU - HU_MIN) / HU_RANGE
EVAL_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window used by RED-CNN and followers

_AXIAL_MIN_COS = 0.9  # |slice normal . table axis| below this (tilt > ~25 deg): not axial


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


class NotASliceError(CTDataError):
    """A file among the slices that is not a CT image slice (not DICOM, not an image, or a
    colour / secondary-capture picture such as a dose report): discovery skips it with a note."""


FRAME_MARK = "#frame="  # a frame of a multi-frame file: "FILE#frame=N", N from 1 (DICOM's count)
_FRAME_PATH = re.compile(rf"^(?P<file>.+){re.escape(FRAME_MARK)}(?P<n>\d+)$")
# Functional groups (DICOM PS3.3 C.7.6.16) whose attributes a frame of an Enhanced CT image
# carries at the top level in a classic CT image: macro sequence -> its attributes.
_FRAME_MACROS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth"),
    "CTImageFrameTypeSequence": ("FrameType",),
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # prefix of every Secondary Capture SOP class


def frame_path(path, frame: int) -> str:
    """The path that names frame ``frame`` (from 1) of the multi-frame file ``path``."""
    return f"{path}{FRAME_MARK}{int(frame)}"


def split_frame(path) -> tuple[Path, Optional[int]]:
    """``(file, frame)`` of a :func:`frame_path` (frame None for a plain file path)."""
    m = _FRAME_PATH.match(str(path))
    if m and not Path(str(path)).exists():
        return Path(m["file"]), int(m["n"])
    return Path(str(path)), None


def number_of_frames(ds) -> int:
    """NumberOfFrames (1 when absent or empty)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def is_multiframe(ds) -> bool:
    """An Enhanced (functional-group) image or any file holding more than one frame."""
    return "PerFrameFunctionalGroupsSequence" in ds or number_of_frames(ds) > 1


def frame_header(ds, frame: int, path):
    """The header of frame ``frame`` (from 1) of the multi-frame image ``ds`` as a classic CT slice
    has it: the Shared, then that frame's Per-frame Functional Groups (:data:`_FRAME_MACROS`:
    position, orientation, pixel spacing, rescale, window, frame type -> ImageType) copied to the
    top level, without the groups and pixel data; InstanceNumber is the frame number.
    ``source_frame`` (a Python attribute, not a DICOM element) keeps the frame number for the
    derived images' SourceImageSequence."""
    import copy

    n = number_of_frames(ds)
    if not 1 <= frame <= n:
        raise CTDataError(f"{path}: no frame {frame} (the file holds {n})")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n:
        raise CTDataError(f"{path}: {len(per_frame)} per-frame functional groups for {n} frames")
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or [])[:1],
              *([per_frame[frame - 1]] if per_frame else [])]
    from pydicom.dataset import Dataset

    skip = {"PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PixelData",
            "NumberOfFrames"}
    flat = Dataset()
    for elem in ds:
        if elem.keyword not in skip:
            flat.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        flat.file_meta = copy.deepcopy(ds.file_meta)
    for group in groups:
        for macro, keywords in _FRAME_MACROS.items():
            for item in group.get(macro) or []:
                for kw in keywords:
                    if kw in item:
                        setattr(flat, "ImageType" if kw == "FrameType" else kw, item[kw].value)
    flat.InstanceNumber = frame  # one instance per frame once written as classic slices
    flat.source_frame = frame
    return flat


def _read_dicom_file(path, with_pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:  # pydicom warns on truncation
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=not with_pixels)
        except InvalidDicomError:
            raise NotASliceError(f"{path}: not a readable DICOM file (no DICOM preamble)") from None
        except (EOFError, OSError, ValueError, KeyError, TypeError) as e:
            raise _unreadable(path, "DICOM", e) from None
    eof = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if eof or len(ds) == 0:
        raise CTDataError(f"{path}: truncated or corrupt DICOM file "
                          f"({eof[0] if eof else 'no data elements'})")
    return ds


def _check_ct_image(ds, path) -> None:
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "")).upper()
    if "Rows" not in ds and modality not in ("", "CT"):  # a dose report, presentation state...
        raise NotASliceError(f"{path}: not an image (modality {modality})")
    if modality != "CT":
        raise CTDataError(f"{path}: modality is {modality or 'missing'}, not CT")
    if "Rows" not in ds or "Columns" not in ds:
        raise CTDataError(f"{path}: DICOM without image size (Rows/Columns): truncated or "
                          "corrupt file, or not an image")
    if sop.startswith(_SECONDARY_CAPTURE) or int(ds.get("SamplesPerPixel") or 1) != 1:
        what = "secondary-capture" if sop.startswith(_SECONDARY_CAPTURE) else "colour"
        desc = str(ds.get("SeriesDescription", "") or "").strip()
        raise NotASliceError(f"{path}: a {what} image{f' ({desc})' if desc else ''}, "
                             "not a CT slice")


def read_dicom_header(path, with_pixels: bool = False):
    """Read a DICOM file (or one frame of a multi-frame file, see :func:`frame_path` and
    :func:`frame_header`) with pydicom. A corrupt or non-CT file is a CTDataError; a file that is
    no CT image slice at all (not DICOM, no image, colour or secondary capture) is a
    :class:`NotASliceError`."""
    file, frame = split_frame(path)
    ds = _read_dicom_file(file, with_pixels and frame is None)
    _check_ct_image(ds, path)
    if frame is not None or "PerFrameFunctionalGroupsSequence" in ds:
        return frame_header(ds, frame or 1, file)
    return ds


def dicom_frames(path) -> list[tuple[str, object]]:
    """``[(slice path, header)]`` of a DICOM file: itself, or one :func:`frame_path` and
    :func:`frame_header` per frame of a multi-frame image (headers only, no pixels decoded)."""
    ds = _read_dicom_file(path, False)
    _check_ct_image(ds, path)
    if not is_multiframe(ds):
        return [(str(path), ds)]
    return [(frame_path(path, k), frame_header(ds, k, path))
            for k in range(1, number_of_frames(ds) + 1)]


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
    """DICOM slice, or one frame of a multi-frame file (:func:`frame_path`) -> (HU float32
    [H, W], header without pixel data; a frame's header is its :func:`frame_header`).

    HU = pydicom's modality LUT (RescaleSlope / RescaleIntercept, or a Modality LUT Sequence).
    Pixels equal to PixelPaddingValue and anything below -1024 HU (out-of-field) become -1024 HU.
    Compressed transfer syntaxes are decoded by pydicom (RLE) and its plug-ins in
    requirements.txt: pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-libjpeg (JPEG Lossless process
    14, JPEG baseline/extended, JPEG-LS), pyjpegls
    (JPEG-LS). A syntax without an installed decoder is a CTDataError naming the package.
    """
    from pydicom.pixels import apply_modality_lut, pixel_array

    ds = read_dicom_header(path, with_pixels=True)
    frame = getattr(ds, "source_frame", None)  # a frame of a multi-frame file: decode only it
    if frame is None and "PixelData" not in ds:
        raise CTDataError(f"{path}: DICOM without pixel data")
    _check_decodable(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = (ds.pixel_array if frame is None
                   else pixel_array(str(split_frame(path)[0]), index=frame - 1))
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
    if "PixelData" in ds:
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
    if getattr(ds, "source_frame", None) is not None:  # one frame of a multi-frame image
        return pydicom.uid.CTImageStorage
    for uid in (ds.get("SOPClassUID"), meta and meta.get("MediaStorageSOPClassUID")):
        if uid and str(uid).strip():
            return str(uid).strip()
    return pydicom.uid.CTImageStorage


def _derived_from(ds, source) -> None:
    """Mark ``ds`` (a copy of ``source``'s header) as derived from ``source`` now: its
    SourceImageSequence names ``source``'s SOP Instance (and frame, for a frame of a multi-frame
    image; DICOM PS3.3 C.7.6.1.1.4), not the sources ``source`` itself listed; ContentDate /
    ContentTime and InstanceCreationDate / Time are the time of writing. A source without
    SOPInstanceUID (generated data) is referenced by nothing."""
    import datetime

    from pydicom.dataset import Dataset

    now = datetime.datetime.now()
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    if "SourceImageSequence" in ds:
        del ds.SourceImageSequence
    instance = str(source.get("SOPInstanceUID", "") or "").strip()
    if not instance:
        return
    ref = Dataset()
    meta = getattr(source, "file_meta", None)
    ref.ReferencedSOPClassUID = str(source.get("SOPClassUID", "") or "").strip() or (
        meta and meta.get("MediaStorageSOPClassUID")) or ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = instance
    frame = getattr(source, "source_frame", None)
    if frame is not None:
        ref.ReferencedFrameNumber = int(frame)
    ds.SourceImageSequence = [ref]


def write_dicom(path, hu: np.ndarray, header, *, series_uid: str, description: str,
                derived: bool = True, series_number: Optional[int] = None) -> None:
    """Write ``hu`` as a DICOM slice that keeps ``header``'s patient, study and geometry.

    Pixels are re-encoded with the header's rescale (uncompressed, explicit VR little endian);
    SeriesInstanceUID is ``series_uid``, SOPInstanceUID is new, and ``description`` goes into
    SeriesDescription. ``derived`` marks ImageType DERIVED\\SECONDARY, references ``header``'s
    SOP Instance (and frame) in SourceImageSequence and dates the content now
    (:func:`_derived_from`).
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
    ds.SOPClassUID = sop_class_uid(ds)
    if derived:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        _derived_from(ds, header)
    meta = pydicom.dataset.FileMetaDataset(getattr(ds, "file_meta", pydicom.dataset.Dataset()))
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



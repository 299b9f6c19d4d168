"""Whole CT slices for inference and evaluation, each with its identity.

Slices are streamed one at a time (memory stays flat in the number of slices), in patient and
table-position order. Low-dose-only data is valid here: the reference (``fd_hu``) is then None.

As a script it checks a dataset before denoising::

    python MyDataLoader_test.py --data PATH [--layout mayo|npy|tif|dicom|tree]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

import ctdata
import ctio


@dataclass
class TestSlice:
    """One whole slice: HU images and where they came from."""

    __test__ = False  # not a pytest test class despite the name

    patient: str
    slice_id: str
    position: float
    ld_hu: np.ndarray  # float32 [H, W], the low-dose input in HU
    fd_hu: Optional[np.ndarray]  # float32 [H, W] full-dose reference in HU, or None
    ld_path: str
    fd_path: Optional[str]
    header: Optional[object]  # pydicom Dataset of the LD slice (no pixel data), or None


def load_test_dataset(data, layout: Optional[str] = None,
                      patients: Optional[list[str]] = None) -> ctdata.CTDataset:
    """Find the slices under ``data``; an unpaired DICOM series counts as low-dose input.

    Raises CTDataError if nothing usable is found or a requested patient is absent.
    """
    ds = ctdata.discover(data, layout, single_role="ld")
    if not ds.has_ld:
        raise ctio.CTDataError(f"{data}: only full-dose slices found; nothing to denoise")
    if patients:
        missing = sorted(set(patients) - set(ds.patients))
        if missing:
            raise ctio.CTDataError(f"{data}: patient(s) {', '.join(missing)} not found "
                                   f"(have: {', '.join(ds.patients)})")
        ds = ds.for_patients(patients)
    return ds


def read_record(rec: ctdata.SliceRecord) -> TestSlice:
    """Decode one record (LD and, if present, FD) to HU."""
    ld, header = ctio.read_slice(rec.ld_path)
    fd = ctio.read_slice(rec.fd_path)[0] if rec.fd_path else None
    if fd is not None and fd.shape != ld.shape:
        raise ctio.CTDataError(f"size mismatch: {rec.ld_path} {ld.shape} vs {rec.fd_path} "
                               f"{fd.shape}")
    return TestSlice(rec.patient, rec.slice_id, rec.position, ld, fd, rec.ld_path, rec.fd_path,
                     header)


def iter_slices(dataset: ctdata.CTDataset) -> Iterator[TestSlice]:
    """Yield the dataset's slices in order, one decoded slice at a time."""
    for rec in dataset.records:
        yield read_record(rec)


def main(argv=None) -> int:
    ap = ctio.ArgumentParser(description="Check a dataset for denoising (Mytest.py).",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder (any supported layout)")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="override layout auto-detection")
    args = ap.parse_args(argv)
    ds = load_test_dataset(args.data, args.layout)
    ctdata.print_summary(ctdata.summarize(ds), args.data)
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

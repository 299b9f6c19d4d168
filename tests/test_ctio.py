"""ctio: reading slices to HU, finding and pairing datasets, and every kind of bad input.

Every dataset here is generated in ``tmp_path`` (DICOM with pydicom through ``ctio.new_ct_header``
and ``ctio.write_dicom``, .npy, TIFF). The real sample data is only read, and only by the tests
taking the ``real_data`` fixture (skipped when it is absent).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

import ctdata
import ctio

SHAPE = (16, 16)
CHECKER = np.where((np.indices(SHAPE).sum(axis=0) % 2) == 0, 20.0, -20.0)  # LD "noise", HU


def slice_value(k: int) -> float:
    """The FD HU value that identifies slice number k of a generated series (integer HU)."""
    return 100.0 + 37.0 * k


def write_ct(path: Path, hu, *, z: float = 0.0, instance: int = 1, drop=(), modality="CT",
             patient="P1", slice_location=None, **fields) -> Path:
    """One CT slice written by ctio.write_dicom; ``drop`` removes header tags first."""
    hu = np.asarray(hu, np.float32)
    hdr = ctio.new_ct_header(patient_id=patient, study_uid="1.2.826.0.1.3680043.2.1125.1",
                             series_uid="1.2.826.0.1.3680043.2.1125.2", instance=instance,
                             z_mm=z, shape=hu.shape)
    hdr.Modality = modality
    if slice_location is not None:
        hdr.SliceLocation = slice_location
    for key, value in fields.items():
        setattr(hdr, key, value)
    for tag in drop:
        delattr(hdr, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    ctio.write_dicom(path, hu, hdr, series_uid=hdr.SeriesInstanceUID, description="test",
                     derived=False)
    return path


def write_pair_series(qd_dir: Path, fd_dir: Path, zs, *, qd_order, fd_order, qd_kw=None,
                      fd_kw=None, patient="P1") -> None:
    """QD/FD series of slices at ``zs``; file names follow ``*_order`` (not the z order).

    Slice k has FD = slice_value(k) everywhere and LD = FD + CHECKER. ``qd_kw``/``fd_kw`` map
    k -> extra write_ct keywords (to drop tags or set other positions).
    """
    for k, z in enumerate(zs):
        fd = np.full(SHAPE, slice_value(k))
        base = {"z": z, "instance": k + 1, "patient": patient}
        write_ct(qd_dir / f"img_{qd_order[k]:03d}.dcm", fd + CHECKER,
                 **{**base, **(qd_kw(k) if qd_kw else {})})
        write_ct(fd_dir / f"img_{fd_order[k]:03d}.dcm", fd,
                 **{**base, **(fd_kw(k) if fd_kw else {})})


def check_pairs(dataset: ctdata.CTDataset, slice_of_position) -> None:
    """Each record: LD and FD come from the same slice position and hold that slice's pixels."""
    for r in dataset.records:
        k = slice_of_position(r.position)
        ld, ld_hdr = ctio.read_dicom(r.ld_path)
        fd, fd_hdr = ctio.read_dicom(r.fd_path)
        assert ctio.slice_position(ld_hdr) == pytest.approx(r.position)
        assert ctio.slice_position(fd_hdr) == pytest.approx(r.position)
        np.testing.assert_array_equal(fd, np.full(SHAPE, slice_value(k)))
        np.testing.assert_array_equal(ld - fd, CHECKER)


def error_of(call, *args, **kwargs) -> str:
    """The CTDataError message of ``call(*args, **kwargs)`` (which must raise one)."""
    with pytest.raises(ctio.CTDataError) as e:
        call(*args, **kwargs)
    return str(e.value)


def without(msg: str, root: Path) -> str:
    """``msg`` with the test's folder removed, so words in tmp_path names cannot match."""
    return msg.replace(str(root), "<root>")


# Orders whose lexical (file name) order differs from the z order, and differs between QD and FD.
QD_ORDER = [3, 0, 2, 1]
FD_ORDER = [1, 3, 0, 2]


def listing_pairs_would_be_wrong(qd_dir: Path, fd_dir: Path) -> bool:
    """The fixture is adversarial: pairing sorted file listings would mismatch positions."""
    qd = [ctio.slice_position(ctio.read_dicom_header(f)) for f in sorted(qd_dir.iterdir())]
    fd = [ctio.slice_position(ctio.read_dicom_header(f)) for f in sorted(fd_dir.iterdir())]
    return qd != sorted(qd) and any(a != b for a, b in zip(qd, fd))


# --- normalisation ------------------------------------------------------------------------------
def test_normalize_maps_the_hu_range_to_unit_interval_and_clips():
    hu = np.array([-3000.0, -1024.0, 0.0, 40.0, 1024.0, 3072.0, 5000.0])
    x = ctio.normalize(hu)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [0, 0, 1024 / 4096, 1064 / 4096, 0.5, 1, 1], atol=1e-7)


def test_denormalize_inverts_normalize_inside_the_clip_range():
    hu = np.linspace(-1024, 3072, 97)
    np.testing.assert_allclose(ctio.denormalize(ctio.normalize(hu)), hu, atol=1e-3)
    x = np.linspace(0, 1, 33, dtype=np.float32)
    np.testing.assert_allclose(ctio.normalize(ctio.denormalize(x)), x, atol=1e-7)
    # Outside the range, the round trip gives the clipped value.
    assert ctio.denormalize(ctio.normalize(np.array([-2000.0, 4000.0]))).tolist() == [-1024, 3072]


# --- reading single slices ----------------------------------------------------------------------
def test_read_dicom_matches_pydicom_modality_lut_on_ct_small():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = np.maximum(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), -1024.0)
    hu, header = ctio.read_dicom(path)
    assert hu.dtype == np.float32 and hu.shape == ds.pixel_array.shape
    np.testing.assert_array_equal(hu, expected)
    assert "PixelData" not in header and header.Modality == "CT"


def test_write_dicom_round_trips_hu_and_clips_below_air(tmp_path):
    hu = np.arange(-1100, -1100 + 24 * 20, 1.0).reshape(24, 20)  # includes values < -1024
    path = write_ct(tmp_path / "s.dcm", hu, z=-12.5)
    out, header = ctio.read_dicom(path)
    np.testing.assert_array_equal(out, np.maximum(hu, -1024))
    assert ctio.slice_position(header) == -12.5
    assert ctio.slice_shape(path) == (24, 20)


def _int16_ct(path: Path, raw: np.ndarray, *, pad: int, intercept: float, syntax) -> Path:
    """A minimal signed 16-bit CT slice with PixelPaddingValue, written by pydicom directly."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelPaddingValue = pad
    ds.ImagePositionPatient = [0.0, 0.0, 1.0]
    ds.PixelData = raw.astype("<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_pixel_padding_value_becomes_air(tmp_path, syntax):
    raw = np.full((16, 16), 1064, np.int16)  # 40 HU
    raw[:4, :] = -2000  # out-of-field padding (GE style): -3024 HU if not masked
    raw[8, 8] = 0  # -1024 HU, real air
    hu, _ = ctio.read_dicom(_int16_ct(tmp_path / "pad.dcm", raw, pad=-2000, intercept=-1024,
                                      syntax=syntax))
    assert hu.min() == -1024
    assert np.all(hu[:4] == -1024)
    assert hu[8, 8] == -1024 and hu[12, 3] == 40


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_pixel_padding_value_is_masked_not_just_clipped(tmp_path, syntax):
    # A padding value whose HU lies inside the range: only masking (not clipping) removes it.
    raw = np.full((16, 16), 1064, np.int16)
    raw[:, :3] = 5000  # would be 3976 HU
    hu, _ = ctio.read_dicom(_int16_ct(tmp_path / "pad.dcm", raw, pad=5000, intercept=-1024,
                                      syntax=syntax))
    assert np.all(hu[:, :3] == -1024)
    assert np.all(hu[:, 3:] == 40)


def test_jpeg2000_compressed_slice_decodes_exactly(tmp_path):
    hu = np.random.default_rng(1).integers(-1024, 2000, (32, 32)).astype(np.float32)
    path = write_ct(tmp_path / "j2k.dcm", hu)
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless)
    ds.save_as(path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(ctio.read_dicom(path)[0], hu)


# Every compressed transfer syntax pydicom 3 can write (with the encoders installed here), and
# the largest HU error its options allow (0: lossless; lossy JPEG 2000 asked for 80 dB PSNR of
# the 16-bit range, i.e. RMSE ~6.6 HU: checked as RMSE <= 10 HU).
COMPRESSED = [
    ("RLELossless", {}, 0.0),
    ("JPEGLSLossless", {}, 0.0),
    ("JPEGLSNearLossless", {"jls_error": 3}, 3.0),
    ("JPEG2000Lossless", {}, 0.0),
    ("JPEG2000", {"j2k_psnr": [80]}, None),
]


@pytest.mark.parametrize("name, options, max_err", COMPRESSED, ids=[c[0] for c in COMPRESSED])
def test_every_writable_compressed_transfer_syntax_decodes(tmp_path, name, options, max_err):
    """Issue 19 item 5: archives use RLE, JPEG-LS and JPEG 2000; all decode to the same HU."""
    from pydicom.pixels import get_encoder

    syntax = getattr(pydicom.uid, name)
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no {syntax.name} encoder here ({'; '.join(encoder.missing_dependencies)})")
    yy, xx = np.mgrid[:32, :32]
    hu = np.round(300 * np.sin(xx / 4.0) * np.cos(yy / 5.0) + 40).astype(np.float32)
    hu[8:12, 20:26] = 1500.0
    path = write_ct(tmp_path / "c.dcm", hu)
    ds = pydicom.dcmread(path)
    ds.compress(syntax, **options)
    ds.save_as(path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    out = ctio.read_dicom(path)[0]
    if max_err is None:
        assert 0 < np.sqrt(np.mean((out - hu) ** 2)) <= 10
    else:
        assert np.abs(out - hu).max() <= max_err


def test_missing_decoder_is_one_line_naming_file_syntax_and_package(tmp_path):
    """Issue 19 item 5: with the JPEG-LS plug-ins absent, the CLI says which package is missing
    (not that the file is truncated)."""
    import subprocess
    import sys

    from conftest import REPO

    hu = np.full((32, 32), 40.0, np.float32)
    path = write_ct(tmp_path / "P1" / "a.dcm", hu)
    ds = pydicom.dcmread(path)
    try:
        ds.compress(pydicom.uid.JPEGLSLossless)
    except RuntimeError:
        pytest.skip("no JPEG-LS encoder (pyjpegls) to write the test file")
    ds.save_as(path)
    # Hide the JPEG-LS plug-ins (pylibjpeg itself too: it loads its plug-ins by entry point).
    hide = "; ".join(f"sys.modules[{m!r}] = None"
                     for m in ("pylibjpeg", "libjpeg", "jpeg_ls", "gdcm"))
    code = (f"import sys, runpy; {hide}; sys.argv = ['MyDataLoader_test.py', '--data', "
            f"{str(tmp_path)!r}]; runpy.run_path('MyDataLoader_test.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {path}: cannot decode transfer syntax JPEG-LS Lossless")
    assert "pylibjpeg-libjpeg" in lines[0] and "pyjpegls" in lines[0]
    assert not re.search("truncat|corrupt", without(lines[0], tmp_path), re.I)


def test_npy_is_redcnn_normalised(tmp_path):
    v = np.random.default_rng(2).uniform(0, 1, (12, 10))
    np.save(tmp_path / "P_0_input.npy", v)
    hu = ctio.read_npy(tmp_path / "P_0_input.npy")
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, v * 4096 - 1024, atol=1e-3)


@pytest.mark.parametrize("shape", [(12, 10), (1, 12, 10)])
def test_tif_accepts_hw_and_1hw(tmp_path, shape):
    v = np.random.default_rng(3).uniform(-1024, 2000, shape).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", v)
    np.testing.assert_array_equal(ctio.read_tif(tmp_path / "a.tif"), v.reshape(12, 10))
    assert ctio.slice_shape(tmp_path / "a.tif") == (12, 10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_npy_and_tif_are_errors(tmp_path, bad):
    v = np.full((12, 12), 0.3)
    v[5, 6] = bad
    np.save(tmp_path / "P_0_input.npy", v)
    tifffile.imwrite(tmp_path / "x.tif", v.astype(np.float32))
    for path, reader in ((tmp_path / "P_0_input.npy", ctio.read_npy),
                         (tmp_path / "x.tif", ctio.read_tif)):
        with pytest.raises(ctio.CTDataError, match="NaN or infinite") as e:
            reader(path)
        assert str(path) in str(e.value)


@pytest.mark.parametrize("shape", [(2, 12, 12), (144,), (1, 1, 12, 12)])
def test_wrong_rank_arrays_are_errors(tmp_path, shape):
    np.save(tmp_path / "P_0_input.npy", np.full(shape, 0.3))
    tifffile.imwrite(tmp_path / "x.tif", np.zeros(shape, np.float32))
    for path in (tmp_path / "P_0_input.npy", tmp_path / "x.tif"):
        with pytest.raises(ctio.CTDataError) as e:
            ctio.read_slice(path)
        assert str(path) in str(e.value)
        with pytest.raises(ctio.CTDataError) as e:
            ctio.slice_shape(path)
        assert str(path) in str(e.value)


def test_non_numeric_and_garbage_files_are_errors(tmp_path):
    np.save(tmp_path / "P_0_input.npy", np.array([["a"] * 12] * 12))
    (tmp_path / "g.tif").write_bytes(b"not a tiff at all")
    (tmp_path / "g.dcm").write_bytes(b"not a dicom file")
    for name in ("P_0_input.npy", "g.tif", "g.dcm"):
        with pytest.raises(ctio.CTDataError, match=name):
            ctio.read_slice(tmp_path / name)


# --- slice position (the pairing key) -----------------------------------------------------------
def test_slice_position_fallback_order():
    ds = Dataset()
    ds.ImagePositionPatient = [-100.0, -90.0, 5.5]
    ds.SliceLocation = 7.25
    ds.InstanceNumber = 9
    assert ctio.slice_position(ds) == 5.5
    del ds.ImagePositionPatient
    assert ctio.slice_position(ds) == 7.25
    del ds.SliceLocation
    assert ctio.slice_position(ds) == 9
    del ds.InstanceNumber
    with pytest.raises(ctio.CTDataError, match="InstanceNumber"):
        ctio.slice_position(ds)


# --- discovery: Mayo trees ----------------------------------------------------------------------
def test_mayo_two_patients_paired_by_position_not_listing(tmp_path):
    zs = {"L001": [-30.0, -27.0, -24.0, -21.0], "L002": [13.5, 10.5, 16.5, 19.5]}  # unsorted
    for patient, z in zs.items():
        write_pair_series(tmp_path / patient / "quarter_3mm", tmp_path / patient / "full_3mm", z,
                          qd_order=QD_ORDER, fd_order=FD_ORDER, patient=patient)
        assert listing_pairs_would_be_wrong(tmp_path / patient / "quarter_3mm",
                                            tmp_path / patient / "full_3mm")
    (tmp_path / "notes.txt").write_text("not a patient")
    ds = ctdata.discover(tmp_path)
    assert ds.layout == "mayo" and ds.paired and ds.patients == ["L001", "L002"]
    assert len(ds.records) == 8
    for patient, z in zs.items():
        recs = [r for r in ds.records if r.patient == patient]
        assert [r.position for r in recs] == sorted(z)  # in table-position order
        assert all(r.shape == SHAPE for r in recs)
        check_pairs(ctdata.CTDataset("mayo", str(tmp_path), recs), lambda p, z=z: z.index(p))
    summary = ctdata.summarize(ds)
    assert summary["pairs"] == 8 and summary["patients"] == {"L001": 4, "L002": 4}


def test_mayo_one_patient_form(tmp_path):
    root = tmp_path / "L067"
    zs = [2.0, 1.0, 4.0, 3.0]
    write_pair_series(root / "quarter_1mm", root / "full_1mm", zs, qd_order=QD_ORDER,
                      fd_order=FD_ORDER)
    ds = ctdata.discover(root)
    assert ds.layout == "mayo" and ds.patients == ["L067"] and len(ds.records) == 4
    assert [r.position for r in ds.records] == [1.0, 2.0, 3.0, 4.0]
    check_pairs(ds, zs.index)


def test_pairing_falls_back_to_slice_location(tmp_path):
    # QD: ImagePositionPatient z is right, SliceLocation is wrong (must be ignored);
    # FD: no ImagePositionPatient, SliceLocation right, InstanceNumber reversed (must be ignored).
    zs = [-5.0, -2.0, 1.0, 4.0]
    write_pair_series(tmp_path / "quarter_1mm", tmp_path / "full_1mm", zs,
                      qd_order=QD_ORDER, fd_order=FD_ORDER,
                      qd_kw=lambda k: {"slice_location": -zs[k]},
                      fd_kw=lambda k: {"drop": ("ImagePositionPatient",),
                                       "InstanceNumber": 10 - k})
    ds = ctdata.discover(tmp_path)
    assert ds.paired and len(ds.records) == 4
    assert [r.position for r in ds.records] == zs
    check_pairs(ds, zs.index)


def test_pairing_falls_back_to_instance_number(tmp_path):
    # No ImagePositionPatient nor SliceLocation anywhere: InstanceNumber orders and pairs.
    drop = {"drop": ("ImagePositionPatient", "SliceLocation")}
    write_pair_series(tmp_path / "quarter_1mm", tmp_path / "full_1mm", [0.0] * 4,
                      qd_order=QD_ORDER, fd_order=FD_ORDER, qd_kw=lambda k: drop,
                      fd_kw=lambda k: drop)
    assert listing_pairs_would_be_wrong(tmp_path / "quarter_1mm", tmp_path / "full_1mm")
    ds = ctdata.discover(tmp_path)
    assert [r.position for r in ds.records] == [1.0, 2.0, 3.0, 4.0]
    check_pairs(ds, lambda p: int(p) - 1)


def test_slice_without_any_position_is_named(tmp_path):
    write_ct(tmp_path / "a.dcm", np.zeros(SHAPE), z=1.0)
    bad = write_ct(tmp_path / "b.dcm", np.zeros(SHAPE),
                   drop=("ImagePositionPatient", "SliceLocation", "InstanceNumber"))
    msg = error_of(ctdata.discover, tmp_path)
    assert str(bad) in msg and "InstanceNumber" in without(msg, tmp_path)


def test_count_mismatch_names_the_unmatched_file(tmp_path):
    zs = [0.0, 1.0, 2.0, 3.0]
    write_pair_series(tmp_path / "quarter_1mm", tmp_path / "full_1mm", zs,
                      qd_order=QD_ORDER, fd_order=FD_ORDER)
    (tmp_path / "full_1mm" / f"img_{FD_ORDER[2]:03d}.dcm").unlink()  # FD at z = 2 is missing
    msg = error_of(ctdata.discover, tmp_path)
    # the QD slice left without a partner
    assert str(tmp_path / "quarter_1mm" / f"img_{QD_ORDER[2]:03d}.dcm") in msg
    assert "4" in without(msg, tmp_path) and "3" in without(msg, tmp_path)  # the two counts


def test_position_mismatch_names_both_files(tmp_path):
    zs = [0.0, 1.0, 2.0, 3.0]
    write_pair_series(tmp_path / "quarter_1mm", tmp_path / "full_1mm", zs,
                      qd_order=QD_ORDER, fd_order=FD_ORDER,
                      fd_kw=lambda k: {"z": 3.5} if k == 3 else {})
    msg = error_of(ctdata.discover, tmp_path)
    assert "position" in without(msg, tmp_path)
    assert str(tmp_path / "quarter_1mm" / f"img_{QD_ORDER[3]:03d}.dcm") in msg
    assert str(tmp_path / "full_1mm" / f"img_{FD_ORDER[3]:03d}.dcm") in msg


def test_empty_counterpart_folder_is_named(tmp_path):
    write_ct(tmp_path / "full_1mm" / "a.dcm", np.zeros(SHAPE))
    (tmp_path / "quarter_1mm").mkdir()
    (tmp_path / "quarter_1mm" / "notes.txt").write_text("no slices here")
    assert str(tmp_path / "quarter_1mm") in error_of(ctdata.discover, tmp_path)


def test_quarter_and_full_suffixes_must_match(tmp_path):
    write_ct(tmp_path / "quarter_1mm" / "a.dcm", np.zeros(SHAPE))
    write_ct(tmp_path / "full_3mm" / "a.dcm", np.zeros(SHAPE))
    msg = without(error_of(ctdata.discover, tmp_path), tmp_path)
    assert "1mm" in msg and "3mm" in msg


def test_mixed_slice_sizes_in_a_series_are_an_error(tmp_path):
    write_ct(tmp_path / "a.dcm", np.zeros(SHAPE), z=0.0)
    odd = write_ct(tmp_path / "b.dcm", np.zeros((16, 20)), z=1.0)
    write_ct(tmp_path / "c.dcm", np.zeros(SHAPE), z=2.0)
    msg = error_of(ctdata.discover, tmp_path)
    assert str(odd) in msg and "16x20" in without(msg, tmp_path)


def test_qd_fd_size_mismatch_is_an_error(tmp_path):
    qd = write_ct(tmp_path / "quarter_1mm" / "a.dcm", np.zeros(SHAPE), z=0.0)
    fd = write_ct(tmp_path / "full_1mm" / "a.dcm", np.zeros((20, 20)), z=0.0)
    msg = error_of(ctdata.discover, tmp_path)
    assert str(qd) in msg and str(fd) in msg and "20x20" in without(msg, tmp_path)


def test_qd_fd_pixel_spacing_mismatch_names_both_files(tmp_path):
    """Issue 19 item 6: QD and FD of one matrix size but another field of view (pixel spacing)
    are not paired silently (another matrix size: test_qd_fd_size_mismatch_is_an_error)."""
    write_pair_series(tmp_path / "quarter_1mm", tmp_path / "full_1mm", [0.0, 1.0, 2.0],
                      qd_order=[0, 1, 2], fd_order=[0, 1, 2],
                      fd_kw=lambda k: {"PixelSpacing": [0.8, 0.8]} if k == 1 else {})
    msg = error_of(ctdata.discover, tmp_path)
    assert str(tmp_path / "quarter_1mm" / "img_001.dcm") in msg
    assert str(tmp_path / "full_1mm" / "img_001.dcm") in msg
    assert re.search(r"pixel spacing mismatch: .* 0\.7x0\.7 mm .* 0\.8x0\.8 mm",
                     without(msg, tmp_path)), msg


def test_localizer_and_non_axial_images_are_skipped_with_a_note(tmp_path, capsys):
    """Issue 19 item 4: a scout or a sagittal reformat in a plain DICOM folder is not a slice."""
    _series(tmp_path / "P1", n=3)
    write_ct(tmp_path / "P1" / "scout.dcm", np.zeros(SHAPE), z=0.0,
             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    write_ct(tmp_path / "P1" / "sag.dcm", np.zeros(SHAPE), z=5.0,
             ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    write_ct(tmp_path / "P1" / "tilted.dcm", np.zeros(SHAPE), z=7.0,  # 20 degree gantry tilt
             ImageOrientationPatient=[1, 0, 0, 0, float(np.cos(0.35)), float(-np.sin(0.35))])
    ds = ctdata.discover(tmp_path)
    names = sorted(Path(r.ld_path).name for r in ds.records)
    assert names == ["s0.dcm", "s1.dcm", "s2.dcm", "tilted.dcm"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped 2 image(s)" in out[0], out


def test_mr_slice_is_an_error(tmp_path):
    write_pair_series(tmp_path / "quarter_1mm", tmp_path / "full_1mm", [0.0, 1.0],
                      qd_order=[0, 1], fd_order=[0, 1],
                      fd_kw=lambda k: {"modality": "MR"} if k == 1 else {})
    msg = error_of(ctdata.discover, tmp_path)
    assert str(tmp_path / "full_1mm" / "img_001.dcm") in msg and "MR" in without(msg, tmp_path)


def test_two_series_mixed_in_one_folder_is_an_error(tmp_path):
    write_ct(tmp_path / "a.dcm", np.zeros(SHAPE), z=0.0)
    dup = write_ct(tmp_path / "b.dcm", np.zeros(SHAPE), z=0.0)
    msg = error_of(ctdata.discover, tmp_path)
    assert str(dup) in msg and "position" in without(msg, tmp_path)


# --- corrupt (truncated) DICOM ------------------------------------------------------------------
def _series(folder: Path, n: int = 3, shape=SHAPE) -> list[Path]:
    rng = np.random.default_rng(4)
    return [write_ct(folder / f"s{i}.dcm", rng.integers(-1000, 1000, shape), z=float(i),
                     instance=i + 1) for i in range(n)]


def test_truncated_header_fails_at_discovery_naming_the_file(tmp_path):
    files = _series(tmp_path)
    data = files[1].read_bytes()
    header_end = data.index(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) PixelData tag
    files[1].write_bytes(data[: header_end // 2])
    with pytest.raises(ctio.CTDataError) as e:
        ctdata.discover(tmp_path)
    assert str(files[1]) in str(e.value)


def test_truncated_pixel_data_fails_at_read_naming_the_file(tmp_path):
    files = _series(tmp_path)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 100])
    ds = ctdata.discover(tmp_path)  # the header is intact: discovery does not decode pixels
    assert len(ds.records) == 3
    with pytest.raises(ctio.CTDataError) as e:
        ctdata.summarize(ds)
    assert str(files[2]) in str(e.value)
    with pytest.raises(ctio.CTDataError, match="s2.dcm"):
        ctio.read_dicom(files[2])


def test_truncated_compressed_pixel_data_is_reported_as_truncated(tmp_path):
    files = _series(tmp_path, shape=(32, 32))
    ds = pydicom.dcmread(files[1])
    ds.compress(JPEG2000Lossless)
    ds.save_as(files[1])
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 200])
    dataset = ctdata.discover(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = error_of(ctdata.summarize, dataset)
    assert str(files[1]) in msg
    # pydicom returns an empty dataset here; the message must say the file is cut short,
    # not blame a missing modality.
    assert re.search("truncat|corrupt|end of file|incomplete", without(msg, tmp_path), re.I), msg


# --- discovery: npy / tif / dicom layouts -------------------------------------------------------
def write_npy_pair(root: Path, patient: str, idx: int, ld_hu, fd_hu=None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{patient}_{idx}_input.npy", (np.asarray(ld_hu) + 1024) / 4096)
    if fd_hu is not None:
        np.save(root / f"{patient}_{idx}_target.npy", (np.asarray(fd_hu) + 1024) / 4096)


def test_npy_layout_pairs_by_name(tmp_path):
    for idx in (80, 0, 120, 40):  # 120 < 80 in lexical order
        write_npy_pair(tmp_path, "L506", idx, np.full(SHAPE, idx + 5.0), np.full(SHAPE, idx))
    write_npy_pair(tmp_path, "L333", 7, np.full(SHAPE, 12.0), np.full(SHAPE, 7.0))
    ds = ctdata.discover(tmp_path)
    assert ds.layout == "npy" and ds.paired and ds.patients == ["L333", "L506"]
    assert [(r.patient, r.position) for r in ds.records] == [
        ("L333", 7), ("L506", 0), ("L506", 40), ("L506", 80), ("L506", 120)]
    for r in ds.records:
        assert Path(r.ld_path).name == f"{r.patient}_{r.slice_id}_input.npy"
        assert Path(r.fd_path).name == f"{r.patient}_{r.slice_id}_target.npy"
        fd = ctio.read_npy(r.fd_path)
        np.testing.assert_allclose(fd, r.position, atol=1e-3)
        np.testing.assert_allclose(ctio.read_npy(r.ld_path) - fd, 5.0, atol=1e-3)


def test_npy_missing_partner_is_named(tmp_path):
    write_npy_pair(tmp_path, "L506", 0, np.zeros(SHAPE), np.zeros(SHAPE))
    write_npy_pair(tmp_path, "L506", 1, np.zeros(SHAPE))  # input without target
    with pytest.raises(ctio.CTDataError, match="L506_1_input.npy"):
        ctdata.discover(tmp_path)


def test_npy_pair_of_different_sizes_is_an_error(tmp_path):
    write_npy_pair(tmp_path, "L506", 0, np.zeros(SHAPE), np.zeros((16, 20)))
    with pytest.raises(ctio.CTDataError, match="L506_0_"):
        ctdata.discover(tmp_path)


def test_npy_inputs_only_is_low_dose_only(tmp_path):
    for idx in range(3):
        write_npy_pair(tmp_path, "L506", idx, np.zeros(SHAPE))
    ds = ctdata.discover(tmp_path)
    assert ds.has_ld and not ds.paired and len(ds.records) == 3
    assert all(r.fd_path is None for r in ds.records)


def test_tif_layout_pairs_by_name(tmp_path):
    (tmp_path / "noisy").mkdir()
    (tmp_path / "clean").mkdir()
    names = ["L067_0010.tif", "L067_0002.tif", "L100_0001.tif"]
    for i, name in enumerate(names):
        fd = np.full(SHAPE, 10.0 * i, np.float32)
        tifffile.imwrite(tmp_path / "clean" / name, fd[None] if i % 2 else fd)  # 1xHxW and HxW
        tifffile.imwrite(tmp_path / "noisy" / name, fd + 3)
    ds = ctdata.discover(tmp_path)
    assert ds.layout == "tif" and ds.paired and ds.patients == ["L067", "L100"]
    assert len(ds.records) == 3
    for r in ds.records:
        assert Path(r.ld_path).name == Path(r.fd_path).name
        i = names.index(Path(r.fd_path).name)
        np.testing.assert_array_equal(ctio.read_tif(r.fd_path), np.full(SHAPE, 10.0 * i))
        np.testing.assert_array_equal(ctio.read_tif(r.ld_path), np.full(SHAPE, 10.0 * i + 3))


def test_tif_missing_partner_is_named(tmp_path):
    for sub in ("noisy", "clean"):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "a_0001.tif", np.zeros(SHAPE, np.float32))
    tifffile.imwrite(tmp_path / "noisy" / "a_0002.tif", np.zeros(SHAPE, np.float32))
    with pytest.raises(ctio.CTDataError, match="a_0002.tif"):
        ctdata.discover(tmp_path)


def test_tif_noisy_only_is_low_dose_only(tmp_path):
    (tmp_path / "noisy").mkdir()
    tifffile.imwrite(tmp_path / "noisy" / "a_0001.tif", np.zeros(SHAPE, np.float32))
    ds = ctdata.discover(tmp_path)
    assert ds.layout == "tif" and ds.has_ld and not ds.paired


def test_dicom_layout_roles(tmp_path):
    _series(tmp_path / "P9")
    ld = ctdata.discover(tmp_path)
    fd = ctdata.discover(tmp_path, single_role="fd")
    assert ld.layout == "dicom" and ld.patients == ["P9"] and len(ld.records) == 3
    assert ld.has_ld and all(r.fd_path is None for r in ld.records)
    assert not fd.has_ld and all(r.fd_path for r in fd.records)


def test_layout_override(tmp_path):
    # A folder named full_* is taken for a Mayo tree; --layout dicom reads it as one series.
    _series(tmp_path / "full_input")
    auto = ctdata.discover(tmp_path)
    assert auto.layout == "mayo" and not auto.has_ld
    forced = ctdata.discover(tmp_path, layout="dicom")
    assert forced.layout == "dicom" and forced.has_ld and forced.patients == ["full_input"]


def test_unknown_layout_is_an_error(tmp_path):
    _series(tmp_path)
    with pytest.raises(ctio.CTDataError, match="unknown layout 'nifti'"):
        ctdata.discover(tmp_path, layout="nifti")


def test_missing_empty_and_document_only_folders(tmp_path):
    msg = error_of(ctdata.discover, tmp_path / "nope")
    assert msg.startswith(str(tmp_path / "nope")) and "no such" in without(msg, tmp_path)
    (tmp_path / "void").mkdir()
    msg = error_of(ctdata.discover, tmp_path / "void")
    assert msg.startswith(str(tmp_path / "void")) and "empty" in without(msg, tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hello")
    (tmp_path / "docs" / "notes.txt").write_text("hello")
    msg = error_of(ctdata.discover, tmp_path / "docs")
    assert msg.startswith(str(tmp_path / "docs")) and "no CT slices" in without(msg, tmp_path)
    msg = error_of(ctdata.discover, tmp_path / "docs" / "readme.txt")
    assert "not a folder" in without(msg, tmp_path)


def test_hidden_files_and_dicomdir_are_ignored(tmp_path):
    _series(tmp_path, n=2)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "DICOMDIR").write_bytes(b"junk")
    (tmp_path / "report.pdf").write_bytes(b"junk")
    assert len(ctdata.discover(tmp_path).records) == 2


# --- real sample data (skipped when absent) -----------------------------------------------------
def test_real_npy_redcnn(real_data):
    ds = ctdata.discover(real_data / "mayo_pairs" / "npy_redcnn")
    assert ds.layout == "npy" and ds.paired and ds.patients == ["L506"]
    assert [r.position for r in ds.records] == [0, 40, 80, 120, 160, 200]
    r = ds.records[0]
    np.testing.assert_allclose(ctio.read_npy(r.fd_path), np.load(r.fd_path) * 4096 - 1024,
                               atol=1e-3)
    info = ctdata.summarize(ds)
    assert info["pairs"] == 6 and info["sizes"] == ["512x512"]


def test_real_tif_cncl(real_data):
    ds = ctdata.discover(real_data / "mayo_pairs" / "tif_cncl")
    assert ds.layout == "tif" and ds.paired and len(ds.records) == 1
    ld, fd = ctio.read_tif(ds.records[0].ld_path), ctio.read_tif(ds.records[0].fd_path)
    assert ld.shape == fd.shape == (512, 512)
    assert 5 < float(np.std(ld - fd)) < 60  # real quarter-dose noise, same slice


def test_real_jpeg2000_series_decodes(real_data):
    folder = real_data / "dicom_misc" / "totalsegmentator_ct"
    ds = ctdata.discover(folder)
    assert ds.layout == "dicom" and len(ds.records) == 20
    positions = [r.position for r in ds.records]
    assert positions == sorted(positions)
    first = pydicom.dcmread(ds.records[0].ld_path, stop_before_pixels=True)
    assert first.file_meta.TransferSyntaxUID.is_compressed
    hu = ctio.read_dicom(ds.records[10].ld_path)[0]
    assert hu.shape == (512, 512)
    assert -1024 <= np.percentile(hu, 5) < -950  # air around the body
    soft = np.mean((hu > -100) & (hu < 100))
    assert soft > 0.1  # soft tissue


def test_real_gehc_padding_is_masked(real_data):
    folder = real_data / "dicom_misc" / "gehc_ct_3slice"
    ds = ctdata.discover(folder)
    assert len(ds.records) == 3
    for r in ds.records:
        raw_ds = pydicom.dcmread(r.ld_path)
        pad = raw_ds.PixelPaddingValue
        raw = raw_ds.pixel_array
        assert np.any(raw == pad)
        hu = ctio.read_dicom(r.ld_path)[0]
        assert hu.min() == -1024 and not np.any(hu < -1024)
        assert np.all(hu[raw == pad] == -1024)
        body = raw != pad
        lut = np.maximum(pydicom.pixels.apply_modality_lut(raw, raw_ds), -1024)
        np.testing.assert_array_equal(hu[body], lut[body])


def test_select_slices_by_patient_and_slice_spec(tmp_path):
    from conftest import write_mayo_tree

    ds = ctdata.discover(write_mayo_tree(tmp_path / "m", patients=("A", "B"), slices=3, size=32))
    ids = [(r.patient, r.slice_id) for r in ds.records]
    held = ds.select(include=["A:0001", "B"])
    assert [(r.patient, r.slice_id) for r in held.records] == [("A", "0001")] + [
        k for k in ids if k[0] == "B"]
    rest = ds.select(exclude=["A:0001", "B"])
    assert [(r.patient, r.slice_id) for r in rest.records] == [("A", "0000"), ("A", "0002")]
    with pytest.raises(ctio.CTDataError, match="no slice matches A:9999"):
        ds.select(exclude=["A:9999"])


def test_read_json_missing_corrupt_and_good(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(ctio.CTDataError, match="^no config here$"):
        ctio.read_json(path, "no config here")
    path.write_text('{"model": ')
    with pytest.raises(ctio.CTDataError, match=r"config\.json: not readable JSON \(JSONDecode"):
        ctio.read_json(path, "unused")
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ctio.CTDataError, match="not readable JSON"):
        ctio.read_json(path, "unused")
    path.write_text('{"model": {"depth": 4}}')
    assert ctio.read_json(path, "unused") == {"model": {"depth": 4}}


def test_window01_is_one_windowing_for_numpy_tf_and_png():
    import tensorflow as tf

    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    want = np.array([0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(ctio.window01(hu), want)
    np.testing.assert_allclose(ctio.window01(tf.constant(hu)).numpy(), want)
    assert list(ctio.window_to_uint8(hu)) == [0, 0, 128, 255, 255]
    np.testing.assert_allclose(ctio.window01(hu, (-1000, 1000)), [0, 0.42, 0.52, 0.62, 1])

"""Hospital DICOM exports (issue 26, items 5-8): DICOMDIR and nested trees grouped by series and
patient, Enhanced CT multi-frame files read frame by frame, junk among the slices skipped with a
note, and derived DICOM that references its input. Every file is written here with pydicom."""

import datetime
import os
from pathlib import Path

import numpy as np
import pytest

import ctdata
import ctio
import MyDataLoader_test
import MyDataLoader_train

SHAPE = (16, 20)


def hu_image(seed: float) -> np.ndarray:
    """An integer-HU test image that differs with ``seed`` (exact after a DICOM round trip)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return np.round(40 + 300 * np.sin(xx / 3.0 + seed) * np.cos(yy / 4.0)).astype(np.float32)


def write_series(folder: Path, zs, *, patient="P1", description="", study=None, series=None,
                 offset=0.0, names="{k:03d}.dcm", **extra) -> list[Path]:
    """One classic CT series (HU = hu_image(z) + offset) in ``folder``; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = study or ctio.new_uid(), series or ctio.new_uid()
    files = []
    for k, z in enumerate(zs):
        hdr = ctio.new_ct_header(patient_id=patient, study_uid=study, series_uid=series,
                                 instance=k + 1, z_mm=z, shape=SHAPE, description=description)
        hdr.StudyTime, hdr.StudyID = "120000", "1"  # needed for a DICOMDIR STUDY record
        for key, value in extra.items():
            setattr(hdr, key, value)
        files.append(folder / names.format(k=k))
        ctio.write_dicom(files[-1], hu_image(z) + offset, hdr, series_uid=series,
                         description=description, derived=False)
    return files


def write_enhanced(path: Path, zs, intercepts, *, spacing=(0.5, 0.6), offset=0.0) -> str:
    """An Enhanced CT Image (one file, one frame per z in ``zs``, stored in that order) built by
    hand: Shared Functional Groups hold pixel measures and orientation, Per-frame ones the plane
    position and a per-frame rescale intercept. Frame k holds hu_image(zs[k]) + offset. Returns its
    SOPInstanceUID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "E1", "E1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 7, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(zs), SHAPE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SharedFunctionalGroupsSequence = [item(
        PixelMeasuresSequence=[item(PixelSpacing=list(spacing), SliceThickness=3.0)],
        PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])]
    ds.PerFrameFunctionalGroupsSequence = [item(
        PlanePositionSequence=[item(ImagePositionPatient=[-5.0, -4.0, float(z)])],
        PixelValueTransformationSequence=[item(RescaleSlope=1, RescaleIntercept=b,
                                               RescaleType="HU")])
        for z, b in zip(zs, intercepts)]
    ds.PixelData = np.stack([np.round(hu_image(z) + offset - b).astype(np.int16)
                             for z, b in zip(zs, intercepts)]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def check_pairs(dataset) -> None:
    """Every record's LD and FD come from one position and hold the images written there (FD =
    hu_image(z), LD = FD + 5 HU)."""
    for r in dataset.records:
        ld, ld_hdr = ctio.read_slice(r.ld_path)
        fd, fd_hdr = ctio.read_slice(r.fd_path)
        assert ctio.slice_position(ld_hdr) == ctio.slice_position(fd_hdr) == r.position
        np.testing.assert_allclose(fd, hu_image(r.position), atol=0.5)
        np.testing.assert_allclose(ld, hu_image(r.position) + 5, atol=0.5)


# --- item 5: DICOMDIR and nested trees ----------------------------------------------------------
def test_dicomdir_cd_export_groups_series_by_patient_and_pairs_by_description(tmp_path, capsys):
    from pydicom.fileset import FileSet

    fs = FileSet()
    for patient, zs in (("A 1", [6.0, 0.0, 3.0]), ("B-2", [1.0, 2.0])):
        study = ctio.new_uid()
        for desc, offset in (("Low Dose Images", 5.0), ("Full Dose Images", 0.0)):
            for f in write_series(tmp_path / "stage" / patient / desc, zs, patient=patient,
                                  description=desc, study=study, offset=offset):
                fs.add(f)
    fs.write(tmp_path / "cd")
    (tmp_path / "cd" / "AUTORUN.INF").write_text("[autorun]")  # not in the DICOMDIR: not read
    assert (tmp_path / "cd" / "PT000000").is_dir()  # the CD layout: PT*/ST*/SE*/IM*
    ds = ctdata.discover(tmp_path / "cd")
    assert ds.layout == "tree" and ds.paired and ds.patients == ["A_1", "B-2"]
    assert [(r.patient, r.slice_id, r.position) for r in ds.records] == [
        ("A_1", "0000", 0.0), ("A_1", "0001", 3.0), ("A_1", "0002", 6.0),
        ("B-2", "0000", 1.0), ("B-2", "0001", 2.0)]
    check_pairs(ds)
    assert "AUTORUN" not in capsys.readouterr().out


def test_nested_tree_one_patient_identity_across_folders_and_series(tmp_path, capsys):
    """ROOT/<visit>/<study>/<series>/*.dcm: one PatientID in two folders with two QD/FD series pairs
    (3 mm and 1 mm, paired by slice position) is ONE patient for every loader; a patient
    without PatientID, or with a placeholder one, is named by its top folder."""
    root = tmp_path / "export"
    write_series(root / "visit1" / "ct" / "quarter_3mm", [0.0, 3.0, 6.0], patient="P 7", offset=5.0)
    write_series(root / "visit1" / "ct" / "full_3mm", [6.0, 0.0, 3.0], patient="P 7")
    write_series(root / "visit2" / "ct" / "s1", [0.5, 1.5], patient="P 7",
                 description="FULL DOSE 1mm")
    write_series(root / "visit2" / "ct" / "s2", [1.5, 0.5], patient="P 7", offset=5.0,
                 description="low dose 1mm")
    write_series(root / "anon" / "a" / "quarter_x", [2.0, 4.0], patient="", offset=5.0)
    write_series(root / "anon" / "a" / "full_x", [4.0, 2.0], patient="")
    write_series(root / "anon" / "a" / "full_thin", [2.0, 2.5, 3.0], patient="")  # no QD partner
    for name in ("L067", "L096"):  # as in the Mayo challenge files: PatientID "Anonymous"
        write_series(root / name / "a" / "quarter_y", [2.0], patient="Anonymous", offset=5.0)
        write_series(root / name / "a" / "full_y", [2.0], patient="Anonymous")
    ds = ctdata.discover(root)
    assert ds.layout == "tree" and ds.paired
    assert ds.patients == ["L067", "L096", "P_7", "anon"]
    assert "skipped full-dose series 1 in " + str(root / "anon" / "a" / "full_thin") in \
        capsys.readouterr().out
    ids = [r.slice_id for r in ds.records if r.patient == "P_7"]
    assert sorted(ids) == ["3mm_0000", "3mm_0001", "3mm_0002", "s1_0000", "s1_0001"]
    check_pairs(ds)
    # the training loader splits by that identity, the test loader reads the same records
    split = MyDataLoader_train.split_patients(
        MyDataLoader_train.check_trainable(MyDataLoader_train.discover_all([str(root)])),
        val_patients=["P_7"])
    assert {r.patient for r in split.val} == {"P_7"}
    assert {r.patient for r in split.train} == {"anon", "L067", "L096"}
    test_ds = MyDataLoader_test.load_test_dataset(str(root))
    assert [r.ld_path for r in test_ds.records] == [r.ld_path for r in ds.records]


def test_tree_without_dose_marks_is_unpaired_and_ambiguous_pairs_are_errors(tmp_path):
    root = tmp_path / "t"
    write_series(root / "p" / "st" / "se1", [0.0, 1.0], patient="X", SeriesNumber=3)
    write_series(root / "p" / "st" / "se2", [0.0, 1.0], patient="X", SeriesNumber=4)
    fd = ctdata.discover(root, single_role="fd")
    assert fd.layout == "tree" and fd.patients == ["X"] and not fd.has_ld
    assert sorted(r.slice_id for r in fd.records) == ["s3_0000", "s3_0001", "s4_0000", "s4_0001"]
    # two QD series, one FD series with their positions: which pair is meant is unclear
    bad = tmp_path / "bad"
    write_series(bad / "a" / "st" / "quarter_a", [0.0, 1.0], patient="Y")
    write_series(bad / "a" / "st" / "quarter_b", [5.0, 6.0], patient="Y")
    write_series(bad / "a" / "st" / "full_a", [0.0, 1.0], patient="Y")
    with pytest.raises(ctio.CTDataError, match="no full-dose series with the same 2 slice"):
        ctdata.discover(bad)


# --- item 6: Enhanced CT (multi-frame) ----------------------------------------------------------
def test_enhanced_ct_frames_read_with_their_own_position_and_rescale(tmp_path):
    zs, intercepts = [9.0, 0.0, 6.0, 3.0], [-1024, -1000, -1024, -2048]
    f = tmp_path / "series" / "enhanced.dcm"
    write_enhanced(f, zs, intercepts)
    ds = ctdata.discover(tmp_path / "series")
    assert ds.layout == "dicom" and [r.position for r in ds.records] == [0.0, 3.0, 6.0, 9.0]
    for r in ds.records:
        hu, header = ctio.read_slice(r.ld_path)
        assert ctio.split_frame(r.ld_path) == (f, zs.index(r.position) + 1)
        np.testing.assert_array_equal(hu, np.maximum(hu_image(r.position), -1024))
        assert header.ImagePositionPatient[2] == r.position
        assert ctio.pixel_spacing(header) == (0.5, 0.6)
        assert header.RescaleIntercept == intercepts[zs.index(r.position)]
        assert "PerFrameFunctionalGroupsSequence" not in header
    assert "enhanced.dcm#frame=2" in ds.records[0].ld_path


def test_enhanced_quarter_pairs_with_classic_full_and_loads_for_training(tmp_path):
    root = tmp_path / "mayo" / "P1"
    write_series(root / "full_3mm", [3.0, 0.0, 6.0])
    write_enhanced(root / "quarter_3mm" / "qd", [6.0, 0.0, 3.0], [-1024] * 3,
                   spacing=(0.7, 0.7), offset=5.0)
    ds = ctdata.discover(tmp_path / "mayo")
    assert ds.layout == "mayo" and ds.paired and len(ds.records) == 3
    check_pairs(ds)
    cache = MyDataLoader_train.SliceCache(tmp_path / "cache")
    ld, fd = cache.load(ds.records[1])
    np.testing.assert_allclose((ld - fd) * ctio.HU_RANGE, 5.0, atol=0.05)  # HU


# --- item 7: junk among the slices --------------------------------------------------------------
def test_junk_duplicates_and_secondary_capture_are_skipped_with_notes(tmp_path, capsys):
    import pydicom

    folder = tmp_path / "series"
    files = write_series(folder, [0.0, 1.0, 2.0])
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + os.urandom(500))
    (folder / "LOCK").write_text("locked by viewer 1234")
    (folder / "copy_of_000").write_bytes(files[0].read_bytes())  # the same SOP Instance
    dose = pydicom.dcmread(files[1])  # a dose-report screenshot: Modality CT, RGB, SC class
    sc = pydicom.uid.SecondaryCaptureImageStorage
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = sc
    dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = ctio.new_uid()
    dose.SamplesPerPixel, dose.PhotometricInterpretation, dose.PlanarConfiguration = 3, "RGB", 0
    dose.BitsAllocated, dose.BitsStored, dose.HighBit, dose.PixelRepresentation = 8, 8, 7, 0
    dose.SeriesDescription = "Dose Report"
    dose.PixelData = np.zeros((*SHAPE, 3), np.uint8).tobytes()
    dose.save_as(folder / "IM_dose")
    ds = ctdata.discover(folder)
    assert [Path(r.ld_path) for r in ds.records] == files
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, notes
    junk = next(n for n in notes if "not CT image slices" in n)
    assert "skipped 3 file(s)" in junk and str(folder) in junk
    dup = next(n for n in notes if "duplicate(s) of SOP" in n)
    assert "copy_of_000" in dup and str(files[0]) in dup
    with pytest.raises(ctio.CTDataError, match="secondary-capture image .Dose Report."):
        ctio.read_slice(folder / "IM_dose")


def test_several_series_in_one_folder_are_named_in_a_note(tmp_path, capsys):
    write_series(tmp_path / "mixed", [0.0, 1.0])
    write_series(tmp_path / "mixed", [2.0, 3.0], names="b{k}.dcm")
    ds = ctdata.discover(tmp_path / "mixed")
    assert len(ds.records) == 4
    assert "holds 2 series" in capsys.readouterr().out


def test_folder_of_junk_only_is_an_error_naming_a_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "Thumbs.db").write_bytes(os.urandom(100))
    with pytest.raises(ctio.CTDataError, match="Thumbs.db: not a readable DICOM"):
        ctdata.discover(tmp_path / "d")


# --- item 8: derived DICOM references its input -------------------------------------------------
def test_derived_dicom_references_the_input_instance_and_is_dated_now(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset

    src = write_series(tmp_path / "in", [0.0])[0]
    header = pydicom.dcmread(src)
    header.ContentDate, header.ContentTime = "20160101", "101010"
    older = Dataset()
    older.ReferencedSOPClassUID, older.ReferencedSOPInstanceUID = header.SOPClassUID, "1.2.3"
    header.SourceImageSequence = [older]  # the input's own source: must not be copied
    before = datetime.datetime.now().replace(microsecond=0)
    ctio.write_dicom(tmp_path / "out.dcm", hu_image(0.0), header, series_uid=ctio.new_uid(),
                     description="denoised")
    out = pydicom.dcmread(tmp_path / "out.dcm")
    (ref,) = out.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == header.SOPInstanceUID != out.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == header.SOPClassUID and "ReferencedFrameNumber" not in ref
    written = datetime.datetime.strptime(out.ContentDate + out.ContentTime, "%Y%m%d%H%M%S.%f")
    assert before <= written <= datetime.datetime.now()


def test_mytest_dicom_of_an_enhanced_input_references_each_frame(tiny_run, tmp_path):
    """Mytest.py --format dicom on an Enhanced CT file: one classic CT slice per frame, at that
    frame's position, whose SourceImageSequence names the enhanced instance and the frame."""
    import pydicom

    import Mytest

    zs = [4.0, 0.0, 2.0]
    sop = write_enhanced(tmp_path / "data" / "enh.dcm", zs, [-1024] * 3)
    out = tmp_path / "out"
    assert Mytest.main([str(a) for a in ("--data", tmp_path / "data", "--run", tiny_run,
                                         "--out", out, "--format", "dicom")]) == 0
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 3
    for f in files:
        ds = pydicom.dcmread(f)
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == sop
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert float(ds.ImagePositionPatient[2]) == zs[int(ref.ReferencedFrameNumber) - 1]
        assert ds.ContentDate == datetime.date.today().strftime("%Y%m%d")

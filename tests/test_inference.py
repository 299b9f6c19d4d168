"""Mytest.py: whole-slice inference, output files, manifest, resume and error handling.

The run folder holds an UNTRAINED tiny generator, which is initialised to the identity, so the
denoised slices must equal the inputs (up to float rounding): that pins padding, tiling,
normalisation and every writer without a trained model.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, make_run

import ctfixtures
import ctio
import ctprocess
import ctrun

BASE, DEPTH = 8, 3  # tiny generator; depth 3 -> slices are padded to multiples of 8


def phantom(shape, rng) -> np.ndarray:
    return ctfixtures.ellipse_phantom(shape, rng)


def write_mayo(root: Path, patient: str, shape, n: int, with_fd: bool = True,
               seed: int = 0) -> Path:
    """ROOT/<patient>/{quarter_3mm,full_3mm}/*.dcm (LD = FD + 20 HU noise)."""
    rng = np.random.default_rng(seed)
    study = ctio.new_uid()
    series = {"quarter_3mm": ctio.new_uid(), "full_3mm": ctio.new_uid()}
    for i in range(n):
        fd = phantom(shape, rng)
        ld = fd + rng.normal(0, 20, shape).astype(np.float32)
        for sub, img in (("quarter_3mm", ld), ("full_3mm", fd)):
            if sub == "full_3mm" and not with_fd:
                continue
            d = root / patient / sub
            d.mkdir(parents=True, exist_ok=True)
            hdr = ctio.new_ct_header(patient_id=patient, study_uid=study, series_uid=series[sub],
                                     instance=i + 1, z_mm=-50.0 + 3.0 * i, shape=shape,
                                     description=sub)
            ctio.write_dicom(d / f"{n - i:03d}.dcm", np.maximum(img, -1024), hdr,
                             series_uid=series[sub], description=sub, derived=False)
    return root


def write_npy_ld_only(root: Path, patient: str, shape, n: int, seed: int = 1) -> Path:
    """RED-CNN layout, low-dose inputs only: <patient>_<i>_input.npy ((HU + 1024) / 4096)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ld = phantom(shape, rng) + rng.normal(0, 20, shape).astype(np.float32)
        np.save(root / f"{patient}_{i}_input.npy", (np.maximum(ld, -1024) + 1024) / 4096)
    return root


def read_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def run_cli(*args, timeout=180):
    return cli("Mytest.py", *args, timeout=timeout)


@pytest.fixture(scope="module")
def mayo(tmp_path_factory) -> Path:
    return write_mayo(tmp_path_factory.mktemp("mayo"), "P1", (64, 48), 3)


def test_dicom_run_outputs_resume_and_overwrite(tiny_run, mayo, tmp_path, capsys):
    import pydicom

    import Mytest

    out = tmp_path / "out"
    args = ["--data", mayo, "--run", tiny_run, "--out", out, "--format", "png,tif,dicom",
            "--batch", "2"]
    assert Mytest.main(list(map(str, args))) == 0
    rows = read_rows(out)
    assert [r["slice_id"] for r in rows] == ["0000", "0001", "0002"]
    uids, numbers = set(), []
    for r in rows:
        pred = np.load(out / r["pred_npy"])
        ld = ctio.read_slice(r["ld_path"])[0]
        assert pred.dtype == np.float32 and pred.shape == (64, 48)
        np.testing.assert_allclose(pred, ld, atol=0.05)  # identity generator
        png = __import__("cv2").imread(str(out / r["png"]), -1)
        np.testing.assert_array_equal(png, ctio.window_to_uint8(pred, (-160, 240)))
        np.testing.assert_allclose(ctio.read_tif(out / r["tiff"]), pred)
        assert r["fd_path"] and (out / r["figure"]).is_file()
        assert r["weights"].endswith("generator_best.weights.h5") and r["run"] == str(tiny_run)
        # DICOM: the source's geometry, HU within 1 HU of the float output, a new series
        src = pydicom.dcmread(r["ld_path"], stop_before_pixels=True)
        dcm = pydicom.dcmread(out / r["dicom"])
        assert (dcm.Rows, dcm.Columns) == (src.Rows, src.Columns)
        assert list(dcm.ImagePositionPatient) == list(src.ImagePositionPatient)
        assert list(dcm.PixelSpacing) == list(src.PixelSpacing)
        hu = dcm.pixel_array * float(dcm.RescaleSlope) + float(dcm.RescaleIntercept)
        assert np.abs(hu - pred).max() <= 1.0
        assert dcm.StudyInstanceUID == src.StudyInstanceUID
        assert dcm.SeriesInstanceUID != src.SeriesInstanceUID
        assert dcm.SOPInstanceUID != src.SOPInstanceUID
        assert "CNCL denoised" in dcm.SeriesDescription and dcm.ImageType[0] == "DERIVED"
        assert dcm.InstanceNumber == src.InstanceNumber
        uids.add(dcm.SeriesInstanceUID)
        numbers.append(int(dcm.InstanceNumber))
    assert len(uids) == 1  # one derived series per patient
    assert numbers == sorted(set(numbers))  # slices in table order: InstanceNumber increasing
    fig = __import__("cv2").imread(str(out / rows[0]["figure"]))
    assert fig.shape[0] == 64 and fig.shape[1] == 4 * 48 + 3 * 2  # four panels, 2-px gaps

    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: stamp(p) for p in files}
    capsys.readouterr()
    # Rerun: everything is done, nothing is rewritten.
    assert Mytest.main(list(map(str, args))) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: stamp(p) for p in files} == before

    # Interrupted run: one slice missing from the manifest and a stale temporary of a dead
    # writer. The rerun removes the temporary, redoes that slice only, duplicates nothing.
    with open(out / "manifest.csv", newline="") as f:
        lines = f.readlines()
    (out / "manifest.csv").write_text("".join(lines[:-1]))
    stale = out / "P1" / ".0002.tmp999999999.npy"
    stale.write_bytes(b"partial")
    assert Mytest.main(list(map(str, args))) == 0
    assert "skipping 2 finished slice(s); 1 to do" in capsys.readouterr().out
    assert not stale.exists()
    rows2 = read_rows(out)
    assert [r["slice_id"] for r in rows2] == ["0000", "0001", "0002"]
    assert stamp(out / "P1" / "0000.png") == before[out / "P1" / "0000.png"]
    assert stamp(out / "P1" / "0002.png") != before[out / "P1" / "0002.png"]
    assert len({r["series_uid"] for r in rows2}) == 1  # the resumed slice joins the series
    assert not [p for p in out.rglob(".*") if p.is_file()]

    # --overwrite redoes every slice.
    assert Mytest.main(list(map(str, [*args, "--overwrite"]))) == 0
    assert "denoised 3 slice(s)" in capsys.readouterr().out
    assert stamp(out / "P1" / "0000.npy") != before[out / "P1" / "0000.npy"]
    assert len(read_rows(out)) == 3


def test_ld_only_odd_size(tiny_run, tmp_path):
    import cv2

    import Mytest

    data = write_npy_ld_only(tmp_path / "npy", "L001", (100, 76), 2)
    out = tmp_path / "out"
    assert Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["fd_path"] == "" and r["figure"] == "" for r in rows)
    for r in rows:
        pred = np.load(out / r["pred_npy"])
        assert pred.shape == (100, 76)
        np.testing.assert_allclose(pred, ctio.read_slice(r["ld_path"])[0], atol=0.05)
        assert cv2.imread(str(out / r["png"]), -1).shape == (100, 76)
    assert not (out / "figures").exists()
    # Another model's weights into the same OUT would mix two models in one manifest.
    import Mymodel

    other = tmp_path / "other.weights.h5"
    Mymodel.build_generator(BASE, DEPTH, "batch").save_weights(str(other))
    with pytest.raises(ctio.CTDataError, match="made with other weights"):
        Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out),
                     "--weights", str(other)])
    # npy/tif input has no DICOM header: DICOM output is refused, not invented.
    with pytest.raises(ctio.CTDataError, match="needs DICOM input"):
        Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out),
                     "--format", "dicom"])


def test_tiling_and_padding_match_input(tiny_run):
    import Mytest

    gen = Mytest.load_generator(ctrun.read_run_config(tiny_run)["model"],
                                tiny_run / "generator_best.weights.h5")
    rng = np.random.default_rng(3)
    imgs = [np.maximum(phantom((100, 76), rng) + rng.normal(0, 20, (100, 76)), -1024)
            .astype(np.float32) for _ in range(2)]
    tiled = Mytest.Denoiser(gen, DEPTH, batch=3, max_side=64, tile=32)
    whole = Mytest.Denoiser(gen, DEPTH, batch=3)
    for a, b, x in zip(tiled(imgs), whole(imgs), imgs):
        assert a.shape == x.shape == (100, 76)
        np.testing.assert_allclose(a, x, atol=0.05)
        np.testing.assert_allclose(a, b, atol=0.05)
    assert Mytest._tile_starts(104, 32, 8) == [0, 24, 48, 72]


def test_mismatched_weights_are_one_ctdataerror(tiny_run, tmp_path):
    import Mytest

    other = make_run(tmp_path / "tiny", base=4, depth=DEPTH)
    with pytest.raises(ctio.CTDataError, match="cannot load generator weights") as e:
        Mytest.load_generator(ctrun.read_run_config(tiny_run)["model"],
                              other / "generator_best.weights.h5")
    assert str(other / "generator_best.weights.h5") in str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_weights_exit_2_one_line(tiny_run, mayo, tmp_path):
    good = (tiny_run / "generator_best.weights.h5").read_bytes()
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(good[: len(good) // 2])
    res = run_cli("--data", mayo, "--run", tiny_run, "--weights", bad, "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in res.stderr


def test_cheap_argument_errors(tiny_run, mayo, tmp_path, monkeypatch):
    import Mytest

    base = ["--data", str(mayo), "--run", str(tiny_run), "--out", str(tmp_path / "o")]
    cases = [
        (["--window", "240", "-160"], "LOW < HIGH"),
        (["--batch", "0"], "--batch 0"),
        (["--weights", str(tmp_path / "none.weights.h5")], "weights file not found"),
        (["--out", str(mayo / "P1" / "x")], "inside the input folder"),
        (["--run", str(tmp_path)], "config.json: no such file"),
    ]
    if Path("/sys").is_dir():  # unwritable even for root: refused before any work
        cases.append((["--out", "/sys/cncl-out"], "--out /sys/cncl-out: cannot write in /sys"))
    for extra, msg in cases:
        with pytest.raises(ctio.CTDataError, match=msg):
            Mytest.main(base + extra)
    with pytest.raises(ctio.CTDataError, match="unknown format"):
        Mytest.main(base + ["--format", "png,jpeg"])
    # one DICOM folder is patient 'quarter_3mm': OUT/quarter_3mm/ would be the input folder
    with pytest.raises(ctio.CTDataError, match="would hold the input data"):
        Mytest.main(["--data", str(mayo / "P1" / "quarter_3mm"), "--layout", "dicom",
                     "--run", str(tiny_run), "--out", str(mayo / "P1")])
    notes = tmp_path / "notes.weights.h5"
    notes.write_text("not hdf5")
    with pytest.raises(ctio.CTDataError, match="no HDF5 signature"):
        Mytest.main(base + ["--weights", str(notes)])
    # --run defaults to the newest runs/*/ with a config.json
    monkeypatch.setattr(ctrun, "RUNS_DIR", tmp_path / "runs")
    with pytest.raises(ctio.CTDataError, match="no training run"):
        ctrun.find_latest_run()
    assert ctrun.find_latest_run(tiny_run.parent) == tiny_run
    # errors before TensorFlow: a CLI failure here is one line and fast
    res = run_cli("--data", mayo, "--run", tiny_run, "--window", "1", "1")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_defaults_demo_data_and_newest_run(tiny_run, mayo, tmp_path, monkeypatch):
    import Mytest

    monkeypatch.setattr(Mytest, "DEMO_DIR", tmp_path / "no-demo")
    with pytest.raises(ctio.CTDataError, match="make demo"):
        Mytest.main(["--run", str(tiny_run)])
    # --data: the demo tree, test patient only; --run: newest run; --out: RUN/test
    write_mayo(mayo_copy := tmp_path / "demo", "P2", (32, 32), 1, seed=5)
    write_mayo(mayo_copy, "P1", (32, 40), 2, seed=6)
    monkeypatch.setattr(Mytest, "DEMO_DIR", mayo_copy)
    monkeypatch.setattr(Mytest, "demo_test_patient", lambda: "P1")
    monkeypatch.setattr(ctrun, "RUNS_DIR", tiny_run.parent)
    assert Mytest.main(["--no-figures"]) == 0
    rows = read_rows(tiny_run / "test")
    assert {r["patient"] for r in rows} == {"P1"} and len(rows) == 2


@pytest.mark.slow
def test_real_sample_data(tiny_run, real_data, tmp_path):
    """Real Mayo TIFF pair and a GE DICOM series with padding: sizes, HU and DICOM geometry."""
    import pydicom

    import Mytest

    out = tmp_path / "tif"
    assert Mytest.main(["--data", str(real_data / "mayo_pairs" / "tif_cncl"), "--run",
                        str(tiny_run), "--out", str(out)]) == 0
    (row,) = read_rows(out)
    pred = np.load(out / row["pred_npy"])
    np.testing.assert_allclose(pred, ctio.read_slice(row["ld_path"])[0], atol=0.1)
    assert (out / row["figure"]).is_file()

    ge = real_data / "dicom_misc" / "gehc_ct_3slice"
    if not ge.is_dir():
        pytest.skip(f"{ge} not found")
    out = tmp_path / "ge"
    assert Mytest.main(["--data", str(ge), "--run", str(tiny_run), "--out", str(out),
                        "--format", "dicom"]) == 0
    for r in read_rows(out):
        src = pydicom.dcmread(r["ld_path"], stop_before_pixels=True)
        dcm = pydicom.dcmread(out / r["dicom"])
        assert list(dcm.ImagePositionPatient) == list(src.ImagePositionPatient)
        hu = dcm.pixel_array * float(dcm.RescaleSlope) + float(dcm.RescaleIntercept)
        assert np.abs(hu - np.load(out / r["pred_npy"])).max() <= 1.0


def _anonymise(folder: Path) -> None:
    """Empty SOPClassUID / SOPInstanceUID / SeriesInstanceUID in the dataset, as some
    anonymisers leave them (the file meta keeps MediaStorageSOPClassUID)."""
    import pydicom

    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.SOPInstanceUID = ds.SeriesInstanceUID = ""
        ds.save_as(f)


def test_empty_sop_class_uid_and_derived_series_per_source_series(tiny_run, tmp_path):
    """Issue 19 items 3 and 4: anonymised headers are written; one derived series per SOURCE
    series, stable across reruns and a one-slice --overwrite."""
    import pydicom
    from pydicom.uid import CTImageStorage

    import Mytest

    data = tmp_path / "data"
    write_mayo(data / "a", "P1", (32, 32), 2, seed=2)
    write_mayo(data / "b", "P1", (32, 32), 2, seed=3)
    p1 = data / "P1"
    p1.mkdir()
    for src, suffix in ((data / "a" / "P1", "1mm"), (data / "b" / "P1", "3mm")):
        for side in ("quarter", "full"):
            (src / f"{side}_3mm").rename(p1 / f"{side}_{suffix}")
    _anonymise(p1 / "quarter_1mm")
    out = tmp_path / "out"
    args = ["--data", str(p1), "--run", str(tiny_run), "--out", str(out), "--format", "dicom",
            "--no-figures"]
    assert Mytest.main(args) == 0
    rows = {r["slice_id"]: r for r in read_rows(out)}
    assert sorted(rows) == ["1mm_0000", "1mm_0001", "3mm_0000", "3mm_0001"]
    series = {}
    for sid, r in rows.items():
        dcm = pydicom.dcmread(out / r["dicom"])
        assert dcm.SOPClassUID == dcm.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert dcm.SeriesInstanceUID == r["series_uid"]
        series.setdefault(sid[:3], set()).add(dcm.SeriesInstanceUID)
    assert all(len(u) == 1 for u in series.values()) and series["1mm"] != series["3mm"]
    # Redoing one slice keeps it in its series (the UID is derived, not random).
    first = rows["1mm_0001"]["series_uid"]
    assert Mytest.main([*args, "--slices", "P1:1mm_0001", "--overwrite"]) == 0
    again = {r["slice_id"]: r for r in read_rows(out)}
    assert pydicom.dcmread(out / again["1mm_0001"]["dicom"]).SeriesInstanceUID == first
    assert {r["series_uid"] for r in again.values()} == {r["series_uid"] for r in rows.values()}


def test_failed_slice_leaves_no_output_without_a_manifest_row(tiny_run, mayo, tmp_path,
                                                             monkeypatch):
    """A writer failing mid-slice (here the DICOM writer) removes that slice's other outputs;
    slices finished before it keep their rows."""
    import Mytest

    real = ctio.write_dicom
    calls = []

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise ctio.CTDataError(f"{path}: simulated write failure")
        return real(path, *a, **k)

    monkeypatch.setattr(ctio, "write_dicom", failing)
    out = tmp_path / "out"
    with pytest.raises(ctio.CTDataError, match="simulated write failure"):
        Mytest.main(["--data", str(mayo), "--run", str(tiny_run), "--out", str(out),
                     "--format", "png,dicom", "--batch", "3"])
    rows = read_rows(out)
    assert [r["slice_id"] for r in rows] == ["0000"]
    listed = {out / p for r in rows for p in Mytest.row_outputs(r)}
    files = {p for p in out.rglob("*") if p.is_file() and p.name != "manifest.csv"}
    assert files == listed, files ^ listed
    monkeypatch.setattr(ctio, "write_dicom", real)
    assert Mytest.main(["--data", str(mayo), "--run", str(tiny_run), "--out", str(out),
                        "--format", "png,dicom", "--batch", "3"]) == 0
    assert len(read_rows(out)) == 3


def test_derived_dicom_of_a_series_is_one_series(tiny_run, tmp_path):
    """Mytest.py --format dicom on a plain DICOM series gives one loadable series (the check
    the benchmark's scale section runs on a 560-slice series): one SeriesInstanceUID,
    InstanceNumbers monotonic along the table, the source's position, orientation, spacing."""
    import Mybenchmark
    import Mytest

    series = Mybenchmark.write_dicom_series(tmp_path / "series", 5, (32, 32))
    out = tmp_path / "out"
    assert Mytest.main([str(a) for a in ("--data", series, "--run", tiny_run, "--out", out,
                                         "--format", "dicom", "--no-figures")]) == 0
    check = ctprocess.check_derived_series(out, series)
    assert check == {"files": 5, "series_uids": 1, "instance_numbers_monotonic": True,
                     "source_geometry": True, "one_series": True}


# --- Issue 26: nothing lost, nothing stale, nothing half made ------------------------------------
def _files(out: Path) -> set:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def assert_manifest_is_the_folder(out: Path) -> None:
    """Every file in OUT is in its manifest (or is the manifest) and every listed file exists."""
    import Mytest

    listed = {p for r in read_rows(out) for p in Mytest.row_outputs(r)}
    assert _files(out) - {"manifest.csv"} == listed, _files(out) ^ listed


def test_a_folder_mytest_did_not_make_is_refused_with_overwrite_too(tiny_run, mayo, tmp_path):
    """OUT holding a user's files and no manifest: one CTDataError naming a file, with and
    without --overwrite; the user's file is byte-identical afterwards. An empty OUT is used."""
    import Mytest

    user = tmp_path / "mine"
    (user / "P1").mkdir(parents=True)
    (user / "P1" / "0001.png").write_bytes(b"\x89PNG my own picture")
    base = ["--data", str(mayo), "--run", str(tiny_run), "--out", str(user)]
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ctio.CTDataError, match="not a Mytest.py output folder") as e:
            Mytest.main(base + extra)
        assert str(user / "P1" / "0001.png") in str(e.value)
    assert (user / "P1" / "0001.png").read_bytes() == b"\x89PNG my own picture"
    assert _files(user) == {"P1/0001.png"}
    (empty := tmp_path / "empty").mkdir()
    assert Mytest.main(["--data", str(mayo), "--run", str(tiny_run), "--out", str(empty),
                        "--no-figures", "--slices", "P1:0000"]) == 0
    assert_manifest_is_the_folder(empty)


def test_fewer_formats_or_other_weights_leave_no_stale_file(tiny_run, mayo, tmp_path):
    """Redoing a slice with fewer formats removes the outputs its new row no longer lists;
    --overwrite with other weights removes the outputs of the dropped rows (also of slices not
    selected now). Throughout, the manifest and the folder agree."""
    import Mytest

    out = tmp_path / "out"
    base = ["--data", str(mayo), "--run", str(tiny_run), "--out", str(out)]
    assert Mytest.main(base + ["--format", "dicom,png"]) == 0
    assert "P1/0001.png" in _files(out) and "figures/P1_0001.png" in _files(out)
    assert Mytest.main(base + ["--slices", "P1:0001", "--overwrite", "--format", "dicom",
                               "--no-figures"]) == 0
    assert_manifest_is_the_folder(out)
    assert not {"P1/0001.png", "figures/P1_0001.png"} & _files(out)
    assert {"P1/0000.png", "P1/dicom/0001.dcm"} <= _files(out)
    other = make_run(tmp_path / "other", base=4, depth=DEPTH)
    assert Mytest.main([*base[:2], "--run", str(other), "--out", str(out), "--overwrite",
                        "--slices", "P1:0002", "--no-figures"]) == 0
    assert_manifest_is_the_folder(out)
    assert [r["slice_id"] for r in read_rows(out)] == ["0002"]
    assert _files(out) == {"manifest.csv", "P1/0002.npy", "P1/0002.png"}


def test_an_unreadable_slice_is_refused_before_out_exists(tiny_run, mayo, tmp_path):
    """A slice whose pixels cannot be decoded: refused before OUT is created (no empty OUT left
    behind) and before TensorFlow would be needed."""
    import shutil

    import Mytest

    data = tmp_path / "data"
    shutil.copytree(mayo, data)
    bad = sorted((data / "P1" / "quarter_3mm").glob("*.dcm"))[0]
    bad.write_bytes(bad.read_bytes()[:-1000])
    out = tmp_path / "new" / "out"
    with pytest.raises(ctio.CTDataError, match=str(bad)):
        Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out)])
    assert not (tmp_path / "new").exists()

"""MyDataLoader_train / MyDataLoader_test: splits, tf.data patches and augmentation, and the two
check-my-data scripts run as a user runs them (subprocesses, one clean stderr line on bad input).

Datasets are generated in ``tmp_path``; the real sample data is only read, by tests taking the
``real_data`` fixture (skipped when absent).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from conftest import assert_one_error_line, cli
from numpy.lib.stride_tricks import sliding_window_view
from pydicom.uid import JPEG2000Lossless

import ctdata
import ctio
import MyDataLoader_test as test_loader
import MyDataLoader_train as train_loader

SCRIPTS = ("MyDataLoader_train.py", "MyDataLoader_test.py")
SHAPE = (16, 16)


# --- data builders ------------------------------------------------------------------------------
def write_ct(path: Path, hu, *, z: float, patient: str = "P1") -> Path:
    hu = np.asarray(hu, np.float32)
    hdr = ctio.new_ct_header(patient_id=patient, study_uid="1.2.826.0.1.3680043.2.1125.1",
                             series_uid="1.2.826.0.1.3680043.2.1125.2", instance=1, z_mm=z,
                             shape=hu.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    ctio.write_dicom(path, hu, hdr, series_uid=hdr.SeriesInstanceUID, description="t",
                     derived=False)
    return path


MAYO_ZS = (3.0, 0.0, 6.0)  # slice k is at MAYO_ZS[k]; its FD is 10 k HU and its LD 10 k + 15


def make_mayo(root: Path, patients=("L001", "L002"), zs=MAYO_ZS) -> Path:
    """ROOT/<patient>/{quarter_3mm,full_3mm}/ with file names in reverse z order."""
    for p in patients:
        for k, z in enumerate(zs):
            fd = np.full(SHAPE, 10.0 * k)
            write_ct(root / p / "quarter_3mm" / f"q{len(zs) - k}.dcm", fd + 15, z=z, patient=p)
            write_ct(root / p / "full_3mm" / f"f{k}.dcm", fd, z=z, patient=p)
    return root


def write_npy(root: Path, name: str, hu) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / name, (np.asarray(hu, np.float64) + 1024) / 4096)
    return root / name


def make_npy(root: Path, images: dict, fd_offset: float = 0.0) -> Path:
    """``{(patient, idx): ld_hu}`` -> RED-CNN pairs with FD = LD + fd_offset (HU)."""
    for (patient, idx), ld in images.items():
        write_npy(root, f"{patient}_{idx}_input.npy", ld)
        write_npy(root, f"{patient}_{idx}_target.npy", np.asarray(ld) + fd_offset)
    return root


def make_tif(root: Path, n: int = 2) -> Path:
    for sub in ("noisy", "clean"):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            tifffile.imwrite(root / sub / f"L067_{i:04d}.tif",
                             np.full((1, *SHAPE), 5.0 * i + (sub == "noisy"), np.float32))
    return root


def records(n_per_patient: dict) -> ctdata.CTDataset:
    """A dataset of fake paired records (no files), sorted by patient and position."""
    recs = [ctdata.SliceRecord(p, f"{i:04d}", float(i), f"{p}/ld{i}", f"{p}/fd{i}", SHAPE)
            for p, n in sorted(n_per_patient.items()) for i in range(n)]
    return ctdata.CTDataset("npy", "mem", recs)


# --- normalisation in TensorFlow (the numpy side is in test_ctio.py) ----------------------------
@pytest.fixture(scope="module")
def tf():
    return ctio.import_tensorflow()


def test_normalize_tf_matches_numpy_and_denormalize_inverts(tf):
    hu = np.array([-2000.0, -1024.0, -160.0, 0.0, 240.0, 3072.0, 4000.0], np.float32)
    x = ctio.normalize(tf.constant(hu))
    np.testing.assert_allclose(x.numpy(), ctio.normalize(hu), atol=1e-7)
    np.testing.assert_allclose(x.numpy(), (np.clip(hu, -1024, 3072) + 1024) / 4096, atol=1e-7)
    np.testing.assert_allclose(ctio.denormalize(x).numpy(), np.clip(hu, -1024, 3072), atol=1e-3)


# --- patient split ------------------------------------------------------------------------------
def test_split_default_holds_out_the_last_patient():
    split = train_loader.split_patients(records({"L310": 3, "L067": 2, "L506": 4}))
    assert {r.patient for r in split.train} == {"L067", "L310"} and len(split.train) == 5
    assert {r.patient for r in split.val} == {"L506"} and len(split.val) == 4
    assert "L506" in split.how


def test_split_explicit_validation_patients():
    ds = records({"A": 2, "B": 3, "C": 4})
    split = train_loader.split_patients(ds, ["A", "C"])
    assert {r.patient for r in split.train} == {"B"}
    assert {r.patient for r in split.val} == {"A", "C"} and len(split.val) == 6
    with pytest.raises(ctio.CTDataError, match="Z"):
        train_loader.split_patients(ds, ["Z"])


def test_split_none_means_no_validation():
    ds = records({"A": 2, "B": 3})
    for word in ("none", "NONE"):
        split = train_loader.split_patients(ds, [word])
        assert split.val == [] and len(split.train) == 5


def test_split_single_patient_holds_out_the_last_slices_by_position():
    ds = records({"A": 10})
    split = train_loader.split_patients(ds)
    assert len(split.val) == 2 and len(split.train) == 8  # 20 % of 10
    assert min(r.position for r in split.val) > max(r.position for r in split.train)
    split = train_loader.split_patients(ds, val_fraction=0.5)
    assert len(split.val) == 5
    small = train_loader.split_patients(records({"A": 2}))
    assert len(small.train) == 1 and len(small.val) == 1  # at least one validation slice


def test_split_one_slice_is_reused_and_says_so():
    split = train_loader.split_patients(records({"A": 1}))
    assert split.train == split.val and len(split.train) == 1
    assert "not a held-out" in split.how


def test_split_with_every_patient_in_validation_is_an_error():
    with pytest.raises(ctio.CTDataError, match="empty training split"):
        train_loader.split_patients(records({"A": 2, "B": 2}), ["A", "B"])


# --- find_training_data / load_test_dataset -----------------------------------------------------
def test_training_needs_full_dose(tmp_path):
    for i in range(2):
        write_npy(tmp_path / "ld", f"P_{i}_input.npy", np.zeros(SHAPE))
    with pytest.raises(ctio.CTDataError, match="P_0_input.npy"):
        train_loader.find_training_data([str(tmp_path / "ld")])
    write_ct(tmp_path / "fd" / "a.dcm", np.zeros(SHAPE), z=0.0)
    with pytest.raises(ctio.CTDataError, match="simulate-dose"):
        train_loader.find_training_data(str(tmp_path / "fd"))


def test_on_the_fly_simulation_equals_mysimulate_for_the_same_seed(tmp_path):
    """--simulate-dose and Mysimulate.py --input give the same quarter dose for the same seed:
    one seed rule and one I0 rule (ctdose.slice_seed, ctdose.slice_i0)."""
    import ctfixtures
    import Mysimulate

    rng = np.random.default_rng(0)
    for k in range(2):
        hu = ctfixtures.ellipse_phantom((64, 64), rng)
        write_ct(tmp_path / "fd" / f"{k}.dcm", hu, z=3.0 * k)
    Mysimulate.simulate_dataset(tmp_path / "fd", tmp_path / "sim", 0.25, seed=3, progress=False)
    fly = train_loader.find_training_data(str(tmp_path / "fd"), simulate_dose=0.25)
    sim = train_loader.find_training_data(str(tmp_path / "sim"))
    assert len(fly.records) == len(sim.records) == 2
    for a, b in zip(fly.records, sim.records):  # both in table-position order
        ld_fly = ctio.denormalize(train_loader.load_pair(a, 0.25, seed=3)[0])
        ld_sim = ctio.denormalize(train_loader.load_pair(b)[0])
        noise = ld_sim - ctio.denormalize(train_loader.load_pair(b)[1])
        assert noise.std() > 1  # the comparison is about inserted noise, not two copies
        np.testing.assert_allclose(ld_fly, ld_sim, atol=0.51)  # DICOM stores whole HU


def test_training_data_from_two_folders_and_duplicates(tmp_path):
    make_npy(tmp_path / "a", {("A", 0): np.zeros(SHAPE)})
    make_npy(tmp_path / "b", {("B", 0): np.zeros(SHAPE), ("B", 1): np.zeros(SHAPE)})
    ds = train_loader.find_training_data([str(tmp_path / "a"), str(tmp_path / "b")])
    assert ds.patients == ["A", "B"] and len(ds.records) == 3
    make_npy(tmp_path / "c", {("A", 0): np.zeros(SHAPE)})
    with pytest.raises(ctio.CTDataError, match="two --data folders"):
        train_loader.find_training_data([str(tmp_path / "a"), str(tmp_path / "c")])


def test_test_loader_streams_pairs_in_position_order(tmp_path):
    ds = test_loader.load_test_dataset(make_mayo(tmp_path / "m"))
    slices = list(test_loader.iter_slices(ds))
    assert [(s.patient, s.position) for s in slices] == [
        (p, z) for p in ("L001", "L002") for z in (0.0, 3.0, 6.0)]
    for s in slices:
        k = MAYO_ZS.index(s.position)
        np.testing.assert_array_equal(s.fd_hu, np.full(SHAPE, 10.0 * k))
        np.testing.assert_array_equal(s.ld_hu - s.fd_hu, np.full(SHAPE, 15.0))
        assert s.header is not None and float(s.header.ImagePositionPatient[2]) == s.position
    only = test_loader.load_test_dataset(tmp_path / "m", patients=["L002"])
    assert only.patients == ["L002"] and len(only.records) == 3
    with pytest.raises(ctio.CTDataError, match="L999"):
        test_loader.load_test_dataset(tmp_path / "m", patients=["L999"])


def test_test_loader_accepts_low_dose_only(tmp_path):
    for i in range(2):
        write_npy(tmp_path / "npy", f"P_{i}_input.npy", np.full(SHAPE, 7.0))
    (tmp_path / "tif" / "noisy").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "tif" / "noisy" / "a_1.tif", np.zeros(SHAPE, np.float32))
    write_ct(tmp_path / "dcm" / "x.dcm", np.zeros(SHAPE), z=1.0)
    for sub, n in (("npy", 2), ("tif", 1), ("dcm", 1)):
        slices = list(test_loader.iter_slices(test_loader.load_test_dataset(tmp_path / sub)))
        assert len(slices) == n
        assert all(s.fd_hu is None and s.fd_path is None for s in slices)
    np.testing.assert_allclose(slices[0].ld_hu, np.zeros(SHAPE))
    write_ct(tmp_path / "full" / "full_1mm" / "a.dcm", np.zeros(SHAPE), z=0.0)
    with pytest.raises(ctio.CTDataError, match="only full-dose"):
        test_loader.load_test_dataset(tmp_path / "full")


def test_real_l067_is_56_low_dose_slices(real_data):
    ds = test_loader.load_test_dataset(real_data / "L067_full_1mm")
    assert ds.layout == "dicom" and len(ds.records) == 56 and ds.has_ld and not ds.paired
    first = next(test_loader.iter_slices(ds))
    assert first.ld_hu.shape == (512, 512) and first.fd_hu is None
    positions = [r.position for r in ds.records]
    assert positions == sorted(positions) and len(set(positions)) == 56


# --- tf.data training pipeline ------------------------------------------------------------------
def symmetries(a: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square 2-D array (rotations by 90 degrees, with and without flip)."""
    out = []
    for r in range(4):
        b = np.rot90(a, r)
        out += [b, b[:, ::-1]]
    return out


def locate(patch: np.ndarray, image: np.ndarray):
    """(symmetry index, y, x) such that patch is that symmetry of image[y:y+P, x:x+P], or None."""
    p = patch.shape[0]
    windows = sliding_window_view(image, (p, p))
    for g, s in enumerate(symmetries(patch)):
        hit = np.argwhere(np.all(np.abs(windows - s) < 1e-6, axis=(2, 3)))
        if len(hit):
            return g, int(hit[0][0]), int(hit[0][1])
    return None


def test_locate_finds_transformed_crops():
    img = np.random.default_rng(0).uniform(size=(12, 12))
    crop = img[3:8, 2:7]
    assert locate(crop, img) == (0, 3, 2)
    found = {locate(s, img)[0] for s in symmetries(crop)}
    assert len(found) == 8  # each symmetry is told apart
    assert locate(np.random.default_rng(1).uniform(size=(5, 5)), img) is None


def test_patches_have_identical_crop_and_augmentation_in_ld_and_fd(tmp_path, tf):
    rng = np.random.default_rng(5)
    images = {("P", i): rng.uniform(-900, 900, (20, 20)) for i in range(3)}
    ds = ctdata.discover(make_npy(tmp_path, images, fd_offset=100.0))
    sources = [ctio.normalize(ctio.read_npy(r.ld_path)) for r in ds.records]
    ctio.set_seed(3)
    data = train_loader.make_train_dataset(ds.records, patch=8, batch=8, patches_per_slice=4,
                                           skip_air=False)
    seen = set()
    for ld, fd in data.take(6):
        assert ld.dtype == tf.float32 and fd.dtype == tf.float32
        assert ld.shape == (8, 8, 8, 1) and fd.shape == (8, 8, 8, 1)
        ld, fd = ld.numpy()[..., 0], fd.numpy()[..., 0]
        # FD = LD + 100 HU before augmentation: any LD/FD difference in crop or transform
        # would break the constant difference.
        np.testing.assert_allclose(fd - ld, 100 / 4096, atol=2e-5)
        for patch in ld:
            where = [locate(patch, src) for src in sources]
            hits = [w for w in where if w is not None]
            assert hits, "patch is not a flipped/rotated crop of any source slice"
            seen.add(hits[0][0])
    assert len(seen) >= 4  # the augmentation really flips and rotates


def test_skip_air_prefers_patches_with_body(tmp_path, tf):
    hu = np.full((48, 48), -1024.0)
    hu[17:32, 17:32] = 40.0  # a small body (10 % of the slice) in air
    ds = ctdata.discover(make_npy(tmp_path, {("P", 0): hu, ("P", 1): hu}))
    air = ctio.normalize(train_loader.AIR_HU)
    body, mean = {}, {}
    for skip in (True, False):
        ctio.set_seed(7)
        data = train_loader.make_train_dataset(ds.records, patch=12, batch=16,
                                               patches_per_slice=4, skip_air=skip)
        fd = np.concatenate([b.numpy() for _, b in data.take(16)])  # 256 patches
        body[skip] = np.mean(np.any(fd > air, axis=(1, 2, 3)))  # share of patches with body
        mean[skip] = float(fd.mean())
    # A random 12x12 crop touches the body about half of the time; keeping the best 4 of 8
    # candidates raises that to about 85 %.
    assert body[True] > 0.7 and body[True] > body[False] + 0.15, body
    assert mean[True] > mean[False] > ctio.normalize(-1024.0), mean


def test_simulated_share_sets_the_fraction_of_simulated_slices(tmp_path, tf):
    """--simulated-share F: a fraction F of the slices comes from the full-dose-only records
    (their low dose simulated), 1 - F from the real pairs; without it each slice equally often.
    Real pairs have FD 0 HU, full-dose-only slices FD 500 HU, so a batch says which it drew."""
    make_npy(tmp_path / "real", {("R", i): np.zeros(SHAPE) for i in range(2)})
    for k in range(6):
        write_ct(tmp_path / "fd" / f"{k}.dcm", np.full(SHAPE, 500.0), z=3.0 * k, patient="S")
    ds = train_loader.find_training_data([str(tmp_path / "real"), str(tmp_path / "fd")],
                                         simulate_dose=0.25)
    n, cut = 600, ctio.normalize(250.0)

    def share(simulated_share):
        ctio.set_seed(2)
        data = train_loader.make_train_dataset(
            ds.records, patch=0, batch=1, simulate_dose=0.25, augment_data=False,
            cache_dir=tmp_path / "cache", simulated_share=simulated_share)
        return np.mean([float(np.mean(fd)) > cut for _, fd in data.take(n)])

    sd = np.sqrt(0.25 * 0.75 / n)  # binomial sd of a share near 0.25
    assert abs(share(0.25) - 0.25) < 4 * sd
    assert abs(share(None) - 6 / 8) < 4 * np.sqrt(0.75 * 0.25 / n)  # 6 of the 8 slices
    real_only = [r for r in ds.records if r.ld_path]
    with pytest.raises(ctio.CTDataError, match="found 2 real and 0 full-dose-only"):
        train_loader.make_train_dataset(real_only, patch=0, simulated_share=0.25)


def test_patch_larger_than_the_slice_is_an_error(tmp_path, tf):
    ds = ctdata.discover(make_npy(tmp_path, {("P", 0): np.zeros((16, 24))}))
    with pytest.raises(ctio.CTDataError, match="P_0_target.npy"):
        train_loader.make_train_dataset(ds.records, patch=20)
    with pytest.raises(ctio.CTDataError):
        train_loader.make_train_dataset([], patch=8)


def _whole_slice_batches(tmp_path, shape, tf):
    rng = np.random.default_rng(6)
    images = {("P", i): rng.uniform(-900, 900, shape) for i in range(3)}
    ds = ctdata.discover(make_npy(tmp_path, images, fd_offset=50.0))
    sources = [ctio.normalize(ctio.read_npy(r.ld_path)) for r in ds.records]
    ctio.set_seed(4)
    data = train_loader.make_train_dataset(ds.records, patch=0, batch=2)
    return [(a.numpy(), b.numpy()) for a, b in data.take(4)], sources


def _same_up_to_symmetry(img: np.ndarray, sources) -> bool:
    for src in sources:
        flips = [src, src[::-1], src[:, ::-1], src[::-1, ::-1]]
        if src.shape[0] == src.shape[1]:
            flips = symmetries(src)
        if any(f.shape == img.shape and np.allclose(f, img, atol=1e-6) for f in flips):
            return True
    return False


def test_whole_slices_square(tmp_path, tf):
    batches, sources = _whole_slice_batches(tmp_path, (16, 16), tf)
    for ld, fd in batches:
        assert ld.shape == fd.shape == (2, 16, 16, 1) and ld.dtype == np.float32
        np.testing.assert_allclose(fd - ld, 50 / 4096, atol=2e-5)
        assert all(_same_up_to_symmetry(x[..., 0], sources) for x in ld)


def test_whole_slices_non_square(tmp_path, tf):
    # augment() stacks the four 90-degree rotations, which fails for a 16x24 slice (16x24 and
    # 24x16 cannot be stacked); whole non-square slices must still come out, flipped or turned
    # by 180 degrees only.
    batches, sources = _whole_slice_batches(tmp_path, (16, 24), tf)
    for ld, fd in batches:
        assert ld.shape == fd.shape == (2, 16, 24, 1)
        np.testing.assert_allclose(fd - ld, 50 / 4096, atol=2e-5)
        assert all(_same_up_to_symmetry(x[..., 0], sources) for x in ld)


def test_whole_slices_of_mixed_sizes_are_an_error(tmp_path, tf):
    ds = ctdata.discover(make_npy(tmp_path, {("P", 0): np.zeros((16, 16)),
                                           ("P", 1): np.zeros((16, 24))}))
    with pytest.raises(ctio.CTDataError, match="16x24"):
        train_loader.make_train_dataset(ds.records, patch=0)


# --- the check-my-data scripts ------------------------------------------------------------------
def run_scripts(*args, scripts=SCRIPTS) -> dict:
    """Run the scripts concurrently with ``args``: {script: CompletedProcess}."""
    with ThreadPoolExecutor(len(scripts)) as pool:
        return dict(zip(scripts, pool.map(lambda script: cli(script, *args, timeout=300),
                                          scripts)))


def assert_summary(out: str, layout: str, patients, pairs: int) -> None:
    assert re.search(rf"^layout:\s+{layout}\s*$", out, re.M), out
    line = next(x for x in out.splitlines() if x.startswith("patients:"))
    assert all(p in line for p in patients), out
    assert re.search(rf"pairs:\s*{pairs}\b", out), out


def good_mayo(root):
    return make_mayo(root), "mayo", ("L001", "L002"), 6


def good_npy(root):
    return make_npy(root, {("L506", 0): np.zeros(SHAPE), ("L506", 40): np.ones(SHAPE)}), \
        "npy", ("L506",), 2


def good_tif(root):
    return make_tif(root), "tif", ("L067",), 2


@pytest.mark.parametrize("build", [good_mayo, good_npy, good_tif])
def test_scripts_summarise_good_data(tmp_path, build):
    root, layout, patients, pairs = build(tmp_path / "data")
    procs = run_scripts("--data", root)
    for script, proc in procs.items():
        assert proc.returncode == 0 and proc.stderr == "", (script, proc.stderr)
        assert_summary(proc.stdout, layout, patients, pairs)
    assert re.search(r"^split:.*training", procs["MyDataLoader_train.py"].stdout, re.M)


def test_train_script_reports_the_recipes_patch_and_everything_excluded(tmp_path, capsys):
    """The patch line is the one Mytrain.py's recipe trains on (ctrun.RECIPES, where Mytrain.py
    takes it from); --exclude of every patient is one clean refusal, in Mytrain.py's loader too."""
    import ctrun

    root = make_mayo(tmp_path / "data")
    for recipe, shown in (("cpu", "of {p}x{p} (recipe cpu"), ("paper", "whole slices")):
        assert train_loader.main(["--data", str(root), "--recipe", recipe]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("patches:")]
        assert len(line) == 1 and shown.format(p=ctrun.RECIPES[recipe]["patch"]) in line[0], line
    with pytest.raises(ctio.CTDataError, match="everything excluded"):
        train_loader.find_training_data([str(root)], exclude=["L001", "L002"])
    assert_one_error_line(cli("MyDataLoader_train.py", "--data", root, "--exclude", "L001",
                              "L002"), "--exclude L001 L002: everything excluded", code=2)


def test_scripts_on_an_unpaired_dicom_series(tmp_path):
    for i in range(3):
        write_ct(tmp_path / "S" / f"{i}.dcm", np.zeros(SHAPE), z=float(i))
    procs = run_scripts("--data", tmp_path / "S")
    for proc in procs.values():
        assert proc.returncode == 0, proc.stderr
        assert_summary(proc.stdout, "dicom", ("S",), 0)
    assert "--simulate-dose" in procs["MyDataLoader_train.py"].stdout  # full dose only: say how


def test_scripts_layout_override_and_unknown_layout(tmp_path):
    for i in range(2):
        write_ct(tmp_path / "full_input" / f"{i}.dcm", np.zeros(SHAPE), z=float(i))
    auto = run_scripts("--data", tmp_path, scripts=SCRIPTS[1:])[SCRIPTS[1]]
    assert_one_error_line(auto, "only full-dose")
    forced = run_scripts("--data", tmp_path, "--layout", "dicom", scripts=SCRIPTS[1:])[SCRIPTS[1]]
    assert forced.returncode == 0, forced.stderr
    assert_summary(forced.stdout, "dicom", ("full_input",), 0)
    for proc in run_scripts("--data", tmp_path, "--layout", "nifti").values():
        assert proc.returncode == 2 and "nifti" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_train_script_rejects_low_dose_only(tmp_path):
    write_npy(tmp_path, "P_0_input.npy", np.zeros(SHAPE))
    proc = run_scripts("--data", tmp_path, scripts=SCRIPTS[:1])[SCRIPTS[0]]
    assert_one_error_line(proc, tmp_path / "P_0_input.npy")


def bad_missing(root):
    return root / "nope", [root / "nope"]


def bad_empty(root):
    (root / "void").mkdir()
    return root / "void", [root / "void"]


def bad_mismatched(root):
    make_mayo(root / "m", patients=("L001",))
    extra = write_ct(root / "m" / "L001" / "full_3mm" / "f9.dcm", np.zeros(SHAPE), z=9.0)
    return root / "m", [extra]


def _dicom_folder(root: Path, shape=(32, 32)) -> list[Path]:
    rng = np.random.default_rng(8)
    return [write_ct(root / "d" / f"s{i}.dcm", rng.integers(-1000, 1000, shape), z=float(i))
            for i in range(3)]


def bad_truncated_pixels(root):
    files = _dicom_folder(root)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 300])
    return root / "d", [files[1]]


def bad_truncated_header(root):
    # Cut inside the header right after a "." of a UID (a realistic truncation point).
    files = _dicom_folder(root)
    data = files[1].read_bytes()
    cut = data.index(b"1.2.840.10008.1.2.1") + len(b"1.2.840.10008.1.")
    files[1].write_bytes(data[:cut])
    return root / "d", [files[1]]


def bad_truncated_jpeg2000(root):
    files = _dicom_folder(root)
    ds = pydicom.dcmread(files[1])
    ds.compress(JPEG2000Lossless)
    ds.save_as(files[1])
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 200])
    return root / "d", [files[1]]


def bad_mixed_sizes(root):
    write_ct(root / "d" / "a.dcm", np.zeros(SHAPE), z=0.0)
    odd = write_ct(root / "d" / "b.dcm", np.zeros((16, 20)), z=1.0)
    return root / "d", [odd]


def bad_nan(root):
    fd = np.zeros(SHAPE)
    fd[3, 4] = np.nan
    make_npy(root / "n", {("L506", 0): np.zeros(SHAPE), ("L506", 1): np.zeros(SHAPE)})
    write_npy(root / "n", "L506_1_target.npy", fd)
    return root / "n", [root / "n" / "L506_1_target.npy"]


@pytest.mark.parametrize("build", [bad_missing, bad_empty, bad_mismatched, bad_truncated_pixels,
                                   bad_truncated_header, bad_truncated_jpeg2000,
                                   bad_mixed_sizes, bad_nan])
def test_scripts_fail_with_one_clean_line(tmp_path, build):
    data, names = build(tmp_path)
    for proc in run_scripts("--data", data).values():
        assert_one_error_line(proc, *names)


@pytest.mark.parametrize("sub, layout, patient, slices, pairs", [
    ("mayo_pairs/npy_redcnn", "npy", "L506", 6, 6),
    ("mayo_pairs/tif_cncl", "tif", "L067", 1, 1),
    ("L067_full_1mm", "dicom", "L067_full_1mm", 56, 0),
    ("dicom_misc/totalsegmentator_ct", "dicom", "totalsegmentator_ct", 20, 0),
    ("dicom_misc/gehc_ct_3slice", "dicom", "gehc_ct_3slice", 3, 0),
])
def test_scripts_on_real_data(real_data, sub, layout, patient, slices, pairs):
    for script, proc in run_scripts("--data", real_data / sub).items():
        assert proc.returncode == 0 and proc.stderr == "", (script, proc.stderr)
        assert_summary(proc.stdout, layout, (f"{patient} ({slices})",), pairs)
        if sub == "dicom_misc/gehc_ct_3slice":
            assert re.search(r"HU .*\[-1024,", proc.stdout)  # padding -2000 masked, not -3024


# --- Slice cache and whole-set shuffle (bounded memory at Mayo scale) ----------------------------
def test_slice_cache_built_once_reused_and_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    data = make_npy(tmp_path / "d", {("A", i): np.full(SHAPE, 10.0 * i) for i in range(3)})
    recs = train_loader.find_training_data(str(data)).records
    decoded = []
    real = train_loader.load_pair
    monkeypatch.setattr(train_loader, "load_pair",
                        lambda rec, *a, **k: decoded.append(rec.slice_id) or real(rec, *a, **k))
    cache = train_loader.SliceCache(tmp_path / "cache")
    first = [cache.load(r) for r in recs]
    assert len(decoded) == 3 and len(list((tmp_path / "cache").glob("*.npy"))) == 3
    again = train_loader.SliceCache(tmp_path / "cache")  # a later run on the same data
    for r, (ld, fd) in zip(recs, first):
        ld2, fd2 = again.load(r)
        assert np.array_equal(ld, ld2) and np.array_equal(fd, fd2) and ld2.shape == (*SHAPE, 1)
    assert len(decoded) == 3, "a cached slice was decoded again"
    write_npy(data, "A_1_target.npy", np.full(SHAPE, 500.0))  # the source changes
    os.utime(data / "A_1_target.npy", ns=(1, 1))  # even with an old time stamp
    ld, fd = again.load(recs[1])
    assert len(decoded) == 4 and np.allclose(ctio.denormalize(fd), 500.0, atol=1e-3)


def test_slice_cache_is_never_half_written(tmp_path, monkeypatch):
    data = make_npy(tmp_path / "d", {("A", 0): np.zeros(SHAPE)})
    rec = train_loader.find_training_data(str(data)).records[0]
    cache = train_loader.SliceCache(tmp_path / "cache")

    def broken_save(path, arr):  # a kill in the middle of writing
        Path(path).write_bytes(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loader.np, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        cache.load(rec)
    assert not list((tmp_path / "cache").iterdir()), "a partial cache file was left"
    monkeypatch.undo()
    ld, _ = train_loader.SliceCache(tmp_path / "cache").load(rec)
    assert ld.shape == (*SHAPE, 1)


def test_every_pass_visits_all_slices_in_a_new_order(tf):
    n = 50
    order = [int(i) for i in train_loader.epoch_order(n, seed=0).repeat().take(3 * n)]
    passes = [order[k * n:(k + 1) * n] for k in range(3)]
    for p in passes:
        assert sorted(p) == list(range(n)), "a pass must see every slice once"
    assert passes[0] != passes[1] != passes[2] and passes[0] != list(range(n))

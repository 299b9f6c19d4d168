"""Myevaluation.py: metrics equal scikit-image's on the windowed images, files, table, errors.

Inference runs with an UNTRAINED tiny generator (the identity), so CNCL scores equal the LDCT
scores; the point here is the metric path (ctmetrics.hu_metrics), checked against skimage on
the same windowed images, per slice, method and protocol; the noise measures (NPS, ROIs) against
analytic cases.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_error_line, cli
from test_protocols import REFERENCES

import ctdata
import ctio
import ctmetrics
import ctrun
import cttexture


def write_npy_pairs(root: Path, sizes: dict, with_fd: bool = True, seed: int = 0) -> Path:
    """RED-CNN layout <patient>_<i>_input.npy / _target.npy; sizes = {patient: (shape, n)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for patient, (shape, n) in sizes.items():
        h, w = shape
        yy, xx = np.mgrid[:h, :w]
        for i in range(n):
            fd = np.full(shape, -1000.0)
            body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
            fd[body] = 40.0 + 60.0 * np.sin(xx[body] / 5.0 + i)
            fd[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < 16] = 900.0  # bone
            ld = np.maximum(fd + rng.normal(0, 25, shape), -1024)
            np.save(root / f"{patient}_{i}_input.npy", (ld + 1024) / 4096)
            if with_fd:
                np.save(root / f"{patient}_{i}_target.npy", (fd + 1024) / 4096)
    return root


SIZES = {"A": ((64, 48), 3), "B": ((40, 56), 2)}


@pytest.fixture(scope="module")
def denoised(tiny_run, tmp_path_factory):
    """(paired data, Mytest.py output on it)."""
    import Mytest

    root = tmp_path_factory.mktemp("eval")
    data = write_npy_pairs(root / "pairs", SIZES)
    out = root / "out"
    assert Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out),
                        "--no-figures"]) == 0
    return data, out


def run_eval_cli(*args):
    return cli("Myevaluation.py", *args, timeout=180)


def test_protocol_table_is_the_published_conventions():
    assert set(ctmetrics.METRIC_PROTOCOLS) == set(REFERENCES)
    for name, lo, hi in (("redcnn", -160, 240), ("dugan", -300, 300), ("corediff", -1000, 1000),
                         ("skimage", -160, 240), ("full", -1024, 3072)):
        assert ctmetrics.METRIC_PROTOCOLS[name].window == (lo, hi)
        assert f"[{lo}, {hi}]" in ctmetrics.protocol_text(name)
    assert ctmetrics.PROTOCOL == ctmetrics.protocol_text("redcnn")


def test_metrics_equal_peer_code_and_outputs(denoised, capsys):
    """Every protocol of every slice and method equals its reference (the peer's code or
    scikit-image, tests/test_protocols.py)."""
    from scipy.ndimage import gaussian_filter

    import Myevaluation

    _, out = denoised
    capsys.readouterr()
    assert Myevaluation.main(["--pred", str(out), "--batch", "2", "--protocol", "all"]) == 0
    printed = capsys.readouterr().out

    with open(out / "manifest.csv", newline="") as f:
        manifest = {(r["patient"], r["slice_id"]): r for r in csv.DictReader(f)}
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5  # ldct, gaussian, cncl and the fd noise rows
    assert {r["psnr_redcnn"] for r in rows if r["method"] == "fd"} == {""}
    for r in rows:
        if r["method"] == "fd":
            continue
        m = manifest[(r["patient"], r["slice_id"])]
        ld = ctio.read_slice(m["ld_path"])[0]
        ref = ctio.read_slice(m["fd_path"])[0]
        img = {"ldct": ld, "gaussian": gaussian_filter(ld, 0.7, mode="reflect"),
               "cncl": np.load(out / m["pred_npy"])}[r["method"]]
        for protocol, reference in REFERENCES.items():
            want = reference(img.astype(np.float64), ref.astype(np.float64))
            got = {k: float(r[f"{k}_{protocol}"]) for k in ("psnr", "ssim", "rmse")}
            assert abs(got["psnr"] - want["psnr"]) < 0.01, (r, protocol, want)
            assert abs(got["ssim"] - want["ssim"]) < 0.001, (r, protocol, want)
            assert abs(got["rmse"] - want["rmse"]) < 0.01, (r, protocol, want)

    by = {(r["patient"], r["slice_id"], r["method"]): r for r in rows}
    for p, s, _ in list(by):  # identity generator: CNCL scores are the LDCT scores
        assert abs(float(by[p, s, "cncl"]["psnr_redcnn"])
                   - float(by[p, s, "ldct"]["psnr_redcnn"])) < 0.01

    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"] == ctmetrics.PROTOCOL
    assert report["n_slices"] == 5 and report["n_patients"] == 2
    assert set(report["per_patient"]) == {"A", "B"}
    assert report["per_patient"]["A"]["n_slices"] == 3
    psnr = [float(r["psnr_redcnn"]) for r in rows if r["method"] == "cncl"]
    overall = report["overall"]["cncl"]["redcnn"]["psnr"]
    assert overall["mean"] == pytest.approx(np.mean(psnr), abs=1e-5)
    assert overall["std"] == pytest.approx(np.std(psnr, ddof=1), abs=1e-5)
    lo, hi = overall["ci95"]
    assert lo <= overall["mean"] <= hi
    a_mean = np.mean([float(r["psnr_redcnn"]) for r in rows
                      if r["method"] == "cncl" and r["patient"] == "A"])
    assert overall["per_patient"]["A"] == pytest.approx(a_mean, abs=1e-5)

    lines = printed.splitlines()
    head = "| method | PSNR (dB) | SSIM | RMSE ("
    starts = [i for i, ln in enumerate(lines) if ln.startswith(head)]
    assert len(starts) == len(REFERENCES)  # --protocol all: one table per protocol
    for i, name in zip(starts, ctmetrics.PROTOCOLS):
        table = lines[i + 2:i + 5]
        assert [t.split(" | ")[0] for t in table] == ["| LDCT (input)",
                                                      "| Gaussian filter (sigma 0.7)", "| CNCL"]
        assert " [" in table[2]  # the bootstrap interval
        assert lines[i + 5:i + 7] == ["", ctmetrics.protocol_text(name)]  # protocol under the table


def test_missing_manifest_is_one_line(tmp_path):
    res = run_eval_cli("--pred", tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: no manifest.csv in {tmp_path}; run Mytest.py first"


def test_ld_only_fails_cleanly_then_references_from_data(tiny_run, denoised, tmp_path):
    import Myevaluation
    import Mytest

    paired, _ = denoised
    data = write_npy_pairs(tmp_path / "ld_only", SIZES, with_fd=False)
    out = tmp_path / "out"
    assert Mytest.main(["--data", str(data), "--run", str(tiny_run), "--out", str(out)]) == 0
    res = run_eval_cli("--pred", out)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no slice has a full-dose reference" in lines[0]
    assert "Traceback" not in res.stderr

    # LD-only folder given as --data: it has no references either
    with pytest.raises(ctio.CTDataError, match="no full-dose reference"):
        Myevaluation.main(["--pred", str(out), "--data", str(data)])
    # the full-dose references are found by patient and slice id
    assert Myevaluation.main(["--pred", str(out), "--data", str(paired)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_slices"] == 5 and report["references"] == str(paired.resolve())


def test_compare_rows_come_from_each_report_with_training_time(denoised, tmp_path, capsys):
    """--compare: one row per evaluated folder, its numbers those of its metrics.json, with the
    steps and minutes of the epoch behind the weights (best epoch from state.json)."""
    import shutil

    import Myevaluation

    _, out = denoised
    assert Myevaluation.main(["--pred", str(out)]) == 0
    run = tmp_path / "runB"
    (run / "state").mkdir(parents=True)
    ctrun.write_run_config(run, {"model": ctrun.model_config("small"),
                                 "train": {"steps_per_epoch": 50}})
    (run / "history.csv").write_text("epoch,minutes\n1,1.5\n2,3.25\n3,4.0\n")
    (run / "state" / "state.json").write_text(json.dumps({"best_epoch": 2, "epoch": 3}))
    other = tmp_path / "other"
    shutil.copytree(out, other)
    report = json.loads((other / "metrics.json").read_text())
    report["runs"] = [str(run)]
    report["weights"] = [str(run / "generator_best.weights.h5")]
    report["overall"]["cncl"]["redcnn"]["psnr"]["mean"] += 1.25
    (other / "metrics.json").write_text(json.dumps(report))

    capsys.readouterr()
    assert Myevaluation.main(["--compare", str(out), str(other)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| ")]
    assert rows[0][0] == "run" and rows[1][0] == "LDCT (input)"
    base = json.loads((out / "metrics.json").read_text())["overall"]
    mean = [[c.split(" [")[0] for c in row] for row in rows]  # cells: mean [95 % interval]
    assert float(mean[1][3]) == pytest.approx(base["ldct"]["redcnn"]["psnr"]["mean"], abs=0.006)
    first, second = mean[2], mean[3]
    assert " [" in rows[2][3]  # intervals shown
    assert float(second[3]) - float(first[3]) == pytest.approx(1.25, abs=0.011)
    assert second[0] == "runB (epoch 2)" and second[1:3] == ["100", "3.2"]  # best epoch 2
    assert float(first[6]) == pytest.approx(
        base["cncl"]["redcnn"]["psnr"]["mean"] - base["ldct"]["redcnn"]["psnr"]["mean"],
        abs=0.011)
    assert ctmetrics.PROTOCOL in lines

    # DU-GAN scores RMSE on the [0, 1] image: the header says so and the cell keeps its digits
    assert Myevaluation.main(["--compare", str(out), "--protocol", "dugan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, ldct = (ln for ln in lines if ln.startswith("| run") or ln.startswith("| LDCT"))
    assert "| RMSE ([0, 1]) |" in header and "RMSE (HU)" not in header
    cell = ldct.strip("|").split("|")[5].strip().split(" [")[0]
    assert float(cell) == pytest.approx(base["ldct"]["dugan"]["rmse"]["mean"], abs=6e-5)

    # A snapshot's epoch wins over the last one; folders that scored other slices are refused.
    assert ctrun.training_summary(str(run), "x/generator_epoch0001.weights.h5") == \
        {"epochs": 1, "minutes": 1.5, "steps": 50, "snapshot": True}
    with open(other / "metrics.csv") as f:
        head, *rows_csv = f.readlines()
    first_slice = ",".join(rows_csv[0].split(",")[:2]) + ","
    (other / "metrics.csv").write_text(head + "".join(r for r in rows_csv
                                                      if not r.startswith(first_slice)))
    with pytest.raises(ctio.CTDataError, match="scored other slices"):
        Myevaluation.main(["--compare", str(out), str(other)])


def test_compare_texture_columns_and_zoom_figure(denoised, tmp_path, capsys):
    """--compare shows each row's ROI noise and NPS mean frequency over full dose (from its
    metrics.json), and --figure writes LDCT | each output | full dose cropped to --zoom."""
    import shutil

    import cv2

    import Myevaluation

    data, out = denoised
    assert Myevaluation.main(["--pred", str(out)]) == 0
    other = tmp_path / "other"
    shutil.copytree(out, other)
    report = json.loads((other / "metrics.json").read_text())  # slices too small for ROIs:
    for method, std, freq in (("ldct", 30.0, 0.25), ("cncl", 18.0, 0.18), ("fd", 20.0, 0.2)):
        report["overall"][method]["noise"] = {"noise_std": {"mean": std},  # give it figures
                                              "nps_mean_freq": {"mean": freq}}
    (other / "metrics.json").write_text(json.dumps(report))
    want = [1.5, 1.25, 0.9, 0.9]  # LDCT and CNCL rows of the first folder over its FD
    capsys.readouterr()
    patient, slice_id = next(iter(SIZES)), None
    with open(out / "manifest.csv") as f:
        slice_id = next(r["slice_id"] for r in csv.DictReader(f) if r["patient"] == patient)
    png = tmp_path / "zoom.png"
    assert Myevaluation.main(["--compare", str(other), str(out), "--figure", str(png),
                              "--zoom", f"{patient}:{slice_id}:4:20:8:40"]) == 0
    rows = [[c.strip() for c in ln.strip("|").split("|")]
            for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    got = [float(rows[1][7]), float(rows[1][8]), float(rows[2][7]), float(rows[2][8])]
    assert got == pytest.approx(want, abs=0.006)
    assert rows[3][7:9] == ["", ""]  # a folder without ROIs shows no texture figures
    image = cv2.imread(str(png))
    assert image.shape[0] == 16 * 3 and image.shape[1] == 4 * 32 * 3 + 3 * 3  # 4 panels, x3
    res = run_eval_cli("--compare", out, "--figure", png, "--zoom", "P:1:9:2:0:5")
    assert res.returncode == 2 and res.stderr.startswith("error: --zoom")


def test_compare_needs_evaluated_folders(tmp_path):
    res = run_eval_cli("--compare", tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: no metrics.json in {tmp_path}; run "
                                  f"Myevaluation.py --pred {tmp_path} first")
    res = run_eval_cli("--compare", tmp_path, "--pred", tmp_path)
    assert res.returncode == 2 and "exactly one of --pred" in res.stderr


# --- The separable SSIM -------------------------------------------------------------------------
def windowed_pairs(shape, n: int, noise_hu: float, seed: int = 0):
    """(noisy, clean) CT-like images clipped to the RED-CNN window and shifted to [0, 400]."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    clean = np.stack([60.0 + 120.0 * np.sin(xx / 7.0 + k) * np.cos(yy / 11.0) for k in range(n)])
    clean[:, h // 3:h // 2, w // 4:w // 2] = 250.0  # an edge clipped by the window
    noisy = clean + rng.normal(0.0, noise_hu, clean.shape)
    return [np.clip(v, -160.0, 240.0)[..., None].astype(np.float32) + 160.0 for v in (noisy, clean)]


@pytest.mark.parametrize("shape,noise", [((64, 72), 40.0), ((180, 200), 15.0)])
def test_separable_ssim_equals_tf_image_ssim(shape, noise):
    """ctmetrics.ssim is tf.image.ssim's definition to 1e-6: it agrees with the float64
    evaluation of that definition (scikit-image) to 1e-6, and with tf.image.ssim itself to 1e-6
    beyond tf.image.ssim's own float32 error (4-10e-6 on such CT-like data: its 121-tap 2-D sums
    of uncentred squares cancel in E[x^2] - E[x]^2)."""
    from skimage.metrics import structural_similarity

    tf = ctio.import_tensorflow()
    x, y = windowed_pairs(shape, 3, noise)
    got = tf.function(lambda a, b: ctmetrics.ssim(a, b, 400.0))(x, y).numpy()
    want = tf.image.ssim(tf.constant(x), tf.constant(y), max_val=400.0,
                         filter_size=ctmetrics.SSIM_FILTER_SIZE, filter_sigma=ctmetrics.SSIM_SIGMA,
                         k1=ctmetrics.SSIM_K1, k2=ctmetrics.SSIM_K2).numpy()
    exact = np.array([structural_similarity(
        y[i, ..., 0].astype(np.float64), x[i, ..., 0].astype(np.float64), gaussian_weights=True,
        sigma=ctmetrics.SSIM_SIGMA, use_sample_covariance=False, data_range=400.0,
        K1=ctmetrics.SSIM_K1, K2=ctmetrics.SSIM_K2, win_size=ctmetrics.SSIM_FILTER_SIZE)
        for i in range(3)])
    assert got.shape == (3,) and got.dtype == np.float32
    assert np.max(np.abs(got - exact)) < 1e-6
    assert np.all(np.abs(got - want) <= np.abs(want - exact) + 1e-6)


# --- Noise texture: NPS, ROI rule, statistics ---------------------------------------------------
def white_noise_rois(sigma: float, n_rois: int = 300, size: int = 32, seed: int = 1):
    return np.random.default_rng(seed).normal(0.0, sigma, (n_rois, size, size))


def test_nps_of_white_noise_integrates_to_variance_and_is_flat():

    sigma, px = 20.0, 0.5
    rois = white_noise_rois(sigma)
    nps = cttexture.nps_2d(cttexture.nps_power(rois), len(rois), px)
    fy, fx = cttexture.nps_frequencies(nps.shape, px)
    assert fx[-1] < 1 / (2 * px) + 1e-9 and fx[1] - fx[0] == pytest.approx(1 / (32 * px))
    # integral over frequency = variance (TG-233 normalisation), in HU^2 whatever the spacing
    integral = nps.sum() * (fx[1] - fx[0]) * (fy[1] - fy[0])
    assert integral == pytest.approx(sigma ** 2 * (1 - 3 / 32 ** 2), rel=0.03)
    summary = cttexture.nps_summary(nps, px)
    assert summary["noise_std"] == pytest.approx(sigma, rel=0.02)
    # flat at sigma^2 dx dy (HU^2 mm^2); the plane fit only removes the lowest frequencies
    freq, radial = cttexture.radial_nps(nps, px)
    assert freq[-1] == pytest.approx(1 / (2 * px))
    assert np.allclose(radial[2:], sigma ** 2 * px * px, rtol=0.1)
    # white noise: TG-233's f_av is 0.25 cycles/px; on 32-px ROIs the DC ring (zero after the
    # mean is removed) makes it sum(k, 1..16) / 16 / 32 = 0.2656, the plane a little more
    assert summary["nps_mean_freq"] * px == pytest.approx(0.268, abs=0.006)
    # unknown spacing: cycles/pixel and HU^2 px^2, same std
    unknown = cttexture.nps_2d(cttexture.nps_power(rois), len(rois), None)
    assert cttexture.nps_summary(unknown, None)["noise_std"] == pytest.approx(
        summary["noise_std"], rel=1e-9)


def test_blurred_noise_has_lower_nps_mean_frequency():
    from scipy.ndimage import gaussian_filter

    field = np.random.default_rng(2).normal(0.0, 30.0, (512, 512))
    blurred = gaussian_filter(field, 1.0, mode="wrap")
    corners = [(y, x) for y in range(0, 512, 32) for x in range(0, 512, 32)]
    power = [cttexture.nps_power(cttexture.cut_rois(f, corners)) for f in (field, blurred)]
    white, smooth = (cttexture.nps_summary(cttexture.nps_2d(pw, len(corners), 0.7), 0.7)
                     for pw in power)
    assert smooth["nps_mean_freq"] < 0.6 * white["nps_mean_freq"]
    assert smooth["noise_std"] < 0.5 * white["noise_std"]


def test_roi_rule_finds_flat_soft_tissue_only():

    rng = np.random.default_rng(3)
    n = 256
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2)
    phantom = np.where(r < 110, 40.0, -1000.0) + rng.normal(0, 10, (n, n))
    corners = cttexture.find_flat_rois(phantom)
    assert len(corners) >= 16
    for y, x in corners:  # wholly inside the disc
        assert r[y:y + cttexture.ROI_SIZE, x:x + cttexture.ROI_SIZE].max() < 110
    air = -1000.0 + rng.normal(0, 10, (n, n))
    assert cttexture.find_flat_rois(air) == []
    bone = np.where(r < 110, 700.0, -1000.0)
    assert cttexture.find_flat_rois(bone) == []  # body, but not soft tissue
    stripes = np.where(r < 110, 40.0 + 120.0 * np.sign(np.sin(xx / 6.0)), -1000.0)
    assert cttexture.find_flat_rois(stripes) == []  # soft-tissue mean, structured at scale


def test_bootstrap_of_identical_methods_contains_zero():
    import Myevaluation

    rng = np.random.default_rng(4)
    results = []
    for p in ("P1", "P2", "P3", "P4", "P5", "P6"):
        for s in range(4):
            base = {f"{m}_{r}": float(rng.normal(30, 2)) for r in ctmetrics.PROTOCOLS
                    for m in ctmetrics.METRICS}
            for method in Myevaluation.METHODS:  # cncl identical to ldct; gaussian 1 dB better
                row = dict(base)
                if method == "gaussian":
                    row = {k: v + 1.0 for k, v in row.items()}
                results.append({"patient": p, "slice_id": str(s), "method": method, **row})
    tests = ctmetrics.paired_tests(results)
    same = tests["cncl-ldct"]["redcnn"]["psnr"]
    assert same["mean_diff"] == 0 and same["wilcoxon_p"] == 1.0
    assert same["ci95"][0] <= 0 <= same["ci95"][1]
    worse = tests["cncl-gaussian"]["redcnn"]["psnr"]
    assert worse["mean_diff"] == pytest.approx(-1.0)
    assert worse["wilcoxon_p"] < 0.05  # 6 patients, all worse (tied: normal approximation)
    assert worse["ci95"][1] < 0 and worse["n_patients"] == 6
    # three patients: the interval stays, the p-value goes (an exact test cannot reach 0.05)
    three = ctmetrics.paired_tests([d for d in results if d["patient"] in ("P1", "P2", "P3")])
    assert three["cncl-gaussian"]["redcnn"]["psnr"]["wilcoxon_p"] is None
    assert three["cncl-gaussian"]["redcnn"]["psnr"]["ci95"][1] < 0

    # patient-level resampling: the interval of a patient-clustered figure is wider than the
    # slice-level one would be, and one patient falls back to slices
    values = np.repeat([10.0, 20.0, 30.0], 4) + rng.normal(0, 0.1, 12)
    pats = np.repeat(["P1", "P2", "P3"], 4)
    lo, hi = ctmetrics.bootstrap_ci(values, pats)
    assert lo < 15 and hi > 25
    lo1, hi1 = ctmetrics.bootstrap_ci(values[:4], pats[:4])
    assert lo1 < values[:4].mean() < hi1 and hi1 - lo1 < 0.3


def test_nps_sim_on_demo_data(tiny_run, tmp_path, capsys):
    """--nps-sim: two simulated realisations per full-dose slice, denoised by the run (here the
    identity generator, so the output noise is the input noise); the LDCT noise std equals the
    std of (LD1 - LD2) / sqrt(2) over the same body ROIs computed directly."""
    import ctdose
    import ctfixtures
    import Myevaluation

    demo = ctfixtures.make_demo(tmp_path / "demo", patients=1, slices=2, size=128)
    fd_dir = next(demo.glob("DEMO*/full_*"))
    out = tmp_path / "nps"
    capsys.readouterr()
    assert Myevaluation.main(["--nps-sim", str(fd_dir), "--run", str(tiny_run), "--out", str(out),
                    "--max-slices", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "nps_sim.json").read_text())
    assert (out / "nps_sim.png").stat().st_size > 1000
    assert report["unit"] == "cycles/mm" and report["n_slices"] == 2
    assert "| LDCT (simulated input) |" in printed and report["definition"] in printed
    size = report["roi_size"]
    assert size in (64, 32)  # the largest that fits 4 ROIs in the 128-px demo body

    diffs = []
    records = ctdata.discover(fd_dir, None, single_role="fd").records  # table order
    for i, rec in enumerate(records[:2]):
        fd, header = ctio.read_slice(rec.fd_path)
        px = ctdose.pixel_size_mm(header, fd.shape, None)
        a, b = (ctdose.simulate_pair_from_fd(fd, 0.25, px, (5, i, k)) for k in (1, 2))
        noise = (a.astype(np.float64) - b) / np.sqrt(2)
        diffs += [noise[y:y + size, x:x + size] for y, x in cttexture.noise_rois(fd, size)]
    yy, xx = np.mgrid[:size, :size]
    design = np.stack([np.ones(size * size), xx.ravel(), yy.ravel()], axis=1)
    residuals = [d.ravel() - design @ np.linalg.lstsq(design, d.ravel(), rcond=None)[0]
                 for d in diffs]
    direct = np.sqrt(np.mean([np.mean(r ** 2) for r in residuals]))
    assert report["ldct"]["n_rois"] == len(diffs) > 0
    assert report["ldct"]["noise_std"] == pytest.approx(direct, rel=1e-6)
    assert report["cncl"]["noise_std"] == pytest.approx(report["ldct"]["noise_std"], rel=0.05)
    # the (near-)identity generator passes the noise unchanged at every frequency
    passed = [t for t in report["noise_transfer"][1:] if t is not None]
    assert len(passed) == len(report["freq"]) - 1 and passed == pytest.approx(
        np.ones(len(passed)), abs=0.1)
    assert report["noise_transfer"][0] is None or report["noise_transfer"][0] >= 0
    assert "noise passed, sqrt(NPS out / NPS in), at cycles/mm: " in printed


def test_roi_rule_on_real_full_dose(real_data):
    """On the real L506 full-dose slices the rule finds flat soft-tissue ROIs, inside the body."""

    found = 0
    for f in sorted((real_data / "mayo_pairs" / "npy_redcnn").glob("*_target.npy")):
        fd = ctio.read_slice(f)[0]
        for y, x in cttexture.find_flat_rois(fd):
            roi = fd[y:y + cttexture.ROI_SIZE, x:x + cttexture.ROI_SIZE]
            assert -100 <= roi.mean() <= 150 and roi.min() > -500
            found += 1
    assert found >= 10


# --- Arguments checked before any work (issue 26 items 2 and 9) ---------------------------------
def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nps_sim_refusals_before_any_work(tiny_run, tmp_path):
    """--nps-sim: an --out inside the input, an unwritable --out, --seed -1 and a --weights file
    that is not weights are each one error line with exit 2, and the input stays as it was."""
    import Mysimulate

    demo = Mysimulate.make_demo(tmp_path / "demo", patients=1, slices=1, size=96)
    fd_dir = next(demo.glob("DEMO*/full_*"))
    before = _snapshot(demo)
    bogus = tmp_path / "not_weights.h5"
    bogus.write_bytes(b"not hdf5")
    cases = [(["--out", fd_dir / "nps"], ("inside the input", fd_dir.resolve())),
             (["--out", "/sys/ct_nps_test"], ("--out /sys/ct_nps_test", "cannot write")),
             (["--out", tmp_path / "o", "--seed", "-1"], ("--seed -1",)),
             (["--out", tmp_path / "o", "--weights", bogus], (bogus, "HDF5"))]
    for args, needles in cases:
        res = run_eval_cli("--nps-sim", fd_dir, "--run", tiny_run, *args)
        assert_one_error_line(res, *needles, code=2)
        assert _snapshot(demo) == before and not (tmp_path / "o").exists()


def test_nps_sim_uses_weights(tiny_run, tmp_path, capsys):
    """--nps-sim --weights FILE denoises with FILE (named in nps_sim.json)."""
    import shutil

    import ctrun
    import Myevaluation
    import Mysimulate

    demo = Mysimulate.make_demo(tmp_path / "demo", patients=1, slices=1, size=128)
    fd_dir = next(demo.glob("DEMO*/full_*"))
    weights = tmp_path / "mine.weights.h5"
    shutil.copy(ctrun.generator_weights(tiny_run, "best"), weights)
    assert Myevaluation.main(["--nps-sim", str(fd_dir), "--run", str(tiny_run), "--weights",
                              str(weights), "--out", str(tmp_path / "nps")]) == 0
    report = json.loads((tmp_path / "nps" / "nps_sim.json").read_text())
    assert report["weights"] == str(weights)


def test_figure_and_zoom_refused_before_tables(denoised, tmp_path):
    """--compare --figure: a folder, no --zoom, a box outside the image or an unwritable place
    are refused with one line before any table is printed."""
    import Myevaluation

    _, out = denoised
    if not (out / "metrics.json").is_file():
        assert Myevaluation.main(["--pred", str(out)]) == 0
    patient = next(iter(SIZES))
    with open(out / "manifest.csv") as f:
        slice_id = next(r["slice_id"] for r in csv.DictReader(f) if r["patient"] == patient)
    png = tmp_path / "z.png"
    h, w = SIZES[patient][0]
    cases = [(["--figure", tmp_path, "--zoom", f"{patient}:{slice_id}:0:8:0:8"], ("a folder",)),
             (["--figure", png], ("--figure needs --zoom",)),
             (["--figure", png, "--zoom", f"{patient}:{slice_id}:0:8:0:{w + 1}"],
              ("leaves the", f"{h}x{w}")),
             (["--figure", "/sys/z.png", "--zoom", f"{patient}:{slice_id}:0:8:0:8"],
              ("cannot write",)),
             (["--zoom", f"{patient}:{slice_id}:0:8:0:8"], ("--zoom needs --figure",))]
    before = _snapshot(out)
    for args, needles in cases:
        res = run_eval_cli("--compare", out, *args)
        assert_one_error_line(res, *needles, code=2)
        assert res.stdout == "" and not png.exists()
    assert _snapshot(out) == before

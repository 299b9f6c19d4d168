"""Image-quality QA phantom (issue 15): Mysimulate.py --qa and Myevaluation.py --qa.

The TTF, d' and dose-equivalence functions are checked against analytic answers on synthetic
images; the phantom end to end on a coarse 192 px grid with an untrained run (conftest.make_run).
"""

import json
import math

import numpy as np
import pytest
from conftest import assert_one_error_line, cli, make_run
from scipy.stats import ncx2, norm

import ctdose
import ctio
import ctphantom
import ctqa
import Myevaluation as E


def blurred_disc(size: int, radius: float, contrast: float, sigma: float) -> np.ndarray:
    """A disc of ``contrast`` on 0, convolved with an isotropic Gaussian of ``sigma`` px and
    point-sampled at the pixel centres (exact: P(|X| <= R) for X ~ N(rho, sigma^2 I) is a
    noncentral chi-square cdf). The centre is the pixel (size // 2, size // 2)."""
    yy, xx = np.mgrid[:size, :size] - size // 2
    rho2 = (yy ** 2 + xx ** 2).astype(np.float64)
    return contrast * ncx2.cdf(radius ** 2 / sigma ** 2, 2, rho2 / sigma ** 2)


def sharp_disc(size: int, radius: float, contrast: float, supersample: int = 8) -> np.ndarray:
    """The unfiltered disc: area-averaged over a fine sub-grid (anti-aliased, no blur)."""
    s = supersample
    f = (np.arange(size * s) + 0.5) / s - 0.5 - size // 2
    yy, xx = np.meshgrid(f, f, indexing="ij")
    img = np.where(np.hypot(yy, xx) <= radius, contrast, 0.0)
    return img.reshape(size, s, size, s).mean(axis=(1, 3))


def insert(size: int, radius: float) -> dict:
    return {"centre_px": [size // 2, size // 2], "radius_px": radius}


PX = 0.5  # mm; frequencies below are in cycles/mm, 1 cycle/px = 2 cycles/mm


def test_ttf_of_unfiltered_insert_is_one_at_low_frequency():
    img = sharp_disc(96, 20.0, 100.0)
    t = ctqa.qa_ttf(img, insert(96, 20.0), PX)
    low = t["freq"] <= 0.2  # 0.1 cycles/px
    assert low.sum() > 10
    assert np.all(np.abs(t["ttf"][low] - 1.0) < 0.03), t["ttf"][low].min()
    assert t["contrast_hu"] == pytest.approx(100.0, abs=1.0)
    # only the pixel aperture (sinc) is left: no 50 % drop before the Nyquist frequency
    assert t["mtf50"] is None or t["mtf50"] > 0.8


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_ttf_of_gaussian_blurred_insert_matches_analytic_mtf(sigma):
    radius = 25.0
    img = blurred_disc(128, radius, 50.0, sigma)
    t = ctqa.qa_ttf(img, insert(128, radius), PX)
    f_px = t["freq"] * PX  # cycles/px
    analytic = np.exp(-2 * math.pi ** 2 * sigma ** 2 * f_px ** 2)
    band = analytic >= 0.1
    assert band.sum() > 20
    assert np.max(np.abs(t["ttf"][band] - analytic[band])) < 0.03
    f50 = math.sqrt(math.log(2) / (2 * math.pi ** 2)) / sigma / PX  # analytic MTF50, cycles/mm
    assert t["mtf50"] == pytest.approx(f50, rel=0.03)


def test_blurring_lowers_mtf50():
    from scipy.ndimage import gaussian_filter

    img = blurred_disc(128, 25.0, -100.0, 1.0)  # a negative-contrast rod
    sharp = ctqa.qa_ttf(img, insert(128, 25.0), PX)["mtf50"]
    soft = ctqa.qa_ttf(gaussian_filter(img, 1.5), insert(128, 25.0), PX)["mtf50"]
    assert sharp is not None and soft is not None
    assert soft < 0.8 * sharp


def test_mtf50_bootstrap_sd_grows_with_noise():
    img = blurred_disc(96, 15.0, 14.0, 1.0)
    rng = np.random.default_rng(4)
    ins = insert(96, 15.0)
    assert ctqa.mtf50_bootstrap_sd(np.stack([img] * 8), ins, PX) == pytest.approx(0.0, abs=1e-12)
    sd = [ctqa.mtf50_bootstrap_sd(img + rng.normal(0, s, (8, 96, 96)), ins, PX) for s in (2.0, 6.0)]
    assert 0 < sd[0] < sd[1]


def test_ttf_gate_reports_mtf50_only_when_its_bootstrap_sd_is_small():
    """MTF50 is shown only when its bootstrap sd over the realisations is <= 10 % of it; the
    curve stays, and fewer than 4 realisations (no sd) are not measurable."""
    img = blurred_disc(96, 15.0, 14.0, 1.0)
    ins = insert(96, 15.0)
    rng = np.random.default_rng(4)
    for noise, ok in ((0.5, True), (25.0, False)):
        stack = img + rng.normal(0, noise, (8, 96, 96))
        sd = ctqa.mtf50_bootstrap_sd(stack, ins, PX)
        t = ctqa.ttf_gate(ctqa.qa_ttf(stack.mean(axis=0), ins, PX), sd)
        assert t["measurable"] is ok and len(t["ttf"]) > 10, (noise, sd, t["mtf50"])
        if ok:
            assert t["mtf50"] is not None and t["mtf50_sd"] <= 0.1 * t["mtf50"]
        else:
            assert t["mtf50"] is None and t["mtf10"] is None
    few = img + rng.normal(0, 0.5, (3, 96, 96))
    assert ctqa.mtf50_bootstrap_sd(few, ins, PX) is None
    assert not ctqa.ttf_gate(ctqa.qa_ttf(few.mean(axis=0), ins, PX), None)["measurable"]


def test_mtf_crossing_interpolates():
    f = np.array([0.0, 0.1, 0.2, 0.3])
    assert ctqa.mtf_crossing(f, np.array([1.0, 0.8, 0.4, 0.1]), 0.5) == pytest.approx(0.175)
    assert ctqa.mtf_crossing(f, np.array([1.0, 0.9, 0.8, 0.7]), 0.5) is None


def rois(n: int, absent: int, contrast: float, noise: float, seed: int, side: int = 15):
    """Signal-present (n, m, m) and -absent (n, absent, m, m) ROIs: a Gaussian blob of peak
    ``contrast`` in white noise of std ``noise``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] - side // 2
    signal = contrast * np.exp(-(yy ** 2 + xx ** 2) / (2 * 2.0 ** 2))
    sp = signal + rng.normal(0, noise, (n, side, side))
    sa = rng.normal(0, noise, (n, absent, side, side))
    return sp, sa, signal


def test_npw_dprime_matches_theory_with_many_realisations():
    sp, sa, signal = rois(300, 4, 3.0, 10.0, seed=1)
    got = ctqa.npw_dprime(sp, sa)
    theory = math.sqrt(np.sum(signal ** 2)) / 10.0  # NPW in white noise: |s| / sigma
    assert got["dprime"] == pytest.approx(theory, rel=0.12)
    assert got["auc"] == pytest.approx(norm.cdf(got["dprime"] / math.sqrt(2)), abs=0.04)
    assert got["n_present"] == 300 and got["n_absent"] == 1200


def test_dprime_rises_with_contrast_and_falls_with_noise():
    d = {(c, s): ctqa.npw_dprime(*rois(40, 8, c, s, seed=2)[:2])["dprime"]
         for c, s in ((2.0, 10.0), (4.0, 10.0), (8.0, 10.0), (4.0, 20.0), (4.0, 5.0))}
    assert d[2.0, 10.0] < d[4.0, 10.0] < d[8.0, 10.0]
    assert d[4.0, 20.0] < d[4.0, 10.0] < d[4.0, 5.0]
    # no signal: d' near 0 and AUC near 0.5
    null = ctqa.npw_dprime(*rois(40, 8, 0.0, 10.0, seed=3)[:2])
    assert abs(null["dprime"]) < 0.6 and abs(null["auc"] - 0.5) < 0.15


def test_dose_equivalent_interpolates_in_log_dose():
    doses = [1.0, 0.5, 0.25, 0.1]
    dp = [4.0, 2.8, 2.0, 1.2]
    assert ctqa.dose_equivalent(doses, dp, 2.8)[0] == pytest.approx(0.5)
    got, note = ctqa.dose_equivalent(doses, dp, 2.4)
    assert got == pytest.approx(math.sqrt(0.25 * 0.5))  # half way in log dose
    assert "interpolated" in note
    got, note = ctqa.dose_equivalent(doses, dp, 5.0)
    assert got is None and "beyond the ladder" in note


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """A coarse QA phantom: a 200 mm body on 192 px of 1.33 mm, doses 100 % and 25 %, 4
    realisations each."""
    out = tmp_path_factory.mktemp("qa") / "qa"
    ctphantom.make_qa(out, diameters=(200,), size=192, pixel_mm=1.33, doses=(1.0, 0.25),
                      realisations=4, seed=0)
    return out


def test_qa_phantom_truth_and_series_read_back(qa_dir):
    import MyDataLoader_test

    truth = json.loads((qa_dir / ctphantom.QA_TRUTH).read_text())
    assert truth["doses"] == [1.0, 0.25] and truth["realisations"] == 4
    low = [i for i in truth["inserts"] if i["kind"] == "low-contrast"]
    assert sorted({i["diameter_mm"] for i in low}) == [3.0, 5.0, 7.0, 10.0]
    assert sorted({i["contrast_hu"] for i in low}) == [3.0, 5.0, 7.0, 14.0]
    assert sorted(i["hu"] for i in truth["inserts"] if i["kind"] == "rod") == [-100.0, 340.0]
    exact = np.load(qa_dir / "npy" / "truth.npy")
    for ins in truth["inserts"]:
        if ins["diameter_mm"] >= 7:  # a 3 mm insert is ~2 px here: its centre pixel is mixed
            assert exact[tuple(ins["centre_px"])] == pytest.approx(ins["hu"], abs=1e-3)
    for ring in truth["backgrounds"].values():
        assert all(exact[tuple(b["centre_px"])] == 0.0 for b in ring)

    ds = MyDataLoader_test.load_test_dataset(qa_dir / "dicom")
    assert ds.patients == ["dose025", "dose100", "full"]
    slices = list(MyDataLoader_test.iter_slices(ds))
    assert len(slices) == 4 + 4 + 1
    stack = np.load(qa_dir / "npy" / "dose025.npy")
    got = np.stack([s.ld_hu for s in slices if s.patient == "dose025"])
    body = exact > -500
    np.testing.assert_allclose(got[:, body], stack[:, body], atol=0.051)  # 0.1 HU steps
    # realisations are independent, and the noise std scales as 1 / sqrt(dose)
    fd = np.load(qa_dir / "npy" / "full_dose.npy")
    full = np.load(qa_dir / "npy" / "dose100.npy")
    inner = ctdose.body_mask(fd, 10)
    assert not np.allclose(stack[0], stack[1])
    ratio = np.std((stack - fd)[:, inner]) / np.std((full - fd)[:, inner])
    assert ratio == pytest.approx(2.0, rel=0.1)


def test_myevaluation_qa_end_to_end(qa_dir, tmp_path, capsys):
    run = make_run(tmp_path / "run", base=4, depth=3)
    out = tmp_path / "eval"
    assert E.main(["--qa", str(qa_dir), "--run", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Dose ladder" in printed and "Dose equivalence" in printed
    report = json.loads((out / "qa.json").read_text())
    for name in ("qa.md", "ttf.png", "dprime.png", "nps.png",
                 "phantom.png"):
        assert (out / name).stat().st_size > 0
    ld = {d: report["per_dose"][d]["ldct"] for d in ("dose100", "dose025")}
    assert ld["dose025"]["noise"]["noise_std"] / ld["dose100"]["noise"]["noise_std"] == \
        pytest.approx(2.0, rel=0.15)
    assert ld["dose025"]["mean_dprime"] < ld["dose100"]["mean_dprime"]
    for d in ("dose100", "dose025"):  # the Gaussian filter lowers the noise and the MTF50
        g = report["per_dose"][d]["gaussian"]
        assert g["noise"]["noise_std"] < 0.8 * ld[d]["noise"]["noise_std"]
        assert g["ttf"]["rod_+340HU"]["mtf50"] < ld[d]["ttf"]["rod_+340HU"]["mtf50"]
    fd = report["full_dose_ttf"]["rod_+340HU"]
    assert fd["ttf"][0] == pytest.approx(1.0) and 0 < fd["mtf50"] < 0.5 / 1.33
    assert set(report["per_dose"]["dose025"]["cncl"]["detect"]) == {
        f"{d:g}mm_{c:+g}HU" for d in (10, 7, 5, 3) for c in (14, 7, 5, 3)}
    eq = report["dose_equivalence"]
    assert eq["cncl_dose"] == 0.25 and len(eq["per_insert"]) == 16
    # an untrained (identity) generator: CNCL is the input, so FBP matches it at 25 %
    assert eq["fbp_equivalent_dose"] == pytest.approx(0.25, rel=0.02)
    # LG-CHO figures per insert and the verdict with its interval (issue 24): paired replicates
    # of an identical method give 25 % and no measurable saving
    cho = report["per_dose"]["dose025"]["ldct"]["detect"]["10mm_+14HU"]["cho"]
    assert cho["n_channels"] == 5
    assert cho["dprime_ci"][0] <= cho["dprime"] <= cho["dprime_ci"][1]
    v = report["verdict"]["all"]
    assert v["dose"] == pytest.approx(0.25, rel=0.01)
    # (a replicate a hair below FBP's 25 % d' falls below this two-dose ladder: 0)
    assert v["ci"][0] <= 0.25 and v["ci"][1] == pytest.approx(0.25, rel=0.02)
    assert v["verdict"] == "no measurable saving" and "200 mm body" in v["summary"]
    assert len(report["verdict"]["mita"]["inserts"]) == 4
    assert "Summary:" in printed and v["summary"] in printed
    low = report["per_dose"]["dose100"]["ldct"]["detect"]
    assert abs(low["10mm_+14HU"]["ct_error_hu"]) < 2.0  # FBP keeps a large insert's HU


def test_bad_qa_input_is_one_error_line(tmp_path):
    (tmp_path / "notqa").mkdir()
    for args, words in (((str(tmp_path / "missing"),), "no such folder"),
                        ((str(tmp_path / "notqa"),), "not a QA phantom folder")):
        assert_one_error_line(cli("Myevaluation.py", "--qa", *args, "--run", tmp_path),
                              words, code=2)
    assert_one_error_line(cli("Mysimulate.py", "--qa", tmp_path / "x", "--realisations", "1"),
                          "--realisations", code=2)
    assert_one_error_line(cli("Mysimulate.py", "--qa", tmp_path / "y", "--qa-diameter", "50"),
                          "--qa-diameter", code=2)
    assert not (tmp_path / "y").exists()
    assert not (tmp_path / "x").exists()


def test_default_body_has_real_quarter_dose_noise_from_attenuation_alone():
    """Issue 24: at the calibrated I0 (unchanged) the default adult-abdomen phantom's 25 % noise
    in the uniform body region lies inside the real Mayo quarter-dose range (19-37 HU); a 150 mm
    body is much quieter. The noise grows with the diameter because of the attenuation only."""
    noise = {}
    for d in (ctphantom.QA_DEFAULT_DIAMETER_MM, 150.0):
        g = ctphantom.qa_geometry(diameter_mm=d)
        assert g["size"] == ctphantom.qa_size_for(d) and g["size"] * g["pixel_mm"] >= d + 12
        assert ctdose.matched_i0(g["pixel_mm"]) == ctdose.I0_DEFAULT  # the calibration pixel
        truth = ctphantom.qa_truth_image(g, supersample=1)
        ld = ctdose.simulate_pair_from_fd(truth, 0.25, g["pixel_mm"], (0, 250, 0))
        noise[d] = ctphantom.noise_std(ld[None], truth, ctphantom.uniform_mask(g))
    assert 19.0 < noise[ctphantom.QA_DEFAULT_DIAMETER_MM] < 37.0
    assert noise[150.0] < 0.5 * noise[ctphantom.QA_DEFAULT_DIAMETER_MM]


def test_qa_diameter_builds_every_size_with_its_matrix_and_noise(tmp_path):
    out = tmp_path / "qa"
    r = cli("Mysimulate.py", "--qa", out, "--qa-diameter", "150", "350", "--pixel-mm", "2",
            "--qa-doses", "0.25", "--realisations", "2")
    assert r.returncode == 0, r.stderr
    sizes = json.loads((out / ctphantom.QA_SIZES_FILE).read_text())["sizes"]
    assert sizes == {"d150mm": 150.0, "d350mm": 350.0}
    truths = {k: json.loads((out / k / ctphantom.QA_TRUTH).read_text()) for k in sizes}
    for k, t in truths.items():
        assert t["body"]["diameter_mm"] == sizes[k] and t["size"] == ctphantom.qa_size_for(
            sizes[k], 2.0)
        assert np.load(out / k / "npy" / "dose025.npy").shape == (2, t["size"], t["size"])
        assert f"{sizes[k]:g} mm body" in r.stdout and f"{t['noise_hu']['dose025']:.1f}" in r.stdout
        # the insert rings scale with the body: the outer ring sits at the same fraction
        outer = max(np.hypot(*i["centre_mm"]) for i in t["inserts"] if i["ring"] == 0)
        assert outer / sizes[k] == pytest.approx(68.0 / 200.0, abs=0.01)
        assert sum(i.get("mita", False) for i in t["inserts"]) == 4
    assert truths["d350mm"]["noise_hu"]["dose025"] > 2 * truths["d150mm"]["noise_hu"]["dose025"]


def test_dose_equivalence_interval_and_verdict_on_a_known_ladder():
    """FBP d' = 4 sqrt(dose) (the NPW/ideal d' of quantum noise), replicates with sd 0.1: a
    method reaching FBP's 50 % d' at 25 % saves dose (equivalent ~50 %, interval above 25 %);
    one equal to FBP at 25 % saves nothing; one below FBP's 10 % costs dose."""
    import ctverdict

    rng = np.random.default_rng(0)
    doses = [0.1, 0.25, 0.5, 1.0]
    fbp = [4 * math.sqrt(d) + rng.normal(0, 0.1, 400) for d in doses]
    target = 4 * math.sqrt(0.5) + rng.normal(0, 0.1, 400)
    better = ctverdict.equivalence_interval(doses, fbp, target)
    assert better["dose"] == pytest.approx(0.5, rel=0.05)
    assert 0.25 < better["ci"][0] < 0.5 < better["ci"][1] < 1.0
    assert ctverdict.verdict(better, 0.25) == "saves dose"
    line = ctverdict.summary_line("M", better, 0.25, "3-10 mm, 3-14 HU", 300, 1.0)
    assert line.startswith("at 25% dose, M matches FBP at 5") and "300 mm body" in line
    same = ctverdict.equivalence_interval(doses, fbp, fbp[1])  # paired: the same replicates
    assert same["dose"] == pytest.approx(0.25) and ctverdict.verdict(same, 0.25) == \
        "no measurable saving"
    worse = ctverdict.equivalence_interval(doses, fbp, np.full(400, 0.5))
    assert worse["below"] == 400 and ctverdict.verdict(worse, 0.25) == "costs dose"
    top = ctverdict.equivalence_interval(doses, fbp, np.full(400, 9.0))
    assert top["dose"] is None and top["beyond"] == 400
    assert "> 100%" in ctverdict.summary_line("M", top, 0.25, "x", 300, 1.0)


def test_ct_number_error_of_an_exact_disc():
    import ctverdict

    img = sharp_disc(41, 6.0, 14.0)[None] + np.zeros((3, 1, 1))
    ins = {"centre_px": [20, 20], "radius_px": 6.0, "hu": 14.0}
    assert ctverdict.ct_number_error(img, ins, 0.6) == pytest.approx(0.0, abs=1e-9)
    assert ctverdict.ct_number_error(img + 3.0, ins, 0.6) == pytest.approx(3.0)


@pytest.mark.slow
def test_myevaluation_qa_every_size_and_one_summary_line_each(tmp_path, capsys):
    """--qa on a --qa-diameter A B folder evaluates both sizes (reports in OUT/dNNNmm) and ends
    with the quotable summary line of each size (issue 24)."""
    qa = tmp_path / "qa"
    ctphantom.make_qa(qa, diameters=(150, 200), pixel_mm=2.0, doses=(1.0, 0.25),
                      realisations=4)
    run = make_run(tmp_path / "run", base=4, depth=3)
    assert E.main(["--qa", str(qa), "--run", str(run), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    summary = printed[printed.index("Summary:"):]
    for d in (150, 200):
        report = json.loads((tmp_path / "ev" / f"d{d}mm" / "qa.json").read_text())
        assert report["body_diameter_mm"] == d and set(report["verdict"]) == {"all", "mita"}
        assert f"{d} mm body" in report["verdict"]["all"]["summary"]
        assert report["verdict"]["all"]["summary"] in summary


def test_myevaluation_qa_refuses_output_inside_the_phantom(qa_dir, tmp_path):
    """The phantom folder is input: --out inside it is refused before any model is loaded."""
    before = sorted(p.name for p in qa_dir.rglob("*"))
    with pytest.raises(ctio.CTDataError, match="inside the input folder"):
        E.main(["--qa", str(qa_dir), "--run", str(tmp_path / "no-run"),
                "--out", str(qa_dir / "eval")])
    assert sorted(p.name for p in qa_dir.rglob("*")) == before

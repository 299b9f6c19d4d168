"""Image-quality measures on the QA phantom of ``Mysimulate.py --qa`` (numpy / scipy only).

Task transfer function (TTF) from the radial edge of circular inserts (AAPM TG-233, section on
task-based resolution; Richard, Husarik, Yadava, Murphy, Samei, Med Phys 39 (2012) 4115),
contrast-to-noise ratio, a non-prewhitening matched-filter (NPW) observer's d' and AUC, the NPS
(:mod:`cttexture`), the dose equivalence, and the QA tables and plots. The CLI
(``Myevaluation.py --qa``) runs the model and composes these; see README "Image quality beyond
PSNR".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

import ctcho
import ctio
import ctphantom
import ctverdict
from cttexture import ROI_SIZE, cut_rois, nps_2d, nps_power, nps_summary, radial_nps

# Measurements on the phantom of Mysimulate.py --qa (see README "Image quality beyond PSNR"):
# task transfer function (TTF) from the radial edge of circular inserts, contrast-to-noise ratio,
# a non-prewhitening matched-filter (NPW) observer's d' and AUC, the NPS, all against dose.
QA_ESF_BIN_PX = 0.1  # radial ESF bins (oversampled: pixels at many sub-pixel distances)
QA_TTF_PAD = 4096  # LSF samples after zero padding (frequency step 1 / (4096 * 0.1 px))
QA_TTF_TAPER = 0.5  # Tukey window on the LSF: flat over the middle half, cosine (Hann) edges
QA_TTF_BOOTSTRAP = 50  # resamples of the realisations for the MTF50's standard deviation
QA_MTF50_MAX_REL_SD = 0.10  # MTF50 shown only when its bootstrap sd is <= 10 % of it (ttf_gate)
QA_ROI_PER_DIAMETER = 2.0  # d' ROIs: squares of 2 insert diameters
QA_CNR_CORE = 0.6  # CNR: mean over the central disc of 0.6 insert radii (edge blur excluded)
QA_NPS_MARGIN_MM = 4.0  # NPS ROIs keep this far from inserts and the body edge
QA_REFERENCE_DOSE = 0.25  # dose equivalence: the dose at which FBP matches CNCL at this dose
QA_WINDOW = (-40.0, 60.0)  # phantom.png: full dose | LDCT | CNCL, one realisation at 25 %
QA_PROTOCOL = (
    "TTF: mean image over the realisations; radial ESF around the insert's known centre in "
    f"{QA_ESF_BIN_PX:g} px bins out to 2 insert radii; LSF = dESF/dr (numpy.gradient) times a "
    f"Tukey window (alpha {QA_TTF_TAPER:g}); TTF = |FFT(LSF)| / |FFT(LSF)|(0); MTF50 / MTF10 = "
    "first crossing of 0.5 / 0.1 (linear interpolation), cycles/mm; MTF50 sd: bootstrap over "
    f"the realisations ({QA_TTF_BOOTSTRAP} resamples, seed 0); 'n/m' (not measurable) where "
    f"that sd exceeds {QA_MTF50_MAX_REL_SD:.0%} of the MTF50 or cannot be computed (< 4 "
    "realisations, a resample without a 0.5 crossing). "
    "CNR: (mean over the central 0.6-radius disc of the insert - the same disc at the ring's "
    "signal-absent positions) / pixel std of the signal-absent ROIs. "
    "d': non-prewhitening matched filter, template = mean signal-present ROI - mean "
    "signal-absent ROI, averaged over 1 px rings around the insert centre (ROI 2 diameters "
    "square; leave-one-realisation-out: the template never includes the scored realisation), "
    "d' = (mean t_SP - mean t_SA) / sqrt((var t_SP + "
    "var t_SA) / 2); AUC = Mann-Whitney U / (n_SP n_SA) (scipy.stats.mannwhitneyu); signal "
    "absent = the 8 background positions of the insert's ring in every realisation. "
    "Background structure: std of the realisation-mean image in uniform water with its "
    "remaining noise (noise variance / N) removed. "
    "NPS: noise = (X_k - mean_k X) * sqrt(N / (N - 1)), 32x32 ROIs (50 % overlap) in uniform "
    "water away from inserts, plane removed, AAPM TG-233 NPS and mean frequency f_av (1-D radial "
    "NPS, as cttexture.nps_summary). "
    "Dose equivalence: the FBP dose whose mean d' (over the 16 low-contrast inserts) equals "
    "CNCL's at 25 %, by linear interpolation of d' in log(dose) between ladder doses.")
QA_LABELS = {"ldct": "FBP (LDCT input)", "gaussian": "Gaussian filter", "cncl": "CNCL",
             "fd": "full dose (noiseless FBP)"}


def radial_esf(image: np.ndarray, centre_px, r_max_px: float,
               bin_px: float = QA_ESF_BIN_PX) -> tuple[np.ndarray, np.ndarray]:
    """Radial edge-spread function around ``centre_px`` (row, col): the mean pixel value in
    ``bin_px``-wide bins of distance up to ``r_max_px`` (bin centres, means); empty bins are
    filled by linear interpolation between their neighbours."""
    r0, c0 = (float(v) for v in centre_px)
    m = int(np.ceil(r_max_px)) + 1
    h, w = np.shape(image)
    ys = slice(max(int(r0) - m, 0), min(int(r0) + m + 1, h))
    xs = slice(max(int(c0) - m, 0), min(int(c0) + m + 1, w))
    yy, xx = np.mgrid[ys, xs]
    r = np.hypot(yy - r0, xx - c0).ravel()
    v = np.asarray(image, np.float64)[ys, xs].ravel()
    keep = r < r_max_px
    nbins = int(np.ceil(r_max_px / bin_px))
    idx = np.minimum((r[keep] / bin_px).astype(int), nbins - 1)
    sums = np.bincount(idx, weights=v[keep], minlength=nbins)
    counts = np.bincount(idx, minlength=nbins)
    centres = (np.arange(nbins) + 0.5) * bin_px
    full = counts > 0
    if full.sum() < 2:
        raise ValueError("too few pixels for a radial ESF")
    esf = np.interp(centres, centres[full], sums[full] / counts[full])
    return centres, esf


def ttf_from_esf(r_px: np.ndarray, esf: np.ndarray, edge_px: float, half_width_px: float,
                 pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """TTF of a radial ESF with its edge at ``edge_px``: the ESF over [edge - w, edge + w]
    differentiated (LSF), tapered by a Tukey window, zero-padded and Fourier transformed;
    normalised at zero frequency. Returns (frequency in cycles/mm up to the pixel Nyquist
    frequency, TTF)."""
    from scipy.signal.windows import tukey

    sel = (r_px >= edge_px - half_width_px) & (r_px <= edge_px + half_width_px)
    r, e = r_px[sel], esf[sel]
    if len(r) < 8:
        raise ValueError("edge window holds too few ESF samples")
    lsf = np.gradient(e, r) * tukey(len(r), QA_TTF_TAPER)
    spec = np.abs(np.fft.rfft(lsf, n=max(QA_TTF_PAD, len(lsf))))
    step = float(r[1] - r[0])
    freq = np.fft.rfftfreq(max(QA_TTF_PAD, len(lsf)), d=step * pixel_mm)
    nyquist = 0.5 / pixel_mm
    keep = freq <= nyquist + 1e-12
    return freq[keep], spec[keep] / spec[0] if spec[0] > 0 else spec[keep] * np.nan


def mtf_crossing(freq: np.ndarray, ttf: np.ndarray, level: float) -> Optional[float]:
    """First frequency where ``ttf`` falls to ``level`` (linear interpolation), or None."""
    below = np.nonzero(ttf <= level)[0]
    if not len(below) or below[0] == 0:
        return None
    i = below[0]
    f0, f1, t0, t1 = freq[i - 1], freq[i], ttf[i - 1], ttf[i]
    return float(f0 + (t0 - level) * (f1 - f0) / (t0 - t1)) if t0 != t1 else float(f1)


def qa_ttf(mean_image: np.ndarray, insert: dict, pixel_mm: float,
           noise_std: Optional[float] = None, n_images: int = 1) -> dict:
    """TTF of one circular insert on the (realisation-averaged) ``mean_image``.

    The ESF runs from the centre to two insert radii (at least 4 px past the edge), the LSF
    window is the edge +- one radius (at least 3 px). ``noise_std`` (pixel noise of one
    realisation) and ``n_images`` give the total CNR = |contrast| / noise_std *
    sqrt(insert pixels * n_images), reported for information; whether the MTF50 is measurable
    is decided by its bootstrap sd (:func:`ttf_gate`)."""
    radius = float(insert["radius_px"])
    half = max(radius, 3.0)
    r, esf = radial_esf(mean_image, insert["centre_px"], radius + max(half, 4.0))
    freq, ttf = ttf_from_esf(r, esf, radius, half, pixel_mm)
    inside = esf[r < 0.6 * radius].mean() if (r < 0.6 * radius).any() else esf[0]
    outside = esf[r > radius + 0.6 * half].mean()
    contrast = float(inside - outside)
    if noise_std is None or noise_std <= 0:
        cnr_total = math.inf
    else:
        cnr_total = abs(contrast) / noise_std * math.sqrt(math.pi * radius ** 2 * n_images)
    return {"freq": freq, "ttf": ttf, "contrast_hu": contrast,
            "cnr_total": cnr_total if math.isfinite(cnr_total) else None, "measurable": True,
            "mtf50": mtf_crossing(freq, ttf, 0.5), "mtf10": mtf_crossing(freq, ttf, 0.1)}


def ttf_gate(t: dict, sd: Optional[float]) -> dict:
    """``t`` (:func:`qa_ttf`) with ``mtf50_sd`` = ``sd`` and, unless the MTF50 is precise
    enough (bootstrap sd <= QA_MTF50_MAX_REL_SD of it), ``measurable`` False and MTF50 / MTF10
    None (the curve is kept). The 10 % is this project's precision criterion: IR and denoisers
    change MTF50 by roughly 2-18 % at low contrast (Yu et al., Med Phys 42 (2015) 2261), so a
    figure less precise than 10 % cannot show such a change; it replaces a total-CNR >= 15
    rule whose MTF50 still had relative sd 0.5-0.6 in simulation (issue 23)."""
    ok = (sd is not None and t["mtf50"] is not None and t["mtf50"] > 0
          and sd <= QA_MTF50_MAX_REL_SD * t["mtf50"])
    return {**t, "mtf50_sd": sd, "measurable": bool(ok),
            "mtf50": t["mtf50"] if ok else None, "mtf10": t["mtf10"] if ok else None}


def mtf50_bootstrap_sd(images: np.ndarray, insert: dict, pixel_mm: float,
                       resamples: int = QA_TTF_BOOTSTRAP) -> Optional[float]:
    """Bootstrap standard deviation of an insert's MTF50: the realisations resampled with
    replacement (seed 0), the TTF of each resample's mean image (only the insert's window is
    averaged). None with fewer than 4 realisations or when a resample has no MTF50."""
    if len(images) < 4:
        return None
    radius = float(insert["radius_px"])
    m = int(np.ceil(radius + max(radius, 4.0))) + 2
    r0, c0 = (int(v) for v in insert["centre_px"])
    crop = np.asarray(images[:, r0 - m:r0 + m + 1, c0 - m:c0 + m + 1], np.float64)
    local = {**insert, "centre_px": [m, m]}
    rng = np.random.default_rng(0)
    got = []
    for _ in range(resamples):
        mean = crop[rng.integers(0, len(crop), len(crop))].mean(axis=0)
        t = qa_ttf(mean, local, pixel_mm)
        if t["mtf50"] is None:
            return None
        got.append(t["mtf50"])
    return float(np.std(got, ddof=1))


def _square(image: np.ndarray, centre_px, side: int) -> np.ndarray:
    r0, c0 = (int(v) for v in centre_px)
    h = side // 2
    return image[..., r0 - h:r0 - h + side, c0 - h:c0 - h + side]


def qa_roi_side(insert: dict) -> int:
    """Side (px, odd, >= 5) of the d' ROIs of an insert: QA_ROI_PER_DIAMETER diameters."""
    side = int(round(QA_ROI_PER_DIAMETER * 2 * insert["radius_px"]))
    return max(5, side | 1)


def npw_dprime(present: np.ndarray, absent: np.ndarray) -> dict:
    """Non-prewhitening matched-filter observer on ROIs of realisations.

    ``present``: (N, m, m) signal-present ROIs, one per realisation; ``absent``: (N, B, m, m),
    B signal-absent ROIs per realisation; the signal is a disc centred on the ROI's centre pixel.
    The template for realisation k is the mean signal-present minus the mean signal-absent ROI
    of all *other* realisations (leave one out, so a realisation's noise never scores itself),
    averaged over rings one pixel wide around the centre (the expected signal of a disc is
    circularly symmetric; ring averaging removes most of the template's own noise, which would
    otherwise dominate d' for small, faint inserts at tens of realisations); scores
    t = <template, ROI>.
    d' = (mean t_SP - mean t_SA) / sqrt((var t_SP + var t_SA) / 2) (sample variances) and
    AUC = U / (n_SP n_SA) from scipy.stats.mannwhitneyu (ties count one half)."""
    from scipy.stats import mannwhitneyu

    sp = np.asarray(present, np.float64)
    sa = np.asarray(absent, np.float64)
    n = len(sp)
    if n < 2 or sa.shape[0] != n:
        raise ValueError("need >= 2 realisations with signal-present and -absent ROIs each")
    nb = sa.shape[1]
    side = sp.shape[-1]
    yy, xx = np.mgrid[:side, :side] - side // 2
    ring = np.rint(np.hypot(yy, xx)).astype(int).ravel()
    ring_n = np.bincount(ring)

    def radial(t: np.ndarray) -> np.ndarray:
        return (np.bincount(ring, weights=t.ravel()) / ring_n)[ring].reshape(t.shape)

    sp_sum, sa_sum = sp.sum(axis=0), sa.sum(axis=(0, 1))
    t_sp, t_sa = np.empty(n), np.empty((n, nb))
    for k in range(n):
        tpl = radial((sp_sum - sp[k]) / (n - 1) - (sa_sum - sa[k].sum(axis=0)) / ((n - 1) * nb))
        t_sp[k] = np.sum(tpl * sp[k])
        t_sa[k] = np.sum(tpl * sa[k], axis=(1, 2))
    t_sa = t_sa.ravel()
    pooled = math.sqrt((t_sp.var(ddof=1) + t_sa.var(ddof=1)) / 2.0)
    dprime = float((t_sp.mean() - t_sa.mean()) / pooled) if pooled > 0 else math.inf
    u = mannwhitneyu(t_sp, t_sa, alternative="two-sided").statistic
    return {"dprime": dprime, "auc": float(u / (len(t_sp) * len(t_sa))), "n_present": n,
            "n_absent": len(t_sa)}


def qa_cnr(images: np.ndarray, insert: dict, backgrounds: list) -> float:
    """CNR of an insert over realisations ``images`` (N, H, W): (mean over the central
    QA_CNR_CORE-radius disc - the same disc at the signal-absent positions) / pixel std of the
    signal-absent ROIs (each ROI's own mean removed)."""
    side = qa_roi_side(insert)
    yy, xx = np.mgrid[:side, :side] - side // 2
    core = np.hypot(yy, xx) <= max(QA_CNR_CORE * insert["radius_px"], 1.0)
    sp = _square(images, insert["centre_px"], side)
    sa = np.stack([_square(images, b["centre_px"], side) for b in backgrounds], axis=1)
    contrast = sp[:, core].mean() - sa[:, :, core].mean()
    resid = sa - sa.mean(axis=(2, 3), keepdims=True)
    std = resid.std() * math.sqrt(resid[0, 0].size / max(resid[0, 0].size - 1, 1))
    return float(contrast / std) if std > 0 else math.inf


def qa_uniform_mask(truth: dict, fd: np.ndarray) -> np.ndarray:
    """Uniform water of the phantom: inside the body, at least QA_NPS_MARGIN_MM from its edge
    and from every insert (the signal-absent positions are uniform water too);
    ``ctphantom.uniform_mask`` with the NPS margin, on the grid of ``fd``."""
    if fd.shape != (truth["size"], truth["size"]):
        raise ValueError(f"QA image {fd.shape} does not match the phantom's {truth['size']}^2")
    return ctphantom.uniform_mask(truth, QA_NPS_MARGIN_MM)


def qa_nps_corners(mask: np.ndarray, size: int = ROI_SIZE) -> list[tuple[int, int]]:
    """Top-left corners of ``size`` ROIs on a half-ROI grid wholly inside ``mask``."""
    step = size // 2
    return [(y, x) for y in range(0, mask.shape[0] - size + 1, step)
            for x in range(0, mask.shape[1] - size + 1, step)
            if mask[y:y + size, x:x + size].all()]


def qa_noise(images: np.ndarray, mask: np.ndarray, pixel_mm: float) -> dict:
    """Noise std and NPS (TG-233, :func:`nps_2d`) of realisations (N, H, W): noise = each
    realisation minus the mean over realisations, times sqrt(N / (N - 1)), in ROI_SIZE ROIs on
    a half-ROI grid wholly inside ``mask`` (16 or 8 px only where no ROI_SIZE ROI fits, as on
    coarse test grids)."""
    n = len(images)
    for size in (ROI_SIZE, ROI_SIZE // 2, ROI_SIZE // 4):
        corners = qa_nps_corners(mask, size)
        if corners:
            break
    else:
        raise ctio.CTDataError("QA phantom: no NPS ROI fits into its uniform water")
    mean = images.mean(axis=0)
    power = 0.0
    for img in images:
        power = power + nps_power(cut_rois((img - mean) * math.sqrt(n / (n - 1)), corners,
                                           size))
    nps = nps_2d(power, n * len(corners), pixel_mm)
    freq, radial = radial_nps(nps, pixel_mm)
    return {"n_rois": n * len(corners), "roi_px": size, **nps_summary(nps, pixel_mm),
            "freq": [float(f) for f in freq], "radial": [float(v) for v in radial]}


def dose_equivalent(doses, dprimes, target: float) -> tuple[Optional[float], str]:
    """Dose at which ``dprimes`` (one per dose) reach ``target``: linear interpolation of d' in
    log(dose) between the two ladder doses that bracket it (the lowest such segment).

    Returns (dose or None, note): None with "beyond the ladder (> max dose)" or "(< min dose)"
    when the target lies outside the measured d' range."""
    pts = sorted(zip(doses, dprimes))
    d = np.array([p[0] for p in pts], np.float64)
    v = np.array([p[1] for p in pts], np.float64)
    for i in range(len(d) - 1):
        lo, hi = v[i], v[i + 1]
        if min(lo, hi) <= target <= max(lo, hi) and lo != hi:
            t = (target - lo) / (hi - lo)
            dose = float(np.exp(np.log(d[i]) + t * (np.log(d[i + 1]) - np.log(d[i]))))
            return dose, (f"interpolated between {d[i]:.0%} and {d[i + 1]:.0%} "
                          "(d' linear in log dose)")
    if target > v.max():
        return None, f"beyond the ladder (FBP needs more than {d.max():.0%})"
    if target < v.min():
        return None, f"below the ladder (FBP at {d.min():.0%} already exceeds it)"
    return None, "not determined (d' flat on the ladder)"


def per_insert_equivalence(results: dict, names: list, doses: list) -> dict:
    """Dose equivalence of every low-contrast insert (:func:`dose_equivalent` of its own FBP d'
    against CNCL's at QA_REFERENCE_DOSE) and their median: inserts beyond the ladder count as
    above its top dose, those below it as under its lowest, so the median is defined whenever
    more than half of the inserts fall inside the ladder."""
    ref = names[doses.index(QA_REFERENCE_DOSE)]
    per, ranks = {}, []
    for ins, det in results[ref]["cncl"]["detect"].items():
        fbp = [results[n]["ldct"]["detect"][ins]["dprime"] for n in names]
        dose, note = dose_equivalent(doses, fbp, det["dprime"])
        per[ins] = {"fbp_equivalent_dose": dose, "note": note}
        ranks.append(dose if dose is not None else
                     (math.inf if note.startswith("beyond") else
                      0.0 if note.startswith("below") else math.nan))
    ranks = [r for r in ranks if not math.isnan(r)]
    median = float(np.median(ranks)) if ranks else math.nan
    if not math.isfinite(median) or not min(doses) <= median <= max(doses):
        median = None
    return {"per_insert": per, "median_fbp_equivalent_dose": median,
            "inserts_beyond": sum(r == math.inf for r in ranks),
            "inserts_below": sum(r == 0.0 for r in ranks)}


def read_qa_truth(qa_dir: Path) -> dict:
    """QA_DIR/qa_truth.json, checked: a folder written by Mysimulate.py --qa."""
    import ctphantom

    if not qa_dir.is_dir():
        raise ctio.CTDataError(f"{qa_dir}: no such folder (make one with Mysimulate.py --qa)")
    path = qa_dir / ctphantom.QA_TRUTH
    truth = ctio.read_json(path, f"{qa_dir}: not a QA phantom folder (no {ctphantom.QA_TRUTH}; "
                                 "make one with Mysimulate.py --qa)")
    need = ("inserts", "backgrounds", "pixel_mm", "size", "doses", "series", "body")
    if not isinstance(truth, dict) or any(k not in truth for k in need):
        raise ctio.CTDataError(f"{path}: not a Mysimulate.py --qa truth file (missing "
                               f"{', '.join(k for k in need if k not in (truth or {}))})")
    return truth


def read_qa_series(qa_dir: Path, truth: dict, name: str) -> np.ndarray:
    """One series of the QA folder (DICOM, through MyDataLoader_test) as (N, H, W) HU."""
    import MyDataLoader_test

    folder = qa_dir / truth["series"][name]
    ds = MyDataLoader_test.load_test_dataset(folder, "dicom")
    images = np.stack([s.ld_hu for s in MyDataLoader_test.iter_slices(ds)])
    if images.shape[1:] != (truth["size"], truth["size"]):
        raise ctio.CTDataError(f"{folder}: slices of {images.shape[1:]}, the truth says "
                               f"{truth['size']}x{truth['size']}")
    return images


def ttf_inserts(truth: dict) -> list[dict]:
    """The inserts with a TTF: the rods and the largest low-contrast insert of every contrast."""
    low = [i for i in truth["inserts"] if i["kind"] == "low-contrast"]
    big = max(i["diameter_mm"] for i in low) if low else None
    return ([i for i in truth["inserts"] if i["kind"] == "rod"]
            + [i for i in low if i["diameter_mm"] == big])


def qa_measure(images: np.ndarray, truth: dict, mask: np.ndarray) -> dict:
    """Every QA figure of one method at one dose, from its realisations (N, H, W)."""
    px = truth["pixel_mm"]
    noise = qa_noise(images, mask, px)
    mean = images.mean(axis=0)
    # deterministic structure of the uniform water: the variance of the realisation-mean image
    # minus its remaining noise (noise variance / N)
    structure = float(np.var(mean[mask]) - noise["noise_std"] ** 2 / len(images))
    noise["structure_std"] = math.sqrt(max(structure, 0.0))
    ttf = {ins["name"]: ttf_gate(qa_ttf(mean, ins, px, noise["noise_std"], len(images)),
                                 mtf50_bootstrap_sd(images, ins, px))
           for ins in ttf_inserts(truth)}
    det, cho_boot = {}, {}
    for ins in truth["inserts"]:
        if ins["kind"] != "low-contrast":
            continue
        bgs = truth["backgrounds"][str(ins["ring"])]
        side = qa_roi_side(ins)
        sp = _square(images, ins["centre_px"], side)
        sa = np.stack([_square(images, b["centre_px"], side) for b in bgs], axis=1)
        cho = ctcho.cho_study(sp[:, None], sa, 2 * ins["radius_px"], replicates=True)
        cho_boot[ins["name"]] = cho.pop("dprime_boot")
        det[ins["name"]] = {**npw_dprime(sp, sa), "cnr": qa_cnr(images, ins, bgs), "cho": cho,
                            "ct_error_hu": ctverdict.ct_number_error(images, ins, QA_CNR_CORE),
                            "diameter_mm": ins["diameter_mm"],
                            "contrast_hu": ins["contrast_hu"], "mita": ins.get("mita", False)}
    dps = [d["dprime"] for d in det.values()]
    return {"noise": noise, "ttf": ttf, "detect": det, "cho_boot": cho_boot,
            "mean_cho_dprime": float(np.mean([d["cho"]["dprime"] for d in det.values()]))
            if det else None,
            "mean_dprime": float(np.mean(dps)) if dps else None,
            "mean_auc": float(np.mean([d["auc"] for d in det.values()])) if det else None}


def json_ttf(t: dict) -> dict:
    """TTF dict for JSON: the curve resampled to 0.01 cycles/mm steps."""
    grid = np.arange(0.0, float(t["freq"][-1]) + 1e-9, 0.01)
    return {**{k: v for k, v in t.items() if k not in ("freq", "ttf")},
            "freq": [round(float(f), 4) for f in grid],
            "ttf": [round(float(v), 5) for v in np.interp(grid, t["freq"], t["ttf"])]}


def json_num(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def series_of(truth: dict, dose: float) -> str:
    import ctphantom

    name = ctphantom.qa_series_name(dose)
    if name not in truth["series"]:
        raise ctio.CTDataError(f"{ctphantom.QA_TRUTH}: dose {dose:g} has no series {name}")
    return name


def _f(v, digits: int = 2) -> str:
    return "n/m" if v is None else ("inf" if not math.isfinite(v) else f"{v:.{digits}f}")


def _mtf50_text(t: dict) -> str:
    sd = t.get("mtf50_sd")
    return _f(t["mtf50"], 3) + (f" ±{sd:.3f}" if sd is not None else "")


def qa_tables(report: dict) -> str:
    """The QA report as markdown: dose ladder, TTF, detectability, dose equivalence. One
    piece: table blocks read top to bottom like the report it prints."""
    names = list(report["per_dose"])
    doses = dict(zip(names, report["doses"]))
    ttf_names = list(report["full_dose_ttf"])
    rod = next((k for k in ttf_names if k.startswith("rod_+")), ttf_names[0])
    low = next((k for k in ttf_names if not k.startswith("rod")), None)
    lines = [f"QA phantom: {report['qa_dir']}  run: {report['run']}",
             f"{report['realisations']} realisations per dose, {report['pixel_mm']:g} mm pixels; "
             f"full dose = {report['full_dose']}", "",
             "Dose ladder (noise, NPS, resolution, detectability):", "",
             f"| dose | method | noise std (HU) | NPS mean freq (cycles/mm) | background "
             f"structure (HU) | MTF50 {rod} (cycles/mm) | MTF50 {low} (cycles/mm) | mean d' | "
             "mean AUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    fd = report["full_dose_ttf"]
    fds = report.get("full_dose_structure")
    lines.append(f"| full | {QA_LABELS['fd']} | 0 | | {_f(fds)} | {_f(fd[rod]['mtf50'], 3)} | "
                 f"{_f(fd[low]['mtf50'], 3) if low else ''} | | |")
    for n in names:
        for m, r in report["per_dose"][n].items():
            lines.append(
                f"| {doses[n]:.0%} | {QA_LABELS[m]} | {r['noise']['noise_std']:.2f} | "
                f"{r['noise']['nps_mean_freq']:.3f} | {_f(r['noise']['structure_std'])} | "
                f"{_mtf50_text(r['ttf'][rod])} | "
                f"{_mtf50_text(r['ttf'][low]) if low else ''} | {_f(r['mean_dprime'])} | "
                f"{_f(r['mean_auc'], 3)} |")
    lines += ["", "TTF: MTF50 ±sd / MTF10 (cycles/mm) per insert (sd: bootstrap over the "
              f"realisations; 'n/m': sd above {QA_MTF50_MAX_REL_SD:.0%} of the MTF50):", "",
              "| dose | method | " + " | ".join(ttf_names) + " |",
              "|---|---|" + "---|" * len(ttf_names)]
    lines.append(f"| full | {QA_LABELS['fd']} | " + " | ".join(
        f"{_f(fd[k]['mtf50'], 3)} / {_f(fd[k]['mtf10'], 3)}" for k in ttf_names) + " |")
    for n in names:
        for m, r in report["per_dose"][n].items():
            lines.append(f"| {doses[n]:.0%} | {QA_LABELS[m]} | " + " | ".join(
                f"{_mtf50_text(r['ttf'][k])} / {_f(r['ttf'][k]['mtf10'], 3)}"
                for k in ttf_names) + " |")
    inserts = list(report["per_dose"][names[0]]["ldct"]["detect"])
    methods = list(report["per_dose"][names[0]])
    lines += ["", "Low-contrast detectability: NPW d' [AUC] (CNR) per insert:", "",
              "| insert | " + " | ".join(f"{QA_LABELS[m]} {doses[n]:.0%}"
                                         for n in names for m in methods) + " |",
              "|---|" + "---|" * (len(names) * len(methods))]
    for ins in inserts:
        cells = []
        for n in names:
            for m in methods:
                d = report["per_dose"][n][m]["detect"][ins]
                cells.append(f"{_f(d['dprime'])} [{d['auc']:.2f}] ({_f(d['cnr'])})")
        lines.append(f"| {ins} | " + " | ".join(cells) + " |")
    eq = report["dose_equivalence"]
    lines.append("")
    if eq:
        got = (f"{eq['fbp_equivalent_dose']:.0%} of full dose" if eq["fbp_equivalent_dose"]
               else "-")
        lines.append(f"Dose equivalence: CNCL at {eq['cncl_dose']:.0%} has mean d' "
                     f"{_f(eq['cncl_mean_dprime'])}; FBP reaches it at {got} ({eq['note']}).")
        med = eq["median_fbp_equivalent_dose"]
        lines.append(
            "Per insert (each insert's FBP d' against CNCL's, same interpolation): median "
            + (f"{med:.0%}" if med is not None else "outside the ladder")
            + f" of full dose; {eq['inserts_beyond']} of {len(eq['per_insert'])} inserts beyond "
            f"the ladder (FBP needs > {max(report['doses']):.0%}), {eq['inserts_below']} below "
            f"it (FBP at {min(report['doses']):.0%} already does better).")
    else:
        lines.append(f"Dose equivalence: not computed (the ladder has no "
                     f"{QA_REFERENCE_DOSE:.0%} dose or only one dose).")
    lines += ["", f"{report['seconds']:g} s ({report['images_per_s']:g} realisations/s incl. "
              "denoising).", "", QA_PROTOCOL]
    return "\n".join(lines)


def plot_qa(out_dir: Path, report: dict) -> None:
    """ttf.png (TTF of the high-contrast rod and the largest 14 HU insert per method at 25 %
    or the nearest dose), dprime.png (mean d' against dose), nps.png (radial NPS against dose)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["per_dose"])
    doses = dict(zip(names, report["doses"]))
    ref = min(names, key=lambda n: abs(doses[n] - QA_REFERENCE_DOSE))
    ttf_names = list(report["full_dose_ttf"])
    panels = [k for k in ttf_names if k.startswith("rod_+")][:1] + \
        [k for k in ttf_names if not k.startswith("rod")][:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), dpi=90,
                             squeeze=False)
    for ax, k in zip(axes[0], panels):
        fd = report["full_dose_ttf"][k]
        ax.plot(fd["freq"], fd["ttf"], "k--", label=QA_LABELS["fd"])
        for m, r in report["per_dose"][ref].items():
            t = r["ttf"][k]
            ax.plot(t["freq"], t["ttf"], label=QA_LABELS[m] + ("" if t["measurable"]
                                                               else " (n/m)"))
        ax.axhline(0.5, color="0.7", lw=0.8)
        ax.set(xlabel="spatial frequency (cycles/mm)", ylabel="TTF", ylim=(-0.05, 1.15),
               title=f"TTF {k}, dose {doses[ref]:.0%}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, out_dir / "ttf.png", plt)

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=90)
    for m in report["per_dose"][names[0]]:
        ax.plot([100 * doses[n] for n in names],
                [report["per_dose"][n][m]["mean_dprime"] for n in names], "o-",
                label=QA_LABELS[m])
    ax.set(xscale="log", xlabel="dose (% of full dose)", ylabel="mean d' (16 inserts)",
           title="NPW detectability against dose")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    _save(fig, out_dir / "dprime.png", plt)

    methods = ("ldct", "cncl")
    fig, axes = plt.subplots(1, len(methods), figsize=(10, 3.6), dpi=90, squeeze=False)
    for ax, m in zip(axes[0], methods):
        for n in names:
            nz = report["per_dose"][n][m]["noise"]
            ax.plot(nz["freq"], nz["radial"], label=f"{doses[n]:.0%}")
        ax.set(xlabel="spatial frequency (cycles/mm)", ylabel="NPS (HU$^2$ mm$^2$)",
               title=f"noise power spectrum, {QA_LABELS[m]}")
        ax.legend(fontsize=7, title="dose")
        ax.grid(alpha=0.3)
    _save(fig, out_dir / "nps.png", plt)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    with ctio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

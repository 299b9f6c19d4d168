"""Does a denoiser save dose? The dose equivalence of the QA phantom with its interval, the
CT-number error of the inserts and one quotable summary line (issue 24). numpy only.

* **Dose equivalence** (the FDA LCD-CT toolbox's question, DIDSR/LCD_CT
  ``analyze_dose_reduction``: at which dose does the reference reconstruction reach the
  detectability the method reaches at a reduced dose): the model's LG-CHO d' at the reference
  dose (25 %), averaged over a set of inserts, is located on FBP's d'-versus-dose ladder
  (``ctqa.dose_equivalent``: linear in log dose between the two bracketing doses).
* **Interval.** Every LG-CHO study (``ctcho.cho_study``) of one realisation set uses the same
  bootstrap draws, so replicate b of the model at 25 % and of FBP at 25 % come from the same
  resampled realisations (paired), and the other doses' replicates are independent draws of
  their own realisations. The equivalence is computed per replicate b; the interval is the
  percentile interval of the replicates, the point the median. A replicate whose target lies
  above the ladder counts as +inf (FBP needs more than the top dose), below it as 0.
* **Verdict.** A saving is *measurable* when the interval's lower end lies above the reference
  dose; a loss when its upper end lies below it; otherwise "no measurable saving".
* **CT-number error** per insert: mean over realisations of the mean HU in the insert's core
  (``ctqa.QA_CNR_CORE`` radii) minus the exact insert HU of the truth.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

CI_LEVEL = 0.95


def _signed(dose: Optional[float], note: str) -> float:
    if dose is not None:
        return dose
    return math.inf if note.startswith("beyond") else 0.0 if note.startswith("below") else math.nan


def equivalence_interval(doses: Sequence[float], fbp_boot: Sequence[np.ndarray],
                         target_boot: np.ndarray, level: float = CI_LEVEL) -> dict:
    """FBP-equivalent dose of a target d' with its bootstrap interval.

    ``fbp_boot[i]``: FBP's d' replicates [B] at ``doses[i]``; ``target_boot``: the method's
    replicates [B] at the reference dose. Returns ``{"dose", "ci", "beyond", "below",
    "replicates"}``: median and percentile interval of the per-replicate equivalent doses
    (inf: beyond the ladder's top; 0: below its bottom), and how many replicates fell outside.
    """
    from ctqa import dose_equivalent

    fbp = np.stack([np.asarray(b, np.float64) for b in fbp_boot])  # [doses, B]
    target = np.asarray(target_boot, np.float64)
    got = np.array([_signed(*dose_equivalent(doses, fbp[:, b], target[b]))
                    for b in range(target.size)])
    got = got[~np.isnan(got)]
    if not got.size:
        return {"dose": None, "ci": [None, None], "beyond": 0, "below": 0, "replicates": 0}
    s = np.sort(got)
    lo = s[int(math.floor((1 - level) / 2 * (s.size - 1)))]
    hi = s[int(math.ceil((1 + level) / 2 * (s.size - 1)))]
    med = s[(s.size - 1) // 2] if s.size % 2 else 0.5 * (s[s.size // 2 - 1] + s[s.size // 2])

    def num(x: float) -> Optional[float]:
        return float(x) if math.isfinite(x) else None if x > 0 else float(x)

    return {"dose": num(med), "ci": [num(lo), num(hi)], "beyond": int(np.sum(s == math.inf)),
            "below": int(np.sum(s == 0.0)), "replicates": int(s.size)}


def mean_boot(cho_boot: dict, inserts: Sequence[str]) -> np.ndarray:
    """Mean over ``inserts`` of their d' replicates (paired draws: same realisations per b)."""
    return np.mean([cho_boot[i] for i in inserts], axis=0)


def ct_number_error(images: np.ndarray, insert: dict, core: float) -> float:
    """Mean HU over realisations in the insert's central disc of ``core`` radii, minus the
    truth's insert HU."""
    side = int(2 * math.ceil(insert["radius_px"]) + 3)
    r0, c0 = (int(v) for v in insert["centre_px"])
    h = side // 2
    roi = np.asarray(images, np.float64)[:, r0 - h:r0 - h + side, c0 - h:c0 - h + side]
    yy, xx = np.mgrid[:side, :side] - h
    disc = np.hypot(yy, xx) <= max(core * insert["radius_px"], 1.0)
    return float(roi[:, disc].mean() - insert["hu"])


def verdict(eq: dict, ref_dose: float) -> str:
    """"saves dose", "costs dose" or "no measurable saving" from an equivalence interval."""
    if not eq["replicates"]:
        return "not determined"
    lo, hi = (math.inf if x is None else x for x in eq["ci"])  # None: beyond the ladder's top
    if lo > ref_dose:
        return "saves dose"
    if hi < ref_dose:
        return "costs dose"
    return "no measurable saving"


def _pct(x: Optional[float], top: float) -> str:
    return f"> {top:.0%}" if x is None else f"{x:.0%}"


def summary_line(model: str, eq: dict, ref_dose: float, lesions: str, diameter_mm: float,
                 top_dose: float) -> str:
    """The one line a user can quote."""
    what = verdict(eq, ref_dose)
    x, (lo, hi) = eq["dose"], eq["ci"]
    span = f"{_pct(x, top_dose)} [{_pct(lo, top_dose)}, {_pct(hi, top_dose)}]"
    body = f"for {lesions} lesions in a {diameter_mm:g} mm body"
    if what == "saves dose":
        return f"at {ref_dose:.0%} dose, {model} matches FBP at {span} dose {body}"
    if what == "costs dose":
        return (f"at {ref_dose:.0%} dose, {model} is less detectable than FBP at the same dose: "
                f"it matches FBP at {span} dose {body}")
    if what == "not determined":
        return f"at {ref_dose:.0%} dose, {model}: dose equivalence not determined {body}"
    return (f"at {ref_dose:.0%} dose, {model}: no measurable saving {body} (matches FBP at "
            f"{span} dose)")


def _lesions(inserts: Sequence[dict]) -> str:
    d = sorted({i["diameter_mm"] for i in inserts})
    c = sorted({i["contrast_hu"] for i in inserts})
    return f"{d[0]:g}-{d[-1]:g} mm, {c[0]:g}-{c[-1]:g} HU"


def qa_verdict(results: dict, names: list, doses: list, truth: dict, model: str = "CNCL",
               ref_dose: float = 0.25) -> Optional[dict]:
    """The verdict of one phantom size: for every low-contrast insert ("all") and for CCT189's
    four ("mita"), the FBP-equivalent dose of the model's mean LG-CHO d' at ``ref_dose`` with
    its interval (:func:`equivalence_interval`), the verdict and the summary line. ``results``:
    {series: {method: ctqa.qa_measure(...)}} with methods "ldct" (FBP) and "cncl"."""
    if ref_dose not in doses or len(doses) < 2:
        return None
    ref = names[doses.index(ref_dose)]
    low = [i for i in truth["inserts"] if i["kind"] == "low-contrast"]
    sets = {"all": low, "mita": [i for i in low if i.get("mita")]}
    out = {}
    for key, inserts in sets.items():
        if not inserts:
            continue
        ids = [i["name"] for i in inserts]
        eq = equivalence_interval(doses, [mean_boot(results[n]["ldct"]["cho_boot"], ids)
                                          for n in names],
                                  mean_boot(results[ref]["cncl"]["cho_boot"], ids))
        lesions = _lesions(inserts) if key == "all" else "CCT189's four (" + ", ".join(
            f"{i['diameter_mm']:g} mm/{i['contrast_hu']:g} HU" for i in inserts) + ")"
        out[key] = {**eq, "inserts": ids, "verdict": verdict(eq, ref_dose),
                    "summary": summary_line(model, eq, ref_dose, lesions,
                                            truth["body"]["diameter_mm"], max(doses))}
    return out


def verdict_tables(report: dict) -> str:
    """Markdown: LG-CHO d' and AUC with intervals per insert, dose and method, the CT-number
    error per insert, the dose equivalence with its interval and the summary lines."""
    names = list(report["per_dose"])
    doses = dict(zip(names, report["doses"]))
    methods = [m for m in ("ldct", "cncl") if m in report["per_dose"][names[0]]]
    inserts = list(report["per_dose"][names[0]]["ldct"]["detect"])
    lines = ["", "LG-CHO d' [95 % CI] / AUC [95 % CI] per insert (5 Laguerre-Gauss channels, "
             "width 2/3 of the insert diameter; bootstrap over realisations, 50/50 "
             "train/test):", "",
             "| insert | " + " | ".join(f"{m} {doses[n]:.0%}" for n in names for m in methods)
             + " |", "|---|" + "---|" * (len(names) * len(methods))]
    for ins in inserts:
        cells = []
        for n in names:
            for m in methods:
                c = report["per_dose"][n][m]["detect"][ins]["cho"]
                cells.append(f"{c['dprime']:.2f} [{c['dprime_ci'][0]:.2f}, "
                             f"{c['dprime_ci'][1]:.2f}] / {c['auc']:.2f} [{c['auc_ci'][0]:.2f}, "
                             f"{c['auc_ci'][1]:.2f}]")
        lines.append(f"| {ins} | " + " | ".join(cells) + " |")
    lines += ["", "CT-number error per insert (HU; mean over realisations in the central "
              "0.6-radius disc minus the truth):", "",
              "| insert | " + " | ".join(f"{m} {doses[n]:.0%}" for n in names for m in methods)
              + " |", "|---|" + "---|" * (len(names) * len(methods))]
    for ins in inserts:
        lines.append(f"| {ins} | " + " | ".join(
            f"{report['per_dose'][n][m]['detect'][ins]['ct_error_hu']:+.1f}"
            for n in names for m in methods) + " |")
    v = report.get("verdict")
    lines.append("")
    if not v:
        lines.append("Verdict: not computed (the ladder needs the 25 % dose and another).")
        return "\n".join(lines)
    lines += ["Dose equivalence (LG-CHO, mean d' over the inserts; median and 95 % bootstrap "
              "interval):", ""]
    for key, e in v.items():
        lines.append(f"- {key}: {e['summary']} ({e['verdict']}; {e['beyond']} of "
                     f"{e['replicates']} replicates beyond the ladder, {e['below']} below)")
    return "\n".join(lines)

"""Score Mytest.py outputs against the full-dose references: PSNR, SSIM, RMSE, noise texture.

Usage::

    python Myevaluation.py --pred OUT [--data PATH] [--layout ...] [--gaussian-sigma 0.7]
                           [--protocol redcnn|dugan|corediff|skimage|full|all]
    python Myevaluation.py --compare OUT [OUT ...] [--protocol ...]
    python Myevaluation.py --nps-sim FD_PATH --run RUN [--out DIR] [--dose 0.25]
    python Myevaluation.py --qa QA_DIR --run RUN [--out DIR]   # the Mysimulate.py --qa phantom

Reads ``OUT/manifest.csv`` (written by Mytest.py) and, for every slice with a full-dose
reference, scores three methods against it:

* ``ldct``      the low-dose input itself,
* ``gaussian``  a Gaussian-filter baseline of the input (``scipy.ndimage.gaussian_filter``,
                sigma ``--gaussian-sigma`` pixels, reflect borders),
* ``cncl``      the network output (the float32 HU ``pred_npy`` of the manifest, not the PNG).

Metrics come from ``ctmetrics.hu_metrics`` (the project's single metric implementation; Mymodel
imports it for validation) in every protocol of ``ctmetrics.METRIC_PROTOCOLS``; the CT-number
bias per tissue band from ``ctmetrics.hu_bias``. The noise texture (flat-ROI noise std and AAPM
TG-233 NPS, ``cttexture``) is measured on the same ROIs for the three methods and the full dose.
Writes ``OUT/metrics.csv`` (per slice and method), ``OUT/metrics.json`` (overall and per patient:
means, sample std, bootstrap intervals over patients, paired tests on per-patient means, bias,
radial NPS curves) and ``OUT/nps/<patient>_nps.png``; prints one table per ``--protocol``, each
followed by its protocol line (``ctmetrics.protocol_text``).

References come from the manifest's ``fd_path``; with ``--data`` they are re-discovered there
instead (matched by patient and slice id, as Mytest.py names them), e.g. when Mytest.py ran on
low-dose-only data.

``--compare`` reads the ``metrics.json`` of several evaluated folders (no TensorFlow, nothing
recomputed) and prints one row per run, with its training steps and minutes from the run's
``config.json`` / ``history.csv``: the ablation table. The folders must have scored the same
slices, or the rows would not be comparable; a mismatch is an error naming the folder.

``--nps-sim`` measures the noise-only NPS of a run on two simulated low-dose realisations of
each full-dose slice (:func:`nps_sim`). ``--qa`` measures the QA phantom (``ctqa``).

This module is the CLI: the measurements live in ``ctmetrics`` (paired metrics, protocols,
statistics), ``cttexture`` (flat ROIs, NPS) and ``ctqa`` (phantom measures).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

import ctdata
import ctio
import ctmetrics
import ctqa
import ctrun
import cttexture
import ctverdict

METHODS = ("ldct", "gaussian", "cncl")  # scored against the full-dose reference
NOISE_METHODS = (*METHODS, "fd")  # noise texture is measured on the reference too
CSV_FIELDS = ("patient", "slice_id", "method",
              *(f"{m}_{p}" for p in ctmetrics.PROTOCOLS for m in ctmetrics.METRICS),
              *ctmetrics.BIAS_FIELDS, *cttexture.NOISE_FIELDS)
_POSITION_TOL_MM = 0.01


def method_label(method: str, sigma: float) -> str:
    return {"ldct": "LDCT (input)", "gaussian": f"Gaussian filter (sigma {sigma:g})",
            "cncl": "CNCL", "fd": "full dose (reference)"}[method]


# --- Inputs (no TensorFlow) ---------------------------------------------------------------------
def read_manifest(out: Path) -> list[dict]:
    """The rows of OUT/manifest.csv (ctrun.read_manifest), which must list slices."""
    if not out.is_dir():
        raise ctio.CTDataError(f"{out}: no such folder (give the --out folder of Mytest.py)")
    if not (out / ctrun.MANIFEST).is_file():
        raise ctio.CTDataError(f"no {ctrun.MANIFEST} in {out}; run Mytest.py first")
    rows = ctrun.read_manifest(out)
    if not rows:
        raise ctio.CTDataError(f"{out / ctrun.MANIFEST}: lists no slices; run Mytest.py first")
    return rows


def attach_references(rows: list[dict], data: Optional[str], layout: Optional[str]) -> None:
    """Replace each row's ``fd_path`` by the reference found under ``data`` (same patient and
    slice id); rows without one get an empty ``fd_path``."""
    ds = ctdata.discover(data, layout, single_role="fd")
    found = {(r.patient, r.slice_id): r for r in ds.records if r.fd_path}
    if not found:
        raise ctio.CTDataError(f"{data}: no full-dose reference slices found")
    matched = 0
    for row in rows:
        rec = found.get((row["patient"], row["slice_id"]))
        row["fd_path"] = ""
        if rec is None:
            continue
        if Path(rec.fd_path).resolve() == Path(row["ld_path"]).resolve():
            raise ctio.CTDataError(f"{rec.fd_path}: --data gives the low-dose input itself as "
                                   "the reference; point --data at the full-dose data")
        pos = row.get("position", "")
        if ds.layout in ("mayo", "dicom") and pos:
            try:
                if abs(float(pos) - rec.position) > _POSITION_TOL_MM:
                    raise ctio.CTDataError(
                        f"{rec.fd_path}: slice position {rec.position:g} mm does not match "
                        f"{row['patient']}/{row['slice_id']} of the manifest at {pos} mm")
            except ValueError:
                pass
        row["fd_path"] = rec.fd_path
        matched += 1
    if not matched:
        raise ctio.CTDataError(f"{data}: none of its references matches a manifest slice "
                               "(by patient and slice id); is it the dataset Mytest.py ran on?")


def gaussian_baseline(ld_hu: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-filtered LD in HU (scipy.ndimage.gaussian_filter, reflect borders)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(ld_hu, np.float32), sigma=float(sigma), mode="reflect")


# --- Noise texture: flat ROIs and the noise power spectrum (no TensorFlow) ---------------------


# --- Metrics (TensorFlow, imported lazily: `import Myevaluation` stays TF-free) -----------------


def _load_group(rows: list[dict], out: Path, sigma: float):
    """Decode the slices of ``rows`` -> (ld, gaussian, cncl, ref) stacks (B, H, W) in HU and the
    pixel spacings (mm or None) from the input headers."""
    lds, preds, refs, spacings = [], [], [], []
    for row in rows:
        pred_path = out / row["pred_npy"]
        if not pred_path.is_file():
            raise ctio.CTDataError(f"{pred_path}: prediction listed in the manifest is missing; "
                                   "rerun Mytest.py")
        try:
            pred = np.load(pred_path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError, EOFError) as e:
            raise ctio.CTDataError(f"{pred_path}: unreadable prediction ({e})") from None
        ld, header = ctio.read_slice(row["ld_path"])
        ref = ctio.read_slice(row["fd_path"])[0]
        if not (pred.shape == ld.shape == ref.shape):
            raise ctio.CTDataError(f"{pred_path}: shape {pred.shape} differs from the input "
                                   f"{ld.shape} or the reference {row['fd_path']} {ref.shape}")
        lds.append(ld)
        preds.append(pred)
        refs.append(ref)
        spacings.append(cttexture.pixel_spacing_mm(header))
    ld = np.stack(lds)
    gauss = np.stack([gaussian_baseline(x, sigma) for x in lds])
    return ld, gauss, np.stack(preds), np.stack(refs), spacings


def _pred_shape(path: Path) -> tuple:
    """Shape of a prediction from its .npy header (no pixels read)."""
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except FileNotFoundError:
        raise ctio.CTDataError(f"{path}: prediction listed in the manifest is missing; rerun "
                               "Mytest.py") from None
    except (OSError, ValueError, EOFError) as e:
        raise ctio.CTDataError(f"{path}: unreadable prediction ({e})") from None


def _score_group(group: list[dict], out: Path, sigma: float,
                 noise: cttexture.NoiseAccumulator) -> list[dict]:
    """Result rows (metrics and noise figures) of one batch of same-size slices."""
    ld, gauss, pred, ref, spacings = _load_group(group, out, sigma)
    n = len(group)
    scores = ctmetrics.slice_metrics(np.concatenate([ld, gauss, pred]), np.concatenate([ref] * 3))
    results = []
    for i, row in enumerate(group):
        images = {"ldct": ld[i], "gaussian": gauss[i], "cncl": pred[i], "fd": ref[i]}
        figures, powers, n_rois = cttexture.slice_noise(images, ref[i], spacings[i])
        for method, power in powers.items():
            noise.add(row["patient"], method, power, n_rois, spacings[i])
        for k, method in enumerate(NOISE_METHODS):
            res = {"patient": row["patient"], "slice_id": row["slice_id"], "method": method,
                   **figures[method]}
            for r in ctmetrics.PROTOCOLS:
                for m in ctmetrics.METRICS:
                    res[f"{m}_{r}"] = float(scores[r][m][k * n + i]) if k < 3 else None
            res.update(ctmetrics.hu_bias(images[method], ref[i]) if k < 3
                       else dict.fromkeys(ctmetrics.BIAS_FIELDS))
            results.append(res)
    return results


def evaluate(rows: list[dict], out: Path, sigma: float, batch: int = 8,
             noise: Optional[cttexture.NoiseAccumulator] = None) -> list[dict]:
    """Score every row (all must have ``fd_path``); batches group consecutive same-size slices,
    so memory holds one batch. Prints progress and slices/s.

    Returns one dict per slice and method (``NOISE_METHODS``; the ``fd`` rows carry only the
    noise figures): patient, slice_id, method, psnr_redcnn, ..., n_rois, noise_std, ...
    """
    import time

    import ctdose

    noise = cttexture.NoiseAccumulator(NOISE_METHODS) if noise is None else noise
    results: list[dict] = []
    group: list[dict] = []
    shape = None
    progress = ctdose.Progress(len(rows), "scoring")
    start, done = time.time(), 0

    def flush() -> None:
        nonlocal done
        if group:
            results.extend(_score_group(group, out, sigma, noise))
            done += len(group)
            progress.update(done)
            group.clear()

    for row in rows:
        size = _pred_shape(out / row["pred_npy"])
        if group and (size != shape or len(group) >= batch):
            flush()
        shape = size
        group.append(row)
    flush()
    print(f"scored {done} slices in {time.time() - start:.1f} s "
          f"({done / max(time.time() - start, 1e-9):.2f} slices/s)")
    order = {m: i for i, m in enumerate(NOISE_METHODS)}
    results.sort(key=lambda d: order[d["method"]])  # stable: methods, then manifest order
    return results


# --- Statistics ---------------------------------------------------------------------------------


def summarize(results: list[dict]) -> dict:
    """{method: {protocol: {metric: stats}, "bias": {band: stats}, "noise": {field: stats}}}
    over ``results``."""
    out = {}
    for method in NOISE_METHODS:
        sel = [d for d in results if d["method"] == method]
        pats = [d["patient"] for d in sel]
        out[method] = {"noise": {f: ctmetrics.metric_stats([d[f] for d in sel], pats)
                                 for f in cttexture.NOISE_FIELDS[1:]}}
        if method in METHODS:
            stats = ctmetrics.metric_stats
            out[method].update({r: {m: stats([d[f"{m}_{r}"] for d in sel], pats)
                                    for m in ctmetrics.METRICS} for r in ctmetrics.PROTOCOLS})
            out[method]["bias"] = {f[5:]: stats([d[f] for d in sel], pats)
                                   for f in ctmetrics.BIAS_FIELDS}
    return out


# --- Tables -------------------------------------------------------------------------------------
def _ci(stats: dict, digits: int) -> str:
    """``mean [low, high]`` (the bootstrap interval) or ``mean`` alone."""
    if stats is None or stats.get("mean") is None:
        return "inf" if stats and stats.get("n") else ""
    text = f"{stats['mean']:.{digits}f}"
    ci = stats.get("ci95")
    if ci and None not in ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _interval_note(report: dict) -> str:
    return ctmetrics.interval_note(report["n_slices"], report["n_patients"])


def _rmse_unit(protocol: str) -> tuple[str, int]:
    """RMSE column unit and digits: HU, or the scored image's units (DU-GAN's [0, 1])."""
    p = ctmetrics.METRIC_PROTOCOLS[protocol]
    return ("HU", 2) if p.rmse_hu else (f"[0, {p.scale:g}]", 4)


def markdown_table(overall: dict, sigma: float, protocol: str = ctmetrics.DEFAULT_PROTOCOL) -> str:
    """Metric table of one protocol, with intervals, followed by the protocol line."""
    unit, digits = _rmse_unit(protocol)
    lines = [f"| method | PSNR (dB) | SSIM | RMSE ({unit}) |", "|---|---|---|---|"]
    for method in METHODS:
        s = overall[method][protocol]
        lines.append(f"| {method_label(method, sigma)} | {_ci(s['psnr'], 2)} | "
                     f"{_ci(s['ssim'], 4)} | {_ci(s['rmse'], digits)} |")
    return "\n".join([*lines, "", ctmetrics.protocol_text(protocol)])


def paired_table(tests: dict, protocol: str) -> str:
    """CNCL minus LDCT / Gaussian: mean difference [interval] and Wilcoxon p, per metric."""
    unit, rmse_digits = _rmse_unit(protocol)
    lines = [f"| paired | Δ PSNR (dB) | p | Δ SSIM | p | Δ RMSE ({unit}) | p |",
             "|---|---|---|---|---|---|---|"]
    for a, b in ctmetrics.PAIRED:
        cells = []
        for m, digits in (("psnr", 2), ("ssim", 4), ("rmse", rmse_digits)):
            t = tests[f"{a}-{b}"][protocol][m]
            cells += [_ci({"mean": t["mean_diff"], "ci95": t["ci95"], "n": t["n"]}, digits),
                      "–" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.2g}"]
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", ctmetrics.PAIRED_TEXT + "; Δ = first minus second method, "
                      "mean over slices [bootstrap interval over patients]"])


def bias_table(overall: dict, sigma: float) -> str:
    """CT-number accuracy: mean error (HU) per method, overall and per tissue band."""
    bands = ("all", *ctmetrics.HU_BANDS)
    lines = ["| method | " + " | ".join(f"bias {b} (HU)" for b in bands) + " |",
             "|---|" + "---|" * len(bands)]
    for method in METHODS:
        s = overall[method]["bias"]
        lines.append(f"| {method_label(method, sigma)} | "
                     + " | ".join(_ci(s[b], 2) for b in bands) + " |")
    return "\n".join([*lines, "", ctmetrics.BIAS_TEXT])


def noise_table(overall: dict, sigma: float, unit: str) -> str:
    """Noise texture on the flat soft-tissue ROIs, with ratios to full dose."""
    fd = overall["fd"]["noise"]
    lines = [f"| method | ROI noise std (HU) | ratio to FD | NPS peak ({unit}) | "
             f"NPS mean freq ({unit}) | ratio to FD |", "|---|---|---|---|---|---|"]

    def ratio(s, key):
        a, b = s[key]["mean"], fd[key]["mean"]
        return f"{a / b:.2f}" if a is not None and b else ""

    for method in NOISE_METHODS:
        s = overall[method]["noise"]
        lines.append(f"| {method_label(method, sigma)} | {_ci(s['noise_std'], 1)} | "
                     f"{ratio(s, 'noise_std')} | {_ci(s['nps_peak'], 3)} | "
                     f"{_ci(s['nps_mean_freq'], 3)} | {ratio(s, 'nps_mean_freq')} |")
    return "\n".join([*lines, "", cttexture.NOISE_PROTOCOL])


def write_outputs(out: Path, results: list[dict], report: dict) -> None:
    with ctio.atomic_path(out / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for d in results:
                w.writerow({k: (f"{d[k]:.6f}" if isinstance(d[k], float) else d[k])
                            for k in CSV_FIELDS})
    with ctio.atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


# --- Comparing evaluated runs (no TensorFlow) ----------------------------------------------------
def _read_report(out: Path) -> dict:
    path = out / "metrics.json"
    report = ctio.read_json(path, f"no metrics.json in {out}; run Myevaluation.py --pred {out} "
                            "first")
    try:
        report["overall"]["cncl"][ctmetrics.DEFAULT_PROTOCOL]["psnr"]["mean"]  # noqa: B018
    except (KeyError, TypeError) as e:
        raise ctio.CTDataError(f"{path}: not a Myevaluation.py report ({e})") from None
    return report


def _scored_slices(out: Path) -> list[tuple[str, str]]:
    """The (patient, slice_id) pairs scored in ``out/metrics.csv``, sorted."""
    try:
        with open(out / "metrics.csv", newline="") as f:
            return sorted({(r["patient"], r["slice_id"]) for r in csv.DictReader(f)})
    except (OSError, KeyError, csv.Error) as e:
        raise ctio.CTDataError(f"{out / 'metrics.csv'}: unreadable ({e})") from None


def compare(outs: list[Path], protocol: str = ctmetrics.DEFAULT_PROTOCOL) -> str:
    """Markdown table: LDCT input once, then the CNCL result of every folder in ``outs`` (a
    folder's ``metrics.json`` may be given for the folder), with bootstrap intervals."""
    outs = [o.parent if o.name == "metrics.json" and o.is_file() else o for o in outs]
    reports = [_read_report(o) for o in outs]
    slices = _scored_slices(outs[0])
    for o in outs[1:]:
        if _scored_slices(o) != slices:
            raise ctio.CTDataError(f"{o}: scored other slices than {outs[0]}; "
                                   "compare runs evaluated on the same slices")
    unit, rmse_digits = _rmse_unit(protocol)
    lines = [f"{len(slices)} slices: " + ", ".join(f"{p}:{s}" for p, s in slices), "",
             f"| run | steps | train min | PSNR (dB) | SSIM | RMSE ({unit}) | gain vs input (dB) "
             "| ROI noise / FD | NPS mean freq. / FD |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = reports[0]["overall"]["ldct"][protocol]
    lines.append(f"| LDCT (input) | | | {_ci(base['psnr'], 2)} | {_ci(base['ssim'], 4)} "
                 f"| {_ci(base['rmse'], rmse_digits)} | | {_texture_ratios(reports[0], 'ldct')} |")
    for o, rep in zip(outs, reports):
        w = rep["overall"]["cncl"][protocol]
        runs, weights = rep.get("runs") or [], rep.get("weights") or []
        tr = ctrun.training_summary(runs[0] if len(runs) == 1 else None,
                                  weights[0] if len(weights) == 1 else None)
        name = Path(runs[0]).name if len(runs) == 1 else str(o)
        if tr:
            name += f" (epoch {tr['epochs']})"
        minutes = f"{tr['minutes']:.1f}" if "minutes" in tr else ""
        gain = rep.get("paired", {}).get("cncl-ldct", {}).get(protocol, {}).get("psnr")
        gain_text = (_ci({"mean": gain["mean_diff"], "ci95": gain["ci95"], "n": gain["n"]}, 2)
                     if gain else f"{w['psnr']['mean'] - base['psnr']['mean']:.2f}")
        lines.append(f"| {name} | {tr.get('steps', '')} | {minutes} | {_ci(w['psnr'], 2)} | "
                     f"{_ci(w['ssim'], 4)} | {_ci(w['rmse'], rmse_digits)} | {gain_text} | "
                     f"{_texture_ratios(rep, 'cncl')} |")
    return "\n".join(lines)


def _texture_ratios(report: dict, method: str) -> str:
    """``noise std / FD | NPS mean frequency / FD`` cells of ``method`` (blank without ROIs)."""
    overall = report["overall"]
    cells = []
    for key in ("noise_std", "nps_mean_freq"):
        try:
            value = overall[method]["noise"][key]["mean"] / overall["fd"]["noise"][key]["mean"]
        except (KeyError, TypeError, ZeroDivisionError):
            cells.append("")
            continue
        cells.append(f"{value:.2f}")
    return " | ".join(cells)


def zoom_figure(outs: list[Path], patient: str, slice_id: str, box: tuple[int, int, int, int],
                window=ctio.EVAL_WINDOW, scale: int = 3) -> np.ndarray:
    """LDCT | each folder's CNCL output | FD, cropped to ``box`` = (y0, y1, x0, x1) and enlarged
    ``scale`` times (nearest neighbour: pixels stay pixels), as one labelled uint8 image.

    Folders are Mytest.py outputs of the same slice; the label of each is its run's name."""
    import cv2

    def crop(hu: np.ndarray) -> np.ndarray:
        y0, y1, x0, x1 = box
        part = ctio.window_to_uint8(hu[y0:y1, x0:x1], window)
        return cv2.resize(part, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)

    panels = []
    for k, out in enumerate(outs):
        rows = {(r["patient"], r["slice_id"]): r for r in read_manifest(out)}
        row = rows.get((patient, slice_id))
        if row is None:
            raise ctio.CTDataError(f"{out}: no slice {patient}:{slice_id} in its manifest")
        if k == 0:
            panels.append((crop(ctio.read_slice(row["ld_path"])[0]), "LDCT"))
        label = Path(row.get("run") or out).name
        panels.append((crop(np.load(out / row["pred_npy"])), label))
        if k == len(outs) - 1:
            panels.append((crop(ctio.read_slice(row["fd_path"])[0]), "full dose"))
    tiles = []
    for gray, text in panels:
        rgb = np.repeat(gray[..., None], 3, axis=2)
        ctio.label_panel(rgb, text)
        tiles += [rgb, np.full((rgb.shape[0], 3, 3), 128, np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


# --- Noise-only NPS with the simulator (--nps-sim) ----------------------------------------------


def check_out_dir(out: Path, inputs: list[Path], flag: str = "--out") -> Path:
    """The resolved output folder ``out``, refused (CTDataError) when it is a file, lies inside
    one of ``inputs`` (outputs never go into input data) or cannot be created / written
    (``ctrun.check_writable``: a probe folder made and removed, no other trace)."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ctio.CTDataError(f"{flag} {out}: exists and is not a folder")
    for src in map(Path, inputs):
        if ctrun.inside(out, src):
            raise ctio.CTDataError(f"{flag} {out} is inside the input {src.resolve()}; outputs "
                                   "are never written into the input data")
    ctrun.check_writable(flag, out)
    return out


def nps_sim(fd_path: str, run: Optional[str], out: Optional[str], *, layout: Optional[str] = None,
            dose: float = 0.25, seed: int = 0, max_slices: Optional[int] = None,
            batch: int = 4, weights: Optional[str] = None) -> dict:
    """Noise-only NPS: per full-dose slice two independent simulated low-dose realisations
    (ctdose.simulate_pair_from_fd, seeds (seed, slice, 1) and (seed, slice, 2)), both
    denoised by the run's generator (Mytest's loader and Denoiser; ``weights`` default RUN's
    generator_best); the NPS of (D(LD1) - D(LD2)) / sqrt(2) over body ROIs (the largest of
    ``cttexture.NPS_SIM_ROI_SIZES`` that fits the first slice), beside (LD1 - LD2) / sqrt(2)
    for the input.

    Everything is checked before any work. Writes OUT/nps_sim.json and OUT/nps_sim.png (OUT
    defaults to RUN/nps_sim); returns the report."""
    import time

    import ctdose
    import Mytest

    ds = ctdata.discover(fd_path, layout, single_role="fd")
    records = [r for r in ds.records if r.fd_path][:max_slices]
    if not records:
        raise ctio.CTDataError(f"{fd_path}: no full-dose slices found")
    run_dir, model, weights = Mytest.resolve_run(run, weights)
    out_dir = check_out_dir(Path(out) if out else run_dir / "nps_sim", [Path(fd_path)])
    denoise = Mytest.Denoiser(Mytest.load_generator(model, weights), int(model["depth"]), batch)
    acc = cttexture.NoiseAccumulator(("ldct", "cncl"))
    progress = ctdose.Progress(len(records), "nps-sim")
    start, size = time.time(), None
    for i, rec in enumerate(records):
        fd, header = ctio.read_slice(rec.fd_path)
        px = ctdose.pixel_size_mm(header, fd.shape, None)
        lds = [ctdose.simulate_pair_from_fd(fd, dose, px, (seed, i, k)) for k in (1, 2)]
        dens = denoise(lds)
        size = size or cttexture.noise_roi_size(fd)
        corners = cttexture.noise_rois(fd, size)
        if corners:
            spacing = cttexture.pixel_spacing_mm(header)
            for method, (a, b) in (("ldct", lds), ("cncl", dens)):
                acc.add("all", method, cttexture.noise_only_power(a, b, corners, size),
                        len(corners), spacing)
        progress.update(i + 1)
    elapsed = time.time() - start
    print(f"nps-sim: {len(records)} slices in {elapsed:.1f} s "
          f"({len(records) / max(elapsed, 1e-9):.2f} slices/s)")
    if not acc.count:
        raise ctio.CTDataError(f"{fd_path}: no {size}x{size} ROI fits inside the body")
    curves = acc.curves("all")
    curves["noise_transfer"] = noise_transfer(curves["ldct"]["radial"], curves["cncl"]["radial"])
    report = {"fd_path": str(Path(fd_path).resolve()), "run": str(run_dir.resolve()),
              "weights": str(weights), "dose": dose, "seed": seed, "n_slices": len(records),
              "roi_size": size, "definition": nps_sim_protocol(size), **curves}
    out_dir.mkdir(parents=True, exist_ok=True)
    with ctio.atomic_path(out_dir / "nps_sim.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    cttexture.plot_radial_nps(out_dir / "nps_sim.png", curves, f"noise-only NPS, dose {dose:g}",
                    {m: method_label(m, 0.0) for m in ("ldct", "cncl")})
    return report


def noise_transfer(nps_in: list, nps_out: list) -> list:
    """sqrt(NPS_out / NPS_in) per ring of the radial NPS: the share of the input noise's
    amplitude the denoiser passes at each frequency (1: passed unchanged; a flat curve keeps the
    noise texture, a falling one coarsens it). None where the input has no power (DC)."""
    return [math.sqrt(o / i) if i > 0 else None for i, o in zip(nps_in, nps_out)]


def nps_sim_protocol(size: int) -> str:
    return ("noise-only NPS: two independent simulated low-dose realisations per full-dose "
            "slice; noise = (X1 - X2) / sqrt(2) for the input (ldct) and for the denoised pair "
            f"(cncl); {size}x{size} ROIs (the largest of "
            f"{', '.join(map(str, cttexture.NPS_SIM_ROI_SIZES))} with >= "
            f"{cttexture.NPS_SIM_MIN_ROIS} ROIs; 50 % overlap) wholly inside the body (FD > "
            f"-500 HU, eroded); {cttexture.TG233_TEXT}")


def nps_sim_table(report: dict) -> str:
    unit = report["unit"]
    lines = [f"| noise of | std (HU) | NPS peak ({unit}) | NPS mean freq ({unit}) | ROIs |",
             "|---|---|---|---|---|"]
    for method, label in (("ldct", "LDCT (simulated input)"), ("cncl", "CNCL output")):
        s = report[method]
        lines.append(f"| {label} | {s['noise_std']:.2f} | {s['nps_peak']:.3f} | "
                     f"{s['nps_mean_freq']:.3f} | {s['n_rois']} |")
    freq, passed = report["freq"], report["noise_transfer"]
    picks = [round(q * (len(freq) - 1)) for q in (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)]
    transfer = ", ".join(f"{freq[i]:.2f}: {passed[i]:.2f}" for i in picks if passed[i] is not None)
    return "\n".join([*lines, "", f"noise passed, sqrt(NPS out / NPS in), at {unit}: {transfer}",
                      "", report["definition"]])


# --- Image-quality QA phantom (--qa) ------------------------------------------------------------
# Measurements on the phantom of Mysimulate.py --qa (see README "Image quality beyond PSNR"):
# task transfer function (TTF) from the radial edge of circular inserts, contrast-to-noise ratio,
# a non-prewhitening matched-filter (NPW) observer's d' and AUC, the NPS, all against dose.


def qa_evaluate(qa_dir, run: Optional[str], out: Optional[str], *, batch: int = 4,
                sigma: float = 0.7, weights: Optional[str] = None) -> dict:
    """Myevaluation.py --qa: denoise every realisation of the QA folder with the run's
    generator (Mytest's loader and Denoiser), measure TTF, CNR, d' / AUC and NPS per dose and
    method, write OUT/qa.json, OUT/qa.md and PNG plots (OUT default RUN/qa/<QA_DIR name>);
    returns the report. One piece: it reads, denoises and measures dose by dose, so only one
    dose's realisations are in memory."""
    import time

    import Mytest

    qa_dir = Path(qa_dir)
    truth = ctqa.read_qa_truth(qa_dir)
    run_dir, model, weights = Mytest.resolve_run(run, weights)
    out_dir = Path(out) if out else run_dir / "qa" / qa_dir.name
    denoise = Mytest.Denoiser(Mytest.load_generator(model, weights), int(model["depth"]), batch)
    px = truth["pixel_mm"]
    start = time.time()
    fd = ctqa.read_qa_series(qa_dir, truth, "full")
    mask = ctqa.qa_uniform_mask(truth, fd[0])
    fd_ttf = {ins["name"]: ctqa.qa_ttf(fd[0], ins, px) for ins in ctqa.ttf_inserts(truth)}
    results: dict = {}
    n_images = 0
    ref = min(truth["doses"], key=lambda d: abs(d - ctqa.QA_REFERENCE_DOSE))
    examples = {"fd": fd[0]}
    for dose in truth["doses"]:
        name = ctqa.series_of(truth, dose)
        ld = ctqa.read_qa_series(qa_dir, truth, name)
        cncl = np.stack([y for i in range(0, len(ld), batch)
                         for y in denoise(list(ld[i:i + batch]))])
        methods = {"ldct": ld, "gaussian": np.stack([gaussian_baseline(x, sigma) for x in ld]),
                   "cncl": cncl}
        results[name] = {m: ctqa.qa_measure(imgs, truth, mask) for m, imgs in methods.items()}
        if dose == ref:
            examples.update({m: imgs[0] for m, imgs in methods.items()})
        n_images += len(ld)
        print(f"qa: dose {dose:g}: {len(ld)} realisations measured "
              f"({time.time() - start:.0f} s)", flush=True)
    elapsed = time.time() - start
    doses = list(truth["doses"])
    names = [ctqa.series_of(truth, d) for d in doses]
    equivalence = None
    if ctqa.QA_REFERENCE_DOSE in doses and len(doses) > 1:
        target = results[ctqa.series_of(truth, ctqa.QA_REFERENCE_DOSE)]["cncl"]["mean_dprime"]
        dose, note = ctqa.dose_equivalent(doses, [results[n]["ldct"]["mean_dprime"] for n in names],
                                     target)
        equivalence = {"cncl_dose": ctqa.QA_REFERENCE_DOSE, "cncl_mean_dprime": target,
                       "fbp_equivalent_dose": dose, "note": note,
                       **ctqa.per_insert_equivalence(results, names, doses)}
    report = {
        "qa_dir": str(qa_dir.resolve()), "run": str(run_dir.resolve()),
        "weights": str(weights), "gaussian_sigma": sigma, "protocol": ctqa.QA_PROTOCOL,
        "pixel_mm": px, "doses": doses, "realisations": truth.get("realisations"),
        "full_dose": truth.get("full_dose"), "seconds": round(elapsed, 1),
        "images_per_s": round(n_images / max(elapsed, 1e-9), 3),
        "full_dose_ttf": {k: ctqa.json_ttf(v) for k, v in fd_ttf.items()},
        "full_dose_structure": float(np.std(fd[0][mask])),
        "dose_equivalence": equivalence,
        "body_diameter_mm": truth["body"]["diameter_mm"],
        "noise_hu": truth.get("noise_hu"),
        "verdict": ctverdict.qa_verdict(results, names, doses, truth),
        "per_dose": {n: {m: {"noise": r["noise"], "mean_dprime": r["mean_dprime"],
                             "mean_auc": r["mean_auc"], "detect": r["detect"],
                             "mean_cho_dprime": r["mean_cho_dprime"],
                             "ttf": {k: ctqa.json_ttf(v) for k, v in r["ttf"].items()}}
                         for m, r in results[n].items()} for n in names},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with ctio.atomic_path(out_dir / "qa.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False, default=ctqa.json_num) + "\n")
    text = ctqa.qa_tables(report) + "\n" + ctverdict.verdict_tables(report)
    with ctio.atomic_path(out_dir / "qa.md") as tmp:
        tmp.write_text(text + "\n")
    ctqa.plot_qa(out_dir, report)
    strip = np.concatenate([examples[m] for m in ("fd", "ldct", "cncl")], axis=1)
    ctio.write_png(out_dir / "phantom.png", ctio.window_to_uint8(strip, ctqa.QA_WINDOW))
    report["out"] = str(out_dir)
    report["text"] = text
    return report


def qa_sizes(args: argparse.Namespace, sigma: float) -> int:
    """--qa on one phantom folder, or on every size of a ``Mysimulate.py --qa-diameter A B``
    folder (its qa_sizes.json; reports in OUT/dNNNmm), then the summary line of each size."""
    import ctphantom

    qa = Path(args.qa)
    sizes = qa / ctphantom.QA_SIZES_FILE
    folders = ([qa / k for k in ctio.read_json(sizes, f"{sizes}: unreadable")["sizes"]]
               if sizes.is_file() else [qa])
    for folder in folders:  # every folder checked before the first is denoised
        ctqa.read_qa_truth(folder)
    if args.out:
        ctrun.refuse_overlap("--out", args.out, [qa])
    summaries = []
    for folder in folders:
        out = (Path(args.out) / folder.name if args.out and folder != qa else args.out)
        report = qa_evaluate(folder, args.run, out, batch=min(args.batch, 4), sigma=sigma,
                             weights=args.weights)
        print(report["text"])
        print(f"QA report: {report['out']}/qa.md, qa.json, ttf.png, dprime.png, nps.png, "
              "phantom.png")
        summaries += [e["summary"] for e in (report["verdict"] or {}).values()]
    print("\nSummary:" if summaries else "")
    for line in summaries:
        print(f"  {line}")
    return 0


# --- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description="PSNR / SSIM / RMSE and noise texture (NPS) of the LDCT input, a "
        "Gaussian-filter baseline and the CNCL output of Mytest.py against the full-dose "
        "references; or the noise-only NPS of a run on simulated pairs (--nps-sim).",
        formatter_class=ctio.HelpFormatter)
    ap.add_argument("--pred", default=None, metavar="OUT",
                    help="output folder of Mytest.py (has manifest.csv)")
    ap.add_argument("--compare", nargs="+", default=None, metavar="OUT",
                    help="instead of scoring: one table row per already evaluated folder "
                    "(their metrics.json), e.g. an ablation")
    ap.add_argument("--figure", default=None, metavar="PNG",
                    help="with --compare: also write a side-by-side crop of one slice (LDCT, "
                    "each folder's output, full dose), see --zoom")
    ap.add_argument("--zoom", default=None, metavar="PATIENT:SLICE:Y0:Y1:X0:X1",
                    help="--figure's slice and pixel box, e.g. L506:160:200:328:150:278")
    ap.add_argument("--nps-sim", default=None, metavar="FD_PATH",
                    help="full-dose data: noise-only NPS of --run on two simulated low-dose "
                    "realisations per slice")
    ap.add_argument("--qa", default=None, metavar="QA_DIR",
                    help="image-quality QA phantom of Mysimulate.py --qa: TTF / MTF50, CNR, "
                    "NPW and LG-CHO d' and AUC with intervals, CT-number error, NPS against "
                    "dose for the input, the Gaussian baseline and --run's CNCL, and the dose "
                    "equivalence verdict (writes qa.json, qa.md, PNGs to --out, default "
                    "RUN/qa/<QA_DIR name>; a folder of several sizes: every size, reports in "
                    "OUT/dNNNmm)")
    ap.add_argument("--protocol", choices=(*ctmetrics.PROTOCOLS, "all"),
                    default=ctmetrics.DEFAULT_PROTOCOL,
                    help="metric convention of the printed tables (all are always stored)")
    ap.add_argument("--data", default=None, metavar="PATH",
                    help="dataset folder to take the full-dose references from instead of the "
                    "manifest's fd_path (default: the manifest's references)")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="layout of --data / --nps-sim (default: auto-detected)")
    ap.add_argument("--gaussian-sigma", type=float, default=0.7, metavar="SIGMA",
                    help="sigma (pixels) of the Gaussian-filter baseline")
    ap.add_argument("--batch", type=int, default=8, metavar="N", help="slices per metric batch")
    ap.add_argument("--run", default=None, metavar="RUN",
                    help="--nps-sim, --qa: training run folder (default: the latest under "
                    "runs/)")
    ap.add_argument("--weights", default=None, metavar="FILE",
                    help="--nps-sim, --qa: generator weights (default: RUN's generator_best, "
                    "else generator_latest)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="--nps-sim: output folder, not inside FD_PATH (default: "
                    "RUN/nps_sim); --qa: (default "
                    "RUN/qa/<QA_DIR name>, never inside QA_DIR)")
    ap.add_argument("--dose", type=float, default=0.25, help="--nps-sim: simulated dose fraction")
    ap.add_argument("--seed", type=int, default=0, help="--nps-sim: noise seed (>= 0)")
    ap.add_argument("--max-slices", type=int, default=None, metavar="N",
                    help="--nps-sim: use the first N slices only (default: all)")
    return ap


def _print_tables(report: dict, protocol: str) -> None:
    sigma = report["gaussian_sigma"]
    for name in ctmetrics.PROTOCOLS if protocol == "all" else (protocol,):
        print(markdown_table(report["overall"], sigma, name))
        print()
        print(paired_table(report["paired"], name))
        print()
    print(bias_table(report["overall"], sigma))
    print()
    print(noise_table(report["overall"], sigma, report["noise"]["unit"]))
    print()
    print(_interval_note(report))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.pred, args.compare, args.nps_sim, args.qa)) != 1:
        parser.error("give exactly one of --pred OUT, --compare OUT [OUT ...], --nps-sim FD "
                     "or --qa QA_DIR")
    if args.batch < 1:
        raise ctio.CTDataError(f"--batch {args.batch}: need at least 1")
    if args.compare:
        zoom = check_zoom_figure(args)  # before any table is printed
        for name in ctmetrics.PROTOCOLS if args.protocol == "all" else (args.protocol,):
            print(compare([Path(o) for o in args.compare], name))
            print()
            print(ctmetrics.protocol_text(name))
        if zoom:
            ctio.write_png(args.figure, zoom_figure([Path(o) for o in args.compare], *zoom))
            print(f"figure: {args.figure}")
        return 0
    if args.figure or args.zoom:
        raise ctio.CTDataError("--figure / --zoom go with --compare OUT [OUT ...]")
    if args.nps_sim:
        if not (math.isfinite(args.dose) and 0 < args.dose <= 1):
            raise ctio.CTDataError(f"--dose {args.dose:g}: need 0 < dose <= 1")
        if args.max_slices is not None and args.max_slices < 1:
            raise ctio.CTDataError(f"--max-slices {args.max_slices}: need at least 1")
        if args.seed < 0:
            raise ctio.CTDataError(f"--seed {args.seed}: need a non-negative integer")
        report = nps_sim(args.nps_sim, args.run, args.out, layout=args.layout, dose=args.dose,
                         seed=args.seed, max_slices=args.max_slices, batch=args.batch,
                         weights=args.weights)
        print(nps_sim_table(report))
        return 0
    if args.qa:
        sigma = float(args.gaussian_sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ctio.CTDataError(f"--gaussian-sigma {sigma:g}: need a positive number")
        return qa_sizes(args, sigma)
    return score(args)


def check_zoom_figure(args: argparse.Namespace) -> Optional[tuple]:
    """--compare's --figure PNG --zoom PATIENT:SLICE:Y0:Y1:X0:X1, checked before any work:
    (patient, slice_id, box) or None without --figure. The PNG must not be a folder and its
    folder must be writable; the slice must be in every folder's manifest and the box inside
    its image."""
    if args.figure is None:
        if args.zoom is not None:
            raise ctio.CTDataError("--zoom needs --figure PNG")
        return None
    figure = Path(args.figure)
    if figure.is_dir():
        raise ctio.CTDataError(f"--figure {figure}: is a folder; give a PNG file name")
    check_out_dir(figure.resolve().parent, [], "--figure")
    if args.zoom is None:
        raise ctio.CTDataError("--figure needs --zoom PATIENT:SLICE:Y0:Y1:X0:X1")
    parts = args.zoom.split(":")
    try:
        patient, slice_id, box = parts[0], parts[1], tuple(int(v) for v in parts[2:])
        if len(box) != 4 or not (0 <= box[0] < box[1] and 0 <= box[2] < box[3]):
            raise ValueError
    except (ValueError, IndexError):
        raise ctio.CTDataError(f"--zoom {args.zoom!r}: want PATIENT:SLICE:Y0:Y1:X0:X1 with "
                               "0 <= Y0 < Y1 and 0 <= X0 < X1") from None
    for out in map(Path, args.compare):
        rows = {(r["patient"], r["slice_id"]): r for r in read_manifest(out)}
        row = rows.get((patient, slice_id))
        if row is None:
            raise ctio.CTDataError(f"{out}: no slice {patient}:{slice_id} in its manifest")
        h, w = _pred_shape(out / row["pred_npy"])
        if box[1] > h or box[3] > w:
            raise ctio.CTDataError(f"--zoom {args.zoom}: the box {box[0]}:{box[1]} x "
                                   f"{box[2]}:{box[3]} leaves the {h}x{w} image of "
                                   f"{patient}:{slice_id}")
    return patient, slice_id, box


def score(args: argparse.Namespace) -> int:
    """--pred: score a Mytest.py output folder, write metrics and plots, print the tables."""
    data, layout = args.data, args.layout
    sigma = float(args.gaussian_sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ctio.CTDataError(f"--gaussian-sigma {sigma:g}: need a positive number")
    out = Path(args.pred)
    rows = read_manifest(out)
    if data is not None:
        attach_references(rows, data, layout)
    scored = [r for r in rows if r.get("fd_path")]
    if not scored:
        hint = ("the references under --data do not match" if data else
                "the data is low-dose only; pass --data with the full-dose references")
        raise ctio.CTDataError(f"{out / 'manifest.csv'}: no slice has a full-dose reference "
                               f"({hint})")
    noise = cttexture.NoiseAccumulator(NOISE_METHODS)
    results = evaluate(scored, out, sigma, args.batch, noise)

    patients = sorted({r["patient"] for r in scored})
    curves = {p: noise.curves(p) for p in patients}
    units = {c["unit"] for c in curves.values()}
    report = {
        "protocol": ctmetrics.PROTOCOL,
        "protocols": {n: ctmetrics.protocol_text(n) for n in ctmetrics.PROTOCOLS},
        "noise_protocol": cttexture.NOISE_PROTOCOL,
        "gaussian_sigma": sigma,
        "gaussian_filter": "scipy.ndimage.gaussian_filter(mode='reflect', truncate=4.0) of LD HU",
        "std": "sample standard deviation over slices (ddof=1)",
        "ci95": f"percentile bootstrap (seed {ctmetrics.BOOTSTRAP_SEED}): "
                + ctmetrics.interval_note(len(scored), len(patients)),
        "paired_test": ctmetrics.PAIRED_TEXT,
        "bias_protocol": ctmetrics.BIAS_TEXT,
        "n_slices": len(scored),
        "n_patients": len(patients),
        "n_without_reference": len(rows) - len(scored),
        "runs": sorted({r.get("run", "") for r in scored if r.get("run")}),
        "weights": sorted({r.get("weights", "") for r in scored if r.get("weights")}),
        "references": str(Path(data).resolve()) if data else "manifest fd_path",
        "overall": summarize(results),
        "paired": ctmetrics.paired_tests(results),
        "noise": {"unit": units.pop() if len(units) == 1 else "mixed (see per patient)",
                  "per_patient": curves},
        "per_patient": {
            p: {"n_slices": sum(r["patient"] == p for r in scored),
                **summarize([d for d in results if d["patient"] == p])}
            for p in patients},
    }
    write_outputs(out, results, report)
    for p in patients:
        if any(m in curves[p] for m in NOISE_METHODS):
            cttexture.plot_radial_nps(out / "nps" / f"{p}_nps.png", curves[p], f"radial NPS, {p}",
                            {m: method_label(m, sigma) for m in NOISE_METHODS})

    _print_tables(report, args.protocol)
    if report["n_without_reference"]:
        print(f"{report['n_without_reference']} slice(s) without reference not scored")
    print(f"Gaussian baseline: sigma {sigma:g} px (scipy.ndimage.gaussian_filter, reflect)")
    print(f"metrics: {out / 'metrics.csv'}, {out / 'metrics.json'}; NPS plots: {out / 'nps'}")
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

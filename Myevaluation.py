"""Score Mytest.py outputs against the full-dose references: PSNR, SSIM and RMSE.

Usage::

    python Myevaluation.py --pred OUT [--data PATH] [--layout ...] [--gaussian-sigma 0.7]
    python Myevaluation.py --compare OUT [OUT ...]


Reads ``OUT/manifest.csv`` (written by Mytest.py) and, for every slice with a full-dose
reference, scores three methods against it:

* ``ldct``      the low-dose input itself,
* ``gaussian``  a Gaussian-filter baseline of the input (``scipy.ndimage.gaussian_filter``,
                sigma ``--gaussian-sigma`` pixels, reflect borders),
* ``cncl``      the network output (the float32 HU ``pred_npy`` of the manifest, not the PNG).

Metrics come from :func:`hu_metrics` (the project's single metric implementation) in the
``ctio.EVAL_WINDOW`` window and over ``ctio.FULL_RANGE``. Writes ``OUT/metrics.csv`` (per slice
and method) and ``OUT/metrics.json`` (per patient and overall mean and sample std), and prints a
markdown table followed by ``ctio.PROTOCOL``.

References come from the manifest's ``fd_path``; with ``--data`` they are re-discovered there
instead (matched by patient and slice id, as Mytest.py names them), e.g. when Mytest.py ran on
low-dose-only data.

``--compare`` reads the ``metrics.json`` of several evaluated folders (no TensorFlow, nothing
recomputed) and prints one row per run, with its training steps and minutes from the run's
``config.json`` / ``history.csv``: the ablation table. The folders must have scored the same
slices, or the rows would not be comparable; a mismatch is an error naming the folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np

import ctio

METHODS = ("ldct", "gaussian", "cncl")
RANGES = {"window": ctio.EVAL_WINDOW, "full": ctio.FULL_RANGE}
METRICS = ("psnr", "ssim", "rmse")
CSV_FIELDS = ("patient", "slice_id", "method",
              *(f"{m}_{r}" for r in RANGES for m in METRICS))
_POSITION_TOL_MM = 0.01


def method_label(method: str, sigma: float) -> str:
    return {"ldct": "LDCT (input)", "gaussian": f"Gaussian filter (sigma {sigma:g})",
            "cncl": "CNCL"}[method]


# --- Inputs (no TensorFlow) ---------------------------------------------------------------------
def read_manifest(out: Path) -> list[dict]:
    path = out / "manifest.csv"
    if not out.is_dir():
        raise ctio.CTDataError(f"{out}: no such folder (give the --out folder of Mytest.py)")
    if not path.is_file():
        raise ctio.CTDataError(f"no manifest.csv in {out}; run Mytest.py first")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            need = {"patient", "slice_id", "ld_path", "fd_path", "pred_npy"}
            missing = need - set(reader.fieldnames or ())
            if missing:
                raise ctio.CTDataError(f"{path}: not a Mytest.py manifest (missing columns "
                                       f"{', '.join(sorted(missing))})")
            rows = [dict(r) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ctio.CTDataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not rows:
        raise ctio.CTDataError(f"{path}: lists no slices; run Mytest.py first")
    return rows


def attach_references(rows: list[dict], data: Optional[str], layout: Optional[str]) -> None:
    """Replace each row's ``fd_path`` by the reference found under ``data`` (same patient and
    slice id); rows without one get an empty ``fd_path``."""
    ds = ctio.discover(data, layout, single_role="fd")
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


# --- Metrics (TensorFlow, imported lazily: `import Myevaluation` stays TF-free) -----------------
def _tf():
    return ctio.import_tensorflow()


def gaussian_taps(size: int = ctio.SSIM_FILTER_SIZE, sigma: float = ctio.SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian of the SSIM window (its outer product is tf.image.ssim's
    and scikit-image's 2-D window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(x, y, data_range: float):
    """Per-image SSIM of ``(B, H, W, 1)`` float32 images in ``[0, data_range]``.

    Wang et al. (2004) with the ``ctio.SSIM_*`` Gaussian window over the valid region and no
    sample-covariance correction -- tf.image.ssim's and scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)`` definition.
    The window is applied as two 1-D convolutions (it is separable), to the four moment maps
    stacked in one batch. The images are centred on ``data_range / 2`` before the second moments
    are taken, which keeps float32 cancellation in ``E[x^2] - E[x]^2`` ~50x below
    tf.image.ssim's. Pure TensorFlow (tf.function / train_step); needs H, W >= the window.
    """
    tf = _tf()
    size = ctio.SSIM_FILTER_SIZE
    taps = tf.constant(gaussian_taps(), tf.float32)
    half = tf.constant(data_range / 2.0, tf.float32)
    x = tf.cast(x, tf.float32) - half
    y = tf.cast(y, tf.float32) - half
    maps = tf.concat([x, y, x * y, tf.square(x) + tf.square(y)], axis=0)
    maps = tf.nn.conv2d(maps, tf.reshape(taps, [size, 1, 1, 1]), 1, "VALID")
    maps = tf.nn.conv2d(maps, tf.reshape(taps, [1, size, 1, 1]), 1, "VALID")
    mx, my, mxy, mss = tf.split(maps, 4, axis=0)
    c1 = (ctio.SSIM_K1 * data_range) ** 2
    c2 = (ctio.SSIM_K2 * data_range) ** 2
    cs = (2.0 * (mxy - mx * my) + c2) / (mss - tf.square(mx) - tf.square(my) + c2)
    mx, my = mx + half, my + half
    luminance = (2.0 * mx * my + c1) / (tf.square(mx) + tf.square(my) + c1)
    return tf.reduce_mean(luminance * cs, axis=[1, 2, 3])


def hu_metrics(pred, ref, window: tuple[float, float] = ctio.EVAL_WINDOW,
               levels: Optional[int] = None) -> dict:
    """Per-image PSNR / SSIM / RMSE in a HU window: the project's one metric implementation.

    1. ``pred`` and ``ref`` are NORMALISED images ``(B, H, W, 1)``, mapped to HU with
       ``ctio.denormalize`` in float32.
    2. Both are clipped to ``window = (low, high)`` (default ``ctio.EVAL_WINDOW``) and shifted
       to ``[0, high - low]``; with ``levels`` (a ``ctio.METRIC_PROTOCOLS`` 8-bit protocol) they
       are also rounded to ``levels`` equal steps.
    3. ``psnr = 10 log10(L^2 / MSE)`` with ``L = high - low`` (tf.image.psnr; inf if equal).
    4. ``ssim``: :func:`ssim` with data range ``L`` (equal to tf.image.ssim and scikit-image).
    5. ``rmse`` in HU of the clipped (and rounded) images.

    Pure TensorFlow; usable inside ``tf.function`` / ``train_step``. Images need H, W >= 11.

    Returns:
        ``{"psnr": (B,), "ssim": (B,), "rmse": (B,)}`` float32 tensors.
    """
    tf = _tf()
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    width = high - low

    def windowed(img):
        hu = ctio.denormalize(tf.cast(img, tf.float32))
        w = tf.clip_by_value(hu, low, high) - low
        if levels:
            step = width / float(levels)
            w = tf.round(w / step) * step
        return w

    pred_w, ref_w = windowed(pred), windowed(ref)
    psnr = tf.image.psnr(pred_w, ref_w, max_val=width)
    rmse = tf.sqrt(tf.reduce_mean(tf.square(pred_w - ref_w), axis=[-3, -2, -1]))
    return {"psnr": tf.cast(psnr, tf.float32), "ssim": ssim(pred_w, ref_w, width),
            "rmse": tf.cast(rmse, tf.float32)}


_metric_fn = None


def _metrics_tf():
    """One tf.function scoring a batch in both ranges (shape-generic: no retracing per size)."""
    global _metric_fn
    if _metric_fn is None:
        tf = _tf()

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)] * 2)
        def fn(pred, ref):
            return {r: hu_metrics(pred, ref, window=w) for r, w in RANGES.items()}

        _metric_fn = fn
    return _metric_fn


def slice_metrics(images_hu, refs_hu) -> dict[str, dict[str, np.ndarray]]:
    """Per-image metrics of HU images against HU references, all of one size.

    Args:
        images_hu: (B, H, W) HU images to score.
        refs_hu: (B, H, W) HU references.

    Returns:
        ``{"window": {"psnr", "ssim", "rmse"}, "full": {...}}`` of float64 arrays (B,), computed
        by :func:`hu_metrics` on the normalised images.
    """
    images = ctio.normalize(np.asarray(images_hu, np.float32))[..., None]
    refs = ctio.normalize(np.asarray(refs_hu, np.float32))[..., None]
    if images.shape != refs.shape:
        raise ValueError(f"shape mismatch {images.shape} vs {refs.shape}")
    if min(images.shape[1:3]) < 11:
        raise ctio.CTDataError(f"slices of {images.shape[1]}x{images.shape[2]} are smaller than "
                               "the 11x11 SSIM window")
    out = _metrics_tf()(images, refs)
    return {r: {m: out[r][m].numpy().astype(np.float64) for m in METRICS} for r in RANGES}


def _load_group(rows: list[dict], out: Path, sigma: float):
    """Decode the slices of ``rows`` -> (ld, gaussian, cncl, ref) stacks (B, H, W) in HU."""
    lds, preds, refs = [], [], []
    for row in rows:
        pred_path = out / row["pred_npy"]
        if not pred_path.is_file():
            raise ctio.CTDataError(f"{pred_path}: prediction listed in the manifest is missing; "
                                   "rerun Mytest.py")
        try:
            pred = np.load(pred_path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError, EOFError) as e:
            raise ctio.CTDataError(f"{pred_path}: unreadable prediction ({e})") from None
        ld = ctio.read_slice(row["ld_path"])[0]
        ref = ctio.read_slice(row["fd_path"])[0]
        if not (pred.shape == ld.shape == ref.shape):
            raise ctio.CTDataError(f"{pred_path}: shape {pred.shape} differs from the input "
                                   f"{ld.shape} or the reference {row['fd_path']} {ref.shape}")
        lds.append(ld)
        preds.append(pred)
        refs.append(ref)
    ld = np.stack(lds)
    gauss = np.stack([gaussian_baseline(x, sigma) for x in lds])
    return ld, gauss, np.stack(preds), np.stack(refs)


def _pred_shape(path: Path) -> tuple:
    """Shape of a prediction from its .npy header (no pixels read)."""
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except FileNotFoundError:
        raise ctio.CTDataError(f"{path}: prediction listed in the manifest is missing; rerun "
                               "Mytest.py") from None
    except (OSError, ValueError, EOFError) as e:
        raise ctio.CTDataError(f"{path}: unreadable prediction ({e})") from None


def evaluate(rows: list[dict], out: Path, sigma: float, batch: int = 8) -> list[dict]:
    """Score every row (all must have ``fd_path``); batches group consecutive same-size slices.

    Returns one dict per slice and method: patient, slice_id, method, psnr_window, ...
    """
    results: list[dict] = []
    group: list[dict] = []
    shape = None

    def flush() -> None:
        if not group:
            return
        ld, gauss, pred, ref = _load_group(group, out, sigma)
        n = len(group)
        scores = slice_metrics(np.concatenate([ld, gauss, pred]), np.concatenate([ref] * 3))
        for k, method in enumerate(METHODS):
            for i, row in enumerate(group):
                res = {"patient": row["patient"], "slice_id": row["slice_id"], "method": method}
                for r in RANGES:
                    for m in METRICS:
                        res[f"{m}_{r}"] = float(scores[r][m][k * n + i])
                results.append(res)
        group.clear()

    for row in rows:
        size = _pred_shape(out / row["pred_npy"])
        if group and (size != shape or len(group) >= batch):
            flush()
        shape = size
        group.append(row)
    flush()
    order = {m: i for i, m in enumerate(METHODS)}
    results.sort(key=lambda d: order[d["method"]])  # stable: methods, then manifest order
    return results


# --- Summaries ----------------------------------------------------------------------------------
def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": _finite_or_none(mean), "std": _finite_or_none(std)}


def summarize(results: list[dict]) -> dict:
    """{method: {range: {metric: {mean, std}}}} over ``results``."""
    out = {}
    for method in METHODS:
        sel = [d for d in results if d["method"] == method]
        out[method] = {r: {m: _stats([d[f"{m}_{r}"] for d in sel]) for m in METRICS}
                       for r in RANGES}
    return out


def _pm(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "inf"
    return f"{stats['mean']:.{digits}f} ± {stats['std'] or 0.0:.{digits}f}"


def markdown_table(overall: dict, sigma: float) -> str:
    lo, hi = ctio.EVAL_WINDOW
    flo, fhi = ctio.FULL_RANGE
    head = ("| method | PSNR (dB) | SSIM | RMSE (HU) | PSNR full (dB) | SSIM full | "
            "RMSE full (HU) |")
    lines = [f"window [{lo:g}, {hi:g}] HU; full range [{flo:g}, {fhi:g}] HU", "",
             head, "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        w, f = overall[method]["window"], overall[method]["full"]
        lines.append(f"| {method_label(method, sigma)} | {_pm(w['psnr'], 2)} | "
                     f"{_pm(w['ssim'], 4)} | {_pm(w['rmse'], 2)} | {_pm(f['psnr'], 2)} | "
                     f"{_pm(f['ssim'], 4)} | {_pm(f['rmse'], 2)} |")
    return "\n".join(lines)


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
        report["overall"]["cncl"]["window"]["psnr"]["mean"]  # noqa: B018 - shape check
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


def run_training_summary(run_dir: Optional[str], weights: Optional[str] = None) -> dict:
    """Epochs, steps and training minutes behind the weights of a Mytrain.py run folder.

    The epoch of a ``--snapshot-every`` snapshot (``generator_epochNNNN.weights.h5``), the best
    validation epoch for ``generator_best``, else the last epoch of ``history.csv``; empty if
    the run cannot be read."""
    if not run_dir:
        return {}
    run = Path(run_dir)
    snap = re.search(r"generator_epoch(\d+)\.weights\.h5$", weights or "")
    try:
        train = json.loads((run / "config.json").read_text()).get("train", {})
        with open(run / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        epoch = int(snap.group(1)) if snap else int(rows[-1]["epoch"])
        if (weights or "").endswith("generator_best.weights.h5"):  # selected on validation
            epoch = int(json.loads((run / "state" / "state.json").read_text())
                        .get("best_epoch", epoch))
        row = next(r for r in rows if int(r["epoch"]) == epoch)
        return {"epochs": int(row["epoch"]), "minutes": float(row["minutes"]),
                "steps": int(row["epoch"]) * int(train["steps_per_epoch"]),
                "snapshot": bool(snap)}
    except (OSError, ValueError, KeyError, IndexError, TypeError, StopIteration):
        return {}


def compare(outs: list[Path]) -> str:
    """Markdown table: LDCT input once, then the CNCL result of every folder in ``outs`` (a
    folder's ``metrics.json`` may be given for the folder)."""
    outs = [o.parent if o.name == "metrics.json" and o.is_file() else o for o in outs]
    reports = [_read_report(o) for o in outs]
    slices = _scored_slices(outs[0])
    for o in outs[1:]:
        if _scored_slices(o) != slices:
            raise ctio.CTDataError(f"{o}: scored other slices than {outs[0]}; "
                                   "compare runs evaluated on the same slices")
    lines = [f"{len(slices)} slices: " + ", ".join(f"{p}:{s}" for p, s in slices), "",
             "| run | steps | train min | PSNR (dB) | SSIM | RMSE (HU) | gain vs input (dB) |",
             "|---|---|---|---|---|---|---|"]
    base = reports[0]["overall"]["ldct"]["window"]
    lines.append(f"| LDCT (input) | | | {base['psnr']['mean']:.2f} | {base['ssim']['mean']:.4f} "
                 f"| {base['rmse']['mean']:.2f} | |")
    for o, rep in zip(outs, reports):
        w = rep["overall"]["cncl"]["window"]
        runs, weights = rep.get("runs") or [], rep.get("weights") or []
        tr = run_training_summary(runs[0] if len(runs) == 1 else None,
                                  weights[0] if len(weights) == 1 else None)
        name = Path(runs[0]).name if len(runs) == 1 else str(o)
        if tr:
            name += f" (epoch {tr['epochs']})"
        minutes = f"{tr['minutes']:.1f}" if "minutes" in tr else ""
        lines.append(f"| {name} | {tr.get('steps', '')} | {minutes} | {w['psnr']['mean']:.2f} | "
                     f"{w['ssim']['mean']:.4f} | {w['rmse']['mean']:.2f} | "
                     f"{w['psnr']['mean'] - base['psnr']['mean']:+.2f} |")
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description="PSNR / SSIM / RMSE of the LDCT input, a Gaussian-filter baseline and the "
        "CNCL output of Mytest.py against the full-dose references.",
        formatter_class=ctio.HelpFormatter)
    ap.add_argument("--pred", default=None, metavar="OUT",
                    help="output folder of Mytest.py (has manifest.csv); required unless "
                    "--compare")
    ap.add_argument("--compare", nargs="+", default=None, metavar="OUT",
                    help="instead of scoring: one table row per already evaluated folder "
                    "(their metrics.json), e.g. an ablation")
    ap.add_argument("--data", default=None, metavar="PATH",
                    help="dataset folder to take the full-dose references from instead of the "
                    "manifest's fd_path (default: the manifest's references)")
    ap.add_argument("--layout", choices=ctio.LAYOUTS, default=None,
                    help="layout of --data (default: auto-detected)")
    ap.add_argument("--gaussian-sigma", type=float, default=0.7, metavar="SIGMA",
                    help="sigma (pixels) of the Gaussian-filter baseline")
    ap.add_argument("--batch", type=int, default=8, metavar="N", help="slices per metric batch")
    return ap


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.pred is None) == (args.compare is None):
        parser.error("give exactly one of --pred OUT or --compare OUT [OUT ...]")
    if args.compare:
        print(compare([Path(o) for o in args.compare]))
        print()
        print(ctio.PROTOCOL)
        return 0
    data, layout = args.data, args.layout
    sigma = float(args.gaussian_sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ctio.CTDataError(f"--gaussian-sigma {sigma:g}: need a positive number")
    if args.batch < 1:
        raise ctio.CTDataError(f"--batch {args.batch}: need at least 1")
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
    results = evaluate(scored, out, sigma, args.batch)

    patients = sorted({r["patient"] for r in scored})
    report = {
        "protocol": ctio.PROTOCOL,
        "window": list(ctio.EVAL_WINDOW),
        "full_range": list(ctio.FULL_RANGE),
        "gaussian_sigma": sigma,
        "gaussian_filter": "scipy.ndimage.gaussian_filter(mode='reflect', truncate=4.0) of LD HU",
        "std": "sample standard deviation over slices (ddof=1)",
        "n_slices": len(scored),
        "n_patients": len(patients),
        "n_without_reference": len(rows) - len(scored),
        "runs": sorted({r.get("run", "") for r in scored if r.get("run")}),
        "weights": sorted({r.get("weights", "") for r in scored if r.get("weights")}),
        "references": str(Path(data).resolve()) if data else "manifest fd_path",
        "overall": summarize(results),
        "per_patient": {
            p: {"n_slices": sum(r["patient"] == p for r in scored),
                **summarize([d for d in results if d["patient"] == p])}
            for p in patients},
    }
    write_outputs(out, results, report)

    print(markdown_table(report["overall"], sigma))
    print()
    print(ctio.PROTOCOL)
    print(f"n = {len(scored)} slices, {len(patients)} patient(s); mean ± sample std over slices"
          + (f"; {report['n_without_reference']} slice(s) without reference not scored"
             if report["n_without_reference"] else ""))
    print(f"Gaussian baseline: sigma {sigma:g} px (scipy.ndimage.gaussian_filter, reflect)")
    print(f"metrics: {out / 'metrics.csv'}, {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

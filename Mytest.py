"""Denoise whole low-dose CT slices with a trained CNCL generator.

Usage::

    python Mytest.py [--data PATH] [--run RUN_DIR] [--out OUT] [--weights FILE]
                     [--format png,tiff,npy,dicom] [--window LOW HIGH] [--batch N]
                     [--overwrite] [--layout mayo|npy|tif|dicom|tree] [--patients P ...]
                     [--slices PATIENT[:SLICE] ...]

Output layout (``OUT`` defaults to ``RUN_DIR/test``)::

    OUT/manifest.csv                       one row per slice: identity, sources, outputs, weights
    OUT/<patient>/<slice_id>.npy           float32 HU prediction, ALWAYS written (Myevaluation
                                           reads it; 'npy' in --format is implicit)
    OUT/<patient>/<slice_id>.png           8-bit image of the --window          (--format png)
    OUT/<patient>/<slice_id>.tif           float32 HU TIFF                       (--format tiff)
    OUT/<patient>/dicom/<slice_id>.dcm     derived DICOM, one series per source series (--format
                                           dicom; its UID derives from the source series and the
                                           weights, so reruns and --overwrite keep it)
    OUT/figures/<patient>_<slice_id>.png   LD | denoised | FD | |denoised - FD|  (slices with FD)

Every file is written atomically (``ctio.atomic_path``) and the manifest is rewritten atomically
after each batch, so an interrupted run leaves no partial file and a rerun only does the slices
that are not in the manifest with all their outputs present (``--overwrite`` redoes everything
selected). DICOM output needs DICOM input: for npy/tif datasets it is refused rather than written
with a made-up header, whose invented geometry would be wrong in a viewer.

OUT is the manifest's: every file in it has its row and every row's files exist. A redone slice
keeps only the outputs of the new run (an old PNG no longer requested is deleted, not left stale);
``--overwrite`` over other weights deletes their outputs. OUT must be new, empty or a Mytest.py
output (manifest.csv, written first thing): a folder of the user's files is refused, with
--overwrite too. Every slice to do is decoded once before OUT is created, so an unreadable slice
leaves no empty OUT behind.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import ctdata
import ctio
import ctmachine
import ctrun
from MyDataLoader_test import TestSlice, load_test_dataset, read_record

REPO = Path(__file__).resolve().parent
DEMO_DIR = REPO / "data" / "demo"
FORMATS = ("png", "tiff", "npy", "dicom")
_FORMAT_ALIASES = {"tif": "tiff", "dcm": "dicom", "numpy": "npy"}
DEFAULT_WINDOW = ctio.EVAL_WINDOW  # PNGs show the evaluation window by default
MAX_SIDE = 1024  # slices with a (padded) side above this are denoised in overlapping tiles
TILE = 512  # tile side (rounded up to a multiple of 2**depth); tiles overlap by TILE // 4
DIFF_RANGE_HU = 100.0  # |denoised - FD| panel of the figures: 0..100 HU -> black..white
PRECISIONS = ("float32", "bfloat16", "auto")  # --precision (ctmachine.PRECISION_POLICIES)
# Measured (README "CPU speed: bfloat16"): what --precision bfloat16 gains and costs.
BF16_COST = ("2.2x faster inference on CPUs with native bfloat16 (paper preset, 512^2 x 4, "
             "interleaved with float32, make bench on a shared 2-core Sapphire Rapids), 0.03 dB "
             "PSNR lower on two held-out Mayo slices (0.11 dB on the demo); slower where "
             "bfloat16 is emulated")
# Manifest column holding the output of each --format ('npy' is the always-written pred_npy).
FORMAT_COLUMN = {"png": "png", "tiff": "tiff", "npy": "pred_npy", "dicom": "dicom"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# --- Arguments and cheap validation (no TensorFlow) ---------------------------------------------
def parse_formats(text: str) -> list[str]:
    """'png,tiff' -> ['png', 'tiff'] (aliases tif/dcm accepted; order kept, duplicates dropped)."""
    out = []
    for item in str(text).split(","):
        name = _FORMAT_ALIASES.get(item.strip().lower(), item.strip().lower())
        if not name:
            continue
        if name not in FORMATS:
            raise argparse.ArgumentTypeError(
                f"unknown format '{item.strip()}' (choose from: {', '.join(FORMATS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise argparse.ArgumentTypeError("no output format given")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description="Denoise low-dose CT slices with a trained CNCL generator. Writes float32 HU "
        "predictions (.npy, always), the requested formats, comparison figures when a full-dose "
        "reference exists, and OUT/manifest.csv (read by Myevaluation.py).",
        formatter_class=ctio.HelpFormatter)
    ap.add_argument("--data", default=None, metavar="PATH",
                    help="dataset folder (mayo, npy, tif or dicom layout; LD-only data is fine) "
                    "(default: data/demo, restricted to the demo test patient)")
    ap.add_argument("--run", default=None, metavar="RUN_DIR",
                    help="training run folder holding config.json (default: the most recently "
                    "modified runs/*/ with a config.json)")
    ap.add_argument("--weights", default=None, metavar="FILE",
                    help="generator weights (default: RUN/generator_best.weights.h5 if present, "
                    "else RUN/generator_latest.weights.h5)")
    ap.add_argument("--out", default=None, metavar="OUT", help="output folder (default: RUN/test)")
    ap.add_argument("--format", dest="formats", type=parse_formats, default="png", metavar="LIST",
                    help="comma-separated outputs from: png, tiff, npy, dicom (float32 HU .npy "
                    "is always written; dicom needs DICOM input)")
    ap.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                    default=list(DEFAULT_WINDOW), help="HU window of the PNGs and figures")
    ap.add_argument("--batch", type=int, default=4, metavar="N",
                    help="slices (or tiles) per network call")
    ap.add_argument("--overwrite", action="store_true",
                    help="redo slices whose outputs already exist in OUT")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="dataset layout (default: auto-detected)")
    ap.add_argument("--patients", nargs="+", default=None, metavar="P",
                    help="only these patients (default: all; the demo test patient for data/demo)")
    ap.add_argument("--slices", nargs="+", default=None, metavar="SPEC",
                    help="only these slices: PATIENT or PATIENT:SLICE (e.g. L506:160 L506:200)")
    ap.add_argument("--no-figures", action="store_true",
                    help="do not write the LD | denoised | FD | difference figures")
    ap.add_argument("--max-side", type=int, default=MAX_SIDE, metavar="PX",
                    help="slices with a side larger than this are denoised in overlapping tiles")
    ap.add_argument("--tile", type=int, default=TILE, metavar="PX",
                    help="tile side for large slices (rounded up to a multiple of 2**depth)")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="network arithmetic; float32 (default) gives the same figures on "
                    "every machine. bfloat16: " + BF16_COST + "; auto = bfloat16 on CPUs with "
                    f"native bfloat16 ({' or '.join(ctmachine.BF16_FLAGS)}), else float32. The "
                    "output is float32 HU either way")
    return ap


def resolve_run(run: Optional[str], weights: Optional[str] = None) -> tuple[Path, dict, Path]:
    """``(run folder, model config, weights file)``, all checked, without TensorFlow: RUN (default
    the newest under runs/) and WEIGHTS (default its generator_best, else generator_latest)."""
    run_dir = Path(run) if run else ctrun.find_latest_run()
    if not run_dir.is_dir():
        raise ctio.CTDataError(f"{run_dir}: run folder not found")
    model = ctrun.read_run_config(run_dir)["model"]
    path = Path(weights) if weights else ctrun.generator_weights(run_dir, "best")
    check_weights_file(path)
    return run_dir.resolve(), model, path


def check_weights_file(path: Path) -> None:
    if not path.is_file():
        raise ctio.CTDataError(f"{path}: weights file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise ctio.CTDataError(f"{path}: cannot read weights ({e.strerror})") from None
    if magic != _HDF5_MAGIC:
        raise ctio.CTDataError(f"{path}: not a Keras .weights.h5 file (no HDF5 signature)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def demo_test_patient() -> str:
    """ctfixtures.DEMO_TEST_PATIENT (ctfixtures imports numpy and ctio only, not TensorFlow)."""
    try:
        import ctfixtures

        return str(ctfixtures.DEMO_TEST_PATIENT)
    except (ImportError, AttributeError):  # the user can still name the patient
        raise ctio.CTDataError("cannot find ctfixtures.DEMO_TEST_PATIENT to pick the demo test "
                               "patient; pass --patients") from None


@dataclass
class Plan:
    """Everything main() needs, validated before TensorFlow is imported."""

    data: Path
    dataset: ctdata.CTDataset
    run_dir: Path
    model: dict
    weights: Path
    out: Path
    formats: list[str]
    window: tuple[float, float]
    batch: int
    overwrite: bool
    figures: bool
    max_side: int
    tile: int
    precision: tuple[str, str] = ("float32", "default")  # (precision, why): choose_precision


def prepare(args: argparse.Namespace) -> Plan:
    """Resolve defaults and check every argument cheaply; raises CTDataError."""
    lo, hi = (float(v) for v in args.window)
    if not (np.isfinite(lo) and np.isfinite(hi)) or not lo < hi:
        raise ctio.CTDataError(f"--window {lo:g} {hi:g}: need LOW < HIGH")
    if args.batch < 1:
        raise ctio.CTDataError(f"--batch {args.batch}: need at least 1")
    if args.tile < 8 or args.max_side < args.tile:
        raise ctio.CTDataError(f"--tile {args.tile} / --max-side {args.max_side}: need "
                               "8 <= tile <= max-side")
    formats = args.formats if isinstance(args.formats, list) else parse_formats(args.formats)
    if "npy" not in formats:
        formats = [*formats, "npy"]

    run_dir, model, weights = resolve_run(args.run, args.weights)

    patients = args.patients
    if args.data is None:
        if not DEMO_DIR.is_dir():
            raise ctio.CTDataError(f"{DEMO_DIR}: demo data not found; build it with `make demo` "
                                   "(python Mysimulate.py --demo) or pass --data PATH")
        data = DEMO_DIR
        patients = patients or [demo_test_patient()]
    else:
        data = Path(args.data)
    dataset = load_test_dataset(data, args.layout, patients).select(include=args.slices)
    data = data.resolve()

    out = Path(args.out) if args.out else run_dir / "test"
    if out.exists() and not out.is_dir():
        raise ctio.CTDataError(f"{out}: exists and is not a folder")
    out = out.resolve()
    if ctrun.inside(out, data):
        raise ctio.CTDataError(f"--out {out} is inside the input folder {data}; outputs are "
                               "never written into the input data")
    for sub in [*dataset.patients, "figures"]:  # OUT/<patient>/ must not be the data either
        if ctrun.inside(data, out / sub):
            raise ctio.CTDataError(f"--out {out}: its output folder {out / sub} would hold the "
                                   f"input data {data}; choose another --out")
    check_out_is_ours(out)
    ctrun.check_writable("--out", out)
    if "dicom" in formats and dataset.layout not in ("mayo", "dicom"):
        raise ctio.CTDataError(f"--format dicom needs DICOM input, but {data} is a "
                               f"'{dataset.layout}' dataset without DICOM headers (a made-up "
                               "header would carry false geometry); use png, tiff or npy")
    return Plan(data=data, dataset=dataset, run_dir=run_dir, model=model,
                weights=weights.resolve(), out=out, formats=formats, window=(lo, hi),
                batch=int(args.batch), overwrite=bool(args.overwrite),
                figures=not args.no_figures, max_side=int(args.max_side), tile=int(args.tile))


def check_out_is_ours(out: Path) -> None:
    """OUT is absent, empty, or a Mytest.py output folder (it has a manifest.csv, written first
    thing into every OUT): the files of any other folder are not this script's to replace,
    with --overwrite neither."""
    if not out.is_dir() or (out / ctrun.MANIFEST).is_file():
        return
    found = next((p for p in out.rglob("*") if not p.is_dir()), None)
    if found is not None:
        raise ctio.CTDataError(f"--out {out}: holds {found} and is not a Mytest.py output folder "
                               f"(no {ctrun.MANIFEST}); its files are not Mytest.py's to replace "
                               "(with --overwrite neither): choose a new or empty --out")


# --- Manifest rows ------------------------------------------------------------------------------
def _window_str(window) -> str:
    return f"{window[0]:g} {window[1]:g}"


def row_outputs(row: dict) -> list[str]:
    """Relative paths of the output files a manifest row lists."""
    return [row[c] for c in ("pred_npy", "png", "tiff", "dicom", "figure") if row.get(c)]


def is_done(row: Optional[dict], rec: ctdata.SliceRecord, plan: Plan, sha: str) -> bool:
    """True if ``row`` already holds every requested output of ``rec`` made with these weights."""
    if row is None or row["weights_sha256"] != sha or row["window"] != _window_str(plan.window):
        return False
    if row["ld_path"] != str(Path(rec.ld_path).resolve()):
        return False
    if any(not row[FORMAT_COLUMN[f]] for f in plan.formats):
        return False
    if plan.figures and rec.fd_path and not row["figure"]:
        return False
    return all((plan.out / p).is_file() for p in row_outputs(row))


def clean_stale_tmp(out: Path, patients) -> int:
    """Remove temporaries left by a killed writer in the folders this script writes:
    OUT, OUT/<patient>, OUT/<patient>/dicom and OUT/figures."""
    return ctio.remove_stale_temporaries([out, out / "figures", *(out / p for p in patients),
                                          *(out / p / "dicom" for p in patients)])


def load_generator(model_cfg: dict, weights: Path):
    """Build the generator of ``model_cfg`` (checked by ``ctrun.read_run_config``, which refuses
    an older network version) and load ``weights``; CTDataError if they don't fit."""
    ctio.import_tensorflow()
    import Mymodel

    gen = Mymodel.build_generator(model_cfg["base_filters"], model_cfg["depth"], model_cfg["norm"])
    load_weights_into(gen, model_cfg, weights)
    return gen


def load_weights_into(gen, model_cfg: dict, weights: Path) -> None:
    """Load ``weights`` into ``gen``, a generator of ``model_cfg``; CTDataError (one line) if
    they don't fit."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen.load_weights(str(weights))
    except Exception as e:  # h5py OSError (truncated/corrupt), Keras ValueError (other model)
        first = " ".join(str(e).split())
        if "could not be loaded" in first:
            first = first.split(". Example", 1)[0]
        raise ctio.CTDataError(
            f"{weights}: cannot load generator weights for base_filters="
            f"{model_cfg['base_filters']}, depth={model_cfg['depth']}, norm={model_cfg['norm']} "
            f"({type(e).__name__}: {first[:200]})") from None


def _pad_amounts(length: int, multiple: int) -> tuple[int, int]:
    total = (-length) % multiple
    return total // 2, total - total // 2


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(n: int, overlap: int) -> np.ndarray:
    """Blending weights along one tile axis: linear ramps over the overlaps, never zero."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        r = np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1)
        w[:overlap] = np.minimum(w[:overlap], r)
        w[-overlap:] = np.minimum(w[-overlap:], r[::-1])
    return w


class Denoiser:
    """HU slices of one size -> denoised HU slices of that size.

    Each slice is normalised (``ctio.normalize``), reflect-padded to a multiple of ``2**depth``
    (split evenly on both sides), run through the generator (content output) and cropped back;
    the result is denormalised and clipped to [HU_MIN, HU_MAX]. Slices whose padded side exceeds
    ``max_side`` are cut into overlapping ``tile`` x ``tile`` tiles blended with linear ramps.
    The network runs as one concrete graph per padded slice (or tile) size with a free batch
    dimension: a volume of one size is traced once, including its last, partial batch. (Keras'
    bilinear UpSampling2D cannot be traced with unknown height and width.)
    """

    def __init__(self, generator, depth: int, batch: int = 4, max_side: int = MAX_SIDE,
                 tile: int = TILE):
        tf = ctio.import_tensorflow()
        self.multiple = 2 ** int(depth)
        self.batch = int(batch)
        self.max_side = int(max_side)
        self.tile = max(self.multiple, -(-int(tile) // self.multiple) * self.multiple)
        self.overlap = self.tile // 4
        self._tf = tf
        gen = generator

        @tf.function
        def content(x):
            return gen(x, training=False)[0]

        self._content = content
        self._graphs: dict[tuple[int, int], object] = {}  # (h, w) -> concrete function

    def _graph(self, h: int, w: int):
        if (h, w) not in self._graphs:
            spec = self._tf.TensorSpec([None, h, w, 1], self._tf.float32)
            self._graphs[(h, w)] = self._content.get_concrete_function(spec)
        return self._graphs[(h, w)]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """(N, h, w) normalised, h and w multiples of 2**depth -> (N, h, w) network content."""
        out = np.empty_like(x)
        graph = self._graph(*x.shape[1:])
        for i in range(0, len(x), self.batch):
            chunk = self._tf.constant(x[i:i + self.batch, ..., None])
            out[i:i + self.batch] = graph(chunk).numpy()[..., 0]
        return out

    def _tiled(self, xp: np.ndarray) -> np.ndarray:
        """One padded slice (H, W) -> content, by overlapping tiles."""
        h, w = xp.shape
        th, tw = min(self.tile, h), min(self.tile, w)
        ys, xs = _tile_starts(h, th, self.overlap), _tile_starts(w, tw, self.overlap)
        weight = np.outer(_ramp(th, self.overlap if len(ys) > 1 else 0),
                          _ramp(tw, self.overlap if len(xs) > 1 else 0))
        coords = [(y, x) for y in ys for x in xs]
        acc = np.zeros((h, w), np.float32)
        wsum = np.zeros((h, w), np.float32)
        for i in range(0, len(coords), self.batch):
            chunk = coords[i:i + self.batch]
            pred = self._run(np.stack([xp[y:y + th, x:x + tw] for y, x in chunk]))
            for (y, x), p in zip(chunk, pred):
                acc[y:y + th, x:x + tw] += p * weight
                wsum[y:y + th, x:x + tw] += weight
        return acc / wsum

    def __call__(self, images_hu: list[np.ndarray]) -> list[np.ndarray]:
        x = np.stack([ctio.normalize(np.asarray(im, np.float32)) for im in images_hu])  # (B,H,W)
        _, h, w = x.shape
        (top, bottom), (left, right) = (_pad_amounts(h, self.multiple),
                                        _pad_amounts(w, self.multiple))
        xp = np.pad(x, ((0, 0), (top, bottom), (left, right)), mode="reflect")
        if max(xp.shape[1:]) <= self.max_side:
            y = self._run(xp)
        else:
            y = np.stack([self._tiled(s) for s in xp])
        y = y[:, top:top + h, left:left + w]
        hu = np.clip(ctio.denormalize(y), ctio.HU_MIN, ctio.HU_MAX).astype(np.float32)
        return list(hu)


# --- Figures ------------------------------------------------------------------------------------
def make_figure(ld: np.ndarray, pred: np.ndarray, fd: np.ndarray, window) -> np.ndarray:
    """LD | denoised | FD | |denoised - FD| as one BGR uint8 image with small labels."""
    lo, hi = window
    diff = np.clip(np.abs(pred - fd) / DIFF_RANGE_HU * 255.0, 0, 255).round().astype(np.uint8)
    panels = [(ctio.window_to_uint8(ld, window), f"LDCT [{lo:g}, {hi:g}] HU"),
              (ctio.window_to_uint8(pred, window), "CNCL denoised"),
              (ctio.window_to_uint8(fd, window), "FDCT reference"),
              (diff, f"|CNCL - FD| 0-{DIFF_RANGE_HU:g} HU")]
    gap = np.full((ld.shape[0], 2, 3), 128, np.uint8)
    parts = []
    for gray, text in panels:
        rgb = np.repeat(gray[..., None], 3, axis=2)
        ctio.label_panel(rgb, text)
        parts += [rgb, gap]
    return np.concatenate(parts[:-1], axis=1)


# --- The run ------------------------------------------------------------------------------------
class Writer:
    """Writes the outputs of denoised slices and keeps the manifest current."""

    def __init__(self, plan: Plan, rows: dict, sha: str):
        self.plan, self.rows, self.sha = plan, rows, sha

    def write(self, s: TestSlice, pred: np.ndarray) -> None:
        """Write every requested output of one slice and add its manifest row; if any writer
        fails, the files already written for this slice are removed (no output without a row)
        and the error is raised."""
        written: list[Path] = []
        try:
            self._write(s, pred, written)
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            self.rows.pop((s.patient, s.slice_id), None)
            raise

    def _write(self, s: TestSlice, pred: np.ndarray, written: list[Path]) -> None:
        plan, out = self.plan, self.plan.out
        pdir = out / s.patient
        pdir.mkdir(parents=True, exist_ok=True)
        rel = f"{s.patient}/{s.slice_id}"
        row = {k: "" for k in ctrun.MANIFEST_FIELDS}
        row.update(patient=s.patient, slice_id=s.slice_id, position=repr(float(s.position)),
                   height=str(pred.shape[0]), width=str(pred.shape[1]),
                   ld_path=str(Path(s.ld_path).resolve()),
                   fd_path=str(Path(s.fd_path).resolve()) if s.fd_path else "",
                   window=_window_str(plan.window), run=str(plan.run_dir),
                   weights=str(plan.weights), weights_sha256=self.sha)
        ctio.write_npy(out / f"{rel}.npy", pred)
        written.append(out / f"{rel}.npy")
        row["pred_npy"] = f"{rel}.npy"
        if "png" in plan.formats:
            ctio.write_png(out / f"{rel}.png", ctio.window_to_uint8(pred, plan.window))
            written.append(out / f"{rel}.png")
            row["png"] = f"{rel}.png"
        if "tiff" in plan.formats:
            ctio.write_tiff(out / f"{rel}.tif", pred)
            written.append(out / f"{rel}.tif")
            row["tiff"] = f"{rel}.tif"
        if "dicom" in plan.formats:
            if s.header is None:
                raise ctio.CTDataError(f"{s.ld_path}: no DICOM header for --format dicom")
            (pdir / "dicom").mkdir(exist_ok=True)
            header = s.header
            uid = ctio.derived_series_uid(header, s.ld_path, f"CNCL weights {self.sha}")
            orig = str(header.get("SeriesDescription", "") or "").strip()
            header.DerivationDescription = "CNCL deep-learning denoising of low-dose CT"
            number = header.get("SeriesNumber")
            try:
                number = int(number) + 1000 if number not in (None, "") else 1000
            except (TypeError, ValueError):
                number = 1000
            ctio.write_dicom(pdir / "dicom" / f"{s.slice_id}.dcm", pred, header,
                             series_uid=uid, description=f"CNCL denoised ({orig[:48]})"
                             if orig else "CNCL denoised",
                             derived=True, series_number=number)
            row["dicom"] = f"{s.patient}/dicom/{s.slice_id}.dcm"
            row["series_uid"] = uid
        if plan.figures and s.fd_hu is not None:
            (out / "figures").mkdir(exist_ok=True)
            name = f"figures/{s.patient}_{s.slice_id}.png"
            ctio.write_png(out / name, make_figure(s.ld_hu, pred, s.fd_hu, plan.window))
            row["figure"] = name
        old = self.rows.get((s.patient, s.slice_id))
        if old:  # outputs of the previous run of this slice that this one did not make again
            remove_outputs(out, [p for p in row_outputs(old) if p not in row_outputs(row)])
        self.rows[(s.patient, s.slice_id)] = row

    def save_manifest(self) -> None:
        ctrun.write_manifest(self.plan.out, self.rows.values())


def remove_outputs(out: Path, paths) -> None:
    """Delete the files ``paths`` (relative, from manifest rows) that lie inside ``out``."""
    for rel in paths:
        if ctrun.inside(out / rel, out):
            (out / rel).unlink(missing_ok=True)


def check_readable(todo: list) -> None:
    """Decode every slice to denoise once, before OUT is created and TensorFlow imported: an
    unreadable slice is refused before any work (7.6 ms per 512^2 DICOM slice measured, README
    "Denoising"), never after an OUT was made."""
    for rec in todo:
        read_record(rec)


def pending(plan: Plan, sha: str) -> tuple[dict, list, list]:
    """``(manifest rows to keep, records to denoise, rows dropped)``: slices already done with
    these weights (every requested output present) are skipped; rows of other weights are an
    error unless --overwrite, which drops them (run() deletes their files)."""
    rows = {(r["patient"], r["slice_id"]): r for r in ctrun.read_manifest(plan.out)}
    other = {r["weights"] or "?" for r in rows.values() if r["weights_sha256"] != sha}
    if other and not plan.overwrite:
        raise ctio.CTDataError(f"{plan.out / ctrun.MANIFEST}: outputs there were made with other "
                               f"weights ({sorted(other)[0]}); pass --overwrite to replace them "
                               "or choose another --out")
    kept = {k: r for k, r in rows.items() if r["weights_sha256"] == sha}
    todo = [r for r in plan.dataset.records
            if plan.overwrite or not is_done(kept.get((r.patient, r.slice_id)), r, plan, sha)]
    return kept, todo, [r for r in rows.values() if r["weights_sha256"] != sha]


def run(plan: Plan) -> dict:
    """Denoise every selected slice not already done; returns counts."""
    sha = file_sha256(plan.weights)
    rows, todo, dropped = pending(plan, sha)
    records = plan.dataset.records
    print(f"run:     {plan.run_dir}")
    chosen = ctrun.best_choice(plan.run_dir) if plan.weights.name == ctrun.BEST else ""
    own = plan.weights.resolve().parent in (plan.run_dir, plan.run_dir / ctrun.SNAPSHOTS)
    notes = "; ".join(n for n in (chosen, own and ctrun.weights_kind(plan.run_dir)) if n)
    print(f"weights: {plan.weights}" + (f" ({notes})" if notes else ""))
    print(f"data:    {plan.data} ({plan.dataset.layout}, {len(plan.dataset.patients)} "
          f"patient(s), {len(records)} slices)")
    print(f"out:     {plan.out} (formats: {', '.join(plan.formats)})")
    if dropped:
        print(f"note: {len(dropped)} slice(s) denoised with other weights: their outputs are "
              "removed (--overwrite)")
    skipped = len(records) - len(todo)
    if not todo:
        print(f"nothing to do: all {len(records)} slices are done in {plan.out} "
              "(--overwrite redoes them)")
        return {"done": 0, "skipped": skipped}
    if skipped:
        print(f"skipping {skipped} finished slice(s); {len(todo)} to do")

    check_readable(todo)
    plan.out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(plan.out, plan.dataset.patients)
    ctrun.write_manifest(plan.out, rows.values())  # first: OUT is a Mytest.py output from now on
    remove_outputs(plan.out, [p for r in dropped for p in row_outputs(r)])
    print(f"precision: {plan.precision[0]} ({plan.precision[1]})")
    with ctmachine.precision_policy(plan.precision[0]):  # the layers keep it
        generator = load_generator(plan.model, plan.weights)
    denoiser = Denoiser(generator, plan.model["depth"], plan.batch, plan.max_side, plan.tile)
    t0 = time.perf_counter()
    done = stream(todo, denoiser, Writer(plan, rows, sha), plan.batch)
    dt = time.perf_counter() - t0
    print(f"denoised {done} slice(s) in {dt:.1f} s ({dt / done:.2f} s/slice), skipped {skipped}; "
          f"manifest: {plan.out / ctrun.MANIFEST}")
    return {"done": done, "skipped": skipped}


def stream(todo: list, denoiser: Denoiser, writer: Writer, batch: int) -> int:
    """Read, denoise and write ``todo`` in batches of equal-sized slices: at most ``batch``
    decoded slices in memory; the manifest is saved after every batch. Returns slices done."""
    import keras

    bar = keras.utils.Progbar(len(todo), unit_name="slice",
                              verbose=1 if sys.stdout.isatty() else 2)
    done = 0
    buffer: list[TestSlice] = []

    def flush() -> None:
        nonlocal done
        if not buffer:
            return
        preds = denoiser([s.ld_hu for s in buffer])
        try:
            for s, pred in zip(buffer, preds):
                writer.write(s, pred)
        finally:  # slices written before a failure keep their rows
            writer.save_manifest()
        done += len(buffer)
        bar.update(done)
        buffer.clear()

    for rec in todo:
        s = read_record(rec)
        if buffer and (s.ld_hu.shape != buffer[0].ld_hu.shape or len(buffer) >= batch):
            flush()
        buffer.append(s)
    flush()
    return done


def choose_precision(flag: Optional[str]) -> tuple[str, str]:
    """``(precision, why)`` of inference for ``--precision FLAG`` (None: the float32 default;
    auto: ctmachine.auto_precision)."""
    if flag is None:
        return "float32", "default: the same figures on every CPU; --precision bfloat16 is faster"
    return ctmachine.auto_precision() if flag == "auto" else (flag, "--precision")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = prepare(args)
    plan.precision = choose_precision(args.precision)
    run(plan)
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

"""Benchmark CNCL on this machine: matmul peak, training, inference, data loading and memory.

Usage::

    python Mybenchmark.py [--preset paper|small] [--json FILE] [--quick]
    python Mybenchmark.py --scale [--scale-data DIR] [--json FILE]   # Mayo size (issue 16)

Sections (``--sections``, the table RUNNERS): matmul, train, infer, data, memory, eval, and
scale, which only runs when asked for (it builds and uses a Mayo-size fixture, ~25 min here).

Every figure is a median over repeats taken after warm-up (the first call of a graph, which
traces and, with ``--jit on``, compiles it, is timed separately and never counted). It prints one
table and, with ``--json``, writes every figure with the machine it was measured on.

FLOPs are counted from the layers (:mod:`ctflops`, convention printed under the table). Every
ratio — MFU (counted FLOP/s over the FLOP/s of the square matmul of the same precision), bfloat16
vs float32, loader vs training — comes from interleaved timings (:mod:`cttiming`: A, B, A, B ...;
min / median / max over the pairs; pairs in which the load changed are marked disturbed, and an
efficiency above 1 is invalid, never a result). Beside the measured matmul it states the FMA
hardware peak (:func:`ctmachine.hardware_peak`, a lower bound where only the current clock is
known) and which kernel library (oneDNN or Eigen) ran. bfloat16 rows are measured only on CPUs
with native bfloat16 (``ctmachine.native_bfloat16``) unless ``--precision-rows all``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import ctdata
import ctio
import ctmachine
import ctprocess
import ctprofile
import ctrun
import cttiming
from ctflops import FLOPS_CONVENTION, conv_flops, model_flops
from ctmachine import kernel_library, machine_info

REPO = Path(__file__).resolve().parent
PRESETS = tuple(ctrun.PRESETS)  # checked before TensorFlow is imported
SECTIONS = ("matmul", "train", "infer", "data", "memory", "eval", "scale")
DEFAULT_SECTIONS = SECTIONS[:-1]  # scale (~1 h on 2 cores) runs with --scale or --sections scale
PRECISION_ROWS = ("auto", "all", "float32")  # --precision-rows
SLICE = 512  # whole-slice size of the Mayo data
PATCH = 64  # the benchmark's training patch (the MFU history since the first release uses it)
TRAIN_BATCH = 16  # the benchmark's headline training batch (kept for comparable figures)
REQUIRED_KEYS = ("matmul_gflops", "train_patches_per_s", "train_mfu", "infer_slices_per_s",
                 "infer_mfu", "loader_ratio", "mem_ratio", "eval_slices_per_s")
BF16_KEYS = ("matmul_gflops_bf16", "train_patches_per_s_bf16", "train_mfu_bf16",
             "train_bf16_speedup", "infer_slices_per_s_bf16", "infer_mfu_bf16",
             "infer_bf16_speedup")  # None when the bfloat16 rows are skipped
SCALE_KEYS = ("scale_discovery_files_per_s", "scale_training_pairs", "scale_train_peak_rss_mb",
              "scale_train_rss_ratio", "scale_cache_fill_s", "scale_first_step_s",
              "scale_first_step_warm_s", "scale_loader_patches_per_s", "scale_infer_s_per_slice",
              "scale_infer_peak_rss_mb", "scale_patient_minutes", "scale_infer_s_per_slice_paper",
              "scale_patient_minutes_paper", "scale_dicom_one_series",
              "scale_eval_slices_per_s")  # None unless the scale section ran


def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description="Benchmark CNCL training, inference, data loading and memory on this "
        "machine; prints a table and optionally writes JSON.", formatter_class=ctio.HelpFormatter)
    ap.add_argument("--preset", default="paper", help="model preset: paper or small")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the figures here")
    ap.add_argument("--quick", action="store_true",
                    help="fast smoke run: small sizes, few repeats (figures are not meaningful)")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help="comma-separated subset of: " + ", ".join(SECTIONS))
    ap.add_argument("--scale", action="store_true",
                    help="run only the scale section (issue 16; the same as --sections scale): "
                    "a Mayo-size fixture (10 x 240 pairs of 512^2 DICOM, Mysimulate.py "
                    "--mayo-like) through discovery, the training loader, Mytrain.py (peak RSS "
                    "at one patient's and all pairs), Mytest.py on a 560-slice series and "
                    "Myevaluation.py; about an hour on 2 cores")
    ap.add_argument("--scale-data", default=None, metavar="DIR",
                    help="scale section: use this Mysimulate.py --mayo-like folder instead of "
                    "building one (a few minutes)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed repeats per measurement (0: automatic per section)")
    ap.add_argument("--jit", default="off", help="XLA for train step and inference: off or on")
    ap.add_argument("--patch", type=int, default=PATCH,
                    help="training patch side (64: the MFU history; 128: the cpu recipe)")
    ap.add_argument("--adv-weight", type=float, default=1.0,
                    help="training rows: weight of the adversarial term (0: L1 only, as "
                    "make train-mayo-psnr; the discriminator then does not run)")
    ap.add_argument("--train-batches", default=None,
                    help="comma-separated batch sizes of patches to time (default 16,32; "
                    "the first one is the headline train_* figure)")
    ap.add_argument("--slice-batches", default=None,
                    help="comma-separated batches of whole slices for training (default 1; "
                    "'none' skips whole-slice training)")
    ap.add_argument("--infer-batches", default=None,
                    help="comma-separated inference batch sizes (default 1,2,4; small adds 8)")
    ap.add_argument("--onednn", default="default",
                    help="TF_ENABLE_ONEDNN_OPTS for this run: on, off, or default = leave TF's "
                    "own choice (TF turns oneDNN on by itself on CPUs with AVX-512 VNNI or AMX, "
                    "else uses Eigen; a TF_ENABLE_ONEDNN_OPTS already in the environment wins). "
                    "Mytrain.py itself turns oneDNN on for small-preset patch training where TF "
                    "would use Eigen: --onednn on measures what it runs there")
    ap.add_argument("--precision-rows", default="auto", choices=PRECISION_ROWS,
                    help="bfloat16 rows beside the float32 ones (matmul, training, inference): "
                    "auto = only on CPUs with native bfloat16 (" + " or ".join(ctmachine.BF16_FLAGS)
                    + "; elsewhere TF emulates it, slowly, and the figure means nothing); all = "
                    "measure them anyway; float32 = none")
    ap.add_argument("--intra-threads", type=int, default=0,
                    help="TF intra-op threads (0: TF default = cores)")
    ap.add_argument("--inter-threads", type=int, default=0,
                    help="TF inter-op threads (0: TF default)")
    ap.add_argument("--data", default=None,
                    help="DICOM folder for the data section (default: CT_SAMPLE_DATA/"
                    "L067_full_1mm when present, else generated DICOM slices)")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="write a TF profiler trace of 2 training steps and 1 inference call")
    return ap


def parse_ints(text: Optional[str], name: str, allow_none: bool = False) -> Optional[list[int]]:
    if text is None:
        return None
    if allow_none and str(text).strip().lower() == "none":
        return []
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ctio.CTDataError(f"--{name}: expected comma-separated integers, got '{text}'") \
            from None
    if not vals or min(vals) < 1:
        raise ctio.CTDataError(f"--{name}: need positive integers, got '{text}'")
    return vals


def check_args(args: argparse.Namespace) -> None:
    """Validate flags before the slow TensorFlow import; raises CTDataError (exit 2)."""
    if args.preset not in PRESETS:
        raise ctio.CTDataError(f"unknown preset '{args.preset}' (choose from: "
                               f"{', '.join(PRESETS)})")
    if args.jit not in ("off", "on"):
        raise ctio.CTDataError(f"--jit must be off or on, got '{args.jit}'")
    if args.onednn not in ("default", "on", "off"):
        raise ctio.CTDataError(f"--onednn must be default, on or off, got '{args.onednn}'")
    secs = ["scale"] if args.scale else [
        s.strip() for s in str(args.sections).split(",") if s.strip()]
    bad = [s for s in secs if s not in SECTIONS]
    if bad or not secs:
        raise ctio.CTDataError(f"--sections: unknown section '{(bad or [''])[0]}' (choose from: "
                               f"{', '.join(SECTIONS)})")
    args.sections = secs
    if min(args.repeats, args.intra_threads, args.inter_threads, args.adv_weight) < 0 or \
            args.patch < 8:
        raise ctio.CTDataError("--repeats, --intra-threads, --inter-threads and --adv-weight "
                               "must be >= 0, --patch >= 8")
    args.train_batches = parse_ints(args.train_batches, "train-batches")
    args.slice_batches = parse_ints(args.slice_batches, "slice-batches", allow_none=True)
    args.infer_batches = parse_ints(args.infer_batches, "infer-batches")
    if args.data is not None and not Path(args.data).is_dir():
        raise ctio.CTDataError(f"--data {args.data}: no such folder")
    if args.scale_data is not None and not (Path(args.scale_data) / "SIMULATION.json").is_file():
        raise ctio.CTDataError(f"--scale-data {args.scale_data}: not a folder written by "
                               "Mysimulate.py --mayo-like (no SIMULATION.json)")
    if args.json is not None:  # fail now, not after a long run (runs/ may not exist yet)
        target = Path(args.json)
        if target.is_dir():
            raise ctio.CTDataError(f"--json {args.json}: is a folder")
        try:
            target.resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ctio.CTDataError(f"--json {args.json}: cannot create its folder "
                                   f"({e.strerror})") from None


# --- Timing helpers (interleaved: cttiming) ------------------------------------------------------
def load() -> float:
    return round(os.getloadavg()[0], 2)


def _sync(out) -> None:
    """Block until every output tensor is computed (numpy() of each)."""
    import keras

    keras.tree.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)


def warm(case: dict, warmup: int) -> dict:
    """Time ``case["fn"]``'s first call (tracing; with --jit compiling) into ``first_call_s``,
    then call it ``warmup`` more times, untimed."""
    t0 = time.perf_counter()
    case["fn"]()
    case["first_call_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        case["fn"]()
    return case


def timed_row(case: dict, samples: list, peak: list, peak_case: dict) -> dict:
    """A table row of ``case`` from its interleaved ``samples``; MFU within each pair against the
    matmul ``peak`` timed beside it (cttiming.ratio: an efficiency, and load-dependent)."""
    r = cttiming.rate(samples, case["examples"])
    mfu = cttiming.ratio(samples, peak, case["work"], peak_case["work"], efficiency=True,
                         load_dependent=True)
    meta = {k: v for k, v in case.items() if k not in ("fn", "work", "examples")}
    return {**meta, "median_s": r["median_s"], "min_s": min(s.seconds for s in samples),
            "max_s": max(s.seconds for s in samples), "repeats": r["repeats"],
            "examples_per_s": r["median"], "flops_per_call": case["work"],
            "gflops": case["work"] / r["median_s"] / 1e9, "mfu": mfu["value"], "mfu_ratio": mfu,
            "others_cores": mfu["others_cores"], "load_after": load()}


# --- Sections -------------------------------------------------------------------------------------
def _synthetic_batch(batch: int, h: int, w: int, seed: int = 0):
    """Normalised CT-like (ld, fd) float32 [B, h, w, 1]: soft tissue with noise; values only."""
    rng = np.random.default_rng(seed)
    fd = ctio.normalize(rng.normal(40.0, 60.0, (batch, h, w, 1)))
    ld = ctio.normalize(ctio.denormalize(fd) + rng.normal(0.0, 25.0, fd.shape))
    return ld, fd


def _new_gan(cfg: dict, jit: bool, precision: str = "float32", adv_weight: float = 1.0):
    import keras

    import Mymodel

    with ctmachine.precision_policy(precision):
        gen, disc = Mymodel.build_models(cfg)
        gan = Mymodel.CNCLGAN(gen, disc)
        gan.compile(g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                    d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5), jit_compile=jit,
                    adv_weight=adv_weight)
    return gan


def train_case(cfg: dict, batch: int, size: int, jit: bool, warmup: int,
               precision: str = "float32") -> dict:
    """One full GAN train step (Keras' own train_function, as fit() runs it) on fixed data,
    computed in ``precision`` (Mytrain.py --precision), traced and warmed: ``{"fn", "work"}``."""
    tf = ctio.import_tensorflow()
    gan = _new_gan(cfg, jit, precision, cfg.get("adv_weight", 1.0))
    ld, fd = _synthetic_batch(batch, size, size)
    it = iter(tf.data.Dataset.from_tensors((tf.constant(ld), tf.constant(fd))).repeat())
    gan.make_train_function()
    fl = model_flops(cfg, size, size)  # adv_weight 0: D is neither run nor updated (3 G)
    step = fl["train_step"] if gan.adv_weight > 0 else 3 * fl["g_fwd"]
    return warm({"fn": lambda: _sync(gan.train_function(it)), "work": step * batch,
                 "examples": batch, "batch": batch, "size": size, "precision": precision,
                 "g_fwd_flops_per_example": fl["g_fwd"], "d_fwd_flops_per_example": fl["d_fwd"],
                 "flops_per_step": step * batch}, warmup)


def infer_case(cfg: dict, batch: int, size: int, jit: bool, warmup: int,
               precision: str = "float32") -> dict:
    """Generator content output on whole slices (the network part of Mytest.py), computed in
    ``precision`` (Mytest.py --precision), traced and warmed: ``{"fn", "work"}``."""
    tf = ctio.import_tensorflow()
    import Mymodel

    with ctmachine.precision_policy(precision):
        gen = Mymodel.build_generator(cfg["base_filters"], cfg["depth"], cfg["norm"])

    @tf.function(jit_compile=jit)
    def content(x):
        return gen(x, training=False)[0]

    x = tf.constant(_synthetic_batch(batch, size, size)[0])
    g_fwd, _ = conv_flops(gen, (size, size, 1))
    return warm({"fn": lambda: content(x).numpy(), "work": g_fwd * batch, "examples": batch,
                 "batch": batch, "size": size, "precision": precision,
                 "flops_per_slice": g_fwd}, warmup)


def write_dicom_series(folder: Path, n: int, shape: tuple[int, int], seed: int = 0) -> Path:
    """``n`` generated CT slices as one DICOM series in ``folder`` (written with ctio)."""
    import ctfixtures

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = ctio.new_uid(), ctio.new_uid()
    for i in range(n):
        hdr = ctio.new_ct_header(patient_id="BENCH", study_uid=study, series_uid=series,
                                 instance=i + 1, z_mm=1.0 * i, shape=shape,
                                 description="benchmark phantom")
        ctio.write_dicom(folder / f"{i + 1:04d}.dcm",
                         ctfixtures.ellipse_phantom(shape, rng, noise_hu=15.0), hdr,
                         series_uid=series, description="benchmark phantom", derived=False)
    return folder


def default_data() -> Optional[Path]:
    root = Path(os.environ.get("CT_SAMPLE_DATA", REPO.parent / "shared" / "data"))
    d = root / "L067_full_1mm"
    return d if d.is_dir() else None


def data_label(records: list, source: str, simulate_dose: Optional[float]) -> str:
    """What the loader section really read: real QD/FD pairs, simulated quarter dose, or both
    (the loader simulates only slices without a low-dose partner)."""
    paired = sum(bool(r.ld_path) for r in records)
    simulated = len(records) - paired
    sim = f"quarter dose simulated (--simulate-dose {simulate_dose:g})" if simulated else ""
    if not simulated:
        return f"{source}, {paired} real QD/FD pairs (nothing simulated)"
    if not paired:
        return f"{source}, full dose only: {sim}"
    return f"{source}, {paired} real QD/FD pairs + {simulated} full-dose-only slices with {sim}"


def bench_loader(data: Path, source: str, train: dict, n_batches: int, rounds: int,
                 simulate_dose: Optional[float]) -> dict:
    """make_train_dataset's first pass (decode) and steady (cached) patch rate, each as a ratio
    to the ``train`` case (train_case, batch = the loader's) timed beside it: the first pass
    between two train steps, the steady rate interleaved with train steps, ``n_batches``
    batches a turn, ``rounds`` turns. ``simulate_dose`` applies to full-dose-only slices."""
    ctio.import_tensorflow()
    import MyDataLoader_train as loader

    batch, meter = train["batch"], cttiming.CpuMeter()
    records = loader.find_training_data([str(data)], simulate_dose=simulate_dose).records
    load0 = load()
    # Serial decode of a few slices (numpy, one core): the cost of one slice.
    k = min(2, len(records))
    t0 = time.perf_counter()
    for r in records[:k]:
        loader.load_pair(r, simulate_dose, 0)
    serial_s = (time.perf_counter() - t0) / k
    # The real pipeline: the shuffle buffer holds every slice (<= 512), so the first batch
    # arrives once the whole first pass is decoded (in parallel, AUTOTUNE) into the cache.
    held: dict[str, Any] = {}

    def first_pass():
        held["it"] = iter(loader.make_train_dataset(records, patch=train["size"], batch=batch,
                                                    simulate_dose=simulate_dose))
        _sync(next(held["it"]))

    cold = [meter.time(train["fn"]), meter.time(first_pass), meter.time(train["fn"])]
    for _ in range(max(2, n_batches // 5)):  # warm the steady state
        _sync(next(held["it"]))
    s = cttiming.interleave({"loader": lambda: [_sync(next(held["it"])) for _ in
                                                range(n_batches)], "train": train["fn"]},
                            rounds, meter)
    held.clear()
    pps = loader.PATCHES_PER_SLICE
    first_s = cold[1].seconds
    return {"data": data_label(records, source, simulate_dose), "slices": len(records),
            "shape": list(records[0].shape), "simulate_dose": simulate_dose,
            "simulated_slices": sum(not r.ld_path for r in records), "patch": train["size"],
            "batch": batch, "patches_per_slice": pps, "serial_decode_s_per_slice": serial_s,
            "first_pass_s": first_s, "decode_slices_per_s": len(records) / first_s,
            "patches_per_s": cttiming.rate(s["loader"], n_batches * batch)["median"],
            "cold_patches_per_s": len(records) * pps / first_s,
            "ratio": cttiming.ratio(s["loader"], s["train"], n_batches * batch, batch,
                                   load_dependent=True),
            "ratio_cold": cttiming.ratio([cold[1]] * 2, [cold[0], cold[2]],
                                         len(records) * pps, batch, load_dependent=True),
            "load_before": load0, "load_after": load()}


def untrained_run(run: Path, preset: str = "small") -> Path:
    """A run folder with an untrained generator of ``preset`` (speed and memory do not depend
    on the weights)."""
    import Mymodel

    run.mkdir(parents=True)
    cfg = ctrun.model_config(preset)
    ctrun.write_run_config(run, {"model": cfg})
    gen, _ = Mymodel.build_models(cfg)
    gen.save_weights(str(run / ctrun.LATEST))
    return run


def bench_eval(n: int, shape: tuple[int, int], timeout: float) -> dict:
    """``Myevaluation.py --pred`` on ``n`` paired slices (RED-CNN .npy: phantom full dose plus
    25 HU noise; predictions of an untrained generator by Mytest.py). ``slices_per_s`` is the
    scoring rate the command reports (every protocol and the noise texture; its one XLA compile
    per slice size included); ``command_s`` the whole command with its start-up."""
    import re

    import ctfixtures

    work = Path(tempfile.mkdtemp(prefix="cncl_bench_eval_"))
    try:
        rng = np.random.default_rng(0)
        (work / "data").mkdir()
        for i in range(n):
            fd = ctfixtures.ellipse_phantom(shape, rng)
            ctio.write_npy_redcnn(work / "data" / f"B001_{i}_target.npy", fd)
            ctio.write_npy_redcnn(work / "data" / f"B001_{i}_input.npy",
                                  fd + rng.normal(0, 25, shape))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        run = untrained_run(work / "run")
        subprocess.run([sys.executable, str(REPO / "Mytest.py"), "--data", str(work / "data"),
                        "--run", str(run), "--out", str(work / "out"), "--no-figures"],
                       check=True, capture_output=True, env=env, timeout=timeout)
        start = time.perf_counter()
        r = subprocess.run([sys.executable, str(REPO / "Myevaluation.py"), "--pred",
                            str(work / "out")], capture_output=True, text=True, env=env,
                           timeout=timeout)
        seconds = time.perf_counter() - start
        m = re.search(r"scored (\d+) slices in ([\d.]+) s", r.stdout)
        if r.returncode != 0 or not m or int(m[1]) != n:
            return {"status": "pending", "reason": f"Myevaluation.py exit {r.returncode}: "
                                                   f"{r.stderr.strip()[-200:]}"}
        return {"status": "ok", "slices": n, "shape": list(shape), "command_s": seconds,
                "scoring_s": float(m[2]), "slices_per_s": n / float(m[2]), "load_after": load()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_memory(counts: tuple[int, int], shape: tuple[int, int], batch: int,
                 timeout: float) -> dict:
    """Peak RSS of Mytest.py denoising a small and a large generated DICOM folder."""
    mytest = REPO / "Mytest.py"
    out: dict[str, Any] = {"shape": list(shape), "counts": list(counts), "batch": batch,
                           "tool": "Mytest.py", "measure": "ru_maxrss of the Mytest.py process "
                           "(os.wait4 in a small probe process; cross-checked by polling "
                           "/proc/PID/status VmHWM)", "load_before": load()}
    if not mytest.is_file():
        return {**out, "status": "pending", "reason": "Mytest.py not found"}
    work = Path(tempfile.mkdtemp(prefix="cncl_bench_mem_"))
    try:
        run = untrained_run(work / "run")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        for n in counts:
            data = write_dicom_series(work / f"data{n}", n, shape, seed=n)
            cmd = [sys.executable, str(mytest), "--data", str(data), "--run", str(run),
                   "--out", str(work / f"out{n}"), "--batch", str(batch), "--no-figures"]
            r = ctprocess.peak_rss_of(cmd, env, timeout)
            r["outputs"] = len(list((work / f"out{n}").rglob("*.npy")))
            out[f"slices_{n}"] = r
            if r["exit_code"] != 0 or r["outputs"] != n:
                return {**out, "status": "pending",
                        "reason": f"Mytest.py exit {r['exit_code']} on {n} slices "
                                  f"({r['outputs']} outputs): {r['stderr_tail']}"}
        lo, hi = (out[f"slices_{n}"]["peak_rss_mb"] for n in counts)
        out.update(status="ok", mem_ratio=hi / lo,
                   kb_per_extra_slice=(hi - lo) * 1024 / (counts[1] - counts[0]),
                   load_after=load())
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- Scale: the Mayo-size fixture through every tool ---------------------------------------------
SCALE_PATIENTS, SCALE_SLICES = 10, 240  # the Mayo 2016 3 mm set: 10 patients, ~2,400 pairs
SCALE_SERIES = 560  # slices of one patient's 1 mm series (Mytest.py at patient scale)
SCALE_PAPER_SLICES = 20  # the paper preset is timed on this many slices (~5-20 s each here)
SCALE_EVAL_SLICES = 240


def scale_train(data: Path, exclude: list[str], work: Path, name: str, cache: Path,
                quick: bool, timeout: float) -> dict:
    """Peak RSS and timings of ``Mytrain.py`` (small preset, 2 epochs x 1 step, no validation)
    on ``data`` without the ``exclude`` patients, its slice cache in ``cache``.

    ``cache_fill_s``: from the "slice cache" line to the next (every slice decoded into the
    cache); ``first_step_s``: from the start of the command to the end of epoch 1 (one step,
    traced), TensorFlow's import included."""
    cmd = [sys.executable, "-u", str(REPO / "Mytrain.py"), "--data", str(data), "--out",
           str(work / name), "--preset", "small", "--epochs", "2", "--steps-per-epoch", "1",
           "--val-patients", "none", "--verbose", "2", "--cache-dir", str(cache),
           "--l1-warmup", "0"]  # epoch 1 is the adversarial step, as before the recipe's warm-up
    cmd += (["--patch", "32", "--batch", "2"] if quick else []) + (
        ["--exclude", *exclude] if exclude else [])
    r = ctprocess.peak_rss_of(cmd, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout, lines=True)
    lines = r.pop("lines")
    t_cache = ctprocess.line_time(lines, r"^slice cache:")
    t_next = None if t_cache is None else next(
        (t for t, _ in lines if t > t_cache), None)
    m = next((re.match(r"data: (\d+) training slices", text) for _, text in lines
              if text.startswith("data: ")), None)
    return {**r, "training_pairs": int(m[1]) if m else None,
            "cache_fill_s": None if t_next is None else t_next - t_cache,
            "first_step_s": ctprocess.line_time(lines, r"^1/1 - "),
            "stdout_tail": [text for _, text in lines[-3:]]}


def scale_loader(records: list, cache: Path, n_batches: int) -> dict:
    """``make_train_dataset`` patches/s (PATCH^2, batch TRAIN_BATCH) read from an already
    filled slice cache, after a warm-up."""
    ctio.import_tensorflow()
    import MyDataLoader_train as loader

    t0 = time.perf_counter()
    it = iter(loader.make_train_dataset(records, patch=PATCH, batch=TRAIN_BATCH,
                                        cache_dir=cache))
    _sync(next(it))
    first = time.perf_counter() - t0
    for _ in range(max(2, n_batches // 5)):
        _sync(next(it))
    t0 = time.perf_counter()
    for _ in range(n_batches):
        _sync(next(it))
    steady = time.perf_counter() - t0
    return {"slices": len(records), "patch": PATCH, "batch": TRAIN_BATCH,
            "first_batch_s": first, "patches_per_s": n_batches * TRAIN_BATCH / steady}


def scale_infer(series: Path, n: int, preset: str, work: Path, timeout: float) -> dict:
    """``Mytest.py --format dicom`` on the ``n``-slice series (an untrained ``preset``
    generator): peak RSS, the s/slice it reports, and the derived series check."""
    run = untrained_run(work / f"run_{preset}", preset)
    out = work / f"out_{preset}"
    cmd = [sys.executable, "-u", str(REPO / "Mytest.py"), "--data", str(series), "--run",
           str(run), "--out", str(out), "--format", "dicom", "--no-figures"]
    r = ctprocess.peak_rss_of(cmd, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout, lines=True)
    lines = r.pop("lines")
    m = next((re.search(r"denoised (\d+) slice\(s\) in ([\d.]+) s", text) for _, text in lines
              if text.startswith("denoised ")), None)
    res = {**r, "preset": preset, "slices": n, "stdout_tail": [t for _, t in lines[-2:]]}
    if r["exit_code"] != 0 or not m:
        return {**res, "status": "failed"}
    s_per_slice = float(m[2]) / int(m[1])
    return {**res, "status": "ok", "denoise_s": float(m[2]), "s_per_slice": s_per_slice,
            "patient_minutes_560": s_per_slice * SCALE_SERIES / 60,
            "derived_series": ctprocess.check_derived_series(out, series)}


def bench_scale(data: Optional[Path], quick: bool, timeout: float, say: Callable) -> dict:
    """Section ``scale`` (issue 16): the Mayo-like fixture (``Mysimulate.py --mayo-like``,
    built here unless ``data`` is given) through discovery, the training loader, Mytrain.py at
    one patient's and all patients' pairs (peak RSS, cache fill, time to the first step),
    Mytest.py on a 560-slice series (small; paper on SCALE_PAPER_SLICES slices) and
    Myevaluation.py."""
    patients, slices, size = (2, 3, 64) if quick else (SCALE_PATIENTS, SCALE_SLICES, SLICE)
    work = Path(tempfile.mkdtemp(prefix="cncl_bench_scale_"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    res: dict[str, Any] = {"load_before": load()}
    try:
        if data is None:
            data = work / "mayo"
            say(f"scale: Mysimulate.py --mayo-like ({patients} x {slices} pairs of {size}^2) ...")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "Mysimulate.py"), "--mayo-like",
                            str(data), "--patients", str(patients), "--slices", str(slices),
                            "--size", str(size)], check=True, capture_output=True, env=env,
                           cwd=REPO, timeout=timeout)
            res["fixture_build_s"] = time.perf_counter() - t0
        marker = data / "SIMULATION.json"
        res["fixture"] = {"path": str(data), **(json.loads(marker.read_text())
                                                if marker.is_file() else {})}
        say("scale: discovery (headers only) ...")
        t0 = time.perf_counter()
        ds = ctdata.discover(data)
        dt = time.perf_counter() - t0
        files = 2 * len(ds.records) if ds.paired else len(ds.records)
        res["discovery"] = {"files": files, "seconds": dt, "files_per_s": files / dt}
        names = ds.patients
        per_patient = {p: sum(r.patient == p for r in ds.records) for p in names}
        say(f"scale: Mytrain.py on {per_patient[names[0]]} and {len(ds.records)} pairs "
            "(cold slice cache), then warm ...")
        train = {"one_patient": scale_train(data, names[1:], work, "train_one", work / "c1",
                                            quick, timeout),
                 "all": scale_train(data, [], work, "train_all", work / "c_all", quick, timeout)}
        train["all_warm"] = scale_train(data, [], work, "train_all_warm", work / "c_all", quick,
                                        timeout)
        one, every = train["one_patient"], train["all"]
        train["rss_ratio"] = every["peak_rss_mb"] / one["peak_rss_mb"]
        res["train"] = train
        say("scale: loader patches/s from the filled cache ...")
        res["loader"] = scale_loader(ds.records, work / "c_all", 20 if quick else 100)
        shutil.rmtree(work / "c1", ignore_errors=True)
        shutil.rmtree(work / "c_all", ignore_errors=True)  # GBs of decoded slices
        n_series = 8 if quick else SCALE_SERIES
        say(f"scale: Mytest.py on a {n_series}-slice series, small preset ...")
        series = write_dicom_series(work / "series", n_series, (size, size))
        res["infer"] = {"small": scale_infer(series, n_series, "small", work, timeout)}
        if not quick:
            n_paper = SCALE_PAPER_SLICES
            say(f"scale: Mytest.py paper preset on {n_paper} slices ...")
            few = write_dicom_series(work / "series_paper", n_paper, (size, size))
            res["infer"]["paper"] = scale_infer(few, n_paper, "paper", work, timeout)
        n_eval = 4 if quick else SCALE_EVAL_SLICES
        say(f"scale: Myevaluation.py on {n_eval} slices ...")
        res["eval"] = bench_eval(n_eval, (size, size), timeout)
        res["load_after"] = load()
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- Report ---------------------------------------------------------------------------------------
def _fmt(v: Optional[float], nd: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def print_table(res: dict) -> None:
    """The benchmark table, one row a measured figure in the order of the sections (one
    piece: a layout, not logic)."""
    m = res["machine"]
    print(f"\nCNCL benchmark  preset={res['preset']}  jit={res['jit']}"
          f"{'  QUICK (smoke run, not representative)' if res['quick'] else ''}")
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, TF {m['tensorflow']}, "
          f"Keras {m['keras']}; load average {m['load_start'][0]} at start, "
          f"{m['load_end'][0]} at end")
    print(f"kernels: {m['kernels']}; CPU flags: {', '.join(m['cpu_features']) or 'none found'} "
          f"(native bfloat16: {'yes' if m['native_bfloat16'] else 'no'})")
    rows = [("section", "case", "rate", "unit", "GFLOP/s", "MFU", "median s", "n")]

    def add(sec, case, rate, unit, gf=None, mfu=None, med=None, n=None):
        rows.append((sec, case, _fmt(rate), unit, _fmt(gf, 1), _fmt(mfu) if not isinstance(
            mfu, str) else mfu, _fmt(med, 3), "" if n is None else str(n)))

    mm = res.get("matmul")
    if mm:
        backend = kernel_library
        add("peak", f"matmul {mm['n']}^2 float32 ({backend(mm['onednn'])}, this run)",
            mm["gflops"], "GFLOP/s", mm["gflops"], None, mm["float32"]["median_s"],
            mm["float32"]["repeats"])
        other = mm.get("other_backend")
        if other:
            add("peak", f"matmul {mm['n']}^2 float32 ({backend(other['onednn'])}, "
                "fresh process)", other["gflops"], "GFLOP/s", other["gflops"], None,
                other["float32"]["median_s"], other["float32"]["repeats"])
        for dt in ("bfloat16", "float16"):
            if dt in mm:
                add("peak", f"matmul {mm['n']}^2 {dt}", mm[dt]["gflops"], "GFLOP/s",
                    mm[dt]["gflops"], None, mm[dt]["median_s"], mm[dt]["repeats"])
    hw = m["hardware_peak"]
    if hw.get("gflops"):
        add("peak", f"FMA hardware {hw['cores']} x {hw['mhz'] / 1e3:.2f} GHz x "
            f"{hw['flop_per_cycle']}", hw["gflops"], "GFLOP/s", hw["gflops"])
    for sec in ("train", "train_bf16"):
        for name, t in res.get(sec, {}).items():
            unit = "patches/s" if name.startswith("patch") else "slices/s"
            add(sec.replace("_", " "), f"{t['size']}^2 x batch {t['batch']}",
                t["examples_per_s"], unit, t["gflops"], _mfu_cell(t), t["median_s"], t["repeats"])
    for sec in ("infer", "infer_bf16"):
        for t in res.get(sec, {}).values():
            add(sec.replace("_", " "), f"{t['size']}^2 x batch {t['batch']}", t["slices_per_s"],
                "slices/s", t["gflops"], _mfu_cell(t), t["median_s"], t["repeats"])
    ld = res.get("loader")
    if ld:
        add("data", f"decode ({ld['slices']} x {ld['shape'][0]}^2, first pass)",
            ld["decode_slices_per_s"], "slices/s")
        add("data", f"make_train_dataset {ld['patch']}^2 (cached)", ld["patches_per_s"],
            "patches/s")
        add("data", "loader_ratio (cached / train, interleaved)", res.get("loader_ratio"), "x")
        add("data", "loader_ratio_cold (first pass / train beside it)",
            res.get("loader_ratio_cold"), "x")
    mem = res.get("memory")
    if mem:
        if mem.get("status") == "ok":
            for n in mem["counts"]:
                s = mem[f"slices_{n}"]
                add("memory", f"Mytest {n} x {mem['shape'][0]}^2 peak RSS", s["peak_rss_mb"],
                    "MiB", med=s["seconds"])
            add("memory", "mem_ratio (large / small)", mem["mem_ratio"], "x")
        else:
            rows.append(("memory", "PENDING: " + mem.get("reason", "")[:60], "-", "", "", "", "",
                         ""))
    ev = res.get("eval")
    if ev and ev.get("status") == "ok":
        add("eval", f"Myevaluation {ev['slices']} x {ev['shape'][0]}^2 (3 methods, "
            "4 protocols, texture)", ev["slices_per_s"], "slices/s", med=ev["command_s"])
    elif ev:
        rows.append(("eval", "PENDING: " + ev.get("reason", "")[:60], "-", "", "", "", "", ""))
    sc = res.get("scale")
    if sc:
        d = sc["discovery"]
        add("scale", f"discovery, {d['files']} DICOM headers", d["files_per_s"], "files/s",
            med=d["seconds"])
        for key, what in (("one_patient", "one patient"), ("all", "all patients"),
                          ("all_warm", "all patients, cache filled")):
            t = sc["train"][key]
            add("scale", f"Mytrain small, {t['training_pairs']} pairs ({what}) peak RSS",
                t["peak_rss_mb"], "MiB", med=t["seconds"])
            add("scale", "  time to the end of the first step", t["first_step_s"], "s")
            if key != "all_warm":
                add("scale", "  slice cache fill (decode every pair)", t["cache_fill_s"], "s")
        add("scale", "train_rss_ratio (all / one patient)", sc["train"]["rss_ratio"], "x")
        add("scale", f"loader {sc['loader']['patch']}^2 x {sc['loader']['batch']} from the cache",
            sc["loader"]["patches_per_s"], "patches/s")
        for preset, t in sc["infer"].items():
            if t.get("status") == "ok":
                add("scale", f"Mytest {preset}, {t['slices']}-slice series", t["s_per_slice"],
                    "s/slice", med=t["seconds"])
                add("scale", f"  peak RSS; 560 slices {t['patient_minutes_560']:.1f} min; "
                    f"one series: {t['derived_series']['one_series']}", t["peak_rss_mb"], "MiB")
            else:
                rows.append(("scale", f"Mytest {preset} FAILED: {t.get('stderr_tail', '')[:50]}",
                             "-", "", "", "", "", ""))
        ev = sc["eval"]
        if ev.get("status") == "ok":
            add("scale", f"Myevaluation {ev['slices']} slices", ev["slices_per_s"], "slices/s",
                med=ev["command_s"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j < 2 or j == 3 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("FLOPs: " + FLOPS_CONVENTION)
    if res.get("ratios"):
        print("ratios, each within interleaved pairs (A, B, A, B ...: the matmul of the same "
              "precision timed beside every row for its MFU), median [min-max] over the clean "
              "pairs; a pair is disturbed when others' CPU use changed within it by > "
              f"{cttiming.DISTURBED_CORES} cores:")
        for name, r in res["ratios"].items():
            print("  " + cttiming.describe(name, r))
    print(f"hardware peak: {hw['derivation']}"
          + (f"; the float32 matmul reaches {mm['gflops'] / hw['gflops']:.0%} of it"
             + (" (above 100 %: this peak is not the true one)"
                if mm["gflops"] > hw["gflops"] else "") if mm and hw.get("gflops") else ""))
    bf = res.get("bf16")
    if bf:
        print(f"bfloat16 rows: {'measured' if bf['measured'] else 'skipped'} ({bf['reason']})")
    for sec in ("train", "infer"):
        for t in res.get(sec, {}).values():
            if t.get("trace"):
                print(ctprofile.trace_line(sec, t))
    if ld:
        print(f"data: {ld['data']}; loader_ratio = cached patches/s / train patches/s "
              f"({ld['patch']}^2, batch {res['train_batch']}); cold = first-pass decode rate x "
              f"{ld['patches_per_slice']} patches per slice / train patches/s")


def _mfu_cell(t: dict) -> str:
    """The MFU column of a row: its median, 'invalid' (> 1) or marked disturbed."""
    r = t["mfu_ratio"]
    return {"invalid": "invalid", "disturbed": f"{_fmt(r['value'])} disturbed"}.get(
        r["status"], _fmt(r["value"]))


def bf16_decision(choice: str, features: frozenset[str]) -> tuple[bool, str]:
    """Whether to measure the bfloat16 rows for ``--precision-rows choice``, and why."""
    precision, why = ctmachine.auto_precision(features)
    native = precision == "bfloat16"
    if choice == "float32":
        return False, "--precision-rows float32"
    if choice == "all":
        return True, "--precision-rows all" + ("" if native else (
            f"; {why.removeprefix('auto: ')}: its figures are NOT a bfloat16 speed"))
    if native:
        return True, why
    return False, (f"{why}; emulated bfloat16 is no speed figure "
                   "(--precision-rows all measures it anyway)")


# --- Main -----------------------------------------------------------------------------------------
class Bench:
    """What every section reads (flags, sizes, the matmul cases timed beside each section) and
    the result dict it fills."""

    def __init__(self, args: argparse.Namespace, res: dict, cfg: dict, bf16: bool) -> None:
        self.args, self.res, self.cfg, self.bf16 = args, res, cfg, bf16
        self.quick, self.paper = args.quick, args.preset == "paper"
        self.jit, self.rep, self.patch = args.jit == "on", args.repeats, args.patch
        # Sizes and repeats: paper steps take seconds on a CPU, so fewer repeats there.
        self.slice_size = 128 if self.quick else SLICE
        self.train_batches = args.train_batches or ([TRAIN_BATCH] if self.quick else
                                                    [TRAIN_BATCH, 32])
        # --quick skips whole-slice training: each train graph costs a long trace (tens of s).
        self.slice_batches = (([] if self.quick else [1]) if args.slice_batches is None
                              else args.slice_batches)
        self.infer_batches = args.infer_batches or ([1, 2] if self.quick else [1, 2, 4]
                                                    if self.paper else [1, 2, 4, 8])
        self.mm: dict[str, dict] = {}  # dtype -> matmul_case, timed beside every section
        self.train_head: Optional[dict] = None  # the headline float32 train_case
        res["ratios"] = {}

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {load():.2f}] {msg}", flush=True)

    def rounds(self, quick: int, full: int) -> int:
        return self.rep or (quick if self.quick else full)

    def peak(self, precision: str) -> dict:
        """The matmul case an MFU of ``precision`` is measured against (made on first use)."""
        dt = "bfloat16" if precision == "bfloat16" else "float32"
        if dt not in self.mm:
            self.mm[dt] = ctmachine.matmul_case(1024 if self.quick else 4096, dt)
        return self.mm[dt]

    def timed(self, key: str, case: dict, rounds: int) -> dict:
        """``case`` interleaved with the matmul of its precision: its row, MFU within pairs."""
        peak = self.peak(case["precision"])
        s = cttiming.interleave({"case": case["fn"], "peak": peak["fn"]}, rounds)
        row = timed_row(case, s["case"], s["peak"], peak)
        self.res["ratios"][key + " mfu"] = row["mfu_ratio"]
        return row

    def versus(self, key: str, f32: dict, b16: dict, rounds: int) -> tuple[dict, dict]:
        """bfloat16 ``b16`` vs float32 ``f32`` interleaved (with the bfloat16 matmul): the bf16
        row (MFU against that matmul) and the speed-up ratio within pairs."""
        peak = self.peak("bfloat16")
        s = cttiming.interleave({"f32": f32["fn"], "bf16": b16["fn"], "peak": peak["fn"]},
                                rounds)
        row = timed_row(b16, s["bf16"], s["peak"], peak)
        speed = cttiming.ratio(s["bf16"], s["f32"], b16["examples"], f32["examples"],
                           load_dependent=True)
        self.res["ratios"][key + " mfu"] = row["mfu_ratio"]
        self.res["ratios"][key.split()[0] + "_bf16_speedup"] = speed
        return row, speed


def run_matmul(b: Bench) -> None:
    res = b.res
    n = 1024 if b.quick else 4096
    b.say(f"matmul {n}^2 float32{' and bfloat16, interleaved' if b.bf16 else ''} ...")
    res["matmul"] = mm = ctmachine.bench_matmul(n, b.rounds(3, 10), b.bf16)
    res["matmul_gflops"] = mm["gflops"]
    res["matmul_gflops_bf16"] = mm.get("bfloat16", {}).get("gflops")
    if not b.quick and mm["device"] == "CPU":
        # TF's CPU matmul comes from Eigen or oneDNN: which is faster here (information; MFU
        # is against the matmul of this process, the kernels the sections run).
        b.say(f"matmul {n}^2 float32 with oneDNN {'off' if mm['onednn'] else 'on'} "
              "(fresh process) ...")
        other = ctmachine.matmul_other_backend(n, b.rounds(10, 10))
        if other:
            mm["other_backend"] = other


def run_train(b: Bench) -> None:
    res, cfg, warmup = b.res, b.cfg, 1 if b.quick else 2
    res["train"] = {}
    cases = [(f"patch{b.patch}_b{n}", n, b.patch, b.rounds(3, 5)) for n in b.train_batches] + [
        (f"slice{b.slice_size}_b{n}", n, b.slice_size, b.rounds(2, 3)) for n in b.slice_batches]
    for key, n, size, rounds in cases:
        b.say(f"train step {size}^2 x batch {n}, interleaved with the matmul ...")
        case = train_case(cfg, n, size, b.jit, warmup if size == b.patch else 1)
        res["train"][key] = b.timed(f"train {key}", case, rounds)
        if b.train_head is None:
            b.train_head = case
            if b.args.trace:
                res["train"][key]["trace"] = ctprofile.trace_case(case, b.args.trace, 2, b.jit)
    head = res["train"][cases[0][0]]
    res["train_patches_per_s"] = head["examples_per_s"]
    res["train_mfu"] = head["mfu"]
    res["train_best_mfu"] = max((t["mfu"] for t in res["train"].values() if t["mfu"]),
                                default=None)
    if b.slice_batches:
        sl = res["train"][f"slice{b.slice_size}_b{b.slice_batches[0]}"]
        res["train_slices_per_s"] = sl["examples_per_s"]
        res["train_slice_mfu"] = sl["mfu"]
    if b.bf16:
        key, n = cases[0][0], cases[0][1]
        b.say(f"train step {b.patch}^2 x batch {n}: bfloat16 and float32 interleaved ...")
        t16 = train_case(cfg, n, b.patch, b.jit, warmup, precision="bfloat16")
        t, speed = b.versus(f"train {key} bfloat16", b.train_head, t16, b.rounds(3, 5))
        res["train_bf16"] = {key: t}
        res["train_patches_per_s_bf16"] = t["examples_per_s"]
        res["train_mfu_bf16"] = t["mfu"]
        res["train_bf16_speedup"] = speed["value"]


def run_infer(b: Bench) -> None:
    res, size = b.res, b.slice_size
    res["infer"], cases = {}, {}
    for n in b.infer_batches:
        b.say(f"inference {size}^2 x batch {n}, interleaved with the matmul ...")
        cases[n] = infer_case(b.cfg, n, size, b.jit, 1)
        res["infer"][f"b{n}"] = t = b.timed(f"infer b{n}", cases[n], b.rounds(2, 3))
        t["slices_per_s"] = t["examples_per_s"]
        if b.args.trace and n == b.infer_batches[0]:
            t["trace"] = ctprofile.trace_case(cases[n], b.args.trace, 1, b.jit)
    best = max(res["infer"].values(), key=lambda t: t["slices_per_s"])
    one = res["infer"].get("b1") or res["infer"][f"b{b.infer_batches[0]}"]
    res["infer_slices_per_s"] = best["slices_per_s"]
    res["infer_mfu"] = best["mfu"]
    res["infer_best_batch"] = best["batch"]
    res["infer_batch1_slices_per_s"] = one["slices_per_s"]
    res["infer_batch1_mfu"] = one["mfu"]
    if b.bf16:  # at the best float32 batch
        n = best["batch"]
        b.say(f"inference {size}^2 x batch {n}: bfloat16 and float32 interleaved ...")
        i16 = infer_case(b.cfg, n, size, b.jit, 1, precision="bfloat16")
        t, speed = b.versus(f"infer b{n} bfloat16", cases[n], i16, b.rounds(2, 3))
        t["slices_per_s"] = t["examples_per_s"]
        res["infer_bf16"] = {f"b{n}": t}
        res["infer_slices_per_s_bf16"] = t["slices_per_s"]
        res["infer_mfu_bf16"] = t["mfu"]
        res["infer_bf16_speedup"] = speed["value"]


def run_data(b: Bench) -> None:
    res, args, quick = b.res, b.args, b.quick
    if b.train_head is None:  # no training section in this run: a train step to compare with
        b.say("train step for the loader ratio ...")
        b.train_head = train_case(b.cfg, b.train_batches[0], b.patch, b.jit, 1)
    work = None
    try:
        data = Path(args.data) if args.data else (None if quick else default_data())
        if data is None:
            work = Path(tempfile.mkdtemp(prefix="cncl_bench_data_"))
            n, shape = (6, (128, 128)) if quick else (56, (SLICE, SLICE))
            data = write_dicom_series(work / "dicom", n, shape)
            described = f"generated DICOM ({n} slices of {shape[0]}x{shape[1]}, ctio)"
        else:
            described = str(data)
        b.say(f"data loader on {data}, interleaved with train steps ...")
        res["loader"] = ld = bench_loader(data, described, b.train_head, 5 if quick else 20,
                                          b.rounds(3, 5), 0.25)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    res["ratios"]["loader_ratio"] = ld["ratio"]
    res["ratios"]["loader_ratio_cold"] = ld["ratio_cold"]
    res["loader_ratio"] = ld["ratio"]["value"]
    res["loader_ratio_cold"] = ld["ratio_cold"]["value"]


def run_memory(b: Bench) -> None:
    counts, shape = ((10, 40), (64, 64)) if b.quick else ((20, 200), (SLICE, SLICE))
    b.say(f"memory: Mytest.py on {counts[0]} and {counts[1]} generated slices ...")
    b.res["memory"] = bench_memory(counts, shape, 4, timeout=900)
    b.res["mem_ratio"] = b.res["memory"].get("mem_ratio")


def run_eval(b: Bench) -> None:
    n, shape = (4, (128, 128)) if b.quick else (60, (SLICE, SLICE))
    b.say(f"evaluation: Myevaluation.py on {n} slices of {shape[0]}^2 ...")
    b.res["eval"] = bench_eval(n, shape, timeout=900)
    b.res["eval_slices_per_s"] = b.res["eval"].get("slices_per_s")


def run_scale(b: Bench) -> None:
    res = b.res
    data = Path(b.args.scale_data) if b.args.scale_data else None
    sc = res["scale"] = bench_scale(data, b.quick, 7200, b.say)
    train, infer = sc["train"], sc["infer"]
    small, paper = infer["small"], infer.get("paper", {})
    res.update(
        scale_discovery_files_per_s=sc["discovery"]["files_per_s"],
        scale_training_pairs=train["all"]["training_pairs"],
        scale_train_peak_rss_mb=train["all"]["peak_rss_mb"],
        scale_train_rss_ratio=train["rss_ratio"],
        scale_cache_fill_s=train["all"]["cache_fill_s"],
        scale_first_step_s=train["all"]["first_step_s"],
        scale_first_step_warm_s=train["all_warm"]["first_step_s"],
        scale_loader_patches_per_s=sc["loader"]["patches_per_s"],
        scale_infer_s_per_slice=small.get("s_per_slice"),
        scale_infer_peak_rss_mb=small.get("peak_rss_mb"),
        scale_patient_minutes=small.get("patient_minutes_560"),
        scale_infer_s_per_slice_paper=paper.get("s_per_slice"),
        scale_patient_minutes_paper=paper.get("patient_minutes_560"),
        scale_dicom_one_series=small.get("derived_series", {}).get("one_series"),
        scale_eval_slices_per_s=sc["eval"].get("slices_per_s"))


# Section name -> what runs it, in this order; matmul also runs for train and infer (their MFU).
RUNNERS: dict[str, Callable[[Bench], None]] = {
    "matmul": run_matmul, "train": run_train, "infer": run_infer, "data": run_data,
    "memory": run_memory, "eval": run_eval, "scale": run_scale}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.onednn != "default":  # read once by TF at import
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if args.onednn == "on" else "0"
    tf = ctio.import_tensorflow()
    if args.intra_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    import keras

    import Mymodel

    ctmachine.set_precision("float32")  # bfloat16 rows: in ctmachine.precision_policy
    cfg = {**Mymodel.model_config(args.preset), "adv_weight": args.adv_weight}
    bf16, why = bf16_decision(args.precision_rows, ctmachine.cpu_features())
    res: dict[str, Any] = {"preset": args.preset, "model": cfg, "quick": args.quick,
                           "jit": args.jit, "machine": machine_info(tf, keras),
                           "flops_convention": FLOPS_CONVENTION,
                           "bf16": {"measured": bf16, "reason": why}}
    for k in REQUIRED_KEYS + BF16_KEYS + SCALE_KEYS:
        res[k] = None
    bench = Bench(args, res, cfg, bf16)
    res["train_batch"] = bench.train_batches[0]
    wanted = set(args.sections) | ({"matmul"} if {"train", "infer"} & set(args.sections)
                                   else set())
    for name, run in RUNNERS.items():
        if name in wanted:
            run(bench)
    res["machine"]["load_end"] = list(np.round(os.getloadavg(), 2))
    print_table(res)
    if args.json:
        with ctio.atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)

"""The training run folder: its file names, config.json, weights, history and state, and the
manifest of a Mytest.py output folder. The one owner of these names; no TensorFlow.

RUN_DIR (written by Mytrain.py)::

    config.json                    CONFIG_VERSION, model (see model_config), normalisation,
                                   every training flag, the data split, library versions
    generator_latest.weights.h5    generator after the last finished epoch
    generator_best.weights.h5      the epoch Mytrain --select chose (ctselect; see state.json)
    state/state.json               epoch, minutes, history, best epoch; written LAST each epoch
    state/gan_epochNNNN.weights.h5 G, D and both optimizers (for --resume and worker restarts)
    snapshots/generator_epochNNNN.weights.h5   --snapshot-every
    history.csv                    one row per finished epoch
    tensorboard/, cache/           TensorBoard logs; decoded training slices (--cache-dir)

OUT (written by Mytest.py)::

    manifest.csv                   one row per slice (MANIFEST_FIELDS)

Also here: the model presets and :func:`model_config`, because config.json holds the model and
Mytest.py / Myevaluation.py / Mybenchmark.py must read and check it before importing TensorFlow
(Mymodel.py builds the networks from these configurations); the training recipes (Mytrain.py's
defaults, reported by MyDataLoader_train.py); and the checks every output folder passes before
any work (:func:`refuse_overlap`, :func:`check_writable`): outputs never go into input data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import ctio

REPO = Path(__file__).resolve().parent
RUNS_DIR = REPO / "runs"  # default parent of run folders

CONFIG = "config.json"
LATEST = "generator_latest.weights.h5"
BEST = "generator_best.weights.h5"
GENERATOR = {"latest": LATEST, "best": BEST}
STATE = "state"
STATE_JSON = "state.json"
SNAPSHOTS = "snapshots"
HISTORY = "history.csv"
TENSORBOARD = "tensorboard"
CACHE = "cache"
MANIFEST = "manifest.csv"
_SNAPSHOT = re.compile(r"generator_epoch(\d+)\.weights\.h5$")
_STATE_WEIGHTS = re.compile(r"gan_epoch\d+\.weights\.h5$")

# config.json format. 2: train.precision is the one precision key (1 also had the older
# train.mixed_precision, which meant precision float16); read_run_config migrates 1 to 2.
CONFIG_VERSION = 2

# --- Model configuration ------------------------------------------------------------------------
# Version of the network definition. 2 = the official CNCL code layer for layer (linear finest
# decoder level, bilinear up-sampling with aligned corners, [up, skip] concatenation, PatchGAN
# with affine-free instance norm and the official asymmetric padding before a bias-free last conv).
# Weights of version 1 (before 2026-12) have other shapes and are refused, not loaded wrongly.
ARCH = 2
NORMS = ("batch", "instance", "none")

# Model-size presets.
#
# ``paper`` is the architecture of the official CNCL code: two U-Nets of ~21.9M
# parameters each, 43.9M for the generator (+2.8M for the PatchGAN).
#
# ``small`` is sized for a 2-core CPU. Measured full GAN ``train_step`` (G and D updates,
# LSGAN + L1, Adam, float32, tf.function without XLA), batch 16 of 64x64 patches, TF 2.21,
# 2 cores, median of 10 steps after warm-up, machine nearly idle (load ~2):
#   base  8 / depth 3 / disc 16: G 0.17M params, 0.30 s/step (0.55 CPU-s)
#   base  8 / depth 4 / disc 16: G 0.69M params, 0.37 s/step (0.69 CPU-s)  <- small
#   base 16 / depth 3 / disc 16: G 0.69M params, 0.46 s/step (0.87 CPU-s)
#   base 16 / depth 4 / disc 16: G 2.76M params, ~1.0 s/step (1.1 CPU-s)
# No candidate with base >= 8 reaches 0.15 s/step on this CPU (XLA on CPU did not help).
# base 8 / depth 4 costs ~20% more than depth 3 but has 4x the parameters and one more 2x
# down-sampling (larger receptive field; CT noise is spatially correlated), and is 20% faster
# than base 16 / depth 3 with the same parameter count.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"base_filters": 64, "depth": 4, "norm": "batch", "disc_filters": 64},
    "small": {"base_filters": 8, "depth": 4, "norm": "batch", "disc_filters": 16},
}


# The official loss balance in this project's normalisation. The official code normalises each
# image as (HU - mean_LD) / var_LD, so an L1 error there is 4096 / var_LD times the same error in
# (HU + 1024) / 4096 units; its lambda 100 is therefore 100 * 4096 / var_LD here. var_LD measured
# on the 7 real quarter-dose slices in ../shared/data (L506 x 6, L067 x 1): 213,000-251,000 HU^2
# (std 462-501 HU), median 236,727 -> 1.73 (range 1.63-1.92).
OFFICIAL_LAMBDA = 1.73
BLOCK_MEAN_PX = 16  # block side of Mymodel.block_mean_l1 (the --block-mean-weight term)

# Training recipes: every flag below, filled in where the command line leaves it unset.
RECIPES: dict[str, dict] = {
    # The official code's training (code/train.py): the paper network, whole 512^2 slices,
    # batch 2, Adam 2e-5 (0.5, 0.999), no augmentation, 300 passes over the data.
    "paper": {"preset": "paper", "epochs": 300, "steps_per_epoch": 0, "batch": 2, "patch": 0,
              "lr": 2e-5, "beta_1": 0.5, "beta_2": 0.999, "lr_decay": "none",
              "lambda_l1": OFFICIAL_LAMBDA, "adv_weight": 1.0, "augment": False,
              "block_mean_weight": 0.0, "spectrum_weight": 0.0, "ema_decay": 0.0,
              "l1_warmup": 0.0},
    # Fast CPU recipe: small network, 128^2 patches (larger than the discriminator's 94-pixel
    # receptive field, so the adversarial term sees texture), augmentation, the block-mean
    # CT-number term at weight 5 (cross-validated: the model's own soft-tissue shift -0.18 +- 0.25
    # HU over 7 folds instead of -0.48 +- 1.11, texture unchanged; README "Cross-validation"),
    # and an L1 warm-up over the first half of the epochs (cross-validated with two seeds: +0.28
    # and +0.36 dB, ROI noise 1.14 / 1.11 x full dose instead of 1.18 / 1.20, the model's own
    # shift sd 0.21 / 0.19 HU instead of 0.44 / 0.63; README "Moving average and warm start").
    "cpu": {"preset": "small", "epochs": 10, "steps_per_epoch": 100, "batch": 4, "patch": 128,
            "lr": 2e-4, "beta_1": 0.5, "beta_2": 0.999, "lr_decay": "none",
            "lambda_l1": OFFICIAL_LAMBDA, "adv_weight": 1.0, "augment": True,
            "block_mean_weight": 5.0, "spectrum_weight": 0.0, "ema_decay": 0.0,
            "l1_warmup": 0.5},
}
DEFAULT_RECIPE = "cpu"


def model_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """Return the JSON-serialisable model configuration of a preset.

    Args:
        preset: Name of a preset in :data:`PRESETS` (``"paper"`` or ``"small"``).
        **overrides: Replacement values for ``base_filters``, ``depth``, ``norm``
            or ``disc_filters``. ``None`` values are ignored, so command-line
            options that default to ``None`` can be passed straight through.

    Returns:
        ``{"preset", "arch", "base_filters", "depth", "norm", "disc_filters"}``.

    Raises:
        ValueError: unknown preset, unknown override key, invalid value, or a saved
            configuration of another network version (``arch``; missing = version 1).
    """
    arch = overrides.pop("arch", ARCH)
    if arch != ARCH:
        raise ValueError(
            f"the model was made by an older version of this tool (network version {arch}); "
            f"its weights do not fit the current network (version {ARCH}, the official CNCL "
            "layer for layer): train it again"
        )
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (choose from: {', '.join(PRESETS)})")
    cfg: dict[str, Any] = {"preset": preset, "arch": ARCH, **PRESETS[preset]}
    for key, value in overrides.items():
        if key not in PRESETS[preset]:
            raise ValueError(
                f"unknown model option '{key}' (choose from: {', '.join(PRESETS[preset])})"
            )
        if value is not None:
            cfg[key] = value
    for key in ("base_filters", "depth", "disc_filters"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)):
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
        cfg[key] = int(cfg[key])
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["base_filters"] < 2:
        raise ValueError("base_filters must be >= 2 (the last decoder conv has base//2)")
    cfg["norm"] = str(cfg["norm"])
    if cfg["norm"] not in NORMS:
        raise ValueError(f"unknown norm '{cfg['norm']}' (choose from: {', '.join(NORMS)})")
    return cfg


def saved_model_config(saved: dict[str, Any]) -> dict[str, Any]:
    """:func:`model_config` of a run's saved ``config.json`` model section.

    The saved sizes win over the preset's current values, so a run keeps loading if a preset is
    retuned. A section without ``arch`` was written before network versions existed (version 1).

    Raises:
        ValueError: as :func:`model_config`, e.g. for a version-1 model.
    """
    saved = dict(saved)
    return model_config(saved.pop("preset", "small"), **{"arch": 1, **saved})


# --- config.json --------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    with ctio.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_run_config(run: Path, config: dict) -> None:
    """RUN/config.json (version CONFIG_VERSION), atomically."""
    write_json(Path(run) / CONFIG, {"version": CONFIG_VERSION, **config})


def migrate_config(cfg: dict) -> dict:
    """A config.json of an older format in the current one (a new dict)."""
    cfg = {**cfg, "train": dict(cfg.get("train") or {})}
    if cfg.get("version", 1) < 2:  # 1 -> 2: one precision key
        train = cfg["train"]
        if train.pop("mixed_precision", False):
            train["precision"] = "float16"
        train.setdefault("precision", "float32")
    if cfg["train"]:  # runs made before these flags: no such term, no average, no warm-up
        for key in ("block_mean_weight", "spectrum_weight", "ema_decay", "l1_warmup"):
            cfg["train"].setdefault(key, 0.0)
        cfg["train"].setdefault("l1_warmup_epochs", 0)
    cfg["version"] = CONFIG_VERSION
    return cfg


def read_run_config(run: Path) -> dict:
    """RUN/config.json, migrated to CONFIG_VERSION, with its model configuration re-validated
    (``cfg["model"]`` is the checked :func:`model_config`) and the normalisation checked against
    this code's; every problem is one CTDataError line naming the file."""
    path = Path(run) / CONFIG
    cfg = ctio.read_json(path, f"{path}: no such file (is {run} a training run folder?)")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ctio.CTDataError(f"{path}: no \"model\" section (not a Mytrain.py configuration)")
    version = cfg.get("version", 1)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ctio.CTDataError(f"{path}: configuration version {version!r} is newer than this "
                               f"code's ({CONFIG_VERSION}); update the code")
    cfg = migrate_config(cfg)
    try:
        cfg["model"] = saved_model_config(cfg["model"])
    except (ValueError, TypeError) as e:
        raise ctio.CTDataError(f"{path}: {e}") from None
    norm = cfg.get("normalization", {})
    if isinstance(norm, dict):
        for key, want in (("hu_min", ctio.HU_MIN), ("hu_max", ctio.HU_MAX)):
            if key in norm and float(norm[key]) != want:
                raise ctio.CTDataError(f"{path}: normalization.{key} = {norm[key]} differs from "
                                       f"this code's {want:g}; the weights expect another scaling")
    return cfg


def record_epochs(run: Path, epochs: int) -> None:
    """Set ``train.epochs`` of RUN/config.json (a resumed run's new epoch total), atomically."""
    cfg = read_run_config(run)
    if cfg["train"].get("epochs") != epochs:
        cfg["train"]["epochs"] = int(epochs)
        write_run_config(run, cfg)


# --- Output folders: never into input data, writable before any work ----------------------------
def inside(child, parent) -> bool:
    """True if ``child`` is ``parent`` or lies under it (both resolved: links and ``..`` count)."""
    child, parent = Path(child).resolve(), Path(parent).resolve()
    return child == parent or parent in child.parents


def refuse_overlap(flag: str, path, inputs) -> None:
    """CTDataError if the output ``path`` of ``flag`` is inside an input folder, or holds one
    (a folder the tool writes into must share no file with the data it reads)."""
    for inp in inputs:
        if inside(path, inp):
            raise ctio.CTDataError(f"{flag} {path} is inside the input folder {inp}; outputs are "
                                   "never written into the input data")
        if inside(inp, path):
            raise ctio.CTDataError(f"{flag} {path} holds the input folder {inp}; outputs are "
                                   "never written into the input data")


def check_writable(flag: str, path) -> None:
    """CTDataError unless folder ``path`` can be created and written: it (or, if absent, its
    nearest existing parent) is a folder in which a probe folder can be made. A real probe, not
    ``os.access``: root passes that check on read-only file systems such as /sys."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ctio.CTDataError(f"{flag} {path}: {probe} exists and is not a folder")
    try:  # the name of an atomic_path temporary: a killed probe is cleaned up like one
        os.rmdir(tempfile.mkdtemp(prefix=f".probe.tmp{os.getpid()}.", dir=probe))
    except OSError as e:
        raise ctio.CTDataError(f"{flag} {path}: cannot write in {probe} "
                               f"({e.strerror or type(e).__name__})") from None


# --- Weights ------------------------------------------------------------------------------------
def generator_weights(run: Path, which: str = "best") -> Path:
    """RUN/generator_{best,latest}.weights.h5; ``best`` falls back to ``latest`` (a run without
    validation, or stopped before its first validation, has only the latter)."""
    names = [BEST, LATEST] if which == "best" else [GENERATOR[which]]
    for name in names:
        if (Path(run) / name).is_file():
            return Path(run) / name
    raise ctio.CTDataError(f"{run}: no {' or '.join(names)} (train first, or pass "
                           "--weights FILE)")


def snapshot_path(run: Path, epoch: int) -> Path:
    return Path(run) / SNAPSHOTS / f"generator_epoch{epoch:04d}.weights.h5"


def snapshot_epoch(path) -> Optional[int]:
    """The epoch of a ``--snapshot-every`` file (``generator_epochNNNN.weights.h5``), else None."""
    m = _SNAPSHOT.search(str(path or ""))
    return int(m.group(1)) if m else None


def find_latest_run(runs_dir: Optional[Path] = None) -> Path:
    """The most recently modified ``runs_dir/*/`` (default ``runs/``) holding a config.json (the
    modification times of its files count too)."""
    runs_dir = RUNS_DIR if runs_dir is None else Path(runs_dir)
    candidates = []
    if runs_dir.is_dir():
        for d in runs_dir.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / CONFIG).is_file():
                mtimes = [d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()
                                                if f.is_file()]
                candidates.append((max(mtimes), d))
    if not candidates:
        raise ctio.CTDataError(f"{runs_dir}: no training run with a config.json found; train "
                               "one with Mytrain.py or pass --run RUN_DIR")
    return max(candidates)[1]


# --- Training state and history -----------------------------------------------------------------
def state_file(run: Path) -> Path:
    return Path(run) / STATE / STATE_JSON


def has_state(run: Path) -> bool:
    """True once the run finished (and saved) at least one epoch."""
    return state_file(run).is_file()


def read_state(run: Path) -> dict:
    """state/state.json: {"epoch", "weights", "minutes", "history", "best_val_psnr"?, ...}."""
    path = state_file(run)
    state = ctio.read_json(path, f"{path}: no training state (no finished epoch)")
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise ctio.CTDataError(f"{path}: not a training state")
    return state


def state_weights_name(epoch: int) -> str:
    return f"gan_epoch{epoch:04d}.weights.h5"


def write_state(run: Path, state: dict) -> None:
    """Write state.json (LAST: it names the complete epoch), then drop older state weights."""
    write_json(state_file(run), state)
    for old in (Path(run) / STATE).glob("gan_epoch*.weights.h5"):
        if _STATE_WEIGHTS.search(old.name) and old.name != state.get("weights"):
            old.unlink()


def write_history(run: Path, rows: list[dict]) -> None:
    keys = ["epoch"] + sorted({k for r in rows for k in r} - {"epoch"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    with ctio.atomic_path(Path(run) / HISTORY) as tmp:
        tmp.write_text(buf.getvalue())


def read_history(run: Path) -> list[dict]:
    with open(Path(run) / HISTORY, newline="") as f:
        return list(csv.DictReader(f))


def check_new_run(out: Path) -> None:
    """A new run may start in ``out``: absent, or an empty folder."""
    if out.exists() and not out.is_dir():
        raise ctio.CTDataError(f"--out {out}: exists and is not a folder")
    if (out / CONFIG).exists():
        raise ctio.CTDataError(f"--out {out}: already holds a run; add --resume to continue "
                               "it or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise ctio.CTDataError(f"--out {out}: folder is not empty")


def discard_unstarted_run(out: Path) -> None:
    """Remove what a new run wrote before its first epoch was saved: a config.json without
    state/state.json would block both the same command ("already holds a run") and --resume."""
    if has_state(out):
        return
    for name in (CONFIG, HISTORY, LATEST, BEST):
        (out / name).unlink(missing_ok=True)
    for name in (TENSORBOARD, STATE, SNAPSHOTS, CACHE):
        shutil.rmtree(out / name, ignore_errors=True)


def training_summary(run: Optional[Path], weights: Optional[str] = None) -> dict:
    """Epochs, steps and training minutes behind ``weights`` of a run folder.

    The epoch of a snapshot, the chosen epoch (``best_epoch``) for ``generator_best``, else the last
    epoch of history.csv; empty if the run cannot be read (the summary is informative only)."""
    if not run:
        return {}
    snap = snapshot_epoch(weights)
    try:
        train = read_run_config(Path(run))["train"]
        rows = read_history(Path(run))
        epoch = snap or int(rows[-1]["epoch"])
        if str(weights or "").endswith(BEST):  # selected on validation
            epoch = int(read_state(Path(run)).get("best_epoch", epoch))
        row = next(r for r in rows if int(r["epoch"]) == epoch)
        return {"epochs": epoch, "minutes": float(row["minutes"]),
                "steps": epoch * int(train["steps_per_epoch"]), "snapshot": snap is not None}
    except (ctio.CTDataError, OSError, ValueError, KeyError, IndexError, TypeError,
            StopIteration):
        return {}


def best_choice(run: Path) -> str:
    """Which epoch ``generator_best`` of ``run`` is and why (state.json ``best_epoch``,
    ``best_reason``; runs made before ``--select`` chose by validation PSNR); "" if unknown."""
    try:
        state = read_state(Path(run))
    except (ctio.CTDataError, OSError, ValueError):
        return ""
    if "best_epoch" not in state:
        return ""
    return f"epoch {state['best_epoch']}: {best_reason(state)}"


def best_reason(state: dict) -> str:
    """state.json's ``best_reason``; runs made before ``--select`` chose by validation PSNR."""
    return state.get("best_reason", "best validation PSNR")


def weights_kind(run: Path) -> str:
    """"moving average ..." when ``run`` saved the moving average of its generator's weights
    (Mytrain --ema-decay), else "" (also for an unreadable config)."""
    try:
        decay = float(read_run_config(Path(run))["train"].get("ema_decay") or 0.0)
    except (ctio.CTDataError, OSError, ValueError, TypeError):
        return ""
    return f"moving average of the generator's weights, --ema-decay {decay:g}" if decay else ""


# --- Mytest.py manifest -------------------------------------------------------------------------
MANIFEST_FIELDS = ("patient", "slice_id", "position", "height", "width", "ld_path", "fd_path",
                   "pred_npy", "png", "tiff", "dicom", "figure", "series_uid", "window", "run",
                   "weights", "weights_sha256")
_MANIFEST_NEEDS = ("patient", "slice_id", "ld_path", "fd_path", "pred_npy")


def read_manifest(out: Path) -> list[dict]:
    """The rows of OUT/manifest.csv ([] if there is none), every MANIFEST_FIELDS key present."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(_MANIFEST_NEEDS) - set(reader.fieldnames or ())
            if missing:
                raise ctio.CTDataError(f"{path}: not a Mytest.py manifest (missing columns "
                                       f"{', '.join(sorted(missing))})")
            return [{k: (r.get(k) or "") for k in MANIFEST_FIELDS} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ctio.CTDataError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None


def _manifest_order(row: dict):
    try:
        pos = float(row["position"])
    except ValueError:
        pos = 0.0
    return row["patient"], pos, row["slice_id"]


def write_manifest(out: Path, rows) -> None:
    """OUT/manifest.csv with ``rows`` sorted by patient and table position, atomically."""
    with ctio.atomic_path(Path(out) / MANIFEST) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            for row in sorted(rows, key=_manifest_order):
                w.writerow(row)
